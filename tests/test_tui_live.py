"""Both Textual apps driven by Pilot against a real run on 127.0.0.1.

The coordinator console watches a real `CoordinatorRun` (ROUTER socket, trainer, model chain)
whose nodes are real `enshuffle node` processes started by `spawn_local_nodes`; the node app
watches a real `NodeDaemon` (its own Ed25519 key, trust store and DEALER socket) working for a
real `CoordinatorRun`. The run lives in a thread, as under `run_with_tui`; the apps only ever
see `state.snapshot` and the control objects. Every wait is a poll with a deadline that yields
to the app's event loop (`pilot.pause`), never a bare sleep.
"""

from __future__ import annotations

import pytest

import contextlib
import threading
import time
from pathlib import Path

from textual.widgets import DataTable

from enshuffle import dataset as ds
from enshuffle.chain import Chain
from enshuffle.coordinator.settings import RunConfig, Serving
from enshuffle.coordinator.cluster import spawn_local_nodes, stop_local_nodes
from enshuffle.coordinator.run import CoordinatorRun, verify_chain_message
from enshuffle.coordinator.training import prepare
from enshuffle.blas import get_blas_threads, set_blas_threads
from enshuffle.node.daemon import EXIT_OK, NodeDaemon
from enshuffle.node.state import NodeControl, NodeState
from enshuffle.protocol.keys import Identity, TrustStore
from enshuffle.tui.coordinator_app import CoordinatorApp
from enshuffle.tui.format import short_id
from enshuffle.tui.node_app import NodeApp
from tui_fixtures import cell, pilot_test, text
from wire_util import wait_until
from presets import small_default

REFRESH_HZ = 20.0  # the apps pull a snapshot this often; quicker than the default so waits are short
SIZE = (160, 48)


# --- a real run in a thread ------------------------------------------------------------------


class LiveRun:
    """A CoordinatorRun (the real one `enshuffle train --nodes K` uses) trained in a thread."""

    def __init__(self, tmp: Path, data_dir: Path, *, epochs: int, limit: int, shards: int):
        preset = small_default(epochs=epochs)
        inputs = prepare(ds.load_idx_dir(data_dir), preset, limit)
        self.run_dir = tmp / "run"
        # The configuration cmd_train hands over for `--offload matmul --limit N`, no --json, no --save-weights.
        config = RunConfig(
            limit=limit,
            shards=shards,
            serving=Serving(bind="tcp://127.0.0.1:*", min_nodes=shards),
            run_dir=str(self.run_dir),
        )
        self.run = CoordinatorRun(config, preset, inputs, home=tmp / "coordinator", quiet=True)
        self.run.print_reports = False  # as run_with_tui does: stdout is the terminal the app draws on
        self.rc: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="coordinator-run", daemon=True)

    def _work(self) -> None:
        try:
            self.rc = self.run.run()
        except BaseException as exc:  # surfaced by the test's assertions
            self.error = exc

    def start(self) -> "LiveRun":
        self.thread.start()
        return self

    def verify_chain(self) -> tuple[bool, str]:
        """The console's chain check: the same function `enshuffle coordinator --tui` uses."""
        return verify_chain_message(self.run.chain)

    def app(self) -> CoordinatorApp:
        return CoordinatorApp(
            source=self.run.state.snapshot,
            control=self.run.control,
            verify_chain=self.verify_chain,
            refresh_hz=REFRESH_HZ,
        )

    def log_lines(self) -> list[str]:
        return list(self.run.state.snapshot().log)

    def describe(self) -> str:
        snap = self.run.state.snapshot()
        return (
            f"status={snap.status!r} epoch={snap.epoch} step={snap.step} finished={snap.finished} "
            f"rc={self.rc} error={self.error!r}\n" + "\n".join(snap.log)
        )

    def close(self) -> None:
        """Cleanup after a failure: ask the loop to stop (it ends once its current step is done)."""
        self.run.control.request_stop()


