"""Ctrl-C (SIGINT) or SIGTERM on `enshuffle train --nodes K` stops gracefully: the current step
finishes, a model version is written, the local node processes end with it, exit status 130
(interrupted before the run finished), and the final figures and the resume hint are printed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from core_data import core_cache, core_data_dir  # noqa: F401  (fixtures)
from enshuffle.coordinator.chain import Chain
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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_train_gracefully(core_data_dir, core_cache, tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = Proc(["train", "--nodes", "2", "--epochs", "500", "--data", str(core_data_dir), "--limit", "600",
                 "--out", str(run_dir)], process_env(tmp_path / "home", core_cache), tmp_path, "train")
    try:
        wait_until(lambda: (run_dir / "chain" / "HEAD").exists(), 60, "the first model version",
                   on_timeout=proc.describe)
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
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
               for pid in kids), "local node processes outlived the coordinator"
