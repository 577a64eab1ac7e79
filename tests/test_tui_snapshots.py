"""SVG snapshots of both apps at fixed sizes with a frozen clock and a hand-filled state.

Regenerate after an intended change with
`.venv/bin/python -m pytest tests/test_tui_snapshots.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import time

import pytest

from enshuffle.coordinator.state import CoordinatorControl
from enshuffle.node.state import NodeControl
from enshuffle.tui.coordinator_app import CoordinatorApp
from enshuffle.tui.node_app import NodeApp
from tui_fixtures import Source, coordinator_state, frozen_clock, node_state


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Model version times are shown in local time; pin it so the SVGs do not depend on the box."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def coordinator_app() -> CoordinatorApp:
    return CoordinatorApp(Source(coordinator_state()), CoordinatorControl(), clock=frozen_clock)


def node_app() -> NodeApp:
    return NodeApp(Source(node_state()), NodeControl(threads=2), clock=frozen_clock)


def test_coordinator_nodes_120x40(snap_compare):
    assert snap_compare(coordinator_app(), terminal_size=(120, 40))


def test_coordinator_exposure_80x24(snap_compare):
    assert snap_compare(coordinator_app(), press=["2"], terminal_size=(80, 24))


def test_coordinator_chain_with_selected_version_160x48(snap_compare):
    assert snap_compare(coordinator_app(), press=["3", "down"], terminal_size=(160, 48))


def test_node_120x40(snap_compare):
    assert snap_compare(node_app(), terminal_size=(120, 40))


def test_node_80x24(snap_compare):
    assert snap_compare(node_app(), terminal_size=(80, 24))


def test_coordinator_nodes_80x24(snap_compare):
    """The narrow tier: every column shown whole (fingerprints in whole groups), none cut."""
    assert snap_compare(coordinator_app(), terminal_size=(80, 24))


def test_coordinator_nodes_160x48(snap_compare):
    """Every column, the reason a node waits or was lost, and the log filling the lower part."""
    assert snap_compare(coordinator_app(), terminal_size=(160, 48))


def test_nodes_table_fits_without_cutting_a_column():
    """What the snapshots show, checked in numbers: the columns of each tier fit the width."""
    from enshuffle.tui.coordinator_app import node_columns

    for width in (80, 100, 120, 150, 160, 200):
        columns = node_columns(width)
        assert sum(w + 2 for _, _, w in columns) <= width - 2, (width, columns)
        fp = dict((k, w) for k, _, w in columns)["fp"]
        assert fp >= len("KZDV-VJ2U")  # two whole fingerprint groups