async def until(pilot, predicate, timeout: float, what: str, describe=None):
    """Poll `predicate` while the app runs; its first truthy value, or AssertionError after `timeout` s.

    `wire_util.wait_until` is the same poll outside an app (no event loop to yield to)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        await pilot.pause(0.03)


def node_logs(procs_home: Path) -> dict[str, str]:
    return {p.parent.name: p.read_text(errors="replace") for p in sorted(procs_home.glob("node-*/node.log"))}


@contextlib.contextmanager
def live_cluster(tmp: Path, data_dir: Path, *, epochs: int, limit: int, nodes: int):
    """A started LiveRun with `nodes` real `enshuffle node` processes (one shard each), as (live, procs).

    On the way out, whatever happened: the run is asked to stop, the processes are ended and the
    run's thread is joined.
    """
    live = LiveRun(tmp, data_dir, epochs=epochs, limit=limit, shards=nodes)
    procs = spawn_local_nodes(live.run.server.endpoint, live.run.identity.fingerprint, nodes, tmp / "nodes")
    live.start()
    try:
        yield live, procs
    finally:
        live.close()
        stop_local_nodes(procs, timeout=0.5)
        live.thread.join(10)


# --- 1. the coordinator console on a finished run: tables, chain, verify, tamper -------------------


@pilot_test
async def test_console_shows_a_real_two_node_run_and_verifies_its_chain(core_data_dir, tmp_path):
    with live_cluster(tmp_path, core_data_dir, epochs=2, limit=600, nodes=2) as (live, procs):
        app = live.app()
        async with app.run_test(size=SIZE) as pilot:
            await until(
                pilot, lambda: app.snap is not None and app.snap.finished, 30, "training to finish", live.describe
            )
            # The state says finished before run() has returned (it still prints and says BYE).
            await until(
                pilot, lambda: live.rc is not None or live.error is not None, 30, "the run to return", live.describe
            )
            assert live.error is None and live.rc == 0, live.describe()
            assert app.snap.status == "finished"
            await pilot.pause(2 / REFRESH_HZ)  # at least one more tick after the run's last write

            nodes = app.query_one("#nodes-table", DataTable)
            assert sorted(k.value for k in nodes.rows) == ["local-1", "local-2"]
            for key in ("local-1", "local-2"):
                assert cell(nodes, key, "name") == key
                assert int(cell(nodes, key, "done").replace(",", "")) > 0
                # Two shards, one per node: each has seen half of the images' (non-blank) pixels and of
                # w1, and nothing of w2 (it never leaves the coordinator).
                assert cell(nodes, key, "images") == cell(nodes, key, "w1")
                assert 40.0 <= float(cell(nodes, key, "images").rstrip("%")) <= 50.0
                assert cell(nodes, key, "w2") == "0.0%"
                assert cell(nodes, key, "fp") == app.snap.nodes[key].fingerprint.split(":")[1][:9]

            chain_ids = [v.version_id for v in Chain(live.run_dir).versions()]
            assert len(chain_ids) == 2  # one model version per epoch
            await pilot.press("3")
            table = app.query_one("#chain-table", DataTable)
            assert [k.value for k in table.rows] == chain_ids
            assert [cell(table, v, "version") for v in chain_ids] == [short_id(v) for v in chain_ids]
            assert [cell(table, v, "epoch") for v in chain_ids] == ["1", "2"]
            assert cell(table, chain_ids[0], "parent") == "genesis"
            assert cell(table, chain_ids[1], "parent") == short_id(chain_ids[0])
            assert [cell(table, v, "verified") for v in chain_ids] == ["–", "–"]

            await pilot.press("v")
            await until(
                pilot,
                lambda: not app.verifying and "✓" in text(app, "verify-result"),
                10,
                "the chain check to pass",
                lambda: text(app, "verify-result"),
            )
            assert text(app, "verify-result") == "✓ chain verified: ok: 2 versions verified"
            assert [cell(table, v, "verified") for v in chain_ids] == ["✓ ok", "✓ ok"]

            # Flip one byte of the first version's first array (w1): that version and its child fail.
            stored = live.run_dir / "chain" / chain_ids[0] / "0.bin"
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0x01
            stored.write_bytes(bytes(data))
            await pilot.press("v")
            await until(
                pilot,
                lambda: not app.verifying and "✗" in text(app, "verify-result"),
                10,
                "the chain check to fail",
                lambda: text(app, "verify-result"),
            )
            result = text(app, "verify-result")
            assert result.startswith(f"✗ chain verification FAILED: FAILED at {chain_ids[0][:12]}: "), result
            assert [cell(table, v, "verified") for v in chain_ids] == ["✗ FAILED", "✗ FAILED"]

            await pilot.press("q")  # the run is over: q leaves at once
        assert app.return_value == "finished"
        # BYE run-finished ends `enshuffle node` processes by themselves.
        wait_until(
            lambda: all(p.poll() is not None for p in procs),
            10,
            "the node processes to exit",
            on_timeout=lambda: str(node_logs(tmp_path / "nodes")),
        )
        assert [p.returncode for p in procs] == [0, 0], node_logs(tmp_path / "nodes")


# --- 2. the coordinator console controls a live run: p pauses and resumes, q stops ------------------


@pilot_test
async def test_console_pauses_resumes_and_stops_a_live_run(core_data_dir, tmp_path):
    # 10 steps an epoch and far more epochs than the test waits for: the run is live throughout.
    with live_cluster(tmp_path, core_data_dir, epochs=200, limit=1200, nodes=2) as (live, procs):
        app = live.app()
        control = live.run.control
        snap = live.run.state.snapshot

        def progress(s) -> tuple[int, int]:
            return s.epoch, s.step

        async def pause_and_settle():
            await pilot.press("p")
            assert control.paused
            return await until(
                pilot, lambda: (s := snap()).status.startswith("paused") and s, 15, "the loop to pause", live.describe
            )

        async with app.run_test(size=SIZE) as pilot:
            await until(
                pilot,
                lambda: snap().status == "training" and progress(snap()) > (0, 0),
                30,
                "training to start",
                live.describe,
            )
            paused = await pause_and_settle()
            await until(pilot, lambda: "status: paused" in text(app, "status"), 5, "the console to show it")
            assert text(app, "status").lower().count("paused") == 1, text(app, "status")  # said once
            # While paused the loop only pumps the server: no step completes in a few refreshes.
            await pilot.pause(6 / REFRESH_HZ)
            assert progress(snap()) == progress(paused) and snap().status.startswith("paused")

            await pilot.press("p")
            assert not control.paused
            await until(pilot, lambda: progress(snap()) > progress(paused), 15, "training to go on", live.describe)
            await until(pilot, lambda: "status: training" in text(app, "status"), 5, "the console to show it")

            # Stop from a pause in the middle of an epoch, so the stop itself must write a version.
            for _ in range(5):
                paused = await pause_and_settle()
                if paused.step > 0:
                    break
                await pilot.press("p")  # paused right at an epoch boundary: go a little further
                await until(pilot, lambda: progress(snap()) > progress(paused), 15, "training to go on")
            assert paused.step > 0, live.describe()
            versions_before = len(paused.versions)
            await pilot.press("q")
            assert control.stop_requested
            await until(
                pilot, lambda: not app.is_running, 15, "the console to leave once the run stopped", live.describe
            )
        assert app.return_value == "finished"
        live.thread.join(10)
        assert not live.thread.is_alive() and live.error is None and live.rc == 130, live.describe()  # interrupted
        final = snap()
        assert final.status == "stopped" and final.finished
        assert progress(final) == progress(paused)  # the paused loop started no further step
        assert "stopped on request after finishing the step; model version written" in "\n".join(live.log_lines())
        versions = Chain(live.run_dir).versions()
        assert len(versions) == versions_before + 1 == len(final.versions)
        assert (versions[-1].metadata["epoch"], versions[-1].metadata["step"]) == progress(paused)
        assert Chain(live.run_dir).verify().ok

        # The nodes got BYE `shutdown` (the coordinator may come back with --resume, so they wait
        # to reconnect, per docs/protocol.md section 15); SIGTERM then ends them cleanly.
        wait_until(
            lambda: all("said BYE (shutdown)" in log for log in node_logs(tmp_path / "nodes").values()),
            10,
            "both nodes to log the coordinator's BYE",
            on_timeout=lambda: str(node_logs(tmp_path / "nodes")),
        )
        stop_local_nodes(procs, timeout=0.1)
        assert [p.returncode for p in procs] == [0, 0], node_logs(tmp_path / "nodes")


# --- 3. the node app on a real node daemon working for a real coordinator -------------------------


def start_daemon(endpoint: str, pinned: str, home: Path, name: str, threads: int = 1):
    """A NodeDaemon (fresh key, trust store in `home`) in a thread; (daemon, thread, result list)."""
    state, control = NodeState(), NodeControl(threads=threads)
    daemon = NodeDaemon(
        endpoint,
        identity=Identity.generate(),
        trust=TrustStore(home),
        pinned=pinned,
        name=name,
        threads=threads,
        state=state,
        control=control,
        log=lambda line: None,
    )
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(daemon.run()), name=f"node-{name}", daemon=True)
    thread.start()
    return daemon, thread, result


@pilot_test
async def test_node_app_on_a_real_daemon_and_coordinator(core_data_dir, tmp_path):
    live = LiveRun(tmp_path, core_data_dir, epochs=200, limit=1200, shards=1).start()
    fp = live.run.identity.fingerprint
    daemon, thread, result = start_daemon(live.run.server.endpoint, fp, tmp_path / "node-home", "volunteer")
    helper = None
    blas_before = get_blas_threads()
    app = NodeApp(source=daemon.state.snapshot, control=daemon.control, refresh_hz=REFRESH_HZ)
    coordinator_log = lambda: "\n".join(live.log_lines())  # noqa: E731
    try:
        async with app.run_test(size=SIZE) as pilot:
            await until(
                pilot,
                lambda: app.snap is not None and app.snap.batches_done >= 3,
                30,
                "the node to compute batches",
                live.describe,
            )
            coordinator = text(app, "coordinator")
            assert f"fingerprint  {fp.split(':', 1)[1]}" in coordinator, coordinator
            assert "trust        pinned (matches the fingerprint you gave)" in coordinator
            assert f"coordinator  {live.run.server.endpoint}" in coordinator
            assert "this node    volunteer" in coordinator
            await until(pilot, lambda: "computed     0 batches" not in text(app, "work"), 5, "the count shown")
            # One shard: this node has seen every non-blank pixel and w1 row, with values hidden (h).
            exposure = text(app, "exposure").splitlines()
            assert exposure[0].startswith("images") and exposure[0].endswith("% h"), exposure
            assert exposure[1].startswith("w1") and exposure[1].endswith("% h"), exposure
            assert float(exposure[0].split()[-2].rstrip("%")) > 80.0, exposure

            await pilot.press("p")
            assert daemon.control.paused and "PAUSED (p resumes)" in text(app, "work")
            # The daemon tells the coordinator at once (credit 0), which logs it.
            await until(
                pilot,
                lambda: "node volunteer paused" in coordinator_log(),
                10,
                "the coordinator to see the pause",
                live.describe,
            )
            await until(pilot, lambda: daemon.state.snapshot().paused, 5, "the daemon to apply the pause")

            await pilot.press("+")
            assert daemon.control.threads == 2
            await until(pilot, lambda: daemon.state.snapshot().threads == 2, 5, "the daemon to apply 2 threads")
            await until(pilot, lambda: "threads      2   PAUSED" in text(app, "work"), 5, "the app to show it")
            await pilot.press("-")
            await until(pilot, lambda: daemon.state.snapshot().threads == 1, 5, "the daemon to go back to 1")

            await pilot.press("q")
            assert daemon.control.stop_requested
            await until(pilot, lambda: not app.is_running, 10, "the app to leave once the daemon stopped")
        assert app.return_value == "stopped"
        thread.join(5)
        assert not thread.is_alive() and result == [EXIT_OK], daemon.error
        wait_until(
            lambda: "node volunteer (n1) left: said BYE (shutdown)" in coordinator_log(),
            10,
            "the coordinator to see the BYE",
            on_timeout=live.describe,
        )

        # The step in hand needs a node: a second daemon finishes it, then the run stops on request.
        live.run.control.request_stop()
        helper = start_daemon(live.run.server.endpoint, fp, tmp_path / "helper-home", "helper")
        live.thread.join(30)
        assert not live.thread.is_alive() and live.error is None and live.rc == 130, live.describe()  # stopped
    finally:
        daemon.stop()
        live.close()
        if helper is not None:
            helper[0].stop()
            helper[1].join(5)
        thread.join(5)
        if live.thread.is_alive():  # only on a failure above: give the loop a node to finish its step
            helper = start_daemon(live.run.server.endpoint, fp, tmp_path / "helper-home-2", "helper-2")
            live.thread.join(30)
            helper[0].stop()
            helper[1].join(5)
        set_blas_threads(blas_before)


# --- who may join, as the console says it -----------------------------------------------------------


def _console_join_text(run) -> str:
    async def show() -> str:
        app = CoordinatorApp(source=run.state.snapshot, control=run.control, refresh_hz=REFRESH_HZ)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            return text(app, "join")

    import asyncio

    try:
        return asyncio.run(show())
    finally:
        run.server.close("shutdown")


def test_train_console_does_not_offer_a_join_line_it_would_refuse(core_data_dir, tmp_path):
    from enshuffle.coordinator.run import local_cluster_run

    preset = small_default(epochs=1)
    inputs = prepare(ds.load_idx_dir(core_data_dir), preset, 300)
    run = local_cluster_run(RunConfig(limit=300, shards=2), preset, inputs, workdir=tmp_path)
    join = _console_join_text(run)
    assert "enshuffle node --connect" not in join and "volunteer machine run" not in join, join
    assert "only the 2 local node processes" in join and "enshuffle coordinator" in join, join


@pytest.mark.parametrize("how", ["invites", "open", "allow"])
def test_coordinator_console_says_who_may_join(core_data_dir, tmp_path, how):
    from enshuffle.coordinator.admission import Admission

    preset = small_default(epochs=1)
    inputs = prepare(ds.load_idx_dir(core_data_dir), preset, 300)
    allow = tmp_path / "allow"
    allow.write_text("")
    admission = {
        "invites": lambda: Admission(home=tmp_path / "home"),
        "open": lambda: Admission(open_=True, home=tmp_path / "home"),
        "allow": lambda: Admission(allow_file=allow, home=tmp_path / "home"),
    }[how]()
    run = CoordinatorRun(
        RunConfig(limit=300, shards=1, serving=Serving(bind="tcp://127.0.0.1:0", min_nodes=1)),
        preset,
        inputs,
        home=tmp_path / "home",
        quiet=True,
        admission=admission,
    )
    join = _console_join_text(run)
    assert "who may join:" in join and "only nodes on this machine can connect" in join, join
    if how == "open":
        assert "OPEN" in join and "--invite" not in join, join
    else:
        assert "--invite CODE" in join and "enshuffle invite" in join, join
    if how == "allow":
        assert "0 keys from" in join and "--allow file needs none" in join, join
