"""Ctrl-C (SIGINT) or SIGTERM on `enshuffle train --nodes K` stops gracefully: the current step
finishes, a model version is written, the local node processes end with it, exit status 130
(interrupted before the run finished), and the final figures and the resume hint are printed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from enshuffle.chain import Chain
from wire_util import Proc, process_env, wait_until


def node_pids_of(parent: int) -> list[int]:
    """Child processes of `parent` (the local nodes), from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                kids.append(int(entry))
    return kids


def train_args(core_data_dir: Path, run_dir: Path) -> list[str]:
    """`enshuffle train` with two local nodes, long enough (500 epochs) to be stopped while it
    runs; --offload matmul: the nodes hold work (and ledger rows) when the signal comes."""
    return [
        "train",
        "--nodes",
        "2",
        "--epochs",
        "500",
        "--data",
        str(core_data_dir),
        "--limit",
        "600",
        "--out",
        str(run_dir),
        "--offload",
        "matmul",
    ]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_train_gracefully(core_data_dir, core_cache, tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = Proc(
        train_args(core_data_dir, run_dir),
        process_env(tmp_path / "home", core_cache),
        tmp_path,
        "train",
    )
    try:
        wait_until(
            lambda: (run_dir / "chain" / "HEAD").exists(), 60, "the first model version", on_timeout=proc.describe
        )
        kids = node_pids_of(proc.pid)
        assert len(kids) == 2, kids
        proc.signal(signum)
        assert proc.wait(30) == 130, proc.describe()  # interrupted: resume it with --resume
    finally:
        proc.stop()
    assert "finishing the step, then stopping" in proc.err()
    assert "Exposure ledger" in proc.out() and "local-1" in proc.out()  # the final figures, every time
    assert f"enshuffle train --out {run_dir} --resume" in proc.err()
    chain = Chain(run_dir)
    assert chain.verify().ok
    assert all(
        not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower() for pid in kids
    ), "local node processes outlived the coordinator"


def test_ctrl_c_in_a_terminal_reaches_only_the_coordinator_and_the_ledger_is_printed(
    core_data_dir, core_cache, tmp_path
):
    """A terminal's Ctrl-C signals the whole foreground process group. The local nodes live in
    their own session, so they finish the step with the coordinator instead of leaving mid-step
    (which once made the final ledger appear in one try and not in another)."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    out, err = tmp_path / "train.out", tmp_path / "train.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "enshuffle", *train_args(core_data_dir, run_dir)],
            env=process_env(tmp_path / "home", core_cache),
            stdout=o,
            stderr=e,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_until(
            lambda: (run_dir / "chain" / "HEAD").exists(),
            60,
            "the first model version",
            on_timeout=lambda: err.read_text(),
        )
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert proc.wait(30) == 130, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Exposure ledger" in out.read_text() and "local-2" in out.read_text(), err.read_text()
    assert Chain(run_dir).verify().ok
