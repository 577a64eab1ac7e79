"""The coordinator's scheduling policy: which node serves which slot, and where a batch goes.

A run has k slots (shards: fixed partitions of pixels and hidden units). `Scheduler` owns
- shard ownership (`owner[shard]` is a node id or None) and its changes: assignment to the least
  loaded node, rebalancing at step boundaries, routing around a paused node, re-issue targets;
- the exposure bound (docs/design.md, "Privacy"): per bounded kind, the share a node may ever hold;
  every path that hands a slot or a batch to a node asks `eligible()` first, and a slot no node
  may take waits (`blocked`);
- the queue of batches with no node to go to (`waiting`).

It never touches a socket or a message: the server (`CoordinatorServer`) owns sessions and
sockets and calls in here. A session is anything with `node_id`, `label`, `want` (0 when
paused), `shards_held` (set of slots whose statics it received), `queue` (deque of tasks) and
`outstanding` (batch id -> task); a task has `batch.shard` and `batch_id`. That is all this
module reads, so it can be tested with plain objects (tests/test_scheduling.py).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from enshuffle.coordinator.ledger import ExposureLedger

BOUNDED = ("images", "w1")  # kinds the bound always limits; also every other layer's weights and activations


def bounded_kinds(kinds) -> tuple[str, ...]:
    """The kinds whose share per node the bound limits: the images, every layer's weights and every
    hidden layer's activations (a node serves one block of each); not samples, deltas (every
    node sees every step's, disguised) or what is never sent."""
    return tuple(k for k in kinds if k == "images" or k.startswith(("w", "activations")))


