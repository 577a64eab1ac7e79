"""Membership changes at step boundaries and what they cost in exposure.

Two shards, nodes A and B. B is killed: A takes over B's pixel and hidden blocks (it receives
B's static image block), so the ledger shows A at 100% of the images while B keeps its 50%.
Then C joins: at the next step boundary it takes one shard from A and shows 50%; A's share stays
100% because exposure is cumulative. Training ends with the centralized reference's weights.
"""

from __future__ import annotations

import signal

import numpy as np

from core_data import core_cache, core_data_dir  # noqa: F401  (fixtures)
from wire_util import InProcessRun, assert_same_weights, default_preset, load_inputs, reference_weights, \
    spawn_node, wait_until


def test_leave_and_join_move_shards_and_the_ledger_shows_the_cost(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 1500)  # 12 steps of 128
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2).start(hold_at=2)
    fp = run.identity.fingerprint
    procs = {name: spawn_node(tmp_path / name, run.endpoint, fp, name, tmp_path) for name in ("A", "B")}
    ledger = run.server.ledger
    blocks = [np.sort(b) for b in run.compute.pixel_blocks]
    try:
        run.wait_held()
        shares = ledger.shares()
        assert shares["A"]["images"] == shares["B"]["images"] == 0.5
        b_pixels = ledger.positions("B", "images")

        procs["B"].signal(signal.SIGKILL)
        procs["B"].wait(10)
        run.hold_at(5)
        run.wait_held(60)
        assert run.row("B").state == "lost", run.describe()
        shares = ledger.shares()
        assert shares["A"]["images"] == 1.0 and shares["A"]["w1"] == 1.0, shares
        assert shares["B"]["images"] == 0.5
        np.testing.assert_array_equal(ledger.positions("B", "images"), b_pixels)  # B saw nothing more

        procs["C"] = spawn_node(tmp_path / "C", run.endpoint, fp, "C", tmp_path)
        wait_until(lambda: run.row("C") is not None, 30, "C to join", on_timeout=run.describe)
        run.hold_at(8)
        run.wait_held(60)
        shares = ledger.shares()
        assert shares["C"]["images"] == 0.5, shares
        c_pixels = ledger.positions("C", "images")
        assert any(np.array_equal(c_pixels, b) for b in blocks), "C received exactly one pixel block"
        assert shares["A"]["images"] == 1.0  # cumulative: what A has seen stays seen
        # Node rows are published a few times a second; the held run keeps pumping.
        wait_until(lambda: run.row("C").batches_done > 0, 10, "C's row to show its batches", on_timeout=run.describe)
        assert run.logged("moves from A to C"), run.describe()
        weights = run.finish(120)
    finally:
        run.close()
        for proc in procs.values():
            proc.stop()
    assert_same_weights(weights, expected)


def test_a_node_beyond_the_blocks_is_on_standby_and_is_told_why(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 1500)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start(hold_at=2)
    fp = run.identity.fingerprint
    procs = {name: spawn_node(tmp_path / name, run.endpoint, fp, name, tmp_path) for name in ("P", "Q")}
    try:
        run.wait_held(60)
        wait_until(lambda: run.row("P") is not None and run.row("Q") is not None and
                   {run.row("P").state, run.row("Q").state} >= {"standby"}, 30,
                   "both joined and one on standby", on_timeout=run.describe)
        standby = "P" if run.row("P").state == "standby" else "Q"
        assert "all 1 blocks are held by other nodes" in run.row(standby).reason
        # The standby node learns it from the coordinator's HEARTBEAT, in the same words.
        wait_until(lambda: "coordinator: on standby" in procs[standby].err(), 20,
                   "the standby node to be told", on_timeout=procs[standby].describe)
        other = "Q" if standby == "P" else "P"
        procs[other].signal(signal.SIGKILL)
        procs[other].wait(10)
        run.finish(120)
        assert run.row(other).state == "lost" and run.row(other).reason, run.describe()
    finally:
        run.close()
        for p in procs.values():
            p.stop()
