"""Deterministic back-end states for the TUI tests (filled by hand, frozen clock, no threads), and
the helpers every TUI test uses to read what an app shows."""

from __future__ import annotations

import asyncio
import functools

from textual.widgets import DataTable, Static

from enshuffle.coordinator.state import CoordinatorState, EpochRow, NodeRow, VersionRow
from enshuffle.node.state import NodeState

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
NOW = T0 + 754.0  # 12 min 34 s into the run


def frozen_clock() -> float:
    return NOW


def version_id(n: int) -> str:
    return f"{n:02d}" + "c0ffee" * 10 + "ab"


FORMS = {"images": "values hidden", "w1": "values hidden", "deltas": "positions hidden", "samples": "positions hidden"}


def coordinator_state() -> CoordinatorState:
    """A run three epochs in: three nodes (one over the exposure bound), three model versions."""
    s = CoordinatorState(
        run_id="run-0042",
        preset="fashion-quick",
        bind="tcp://0.0.0.0:5555",
        fingerprint="ab12cd34ef56ab78cd90ef12ab34cd56ef78ab90cd12ef34ab56cd78ef90ab12",
        started_at=T0,
        epochs_total=15,
        steps_per_epoch=40,
        epoch=3,
        step=12,
        status="training",
        exposure_bound=0.25,
        step_seconds=1.483,
        join_commands=[
            "enshuffle node --connect tcp://192.0.2.7:5555 --coordinator-key SHA256:KZDV-VJ2U-MNDU-YAUF-"
            "35O3-6K6K-W462-MUJV"
        ],
    )
    rows = [
        NodeRow(
            "n-alice",
            "alice",
            "a1" * 32,
            "10.0.0.2:40001",
            "working",
            1234,
            2,
            12.5,
            NOW - 0.4,
            1,
            0,
            {"images": 0.20, "w1": 0.21, "deltas": 1.0, "samples": 1.0, "w2": 0.0},
            forms=dict(FORMS),
        ),
        NodeRow(
            "n-bob",
            "bob",
            "b2" * 32,
            "10.0.0.3:40002",
            "waiting",
            987,
            0,
            0.0,
            NOW - 9.0,
            0,
            2,
            {"images": 0.18, "w1": 0.18, "deltas": 1.0, "samples": 1.0, "w2": 0.0},
            forms=dict(FORMS),
            reason="between batches",
        ),
        NodeRow(
            "n-carol",
            "carol",
            "c3" * 32,
            "10.0.0.4:40003",
            "lost",
            456,
            3,
            0.0,
            NOW - 125.0,
            4,
            1,
            {"images": 0.31, "w1": 0.22, "deltas": 1.0, "samples": 1.0, "w2": 0.0},
            forms=dict(FORMS),
            reason="silent for 3.1 s (heartbeat lost)",
        ),
    ]
    s.nodes = {r.node_id: r for r in rows}
    s.epochs = [
        EpochRow(1, 0.0900, 0.612, 0.601, 61.0),
        EpochRow(2, 0.0610, 0.751, 0.744, 58.0),
        EpochRow(3, 0.0480, 0.802, 0.795, 59.0),
    ]
    s.versions = [
        VersionRow(version_id(1), None, 1, 0, 0.601, T0 + 61, metadata={"preset": "fashion-quick", "cost": 0.09}),
        VersionRow(
            version_id(2), version_id(1), 2, 0, 0.744, T0 + 119, metadata={"preset": "fashion-quick", "cost": 0.061}
        ),
        VersionRow(
            version_id(3), version_id(2), 3, 0, 0.795, T0 + 178, metadata={"preset": "fashion-quick", "cost": 0.048}
        ),
    ]
    s.log.extend(
        [
            "22:14:21 batch reissued: carol missed its deadline",
            "22:15:02 result refused from carol: Freivalds check failed",
            "22:16:40 carol lost: no message for 120 s",
        ]
    )
    return s


def node_state() -> NodeState:
    s = NodeState(
        connect="tcp://coordinator.example:5555",
        name="volunteer-7",
        own_fingerprint="d4" * 32,
        coordinator_fingerprint="ab12cd34ef56ab78cd90ef12ab34cd56ef78ab90cd12ef34ab56cd78ef90ab12",
        trust="pinned",
        run_id="run-0042",
        connection="working",
        reason="",
        current_op="matmul (30000x196)·(196x128)",
        batches_done=4321,
        rate=18.25,
        bytes_in=3 * 1024**3 + 512 * 1024**2,
        bytes_out=250 * 1024**2,
        refusals=1,
        threads=2,
        exposure={"images": 0.24, "w1": 0.24, "deltas": 1.0, "samples": 0.5},
        started_at=T0,
    )
    s.log.extend(
        ["22:13:25 connected; coordinator fingerprint pinned", "22:20:01 refused a batch: signature did not verify"]
    )
    return s


class Source:
    """A back-end stand-in the test controls: returns a snapshot of `state`, or raises once gone."""

    def __init__(self, state):
        self.state = state
        self.gone: Exception | None = None
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.gone is not None:
            raise self.gone
        return self.state.snapshot()


def pilot_test(scenario):
    """Run an async Pilot scenario as a plain pytest test (no async plugin is a dependency)."""

    @functools.wraps(scenario)
    def test(*args, **kwargs):
        return asyncio.run(scenario(*args, **kwargs))

    return test


def text(app, widget_id: str) -> str:
    """What the Static `#widget_id` of `app` shows."""
    return str(app.query_one(f"#{widget_id}", Static).content)


def cell(table: DataTable, row: str, column: str) -> str:
    return str(table.get_cell(row, column))
