"""The scheduling policy alone (enshuffle.coordinator.scheduling): no socket, no process.

Plain objects stand for sessions and tasks; a slot's exposure is one block of images and w1,
as DistributedCompute's slots are. The wire tests (test_wire_pause/membership/failures) check
the same rules through real node processes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from enshuffle.coordinator.ledger import HIDDEN_VALUES, ExposureLedger
from enshuffle.coordinator.scheduling import Scheduler

BLOCKS = [np.arange(0, 392), np.arange(392, 784)]  # two slots: half the pixels each


def slot_exposure(shard: int) -> list[tuple]:
    return [("images", BLOCKS[shard], HIDDEN_VALUES), ("w1", BLOCKS[shard], HIDDEN_VALUES)]


@dataclass
class FakeSession:
    node_id: str
    want: int = 2
    shards_held: set = field(default_factory=set)
    queue: deque = field(default_factory=deque)
    outstanding: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.node_id


@dataclass
class FakeBatch:
    shard: int


@dataclass
class FakeTask:
    batch_id: str
    batch: FakeBatch


def make(max_exposure=None):
    ledger, sessions, logged = ExposureLedger(), {}, []
    scheduler = Scheduler(ledger, sessions, max_exposure=max_exposure, log=logged.append)
    scheduler.attach(2, slot_exposure)
    return scheduler, ledger, sessions, logged


def join(sessions, node_id: str, **kw) -> FakeSession:
    sessions[node_id] = FakeSession(node_id, **kw)
    return sessions[node_id]


def receive(ledger, session: FakeSession, shard: int) -> None:
    """What the server does when it sends a slot's statics."""
    ledger.record(session.label, slot_exposure(shard))
    session.shards_held.add(shard)


def test_the_bound_defaults_to_one_block_and_max_exposure_raises_it():
    scheduler, *_ = make()
    assert scheduler.bound == {"images": 0.5, "w1": 0.5} and not scheduler.bound_raised
    raised, *_ = make(max_exposure=1.0)
    assert raised.bound == {"images": 1.0, "w1": 1.0} and raised.bound_raised


def test_one_node_serves_one_block_and_a_newcomer_takes_the_other_at_the_boundary():
    scheduler, ledger, sessions, logged = make()
    a = join(sessions, "a")
    assert scheduler.assign(0) is a
    assert scheduler.assign(1) is None and scheduler.blocked == {1}  # a is promised slot 0 already
    receive(ledger, a, 0)
    join(sessions, "b")
    scheduler.rebalance()
    assert scheduler.owner == ["a", "b"] and not scheduler.blocked
    assert any("block 1 goes to b" in line for line in logged)


def test_with_a_raised_bound_an_idle_newcomer_takes_a_slot_from_a_node_holding_two():
    scheduler, ledger, sessions, logged = make(max_exposure=1.0)
    a = join(sessions, "a")
    assert scheduler.assign(0) is a and scheduler.assign(1) is a
    join(sessions, "b")
    scheduler.rebalance()
    assert scheduler.owner == ["a", "b"]
    assert any("block 1 moves from a to b" in line for line in logged)


def test_a_node_that_held_one_block_never_takes_the_other():
    scheduler, ledger, sessions, logged = make()
    a, b = join(sessions, "a"), join(sessions, "b")
    scheduler.assign(0), scheduler.assign(1)
    receive(ledger, a, 0), receive(ledger, b, 1)
    assert not scheduler.eligible(a, 1) and not scheduler.eligible(b, 0)
    # b leaves: its slot may not go to a, so it waits, and its batch with it
    del sessions["b"]
    scheduler.release("b")
    assert scheduler.owner == ["a", None] and scheduler.blocked == {1}
    task = FakeTask("1.1", FakeBatch(1))
    scheduler.enqueue(task)
    assert list(scheduler.waiting) == [task] and not a.queue
    assert scheduler.bound_wait() == {1}
    assert any("block 1 waits for a node" in line for line in logged)
    # a standby node that never held anything may take it
    c = join(sessions, "c")
    scheduler.requeue_waiting()
    assert scheduler.owner == ["a", "c"] and list(c.queue) == [task] and not scheduler.waiting
    assert not scheduler.blocked


def test_a_batch_promised_to_a_node_counts_toward_its_bound():
    """A node with a re-issued batch of slot 0 queued may not also be given slot 1."""
    scheduler, ledger, sessions, _ = make()
    a = join(sessions, "a")
    a.queue.append(FakeTask("0.1", FakeBatch(0)))
    assert not scheduler.eligible(a, 1)
    assert scheduler.eligible(a, 0)


def test_a_paused_nodes_slot_moves_only_within_the_bound():
    scheduler, ledger, sessions, logged = make()
    a, b = join(sessions, "a"), join(sessions, "b")
    scheduler.assign(0), scheduler.assign(1)
    receive(ledger, a, 0), receive(ledger, b, 1)
    a.want = 0  # paused with work queued
    task = FakeTask("2.1", FakeBatch(0))
    a.queue.append(task)
    scheduler.route_around_paused()
    assert scheduler.owner[0] == "a" and list(a.queue) == [task] and scheduler.blocked == {0}
    c = join(sessions, "c")  # a fresh node: the slot and its batch move to it
    scheduler.route_around_paused()
    assert scheduler.owner[0] == "c" and list(c.queue) == [task] and not a.queue


def test_an_expired_lease_is_reissued_to_another_node_the_bound_allows():
    scheduler, ledger, sessions, _ = make(max_exposure=1.0)
    a, b = join(sessions, "a"), join(sessions, "b")
    scheduler.assign(0), scheduler.assign(1)
    task = FakeTask("3.1", FakeBatch(0))
    scheduler.reissue(task, a)
    assert list(b.queue) == [task]  # the raised bound lets b hold both blocks
    strict, ledger2, sessions2, _ = make()
    a2, b2 = join(sessions2, "a"), join(sessions2, "b")
    strict.assign(0), strict.assign(1)
    receive(ledger2, a2, 0), receive(ledger2, b2, 1)
    task2 = FakeTask("3.2", FakeBatch(0))
    strict.reissue(task2, a2)
    assert list(a2.queue) == [task2] and not b2.queue  # b may not: it stays with its owner


def test_the_send_guard_never_requeues_to_the_refused_node():
    scheduler, ledger, sessions, _ = make()
    a = join(sessions, "a")
    scheduler.assign(0)
    task = FakeTask("4.1", FakeBatch(0))
    scheduler.refuse(a, task)
    assert scheduler.owner[0] is None and list(scheduler.waiting) == [task]
