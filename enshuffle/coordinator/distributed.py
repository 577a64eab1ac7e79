"""The network's operations as disguised batches: the coordinator side of distribution.

`DistributedCompute` offers the same methods as `enshuffle.model.LocalCompute`, so the one
training step in `enshuffle.model` runs unchanged. Each call builds one batch per *shard*
(a node's slot), hands the batches to an executor (in-process, or ZeroMQ nodes), then
un-disguises and adds (or places) the results.

How each operation is split, and why (see docs/design.md for the full argument):

| call   | product                | split along             | node s receives                      | result      |
|--------|------------------------|-------------------------|--------------------------------------|-------------|
| x_w1   | X (b,784) @ w1         | pixels P_s (contraction)| rows of its static image block, w1[P_s] | summed    |
| a1_w2  | a1 (b,128) @ w2        | hidden H_s (contraction)| a1[:, H_s], w2[H_s]                  | summed      |
| dw2    | a1^T @ dz2 -> (128,10) | hidden H_s (output rows)| a1[:, H_s], dz2                      | rows H_s    |
| da1    | dz2 @ w2^T -> (b,128)  | hidden H_s (output cols)| dz2, w2[H_s]                         | cols H_s    |
| dw1    | X^T @ dz1 -> (784,128) | pixels P_s (output rows)| rows of its static image block, dz1  | rows P_s    |

Splitting every operation along the same two fixed partitions (pixels P, hidden units H) is
what bounds exposure: node s only ever holds pixel block P_s of the images, rows P_s of w1 and
rows H_s of w2, about 1/k of each. Splitting dw1 over its contraction axis (samples) instead
would hand every node whole images. The price is that every node sees the step's backward
deltas dz1 and dz2 (disguised); the ledger says so.

Static operands: node s keeps its image block X[σ_s][:, P_s] · 2**e_s (rows in a secret order
σ_s, pixel columns in a secret order and scaled) for the whole run; each step sends only row
indices into it, so per-step traffic is the node's share of weights and activations plus its
partial result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from enshuffle.coordinator.ledger import GRADIENT_CLASS_OFFSET, ExposureLedger
from enshuffle.coordinator.plan import (Disguise, MatmulPlan, balanced_blocks, gather, inverse_permutation,
                                        new_disguise, pow2, random_exponents)
from enshuffle.model import CLASSES, HIDDEN, INPUTS


@dataclass
class Batch:
    """One unit of work for one shard. `exposure` is what the receiving node learns."""

    shard: int
    op: str
    params: dict
    arrays: dict[str, np.ndarray]
    exposure: list[tuple[str, np.ndarray]] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class Executor(Protocol):
    def run(self, batches: list[Batch]) -> list[np.ndarray]:
        """Compute every batch (on whichever node holds its shard) and return the results in order."""

    def step_done(self) -> None:
        """A step boundary: where membership changes may take effect."""


@dataclass
class ShardStatics:
    """Node slot s's static image blocks and the secrets to address them."""

    pixels: np.ndarray  # P_s, in the column order the node holds them
    pixel_exp: np.ndarray | None  # static power-of-two scale of each of those columns
    row_order: dict[str, np.ndarray]  # which -> σ_s: node row i is original row σ_s[i]
    row_index: dict[str, np.ndarray]  # which -> σ_s^-1: original row r is node row σ_s^-1[r]

    def arrays(self, images: dict[str, np.ndarray], shard: int) -> dict[str, np.ndarray]:
        """The STATIC operands for this slot: name -> (rows, |P_s|) disguised image block."""
        out = {}
        for which, x in images.items():
            block = gather(x, self.row_order[which], self.pixels)
            if self.pixel_exp is not None:
                block *= pow2(self.pixel_exp, block.dtype)[None, :]
            out[static_name(which, shard)] = block
        return out


def static_name(which: str, shard: int) -> str:
    return f"{which}.{shard}"


