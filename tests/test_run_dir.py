"""The run directory: secrets, refusals and resume checks, before anything trains.

- Partitions and disguises never come from the public training seed: two runs with the same
  seed draw different pixel blocks; a run's plan secret (mode 0600) gives --resume the same ones.
- A new run refuses a RUN_DIR that already holds a chain; --resume refuses another coordinator
  key, other data, and a broken run.json, each with a one-line error (exit status 2 from the CLI).
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from enshuffle.cli import UsageError
from enshuffle.coordinator.run import CoordinatorRun, plan_secret
from enshuffle.coordinator.settings import RunConfig, Serving
from enshuffle.coordinator.training import prepare
from enshuffle.dataset import load_idx_dir
from presets import small_default


def make_run(data_dir: Path, run_dir: Path, home: Path, *, resume: bool = False, limit: int = 300) -> CoordinatorRun:
    preset = small_default(epochs=1)
    inputs = prepare(load_idx_dir(data_dir), preset, limit)
    config = RunConfig(
        limit=limit,
        shards=2,
        serving=Serving(bind="tcp://127.0.0.1:*", min_nodes=2),
        run_dir=str(run_dir),
        resume=resume,
    )
    return CoordinatorRun(config, preset, inputs, home=home, quiet=True)


def blocks(run: CoordinatorRun) -> list[np.ndarray]:
    return [np.sort(b) for b in run.compute.pixel_blocks]


def test_plan_secret_is_private_and_stable(tmp_path):
    first = plan_secret(tmp_path)
    assert plan_secret(tmp_path) == first
    mode = stat.S_IMODE((tmp_path / "plan.secret").stat().st_mode)
    assert mode == 0o600
    assert plan_secret(tmp_path / "other") != first


def test_same_seed_different_plans_and_resume_keeps_them(core_data_dir, tmp_path):
    a = make_run(core_data_dir, tmp_path / "a", tmp_path / "home")
    b = make_run(core_data_dir, tmp_path / "b", tmp_path / "home")
    try:
        assert a.preset.seed == b.preset.seed
        assert not all(np.array_equal(x, y) for x, y in zip(blocks(a), blocks(b)))
        a.write_version()  # a head to resume from
        a_blocks = blocks(a)
    finally:
        a.server.close()
        b.server.close()
    resumed = make_run(core_data_dir, tmp_path / "a", tmp_path / "home", resume=True)
    try:
        assert all(np.array_equal(x, y) for x, y in zip(blocks(resumed), a_blocks))
    finally:
        resumed.server.close()


def test_refusals(core_data_dir, tmp_path):
    run = make_run(core_data_dir, tmp_path / "r", tmp_path / "home")
    run.write_version()
    run.server.close()
    with pytest.raises(UsageError, match="already holds a model chain"):
        make_run(core_data_dir, tmp_path / "r", tmp_path / "home")
    with pytest.raises(UsageError, match="signed by coordinator key"):
        make_run(core_data_dir, tmp_path / "r", tmp_path / "other-home", resume=True)
    with pytest.raises(UsageError, match="other data"):
        make_run(core_data_dir, tmp_path / "r", tmp_path / "home", resume=True, limit=200)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"preset": "default"})])
def test_broken_run_json_is_a_one_line_error(tmp_path, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(content)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "enshuffle",
            "coordinator",
            "--bind",
            "tcp://127.0.0.1:29811",
            "--resume",
            "--out",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"ENSHUFFLE_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "run.json" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_run_directory_setup_never_chmods_through_a_link(tmp_path):
    import os

    from enshuffle.coordinator.run import make_private

    outside = tmp_path / "someone-elses"
    outside.mkdir(mode=0o755)
    os.chmod(outside, 0o755)
    (outside / "file").write_text("x")
    os.chmod(outside / "file", 0o644)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "link").symlink_to(outside, target_is_directory=True)
    (run_dir / "filelink").symlink_to(outside / "file")
    umask = os.umask(0o022)
    try:
        make_private(run_dir)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o755
    assert stat.S_IMODE((outside / "file").stat().st_mode) == 0o644


def test_a_home_writable_by_others_is_warned_about_and_so_is_a_shared_trust_file(tmp_path, capsys):
    import os

    from enshuffle.protocol.keys import KeyStoreError, TrustStore, load_or_create_identity

    home = tmp_path / "shared-home"
    home.mkdir()
    os.chmod(home, 0o777)
    load_or_create_identity("node", home)
    assert "writable by other users" in capsys.readouterr().err
    store = TrustStore(home)
    store.check("tcp://127.0.0.1:1", "SHA256:" + "-".join(["AAAA"] * 8))  # remembered (trust on first use)
    os.chmod(store.path, 0o666)
    with pytest.raises(KeyStoreError, match="can be changed by another user"):
        store.remembered("tcp://127.0.0.1:1")


def test_a_failed_version_write_is_retried_not_fatal(core_data_dir, tmp_path, monkeypatch):
    import errno

    from enshuffle.chain import Chain

    run = make_run(core_data_dir, tmp_path / "run", tmp_path / "home")
    real = Chain.append
    calls = []

    def flaky(self, arrays, metadata):
        calls.append(1)
        if len(calls) == 1:  # what a coordinator out of file descriptors met on chain/LOCK
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self, arrays, metadata)

    monkeypatch.setattr(Chain, "append", flaky)
    try:
        version = run.write_version()
    finally:
        run.server.close()
    assert version is not None and len(calls) == 2
    assert run.chain.head() == version
    assert any("could not write a model version" in line for line in run.state.snapshot().log)


def test_the_printed_resume_command_serves_as_the_run_did(core_data_dir, core_cache, tmp_path):
    """Copied exactly, the command a finished coordinator prints listens on the run's --bind, admits
    the run's --allow list and reads the run's --data: an allow-listed volunteer rejoins it."""
    import shlex

    from enshuffle.protocol.keys import load_or_create_identity
    from wire_util import Proc, free_port, process_env, spawn_node

    home, node_home, run_dir = tmp_path / "home", tmp_path / "node-home", tmp_path / "run"
    node_key = load_or_create_identity("node", node_home, name="vol").fingerprint
    allow = tmp_path / "allowed"
    allow.write_text(node_key + "\n")
    port = free_port()
    env = process_env(home, core_cache)
    first = Proc(
        [
            "coordinator",
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--allow",
            str(allow),
            "--out",
            str(run_dir),
            "--epochs",
            "1",
            "--limit",
            "300",
            "--data",
            str(core_data_dir),
            "--offload",
            "matmul",
        ],
        env,
        tmp_path,
        "first",
    )
    node = spawn_node(node_home, f"tcp://127.0.0.1:{port}", None, "vol", tmp_path, proc_name="node-1")
    procs = [first, node]
    try:
        assert first.wait(120) == 0, first.describe() + node.describe()
        printed = [
            line.split("to train further: ", 1)[1] for line in first.err().splitlines() if "to train further: " in line
        ]
        assert printed, first.err()
        argv = shlex.split(printed[0])
        assert argv[:2] == ["enshuffle", "coordinator"], printed
        second = Proc(argv[1:], env, tmp_path, "second")
        procs.append(second)
        node2 = spawn_node(node_home, f"tcp://127.0.0.1:{port}", None, "vol", tmp_path, proc_name="node-2")
        procs.append(node2)
        assert second.wait(180) == 0, second.describe() + node2.describe()
        assert "admitted by allow-list" in second.err() and f"listening on tcp://127.0.0.1:{port}" in second.err()
    finally:
        for proc in procs:
            proc.stop()


def test_run_json_is_a_typed_record_that_round_trips(tmp_path):
    from enshuffle.coordinator.settings import RunRecord, Serving

    record = RunRecord(
        preset="default",
        epochs=3,
        dtype="float32",
        offload="matmul",
        seed=None,
        shards=2,
        limit=300,
        data={"images": 300, "sha256": "ab" * 32},
        layers=(784, 16, 10),
        activation="relu",
        data_source="bundled",
        serving=Serving(bind="tcp://127.0.0.1:5555", min_nodes=2, quarantine_after=3),
        extra={"written_by": "a later version"},
    )
    record.save(tmp_path)
    stored = json.loads((tmp_path / "run.json").read_text())
    assert stored["layers"] == [784, 16, 10] and stored["serving"]["min_nodes"] == 2
    assert stored["written_by"] == "a later version"  # a field this version does not know is kept
    assert RunRecord.load(tmp_path) == record


@pytest.mark.parametrize(
    "change, field",
    [
        ({"epochs": "3"}, "epochs"),
        ({"shards": True}, "shards"),
        ({"layers": [784, "x", 10]}, "layers"),
        ({"serving": {"min_nodes": "2"}}, "serving.min_nodes"),
        ({"limit": 1.5}, "limit"),
    ],
)
def test_a_damaged_run_json_names_the_file_and_the_field(tmp_path, change, field):
    from enshuffle.coordinator.settings import RunRecord

    good = {"preset": "default", "epochs": 3, "dtype": "float32", "offload": "matmul", "seed": None, "shards": 2}
    (tmp_path / "run.json").write_text(json.dumps(dict(good, **change)))
    with pytest.raises(UsageError) as raised:
        RunRecord.load(tmp_path)
    assert str(tmp_path / "run.json") in str(raised.value) and f"lacks valid {field};" in str(raised.value)


def test_resuming_makes_a_new_config_from_the_record():
    from enshuffle.coordinator.settings import RunConfig, RunRecord, Serving

    given = RunConfig(
        preset="seed",
        epochs=None,
        dtype="float64",
        offload="auto",
        run_dir="r",
        resume=True,
        serving=Serving(bind="tcp://0.0.0.0:6000"),
        keep_serving=True,
    )
    record = RunRecord(
        preset="default",
        epochs=4,
        dtype="float32",
        offload="matmul",
        seed=7,
        shards=3,
        data_source="/data",
        serving=Serving(bind="tcp://127.0.0.1:5555", min_nodes=3, replicate=True),
    )
    resumed = given.resumed(record)
    assert given.preset == "seed" and given.serving.min_nodes is None  # frozen: nothing is changed in place
    assert (resumed.preset, resumed.epochs, resumed.dtype, resumed.offload, resumed.seed, resumed.shards) == (
        "default",
        4,
        "float32",
        "matmul",
        7,
        3,
    )
    assert resumed.layers == (784, 128, 10) and resumed.activation == "sigmoid"  # a run from before shapes
    assert resumed.data == "/data"
    # Serving: what this command line gives wins, the rest is the run's, then the defaults.
    assert resumed.serving == Serving(bind="tcp://0.0.0.0:6000", min_nodes=3, replicate=True, quarantine_after=3)
    assert given.serving.completed(record.serving)[1] == ["--min-nodes 3", "--replicate"]
    assert replace(given, epochs=6).resumed(record).epochs == 6  # a larger --epochs extends the run
    with pytest.raises(UsageError, match="can only be extended"):
        replace(given, epochs=3).resumed(record)
