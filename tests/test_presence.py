"""presence: a live node's state and why it waits, as enums, and the sentences made from them
(the console's and the node's HEARTBEAT `waiting`). Plain objects, no socket."""

from __future__ import annotations

from dataclasses import dataclass, field

from enshuffle.coordinator.presence import NodeState, WaitReason, Waiting, closed_reason, node_state, waiting_reason


@dataclass
class FakeScheduler:
    owner: list = field(default_factory=list)
    blocked: set = field(default_factory=set)
    waiting_blocks: set = field(default_factory=set)
    asked: int = 0

    def bound_wait(self) -> set:
        self.asked += 1
        return self.waiting_blocks

    def bound_text(self) -> str:
        return "images 50.0%, w1 50.0%"


def reason(node_id="n1", *, connected=2, needed=0, paused=False, finished=False, scheduler=None):
    return waiting_reason(
        node_id,
        connected=connected,
        needed=needed,
        paused=paused,
        finished=finished,
        scheduler=scheduler or FakeScheduler(owner=["n1", "n2"]),
    )


def test_the_reasons_in_order_and_their_sentences():
    too_few = reason(connected=1, needed=3, paused=True)
    assert too_few == WaitReason(Waiting.TOO_FEW_NODES, needed=3, connected=1)
    assert too_few.text() == "the coordinator needs 3 nodes to start, 1 connected"
    assert reason(paused=True, finished=True).text() == "the operator has paused the run"
    assert reason(finished=True).text() == "the run has finished"
    assert reason() is None  # the ordinary gap between two batches


def test_a_node_holding_no_block_is_on_standby():
    held = reason("n3", connected=3)
    assert held.why is Waiting.STANDBY and held.standby
    assert held.text() == (
        "on standby: all 2 blocks are held by other nodes; it takes one over when a node leaves or pauses"
    )
    bound = FakeScheduler(owner=["n1", None], blocked={1}, waiting_blocks={1})
    kept_off = reason("n3", connected=3, scheduler=bound)
    assert kept_off.why is Waiting.STANDBY_BOUND and kept_off.standby
    assert kept_off.text().startswith("on standby: block 1 waits for a node, but this node may not take it")
    assert "(images 50.0%, w1 50.0%)" in kept_off.text()


def test_an_owner_waiting_on_a_blocked_block_is_waiting_not_on_standby():
    bound = FakeScheduler(owner=["n1", None], blocked={1}, waiting_blocks={1})
    waits = reason("n1", scheduler=bound)
    assert waits.why is Waiting.BLOCK_WAITS and not waits.standby
    assert waits.text().startswith("block 1 waits for a node within the exposure bound")


def test_blocked_slots_are_asked_about_only_when_the_earlier_reasons_do_not_hold():
    """`bound_wait` logs and frees slots: a paused run, or one still gathering nodes, never calls it."""
    bound = FakeScheduler(owner=["n1", None], blocked={1}, waiting_blocks={1})
    reason(paused=True, scheduler=bound)
    reason(connected=1, needed=2, scheduler=bound)
    assert bound.asked == 0
    reason(scheduler=bound)
    assert bound.asked == 1
    unblocked = FakeScheduler(owner=["n1"])
    reason(scheduler=unblocked)
    assert unblocked.asked == 0


def test_node_state_comes_from_the_enum_not_the_sentence():
    def never():
        raise AssertionError("a busy or paused node's reason is never asked")

    assert node_state(busy=True, paused=True, reason=never) == (NodeState.WORKING, "")
    assert node_state(busy=False, paused=True, reason=never) == (NodeState.PAUSED, "paused by its volunteer")
    assert node_state(busy=False, paused=False, reason=lambda: None) == (NodeState.WAITING, "between batches")
    standby = WaitReason(Waiting.STANDBY, total_blocks=2)
    assert node_state(busy=False, paused=False, reason=lambda: standby) == (NodeState.STANDBY, standby.text())
    paused_run = WaitReason(Waiting.RUN_PAUSED)
    assert node_state(busy=False, paused=False, reason=lambda: paused_run) == (
        NodeState.WAITING,
        "the operator has paused the run",
    )


def test_the_states_are_the_strings_the_console_shows():
    assert [s.value for s in NodeState] == [
        "connected",
        "working",
        "waiting",
        "paused",
        "standby",
        "lost",
        "quarantined",
        "gone",
        "done",
        "left",
    ]
    assert NodeState.STANDBY == "standby" and f"{NodeState.WORKING}" == "working"
    assert closed_reason(True) == (NodeState.DONE, "the run finished")
    assert closed_reason(False) == (NodeState.LEFT, "the coordinator stopped")
