"""Pilot tests of the coordinator console, driven by a CoordinatorState filled in the test."""

from __future__ import annotations

import pytest
from textual.widgets import DataTable, Log

from enshuffle.coordinator.state import CoordinatorControl, NodeRow
from enshuffle.tui.coordinator_app import CoordinatorApp
from enshuffle.tui.synthetic import SyntheticCoordinator
from tui_fixtures import NOW, Source, cell, coordinator_state, frozen_clock, pilot_test, text, version_id


def make_app(verify=None, size=None):
    source = Source(coordinator_state())
    control = CoordinatorControl()
    app = CoordinatorApp(source, control, verify_chain=verify, refresh_hz=4.0, clock=frozen_clock)
    return app, source, control


async def press_and_verify(app, pilot, *keys: str) -> None:
    """Press `keys` (the last one v) and wait until the chain check's result is on screen."""
    await pilot.press(*keys)
    await app.workers.wait_for_complete()
    await pilot.pause()


async def open_first_node_detail(app, pilot) -> str:
    """Enter on the nodes table's first row: its detail screen must open; returns what it shows."""
    from enshuffle.tui.coordinator_app import NodeDetailScreen

    table = app.query_one("#nodes-table", DataTable)
    table.focus()
    table.move_cursor(row=0)
    await pilot.press("enter")
    await pilot.pause()
    assert isinstance(app.screen, NodeDetailScreen)
    return str(app.screen.query_one("#node-detail").render())


@pilot_test
async def test_nodes_table_shows_one_keyed_row_per_node():
    app, _source, _control = make_app()
    async with app.run_test(size=(160, 48)):
        table = app.query_one("#nodes-table", DataTable)
        assert table.row_count == 3
        assert [str(c) for c in table.get_row("n-alice")] == [
            "alice",
            "working",
            "1,234",
            "2",
            "12.5/s",
            "now",
            "1",
            "0",
            "20.0%",
            "21.0%",
            "0.0%",
            "a1a1a1a1",
            "10.0.0.2:40001",
            "",
        ]
        assert cell(table, "n-carol", "why") == "silent for 3.1 s (heartbeat lost)"
        assert cell(table, "n-bob", "state") == "waiting" and "between batches" in cell(table, "n-bob", "why")
        assert cell(table, "n-bob", "seen") == "9s"
        assert cell(table, "n-carol", "seen") == "2m05s"
        assert cell(table, "n-carol", "state") == "lost"


@pilot_test
async def test_live_updates_change_cells_in_place_and_rows_only_on_join_and_leave():
    app, source, _control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.query_one("#nodes-table", DataTable)
        table.move_cursor(row=1)  # on bob
        source.state.nodes["n-bob"].batches_done = 1000
        source.state.nodes["n-bob"].state = "working"
        del source.state.nodes["n-carol"]
        source.state.nodes["n-dave"] = NodeRow("n-dave", "dave", "d5" * 32, "10.0.0.5:1", "connected", last_seen=NOW)
        app.pull_snapshot()
        await pilot.pause()
        assert [k.value for k in table.rows] == ["n-alice", "n-bob", "n-dave"]
        assert cell(table, "n-bob", "done") == "1,000"
        assert cell(table, "n-bob", "state") == "working"
        assert cell(table, "n-dave", "seen") == "now"
        assert table.cursor_row == 1  # still on bob: the table was not rebuilt
        assert app.nodes_sync.apply({k: tuple(app.nodes_sync.rendered[k]) for k in app.nodes_sync.rendered}) == 0


@pilot_test
async def test_exposure_view_marks_the_bound_and_flags_a_node_over_it_in_words():
    app, _source, _control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("2")
        table = app.query_one("#exposure-table", DataTable)
        assert cell(table, "n-carol", "flag") == "OVER img"
        assert cell(table, "n-alice", "flag") == "ok"
        images = cell(table, "n-carol", "images")
        assert "┃" in images and images.endswith("31.0%h")  # h: values hidden
        assert "┃" not in cell(table, "n-carol", "deltas")  # deltas are not held to the bound
        assert cell(table, "n-carol", "deltas").startswith("100.0%p")  # p: positions hidden
        summary = text(app, "exposure-summary")
        assert "bound 25.0%" in summary and "max images 31.0% (carol)" in summary and "1 node OVER" in summary


