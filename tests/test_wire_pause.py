"""A volunteer who pauses (HEARTBEAT credit 0): under the exposure bound its block waits for it
(no other node may take it) and the coordinator says why; an operator who raised the bound sees
the block move to an active node. When every node has paused the coordinator says it is waiting,
and goes on when one resumes. Training always ends with the centralized weights."""

from __future__ import annotations

import contextlib

from wire_util import (
    InProcessRun,
    ScriptedNode,
    assert_same_weights,
    default_preset,
    load_inputs,
    reference_weights,
    spawn_node,
)


def pause(node: ScriptedNode, credit: int = 0) -> None:
    node.credit = credit
    node.sign_and_send("HEARTBEAT", {"node_id": node.node_id, "credit": credit, "outstanding": len(node.held)})


@contextlib.contextmanager
def paused_volunteer_run(core_data_dir, tmp_path, max_exposure=None):
    """Two slots: an `enshuffle node` process "active" and a scripted "volunteer"; the run holds
    before step 2. Yields (run, active, volunteer, the centralized weights); closes them all."""
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 1200)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2, max_exposure=max_exposure).start(hold_at=2)
    active = spawn_node(tmp_path / "active", run.endpoint, run.identity.fingerprint, "active", tmp_path)
    volunteer = ScriptedNode(run.endpoint, "volunteer")
    try:
        yield run, active, volunteer, expected
    finally:
        run.close()
        volunteer.close()
        active.stop()


def test_a_paused_node_keeps_its_block_and_the_run_waits_under_the_bound(core_data_dir, tmp_path):
    """The attack from the privacy issue: pause one node so the other takes its block. The bound
    is an invariant: the block waits for its paused owner, the coordinator says why, and the active
    node never holds more than its own block."""
    with paused_volunteer_run(core_data_dir, tmp_path) as (run, active, volunteer, expected):
        volunteer.hello()
        volunteer.serve_until(run.held, 60, "step 2", on_timeout=run.describe)
        pause(volunteer)
        run.hold_at(-1)
        volunteer.serve_until(
            lambda: run.state.snapshot().status.startswith("waiting: block"),
            30,
            "the coordinator to say a block waits for the bound",
            on_timeout=run.describe,
        )
        steps = run.steps_done
        assert not run.logged("moves from volunteer"), run.describe()
        assert run.logged("exposure bound: block"), run.describe()
        # The node kept waiting is told why (HEARTBEAT `waiting`), in its own log.
        volunteer.serve_until(
            lambda: "exposure bound" in active.err() + active.out(),
            20,
            "the active node to say why it waits",
            on_timeout=lambda: active.describe(),
        )
        shares = run.server.ledger.shares()
        assert shares["active"]["images"] <= run.server.bound["images"] + 1e-9, shares
        assert shares["active"]["w1"] <= run.server.bound["w1"] + 1e-9, shares
        pause(volunteer, credit=2)  # back: the run goes on where it waited
        volunteer.serve_until(run.done.is_set, 120, "training to finish after resuming", on_timeout=run.describe)
        weights = run.finish()
    assert run.steps_done > steps
    final = run.server.ledger.shares()
    for node in ("active", "volunteer"):
        assert 0 < final[node]["images"] <= run.server.bound["images"] + 1e-9, final
    assert_same_weights(weights, expected)


def test_an_operator_who_raises_the_bound_lets_the_block_move_and_the_ledger_says_so(core_data_dir, tmp_path):
    with paused_volunteer_run(core_data_dir, tmp_path, max_exposure=1.0) as (run, active, volunteer, expected):
        volunteer.hello()
        volunteer.serve_until(run.held, 60, "step 2", on_timeout=run.describe)
        done_before = len(volunteer.results)
        pause(volunteer)
        run.hold_at(-1)
        volunteer.serve_until(run.done.is_set, 120, "training to finish while paused", on_timeout=run.describe)
        weights = run.finish()
    assert run.logged("moves from volunteer (paused) to active"), run.describe()
    assert len(volunteer.results) <= done_before + 2  # at most what it held when it paused
    assert run.server.bound_raised and run.state.snapshot().bound_raised
    shares = run.server.ledger.shares()["active"]
    assert shares["images"] > 0.5 and shares["images"] <= 1.0  # the cost the operator accepted
    assert_same_weights(weights, expected)


@contextlib.contextmanager
def everyone_paused(core_data_dir):
    """One shard, one scripted volunteer that pauses at step 1; yields once the coordinator waits."""
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start(hold_at=1)
    volunteer = ScriptedNode(run.endpoint, "volunteer")
    try:
        volunteer.hello()
        volunteer.serve_until(run.held, 60, "step 1", on_timeout=run.describe)
        pause(volunteer)
        run.hold_at(-1)
        volunteer.serve_until(
            lambda: run.state.snapshot().status == "waiting for nodes: every node has paused",
            20,
            "the coordinator to say every node has paused",
            on_timeout=run.describe,
        )
        yield run, volunteer, reference_weights(preset, inputs)
    finally:
        run.close()
        volunteer.close()


def test_every_node_paused_means_waiting_then_resume(core_data_dir):
    with everyone_paused(core_data_dir) as (run, volunteer, expected):
        assert run.logged("every connected node has paused"), run.describe()
        # The nodes table says paused and why, and no stale rate from before the pause.
        volunteer.serve_until(
            lambda: (r := run.row("volunteer")).state == "paused" and r.rate == 0.0,
            30,
            "the row to show paused with rate 0",
            on_timeout=run.describe,
        )
        assert run.row("volunteer").reason == "paused by its volunteer"
        steps = run.steps_done
        pause(volunteer, credit=2)
        volunteer.serve_until(run.done.is_set, 120, "training to finish after resuming", on_timeout=run.describe)
        weights = run.finish()
    assert run.steps_done > steps
    assert_same_weights(weights, expected)


def test_a_stop_while_every_node_is_paused_ends_the_step(core_data_dir):
    from enshuffle.coordinator.server import StepAbandoned

    with everyone_paused(core_data_dir) as (run, volunteer, _):
        run.server.control.request_stop()
        volunteer.serve_until(run.done.is_set, 10, "the stop to end the waiting step", on_timeout=run.describe)
    assert isinstance(run.error, StepAbandoned), run.describe()


def test_waiting_status_counts_a_paused_node_as_connected(core_data_dir):
    """Before training, a node that joined paused is connected: the status says so instead of
    "0 of 1 connected"."""
    from wire_util import InProcessRun, ScriptedNode, default_preset, load_inputs, wait_until

    preset = default_preset(epochs=1)
    run = InProcessRun(preset, load_inputs(core_data_dir, preset, 300), shards=1, min_nodes=1).start()
    node = ScriptedNode(run.endpoint, "resting")
    node.credit = 0
    try:
        node.hello()
        wait_until(
            lambda: "paused" in run.state.snapshot().status,
            15,
            "the status to count the paused node",
            on_timeout=run.describe,
        )
        status = run.state.snapshot().status
        assert "0 of 1 connected" not in status and "1 connected but paused" in status, status
    finally:
        node.close()
        run.close()
