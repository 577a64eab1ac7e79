"""Resident hidden layers: each node keeps its block of rows of a hidden-to-hidden layer's weights,
in a secret basis, for the whole run, and updates it itself (docs/design.md, "Resident weights").

Layer l's weights w (n, m) contract over the previous layer's n units; slot s holds the rows of a
secret block Q_s of them, reparameterized as w[Q_s] = M_s V_s N^-1 (`resident.HiddenBasis`: M_s
block-diagonal with dense MIX_GROUP blocks over the input units, N one such mixing of the m
output units, V_0 i.i.d. Gaussian in the node's basis), and V_s is trained by SGD with momentum
in that basis, as the first layer's is. Per step, with a fresh block-diagonal orthogonal mixing L
of the batch's rows (ROW_GROUP rows together):

    forward    node s receives A_s = L a[:, Q_s] M_s            returns  A_s V_s
               the coordinator: z = L^T sum_s (A_s V_s) N^-1     (= a w)
    backward   node s receives A_s again and D = L dz N^-T       returns  D V_s^T (V before the step)
               the coordinator: da[:, Q_s] = (L^T D V_s^T) M_s^T (= dz w[Q_s]^T)
               and the node steps: buf = mu buf + A_s^T D, V_s += lr buf
               (A_s^T D = M_s^T a[:, Q_s]^T dz N^-T: the V-basis gradient, noise-free)

N is what keeps dz's exact zeros (a ReLU unit that is off for a sample) out of D: with them, the
rows of D orthogonal to the columns where one sample is off would give away L, and through L
single samples' activations and deltas (`enshuffle audit` plays that attack).

So the coordinator's work per step is the mixings (O(b n (MIX_GROUP + ROW_GROUP)), not the
product's O(b n m)), and the weights never travel after the first checkpoint. The rows a node
sees are mixtures of ROW_GROUP samples' activations (fresh per step), so no row is one sample
and dz's class structure is spread over a group; its input units are mixed by M_s, the deltas'
units by N.

Checks without V_s: the coordinator tracks V_s R (right probes, for the forward: A_s V_s R) and
Q^T V_s (left probes, for the backward: D V_s^T Q = D (Q^T V_s)^T), each updated from the step's
A_s and D at O(q b (|Q_s| + m)). Checkpoints, replays and resyncs are the first layer's
(`resident.py`): a slot's state static is its last checkpoint [V; buf], and the log keeps each
update's (A_s, D, lr) until the next one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from enshuffle.coordinator.disguise.mixing import Mixing
from enshuffle.coordinator.disguise.resident import (
    CHECK_SLACK,
    EPS64,
    MOMENTUM,
    PROBES,
    HiddenBasis,
    Probes,
    SlotCheckpoints,
    StateProducts,
    owned_state,
    probe_check,
    row_norms,
    state_products,
)

ROW_GROUP = 32  # batch rows mixed together (fresh orthogonal blocks each step)


class RowMix:
    """A fresh (b, b) block-diagonal orthogonal L of ROW_GROUP blocks (the last one smaller)."""

    def __init__(self, b: int, rng: np.random.Generator, clear: bool = False):
        self.b = b
        self.clear = clear  # the control's: applying it is a copy, not a product
        self.count = b // ROW_GROUP
        g = ROW_GROUP
        if clear:
            self.stack = np.broadcast_to(np.eye(g), (self.count, g, g))
            self.tail = np.eye(b - self.count * g)
        else:
            self.stack = np.linalg.qr(rng.standard_normal((self.count, g, g)))[0] if self.count else np.zeros((0, g, g))
            tail = b - self.count * g
            self.tail = np.linalg.qr(rng.standard_normal((tail, tail)))[0] if tail else np.zeros((0, 0))
        self._stacks: dict = {}

    def apply(self, x: np.ndarray, transposed: bool = False) -> np.ndarray:
        """L @ x (L^T @ x with `transposed`), x (b, n), in x's dtype (float32 or float64)."""
        g, f = ROW_GROUP, self.count * ROW_GROUP
        if self.clear:
            return np.array(x, dtype=x.dtype if x.dtype in (np.float32, np.float64) else np.float64)
        x = np.ascontiguousarray(x, dtype=x.dtype if x.dtype in (np.float32, np.float64) else np.float64)
        key = (x.dtype, transposed)
        if key not in self._stacks:
            self._stacks[key] = (
                np.ascontiguousarray(self.stack.transpose(0, 2, 1) if transposed else self.stack, dtype=x.dtype),
                np.ascontiguousarray(self.tail.T if transposed else self.tail, dtype=x.dtype),
            )
        stack, tail = self._stacks[key]
        out = np.empty(x.shape, dtype=x.dtype)
        if self.count:
            np.matmul(stack, x[:f].reshape(self.count, g, x.shape[1]), out=out[:f].reshape(self.count, g, x.shape[1]))
        if f < self.b:
            np.matmul(tail, x[f:], out=out[f:])
        return out