@pilot_test
async def test_exposure_view_keeps_bounded_bars_on_screen_at_80_columns():
    app, _source, _control = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        assert app.bar_widths["images"] >= 8 and app.bar_widths["deltas"] == 0
        assert cell(app.query_one("#exposure-table", DataTable), "n-carol", "deltas") == "100.0%p"


@pilot_test
async def test_header_progress_and_charts_follow_the_state():
    app, _source, _control = make_app()
    async with app.run_test(size=(160, 48)):
        header = text(app, "header")
        assert "run-0042" in header and "fashion-quick" in header and "tcp://0.0.0.0:5555" in header
        fp = "ab12cd34ef56ab78cd90ef12ab34cd56ef78ab90cd12ef34ab56cd78ef90ab12"
        assert f"fingerprint {fp}" in header and "elapsed 0:12:34" in header  # in full
        progress = text(app, "progress")
        assert "epoch   3/15" in progress and "step   12/40" in progress
        # 12 epochs less 12 steps left (468 steps) at the state's 1.483 s per step
        assert "ETA 11m34s" in progress
        assert text(app, "value-test") == "0.7950 [0.6010–0.7950]"  # last, and the sparkline's scale, same precision
        assert app.query_one("#spark-cost").data == [0.09, 0.061, 0.048]


@pilot_test
async def test_chain_rows_and_selecting_a_version_shows_its_metadata():
    app, _source, _control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("3")
        table = app.query_one("#chain-table", DataTable)
        assert [str(c) for c in table.get_row(version_id(2))] == [
            version_id(2)[:8],
            version_id(1)[:8],
            "2",
            "0",
            "0.7440",
            table.get_row(version_id(2))[5].plain,
            "–",
        ]
        assert str(table.get_cell(version_id(1), "parent")) == "genesis"
        await pilot.press("down")
        detail = text(app, "version-detail")
        assert version_id(2) in detail and "cost: 0.061" in detail and "test accuracy 0.7440" in detail


@pilot_test
async def test_pressing_v_runs_the_check_and_marks_every_version_verified():
    calls = []

    def verify():
        calls.append(1)
        return True, "3 versions, signatures and links intact"

    app, _source, _control = make_app(verify=verify)
    async with app.run_test(size=(160, 48)) as pilot:
        await press_and_verify(app, pilot, "3", "v")
        assert calls == [1]
        assert text(app, "verify-result") == "✓ chain verified: 3 versions, signatures and links intact"
        table = app.query_one("#chain-table", DataTable)
        assert [str(table.get_cell(version_id(n), "verified")) for n in (1, 2, 3)] == ["✓ ok"] * 3


@pilot_test
async def test_a_failed_check_marks_the_named_version_and_its_descendants_failed():
    bad = version_id(2)[:8]
    app, _source, _control = make_app(verify=lambda: (False, f"version {bad}: signature does not verify"))
    async with app.run_test(size=(160, 48)) as pilot:
        await press_and_verify(app, pilot, "v")
        assert text(app, "verify-result").startswith("✗ chain verification FAILED: version")
        table = app.query_one("#chain-table", DataTable)
        assert [str(table.get_cell(version_id(n), "verified")) for n in (1, 2, 3)] == ["✓ ok", "✗ FAILED", "✗ FAILED"]


@pilot_test
async def test_a_check_that_crashes_is_reported_not_fatal():
    def verify():
        raise FileNotFoundError("runs/run-0042/chain.jsonl")

    app, _source, _control = make_app(verify=verify)
    async with app.run_test(size=(160, 48)) as pilot:
        await press_and_verify(app, pilot, "v")
        assert "the check itself failed: FileNotFoundError: runs/run-0042/chain.jsonl" in text(app, "verify-result")
        assert app.is_running


@pilot_test
async def test_p_toggles_pause_through_the_control():
    app, _source, control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("p")
        assert control.paused
        assert "PAUSED" in text(app, "status")
        await pilot.press("p")
        assert not control.paused
        assert "PAUSED" not in text(app, "status")


@pilot_test
async def test_q_requests_a_graceful_stop_and_exits_once_the_run_is_finished():
    app, source, control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("q")
        assert control.stop_requested
        assert app.is_running and "STOPPING" in text(app, "status")
        source.state.finished = True
        source.state.status = "finished"
        app.pull_snapshot()
        await pilot.pause()
    assert app.return_value == "finished"


