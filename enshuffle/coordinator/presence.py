"""How the operator and the nodes see who is doing what: node states and waiting reasons as
enums, and the plain sentences the console and the nodes are shown, made from them.

The server (`CoordinatorServer`) decides which state a live node is in and why it waits; this
module names those states (`NodeState`, the values the console's rows carry), the reasons
(`Waiting`, with what a sentence needs in `WaitReason`), and turns them into text. Code that
needs to know whether a node is on standby asks the enum, never the sentence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any, Callable, Iterable

RATE_STALE_S = 5.0  # no result for this long: the node's rate shows 0, not its last burst


class NodeState(StrEnum):
    """A node's row in the console (`NodeRow.state` holds the value)."""

    CONNECTED = "connected"  # joined, nothing shown yet
    WORKING = "working"  # holds a batch
    WAITING = "waiting"  # live, unpaused, no batch in hand
    PAUSED = "paused"  # its volunteer paused it
    STANDBY = "standby"  # every block is held by other nodes (or the bound keeps it off the one waiting)
    LOST = "lost"  # left mid-run
    QUARANTINED = "quarantined"  # lied (or kept rejecting) until quarantined
    GONE = "gone"  # re-admitted after a quarantine, not connected
    DONE = "done"  # the run finished
    LEFT = "left"  # the coordinator stopped


class Waiting(Enum):
    """Why a live, unpaused node with no batch in hand has none."""

    TOO_FEW_NODES = "too-few-nodes"  # the run waits for --min-nodes
    RUN_PAUSED = "run-paused"  # the operator paused the run
    FINISHED = "finished"  # the run has finished
    STANDBY_BOUND = "standby-bound"  # a block waits, but this node may not take it (the exposure bound)
    STANDBY = "standby"  # every block is held by another node
    BLOCK_WAITS = "block-waits"  # a block waits for a node within the exposure bound


STANDBY_REASONS = frozenset({Waiting.STANDBY, Waiting.STANDBY_BOUND})


@dataclass(frozen=True)
class WaitReason:
    """A `Waiting` and what its sentence names."""

    why: Waiting
    needed: int = 0  # TOO_FEW_NODES: the nodes the run waits for
    connected: int = 0  # TOO_FEW_NODES: connected so far
    blocks: tuple[int, ...] = ()  # STANDBY_BOUND, BLOCK_WAITS: the waiting blocks
    total_blocks: int = 0  # STANDBY: how many blocks there are
    bound: str = ""  # STANDBY_BOUND: the exposure bound in words

    @property
    def standby(self) -> bool:
        return self.why in STANDBY_REASONS

    def text(self) -> str:
        """One plain sentence, shown in the console and sent to the node (HEARTBEAT `waiting`)."""
        blocks = ", ".join(map(str, self.blocks))
        if self.why is Waiting.TOO_FEW_NODES:
            return f"the coordinator needs {self.needed} nodes to start, {self.connected} connected"
        if self.why is Waiting.RUN_PAUSED:
            return "the operator has paused the run"
        if self.why is Waiting.FINISHED:
            return "the run has finished"
        if self.why is Waiting.STANDBY_BOUND:
            return (
                f"on standby: block {blocks} waits for a node, but this node may not take it: it would "
                f"then hold more than the exposure bound allows ({self.bound})"
            )
        if self.why is Waiting.STANDBY:
            return (
                f"on standby: all {self.total_blocks} blocks are held by other nodes; it takes one over "
                f"when a node leaves or pauses"
            )
        return (
            f"block {blocks} waits for a node within the exposure bound; the step goes on when its node "
            f"comes back or a new node joins"
        )


def waiting_reason(
    node_id: str, *, connected: int, needed: int, paused: bool, finished: bool, scheduler
) -> WaitReason | None:
    """Why live, unpaused node `node_id` has no batch in hand, or None for the ordinary gap between
    two batches. `scheduler` is the run's `scheduling.Scheduler` (its owners, blocked slots and
    bound); it is asked about blocked slots only when the earlier reasons do not hold. New reasons
    belong here."""
    if connected < needed:
        return WaitReason(Waiting.TOO_FEW_NODES, needed=needed, connected=connected)
    if paused:
        return WaitReason(Waiting.RUN_PAUSED)
    if finished:
        return WaitReason(Waiting.FINISHED)
    blocked = tuple(sorted(scheduler.bound_wait())) if scheduler.blocked else ()
    owner = scheduler.owner
    if owner and node_id not in owner:
        if blocked:
            return WaitReason(Waiting.STANDBY_BOUND, blocks=blocked, bound=scheduler.bound_text())
        return WaitReason(Waiting.STANDBY, total_blocks=len(owner))
    if blocked:
        return WaitReason(Waiting.BLOCK_WAITS, blocks=blocked)
    return None


def node_state(*, busy: bool, paused: bool, reason: Callable[[], WaitReason | None]) -> tuple[NodeState, str]:
    """(state, reason in words) as the operator sees a live node: working / paused / standby /
    waiting. `reason` is asked only for a node that is neither busy nor paused."""
    if busy:
        return NodeState.WORKING, ""
    if paused:
        return NodeState.PAUSED, "paused by its volunteer"
    why = reason()
    if why is None:
        return NodeState.WAITING, "between batches"
    return (NodeState.STANDBY if why.standby else NodeState.WAITING), why.text()


def publish_rows(
    state, sessions: Iterable, shares: dict, forms: dict, now: float, state_of: Callable[[Any], tuple[NodeState, str]]
) -> None:
    """Copy what the console shows of each live session into its row of `state` (under its lock):
    outstanding, done, state and reason (`state_of(session)`), last seen, rate, exposure."""
    wall = time.time()
    with state.lock:
        for session in sessions:
            row = state.nodes.get(session.label)
            if row is None:
                continue
            row.outstanding = len(session.outstanding)
            row.batches_done = session.done
            node, reason = state_of(session)
            row.state, row.reason = node.value, reason
            row.last_seen = wall - (now - session.last_seen)
            window = session.rate_window
            row.rate = (
                (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 and window[-1] > window[0] else 0.0
            )
            if not window or now - window[-1] > RATE_STALE_S:
                row.rate = 0.0  # a paused or waiting node computes nothing: no stale rate
            row.exposure = dict(shares.get(session.label, {}))
            row.forms = dict(forms.get(session.label, {}))


# -- the run's status line while it waits for nodes ----------------------------------------------
def nodes_wanted_status(ready: int, count: int, connected: int) -> str:
    """The status while the run waits for `count` nodes ready to compute (`wait_for_nodes`)."""
    paused = connected - ready
    if not paused:
        return f"waiting for nodes: {ready} of {count} connected"
    return f"waiting for nodes: {ready} of {count} ready to compute ({paused} connected but paused)"


def bound_wait_status(blocks: Iterable[int]) -> str:
    """The status while blocks wait for a node the exposure bound allows."""
    return f"waiting: block {', '.join(str(b) for b in sorted(blocks))} needs a node within the exposure bound"


def no_nodes_status(connected: int) -> str:
    """The status while work waits with no node connected, or every connected node paused."""
    return "waiting for nodes: none connected" if not connected else "waiting for nodes: every node has paused"


def no_nodes_log(connected: int) -> str:
    """The log line when work starts waiting for nodes (none connected, or all paused)."""
    why = "no nodes connected" if not connected else f"every connected node has paused ({connected})"
    return f"{why}: waiting for nodes"


def closed_reason(finished: bool) -> tuple[NodeState, str]:
    """A node row's state and reason once the coordinator closes."""
    return (NodeState.DONE, "the run finished") if finished else (NodeState.LEFT, "the coordinator stopped")
