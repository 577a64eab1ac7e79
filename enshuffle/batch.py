"""The batch vocabulary: what a BATCH's `op`, `params` and arrays mean (docs/protocol.md section 11).

The one place that interprets a batch. The coordinator splits large products and checks
results with it, the server sizes each result and lease with it, the node sizes and describes
what it computes with it, and `enshuffle.kernels` computes from its typed params. Per op:

- typed params: `Matmul` and `Resident`, from a header's `params` by `parse` (a `BatchError` for
  params that break the spec); every function below takes either;
- `result_shape` and `result_dtype`: what the RESULT's array `c` must be;
- `work`: multiply-adds, what leases scale with;
- `memory`: the bytes a node allocates for the batch, from the header's shapes alone (docs/protocol.md
  section 7), checked against --max-memory before anything is allocated;
- `describe`: one line for logs and the node's console;
- `split` and `combine`: a product too large for one batch as several batches of whole rows (or
  column groups) and their results put back together (docs/protocol.md section 7).

Operands a batch names (`a_static`, `state`) are looked up in `held`: what the node holds under
each name, known here only by the shape and dtype its STATIC carried (a resident state by its
[V; buf], (2K, h) float64). numpy arrays fit, and so does the node's `kernels.ResidentState`.

This module imports nothing of enshuffle: it is the bottom of the package, beside enshuffle.errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

OPS = ("matmul", "resident")  # the spec's Operations table, one to one

Groups = list[tuple[str | None, int]]  # how split pieces' results combine: (how, count) per column group


class BatchError(Exception):
    """A batch this node cannot compute; `code` is the REJECT reason sent back (the node maps
    "bad-batch" to `bad-params`, "unknown-op" to `bad-op`)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Matmul:
    """`matmul`: c = A @ b, where A is the array `a`, or rows `rows` of the static operand
    `a_static`; transposed when `transpose_a`."""

    a_static: str | None = None
    transpose_a: bool = False

    @classmethod
    def parse(cls, params: Mapping) -> "Matmul":
        name = params.get("a_static")
        if name is not None and not isinstance(name, str):
            raise BatchError("bad-batch", f"a_static must be a name or null, got {name!r:.40}")
        return cls(a_static=name, transpose_a=bool(params.get("transpose_a")))

    def dims(self, arrays: Mapping[str, Any], static_shape: tuple[int, ...] | None = None) -> tuple[int, int, int]:
        """(n, k, m): the product C (n, m) = A (n, k) @ b (k, m). `static_shape`: the shape of the
        static operand whose rows `rows` are A (None: A is the array `a`)."""
        m = arrays["b"].shape[1]
        if static_shape is not None:
            rows = arrays["rows"].shape[0]
            return (static_shape[1], rows, m) if self.transpose_a else (rows, static_shape[1], m)
        n, k = arrays["a"].shape
        return (k, n, m) if self.transpose_a else (n, k, m)