@pilot_test
async def test_second_q_leaves_without_waiting():
    app, _source, control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("q", "q")
    assert control.stop_requested and app.return_value == "left-early"


@pilot_test
async def test_q_exits_at_once_when_the_back_end_is_gone():
    app, source, control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        source.gone = ConnectionError("coordinator loop exited")
        app.pull_snapshot()
        await pilot.pause()
        assert "back-end not answering (ConnectionError: coordinator loop exited)" in text(app, "status")
        await pilot.press("q")
    assert control.stop_requested and app.return_value == "backend-gone"


@pilot_test
async def test_log_pane_appends_only_new_lines():
    app, source, _control = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        log = app.query_one("#log-view", Log)
        assert log.line_count == 3
        source.state.log.append("22:17:00 dave joined")
        app.pull_snapshot()
        app.pull_snapshot()
        await pilot.pause()
        assert log.line_count == 4 and log.lines[-1] == "22:17:00 dave joined"


@pytest.mark.parametrize("size, wide", [((80, 24), False), ((160, 48), True)])
@pilot_test
async def test_layout_adapts_log_tab_at_small_sizes_side_pane_at_large(size, wide):
    app, _source, _control = make_app()
    async with app.run_test(size=size) as pilot:
        await pilot.press("?")
        assert app.screen.query_one("#help-text")
        await pilot.press("question_mark")
        assert app.wide is wide
        assert app.query_one("#side-log", Log).display is wide
        assert app.screen.has_class("wide") is wide


@pilot_test
async def test_resizing_switches_layout():
    app, _source, _control = make_app()
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.resize_terminal(80, 24)
        assert app.wide is False and not app.query_one("#side-log", Log).display
        await pilot.resize_terminal(160, 48)
        assert app.wide is True


@pilot_test
async def test_against_the_synthetic_back_end_stepped_by_hand():
    fake = SyntheticCoordinator(nodes=20, seed=3, start=1000.0, batches_per_step=50, steps_per_epoch=4)
    app = CoordinatorApp(fake.source, fake.control, verify_chain=fake.verify_chain, clock=lambda: 1010.0)
    async with app.run_test(size=(120, 40)) as pilot:
        for i in range(10):
            fake.advance(100, 1000.0 + i, 1.0)
        app.pull_snapshot()
        await pilot.pause()
        table = app.query_one("#nodes-table", DataTable)
        assert table.row_count == 20
        done = sum(int(str(table.get_cell(k, "done")).replace(",", "")) for k in fake.state.nodes)
        assert done == 1000
        assert app.query_one("#chain-table", DataTable).row_count == len(fake.state.versions) == 5
        await press_and_verify(app, pilot, "v")
        assert "5 versions, every parent link intact" in text(app, "verify-result")


@pilot_test
async def test_a_readmits_the_selected_quarantined_node_and_nothing_else():
    state = coordinator_state()
    state.nodes["n-bob"].state = "quarantined"
    state.nodes["n-bob"].quarantine = "Freivalds check failed at row 3"
    control = CoordinatorControl()
    app = CoordinatorApp(Source(state), control, refresh_hz=4.0, clock=frozen_clock)
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.query_one("#nodes-table", DataTable)
        assert cell(table, "n-bob", "state") == "quarantined"
        table.focus()
        table.move_cursor(row=table.get_row_index("n-alice"))
        await pilot.press("a")  # alice is not quarantined: nothing to do
        await pilot.pause()
        assert control.take_readmits() == []
        table.move_cursor(row=table.get_row_index("n-bob"))
        await pilot.press("a")
        await pilot.pause()
        assert control.take_readmits() == ["bob"]


@pilot_test
async def test_ctrl_c_is_the_graceful_stop_not_textuals_quit_hint():
    app, _source, control = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert control.stop_requested and app.stopping and app.is_running  # stays up, stopping
        assert "STOPPING" in text(app, "status")
        await pilot.press("ctrl+c")  # a second one leaves at once, as a second q does
        await pilot.pause()
    assert app.return_value == "left-early"


@pilot_test
async def test_empty_nodes_table_says_how_to_add_a_node_and_the_fingerprint_is_whole():
    app, source, _control = make_app()
    source.state.nodes = {}
    async with app.run_test(size=(80, 24)):
        join = text(app, "join")
        assert join.startswith("No node has connected yet") and source.state.join_commands[0] in join
        assert source.state.fingerprint in text(app, "header")


