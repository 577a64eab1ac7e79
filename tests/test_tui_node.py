"""Pilot tests of the node app, driven by a NodeState filled in the test."""

from __future__ import annotations

from textual.widgets import Log

from enshuffle.node.state import NodeControl
from enshuffle.tui.node_app import NodeApp
from enshuffle.tui.synthetic import SyntheticNode
from tui_fixtures import Source, frozen_clock, node_state, pilot_test, text


from enshuffle.blas import default_threads


def make_app(threads: int = 2):
    source = Source(node_state())
    control = NodeControl(threads=threads)
    return NodeApp(source, control, clock=frozen_clock), source, control


@pilot_test
async def test_shows_the_coordinator_its_fingerprint_and_trust():
    app, _source, _control = make_app()
    async with app.run_test(size=(120, 40)):
        coordinator = text(app, "coordinator")
        assert "tcp://coordinator.example:5555" in coordinator
        assert "ab12cd34ef56ab78cd90ef12ab34cd56" in coordinator
        assert "pinned (matches the fingerprint you gave)" in coordinator
        work = text(app, "work")
        assert "matmul (30000x196)·(196x128)" in work
        assert "4,321 batches  at 18.2/s" in work
        assert "in 3.5 GiB  out 250 MiB" in work
        assert "refusals     1" in work
        assert text(app, "header").endswith("up 0:12:34")


@pilot_test
async def test_connection_state_carries_the_reason():
    app, source, _control = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        for connection, reason, expected in [
            ("idle", "waiting for work", "connection: ○ waiting for work"),
            ("reconnecting", "reconnecting in 4 s", "connection: … reconnecting in 4 s"),
            ("refused", "refused: fingerprint mismatch", "connection: ✗ REFUSED: fingerprint mismatch"),
        ]:
            source.state.connection, source.state.reason = connection, reason
            source.state.trust = "trusted-on-first-use"
            app.pull_snapshot()
            await pilot.pause()
            assert text(app, "status") == expected
        assert "trusted on first use" in text(app, "coordinator")


@pilot_test
async def test_exposure_bars_per_tensor():
    app, _source, _control = make_app()
    async with app.run_test(size=(80, 24)):
        lines = text(app, "exposure").splitlines()
        assert [line.split()[0] for line in lines] == [
            "images",
            "w1",
            "deltas",
            "samples",
            "labels",
            "outputs",
            "w2",
            "activations",
        ]
        assert lines[3].endswith("50.0% p") and "█" in lines[3] and "░" in lines[3]  # samples: linkable
        assert lines[0].endswith("24.0% h")  # images: values hidden
        assert lines[4].rstrip().endswith(" 0.0%")  # labels: never sent


@pilot_test
async def test_plus_and_minus_change_the_thread_count_never_below_one():
    app, _source, control = make_app(threads=1)
    async with app.run_test(size=(80, 24)) as pilot:
        cores = default_threads()
        await pilot.press(*["+"] * (cores + 3))
        assert control.threads == cores  # never past the CPUs
        assert f"threads      {cores}" in text(app, "work")
        await pilot.press(*["-"] * (cores + 3))
        assert control.threads == 1


@pilot_test
async def test_p_toggles_contributing():
    app, _source, control = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("p")
        assert control.paused and "PAUSED (p resumes)" in text(app, "work")
        await pilot.press("p")
        assert not control.paused


@pilot_test
async def test_q_requests_stop_and_leaves_when_the_daemon_has_stopped():
    app, source, control = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("q")
        assert control.stop_requested and app.is_running
        assert "STOPPING" in text(app, "status")
        source.state.connection = "stopped"
        app.pull_snapshot()
        await pilot.pause()
    assert app.return_value == "stopped"


@pilot_test
async def test_q_leaves_at_once_when_the_daemon_is_gone():
    app, source, control = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        source.gone = RuntimeError("node daemon thread exited")
        app.pull_snapshot()
        await pilot.press("q")
    assert control.stop_requested and app.return_value == "backend-gone"


