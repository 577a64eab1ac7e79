"""SGD with momentum on a weight matrix, block by block: the one step the centralized reference
(`enshuffle.model`) and a node's resident state (`enshuffle.kernels`) both take.

    buf = momentum buf + g;  value += lr buf (rounded once to value's dtype)

with g given whole, or g = lhs^T dz formed block by block in the operands' dtype. Each block of
rows gets its gradient, momentum and step while it is in cache, so value and buf (megabytes,
beyond the caches) are read and written once each, not once per elementwise pass over a
whole-size temporary."""

from __future__ import annotations

import numpy as np

BLOCK_BYTES = 2 << 20  # float64 bytes of buf per block (128 rows at 2048 columns)


def block_rows(columns: int) -> int:
    """Rows per block: BLOCK_BYTES of a float64 buf, at least one row (a narrow matrix goes in
    one or a few blocks: no per-block calls to pay)."""
    return max(1, BLOCK_BYTES // (8 * max(columns, 1)))


def momentum_step(
    value: np.ndarray,
    buf: np.ndarray,
    lr: float,
    momentum: float,
    g: np.ndarray | None = None,
    lhs: np.ndarray | None = None,
    dz: np.ndarray | None = None,
) -> None:
    """One step of `value` (n, m) and its float64 momentum `buf`, in place, from `g` (n, m) or
    from lhs (b, n) and dz (b, m). From a given g each entry gets exactly the whole-matrix step's
    operations; from lhs and dz its gradient is the product of the same operands, block by block."""
    rows, block = value.shape[0], min(block_rows(value.shape[1]), value.shape[0])
    step = np.empty((block, value.shape[1]))
    part = None if g is not None else np.empty((block, value.shape[1]), np.result_type(lhs, dz))
    for lo in range(0, rows, block):
        hi = min(lo + block, rows)
        b, s = buf[lo:hi], step[: hi - lo]
        b *= momentum
        if g is not None:
            b += g[lo:hi]
        else:
            assert lhs is not None and dz is not None and part is not None
            b += np.matmul(lhs[:, lo:hi].T, dz, out=part[: hi - lo])
        np.multiply(b, lr, out=s)
        value[lo:hi] += s.astype(value.dtype, copy=False)
