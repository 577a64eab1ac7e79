"""Cheap checks that a node's result is the product it was asked for (Freivalds' test).

A node may be faulty or malicious and return wrong numbers with a valid signature. For a
claimed C = A @ B the coordinator draws a Gaussian vector r and compares C @ r with
A @ (B @ r), in float64: a few matrix-vector products, about 1-2% of the product's cost. For a
product over a static operand S (rows `rows` of the node's image block) the right-hand side is
computed from S directly, without copying S[rows].

Floating point: the node's C carries rounding error; its effect on (C @ r)_i is bounded in
practice by about eps * sqrt(K) * |A_i| * |B|_F (a random walk over K products and over the
entries of r). The tolerance is that bound times a safety factor, computed from precomputed row
and column norms. 0/1 vectors would miss a single wrong entry half the time; Gaussian ones do not.

Elementwise results are spot-checked: a random sample of entries is recomputed here.
"""

from __future__ import annotations

import numpy as np

SAFETY = 1.0  # the bound eps*sqrt(K)*|A_i|*|B|_F is already >= 25x the worst honest error seen (tests/test_verify.py)
PROBES = 4  # independent Gaussian vectors: as cheap as one (the products are memory-bound), far fewer misses
SPOT_CHECKS = 64


class StaticNorms:
    """Row and column norms of a static block, computed once, for tolerances."""

    def __init__(self, static: np.ndarray):
        self.row = _row_norms(static)
        self.col = np.sqrt(np.einsum("ij,ij->j", static, static, dtype=np.float64))


def _row_norms(x: np.ndarray) -> np.ndarray:
    """|x_i| per row without the full-size temporary that np.linalg.norm(x, axis=1) makes."""
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def _tolerance(eps: float, k: int, left_norms: np.ndarray, right_norm: float) -> np.ndarray:
    return SAFETY * eps * np.sqrt(max(k, 1)) * left_norms * right_norm + np.finfo(np.float64).tiny


def check_matmul(c: np.ndarray, arrays: dict[str, np.ndarray], params: dict, rng: np.random.Generator,
                 static: np.ndarray | None = None, norms: StaticNorms | None = None) -> str | None:
    """None if C passes Freivalds' test, else a sentence saying what failed."""
    b = arrays["b"].astype(np.float64, copy=False)
    eps = float(np.finfo(c.dtype).eps)
    r = rng.standard_normal((b.shape[1], PROBES))
    br = b @ r
    b_norm = float(np.linalg.norm(b))
    transpose = bool(params.get("transpose_a"))
    if static is None:
        a = arrays["a"].astype(np.float64, copy=False)
        a = a.T if transpose else a
        rhs = a @ br
        left = _row_norms(a)
        k = a.shape[1]
    else:
        rows = arrays["rows"]
        s = static
        # Products with all of S stay in its own precision (promoting a float32 block to float64
        # would copy it); that rounding is within the tolerance (tests/test_verify.py).
        few = rows.shape[0] * 4 < s.shape[0]  # a mini-batch: copying its rows is cheaper than reading S
        if transpose:
            if few:
                picked = s[rows].astype(np.float64)
                rhs = picked.T @ br
                left = np.sqrt(np.einsum("ij,ij->j", picked, picked))
            else:
                # C = S[rows]^T @ B, so C @ r = S^T @ u with u[rows] = B @ r (bincount sums repeats).
                u = np.stack([np.bincount(rows, weights=br[:, j], minlength=s.shape[0]) for j in range(PROBES)],
                             axis=1).astype(s.dtype)
                rhs = (s.T @ u).astype(np.float64)
                left = norms.col if norms is not None else np.sqrt(np.einsum("ij,ij->j", s, s, dtype=np.float64))
            k = rows.shape[0]
        else:
            v = br.astype(s.dtype)
            if few:
                rhs = (s[rows] @ v).astype(np.float64)
            else:
                rhs = (s @ v).astype(np.float64)[rows]
            left = (norms.row if norms is not None else _row_norms(s))[rows]
            k = s.shape[1]
    lhs = c.astype(np.float64, copy=False) @ r
    tol = _tolerance(eps, k, left, b_norm)[:, None]
    off = np.abs(lhs - rhs) - tol
    bad = ~(off <= 0)  # NaN and inf count as off
    if np.any(bad):
        i, j = np.unravel_index(int(np.argmax(np.where(np.isnan(off), np.inf, off))), off.shape)
        return (f"Freivalds check failed at row {i}: C·r = {lhs[i, j]:.6g}, A·(B·r) = {rhs[i, j]:.6g}, "
                f"tolerance {tol[i, 0]:.3g} ({int(bad.any(axis=1).sum())} of {bad.shape[0]} rows off)")
    return None


def check_elementwise(op: str, c: np.ndarray, arrays: dict[str, np.ndarray], params: dict,
                      rng: np.random.Generator) -> str | None:
    """Recompute a random sample of entries; None if they agree to a few units in the last place."""
    from enshuffle.node.compute import compute_batch

    ref = arrays.get("a", arrays.get("b"))
    if c.shape != ref.shape:
        return f"result shape {c.shape} differs from the operand shape {ref.shape}"
    if c.size == 0:
        return None
    n = min(SPOT_CHECKS, c.size)
    flat = rng.choice(c.size, size=n, replace=False)
    i, j = np.unravel_index(flat, c.shape)
    sample = {name: np.ascontiguousarray(arr[i, j][None, :]) for name, arr in arrays.items()}
    expected = compute_batch(op, params, sample, {})[0]
    got = c[i, j]
    eps = np.finfo(c.dtype).eps
    tol = 8 * eps * np.maximum(np.abs(expected), np.finfo(c.dtype).tiny) + 8 * np.finfo(c.dtype).tiny
    bad = ~(np.abs(got.astype(np.float64) - expected.astype(np.float64)) <= tol)
    if np.any(bad):
        k = int(np.argmax(bad))
        return (f"spot check failed at ({int(i[k])}, {int(j[k])}): got {got[k]:.6g}, expected {expected[k]:.6g} "
                f"({int(bad.sum())} of {n} sampled entries off)")
    return None