@pilot_test
async def test_log_lines_and_layout_sizes():
    app, _source, _control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        assert app.wide and app.query_one("#log-view", Log).line_count == 2
        await pilot.resize_terminal(80, 24)
        assert not app.wide and not app.screen.has_class("wide")


@pilot_test
async def test_against_the_synthetic_node_stepped_by_hand():
    fake = SyntheticNode(seed=5, start=2000.0, threads=3)
    app = NodeApp(fake.source, fake.control, clock=lambda: 2005.0)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("-")  # 2 threads requested; the daemon applies it on its next step
        fake.advance(40, 2001.0, 1.0)
        app.pull_snapshot()
        await pilot.pause()
        assert fake.state.threads == 2
        assert "40 batches" in text(app, "work") and "threads      2   contributing" in text(app, "work")
        await pilot.press("q")
        fake.advance(0, 2002.0, 1.0)
        app.pull_snapshot()
        await pilot.pause()
    assert app.return_value == "stopped"


@pilot_test
async def test_a_finished_run_stays_on_screen_until_q():
    app, source, control = make_app()
    source.state.connection, source.state.reason = "finished", "the run has finished; q leaves"
    async with app.run_test(size=(80, 24)) as pilot:
        app.pull_snapshot()
        await pilot.pause()
        assert app.is_running and "run finished" in text(app, "status")
        await pilot.press("ctrl+c")  # Ctrl-C is q
        await pilot.pause()
    assert app.return_value == "stopped" and control.stop_requested


@pilot_test
async def test_a_refusal_in_the_node_log_wraps_whole_at_80_columns():
    line = (
        "refused: tcp://coordinator.example:5555 presented key SHA256:L6MZ-LPQR-7XTB-VB2N-OD5K-3NVU-7FKX-YQPA, "
        "not the pinned SHA256:KZDV-VJ2U-MNDU-YAUF-35O3-6K6K-W462-MUJV; ask the operator for the fingerprint "
        "of `enshuffle keys show` on the coordinator"
    )
    app, source, _control = make_app()
    source.state.log.append(line)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        app.pull_snapshot()
        await pilot.pause()
        log = app.query_one("#log-view", Log)
        width = log.scrollable_content_region.width
        rows = [str(row) for row in log.lines]
        assert width > 0 and all(len(row) <= width for row in rows), (width, rows)
        joined = " ".join(row.strip() for row in rows)
        assert "SHA256:L6MZ-LPQR-7XTB-VB2N-OD5K-3NVU-7FKX-YQPA" in joined and "on the coordinator" in joined, rows


@pilot_test
async def test_the_node_app_says_each_state_once_and_truly():
    """ "✗ REFUSED: not-allowed" (not "refused: refused:"), a finished run said once, a paused node
    shown paused (not "working: paused"), and no "contributing" once the run is over."""
    app, source, control = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        source.state.connection, source.state.reason = "refused", "refused: not-allowed"
        app.pull_snapshot()
        assert "REFUSED: not-allowed" in text(app, "status") and "refused: refused" not in text(app, "status").lower()
        source.state.connection, source.state.reason = "working", "paused by the volunteer (p resumes)"
        app.pull_snapshot()
        status = text(app, "status")
        assert "working" not in status and "paused" in status, status
        source.state.connection, source.state.reason = "finished", "q leaves"
        app.pull_snapshot()
        status, work = text(app, "status"), text(app, "work")
        assert status.lower().count("finished") == 1, status
        assert "contributing (p pauses)" not in work and "not contributing" in work, work
        source.state.batches_done = 1
        app.pull_snapshot()
        assert "1 batch " in text(app, "work"), text(app, "work")
        await pilot.pause()


def test_the_hours_window_says_when_it_opens():
    import time as _time

    from enshuffle.node.policy import Policy

    noon = _time.mktime((2026, 1, 5, 12, 0, 0, 0, 0, -1))
    why = Policy.from_args(hours="22:00-07:00").outside_hours(noon)
    assert "again at 22:00" in why, why
