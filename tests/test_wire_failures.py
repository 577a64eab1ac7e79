"""Nodes that die, leave and come back, over real node processes on 127.0.0.1.

The coordinator (`CoordinatorServer` + `Trainer`) runs in a thread of this process so its node
rows, log and counters can be read, and so the test can hold the run at a step boundary (the
server keeps pumping while held). Nodes are real `enshuffle node` processes, each with its own
ENSHUFFLE_HOME; SIGSTOP is used only to freeze a node while batches are in flight, so a kill
or a BYE lands while it holds work.
"""

from __future__ import annotations

import signal
import time

import pytest

from enshuffle.coordinator.server import LEASE_INITIAL_MS
from wire_util import (
    InProcessRun,
    assert_same_weights,
    cpu_seconds,
    default_preset,
    load_inputs,
    reference_weights,
    spawn_node,
    wait_until,
)

LIMIT = 600  # default preset, batch 128: 5 steps an epoch


@pytest.fixture
def nodes(tmp_path):
    """start(run, i) -> an `enshuffle node` process 'proc-i' (home node-i), pinned to the run's key."""
    procs = []

    def start(run: InProcessRun, i: int):
        proc = spawn_node(
            tmp_path / f"node-{i}", run.endpoint, run.identity.fingerprint, f"proc-{i}", tmp_path / f"logs-{len(procs)}"
        )
        procs.append(proc)
        return proc

    start.procs = procs
    yield start
    for proc in procs:
        proc.stop()


def diagnose(run: InProcessRun, procs) -> str:
    return run.describe() + "".join(p.describe() for p in procs)


def test_killed_nodes_block_waits_it_rejoins_and_an_empty_cluster_waits_idle(core_data_dir, nodes):
    preset = default_preset(epochs=2)  # 10 steps
    inputs = load_inputs(core_data_dir, preset, LIMIT)
    run = InProcessRun(preset, inputs, shards=3, min_nodes=3).start(hold_at=1)
    procs = [nodes(run, i) for i in (1, 2, 3)]
    why = lambda: diagnose(run, nodes.procs)  # noqa: E731
    try:
        run.wait_held()  # step 0 done: every node has computed
        # Node rows are published a few times a second: poll them.
        first = wait_until(
            lambda: (r := run.row("proc-1")).batches_done > 0 and r, 5, "proc-1's first results", on_timeout=why
        )

        # SIGKILL proc-1 while it holds batches (frozen first so the kill lands mid-step).
        procs[0].signal(signal.SIGSTOP)
        run.hold_at(3)
        wait_until(lambda: run.row("proc-1").outstanding > 0, 10, "proc-1 to hold a batch", on_timeout=why)
        procs[0].signal(signal.SIGKILL)
        assert procs[0].wait(5) == -signal.SIGKILL
        # Its block may not go to the others (each would hold two blocks): it waits, and says so.
        wait_until(
            lambda: run.state.snapshot().status.startswith("waiting: block"),
            30,
            "proc-1's block to wait under the exposure bound",
            on_timeout=why,
        )
        gone = run.row("proc-1")
        assert gone.state == "lost" and gone.reissued >= 1, why()
        assert run.server.counters["reissued"] >= 1
        assert run.logged("node proc-1 (") and any("left:" in line for line in run.logged("node proc-1 (")), why()
        assert run.steps_done < 3 and not run.held(), why()
        for label in ("proc-2", "proc-3"):
            assert run.server.ledger.shares()[label]["images"] <= run.server.bound["images"] + 1e-9

        # It comes back with the same key: same row, a new session, its own block again.
        nodes(run, 1)
        wait_until(
            lambda: run.row("proc-1").node_id != first.node_id and run.row("proc-1").state != "lost",
            15,
            "proc-1 to rejoin",
            on_timeout=why,
        )
        run.wait_held(30)  # steps 1 and 2 finished with it back
        assert run.logged("goes to proc-1"), why()
        run.hold_at(5)
        run.wait_held(30)
        wait_until(
            lambda: (r := run.row("proc-1")).batches_done > 0 and r.state in ("working", "waiting", "standby"),
            5,
            "proc-1 to compute again",
            on_timeout=why,
        )

        # Every node gone: the coordinator says it waits, and waits without spinning.
        log_mark = len(run.log_lines())
        for proc in nodes.procs:
            proc.signal(signal.SIGKILL)
        run.hold_at(7)
        wait_until(
            lambda: run.state.snapshot().status == "waiting for nodes: none connected",
            15,
            "the coordinator to wait for nodes",
            on_timeout=why,
        )
        assert any("no nodes connected: waiting for nodes" in line for line in run.log_lines()[log_mark:]), why()
        steps, cpu_before = run.steps_done, cpu_seconds()
        # A 2 s measurement window: the run must neither finish nor fail (its `done` event stays
        # unset) while it waits, and must not burn CPU doing so.
        assert not run.done.wait(2.0), why()
        assert run.state.snapshot().status == "waiting for nodes: none connected"
        cpu = cpu_seconds() - cpu_before
        assert cpu < 0.5, f"the waiting coordinator used {cpu:.2f} s CPU in 2 s: it spins"
        assert run.steps_done == steps

        # The nodes return; the waiting step goes on and the run ends with the centralized model.
        run.hold_at(run.steps_done + 1)  # hold after the waiting step, to look at the status in between
        for i in (1, 2, 3):
            nodes(run, i)
        run.wait_held(30)
        # No longer waiting (the server's pump, still running while held, publishes the status).
        wait_until(lambda: run.state.snapshot().status == "training", 10, "the status to say training", on_timeout=why)
        weights = run.finish(60)
    finally:
        run.close()
    assert_same_weights(weights, reference_weights(preset, inputs))


