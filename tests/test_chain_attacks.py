"""Attacks on a run's model chain, each with the real files, real keys and the real CLI.

The chain must not be quietly replaced or shortened: a deleted HEAD, a chain re-signed with
another key (even with a consistent KEY file and head log), a rolled-back HEAD, the newest
versions deleted, an edited or deleted head log, and the whole run directory rolled back to an
old copy (caught on the coordinator's machine, where the newest head is also kept). Malformed
records are one-line errors, never tracebacks. `coordinator --resume` of a finished run says so
and how to extend it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from enshuffle.chain import HEAD_LOG, Chain, record_head_in_home
from enshuffle.protocol.keys import Identity, load_or_create_identity
from presets import small_default

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "enshuffle", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, ENSHUFFLE_HOME=str(home)),
    )


def arrays_for(epoch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(epoch)
    return {"w1": rng.standard_normal((20, 8)), "b1": rng.standard_normal(8)}


def meta_for(epoch: int, accuracy: float = 0.8) -> dict:
    return {"epoch": epoch, "step": 10 * epoch, "metrics": {"test_accuracy": accuracy}}


@pytest.fixture
def coordinator_run(tmp_path):
    """Four versions signed by the coordinator key of `home` (which also keeps the newest head)."""
    home = tmp_path / "coordinator-home"
    identity = load_or_create_identity("coordinator", home)
    run_dir = tmp_path / "run"
    chain = Chain(run_dir, identity)
    ids = []
    for epoch in range(1, 5):
        ids.append(chain.append(arrays_for(epoch), meta_for(epoch)))
        record_head_in_home(chain, home)
    return run_dir, home, identity, ids


def verify_here(run_dir: Path, home: Path) -> subprocess.CompletedProcess:
    """`chain verify` on the coordinator's machine (its key is the expected one)."""
    return cli("chain", "verify", str(run_dir), home=home)


