"""What a node computes for one batch: a block product, or the resident first layer's update
and forward, nothing else.

The node never sees a plan or a disguise: it multiplies what it is given. What a batch's op and
params mean, its result's shape and its memory are `enshuffle.batch`'s (the vocabulary, which
mirrors docs/protocol.md section 11); this module computes it:

- ``matmul``: ``c = A @ b`` where ``A`` is the array ``a``, or rows ``rows`` of a static operand
  named ``a_static`` held since its STATIC message (transposed when ``transpose_a``).
- ``resident``: a slot's resident weights (`ResidentState`) brought to the batch's version, then
  ``S[rows] @ V`` (or the state itself).

A `Workspace` makes products cost their arithmetic and little else: the gathered rows of a
static operand, any intermediate and the result go into buffers reused from batch to batch
(no fresh multi-MB allocation, no page faults, per batch), and BLAS runs small products on one
thread (`enshuffle.blas.BlasThreads`). A result computed with a workspace lives in it until
the next batch computed with it: the daemon seals (encrypts, so copies) each result before it
computes the next. Without a workspace every result is a fresh array.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

from enshuffle.batch import BatchError, Matmul, Resident, parse
from enshuffle.momentum import momentum_step

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Workspace:
    """Reusable buffers for one node's batches, one per role ("gather", "scratch", "result").

    A buffer grows to the largest request seen and is then reused; the daemon keeps one per
    session, so it is freed with the session's statics. A batch uses at most two roles (gather or
    scratch, and result), and --max-memory bounds what one batch may ask (docs/protocol.md
    section 7); so that buffers kept from earlier, different batches do not add up past
    `limit`, a buffer that must grow first lets go of the roles the current batch has not used.
    Not thread-safe: one thread computes. `threads` (a BlasThreads) chooses the BLAS thread count
    per product; None leaves it alone.
    """

    def __init__(self, threads=None, limit: int | None = None) -> None:
        self.threads = threads
        self.limit = limit
        self._buffers: dict[str, np.ndarray] = {}
        self._used: set[str] = set()  # roles the current batch has taken

    def array(self, role: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous, aligned (shape, dtype) array on `role`'s buffer (contents undefined)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self._used.add(role)
        buf = self._buffers.get(role)
        if buf is None or buf.nbytes < nbytes:
            self._buffers.pop(role, None)  # let the old one go before the new one is allocated
            if self.limit is not None and self.nbytes + nbytes > self.limit:
                for other in set(self._buffers) - self._used:
                    del self._buffers[other]
            # float64 storage: numpy aligns the data for any itemsize we use (<= 8 bytes)
            buf = self._buffers[role] = np.empty(max(1, -(-nbytes // 8)), dtype=np.float64)
        return buf.view(np.uint8)[:nbytes].view(dtype).reshape(shape)

    def owns(self, array: np.ndarray) -> bool:
        """Is `array` a view on one of this workspace's buffers?"""
        return any(np.shares_memory(array, buf) for buf in self._buffers.values())

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes for buf in self._buffers.values())

    def release(self) -> None:
        self._buffers.clear()

    def before_product(self, work: int) -> None:
        """A new product of `work` multiply-adds starts: nothing of the last batch is in use."""
        self._used.clear()
        if self.threads is not None:
            self.threads.for_product(work)


def aligned(array: np.ndarray) -> np.ndarray:
    """`array` itself if numpy sees it aligned, else a read-only aligned copy.

    A payload from a sender that does not pad its header (docs/protocol.md section 3) sits
    wherever the header ended, at any byte offset. numpy hands BLAS only
    aligned operands and copies an unaligned one on every product: for a static read whole by a
    full-batch product that is a fresh 188 MB per batch. The daemon stores statics through this,
    so the copy happens once per session instead."""
    if array.flags.aligned:
        return array
    copy = np.array(array, order="C")
    copy.flags.writeable = False
    return copy


