"""A stop requested while no node is connected mid-step: the coordinator ends instead of waiting
for ever, keeps the last model version as the place to resume from, and says so."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from test_tui_live import LiveRun
from wire_util import wait_until

from enshuffle.chain import Chain
from enshuffle.coordinator.cluster import spawn_local_nodes, stop_local_nodes


def test_stop_with_every_node_gone_ends_the_run(core_data_dir, tmp_path: Path):
    live = LiveRun(tmp_path, core_data_dir, epochs=200, limit=600, shards=1)
    procs = spawn_local_nodes(live.run.server.endpoint, live.run.identity.fingerprint, 1, tmp_path / "nodes")
    try:
        live.start()
        state = live.run.state
        wait_until(lambda: len(state.snapshot().versions) >= 1, 60, "the first model version")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        wait_until(
            lambda: all(r.state == "lost" for r in state.snapshot().nodes.values()),
            20,
            "the coordinator to notice the node is gone",
        )
        versions_before = [v.version_id for v in Chain(live.run_dir).versions()]
        started = time.monotonic()
        live.run.control.request_stop()
        live.thread.join(20)
        assert not live.thread.is_alive(), "the run did not end after a stop with no nodes"
        assert time.monotonic() - started < 20
        assert live.error is None and live.rc == 130  # interrupted, not completed
        snap = state.snapshot()
        assert snap.finished and snap.status == "stopped"
        assert any("stopped:" in line and "--resume" in line for line in snap.log), list(snap.log)[-5:]
        chain = Chain(live.run_dir)
        assert chain.verify().ok
        # Nothing half-done was written: the head is a version from before the stop, or a clean
        # step-boundary version written by the stop itself.
        assert [v.version_id for v in chain.versions()][: len(versions_before)] == versions_before
    finally:
        stop_local_nodes(procs, timeout=0)
