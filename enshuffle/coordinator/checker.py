"""Checking a node's result before it is used (docs/design.md, "Checking results").

`ResultChecker` is what the server asks about every RESULT whose shape and dtype are right:
Freivalds' test with tight rounding bounds on every product (`verify.check_matmul`, with each
static operand's norms and probes drawn once and cached), the probe check of a resident result
(the compute's own, `check_resident`), and, for keys the reputation does not trust yet, the
product recomputed here and compared entry by entry (adaptive replication, --replicate). It
never touches a socket or a session: it answers None (the result holds) or why it does not.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from enshuffle.coordinator.distributed import Batch
from enshuffle.coordinator.verify import StaticNorms, check_matmul, check_replica


class ResultChecker:
    """The checks of one run's results. `statics(shard)` gives a slot's static operands by name
    (the server's cache), `check_resident(batch, c)` a resident result's probe check, and
    `needs_replica(key)` whether a key's results are also recomputed here (with `replicate`)."""

    def __init__(
        self,
        statics: Callable[[int], dict[str, np.ndarray]],
        check_resident: Callable[[Batch, np.ndarray], str | None],
        *,
        verify: bool = True,
        replicate: bool = False,
        needs_replica: Callable[[bytes], bool] = lambda key: True,
        rng: np.random.Generator | None = None,
    ):
        self.statics = statics
        self.check_resident = check_resident
        self.verify = verify  # Freivalds' test on every result
        self.replicate = replicate  # also compute results of untrusted keys here and compare
        self.needs_replica = needs_replica
        self._rng = rng if rng is not None else np.random.default_rng()
        self._norms: dict[str, StaticNorms] = {}  # static name -> its norms and probes
        self.seconds = 0.0  # this thread's CPU in checks (what `enshuffle bench` reports)

    def prepare(self, shard: int) -> None:
        """Draw slot `shard`'s statics' norms and probes now (before the first node is welcomed),
        so checking later never silences the coordinator after a WELCOME."""
        for name, static in self.statics(shard).items():
            if name not in self._norms:
                self._norms[name] = StaticNorms(static, self._rng)
                self._norms[name].prepare()

    def check(self, batch: Batch, c: np.ndarray, key: bytes) -> str | None:
        """None if `c` (from node key `key`) holds as `batch`'s result, else why not."""
        started = time.thread_time()
        problem = self.check_result(batch, c) if self.verify else None
        if problem is None and self.replicate and self.needs_replica(key):
            problem = self.check_replica(batch, c)
        self.seconds += time.thread_time() - started
        return problem

    def check_replica(self, batch: Batch, c: np.ndarray) -> str | None:
        """Adaptive replication: recompute the product here (float64) and compare every entry."""
        name = batch.params.get("a_static")
        if batch.op != "matmul":  # a resident result's probe check needs no copy of the weights
            return None
        static = self.statics(batch.shard)[name] if name else None
        return check_replica(c, batch.arrays, batch.params, static)

    def check_result(self, batch: Batch, c: np.ndarray) -> str | None:
        """Freivalds' test with tight rounding bounds (enshuffle.coordinator.verify); only products are offloaded."""
        if batch.op == "resident":
            return self.check_resident(batch, c)
        if batch.op != "matmul":  # never sent (elementwise offload is retired): nothing could vouch for it
            return f"a {batch.op} result cannot be checked; only products are offloaded"
        name = batch.params.get("a_static")
        static = norms = None
        if name:
            static = self.statics(batch.shard)[name]
            norms = self._norms.get(name)
            if norms is None:
                norms = self._norms[name] = StaticNorms(static, self._rng)
        return check_matmul(c, batch.arrays, batch.params, self._rng, static, norms)