def assert_fails(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_the_untouched_chain_verifies_on_the_coordinator_and_elsewhere_with_key(coordinator_run, tmp_path):
    run_dir, home, identity, _ = coordinator_run
    ok = verify_here(run_dir, home)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == (
        f"ok: 4 versions verified, signed by coordinator key {identity.fingerprint} (this machine's coordinator key)"
    )
    elsewhere = tmp_path / "elsewhere"
    ok = cli("chain", "verify", str(run_dir), "--key", identity.fingerprint.lower(), home=elsewhere)
    assert ok.returncode == 0 and "(the key given with --key)" in ok.stdout, ok.stderr
    # Without a key to compare with, a consistent chain is not called ok.
    assert_fails(cli("chain", "verify", str(run_dir), home=elsewhere), identity.fingerprint, "--key")
    assert not (elsewhere / "coordinator_ed25519.pem").exists()  # verifying never creates a key


def test_deleted_head_fails_while_versions_exist(coordinator_run):
    run_dir, home, _, _ = coordinator_run
    (run_dir / "chain" / "HEAD").unlink()
    assert_fails(verify_here(run_dir, home), "HEAD", "missing", "4 versions")


def test_a_chain_resigned_with_another_key_fails(coordinator_run, tmp_path):
    run_dir, home, identity, ids = coordinator_run
    # The attacker rebuilds the whole chain with better numbers and signs it with its own key:
    # KEY, every version, every signature and the head log are consistent.
    attacker = Identity.generate()
    forged_dir = tmp_path / "forged"
    forged = Chain(forged_dir, attacker)
    for epoch in range(1, 5):
        forged.append(arrays_for(epoch), meta_for(epoch, accuracy=0.999))
    shutil.rmtree(run_dir / "chain")
    shutil.copytree(forged_dir / "chain", run_dir / "chain")
    assert Chain(run_dir).verify().ok  # consistent in itself: only the key gives it away
    assert_fails(verify_here(run_dir, home), attacker.fingerprint, identity.fingerprint, "re-signed")
    assert_fails(
        cli("chain", "verify", str(run_dir), "--key", identity.fingerprint, home=tmp_path / "x"),
        attacker.fingerprint,
        identity.fingerprint,
    )


def test_head_rolled_back_fails(coordinator_run):
    run_dir, home, _, ids = coordinator_run
    (run_dir / "chain" / "HEAD").write_text(ids[1] + "\n")
    assert_fails(verify_here(run_dir, home), "rolled back", ids[3][:12])


def test_newest_versions_deleted_and_head_rolled_back_fails(coordinator_run):
    run_dir, home, _, ids = coordinator_run
    for gone in ids[2:]:
        shutil.rmtree(run_dir / "chain" / gone)
    (run_dir / "chain" / "HEAD").write_text(ids[1] + "\n")
    assert_fails(verify_here(run_dir, home), "rolled back")


@pytest.mark.parametrize("edit", ["delete", "drop-middle", "drop-last", "swap", "resign-line"])
def test_an_edited_head_log_fails(coordinator_run, edit, tmp_path):
    run_dir, home, identity, ids = coordinator_run
    path = run_dir / "chain" / HEAD_LOG
    lines = path.read_text().splitlines()
    if edit == "delete":
        path.unlink()
    elif edit == "drop-middle":
        path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    elif edit == "drop-last":  # with HEAD still at the newest version
        path.write_text("\n".join(lines[:-1]) + "\n")
    elif edit == "swap":
        path.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    else:
        entry = json.loads(lines[1])
        entry["epoch"] = 9
        lines[1] = json.dumps(entry)
        path.write_text("\n".join(lines) + "\n")
    if edit == "drop-last":
        # HEAD one version ahead of the log is what a crash between the two writes leaves: not an
        # attack where only the run directory is known; the coordinator's machine, which wrote the
        # fourth line before the crash could have happened, knows better.
        assert cli("chain", "verify", str(run_dir), "--key", identity.fingerprint, home=tmp_path / "x").returncode == 0
        assert_fails(verify_here(run_dir, home), "rolled back")
        return
    proc = cli("chain", "verify", str(run_dir), "--key", identity.fingerprint, home=tmp_path / "x")
    assert_fails(proc, "head log")


def test_whole_run_dir_rolled_back_is_caught_on_the_coordinators_machine(coordinator_run, tmp_path):
    run_dir, home, identity, ids = coordinator_run
    # An old backup: the chain as it was after version 2 (HEAD, HEADS and versions consistent).
    backup = tmp_path / "backup"
    chain = Chain(backup, identity)
    for epoch in (1, 2):
        chain.append(arrays_for(epoch), meta_for(epoch))
    shutil.rmtree(run_dir / "chain")
    shutil.copytree(backup / "chain", run_dir / "chain")
    # Elsewhere, with only the key, this is a valid shorter chain (documented: not detectable there).
    elsewhere = cli("chain", "verify", str(run_dir), "--key", identity.fingerprint, home=tmp_path / "x")
    assert elsewhere.returncode == 0, elsewhere.stderr
    # On the coordinator's machine the newest head it wrote is known.
    assert_fails(verify_here(run_dir, home), "rolled back", ids[3][:12])


@pytest.mark.parametrize(
    "field", ["parent_id", "version_id", "coordinator_key", "signature", "metadata", "arrays", "format"]
)
@pytest.mark.parametrize("how", ["renamed", "wrong-type"])
def test_malformed_records_are_one_line_errors(coordinator_run, field, how):
    run_dir, home, _, ids = coordinator_run
    path = run_dir / "chain" / ids[2] / "version.json"
    record = json.loads(path.read_text())
    if how == "renamed":
        record[field + "_x"] = record.pop(field)
    else:
        record[field] = [1, {"a": None}] if field != "arrays" else [{"name": 3}]
    path.write_text(json.dumps(record))
    proc = verify_here(run_dir, home)
    assert_fails(proc, ids[2][:12])
    log = cli("chain", "log", str(run_dir), home=home)
    assert log.returncode in (0, 2) and "Traceback" not in log.stderr, log.stderr


def test_resume_of_a_finished_run_says_so_and_how_to_extend(core_data_dir, core_cache, tmp_path):
    from enshuffle.coordinator.run import CoordinatorRun
    from enshuffle.coordinator.settings import RunConfig, Serving
    from enshuffle.coordinator.training import prepare
    from enshuffle.dataset import load_idx_dir

    home, run_dir = tmp_path / "home", tmp_path / "run"
    preset = small_default(epochs=2)
    inputs = prepare(load_idx_dir(core_data_dir), preset, 300)
    config = RunConfig(
        limit=300, shards=2, serving=Serving(bind="tcp://127.0.0.1:*", min_nodes=2), run_dir=str(run_dir)
    )
    run = CoordinatorRun(config, preset, inputs, home=home, quiet=True)
    try:
        run.trainer.epoch = preset.epochs  # as the last epoch leaves it
        run.write_version()
    finally:
        run.server.close()
    from wire_util import free_port

    common = (
        "coordinator",
        "--bind",
        f"tcp://127.0.0.1:{free_port()}",
        "--out",
        str(run_dir),
        "--resume",
        "--data",
        str(core_data_dir),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "enshuffle", *common],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, ENSHUFFLE_HOME=str(home), ENSHUFFLE_CACHE=str(core_cache)),
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "has finished" in proc.stderr and "--epochs N" in proc.stderr, proc.stderr
    fewer = subprocess.run(
        [sys.executable, "-m", "enshuffle", *common, "--epochs", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, ENSHUFFLE_HOME=str(home)),
    )
    assert fewer.returncode == 2 and "Traceback" not in fewer.stderr
    assert "can only be extended" in fewer.stderr, fewer.stderr
    # Extending it works: with more epochs the head is no longer the end, and run.json says so.
    longer = CoordinatorRun(replace(config, resume=True), small_default(epochs=3), inputs, home=home, quiet=True)
    try:
        assert not longer.trainer.finished and longer.trainer.epoch == 2
        assert json.loads((run_dir / "run.json").read_text())["epochs"] == 3
    finally:
        longer.server.close()