@dataclass(frozen=True)
class Resident:
    """`resident`: bring the state `state` (V and its momentum buffer) from version `start` (the
    header's `from`) to `version`, applying one update per entry of `lr`, then return the forward
    (S[rows] @ V for a first-layer slot, whose static S is `a_static`; a @ V for a hidden layer's,
    `a_static` null), with `backward` dz @ V^T of the last carried update, or with `fetch` the
    state [V; buf] itself (docs/protocol.md, "Resident weights")."""

    a_static: str | None
    state: str
    start: int
    version: int
    lr: tuple[float, ...]
    momentum: float
    fetch: bool = False
    backward: bool = False

    @property
    def updates(self) -> int:
        return self.version - self.start

    @classmethod
    def parse(cls, params: Mapping) -> "Resident":
        name, state = params.get("a_static"), params.get("state")
        if (name is not None and not isinstance(name, str)) or not isinstance(state, str):
            raise BatchError("bad-batch", "a resident batch names its state (state) and its static (a_static) or null")
        start, version = params.get("from"), params.get("version")
        lrs, momentum = params.get("lr"), params.get("momentum")
        if (
            not (isinstance(start, int) and isinstance(version, int))
            or isinstance(start, bool)
            or isinstance(version, bool)
            or not 0 <= start <= version
        ):
            raise BatchError("bad-batch", "a resident batch needs integer versions 0 <= from <= version")
        if (
            not isinstance(lrs, list)
            or len(lrs) != version - start
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*lrs, momentum])
        ):
            raise BatchError("bad-batch", "a resident batch needs one finite lr per update and a finite momentum")
        fetch, backward = bool(params.get("fetch")), bool(params.get("backward"))
        if backward and (name is not None or fetch or version == start):
            raise BatchError("bad-batch", "a backward resident batch carries its own update, of a hidden layer's state")
        try:
            rates, mu = tuple(float(v) for v in lrs), float(momentum)  # type: ignore[arg-type]
        except (OverflowError, ValueError, TypeError):
            raise BatchError("bad-batch", "lr and momentum must be finite numbers") from None
        if not all(math.isfinite(v) for v in [*rates, mu]):
            raise BatchError("bad-batch", "lr and momentum must be finite numbers")
        return cls(
            a_static=name,
            state=state,
            start=start,
            version=version,
            lr=rates,
            momentum=mu,
            fetch=fetch,
            backward=backward,
        )

    def sizes(self, arrays: Mapping[str, Any], held: Mapping[str, Any]) -> tuple[int, int, int, int]:
        """(n, K, h, b): rows of the result (a forward's, or a backward's delta; 0 for a fetch),
        the state's V (K, h), and rows per carried update."""
        two_k, h = held[self.state].shape
        k = two_k // 2
        if self.a_static is not None:  # a first-layer slot: rows of its static
            rows, urows = arrays.get("rows"), arrays.get("update_rows")
            n = rows.shape[0] if rows is not None and rows.ndim == 1 else 0
            b = urows.shape[1] if self.updates and urows is not None and urows.ndim == 2 else 0
        else:  # a hidden layer's: its operands come with the batch
            dz, a = arrays.get("dz"), arrays.get("a")
            b = dz.shape[0] // self.updates if self.updates and dz is not None and dz.ndim == 2 else 0
            n = b if self.backward else (a.shape[0] if a is not None and a.ndim == 2 else 0)
        return (0 if self.fetch else n), k, h, b


Params = Matmul | Resident
_TYPED: dict[str, type[Matmul] | type[Resident]] = {"matmul": Matmul, "resident": Resident}


def parse(op: str, params: Mapping | Params) -> Params:
    """The typed params of a batch of `op`; BatchError for an op not in OPS or params that break the spec.

    Typed params of `op` come back as they are: every function here takes a header's `params` or
    what `parse` made of them, so a caller that holds a batch's typed params parses them once."""
    typed = _TYPED.get(op)
    if typed is None:
        raise BatchError("unknown-op", f"op {op!r} is not one of {', '.join(OPS)}")
    if isinstance(params, (Matmul, Resident)):
        if type(params) is not typed:
            raise BatchError("bad-batch", f"{type(params).__name__} params for op {op!r}")
        return params
    return typed.parse(params)


def _static_shape(spec: Matmul, held: Mapping[str, Any]) -> tuple[int, ...] | None:
    return None if spec.a_static is None else tuple(held[spec.a_static].shape)


def result_shape(
    op: str, params: Mapping | Params, arrays: Mapping[str, Any], held: Mapping[str, Any]
) -> tuple[int, int]:
    """The shape of the RESULT's `c`."""
    spec = parse(op, params)
    if isinstance(spec, Matmul):
        n, _, m = spec.dims(arrays, _static_shape(spec, held))
        return n, m
    n, k, h, _ = spec.sizes(arrays, held)
    if spec.fetch:
        return 2 * k, h
    return (n, k) if spec.backward else (n, h)


