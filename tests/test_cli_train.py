"""`enshuffle train` as a user runs it: a real `python -m enshuffle` process, real IDX files.

Output contract: with --json one JSON object per epoch on stdout, then (for distributed runs) one
{"ledger": ...} object; --save-weights writes exactly w1, b1, w2, b2. Wrong values end with exit
status 2 and a one-line error naming the value, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from core_data import FASHION_INSTALLED
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.model import CLASSES, INPUTS, LocalCompute, get_preset
from idx_util import random_arrays, write_idx_dir
from presets import SMALL_NET
from wire_util import enshuffle_cli

HIDDEN = get_preset("default").hidden  # the default preset's network: 784-2048-10

REPO = Path(__file__).resolve().parents[1]
EPOCH_KEYS = {"type", "epoch", "cost", "train_accuracy", "test_accuracy", "seconds"}
SHAPES = {"w1": (INPUTS, HIDDEN), "b1": (HIDDEN,), "w2": (HIDDEN, CLASSES), "b2": (CLASSES,)}


def json_lines(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def assert_epoch_objects(objects: list[dict], epochs: int) -> None:
    assert [o["epoch"] for o in objects] == list(range(1, epochs + 1))
    for o in objects:
        assert set(o) == EPOCH_KEYS and o["type"] == "epoch"
        assert np.isfinite(o["cost"]) and o["cost"] > 0
        assert 0.0 <= o["train_accuracy"] <= 1.0 and 0.0 <= o["test_accuracy"] <= 1.0
        assert o["seconds"] > 0


@pytest.mark.skipif(not FASHION_INSTALLED, reason="needs Fashion-MNIST (the default data source) installed")
def test_centralized_json_with_default_data(core_cache):
    """The brief's command verbatim: the default data source is Fashion-MNIST."""
    proc = enshuffle_cli("train", "--nodes", "0", "--epochs", "1", "--limit", "2000", "--json", cache=core_cache)
    objects = json_lines(proc)
    assert len(objects) == 1
    assert_epoch_objects(objects, 1)
    assert objects[0]["train_accuracy"] > 0.3  # one epoch of the default preset on real data learns
    assert "Fashion-MNIST" in proc.stderr  # the data source is said, on stderr


def test_centralized_json_one_object_per_epoch(core_data_dir, core_cache):
    proc = enshuffle_cli(
        "train",
        "--nodes",
        "0",
        "--epochs",
        "2",
        "--limit",
        "2000",
        "--json",
        "--data",
        str(core_data_dir),
        cache=core_cache,
    )
    objects = json_lines(proc)
    assert len(objects) == 2  # no ledger object: the centralized run sends nothing anywhere
    assert_epoch_objects(objects, 2)


@pytest.mark.parametrize("disguise, deltas", [("resident", "values hidden"), ("share", "positions hidden")])
def test_in_process_json_ends_with_ledger(core_data_dir, core_cache, disguise, deltas):
    proc = enshuffle_cli(
        "train",
        "--nodes",
        "2",
        "--in-process",
        "--epochs",
        "1",
        "--limit",
        "1000",
        "--json",
        "--offload",
        "matmul",
        "--disguise",
        disguise,
        *SMALL_NET,
        "--data",
        str(core_data_dir),
        cache=core_cache,
    )
    objects = json_lines(proc)
    assert len(objects) == 2
    assert_epoch_objects(objects[:1], 1)
    assert objects[-1]["type"] == "ledger"
    ledger, forms = objects[-1]["ledger"], objects[-1]["forms"]
    assert set(ledger) == {"node-1", "node-2"}
    images = [shares["images"] for shares in ledger.values()]
    # The non-blank pixels split evenly in two (blank pixels never leave the coordinator).
    assert abs(images[0] - images[1]) <= 1 / 784 and 0.4 < images[0] <= 0.5
    for node, shares in ledger.items():
        assert shares["w1"] == shares["images"]
        # Label-dependent work stays home: nothing of labels, outputs, w2 or activations goes out.
        assert shares["labels"] == shares["outputs"] == shares["w2"] == shares["activations"] == 0.0
        assert forms[node]["images"] == forms[node]["w1"] == "values hidden"
        assert forms[node]["deltas"] == deltas  # resident: dz1 with its units mixed by the secret N
    assert any("deltas" in note for note in objects[-1]["notes"])