def test_export_runs_the_checks_of_verify(tmp_path):
    def model(epoch: int, shift: float = 0.0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(epoch)
        return {
            "w1": rng.standard_normal((20, 8)),
            "b1": rng.standard_normal(8),
            "w2": rng.standard_normal((8, 10)),
            "b2": rng.standard_normal(10) + shift,
        }

    home = tmp_path / "coordinator-home"
    identity = load_or_create_identity("coordinator", home)
    run_dir = tmp_path / "run"
    chain = Chain(run_dir, identity)
    ids = []
    for epoch in range(1, 4):
        ids.append(chain.append(model(epoch), meta_for(epoch)))
        record_head_in_home(chain, home)
    out = tmp_path / "model.npz"
    ok = cli("chain", "export", str(run_dir), "--npz", str(out), home=home)
    assert ok.returncode == 0 and out.exists(), ok.stderr
    out.unlink()
    # A rolled-back HEAD: export refuses, as verify does, and writes nothing.
    (run_dir / "chain" / "HEAD").write_text(ids[0] + "\n")
    proc = cli("chain", "export", str(run_dir), "--npz", str(out), home=home)
    assert proc.returncode == 1 and "rolled back" in proc.stderr and not out.exists(), proc.stderr
    # The whole chain rebuilt by another key with a modified b2: refused on the coordinator's machine.
    attacker = Identity.generate()
    forged_dir = tmp_path / "forged"
    forged = Chain(forged_dir, attacker)
    for epoch in range(1, 4):
        forged.append(model(epoch, shift=1.0), meta_for(epoch))
    shutil.rmtree(run_dir / "chain")
    shutil.copytree(forged_dir / "chain", run_dir / "chain")
    proc = cli("chain", "export", str(run_dir), "--npz", str(out), home=home)
    assert proc.returncode == 1 and "re-signed" in proc.stderr and not out.exists(), proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_refuses_a_rolled_back_head(core_data_dir, tmp_path):
    from enshuffle.coordinator.run import CoordinatorRun
    from enshuffle.coordinator.settings import RunConfig, Serving
    from enshuffle.coordinator.training import prepare
    from enshuffle.dataset import load_idx_dir
    from enshuffle.errors import UsageError

    home, run_dir = tmp_path / "home", tmp_path / "run"
    preset = small_default(epochs=4)
    inputs = prepare(load_idx_dir(core_data_dir), preset, 300)
    config = RunConfig(
        limit=300, shards=2, serving=Serving(bind="tcp://127.0.0.1:*", min_nodes=2), run_dir=str(run_dir)
    )
    run = CoordinatorRun(config, preset, inputs, home=home, quiet=True)
    try:
        first = run.write_version()
        run.trainer.epoch = 1
        run.write_version()
    finally:
        run.server.close()
    (run_dir / "chain" / "HEAD").write_text(first + "\n")
    with pytest.raises(UsageError, match="rolled back"):
        CoordinatorRun(replace(config, resume=True), preset, inputs, home=home, quiet=True)
