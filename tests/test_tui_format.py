"""The TUIs' pure formatting helpers: bars, durations, ETA, log deltas, chain marks."""

from __future__ import annotations

from collections import deque

from enshuffle.tui.format import (
    eta_seconds,
    fmt_age,
    fmt_bytes,
    fmt_clock,
    fmt_duration,
    new_log_lines,
    over_bound,
    share_bar,
    text_bar,
    verification_marks,
)


def test_durations_and_ages():
    assert [fmt_duration(x) for x in (None, -1, 0, 59.9, 125, 3725)] == ["–", "–", "0s", "59s", "2m05s", "1h02m"]
    assert fmt_clock(3725) == "1:02:05"
    assert fmt_age(100.0, 0.0) == "never" and fmt_age(100.0, 99.5) == "now" and fmt_age(100.0, 40.0) == "1m00s"


def test_bytes():
    assert [fmt_bytes(n) for n in (0, 1023, 1536, 250 * 1024**2, 3.5 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "250 MiB",
        "3.5 GiB",
    ]


def test_bars_mark_the_bound_whether_or_not_the_share_reached_it():
    assert text_bar(0.5, 10) == "█████░░░░░"
    assert share_bar(0.1, 10, 0.5) == "█░░░░┃░░░░"
    assert share_bar(0.8, 10, 0.5) == "█████┃██░░"
    assert share_bar(1.0, 10, None) == "█" * 10
    assert over_bound({"images": 0.3, "w1": 0.2, "w2": 0.9}, 0.25) == ["images"]


def test_eta_prefers_finished_epochs_and_falls_back_to_elapsed():
    assert eta_seconds(100, 2, 0, 10, 40, [50.0, 70.0]) == 8 * 60.0
    assert eta_seconds(100, 0, 10, 10, 40, []) == 100 * 39  # 1/40 done in 100 s
    assert eta_seconds(100, 0, 0, 10, 40, []) is None
    assert eta_seconds(100, 10, 0, 10, 40, []) == 0.0


def test_new_log_lines_follow_a_bounded_deque():
    log = deque(maxlen=4)
    log.extend(["a", "b", "c"])
    seen = list(log)
    assert new_log_lines([], seen) == ["a", "b", "c"]
    log.extend(["d", "e"])  # "a" falls off the front
    assert new_log_lines(seen, list(log)) == ["d", "e"]
    seen = list(log)
    assert new_log_lines(seen, list(log)) == []
    log.extend(["x", "x", "x", "x", "x"])  # moved on by more than its length
    assert new_log_lines(seen, list(log)) == ["x", "x", "x", "x"]


def test_verification_marks():
    ids = ["aaaaaaaa11", "bbbbbbbb22", "cccccccc33"]
    assert verification_marks(ids, True, "ok") == dict.fromkeys(ids, True)
    assert verification_marks(ids, False, "bbbbbbbb: bad signature") == {
        "aaaaaaaa11": True,
        "bbbbbbbb22": False,
        "cccccccc33": False,
    }
    assert verification_marks(ids, False, "chain file is empty") == dict.fromkeys(ids, False)


def test_the_exposure_table_lists_a_deeper_networks_layers():
    from enshuffle.coordinator.ledger import ledger_axes
    from enshuffle.coordinator.state import TENSORS, CoordinatorState, NodeRow
    from enshuffle.tui.coordinator_app import exposure_kinds

    state = CoordinatorState()
    assert exposure_kinds(state) == TENSORS
    state.nodes["a"] = NodeRow(
        node_id="a", name="a", fingerprint="SHA256:x", exposure={k: 0.0 for k in ledger_axes((784, 64, 32, 10))}
    )
    assert exposure_kinds(state) == TENSORS + ("w3", "activations2", "deltas2")
