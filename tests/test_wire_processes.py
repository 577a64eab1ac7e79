"""End to end over real processes: `enshuffle train/coordinator/node/chain` on 127.0.0.1.

Every process is a real `python -m enshuffle`, every node has its own key (its own
ENSHUFFLE_HOME), data are the real IDX files of core_data. Waits poll files with deadlines.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from enshuffle.chain import Chain
from enshuffle.coordinator.offload import COST_MODEL_FILE
from enshuffle.protocol.keys import Identity, load_or_create_identity
from wire_util import (
    assert_same_weights,
    coordinator_fingerprint,
    enshuffle_cli,
    free_port,
    load_npz,
    spawn_coordinator,
    spawn_node,
    train_wire_and_central,
    wait_until,
)

EXIT_TRUST = 3


def training_args(preset: str, epochs: int, limit: int, data: Path) -> list[str]:
    # --seed: both runs of a comparison start from the same weights and visit samples in the same
    # order (without it each run draws its own from its secret, as it should).
    # --offload matmul: the products go to the nodes even where keeping them would be cheaper.
    return [
        "--preset",
        preset,
        "--dtype",
        "float64",
        "--epochs",
        str(epochs),
        "--data",
        str(data),
        "--limit",
        str(limit),
        "--seed",
        "9",
        "--json",
        "--offload",
        "matmul",
    ]


def json_objects(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- 1. three node processes == the centralized reference ----------------------------------------


@pytest.mark.parametrize("preset,limit", [("seed", 1000), ("default", 600)])
def test_three_node_processes_equal_the_centralized_reference(preset, limit, core_data_dir, core_cache, tmp_path):
    args = training_args(preset, 2, limit, core_data_dir)
    wire, central = train_wire_and_central(3, args, tmp_path, core_cache)
    wire_objects, central_objects = json_objects(wire.stdout), json_objects(central.stdout)
    # Three distinct node processes did the work: the ledger names three nodes, each with ~1/3 of the images.
    ledger = wire_objects[-1]["ledger"]
    assert len(ledger) == 3 and all(0.3 < shares["images"] < 0.37 for shares in ledger.values()), ledger
    assert wire_objects[-1]["bytes_received"] > 0
    for got, want in zip(wire_objects[:-1], central_objects, strict=True):
        assert got["epoch"] == want["epoch"]
        assert got["cost"] == pytest.approx(want["cost"], rel=1e-9)
        assert got["train_accuracy"] == want["train_accuracy"] and got["test_accuracy"] == want["test_accuracy"]


# --- 2a. a node pinned to another coordinator key refuses ----------------------------------------


def test_node_pinned_to_another_fingerprint_refuses_the_real_coordinator(core_data_dir, core_cache, tmp_path):
    port = free_port()
    coord_home = tmp_path / "coordinator"
    real_fp = coordinator_fingerprint(coord_home)
    coordinator = spawn_coordinator(
        coord_home,
        port,
        core_cache,
        tmp_path,
        "coordinator",
        "--min-nodes",
        "2",
        "--out",
        str(tmp_path / "run"),
        *training_args("seed", 1, 500, core_data_dir),
    )
    wrong_fp = Identity.generate().fingerprint
    node = spawn_node(tmp_path / "node", f"tcp://127.0.0.1:{port}", wrong_fp, "pinned-wrong", tmp_path)
    try:
        assert node.wait(30) == EXIT_TRUST, node.describe()
        err = node.err()
        assert real_fp in err and wrong_fp in err, err
        assert "Traceback" not in err
        # The operator is told why (not "Host unreachable"), and the node never counted as joined.
        wait_until(
            lambda: "refused our key" in coordinator.err(),
            15,
            "the coordinator to log the refusal",
            on_timeout=coordinator.describe,
        )
        assert wrong_fp in coordinator.err() and "joined" not in coordinator.err()
        # The coordinator is unharmed: still waiting for nodes, and stops cleanly on SIGTERM.
        assert coordinator.alive(), coordinator.describe()
        coordinator.signal(signal.SIGTERM)
        assert coordinator.wait(15) == 130, coordinator.describe()  # stopped before it finished
        assert "Traceback" not in coordinator.err()
    finally:
        node.stop()
        coordinator.stop()


# --- 4 and 5. the chain: tampering is caught; kill -9 and --resume gives the same model ------------

RESUME_EPOCHS = 3
RESUME_LIMIT = 1200  # default preset, batch 128: 10 steps an epoch


def coordinator_with_nodes(tmp: Path, port: int, data: Path, cache: Path, run_dir: Path, tag: str):
    """A coordinator process (2 shards) admitting two node processes by an --allow file, both
    pinned to its key."""
    home = tmp / f"{tag}-coordinator"
    fp = coordinator_fingerprint(home)
    # One plan secret for every run made here: a resident run's reparameterization comes from it,
    # so an interrupted and an uninterrupted run train the same network.
    run_dir.mkdir(parents=True, mode=0o700)
    (run_dir / "plan.secret").write_text(f"{0x5EC2E7:064x}\n")
    (run_dir / "plan.secret").chmod(0o600)
    allow = home / "allowed"
    allow.write_text(
        "# the two volunteers\n"
        + "".join(
            f"{load_or_create_identity('node', tmp / f'{tag}-node-{i}', name=f'{tag}-{i}').fingerprint}  # {tag}-{i}\n"
            for i in (1, 2)
        )
    )
    coordinator = spawn_coordinator(
        home,
        port,
        cache,
        tmp,
        f"{tag}-coordinator",
        "--min-nodes",
        "2",
        "--out",
        str(run_dir),
        "--allow",
        str(allow),
        *training_args("default", RESUME_EPOCHS, RESUME_LIMIT, data),
    )
    nodes = [spawn_node(tmp / f"{tag}-node-{i}", f"tcp://127.0.0.1:{port}", fp, f"{tag}-{i}", tmp) for i in (1, 2)]
    return home, coordinator, nodes


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, core_data_dir, core_cache):
    """A finished 3-epoch coordinator run (2 node processes): its RUN_DIR."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_dir = tmp / "run"
    _, coordinator, nodes = coordinator_with_nodes(tmp, free_port(), core_data_dir, core_cache, run_dir, "ref")
    try:
        assert coordinator.wait(90) == 0, coordinator.describe() + "".join(n.describe() for n in nodes)
        for node in nodes:
            assert node.wait(15) == 0, node.describe()  # BYE run-finished ends a node cleanly
    finally:
        for proc in (coordinator, *nodes):
            proc.stop()
    epochs = json_objects(coordinator.out())
    assert [o["epoch"] for o in epochs[:-1]] == [1, 2, 3]
    return run_dir