@pilot_test
async def test_finished_run_shows_a_full_step_bar_and_paused_is_said_once():
    app, source, control = make_app()
    source.state.epoch, source.state.step = source.state.epochs_total, 0
    async with app.run_test(size=(120, 40)) as pilot:
        progress = text(app, "progress")
        assert "step   40/40" in progress and "100%" in progress.splitlines()[1] and "ETA 0s" in progress
        source.state.status = "paused (press p to resume)"
        await pilot.press("p")
        app.pull_snapshot()
        status = text(app, "status")
        assert control.paused and status.lower().count("paused") == 1, status


@pilot_test
async def test_enter_on_a_node_shows_its_detail_with_history():
    from enshuffle.tui.coordinator_app import NodeDetailScreen

    app, source, _control = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        # Two samples some time apart: the console keeps one every few seconds.
        app.clock = lambda: NOW + 10.0
        source.state.nodes["n-alice"].batches_done = 1500
        app.pull_snapshot()
        detail = await open_first_node_detail(app, pilot)
        assert "a1" * 32 in detail  # the whole fingerprint
        assert "batches done" in detail and "1,234 .. 1,500" in detail
        assert "1,500 done" in detail and "images 20.0%" in detail
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, NodeDetailScreen)


@pilot_test
async def test_s_sorts_the_nodes_and_slash_filters_nodes_and_log():
    from enshuffle.tui.coordinator_app import SORT_ORDERS

    app, source, _control = make_app()
    source.state.log.extend(["node bob joined", "node alice joined", "lease expired on carol"])
    async with app.run_test(size=(120, 40)) as pilot:
        table = app.query_one("#nodes-table", DataTable)
        assert [k.value for k in table.rows] == ["n-alice", "n-bob", "n-carol"]  # join order
        await pilot.press("s")  # by state: working, waiting, ..., lost
        await pilot.pause()
        assert "sorted by state" in text(app, "nodes-info")
        await pilot.press("s")  # by batches done, most first
        await pilot.pause()
        assert [k.value for k in table.rows] == ["n-alice", "n-bob", "n-carol"]
        source.state.nodes["n-carol"].batches_done = 99_999
        app.pull_snapshot()
        await pilot.pause()
        assert [k.value for k in table.rows][0] == "n-carol"
        for _ in range(len(SORT_ORDERS) - 2):  # round to join order again
            await pilot.press("s")
        await pilot.pause()
        assert "sorted by join order" in text(app, "nodes-info")
        assert [k.value for k in table.rows] == ["n-alice", "n-bob", "n-carol"]
        await pilot.press("slash", "b", "o", "b")
        await pilot.pause()
        assert [k.value for k in table.rows] == ["n-bob"]
        assert "1 of 3 nodes match 'bob'" in text(app, "nodes-info")
        side = app.query_one("#side-log", Log)
        assert [str(line) for line in side.lines] == ["node bob joined"]
        await pilot.press("escape")
        await pilot.pause()
        assert len(table.rows) == 3 and len(side.lines) >= 3


@pilot_test
async def test_eta_does_not_grow_while_paused():
    app, source, control = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("p")
        source.state.status, source.state.paused = "paused (press p to resume)", True
        app.pull_snapshot()
        before = text(app, "progress").splitlines()[-1]
        app.clock = lambda: NOW + 3600.0  # an hour paused: no step done
        app.pull_snapshot()
        after = text(app, "progress").splitlines()[-1]
        assert before == after and "ETA 11m34s (held)" in after


def test_version_metadata_is_shown_for_people_not_as_python_dicts():
    from enshuffle.coordinator.state import VersionRow
    from enshuffle.tui.coordinator_app import version_detail

    meta = {
        "created": 1764600000.123,
        "metrics": {"cost": 0.0612345678, "test_accuracy": 0.74},
        "exposure": {"alice": {"images": 0.5, "w1": 0.25}},
        "history": [{"epoch": 1}, {"epoch": 2}],
        "settings": {"preset": "default", "epochs": 20},
    }
    text_ = version_detail(VersionRow("ab" * 32, None, 2, 0, 0.74, 1764600000.123, metadata=meta), None)
    assert "{" not in text_ and "1764600000" not in text_
    assert "cost=0.0612346" in text_ and "alice: images=0.5, w1=0.25" in text_ and "history: 2 entries" in text_
    assert "preset=default, epochs=20" in text_


