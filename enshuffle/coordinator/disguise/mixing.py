"""The secret block-diagonal mixing every disguise uses: one class, each disguise its own constants.

A `Mixing` M of size K is block-diagonal with dense blocks of `group` (the last one smaller), each
block Q1 diag(d) Q2 with random orthogonal Q1, Q2 and d in [2^-spread, 2^spread], so a block's
condition number is at most 4^spread and M^-1 is exact up to rounding. The pixel share mixes its
static blocks with 32x32 blocks and spread 1 (pixel_share.py), a hidden layer's share its units
with 8x8 blocks and spread 1 (hidden_share.py), the resident bases w = M V with 32x32 blocks and
spread 1/2 (resident.py). Every block draws, in order, Q1's Gaussian matrix, Q2's and d, from the
generator it is given: a run's draw order does not depend on which disguise holds the mixing.

Applying M from the right to rows (x @ M, x @ M^T) is one batched product over the stacked
full blocks; from the left (M w, M^-1 w, M^T w, M^-T w) a product per block.
"""

from __future__ import annotations

import numpy as np


class Mixing:
    """A secret (K, K) block-diagonal matrix of dense `group` blocks Q1 diag(d) Q2, d in
    [2^-spread, 2^spread]; `identity`: the clear control, no mixing at all (draws nothing)."""

    def __init__(self, size: int, rng: np.random.Generator, group: int, spread: float, identity: bool = False):
        self.size = size
        self.group = group
        self.identity = identity  # the control's: applying it is a copy, not a product
        self.bounds = [(lo, min(lo + group, size)) for lo in range(0, size, group)]
        self.blocks: list[np.ndarray] = []
        self.inverses: list[np.ndarray] = []
        for lo, hi in self.bounds:
            g = hi - lo
            if identity:
                self.blocks.append(np.eye(g))
                self.inverses.append(np.eye(g))
                continue
            q1, _ = np.linalg.qr(rng.standard_normal((g, g)))
            q2, _ = np.linalg.qr(rng.standard_normal((g, g)))
            d = np.exp2(rng.uniform(-spread, spread, g))
            self.blocks.append((q1 * d) @ q2)
            self.inverses.append((q2.T / d) @ q1.T)
        self._stacks: dict = {}

    def _apply(self, mats: list[np.ndarray], w: np.ndarray) -> np.ndarray:
        if self.identity:
            return np.array(w, dtype=np.float64)
        out = np.empty(w.shape, dtype=np.float64)
        for (lo, hi), m in zip(self.bounds, mats):
            np.matmul(m, w[lo:hi], out=out[lo:hi])
        return out

    def left(self, w: np.ndarray) -> np.ndarray:
        """(K, m) -> M @ w."""
        return self._apply(self.blocks, w)

    def inverse_left(self, w: np.ndarray) -> np.ndarray:
        """(K, m) -> M^-1 @ w."""
        return self._apply(self.inverses, w)

    def transposed_left(self, w: np.ndarray) -> np.ndarray:
        """(K, m) -> M^T @ w."""
        return self._apply([m.T for m in self.blocks], w)

    def inverse_transposed_left(self, w: np.ndarray) -> np.ndarray:
        """(K, m) -> M^-T @ w: undoes a node's (x M)^T @ d = M^T (x^T d)."""
        return self._apply([m.T for m in self.inverses], w)

    def right(
        self,
        x: np.ndarray,
        dtype=np.float64,
        transposed: bool = False,
        out: np.ndarray | None = None,
        inverse: bool = False,
    ) -> np.ndarray:
        """(n, K) -> x @ M (x @ M^T with `transposed`, M^-1 with `inverse`): the full blocks as one
        batched product, in x's dtype when it is `dtype` (a float32 step's mixing costs float32
        arithmetic), else in float64 rounded once to `dtype`."""
        dtype = np.dtype(dtype)
        work = x.dtype if x.dtype == dtype and dtype in (np.float32, np.float64) else np.dtype(np.float64)
        if out is None:
            out = np.empty(x.shape, dtype=dtype)
        if self.identity:
            out[...] = x
            return out
        mats = self.inverses if inverse else self.blocks
        if (work, transposed, inverse) not in self._stacks:
            full = [m for (lo, hi), m in zip(self.bounds, mats) if hi - lo == self.bounds[0][1]]
            stack = np.stack(full) if full else np.zeros((0, 0, 0))
            self._stacks[work, transposed, inverse] = np.ascontiguousarray(
                stack.transpose(0, 2, 1) if transposed else stack, dtype=work
            )
        stack = self._stacks[work, transposed, inverse]
        count, g = stack.shape[0], stack.shape[1] if stack.size else 0
        n = x.shape[0]
        if count:
            blocks = x[:, : count * g].reshape(n, count, g).transpose(1, 0, 2)
            # a view of `out` (which may be a block of another array's columns), never a copy
            target = np.reshape(out[:, : count * g], (n, count, g), copy=False).transpose(1, 0, 2)
            if work == dtype:
                np.matmul(blocks, stack, out=target)
            else:
                target[...] = np.matmul(blocks.astype(work), stack)
        for lo, hi in self.bounds[count:]:
            m = mats[lo // self.bounds[0][1]]
            part = np.matmul(x[:, lo:hi].astype(work, copy=False), (m.T if transposed else m).astype(work))
            out[:, lo:hi] = part
        return out

    def dense(self) -> np.ndarray:
        out = np.zeros((self.size, self.size))
        for (lo, hi), m in zip(self.bounds, self.blocks):
            out[lo:hi, lo:hi] = m
        return out