@dataclass
class Update:
    """One issued update: version `version` = version - 1 plus lr (mu buf + A^T D)."""

    version: int
    a: np.ndarray  # A_s (b, |Q_s|), as sent
    dz: np.ndarray  # D (b, m), as sent
    lr: float


@dataclass
class HiddenSlot:
    units: np.ndarray  # Q_s
    mix: Mixing
    right_terms: Probes  # R (m, q), the right probes (forward), with what the checks read of them
    left_terms: Probes  # Q (|Q_s|, q), the left probes (backward), likewise
    vr: np.ndarray  # V R
    bufr: np.ndarray
    qv: np.ndarray  # Q^T V (q, m)
    qbuf: np.ndarray
    v_bound: float
    drift: float
    checkpoint: tuple[np.ndarray, np.ndarray]  # (V, buf): views of `checkpoint_state`
    checkpoint_state: np.ndarray  # [V; buf] float64, read-only: the slot's state static
    checkpoint_version: int = 0
    version: int = 0
    log: list[Update] = field(default_factory=list)

    @property
    def probes(self) -> np.ndarray:
        """R (m, q)."""
        return self.right_terms.r

    @property
    def left(self) -> np.ndarray:
        """Q (|Q_s|, q)."""
        return self.left_terms.r


class HiddenResident(SlotCheckpoints):
    """One hidden-to-hidden layer's resident slots: their secrets, what the coordinator tracks of
    each node's state, the per-step batches and their undoing, the checks and the checkpoints."""

    def __init__(self, layer: int, basis: HiddenBasis, dtype, rng: np.random.Generator, clear: bool = False):
        self.layer = layer
        self.basis = basis
        self.dtype = np.dtype(dtype)
        self.eps = float(np.finfo(self.dtype).eps)
        self.width = basis.width
        self.clear = clear
        self.slots: list[HiddenSlot] = []
        for block, mix, v0 in zip(basis.blocks, basis.mix, basis.v0):
            state = owned_state(np.concatenate([v0, np.zeros_like(v0)]))
            v = state[: len(block)]
            probes = rng.standard_normal((self.width, PROBES))
            left = rng.standard_normal((len(block), PROBES))
            st = HiddenSlot(
                units=np.asarray(block),
                mix=mix,
                right_terms=Probes(probes),
                left_terms=Probes(left),
                vr=v @ probes,
                bufr=np.zeros((len(block), PROBES)),
                qv=left.T @ v,
                qbuf=np.zeros((PROBES, self.width)),
                v_bound=float(np.linalg.norm(v)),
                drift=0.0,
                checkpoint=(v, state[len(block) :]),
                checkpoint_state=state,
            )
            self.slots.append(st)
        self._kept: tuple | None = None  # (a, L, [A_s]) of the last forward, for its backward
        self._f64: dict = {}  # key -> (source, float64 copy, its row norms or None): what the checks and tracking read
        self._checked: dict[int, StateProducts] = {}  # shard -> the products of the last state checked
        self._units_order: np.ndarray | None = None  # da's columns from the slots' blocks side by side
        self.fetches = 0
        # `enshuffle audit` only (None otherwise): version -> (L's blocks, L's tail, the batch's
        # training rows) of every issued update, the scorer's ground truth; never sent
        self.audit: dict[int, tuple] | None = None
        self.audit_rows: np.ndarray | None = None

    def _as64(self, key, x: np.ndarray) -> np.ndarray:
        """x in float64, converted once however many checks read it (a reused buffer)."""
        got = self._f64.get(key)
        if got is not None and got[0] is x:
            return got[1]
        buf = got[1] if got is not None and got[1].shape == x.shape else np.empty(x.shape)
        np.copyto(buf, x)
        self._f64[key] = [x, buf, None]
        return buf

    def _norms64(self, key, x: np.ndarray) -> np.ndarray:
        """The row norms of x's float64 copy (`_as64`), computed once for the checks and the tracking."""
        self._as64(key, x)
        got = self._f64[key]
        if got[2] is None:
            got[2] = row_norms(got[1])
        return got[2]

    # -- state ----------------------------------------------------------------------
    def state_name(self, shard: int) -> str:
        return f"w{self.layer}.{shard}"

    def state_static(self, shard: int) -> tuple[np.ndarray, int]:
        st = self.slots[shard]
        return st.checkpoint_state, st.checkpoint_version

    def replay_from(self, shard: int) -> int:
        return self.slots[shard].checkpoint_version

    def adopt(self, w: np.ndarray, buf: np.ndarray | None) -> None:
        """Start from a model version's w{l} (units basis) and its momentum (or zero)."""
        vs = self.basis.from_units(w)
        bufs = self.basis.from_units(buf) if buf is not None else [np.zeros_like(v) for v in vs]
        for st, v, b in zip(self.slots, vs, bufs):
            self._set_checkpoint(st, owned_state(np.concatenate([v, b])), st.version)

    def _set_checkpoint(
        self, st: HiddenSlot, state: np.ndarray, version: int, products: StateProducts | None = None
    ) -> None:
        """`state` (a read-only [V; buf]: `owned_state`, `kept_state`) becomes the slot's
        checkpoint: the tracked probes re-anchored on it (`products`: its `state_products`, if
        checked)."""
        if products is None:
            products = state_products(state, st.probes, st.left)
        k = st.units.shape[0]
        st.checkpoint_state = state
        st.checkpoint = (state[:k], state[k:])
        st.checkpoint_version = st.version = version
        st.log = [u for u in st.log if u.version > version]
        st.vr, st.bufr = products.right[:k], products.right[k:]
        st.qv, st.qbuf = products.left[0], products.left[1]
        st.v_bound, st.drift = products.v_norm, 0.0

    def clean(self) -> tuple[np.ndarray, np.ndarray]:
        """(w{l}, its momentum) in the units' basis from the last checkpoints (after a fetch)."""
        return (
            self.basis.to_units([st.checkpoint[0] for st in self.slots]),
            self.basis.to_units([st.checkpoint[1] for st in self.slots]),
        )

    # -- batches --------------------------------------------------------------------
    def batch(
        self,
        shard: int,
        start: int,
        version: int,
        a: np.ndarray | None = None,
        fetch: bool = False,
        backward: bool = False,
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """A batch taking slot `shard`'s state from `start` to `version` (the logged updates in
        between), then a forward of `a`, a backward (the last update's delta through V before it)
        or a fetch of the state."""
        st = self.slots[shard]
        if fetch and a is None and start == version and any(u.version == version for u in st.log):
            # a node already at `version` (its backward applied the update): the fetch carries
            # that update again, which it skips, since a batch carries at least one array
            start = version - 1
        updates = [u for u in st.log if start < u.version <= version]
        params = {
            "state": self.state_name(shard),
            "from": int(start),
            "version": int(version),
            "momentum": MOMENTUM,
            "lr": [float(u.lr) for u in updates],
            "fetch": bool(fetch),
        }
        if backward:
            params["backward"] = True
        arrays: dict[str, np.ndarray] = {}
        if a is not None:
            arrays["a"] = a
        if updates:
            arrays["update_a"] = updates[0].a if len(updates) == 1 else np.concatenate([u.a for u in updates])
            arrays["dz"] = updates[0].dz if len(updates) == 1 else np.concatenate([u.dz for u in updates])
        return params, arrays

    def forward_operands(self, a: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Each slot's A_s = L a[:, Q_s] M_s for this step (a fresh L), kept for the backward."""
        rowmix = RowMix(a.shape[0], rng, clear=self.clear)
        mixed = rowmix.apply(np.asarray(a, dtype=self.dtype))
        operands = [st.mix.right(np.take(mixed, st.units, axis=1), self.dtype) for st in self.slots]
        self._kept = (a, rowmix, operands)
        return operands

    def combine_forward(self, results: list[np.ndarray]) -> np.ndarray:
        """z = L^T sum_s (A_s V_s), float64."""
        assert self._kept is not None
        if len(results) > 1:  # the first sum makes the total: one pass fewer than copying results[0]
            total = np.add(results[0], results[1], dtype=self.dtype)
        else:
            total = np.array(results[0], dtype=self.dtype)
        for r in results[2:]:
            total += r
        return self.basis.out_mix.right(self._kept[1].apply(total, transposed=True), self.dtype, inverse=True)

    def backward_operands(
        self, a: np.ndarray, dz: np.ndarray, lr: float, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Issue this step's update of every slot (logged at version + 1): ([A_s], D = L dz)."""
        if self._kept is None or self._kept[0] is not a:  # no forward of this batch kept: fresh secrets
            self.forward_operands(a, rng)
        assert self._kept is not None
        _, rowmix, operands = self._kept
        sent = rowmix.apply(
            self.basis.out_mix.right(np.asarray(dz, dtype=self.dtype), self.dtype, transposed=True, inverse=True)
        )
        for st, op in zip(self.slots, operands):
            st.version += 1
            st.log.append(Update(version=st.version, a=op, dz=sent, lr=float(lr)))
        if self.audit is not None:
            self.audit[self.slots[0].version] = (
                np.array(rowmix.stack),
                np.array(rowmix.tail),
                None if self.audit_rows is None else self.audit_rows.copy(),
            )
        return operands, sent

    def combine_backward(self, results: list[np.ndarray], b: int) -> np.ndarray:
        """da (b, n) = [(L^T D V_s^T) M_s^T on each block]: L^T once over the slots' results side
        by side, each block's M_s^T, then one gather of the columns into the units' order."""
        assert self._kept is not None
        rowmix = self._kept[1]
        joined = np.concatenate([np.asarray(r, dtype=self.dtype) for r in results], axis=1)
        joined = rowmix.apply(joined, transposed=True)
        mixed = np.empty_like(joined)
        lo = 0
        for st in self.slots:
            hi = lo + st.units.shape[0]
            st.mix.right(joined[:, lo:hi], self.dtype, transposed=True, out=mixed[:, lo:hi])
            lo = hi
        if self._units_order is None:
            self._units_order = np.argsort(np.concatenate([st.units for st in self.slots]))
        return np.take(mixed, self._units_order, axis=1)

    def track(self) -> None:
        """Follow the issued update on every slot's probes (after the backward's results are
        checked against the state before it)."""
        for s, st in enumerate(self.slots):
            u = st.log[-1]
            a64, d64 = self._as64(("a", s), u.a), self._as64("dz", u.dz)
            steps = ((st.bufr, st.vr, a64.T @ (d64 @ st.probes)), (st.qbuf, st.qv, (a64 @ st.left).T @ d64))
            for buf, value, g in steps:
                buf *= MOMENTUM
                buf += g
                value += u.lr * buf
            a_norms, d_norms = self._norms64(("a", s), u.a), self._norms64("dz", u.dz)
            g_bound = float(np.sqrt(np.dot(a_norms, a_norms) * np.dot(d_norms, d_norms)))
            st.v_bound += u.lr * g_bound / (1.0 - MOMENTUM)
            st.drift += u.lr * EPS64 * g_bound * math.sqrt(a64.shape[0]) / (1.0 - MOMENTUM)
        self._kept = None

    # -- checks ---------------------------------------------------------------------
    def check(self, shard: int, params: dict, arrays: dict, out: np.ndarray) -> str | None:
        st = self.slots[shard]
        if params.get("fetch"):
            return self.check_state(shard, out)
        if params.get("backward"):
            k = st.units.shape[0]
            version = params.get("version")
            own = st.log[-1:] if st.log and st.log[-1].version == version else []
            own = own or [u for u in st.log if u.version == version]
            if not own:
                return f"no update issued at version {version}"
            dz = own[0].dz
            if out.shape != (dz.shape[0], k):
                return f"result shape {out.shape}, expected {(dz.shape[0], k)}"
            d64, norms = self._as64("dz", dz), self._norms64("dz", dz)
            return probe_check(out, d64, st.left_terms, st.qv.T, self.eps, st.v_bound, st.drift, norms)
        a = arrays["a"]
        if out.shape != (a.shape[0], self.width):
            return f"result shape {out.shape}, expected {(a.shape[0], self.width)}"
        a64, norms = self._as64(("a", shard), a), self._norms64(("a", shard), a)
        return probe_check(out, a64, st.right_terms, st.vr, self.eps, st.v_bound, st.drift, norms)

    def check_state(self, shard: int, state: np.ndarray) -> str | None:
        st = self.slots[shard]
        k = st.units.shape[0]
        if state.shape != (2 * k, self.width):
            return f"state shape {state.shape} (expected {(2 * k, self.width)}) or non-finite entries"
        products = self._checked[shard] = state_products(state, st.probes, st.left)  # kept for accept_state
        if not products.finite:
            return f"state shape {state.shape} (expected {(2 * k, self.width)}) or non-finite entries"
        tol_scale = CHECK_SLACK * (st.drift + EPS64 * st.v_bound)
        checks = (
            ("V R", products.right[:k], st.vr, st.right_terms),
            ("momentum R", products.right[k:], st.bufr, st.right_terms),
            ("Q^T V", products.left[0], st.qv, st.left_terms),
            ("Q^T momentum", products.left[1], st.qbuf, st.left_terms),
        )
        for name, got, want, probes in checks:
            tol = tol_scale * probes.rms * math.sqrt(max(k, self.width))
            err = float(np.abs(got - want).max())
            if err > tol:
                return f"checkpoint {name} differs from the tracked one by {err:.3e} (bound {tol:.3e})"
        return None

    def _slot_name(self, shard: int) -> str:
        return f"layer {self.layer} slot {shard}"

    def replay(self, shard: int) -> np.ndarray:
        """Slot `shard`'s state at its last issued version, from its checkpoint and the log."""
        st = self.slots[shard]
        v, buf = (np.array(x) for x in st.checkpoint)
        for u in st.log:
            buf *= MOMENTUM
            buf += u.a.T.astype(np.float64) @ u.dz.astype(np.float64)
            v += u.lr * buf
        return np.concatenate([v, buf])