def test_save_weights_writes_exactly_the_four_arrays(core_data_dir, core_dataset, core_cache, tmp_path):
    path = tmp_path / "weights.npz"
    proc = enshuffle_cli(
        "train",
        "--nodes",
        "0",
        "--epochs",
        "1",
        "--limit",
        "500",
        "--dtype",
        "float64",
        "--seed",
        "7",
        "--data",
        str(core_data_dir),
        "--save-weights",
        str(path),
        cache=core_cache,
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(path, allow_pickle=False) as saved:
        assert sorted(saved.files) == sorted(SHAPES)
        weights = {name: saved[name] for name in saved.files}
    for name, shape in SHAPES.items():
        assert weights[name].shape == shape and weights[name].dtype == np.float64
    # They are the trained weights: the same run in this process gives the same numbers (only
    # BLAS threading could reorder sums; float64, rtol 1e-9).
    preset = replace(get_preset("default", epochs=1, dtype="float64"), seed=7)  # --seed 7: the user's own seed
    inputs = prepare(core_dataset, preset, limit=500)
    trainer = Trainer(preset, inputs, LocalCompute(inputs.images))
    trainer.run_epoch()
    for name in SHAPES:
        np.testing.assert_allclose(weights[name], trainer.params[name], rtol=1e-9, atol=1e-12, err_msg=name)


def corrupt_dir(base: Path, kind: str) -> tuple[Path, Path]:
    """A data directory with one damaged file; returns (directory, the damaged file)."""
    paths = write_idx_dir(base / kind, **random_arrays(n_train=30, n_test=10, seed=1), gz=(kind == "bad-gzip"))
    victim = paths["train_images"]
    data = victim.read_bytes()
    if kind == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif kind == "bad-magic":
        victim.write_bytes(b"\x12\x34\x56\x78" + data[4:])
    elif kind == "bad-gzip":
        victim.write_bytes(data[: len(data) // 3])
    return base / kind, victim


def assert_usage_error(proc: subprocess.CompletedProcess, *must_name: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr
    assert errors[0].startswith("enshuffle train: error: ")
    for word in must_name:
        assert word in errors[0], f"{word!r} not named in: {errors[0]}"
    return errors[0]


@pytest.mark.parametrize(
    "args,named",
    [
        (["--nodes", "-1"], ["--nodes", "-1"]),
        (["--epochs", "0"], ["--epochs", "0"]),
        (["--preset", "nope"], ["--preset", "nope"]),
        (["--dtype", "float16"], ["--dtype", "float16"]),
        (["--data", "/does/not/exist"], ["/does/not/exist"]),
    ],
)
def test_wrong_values_exit_2_with_one_line(args, named, core_cache):
    assert_usage_error(enshuffle_cli("train", "--nodes", "0", "--epochs", "1", *args, cache=core_cache), *named)


@pytest.mark.parametrize("kind", ["truncated", "bad-magic", "bad-gzip"])
def test_corrupt_idx_file_exit_2_names_the_file(kind, tmp_path, core_cache):
    directory, victim = corrupt_dir(tmp_path, kind)
    proc = enshuffle_cli("train", "--nodes", "0", "--epochs", "1", "--data", str(directory), cache=core_cache)
    line = assert_usage_error(proc, str(victim))
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # nothing but the error
    assert "again" in line or "MNIST-format" in line or "gzip" in line  # says what to do / what is wrong


def _train(home: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "enshuffle", "train", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "ENSHUFFLE_CACHE": str(cache), "ENSHUFFLE_HOME": str(home)},
    )


def test_train_resume_keeps_its_local_nodes_and_says_train(core_data_dir, core_cache, tmp_path):
    """A resumed `train` run's local nodes are the same nodes (the ledger keeps 2 rows, not 4),
    and a finished run points at `enshuffle train`, not `enshuffle coordinator`."""
    home, run_dir = tmp_path / "home", tmp_path / "run"
    common = [
        "--nodes",
        "2",
        "--limit",
        "300",
        "--data",
        str(core_data_dir),
        "--offload",
        "matmul",
        "--json",
        "--out",
        str(run_dir),
        *SMALL_NET,
    ]
    first = _train(home, core_cache, *common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    resumed = _train(home, core_cache, *common, "--resume", "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    ledger = json_lines(resumed)[-1]
    assert ledger["type"] == "ledger" and len(ledger["ledger"]) == 2, ledger["ledger"]
    finished = _train(home, core_cache, *common, "--resume", "--epochs", "2")
    assert finished.returncode == 2 and "enshuffle train --out" in finished.stderr, finished.stderr
    assert "enshuffle coordinator" not in finished.stderr


def test_resume_refuses_a_chain_whose_older_version_fails_verification(core_data_dir, core_cache, tmp_path):
    home, run_dir = tmp_path / "home", tmp_path / "run"
    common = ["--nodes", "1", "--limit", "300", "--data", str(core_data_dir), "--out", str(run_dir), *SMALL_NET]
    first = _train(home, core_cache, *common, "--epochs", "2")
    assert first.returncode == 0, first.stderr
    from enshuffle.chain import Chain

    oldest = Chain(run_dir).versions()[0].version_id
    array = sorted(p for p in (run_dir / "chain" / oldest).iterdir() if p.name != "version.json")[0]
    data = bytearray(array.read_bytes())
    data[-1] ^= 0x01
    array.write_bytes(bytes(data))
    resumed = _train(home, core_cache, *common, "--resume", "--epochs", "3")
    assert resumed.returncode == 2, resumed.stderr
    assert "fails verification" in resumed.stderr and oldest[:12] in resumed.stderr, resumed.stderr


@pytest.mark.parametrize("network", [list(SMALL_NET), ["--hidden", "24,24,24"]], ids=["notebook", "deeper"])
def test_the_headless_ledger_fits_80_columns(core_data_dir, core_cache, tmp_path, network):
    done = _train(
        tmp_path / "home",
        core_cache,
        "--nodes",
        "2",
        "--epochs",
        "1",
        "--limit",
        "300",
        "--data",
        str(core_data_dir),
        "--offload",
        "matmul",
        *network,
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout[done.stdout.index("Exposure ledger") :].splitlines()
    assert all(len(line) <= 80 for line in table), "\n".join(line for line in table if len(line) > 80)
    assert any(line.startswith("local-1") and "%" in line for line in table), table
    assert any("images" in line for line in table) and any("deltas" in line for line in table), table


def test_the_default_network_trains_over_the_wire_with_its_first_layer_on_the_nodes(
    core_data_dir, core_cache, tmp_path
):
    """`enshuffle train --nodes 2` with no network option: the default preset's 784-2048-10 ReLU
    network, which `--offload auto` (the default) ships to the node processes (its resident first
    layer pays at this width), trains, and the ledger shows the nodes' blocks."""
    done = _train(
        tmp_path / "home",
        core_cache,
        "--nodes",
        "2",
        "--epochs",
        "1",
        "--limit",
        "2000",
        "--json",
        "--data",
        str(core_data_dir),
    )
    objects = json_lines(done)
    assert "784-2048-10 relu" in done.stderr and "offload auto" in done.stderr, done.stderr
    assert re.search(r"resident +nodes", done.stderr) and "nothing pays" not in done.stderr, done.stderr
    assert_epoch_objects(objects[:1], 1)
    assert objects[0]["train_accuracy"] > 0.3
    ledger = objects[-1]["ledger"]
    assert objects[-1]["type"] == "ledger" and len(ledger) == 2, objects[-1]
    assert all(0.4 < shares["images"] <= 0.5 and shares["w1"] == shares["images"] for shares in ledger.values())
