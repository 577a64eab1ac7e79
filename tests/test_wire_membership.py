"""Membership changes at step boundaries under the exposure bound.

Two slots, nodes A and B. B is killed: A may not take B's block (it would hold both), so B's
block waits and the coordinator says so. C joins: it takes B's block and holds exactly one block.
A never goes over its one block. Training ends with the centralized reference's weights.
"""

from __future__ import annotations

import signal

import numpy as np

from wire_util import (
    InProcessRun,
    assert_same_weights,
    default_preset,
    load_inputs,
    reference_weights,
    spawn_node,
    wait_until,
)


def test_a_lost_block_waits_for_a_new_node_and_nobody_goes_over_the_bound(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 1500)  # 12 steps of 128
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2).start(hold_at=2)
    fp = run.identity.fingerprint
    procs = {name: spawn_node(tmp_path / name, run.endpoint, fp, name, tmp_path) for name in ("A", "B")}
    ledger = run.server.ledger
    try:
        run.wait_held()
        shares = ledger.shares()
        assert abs(shares["A"]["images"] - shares["B"]["images"]) <= 1 / 784 and shares["B"]["images"] > 0.4
        b_pixels = ledger.positions("B", "images")
        a_pixels = ledger.positions("A", "images")

        procs["B"].signal(signal.SIGKILL)
        procs["B"].wait(10)
        run.hold_at(5)
        wait_until(
            lambda: run.logged("exposure bound: block"),
            60,
            "B's block to wait for an eligible node",
            on_timeout=run.describe,
        )
        assert run.row("B").state == "lost", run.describe()
        steps = run.steps_done
        assert steps < 5, "the run went on without B's block"
        np.testing.assert_array_equal(ledger.positions("A", "images"), a_pixels)  # A took nothing of B's
        np.testing.assert_array_equal(ledger.positions("B", "images"), b_pixels)  # B saw nothing more

        procs["C"] = spawn_node(tmp_path / "C", run.endpoint, fp, "C", tmp_path)
        run.wait_held(60)
        shares = ledger.shares()
        c_pixels = ledger.positions("C", "images")
        np.testing.assert_array_equal(c_pixels, b_pixels)  # C holds exactly B's block
        np.testing.assert_array_equal(ledger.positions("A", "images"), a_pixels)
        assert run.logged("exposure bound: block") and run.logged("goes to C"), run.describe()
        wait_until(lambda: run.row("C").batches_done > 0, 10, "C's row to show its batches", on_timeout=run.describe)
        weights = run.finish(120)
    finally:
        run.close()
        for proc in procs.values():
            proc.stop()
    for node, share in ledger.shares().items():
        assert share["images"] <= run.server.bound["images"] + 1e-9, (node, share)
        assert share["w1"] <= run.server.bound["w1"] + 1e-9, (node, share)
    assert_same_weights(weights, expected)


def test_a_node_beyond_the_blocks_is_on_standby_and_is_told_why(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 1500)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start(hold_at=2)
    fp = run.identity.fingerprint
    procs = {name: spawn_node(tmp_path / name, run.endpoint, fp, name, tmp_path) for name in ("P", "Q")}
    try:
        run.wait_held(60)
        wait_until(
            lambda: (
                run.row("P") is not None
                and run.row("Q") is not None
                and {run.row("P").state, run.row("Q").state} >= {"standby"}
            ),
            30,
            "both joined and one on standby",
            on_timeout=run.describe,
        )
        standby = "P" if run.row("P").state == "standby" else "Q"
        assert "all 1 blocks are held by other nodes" in run.row(standby).reason
        # The standby node learns it from the coordinator's HEARTBEAT, in the same words.
        wait_until(
            lambda: "coordinator: on standby" in procs[standby].err(),
            20,
            "the standby node to be told",
            on_timeout=procs[standby].describe,
        )
        other = "Q" if standby == "P" else "P"
        procs[other].signal(signal.SIGKILL)
        procs[other].wait(10)
        run.finish(120)
        assert run.row(other).state == "lost" and run.row(other).reason, run.describe()
    finally:
        run.close()
        for p in procs.values():
            p.stop()