def _buffer(workspace: Workspace | None, role: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    if workspace is None:
        return np.empty(shape, dtype=dtype)
    return workspace.array(role, shape, dtype)


def _array(arrays: dict, name: str) -> np.ndarray:
    try:
        value = arrays[name]
    except KeyError:
        raise BatchError("bad-batch", f"missing array {name!r}") from None
    if value.ndim != 2 or value.dtype not in FLOAT_DTYPES:
        raise BatchError(
            "bad-batch", f"array {name!r} must be a 2-D float32/float64 matrix, got {value.dtype} {value.shape}"
        )
    return value


class ResidentState:
    """A node's resident weights for one slot (docs/protocol.md, "Resident weights"): V and its
    momentum buffer, float64, at `version` (the number of updates applied since the run began).

    Received as a STATIC with a "version" field: an array [V; buf] (2K, h). Updates are applied
    idempotently by version, so a batch that carries updates the node already has is harmless."""

    def __init__(self, array: np.ndarray, version: int):
        if array.ndim != 2 or array.shape[0] % 2 or array.dtype not in FLOAT_DTYPES:
            raise BatchError(
                "bad-batch", f"a resident state must be a (2K, h) float matrix, got {array.dtype} {array.shape}"
            )
        k = array.shape[0] // 2
        self.v = np.array(array[:k], dtype=np.float64)
        self.buf = np.array(array[k:], dtype=np.float64)
        self.version = int(version)

    @property
    def nbytes(self) -> int:
        return self.v.nbytes * 2

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of [V; buf] as its STATIC carried it (how `enshuffle.batch` knows a state)."""
        return 2 * self.v.shape[0], self.v.shape[1]

    @property
    def dtype(self) -> np.dtype:
        return self.v.dtype

    def apply(self, operand: np.ndarray, dz: np.ndarray, lr: float, momentum: float) -> None:
        """buf = momentum buf + operand^T dz; V += lr buf (operand: the update's rows (b, K)).

        Block by block (`enshuffle.momentum`): V and buf are read and written once each."""
        # float64, whatever the operand's dtype: the coordinator follows this recurrence in
        # float64 through its probes, so the node's state stays within float64 rounding of it
        o64 = operand.astype(np.float64, copy=False)
        d64 = dz.astype(np.float64, copy=False)
        momentum_step(self.v, self.buf, lr, momentum, lhs=o64, dz=d64)


def _apply(state: ResidentState, operand: np.ndarray, dz: np.ndarray, lr: float, momentum: float, version: int) -> None:
    """One carried update applied: the state steps and is then at `version`."""
    state.apply(operand, dz, lr, momentum)
    state.version = version


def _resident(spec: Resident, arrays: dict, statics: dict, states: dict, after: list | None = None) -> np.ndarray:
    """Bring the state to the batch's version (applying the carried updates it lacks), then return
    the forward (S[rows] @ V for a first-layer slot, a @ V for a hidden layer's), with `backward`
    dz @ V^T of the last carried update (V before it), or with `fetch` the state [V; buf] itself
    (docs/protocol.md, "Resident weights"). With `after`, a backward's own update is not applied
    here but left in `after` (a callable) for the caller to run once the result is on its way."""
    name, state_name = spec.a_static, spec.state
    state = states.get(state_name)
    static = None
    if name is not None:
        static = statics.get(name)
        if static is None:
            raise BatchError("unknown-static", f"no static operand {name!r} on this node")
    if state is None:
        raise BatchError("unknown-static", f"no resident state {state_name!r} on this node")
    start, version, backward = spec.start, spec.version, spec.backward
    if static is not None and (static.ndim != 2 or static.shape[1] != state.v.shape[0]):
        raise BatchError(
            "bad-batch", f"static {name!r} {static.shape} does not fit state {state_name!r} {state.v.shape}"
        )
    if state.version < start:
        raise BatchError(
            "state-behind", f"state {state_name!r} is at version {state.version}, the batch starts at {start}"
        )
    if state.version > version - (1 if backward else 0):
        raise BatchError(
            "state-ahead",
            f"state {state_name!r} is at version {state.version}, past the batch's "
            f"{version - 1 if backward else version}",
        )
    k, h = state.v.shape
    out = None
    if version > start:
        count = spec.updates
        dz = _array(arrays, "dz")
        if static is not None:
            urows = arrays.get("update_rows")
            if urows is None or urows.ndim != 2 or urows.dtype.kind not in "iu" or urows.shape[0] != count:
                raise BatchError("bad-batch", f"update_rows must be ({count}, b) integers")
            b = urows.shape[1]
            dtype = static.dtype
            if urows.size and (urows.min() < 0 or urows.max() >= static.shape[0]):
                raise BatchError("bad-batch", f"update rows out of range for static {name!r}")
        else:
            ua = _array(arrays, "update_a")
            b = ua.shape[0] // count
            dtype = ua.dtype
            if ua.shape != (count * b, k):
                raise BatchError("bad-batch", f"update_a must be {count} updates of (b, {k}), got {ua.shape}")
        if b == 0:
            raise BatchError("bad-batch", "an update needs at least one row")
        if dz.shape != (count * b, h) or dz.dtype != dtype:
            raise BatchError("bad-batch", f"dz must be {dtype} ({count * b}, {h}), got {dz.dtype} {dz.shape}")
        for j in range(state.version - start, count):  # one pass per update carried (not per row)
            d = dz[j * b : (j + 1) * b]
            if static is not None:
                assert urows is not None
                operand = np.take(static, urows[j], axis=0, mode="clip")
            else:
                operand = ua[j * b : (j + 1) * b]
            if backward and j == count - 1:  # the step's own delta through V before its update
                out = (d.astype(np.float64) @ state.v.T).astype(dtype, copy=False)
                if after is not None:  # the update waits until the result is sent
                    after.append(partial(_apply, state, operand, d, spec.lr[j], spec.momentum, start + j + 1))
                    break
            _apply(state, operand, d, spec.lr[j], spec.momentum, start + j + 1)
    if spec.fetch:
        return np.concatenate([state.v, state.buf])
    if backward:
        assert out is not None
        return out
    if static is None:
        a = _array(arrays, "a")
        if a.shape[1] != k:
            raise BatchError("bad-batch", f"a {a.shape} does not fit state {state_name!r} {state.v.shape}")
        return (a.astype(np.float64) @ state.v).astype(a.dtype, copy=False)
    rows = arrays.get("rows")
    if rows is None or rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise BatchError("bad-batch", "a resident forward needs a 1-D integer array 'rows'")
    if rows.size and (rows.min() < 0 or rows.max() >= static.shape[0]):
        raise BatchError("bad-batch", f"rows out of range for static {name!r} with {static.shape[0]} rows")
    # computed in float64 and rounded once to the static's dtype: the coordinator's probe check
    # then allows only that rounding, so a lie far below float32's own precision of a product fails
    y = np.take(static, rows, axis=0, mode="clip").astype(np.float64) @ state.v
    return y.astype(static.dtype, copy=False)


def _matmul(spec: Matmul, arrays: dict, statics: dict, workspace: Workspace | None) -> np.ndarray:
    b = _array(arrays, "b")
    name = spec.a_static
    if name is not None:
        static = statics.get(name)
        if static is None:
            raise BatchError("unknown-static", f"no static operand {name!r} on this node")
        if static.ndim != 2:
            raise BatchError("bad-batch", f"static {name!r} is not a matrix: shape {static.shape}")
        rows = arrays.get("rows")
        if rows is None or rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise BatchError("bad-batch", "a static matmul needs a 1-D integer array 'rows'")
        if rows.size and (rows.min() < 0 or rows.max() >= static.shape[0]):
            raise BatchError("bad-batch", f"rows out of range for static {name!r} with {static.shape[0]} rows")
        inner = rows.shape[0] if spec.transpose_a else static.shape[1]
        if inner != b.shape[0]:
            raise BatchError(
                "bad-batch", f"static {name!r} {static.shape} does not fit rows {rows.shape} and b {b.shape}"
            )
        if static.dtype != b.dtype:
            raise BatchError("bad-batch", f"static {name!r} is {static.dtype} but b is {b.dtype}")
        return _static_product(static, rows, b, spec.transpose_a, workspace)
    a = _array(arrays, "a")
    if spec.transpose_a:
        a = a.T
    if a.shape[1] != b.shape[0] or a.dtype != b.dtype:
        raise BatchError("bad-batch", f"cannot multiply {a.dtype}{a.shape} by {b.dtype}{b.shape}")
    if workspace is not None:
        workspace.before_product(a.shape[0] * a.shape[1] * b.shape[1])
    return np.matmul(a, b, out=_buffer(workspace, "result", (a.shape[0], b.shape[1]), b.dtype))


def compute_batch(
    op: str,
    params: dict,
    arrays: dict[str, np.ndarray],
    statics: dict[str, np.ndarray],
    workspace: Workspace | None = None,
    states: dict | None = None,
    after: list | None = None,
) -> np.ndarray:
    """Compute one batch; raises BatchError for anything malformed (never a bare exception).

    With `workspace`, a product's result is a view on the workspace's buffer, valid until the
    next batch computed with it. `states`: the node's resident states by name (op "resident").
    `after`: a list where work that may wait until the result is sent is left, as callables
    (a resident backward's own update: the node replies first and steps V meanwhile); the
    caller runs them before its next batch. Without it everything is done before returning."""
    spec = parse(op, params)
    if isinstance(spec, Resident):
        return _resident(spec, arrays, statics, states or {}, after)
    return _matmul(spec, arrays, statics, workspace)


def _is_permutation(rows: np.ndarray, n: int) -> bool:
    return rows.shape[0] == n and bool(np.all(np.bincount(rows, minlength=n) == 1))


def _inverse(rows: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(rows)
    inverse[rows] = np.arange(rows.shape[0], dtype=rows.dtype)
    return inverse


def _static_product(
    static: np.ndarray, rows: np.ndarray, b: np.ndarray, transpose: bool, workspace: Workspace | None = None
) -> np.ndarray:
    """static[rows] @ b, or static[rows].T @ b, into the workspace's buffers when there is one.

    When rows is a full permutation (full-batch training) the static operand is neither copied
    nor gathered: permuting the small side is equivalent, and BLAS reads the static in place.
    `rows` has been checked to lie in range, so the gathers skip numpy's bounds handling
    (mode="clip" writes straight into `out`; "raise" would go through a temporary copy)."""
    n, k = static.shape
    m = b.shape[1]
    if workspace is not None:
        workspace.before_product(rows.shape[0] * k * m)
    if _is_permutation(rows, n):
        if transpose:
            # S[rows].T @ b == S.T @ b[inverse]
            permuted = _buffer(workspace, "scratch", b.shape, b.dtype)
            np.take(b, _inverse(rows), axis=0, out=permuted, mode="clip")
            return np.matmul(static.T, permuted, out=_buffer(workspace, "result", (k, m), b.dtype))
        # S[rows] @ b == (S @ b)[rows]
        product = np.matmul(static, b, out=_buffer(workspace, "scratch", (n, m), b.dtype))
        return np.take(product, rows, axis=0, out=_buffer(workspace, "result", (n, m), b.dtype), mode="clip")
    gathered = np.take(
        static, rows, axis=0, out=_buffer(workspace, "gather", (rows.shape[0], k), static.dtype), mode="clip"
    )
    out = _buffer(workspace, "result", (k if transpose else rows.shape[0], m), b.dtype)
    return np.matmul(gathered.T if transpose else gathered, b, out=out)