def test_chain_verify_passes_and_catches_a_flipped_byte(uninterrupted_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted_run, run_dir)
    from enshuffle.protocol.keys import fingerprint

    key = ["--key", fingerprint(bytes.fromhex(Chain(run_dir).run_key()))]  # its coordinator's key (not this home's)
    ok = enshuffle_cli("chain", "verify", str(run_dir), *key, home=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().startswith(f"ok: {RESUME_EPOCHS} versions verified, signed by coordinator key SHA256:")
    first = Chain(run_dir).versions()[0]
    assert first.parent_id is None and first.metadata["epoch"] == 1
    stored = run_dir / "chain" / first.version_id / "0.bin"  # the first array (w1) of the first version
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    bad = enshuffle_cli("chain", "verify", str(run_dir), *key, home=tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"version {first.version_id[:12]}" in bad.stderr and "modified" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


def test_coordinator_killed_and_resumed_gives_the_uninterrupted_model(
    uninterrupted_run, core_data_dir, core_cache, tmp_path
):
    port = free_port()
    run_dir = tmp_path / "run"
    home, coordinator, nodes = coordinator_with_nodes(tmp_path, port, core_data_dir, core_cache, run_dir, "k")
    resumed = None
    try:
        head = run_dir / "chain" / "HEAD"
        wait_until(
            head.exists,
            60,
            "the first model version",
            on_timeout=lambda: coordinator.describe() + "".join(n.describe() for n in nodes),
        )
        # Freeze the nodes so the run cannot race to its end, then kill the coordinator outright.
        for node in nodes:
            node.signal(signal.SIGSTOP)
        coordinator.signal(signal.SIGKILL)
        assert coordinator.wait(10) == -signal.SIGKILL
        for node in nodes:
            node.signal(signal.SIGCONT)
        at_kill = Chain(run_dir).versions()
        assert 1 <= at_kill[-1].metadata["epoch"] < RESUME_EPOCHS, "the run was not interrupted"

        resumed = spawn_coordinator(
            home,
            port,
            core_cache,
            tmp_path,
            "k-resumed",
            "--min-nodes",
            "2",
            "--out",
            str(run_dir),
            "--resume",
            "--allow",
            str(home / "allowed"),
            "--data",
            str(core_data_dir),
            "--json",
        )
        # The same node processes find the restarted coordinator by themselves.
        assert resumed.wait(90) == 0, resumed.describe() + "".join(n.describe() for n in nodes)
        for node in nodes:
            assert node.wait(15) == 0, node.describe()
            assert node.err().count("connected to") >= 2, node.describe()  # a second session
        assert "resumed from model version" in resumed.err()
        epochs = [o["epoch"] for o in json_objects(resumed.out())[:-1]]
        assert epochs == list(range(at_kill[-1].metadata["epoch"] + 1, RESUME_EPOCHS + 1))
    finally:
        for proc in (coordinator, resumed, *nodes):
            if proc is not None:
                proc.stop()

    verify = enshuffle_cli("chain", "verify", str(run_dir), home=home)  # on the coordinator's machine
    assert verify.returncode == 0, verify.stderr
    versions = Chain(run_dir).versions()
    assert [v.metadata["epoch"] for v in versions][-1] == RESUME_EPOCHS
    assert [v.version_id for v in versions[: len(at_kill)]] == [v.version_id for v in at_kill]  # extended, not forked
    for name, rd in (("resumed", run_dir), ("reference", uninterrupted_run)):
        out = enshuffle_cli("chain", "export", str(rd), "--npz", str(tmp_path / f"{name}.npz"), home=tmp_path)
        assert out.returncode == 0, out.stderr
    assert_same_weights(load_npz(tmp_path / "resumed.npz"), load_npz(tmp_path / "reference.npz"))


def test_offload_auto_ships_no_training_block_when_no_training_product_goes(core_data_dir, core_cache, tmp_path):
    """--offload auto on a small run under the share disguise (the resident one's first layer pays
    even here) computes every training product here: the node may get the test block for
    evaluating, never the training block, and the ledger row says what it holds."""
    # Under the built-in cost model: a bench test earlier in the session may have kept the one it
    # measured (on a loaded machine, one under which the first layer pays) in the shared cache.
    (core_cache / COST_MODEL_FILE).unlink(missing_ok=True)
    port = free_port()
    home = tmp_path / "home"
    coordinator = spawn_coordinator(
        home,
        port,
        core_cache,
        tmp_path,
        "coordinator",
        "--offload",
        "auto",
        "--open",
        "--disguise",
        "share",
        "--epochs",
        "1",
        "--limit",
        "300",
        "--data",
        str(core_data_dir),
        "--json",
    )
    node = spawn_node(tmp_path / "node", f"tcp://127.0.0.1:{port}", None, "only", tmp_path)
    try:
        assert coordinator.wait(120) == 0, coordinator.describe() + node.describe()
        assert node.wait(30) == 0, node.describe()
    finally:
        coordinator.stop()
        node.stop()
    assert "every product is computed here" in coordinator.err(), coordinator.err()
    assert "stored static train." not in node.err(), node.err()