def result_dtype(op: str, params: Mapping | Params, arrays: Mapping[str, Any], held: Mapping[str, Any]) -> np.dtype:
    """The dtype of the RESULT's `c`: a product's operands'; a first-layer resident forward its
    static's, a hidden layer's its operands', a fetched state float64."""
    spec = parse(op, params)
    if isinstance(spec, Resident):
        if spec.fetch:
            return np.dtype(np.float64)
        if spec.a_static is None:
            return np.dtype(arrays["a" if "a" in arrays else "dz"].dtype)
        return np.dtype(held[spec.a_static].dtype)
    return np.dtype(arrays["b" if "b" in arrays else "a"].dtype)


def work(op: str, params: Mapping | Params, arrays: Mapping[str, Any], held: Mapping[str, Any]) -> float:
    """Multiply-adds of a batch: what leases scale with (at least 1)."""
    spec = parse(op, params)
    if isinstance(spec, Matmul):
        n, k, m = spec.dims(arrays, _static_shape(spec, held))
        return float(n) * float(k) * float(m)
    n, k, h, b = spec.sizes(arrays, held)
    return max(float(spec.updates * b * k * h + n * k * h), 1.0)


def memory(op: str, params: Mapping | Params, arrays: Mapping[str, Any], held: Mapping[str, Any]) -> int:
    """Bytes a batch makes a node allocate, from the header's shapes alone: a product's result
    plus the gathered rows of a static operand; a resident batch's gathered rows and result in
    float64 and, with updates, their rows and gradient. Shapes it cannot read count as 0 (the
    compute refuses them)."""
    try:
        spec = parse(op, params)
    except BatchError:
        return 0
    try:
        if isinstance(spec, Resident):
            state = held.get(spec.state)
            if spec.a_static is None and state is not None:
                # a hidden layer's: its operands arrive with the batch; float64 copies of one
                # update's (b, K) and (b, h), g (K, h), and the result
                k, h = state.shape[0] // 2, state.shape[1]
                if spec.fetch:
                    return 2 * k * h * 8
                a, dz = arrays.get("a"), arrays.get("dz")
                n = a.shape[0] if a is not None and a.ndim == 2 else 0
                u = dz.shape[0] if dz is not None and dz.ndim == 2 else 0
                return int(n * (k + h) * 16 + (u * (k + h) * 8 + k * h * 8 if u else 0))
            static = held.get(spec.a_static) if spec.a_static is not None else None
            if static is None or len(static.shape) != 2 or state is None:
                return 0
            k, h, item = static.shape[1], state.shape[1], np.dtype(static.dtype).itemsize
            if spec.fetch:
                return 2 * k * h * 8
            rows, urows = arrays.get("rows"), arrays.get("update_rows")
            n = rows.shape[0] if rows is not None and rows.ndim == 1 else 0
            b = urows.shape[1] if urows is not None and urows.ndim == 2 else 0
            # the forward: gathered rows in float64 and the result; an update: its rows and g
            return int(n * (k * (item + 8) + h * (8 + item)) + (b * k * 16 + k * h * 8 if b else 0))
        b = arrays.get("b")
        if b is None or b.ndim != 2:
            return 0
        item = b.dtype.itemsize
        if spec.a_static is not None:
            static, rows = held.get(spec.a_static), arrays.get("rows")
            if static is None or rows is None or len(static.shape) != 2 or rows.ndim != 1:
                return 0
            n = static.shape[1] if spec.transpose_a else rows.shape[0]
            gathered = rows.shape[0] * static.shape[1] * np.dtype(static.dtype).itemsize
            return n * b.shape[1] * item + gathered
        a = arrays.get("a")
        if a is None or a.ndim != 2:
            return 0
        n = a.shape[1] if spec.transpose_a else a.shape[0]
        return n * b.shape[1] * item
    except (AttributeError, TypeError):
        return 0