PIN_LINE = (
    "node n-alice refused our key: it is pinned to SHA256:KZDV-VJ2U-MNDU-YAUF-35O3-6K6K-W462-MUJV but "
    "this coordinator presented key SHA256:L6MZ-LPQR-7XTB-VB2N-OD5K-3NVU-7FKX-YQPA; give the volunteer "
    "this fingerprint, or restart with the ENSHUFFLE_HOME that holds the key they pinned"
)


def _shown_log_rows(app, log_id: str) -> tuple[list[str], int]:
    from textual.widgets import Log

    log = app.query_one(f"#{log_id}", Log)
    return [str(line) for line in log.lines], log.scrollable_content_region.width


@pilot_test
@pytest.mark.parametrize("size", [(80, 24), (120, 40), (160, 48)])
async def test_long_log_lines_wrap_so_the_remedy_is_seen(size):
    app, source, _control = make_app()
    source.state.log.append(PIN_LINE)
    async with app.run_test(size=size) as pilot:
        await pilot.press("4")  # the Log tab
        await pilot.pause()
        app.pull_snapshot()
        await pilot.pause()
        shown = [_shown_log_rows(app, log_id) for log_id in ("log-view", "side-log")]
        shown = [(rows, width) for rows, width in shown if width > 0]
        assert shown  # the Log tab, or the side log of the wide layout
        for rows, width in shown:
            assert all(len(row) <= width for row in rows), (width, rows)
            joined = " ".join(row.strip() for row in rows)
            assert "SHA256:L6MZ-LPQR-7XTB-VB2N-OD5K-3NVU-7FKX-YQPA" in joined and "key they pinned" in joined, rows


@pilot_test
async def test_a_node_heard_from_just_now_is_not_seen_now_ago():
    app, source, _control = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        source.state.nodes["n-alice"].last_seen = NOW
        app.pull_snapshot()
        detail = await open_first_node_detail(app, pilot)
        assert "last seen    just now" in detail and "now ago" not in detail, detail


@pilot_test
async def test_one_epoch_is_a_value_not_a_full_width_chart_and_the_80_column_header_keeps_elapsed():
    from textual.widgets import Sparkline

    app, source, _control = make_app()
    source.state.epochs = source.state.epochs[:1]
    source.state.run_id, source.state.bind = "7be30f46092ff277", "tcp://127.0.0.1:40213"
    source.state.preset = "default"
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert text(app, "value-test") == "0.6010", text(app, "value-test")  # no "[0.601–0.601]"
        assert not list(app.query_one("#spark-test", Sparkline).data or [])
        first = text(app, "header").splitlines()[0]
        assert len(first) <= 78 and "elapsed" in first, first


@pilot_test
async def test_the_exposure_tab_says_which_columns_are_off_screen():
    app, source, _control = make_app()
    for row in source.state.nodes.values():  # a deeper network: more kinds than 80 columns show
        row.exposure.update({"w3": 0.2, "activations2": 0.2, "deltas2": 1.0})
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        app.pull_snapshot()
        summary = text(app, "exposure-summary")
        assert "more column" in summary and "deltas2" in summary.splitlines()[-1], summary
    app, source, _control = make_app()
    async with app.run_test(size=(200, 48)) as pilot:
        await pilot.press("2")
        await pilot.pause()
        assert "more column" not in text(app, "exposure-summary")


@pilot_test
async def test_widget_messages_that_arrive_after_the_app_closed_change_nothing_and_raise_nothing():
    # Pilot shuts an app down from the test's task while the app's own task still handles messages:
    # a chain-table highlight or a search edit posted just before can arrive after the widgets are gone.
    app, source, _control = make_app()
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()  # the first row's highlight has arrived
        table = app.main_screen.query_one("#chain-table", DataTable)
        search = app.main_screen.query_one("#search")
        keys = list(table.rows)
        shown = app.selected_version
        assert len(keys) >= 2 and shown == keys[0].value
    assert not app.is_running and not app.main_screen.query("#version-detail")
    app.on_data_table_row_highlighted(DataTable.RowHighlighted(table, 1, keys[1]))
    app.on_input_changed(type(search).Changed(search, "node-b"))
    assert app.selected_version == shown