def test_node_saying_bye_has_its_batches_reissued_at_once_and_a_new_node_takes_its_block(core_data_dir, nodes):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, LIMIT)
    run = InProcessRun(preset, inputs, shards=3, min_nodes=3).start(hold_at=0)
    procs = [nodes(run, i) for i in (1, 2, 3)]
    why = lambda: diagnose(run, nodes.procs)  # noqa: E731
    try:
        run.wait_held()  # all three joined; nothing sent yet
        # Frozen before its first batch arrives, proc-1 will find its statics and batch queued
        # when it wakes; the SIGTERM is handled after the first of them, so it leaves holding the batch.
        procs[0].signal(signal.SIGSTOP)
        run.hold_at(-1)
        wait_until(lambda: run.row("proc-1").outstanding > 0, 10, "proc-1 to hold a batch", on_timeout=why)
        before = run.server.counters["reissued"]
        sent_bye_at = time.monotonic()
        procs[0].signal(signal.SIGTERM)
        procs[0].signal(signal.SIGCONT)
        wait_until(
            lambda: run.server.counters["reissued"] > before, 15, "proc-1's batch to be re-issued", on_timeout=why
        )
        elapsed = time.monotonic() - sent_bye_at
        assert procs[0].wait(5) == 0, procs[0].describe()
        assert run.logged("node proc-1 (") and any("said BYE (shutdown)" in line for line in run.log_lines()), why()
        assert run.server.counters["expired"] == 0  # re-issued because of the BYE, not a lease
        assert elapsed < LEASE_INITIAL_MS / 3000, f"re-issue took {elapsed:.1f} s: BYE must not wait for the lease"
        assert run.row("proc-1").reissued >= 1
        # Its block waits for a node the bound allows: a fresh one takes it and the run ends.
        wait_until(lambda: run.logged("exposure bound: block"), 15, "the block to wait", on_timeout=why)
        procs.append(nodes(run, 4))
        weights = run.finish(60)
    finally:
        run.close()
    assert run.logged("goes to proc-4"), run.describe()
    assert_same_weights(weights, reference_weights(preset, inputs))
    for proc in procs[1:]:
        assert proc.wait(15) == 0, proc.describe()