class Scheduler:
    """Slot ownership, the exposure bound and the waiting queue of one run."""

    def __init__(
        self,
        ledger: ExposureLedger,
        sessions: dict,
        *,
        max_exposure: float | None = None,
        log: Callable[[str], None] = lambda line: None,
        changed: Callable[[], None] = lambda: None,
        group_ledger: ExposureLedger | None = None,
    ):
        self.ledger = ledger
        # What the keys of one group (one invite code) have received together, by group name: the
        # bound holds for a group as for one key, so a party with several keys from one code gets
        # no more than one key would. A session's group is its `group` attribute (None: none).
        self.group_ledger = group_ledger
        self.sessions = sessions  # node_id -> live session; the server's own dict, read here
        self.max_exposure = max_exposure
        self.log = log
        self.changed = changed  # something was queued: the server must dispatch again
        self.owner: list[str | None] = []
        self.slot_exposure: Callable[[int], list] = lambda shard: []
        self.bound: dict[str, float] = {}  # bounded kind -> the share a node may hold
        self.bound_raised = False
        self.blocked: set[int] = set()  # slots waiting for a node the bound allows
        self.waiting: deque = deque()  # tasks with no live session to go to

    def attach(self, k: int, slot_exposure: Callable[[int], list]) -> None:
        """k slots, each handing its holder `slot_exposure(shard)` (ledger entries); sets the bound:
        by default the largest slot's share of each bounded kind, or --max-exposure if higher."""
        self.owner = [None] * k
        self.slot_exposure = slot_exposure
        probe = ExposureLedger(self.ledger.axes)
        for shard in range(k):
            probe.record(f"slot{shard}", slot_exposure(shard))
        shares = probe.shares().values()
        for kind in bounded_kinds(self.ledger.axes):
            default = max((sh[kind] for sh in shares), default=1.0)
            if default == 0.0 and kind not in BOUNDED:
                continue  # no slot sends it (the last layer's weights, its input activations)
            self.bound[kind] = max(default, self.max_exposure or 0.0)
            self.bound_raised |= self.bound[kind] > default + 1e-12

    def eligible(self, session, shard: int) -> bool:
        """May `session` serve `shard`? Yes if it holds it already or if every bounded kind of
        what it would then have seen (over the whole run, under its key) stays within the bound."""
        if shard in session.shards_held:
            return True
        # What it has received, plus every slot it is already promised (owned, or with batches
        # queued or leased to it) whose statics may not have gone out yet: a node given a re-issued
        # batch of another slot first must not end up unable to serve its own.
        promised = {s for s, owner in enumerate(self.owner) if owner == session.node_id}
        promised.update(t.batch.shard for t in session.queue)
        promised.update(t.batch.shard for t in session.outstanding.values())
        promised.discard(shard)
        exposure = list(self.slot_exposure(shard))
        for other in promised - session.shards_held:
            exposure.extend(self.slot_exposure(other))
        would = self.ledger.would_hold(session.label, exposure)
        if not all(would.get(kind, 0.0) <= bound + 1e-9 for kind, bound in self.bound.items()):
            return False
        group = getattr(session, "group", None)
        if group is None or self.group_ledger is None:
            return True
        # The group: what its members received, plus every slot any of them is promised.
        members = [s for s in self.sessions.values() if getattr(s, "group", None) == group]
        if all(m is not session for m in members):
            members.append(session)
        together = list(self.slot_exposure(shard))
        for member in members:
            owned = {s for s, owner in enumerate(self.owner) if owner == member.node_id}
            owned.update(t.batch.shard for t in member.queue)
            owned.update(t.batch.shard for t in member.outstanding.values())
            for other in owned - member.shards_held - {shard}:
                together.extend(self.slot_exposure(other))
        would = self.group_ledger.would_hold(group, together)
        return all(would.get(kind, 0.0) <= bound + 1e-9 for kind, bound in self.bound.items())

    def block(self, shard: int, why: str) -> None:
        if shard not in self.blocked:
            self.blocked.add(shard)
            self.log(f"exposure bound: block {shard} waits for a node: {why}")

    def shard_counts(self) -> dict[str, int]:
        counts = {nid: 0 for nid in self.sessions}
        for owner in self.owner:
            if owner in counts:
                counts[owner] += 1
        return counts

    def assign(self, shard: int):
        """Give `shard` to the active session the exposure bound allows that holds the fewest
        shards (preferring one that has it already); None, and the slot waits, if there is none."""
        if not self.sessions:
            self.owner[shard] = None
            return None
        counts = self.shard_counts()
        allowed = [s for s in self.sessions.values() if self.eligible(s, shard)]
        active = [s for s in allowed if s.want > 0] or allowed
        if not active:
            self.owner[shard] = None
            self.block(
                shard,
                f"none of the {len(self.sessions)} connected node(s) may take it without "
                f"exceeding the exposure bound ({self.bound_text()}); start another node, or "
                f"bring back the one that held it",
            )
            return None
        best = min(active, key=lambda s: (counts[s.node_id], shard not in s.shards_held, s.node_id))
        self.owner[shard] = best.node_id
        if shard in self.blocked:
            self.blocked.discard(shard)
            self.log(f"exposure bound: block {shard} goes to {best.label}")
        return best

    def bound_wait(self) -> set[int]:
        """Blocks with work waiting only because the bound allows no active node to take them."""
        if not self.blocked or not self.sessions:  # no node at all: "none connected" says it
            return set()
        for shard in list(self.blocked):
            owner = self.sessions.get(self.owner[shard]) if self.owner[shard] else None
            if owner is not None and owner.want > 0:  # its owner is back (resumed): it goes on
                self.blocked.discard(shard)
                self.log(f"exposure bound: block {shard} goes on with {owner.label}")
        pending = {t.batch.shard for t in self.waiting}
        pending.update(t.batch.shard for s in self.sessions.values() if s.want == 0 for t in s.queue)
        return pending & self.blocked

    def bound_text(self) -> str:
        return ", ".join(f"{kind} {100 * b:.1f}%" for kind, b in self.bound.items())

    def rebalance(self) -> None:
        """Step boundary: orphaned slots are assigned, and an idle node takes a slot from a node
        holding two or more (if the bound allows it)."""
        if not self.owner:
            return
        for shard, owner in enumerate(self.owner):
            if owner not in self.sessions:
                self.assign(shard)
        while True:
            counts = self.shard_counts()
            if not counts:
                return
            busiest = max(counts, key=lambda nid: counts[nid])
            if counts[busiest] < 2:
                return
            shard = max(s for s, o in enumerate(self.owner) if o == busiest)
            idle = [
                nid
                for nid, c in counts.items()
                if c == 0 and self.sessions[nid].want > 0 and self.eligible(self.sessions[nid], shard)
            ]
            if not idle:
                return
            self.owner[shard] = idle[0]
            self.log(
                f"membership: block {shard} moves from {self.sessions[busiest].label} to {self.sessions[idle[0]].label}"
            )

    def enqueue(self, task) -> None:
        """Queue `task` for its slot's owner (assigning the slot if it has none), else keep it waiting."""
        self.changed()
        owner = self.owner[task.batch.shard]
        session = self.sessions.get(owner) if owner else None
        if session is None:
            session = self.assign(task.batch.shard)
        if session is None:
            self.waiting.append(task)
            return
        session.queue.append(task)

    def requeue_waiting(self) -> None:
        if self.waiting and self.sessions:
            waiting, self.waiting = self.waiting, deque()
            for task in waiting:
                self.enqueue(task)

    def release(self, node_id: str) -> None:
        """A session ended: each slot it owned goes to another node, or waits."""
        for shard, owner in enumerate(self.owner):
            if owner == node_id:
                self.assign(shard)

    def reissue(self, task, previous) -> None:
        """Queue `task` again. The slot stays where it is unless its owner is gone; an expired
        lease on a live owner goes to another node the bound allows, if there is one."""
        self.changed()
        if previous is not None and self.owner[task.batch.shard] == previous.node_id and len(self.sessions) > 1:
            others = [
                s
                for s in self.sessions.values()
                if s.node_id != previous.node_id and self.eligible(s, task.batch.shard)
            ]
            if others:
                target = min(others, key=lambda s: (len(s.outstanding) + len(s.queue), s.node_id))
                target.queue.append(task)
                return
        self.enqueue(task)

    def refuse(self, session, task) -> None:
        """The last guard before sending failed (`session` may not hold `task`'s slot): the task
        waits, and the slot is never re-queued to it."""
        if self.owner[task.batch.shard] == session.node_id:
            self.owner[task.batch.shard] = None  # enqueue assigns anew
        self.waiting.append(task)

    def route_around_paused(self) -> None:
        """A paused node (credit 0) keeps nothing waiting: its shards and queued batches go to
        the active node holding the fewest shards, which first receives the shards' statics (the
        ledger shows that cost). Back from pause, it takes a shard again at a step boundary."""
        active = [s for s in self.sessions.values() if s.want > 0]
        if not active:
            return
        for session in [s for s in self.sessions.values() if s.want == 0 and s.queue]:
            kept = set()
            for shard, owner in enumerate(self.owner):
                if owner == session.node_id:
                    counts = self.shard_counts()
                    allowed = [s for s in active if self.eligible(s, shard)]
                    if not allowed:
                        # The bound is an invariant: the block waits for its paused owner.
                        kept.add(shard)
                        self.block(
                            shard,
                            f"{session.label} paused holding it, and no other node may take it "
                            f"without exceeding the exposure bound ({self.bound_text()})",
                        )
                        continue
                    target = min(allowed, key=lambda s: (counts[s.node_id], shard not in s.shards_held, s.node_id))
                    self.owner[shard] = target.node_id
                    self.log(f"membership: block {shard} moves from {session.label} (paused) to {target.label}")
            queued, session.queue = list(session.queue), deque()
            for task in queued:
                if task.batch.shard in kept:
                    session.queue.append(task)
                else:
                    self.enqueue(task)
