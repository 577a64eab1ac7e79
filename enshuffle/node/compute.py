"""What a node computes for one batch: a block product or an elementwise operation, nothing else.

The node never sees a plan or a disguise: it multiplies what it is given. The vocabulary
mirrors docs/protocol.md ("op" and "params" of a BATCH):

- ``matmul``: ``c = A @ b`` where ``A`` is the array ``a``, or rows ``rows`` of a static operand
  named ``params["a_static"]`` held since its STATIC message (transposed when
  ``params["transpose_a"]``).
- ``sigmoid(a)``, ``sub(a, b)`` (``a`` may be the scalar ``params["a_scalar"]``), ``square(a)``,
  ``mul(a, b)``: elementwise, ``c`` has ``a``'s shape.
"""

from __future__ import annotations

import numpy as np

from enshuffle.model import sigmoid

OPS = ("matmul", "sigmoid", "sub", "square", "mul")
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class BatchError(Exception):
    """A batch this node cannot compute; `code` is the REJECT reason sent back."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def _array(arrays: dict, name: str) -> np.ndarray:
    try:
        value = arrays[name]
    except KeyError:
        raise BatchError("bad-batch", f"missing array {name!r}") from None
    if value.ndim != 2 or value.dtype not in FLOAT_DTYPES:
        raise BatchError("bad-batch", f"array {name!r} must be a 2-D float32/float64 matrix, got {value.dtype} {value.shape}")
    return value


def compute_batch(op: str, params: dict, arrays: dict[str, np.ndarray], statics: dict[str, np.ndarray]) -> np.ndarray:
    """Compute one batch; raises BatchError for anything malformed (never a bare exception)."""
    if op == "matmul":
        b = _array(arrays, "b")
        name = params.get("a_static")
        if name is not None:
            static = statics.get(name)
            if static is None:
                raise BatchError("unknown-static", f"no static operand {name!r} on this node")
            rows = arrays.get("rows")
            if rows is None or rows.ndim != 1 or rows.dtype.kind not in "iu":
                raise BatchError("bad-batch", "a static matmul needs a 1-D integer array 'rows'")
            if rows.size and (rows.min() < 0 or rows.max() >= static.shape[0]):
                raise BatchError("bad-batch", f"rows out of range for static {name!r} with {static.shape[0]} rows")
            inner = rows.shape[0] if params.get("transpose_a") else static.shape[1]
            if inner != b.shape[0]:
                raise BatchError("bad-batch", f"static {name!r} {static.shape} does not fit rows {rows.shape} and b {b.shape}")
            if static.dtype != b.dtype:
                raise BatchError("bad-batch", f"static {name!r} is {static.dtype} but b is {b.dtype}")
            return _static_product(static, rows, b, bool(params.get("transpose_a")))
        else:
            a = _array(arrays, "a")
            if params.get("transpose_a"):
                a = a.T
        if a.shape[1] != b.shape[0] or a.dtype != b.dtype:
            raise BatchError("bad-batch", f"cannot multiply {a.dtype}{a.shape} by {b.dtype}{b.shape}")
        return a @ b
    if op == "sigmoid":
        return sigmoid(_array(arrays, "a"))
    if op == "square":
        a = _array(arrays, "a")
        return a * a
    if op in ("sub", "mul"):
        b = _array(arrays, "b")
        if "a_scalar" in params:
            a = b.dtype.type(float(params["a_scalar"]))
        else:
            a = _array(arrays, "a")
            if a.shape != b.shape or a.dtype != b.dtype:
                raise BatchError("bad-batch", f"elementwise {op} of {a.dtype}{a.shape} and {b.dtype}{b.shape}")
        return a - b if op == "sub" else a * b
    raise BatchError("unknown-op", f"op {op!r} is not one of {', '.join(OPS)}")


def _is_permutation(rows: np.ndarray, n: int) -> bool:
    return rows.shape[0] == n and bool(np.all(np.bincount(rows, minlength=n) == 1))


def _static_product(static: np.ndarray, rows: np.ndarray, b: np.ndarray, transpose: bool) -> np.ndarray:
    """static[rows] @ b, or static[rows].T @ b, without copying the static operand when rows
    is a full permutation (full-batch training): permuting the small side is equivalent."""
    if _is_permutation(rows, static.shape[0]):
        if transpose:
            inverse = np.empty_like(rows)
            inverse[rows] = np.arange(rows.shape[0], dtype=rows.dtype)
            return static.T @ b[inverse]
        return (static @ b)[rows]
    a = static[rows]
    return a.T @ b if transpose else a @ b