def describe(op: str, params: Mapping | Params, arrays: Mapping[str, Any], held: Mapping[str, Any]) -> str:
    """A short human description for logs and the node's console, e.g. 'matmul (128x392)·(392x128)'."""

    def dims(shape) -> str:
        return "x".join(str(d) for d in shape)

    try:
        spec = parse(op, params)
        if isinstance(spec, Resident):
            if spec.fetch:
                return f"resident checkpoint [{spec.state}]"
            if spec.backward:
                return f"resident backward ({dims(arrays['dz'].shape)})·V^T [{spec.state}]"
            if spec.a_static is None:
                return f"resident ({dims(arrays['a'].shape)})·V [{spec.state}]"
            static = held[spec.a_static]
            return f"resident ({arrays['rows'].shape[0]}x{static.shape[1]})·V [{spec.state}]"
        b = arrays["b"].shape
        if spec.a_static is not None:
            a = (arrays["rows"].shape[0], *held[spec.a_static].shape[1:])
            if spec.transpose_a:
                a = a[::-1]
            return f"matmul ({dims(a)})·({dims(b)}) [{spec.a_static}]"
        return f"matmul ({dims(arrays['a'].shape)})·({dims(b)})"
    except (BatchError, KeyError, AttributeError, IndexError, TypeError):
        return op


def split(
    op: str, params: Mapping | Params, arrays: dict[str, np.ndarray], cap: int, static_cols: int = 0
) -> tuple[list[dict[str, np.ndarray]], Groups]:
    """A batch's arrays as several batches' (same op and params), each needing at most `cap`
    bytes (operands, gathered static rows and result), and how their results make the whole
    one. (n, K) @ (K, m), the left operand's n rows:

    - whole rows of the left operand: the result's rows ("stack"), or for a transposed product,
      which contracts over those rows, partial sums ("sum");
    - when b alone (or a transposed product's result) is too large, first groups of m columns,
      whose results sit side by side.

    `static_cols`: the columns of the static operand a transposed product over one names.
    Returns (arrays of each piece, groups): one (how, count) per column group, in order; how is
    None when the group is a single batch. A batch that fits, and a resident batch (one per
    slot and step; its node holds the weights), comes back as ([arrays], [(None, 1)])."""
    spec = parse(op, params)
    if isinstance(spec, Resident):
        return [arrays], [(None, 1)]
    transpose = spec.transpose_a
    b = arrays["b"]
    item = b.dtype.itemsize
    if "a" in arrays:
        n, k = arrays["a"].shape
        per_row = k * item
    else:
        n = arrays["rows"].shape[0]
        k = static_cols if transpose else b.shape[0]
        per_row = 2 * k * item + arrays["rows"].itemsize  # the index and the gathered row
    m = b.shape[1]
    if n * (per_row + m * item) + k * m * item <= cap:
        return [arrays], [(None, 1)]
    # b (or the transposed result) takes at most half the budget: groups of columns
    columns = max(1, min(m, (cap // 2) // max(1, k * item)))
    rows = max(1, (cap - k * columns * item) // (per_row + columns * item))
    out: list[dict[str, np.ndarray]] = []
    groups: Groups = []
    for c0 in range(0, m, columns):
        cut = {name: (v[:, c0 : c0 + columns] if name == "b" else v) for name, v in arrays.items()}
        if n <= rows:
            out.append(cut)
            groups.append((None, 1))
            continue
        count = 0
        for lo in range(0, n, rows):
            out.append(
                {
                    name: (v[lo : lo + rows] if name in ("a", "rows") or (name == "b" and transpose) else v)
                    for name, v in cut.items()
                }
            )
            count += 1
        groups.append(("sum" if transpose else "stack", count))
    return out, groups


def combine(results: list[np.ndarray], groups: Groups) -> np.ndarray:
    """The whole result from `split`'s pieces' results."""
    columns, at = [], 0
    for how, count in groups:
        parts = results[at : at + count]
        at += count
        if how is None:
            columns.append(parts[0])
        elif how == "stack":
            columns.append(np.concatenate(parts, axis=0))
        else:
            total = np.array(parts[0], dtype=np.float64)
            for part in parts[1:]:
                total += part
            columns.append(total)
    return columns[0] if len(columns) == 1 else np.concatenate(columns, axis=1)
