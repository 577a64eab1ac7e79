"""A node that keeps heartbeating but never answers a batch (stuck compute): its lease expires,
the batch waits for a free slot, and after another lease with no answer the session is ended so
the work can go on; the node's next session (a reconnect) gets the batch and training finishes.
Credit stays honest throughout: the node never holds more batches than its window."""

from __future__ import annotations

from wire_util import InProcessRun, ScriptedNode, assert_same_weights, default_preset, load_inputs, reference_weights

from enshuffle.coordinator.server import LeasePolicy


def test_a_stuck_node_is_ended_and_its_batch_finished_elsewhere(core_data_dir, tmp_path):
    # Leases before any measurement are 30 s by default; a short first lease keeps the test quick.
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1, lease=LeasePolicy(initial_ms=300)).start(hold_at=1)
    node = ScriptedNode(run.endpoint, "stuck")
    try:
        node.hello()
        node.serve_until(run.held, 30, "step 1", on_timeout=run.describe)
        node.credit = 1
        node.sign_and_send("HEARTBEAT", {"node_id": node.node_id, "credit": 1, "outstanding": 0})
        node.hold_next(1)  # the next batch is never answered
        run.hold_at(-1)
        node.serve_until(
            lambda: run.logged("stuck:"), 30, "the coordinator to end the stuck session", on_timeout=run.describe
        )
        assert len(node.held) == 1, "the node was sent more than its window while holding a stuck batch"
        node.held.clear()
        node.hello()  # what the real daemon does when the coordinator goes quiet: a new session
        node.serve_until(run.done.is_set, 60, "training to finish", on_timeout=run.describe)
        weights = run.finish()
    finally:
        run.close()
        node.close()
    assert run.server.counters["expired"] >= 1
    assert_same_weights(weights, expected)