def test_a_node_that_lost_a_busy_coordinator_replaces_its_own_session(core_data_dir, tmp_path):
    """The coordinator falls silent for longer than the node waits (busy with its own work): the
    node declares it lost and reconnects; its new HELLO names the session it left, so it is
    welcomed at once instead of being refused as a second process with its key (duplicate-key)."""
    from wire_util import InProcessRun, default_preset, load_inputs, spawn_node

    preset = default_preset(epochs=3)
    run = InProcessRun(preset, load_inputs(core_data_dir, preset, 300), shards=1, min_nodes=1).start(hold_at=2)
    node = spawn_node(tmp_path / "home", run.endpoint, run.identity.fingerprint, "busy", tmp_path)
    try:
        run.wait_held(60)
        run.stall()
        wait_until(
            lambda: node.err().count("connecting to") >= 2 or not node.alive(),
            60,
            "the node to lose the silent coordinator and say HI again",
            on_timeout=node.describe,
        )
        assert "lost connection" in node.err(), node.err()
        run.unstall()
        run.finish(120)
        assert node.wait(60) == 0, node.describe()
        assert "duplicate-key" not in node.err() and not run.logged("refused a second node"), node.err() + "\n".join(
            run.log_lines()
        )
    finally:
        run.close()
        node.stop()


def test_a_hello_that_names_its_old_session_replaces_it_and_a_twin_is_still_refused(core_data_dir):
    """Deterministically, with the old session's connection still open and just heard from: a
    HELLO with `replaces` = that session's node id is welcomed (the old session ends); the same
    key without it is a second process, refused `duplicate-key` as before."""
    import pytest

    from wire_util import InProcessRun, ScriptedNode, default_preset, load_inputs

    preset = default_preset(epochs=3)
    run = InProcessRun(preset, load_inputs(core_data_dir, preset, 300), shards=1, min_nodes=2).start()
    old = ScriptedNode(run.endpoint, "same")
    twin = ScriptedNode(run.endpoint, "same", identity=old.identity)
    again = ScriptedNode(run.endpoint, "same", identity=old.identity)
    try:
        old.hello()
        old.pump()  # the first heartbeat is in: the old session was just heard from
        wait_until(
            lambda: run.state.snapshot().nodes.get("same") is not None, 10, "the first session", on_timeout=run.describe
        )
        with pytest.raises(AssertionError, match="duplicate-key"):
            twin.hello()
        again.hello(replaces=old.node_id)
        assert again.node_id != old.node_id
        wait_until(lambda: run.logged("(n1) left"), 10, "the old session to end", on_timeout=run.describe)
    finally:
        for node in (old, twin, again):
            node.close()
        run.close()


def test_a_node_killed_with_sigkill_is_not_reported_as_host_unreachable(core_data_dir, tmp_path):
    from wire_util import InProcessRun, default_preset, load_inputs, spawn_node

    preset = default_preset(epochs=200)
    run = InProcessRun(preset, load_inputs(core_data_dir, preset, 300), shards=1, min_nodes=1).start()
    node = spawn_node(tmp_path / "home", run.endpoint, run.identity.fingerprint, "doomed", tmp_path)
    try:
        wait_until(
            lambda: run.row("doomed") is not None and run.row("doomed").batches_done > 0,
            60,
            "the node to compute",
            on_timeout=run.describe,
        )
        node.signal(signal.SIGKILL)
        node.wait(10)
        wait_until(
            lambda: run.logged("doomed (n1) left"), 30, "the coordinator to see it gone", on_timeout=run.describe
        )
        left = run.logged("doomed (n1) left")[0]
        assert "Host unreachable" not in left, left
    finally:
        node.stop()
        run.close()
