"""Exposure plans and disguises: which node gets which indices of an operation, and how its
operands are shuffled and scaled before they leave the coordinator.

For C = A @ B, (n, K) @ (K, m) -> (n, m), a *plan* splits one axis into balanced blocks, one
per node (the notebook's `exposures`, balanced instead of drawn at random). A *disguise* is
secret to the coordinator and new for every batch: sample rows permuted, output columns
permuted, the order inside the block permuted, and optionally every row, column and
contraction index scaled by a random power of two. Scaling by 2**e is exact in binary floating
point (barring overflow), so un-disguising returns exactly the node's partial product; only the
permuted order of additions inside the block differs from a centralized product.

Everything here is vectorized: a plan for the notebook's largest operation
(128x60000 @ 60000x784 over 7 nodes) takes well under a millisecond where the notebook's
per-pixel loops took 70 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import numpy as np

# Exponents are drawn from [-SCALE_RANGE, SCALE_RANGE]: factors 1/16..16, exact, and far from
# float32's overflow for any values a network here produces. They do not hide magnitudes: the
# audit's multiset match (docs/audit.md) tries each power of two and undoes every static scale
# of the shuffle control.
SCALE_RANGE = 4


def balanced_blocks(size: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split range(size) into k blocks whose sizes differ by at most one, members drawn at random.

    Each block's order is itself random (it is the contraction order a node will see).
    """
    perm = rng.permutation(size)
    return [block for block in np.array_split(perm, k)]


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def gather(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """x[rows][:, cols] as a new C-contiguous array: two `take`s (whole-row copies, then a
    gather inside each row) beat one 2-D fancy index by several times on large matrices.
    Whichever selection shrinks the array more goes first, so the second pass reads less."""
    if len(cols) * x.shape[0] < len(rows) * x.shape[1]:
        return np.take(np.take(x, cols, axis=1), rows, axis=0)
    return np.take(np.take(x, rows, axis=0), cols, axis=1)


@overload
def pow2(exponents: np.ndarray, dtype) -> np.ndarray: ...
@overload
def pow2(exponents: None, dtype) -> None: ...
def pow2(exponents: np.ndarray | None, dtype) -> np.ndarray | None:
    """2**exponents as `dtype` (exact)."""
    if exponents is None:
        return None
    return np.ldexp(np.ones(exponents.shape, dtype=dtype), exponents)


def random_exponents(size: int, rng: np.random.Generator, enabled: bool) -> np.ndarray | None:
    return rng.integers(-SCALE_RANGE, SCALE_RANGE + 1, size=size, dtype=np.int32) if enabled else None


@dataclass(frozen=True)
class Disguise:
    """One batch's secret: row order, column order and power-of-two scales of its result.

    The node returns R = diag(2**row_exp) P_rows C_s P_cols diag(2**col_exp); `undo` gives C_s.
    """

    rows: np.ndarray  # rows[i] = which original row the node's row i is
    cols: np.ndarray  # cols[j] = which original column the node's column j is
    row_exp: np.ndarray | None = None
    col_exp: np.ndarray | None = None

    def undo(self, result: np.ndarray) -> np.ndarray:
        """Node's (n, m) result -> the block in original row/column order, scales removed."""
        out = np.take(result, inverse_permutation(self.rows), axis=0)
        out = np.take(out, inverse_permutation(self.cols), axis=1)
        if self.row_exp is not None:
            out *= pow2(-self.row_exp[inverse_permutation(self.rows)], out.dtype)[:, None]
        if self.col_exp is not None:
            out *= pow2(-self.col_exp[inverse_permutation(self.cols)], out.dtype)[None, :]
        return out


def new_disguise(n: int, m: int, rng: np.random.Generator, scale_rows: bool, scale_cols: bool) -> Disguise:
    return Disguise(
        rows=rng.permutation(n),
        cols=rng.permutation(m),
        row_exp=random_exponents(n, rng, scale_rows),
        col_exp=random_exponents(m, rng, scale_cols),
    )


@dataclass(frozen=True)
class MatmulPlan:
    """A whole plan for one product split over its contraction axis, built in one go.

    `blocks[s]` are node s's contraction indices (in the order it sees them), `k_exp[s]` their
    power-of-two scales (A's columns times 2**e, B's rows times 2**-e cancel exactly), and
    `disguises[s]` the secret row/column order of its result.
    """

    shape: tuple[int, int, int]
    blocks: list[np.ndarray]
    k_exp: list[np.ndarray | None]
    disguises: list[Disguise]

    def exposures(self) -> np.ndarray:
        """(K,) node index of every contraction index: the notebook's `exposures`."""
        owner = np.empty(self.shape[1], dtype=np.int32)
        for s, block in enumerate(self.blocks):
            owner[block] = s
        return owner

    def operands(self, s: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Node s's disguised (n, K_s) and (K_s, m) operands."""
        d, block, k_exp = self.disguises[s], self.blocks[s], self.k_exp[s]
        a_s = gather(a, d.rows, block)
        b_s = gather(b, block, d.cols)
        if k_exp is not None:
            a_s *= pow2(k_exp, a_s.dtype)[None, :]
            b_s *= pow2(-k_exp, b_s.dtype)[:, None]
        if d.row_exp is not None:
            a_s *= pow2(d.row_exp, a_s.dtype)[:, None]
        if d.col_exp is not None:
            b_s *= pow2(d.col_exp, b_s.dtype)[None, :]
        return a_s, b_s

    def combine(self, results: list[np.ndarray]) -> np.ndarray:
        """Un-disguise every node's partial product and add them: k*n*m additions."""
        total = self.disguises[0].undo(results[0])
        for d, r in zip(self.disguises[1:], results[1:]):
            total += d.undo(r)
        return total


def build_matmul_plan(n: int, K: int, m: int, k: int, rng: np.random.Generator, scale: bool = True) -> MatmulPlan:
    """Plan for (n, K) @ (K, m) split over K into k balanced blocks, one disguise per block."""
    blocks = balanced_blocks(K, k, rng)
    return MatmulPlan(
        shape=(n, K, m),
        blocks=blocks,
        k_exp=[random_exponents(len(b), rng, scale) for b in blocks],
        disguises=[new_disguise(n, m, rng, scale, scale) for _ in blocks],
    )