class DistributedCompute:
    """The model's Compute interface, executed as disguised batches on k shards.

    `offload` is "matmul" (elementwise operations stay here: they cost as much to ship as to
    compute) or "all" (sigmoid, sub, square and mul go to nodes too, split by columns).
    """

    def __init__(self, images: dict[str, np.ndarray], shards: int, rng: np.random.Generator,
                 executor_factory: Callable[["DistributedCompute"], Executor], *, offload: str = "matmul",
                 scale: bool = True, ledger: ExposureLedger | None = None,
                 disguise_rng: np.random.Generator | None = None):
        if shards < 1:
            raise ValueError("need at least one shard")
        self.images = images
        self.k = shards
        # Two secrets: `rng` draws the run's partitions and static disguises (a resumed run must
        # draw the same ones, so the coordinator seeds it from a secret kept in the run dir);
        # per-batch disguises come from fresh OS entropy unless a test passes its own generator.
        # Neither may come from a public seed: a node could replay the draws and undo them.
        self.rng = disguise_rng if disguise_rng is not None else np.random.default_rng()
        self.offload = offload
        self.scale = scale
        self.ledger = ledger if ledger is not None else ExposureLedger()
        self.pixel_blocks = balanced_blocks(INPUTS, shards, rng)
        self.hidden_blocks = balanced_blocks(HIDDEN, shards, rng)
        self.class_blocks = balanced_blocks(CLASSES, shards, rng)
        self.statics = [
            ShardStatics(
                pixels=p,
                pixel_exp=random_exponents(len(p), rng, scale),
                row_order={w: rng.permutation(x.shape[0]) for w, x in images.items()},
                row_index={},
            )
            for p in self.pixel_blocks
        ]
        for st in self.statics:
            st.row_index = {w: inverse_permutation(order) for w, order in st.row_order.items()}
        self.executor = executor_factory(self)

    # -- static operands -------------------------------------------------------------
    def static_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """What a node serving `shard` must hold before it can compute that shard's batches."""
        return self.statics[shard].arrays(self.images, shard)

    def static_exposure(self, shard: int) -> list[tuple[str, np.ndarray]]:
        return [("images", self.pixel_blocks[shard])]

    def _rows(self, which: str, idx: np.ndarray | None) -> np.ndarray:
        return np.arange(self.images[which].shape[0]) if idx is None else np.asarray(idx)

    # -- matrix products -------------------------------------------------------------
    def x_w1(self, which: str, idx, w1: np.ndarray) -> np.ndarray:
        """X[idx] @ w1, contraction over pixels: each shard multiplies its static image block."""
        idx = self._rows(which, idx)
        batches, disguises = [], []
        for s, st in enumerate(self.statics):
            d = Disguise(rows=self.rng.permutation(idx.shape[0]), cols=self.rng.permutation(HIDDEN),
                         col_exp=random_exponents(HIDDEN, self.rng, self.scale))
            b = gather(w1, st.pixels, d.cols)
            if st.pixel_exp is not None:
                b *= pow2(-st.pixel_exp, b.dtype)[:, None]
            if d.col_exp is not None:
                b *= pow2(d.col_exp, b.dtype)[None, :]
            rows = st.row_index[which][idx[d.rows]]
            batches.append(Batch(s, "matmul", {"a_static": static_name(which, s), "transpose_a": False},
                                 {"rows": rows, "b": b}, [("w1", st.pixels)]))
            disguises.append(d)
        results = self.executor.run(batches)
        total = disguises[0].undo(results[0])
        for d, r in zip(disguises[1:], results[1:]):
            total += d.undo(r)
        return total

    def a1_w2(self, a1: np.ndarray, w2: np.ndarray) -> np.ndarray:
        """a1 @ w2, contraction over hidden units H_s."""
        plan = MatmulPlan(
            shape=(a1.shape[0], HIDDEN, w2.shape[1]),
            blocks=[self.rng.permutation(h) for h in self.hidden_blocks],
            k_exp=[random_exponents(len(h), self.rng, self.scale) for h in self.hidden_blocks],
            disguises=[new_disguise(a1.shape[0], w2.shape[1], self.rng, False, self.scale)
                       for _ in self.hidden_blocks],
        )
        batches = []
        for s, h in enumerate(self.hidden_blocks):
            a_s, b_s = plan.operands(s, a1, w2)
            batches.append(Batch(s, "matmul", {"a_static": None, "transpose_a": False}, {"a": a_s, "b": b_s},
                                 [("activations", h), ("w2", h)]))
        return plan.combine(self.executor.run(batches))

    def _output_block(self, a: np.ndarray, b: np.ndarray) -> tuple[MatmulPlan, dict[str, np.ndarray]]:
        """One node computes the whole (n,K)@(K,m) block a @ b, disguised (k=1 plan)."""
        plan = MatmulPlan(shape=(a.shape[0], a.shape[1], b.shape[1]), blocks=[self.rng.permutation(a.shape[1])],
                          k_exp=[random_exponents(a.shape[1], self.rng, self.scale)],
                          disguises=[new_disguise(a.shape[0], b.shape[1], self.rng, False, self.scale)])
        a_s, b_s = plan.operands(0, a, b)
        return plan, {"a": a_s, "b": b_s}

    def dw2(self, a1: np.ndarray, dz2: np.ndarray) -> np.ndarray:
        """a1^T @ dz2 -> (128, 10); shard s computes rows H_s."""
        batches, finish = self._prepare_dw2(a1, dz2)
        return finish(self.executor.run(batches))

    def da1(self, dz2: np.ndarray, w2: np.ndarray) -> np.ndarray:
        """dz2 @ w2^T -> (b, 128); shard s computes columns H_s."""
        batches, finish = self._prepare_da1(dz2, w2)
        return finish(self.executor.run(batches))

    def dw2_da1(self, a1: np.ndarray, dz2: np.ndarray, w2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both products that need only dz2, in one round trip (each node holds two batches)."""
        batches_w, finish_w = self._prepare_dw2(a1, dz2)
        batches_a, finish_a = self._prepare_da1(dz2, w2)
        results = self.executor.run(batches_w + batches_a)
        return finish_w(results[:len(batches_w)]), finish_a(results[len(batches_w):])

    def _prepare_dw2(self, a1: np.ndarray, dz2: np.ndarray):
        """The node gets a1's block in (samples, units) layout and transposes it itself
        (transpose_a), so no transposed copy is made here."""
        n, m = dz2.shape
        disguises, batches = [], []
        every_class = GRADIENT_CLASS_OFFSET + np.arange(CLASSES)
        for s, h in enumerate(self.hidden_blocks):
            order = self.rng.permutation(n)  # contraction (sample) order
            d = Disguise(rows=self.rng.permutation(len(h)), cols=self.rng.permutation(m),
                         col_exp=random_exponents(m, self.rng, self.scale))
            a = gather(a1, order, h[d.rows])
            b = gather(dz2, order, d.cols)
            k_exp = random_exponents(n, self.rng, self.scale)
            if k_exp is not None:
                a *= pow2(k_exp, a.dtype)[:, None]
                b *= pow2(-k_exp, b.dtype)[:, None]
                b *= pow2(d.col_exp, b.dtype)[None, :]
            disguises.append(d)
            batches.append(Batch(s, "matmul", {"a_static": None, "transpose_a": True}, {"a": a, "b": b},
                                 [("activations", h), ("gradients", every_class)]))

        def finish(results):
            out = np.empty((HIDDEN, m), dtype=dz2.dtype)
            for h, d, r in zip(self.hidden_blocks, disguises, results):
                out[h] = d.undo(r)
            return out
        return batches, finish

    def _prepare_da1(self, dz2: np.ndarray, w2: np.ndarray):
        plans, batches = [], []
        every_class = GRADIENT_CLASS_OFFSET + np.arange(CLASSES)
        for s, h in enumerate(self.hidden_blocks):
            plan, arrays = self._output_block(dz2, w2[h].T)
            plans.append(plan)
            batches.append(Batch(s, "matmul", {"a_static": None, "transpose_a": False}, arrays,
                                 [("w2", h), ("gradients", every_class)]))

        def finish(results):
            out = np.empty((dz2.shape[0], HIDDEN), dtype=dz2.dtype)
            for h, plan, r in zip(self.hidden_blocks, plans, results):
                out[:, h] = plan.combine([r])
            return out
        return batches, finish

    def dw1(self, idx, dz1: np.ndarray) -> np.ndarray:
        """X[idx]^T @ dz1 -> (784, 128); shard s computes rows P_s from its static block."""
        idx = self._rows("train", idx)
        out = np.empty((INPUTS, HIDDEN), dtype=dz1.dtype)
        batches, disguises = [], []
        every_unit = np.arange(HIDDEN)
        for s, st in enumerate(self.statics):
            order = self.rng.permutation(idx.shape[0])  # the contraction (sample) order
            d = Disguise(rows=np.arange(len(st.pixels)), cols=self.rng.permutation(HIDDEN),
                         row_exp=st.pixel_exp, col_exp=random_exponents(HIDDEN, self.rng, self.scale))
            b = gather(dz1, order, d.cols)
            if d.col_exp is not None:
                b *= pow2(d.col_exp, b.dtype)[None, :]
            rows = st.row_index["train"][idx[order]]
            batches.append(Batch(s, "matmul", {"a_static": static_name("train", s), "transpose_a": True},
                                 {"rows": rows, "b": b}, [("gradients", every_unit)]))
            disguises.append(d)
        for st, d, r in zip(self.statics, disguises, self.executor.run(batches)):
            out[st.pixels] = d.undo(r)
        return out

    # -- elementwise operations ------------------------------------------------------
    def _elementwise(self, op: str, a, b, tensor: str) -> np.ndarray:
        ref = b if a is None or np.isscalar(a) else a
        width = ref.shape[1]
        blocks = self.hidden_blocks if width == HIDDEN else self.class_blocks
        offset = GRADIENT_CLASS_OFFSET if (tensor == "gradients" and width == CLASSES) else 0
        out = np.empty(ref.shape, dtype=ref.dtype)
        batches, disguises, used = [], [], []
        for s, cols in enumerate(blocks):
            if len(cols) == 0:
                continue
            d = Disguise(rows=self.rng.permutation(ref.shape[0]), cols=self.rng.permutation(len(cols)))
            place = cols[d.cols]
            arrays, params = {}, {}
            if a is not None and np.isscalar(a):
                params["a_scalar"] = float(a)
            elif a is not None:
                arrays["a"] = gather(a, d.rows, place)
            if b is not None:
                arrays["b"] = gather(b, d.rows, place)
            exposure = [(tensor, cols + offset)]
            if op == "sub" and tensor == "labels":
                exposure = [("outputs", cols), ("labels", cols)]
            batches.append(Batch(s, op, params, arrays, exposure))
            disguises.append(d)
            used.append(cols)
        for cols, d, r in zip(used, disguises, self.executor.run(batches)):
            out[:, cols] = d.undo(r)
        return out

    def sigmoid(self, z, tensor="activations"):
        if self.offload != "all":
            from enshuffle.model import sigmoid
            return sigmoid(z)
        return self._elementwise("sigmoid", z, None, tensor)

    def sub(self, a, b, tensor="activations"):
        if self.offload != "all":
            return a - b
        return self._elementwise("sub", a, b, tensor)

    def square(self, a, tensor="activations"):
        if self.offload != "all":
            return a * a
        return self._elementwise("square", a, None, tensor)

    def mul(self, a, b, tensor="activations"):
        if self.offload != "all":
            return a * b
        return self._elementwise("mul", a, b, tensor)

    def step_done(self) -> None:
        self.executor.step_done()


class InProcessExecutor:
    """Runs every shard's batches in this process through the node's own compute function.

    One simulated node per shard, named node-1..node-k; each holds its shard's static operands,
    exactly what a networked node would receive in STATIC messages.
    """

    def __init__(self, compute: DistributedCompute):
        from enshuffle.node.compute import compute_batch

        self._compute_batch = compute_batch
        self.ledger = compute.ledger
        self.names = [f"node-{s + 1}" for s in range(compute.k)]
        self.statics: list[dict[str, np.ndarray]] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.batches = 0
        for s, name in enumerate(self.names):
            arrays = compute.static_arrays(s)
            self.statics.append(arrays)
            self.ledger.record(name, compute.static_exposure(s))
            self.bytes_sent += sum(a.nbytes for a in arrays.values())

    def run(self, batches: list[Batch]) -> list[np.ndarray]:
        results = []
        for batch in batches:
            self.ledger.record(self.names[batch.shard], batch.exposure)
            self.bytes_sent += batch.nbytes()
            result = self._compute_batch(batch.op, batch.params, batch.arrays, self.statics[batch.shard])
            self.bytes_received += result.nbytes
            self.batches += 1
            results.append(result)
        return results

    def step_done(self) -> None:
        pass
