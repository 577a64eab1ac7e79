"""The "resident" disguise: each node keeps its block of the first layer's weights, in a secret
basis, for the whole run, and updates it itself (docs/design.md, "Privacy" and "Resident weights").

The network trains a secretly reparameterized first layer. For k slots with secret pixel blocks
P_s and secret block-diagonal mixings M_s (dense 32x32 blocks, condition <= sqrt 2 each way),

    w1[P_s] = M_s V_s N^-1     V_s (|P_s|, h1): slot s's weights, in its own basis

(N: one secret mixing of the h1 hidden units, so the deltas nodes are sent are dz1 N^-T and
the forwards they return are in N's basis: `combine` and `update` apply it; below, dz1 and z1
stand for those mixed ones.)

and V_s is trained by SGD with momentum in that basis (buf = mu buf + grad_V; V += lr buf): a
linear optimizer, so the coordinator can follow what the node does from what it computes anyway.
`ResidentBasis` is the reparameterization alone; the centralized reference
(`enshuffle.model.LocalCompute(basis=...)`) trains the same network in the pixel basis, which is
what the exactness tests compare against.

What node s holds, received once:

    S_s = (x[:, P_s] + G H_s) M_s     rows in a secret order    (x: the standardized pixels)
    V_s at the start (drawn i.i.d. Gaussian in the node's basis: it says nothing about M_s)

and per step it receives only the step's rows (indices into S_s) and the previous step's delta
dz1 (b, h1). It applies the previous update, buf = mu buf + S_s[rows']^T dz1', V_s += lr buf,
and returns y_s = S_s[rows] V_s. Everything it ever holds of the weights is a function of V_0,
S_s and the deltas it was sent: the weight trajectory carries nothing more (no per-step weight
message to separate, no optimizer applied in the pixel basis).

The node's update includes the noise's share of the gradient, M^T H^T (G^T dz1): its V_s is
V_clean + M^T H^T E with E (r, h1) accumulated by the same momentum recurrence, which the
coordinator keeps. E is the same for every slot (each accumulates G[rows]^T dz1), so the
coordinator makes the clean forward from two tracked matrices whatever the number of slots:

    z1 = sum_s y_s - G[idx] (sum_s H_s M_s V_s) - (x[idx] B^T) E      B[:, P_s] = H_s M_s M_s^T

tracking sum_s H_s M_s V_s and E (r x h1 each) with O(r b (784 + h1)) multiply-adds per step, so
the clean weights M_s V_clean follow exact SGD with momentum on the clean network. It also
tracks V_s R for a few secret probe columns R, so it can check every result (Freivalds: y_s R
against S_s[rows] (V_s R)) and every checkpoint the node returns, without V_s.

Fault tolerance: every CHECKPOINT_STEPS the coordinator fetches [V_s; buf_s] (checked against
the probes) and keeps the deltas issued since. A slot's state static is that checkpoint; a node
that takes the slot over receives it and replays the logged updates (batch "from" < "version"),
which nodes apply idempotently by version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from enshuffle.coordinator.disguise.mixing import Mixing
from enshuffle.coordinator.plan import balanced_blocks, inverse_permutation
from enshuffle.model import W1_MOMENTUM

NOISE_RANK = 32  # r: per-image Gaussian factors in every static block
MIX_GROUP = 32  # dense blocks of M_s
MIX_SPREAD = 0.5  # singular values of each block in [2^-0.5, 2^0.5]: M M^T's condition <= 4
PROBES = 2  # q: secret probe columns for checks
CHECKPOINT_STEPS = 64  # fetch each slot's state this often (and at every epoch's end)
MOMENTUM = W1_MOMENTUM  # the same step as a centralized run of the reparameterized network
STATE_PREFIX = "w1."
# A result or checkpoint is accepted within this many times its rounding bound (`check_forward`);
# a lie larger than that fails.
CHECK_SLACK = 4.0
EPS64 = float(np.finfo(np.float64).eps)


def _to_full(basis, rows: int, width: int, vs: list[np.ndarray]) -> np.ndarray:
    """A basis's [V_s] -> w (rows, width): w[block_s] = M_s V_s N^-1 (zero off every block)."""
    w = np.zeros((rows, width))
    for block, mix, v in zip(basis.blocks, basis.mix, vs):
        w[block] = basis.out_mix.right(mix.left(v), inverse=True)
    return w


def _from_full(basis, w: np.ndarray) -> list[np.ndarray]:
    """w -> a basis's [V_s = M_s^-1 w[block_s] N]."""
    w = np.asarray(w, dtype=np.float64)
    return [basis.out_mix.right(mix.inverse_left(w[block])) for block, mix in zip(basis.blocks, basis.mix)]


def _precondition(basis, g: np.ndarray) -> np.ndarray:
    """A gradient g as the V-basis SGD step sees it in w's basis: M_s M_s^T g[block_s] N^-T N^-1."""
    g = np.asarray(g, dtype=np.float64)
    out = np.zeros_like(g)
    for block, mix in zip(basis.blocks, basis.mix):
        mixed = mix.left(mix.transposed_left(g[block]))
        out[block] = basis.out_mix.right(basis.out_mix.right(mixed, inverse=True, transposed=True), inverse=True)
    return out


def row_norms(x: np.ndarray) -> np.ndarray:
    """||x_i|| of every row of a float64 x: one batched product of each row with itself (BLAS,
    several times einsum's speed)."""
    return np.sqrt(np.matmul(x[:, None, :], x[:, :, None])[:, 0, 0])


class Probes:
    """A slot's secret probe columns R (m, q) and what every check against them reads, computed
    once: R^2 (for the rounding term), the RMS of R's entries (for the product's) and each
    column's sum of |R| (for results a node flushes to zero)."""

    def __init__(self, r: np.ndarray):
        self.r = r
        self.sq = r * r
        self.rms = float(np.sqrt(np.mean(self.sq)))
        self.abs_sums = np.abs(r).sum(axis=0)


# Float64 squares of float32 values are exact (48 significant bits, no overflow or underflow), so
# the rounding term's sum out^2 @ R^2 has m + 1 roundings of positive terms (R^2, the products,
# the sums): dividing by 1 - (m + 2) u bounds it, plus a gradual underflow of at most 2^-1075 per
# product (ROUNDING_FLOOR, per term of the sum).
ROUNDING_FLOOR = 2.0**-1074


def flush_bound(dtype, probes: Probes, tracked: np.ndarray) -> np.ndarray:
    """(q,): how far flushing subnormals to zero moves out @ R, per probe, for a node computing
    in `dtype` (nodes set flush-to-zero and denormals-are-zero, enshuffle/fpenv.py). An entry of
    out below the dtype's smallest normal may come back as 0: at most tiny |R_jk| summed over j.
    An entry of the node's lhs below it may count as 0: at most tiny |(X R)_lk| summed over l,
    and X R is `tracked`. Rigorous, and far below any rounding of a result of ordinary size; a
    row of results that are all subnormal (the deltas of a sample the network already fits,
    unmixed, as the resident-clear control sends them) is compared against this alone."""
    return float(np.finfo(dtype).tiny) * (probes.abs_sums + np.abs(tracked).sum(axis=0))


def probe_check(
    out: np.ndarray,
    lhs: np.ndarray,
    probes: Probes,
    tracked: np.ndarray,
    eps: float,
    v_bound: float,
    drift: float,
    lhs_norms: np.ndarray | None = None,
) -> str | None:
    """Freivalds on out = lhs @ X for a secret X the caller tracks as X @ probes = `tracked`:
    out @ probes against lhs @ tracked, within out's one rounding to its dtype (eps: a random
    walk of |out_ij| eps R_jk over j) plus float64 rounding of the product and of X's recurrence
    (v_bound: a bound on ||X||_F; drift: how far the node's X may be from the tracked one).
    `lhs_norms`: lhs's row norms, if the caller has them. out is converted to float64 once, for
    out @ R and then, squared in place, for out^2 @ R^2 (each a product with two columns:
    OpenBLAS's fast path for them is several times its speed for four)."""
    o64 = out.astype(np.float64)  # a copy, squared below
    l64 = lhs if lhs.dtype == np.float64 else lhs.astype(np.float64)
    diff = o64 @ probes.r
    diff -= l64 @ tracked
    np.square(o64, out=o64)
    bound = o64 @ probes.sq
    m = out.shape[1]
    u = EPS64 / 2
    np.sqrt(bound, out=bound)
    bound *= CHECK_SLACK * eps / math.sqrt(1.0 - (m + 2) * u)
    row_norm = row_norms(l64) if lhs_norms is None else lhs_norms
    # per row: the product's rounding, the rounding term's underflow floor and the comparison's
    # own (a zero bound for a zero row and result)
    scale = CHECK_SLACK * probes.rms * (EPS64 * math.sqrt(l64.shape[1]) * v_bound + drift)
    floor = CHECK_SLACK * eps * math.sqrt(m * ROUNDING_FLOOR) + 1e-300
    bound += (scale * row_norm + floor)[:, None]
    bound += CHECK_SLACK * flush_bound(out.dtype, probes, tracked)[None, :]
    np.abs(diff, out=diff)
    if (diff <= bound).all() and np.isfinite(bound).all():
        return None
    if not np.isfinite(diff).all():
        return "result has NaN or infinite entries"
    if not np.isfinite(bound).all():
        return "result has entries too large to check"
    r = int(np.argwhere(diff > bound)[0, 0])
    return f"probe check failed on row {r}: {float(diff[r].max()):.3e} above its bound {float(bound[r].max()):.3e}"


STATE_CHUNK = 128  # rows of a fetched state per pass of `state_products` (2 MiB of float64 at h = 2048)


class StateProducts(NamedTuple):
    """What one pass over a fetched state [V; buf] (2k, m) gives: the array read (`source`),
    whether every entry is finite, [V; buf] @ right (2k, q), (left^T V, left^T buf) (2, j, m)
    and ||V||_F."""

    source: np.ndarray
    finite: bool
    right: np.ndarray
    left: np.ndarray
    v_norm: float


def state_products(state: np.ndarray, right: np.ndarray, left: np.ndarray) -> StateProducts:
    """[V; buf]'s finiteness, probe products and ||V||_F in one pass of cache-sized blocks of rows
    (each block read from memory once for all of them), in float64. A checked state's products
    are the tracked ones of the checkpoint it becomes (no second pass). A padded message's arrays
    are aligned (docs/protocol.md section 3); one from a sender that does not pad sits wherever
    its header ends it: such a state's blocks are first copied into one aligned block, which
    every product then reads (numpy would copy the block once per product, and test finiteness
    through a slower unaligned loop)."""
    k = state.shape[0] // 2
    out_r = np.empty((state.shape[0], right.shape[1]))
    out_l = np.zeros((2, left.shape[1], state.shape[1]))
    part = np.empty((left.shape[1], state.shape[1]))
    scratch = None if state.flags.aligned and state.dtype == np.float64 else np.empty((STATE_CHUNK, state.shape[1]))
    finite, v_squares = True, 0.0
    for half in range(2):
        for lo in range(0, k, STATE_CHUNK):
            hi = min(lo + STATE_CHUNK, k)
            rows = slice(half * k + lo, half * k + hi)
            block = state[rows]
            if scratch is not None:
                block = scratch[: hi - lo]
                np.copyto(block, state[rows])
            finite = finite and bool(np.isfinite(block).all())
            np.matmul(block, right, out=out_r[rows])
            np.matmul(left[lo:hi].T, block, out=part)
            out_l[half] += part
            if half == 0:
                flat = block.reshape(-1)
                v_squares += float(np.dot(flat, flat))
    return StateProducts(state, finite, out_r, out_l, math.sqrt(v_squares))


def owned_state(state: np.ndarray) -> np.ndarray:
    """A checkpoint's own float64 copy of [V; buf], read-only: it is the slot's state static as
    sent, and V and buf are views of it."""
    out = np.array(state, dtype=np.float64)
    out.flags.writeable = False
    return out


def kept_state(state: np.ndarray) -> np.ndarray:
    """A fetched [V; buf] handed over as a checkpoint: the array itself when it is float64 and
    C-contiguous, as a view that can never be made writable again (a read-only buffer under
    it), else an `owned_state` copy. Only for an array nothing else writes to: an opened
    message's (each decrypted into a buffer of its own) or one just computed here."""
    if state.dtype != np.float64 or not state.flags.c_contiguous:
        return owned_state(state)
    readonly = memoryview(state).toreadonly()  # type: ignore[arg-type]  # numpy types ndarray as a buffer only on 3.12+
    return np.frombuffer(readonly, dtype=np.float64).reshape(state.shape)


class SlotCheckpoints:
    """What the first layer's and the hidden layers' resident disguises share: replaying every slot
    with updates since its checkpoint when no node can be asked, and accepting checked fetches."""

    slots: list
    _checked: dict[int, StateProducts]  # shard -> the products of the last state checked
    fetches: int  # checkpoints accepted

    def replay(self, shard: int) -> np.ndarray:
        raise NotImplementedError

    def _set_checkpoint(self, st, state: np.ndarray, version: int, *, products: StateProducts | None = None) -> None:
        raise NotImplementedError

    def _slot_name(self, shard: int) -> str:
        """How errors name slot `shard`."""
        return f"slot {shard}"

    def accept_state(self, shard: int, state: np.ndarray, version: int) -> None:
        """A checked fetch of every issued update becomes the slot's checkpoint (the probes are
        re-anchored on it); the noise's share carries on. `state` is handed over (`kept_state`):
        the caller neither writes to it nor lets anything else do so afterwards."""
        st = self.slots[shard]
        if version != st.version:
            raise ValueError(f"{self._slot_name(shard)}: fetched version {version}, issued {st.version}")
        products = self._checked.pop(shard, None)
        if products is not None and products.source is not state:
            products = None
        self._set_checkpoint(st, kept_state(state), version, products=products)
        self.fetches += 1

    def replay_pending(self) -> list[int]:
        """Every slot with updates since its checkpoint brought to its last issued version here
        (`replay`), when no node can be asked: the slots whose checkpoint changed."""
        changed = []
        for s, st in enumerate(self.slots):
            if st.version != st.checkpoint_version:
                self.accept_state(s, self.replay(s), st.version)
                changed.append(s)
        return changed


class ResidentBasis:
    """The reparameterization w1[P_s] = M_s V_s (the network the resident disguise trains), and
    V_0. Drawn from the run's secret generator, so a resumed run and the centralized reference
    draw the same."""

    def __init__(
        self,
        active: np.ndarray,
        shards: int,
        hidden: int,
        rng: np.random.Generator,
        inputs: int = 784,
        clear: bool = False,
        layers: tuple[int, ...] = (),
    ):
        self.inputs = inputs
        self.hidden = hidden
        self.blocks = [np.asarray(active)[b] for b in balanced_blocks(len(active), shards, rng)]
        self.mix = [Mixing(len(b), rng, MIX_GROUP, MIX_SPREAD, identity=clear) for b in self.blocks]
        # V_0: i.i.d. Gaussian in each node's basis (its covariance says nothing about M_s); the
        # network's initial w1 is then M_s V_0 on each block, zero on pixels blank in every image.
        self.v0 = [rng.standard_normal((len(b), hidden)) / math.sqrt(inputs) for b in self.blocks]
        # N: one secret mixing of the hidden units (w1[P_s] = M_s V_s N^-1), so the dz1 a node is
        # sent is dz1 N^-T: no clear delta reaches it (its values, ReLU zeros included)
        self.out_mix = Mixing(hidden, rng, MIX_GROUP, MIX_SPREAD, identity=clear)
        # The hidden-to-hidden layers' bases, drawn after the first layer's (so its draws stand)
        self.hidden_layers: dict[int, HiddenBasis] = {}
        for layer in range(2, len(layers) - 1):
            if layers[layer - 1] >= shards:
                self.hidden_layers[layer] = HiddenBasis(layers[layer - 1], layers[layer], shards, rng, clear)

    def to_pixels(self, vs: list[np.ndarray]) -> np.ndarray:
        """[V_s] -> w1 (784, h1) in the pixel basis: w1[P_s] = M_s V_s N^-1."""
        return _to_full(self, self.inputs, self.hidden, vs)

    def from_pixels(self, w: np.ndarray) -> list[np.ndarray]:
        """w1 (784, h1) -> [V_s = M_s^-1 w1[P_s] N]."""
        return _from_full(self, w)

    def precondition(self, g: np.ndarray) -> np.ndarray:
        """A pixel-basis gradient g (784, h1) as the step SGD in the V basis takes in the pixel
        basis: M_s M_s^T g[P_s] N^-T N^-1 on each block (zero elsewhere: blank pixels never move)."""
        return _precondition(self, g)


def resident_basis(
    train: np.ndarray, shards: int, layers: int | tuple[int, ...], rng: np.random.Generator, clear: bool = False
) -> ResidentBasis:
    """The basis a resident run draws first from its secret generator: pixels nonzero in some
    standardized training image are split into `shards` blocks (the rest never leave), then each
    hidden-to-hidden layer's input units. `layers`: the network's widths (an int: 784-that-10).
    `clear`: the audit's and the bench's control, no mixing."""
    widths = (train.shape[1], layers, 10) if isinstance(layers, int) else tuple(layers)
    return ResidentBasis(np.flatnonzero(np.any(train != 0, axis=0)), shards, widths[1], rng, clear=clear, layers=widths)


class HiddenBasis:
    """A hidden-to-hidden layer's reparameterization w[Q_s] = M_s V_s N^-1: k secret blocks Q_s of
    its input units, a secret block-diagonal mixing M_s of each, one secret block-diagonal mixing
    N of its output units (so the deltas a node is sent, dz N^-T, have no exact zeros where a
    unit is off), and V_0 i.i.d. Gaussian in each node's basis."""

    def __init__(self, units: int, width: int, shards: int, rng: np.random.Generator, clear: bool = False):
        self.units, self.width = units, width
        self.blocks = balanced_blocks(units, shards, rng)
        self.mix = [Mixing(len(b), rng, MIX_GROUP, MIX_SPREAD, identity=clear) for b in self.blocks]
        self.out_mix = Mixing(width, rng, MIX_GROUP, MIX_SPREAD, identity=clear)
        self.v0 = [rng.standard_normal((len(b), width)) / math.sqrt(units) for b in self.blocks]

    def to_units(self, vs: list[np.ndarray]) -> np.ndarray:
        """[V_s] -> w (n, m): w[Q_s] = M_s V_s N^-1."""
        return _to_full(self, self.units, self.width, vs)

    def from_units(self, w: np.ndarray) -> list[np.ndarray]:
        """w -> [V_s = M_s^-1 w[Q_s] N]."""
        return _from_full(self, w)

    def precondition(self, g: np.ndarray) -> np.ndarray:
        """The V-basis SGD step seen in the units' basis: M_s M_s^T g[Q_s] N^-T N^-1 on each block."""
        return _precondition(self, g)


def _momentum_step(buf: np.ndarray, value: np.ndarray, g: np.ndarray, lr: float) -> None:
    """buf = MOMENTUM buf + g; value += lr buf, in place."""
    buf *= MOMENTUM
    buf += g
    value += lr * buf


@dataclass
class Pending:
    """One issued update: state version `version` = version - 1 plus lr * (mu buf + S[rows]^T dz)."""

    version: int
    rows: np.ndarray  # node rows (indices into the slot's static block)
    dz: np.ndarray  # (b, h1) in the preset's dtype, as sent
    lr: float


@dataclass
class SlotState:
    """The coordinator's knowledge of one slot: its secrets, what it tracks of the node's state,
    the last checkpoint and the updates issued since."""

    pixels: np.ndarray
    mix: Mixing
    loadings: np.ndarray  # H_s (r, |P_s|)
    row_order: np.ndarray  # node row i is original row row_order[i]
    row_index: np.ndarray  # original row j is node row row_index[j]
    static: np.ndarray  # S_s, the preset's dtype, node order
    hm: np.ndarray  # H M (r, |P_s|)
    b1: np.ndarray  # B_s = H M M^T (r, |P_s|)
    b2: np.ndarray  # B_s H^T (r, r)
    probe_terms: Probes  # R (h1, q) and what the checks read of it
    hmv: np.ndarray  # H M V (r, h1) of the last checkpoint (the disguise tracks their sum)
    hmbuf: np.ndarray  # H M buf of the last checkpoint
    vr: np.ndarray  # V R (|P_s|, q)
    bufr: np.ndarray  # buf R
    v_bound: float  # an upper bound on ||V||_F (for the checks' rounding bound)
    drift: float  # an upper bound on how far a node's V may be from the coordinator's recurrence
    checkpoint: tuple[np.ndarray, np.ndarray]  # (V, buf) float64 at `version`: views of `checkpoint_state`
    checkpoint_state: np.ndarray  # [V; buf] (2|P_s|, h1), read-only: the slot's state static
    checkpoint_version: int = 0
    version: int = 0  # the version of the last issued update
    row_norm: float = 0.0  # ||S[rows]||_F of the rows last gathered (the update's bound)
    log: list[Pending] = field(default_factory=list)

    @property
    def probes(self) -> np.ndarray:
        """R (h1, q), the slot's secret probe columns."""
        return self.probe_terms.r


def _norm_bound(v: np.ndarray) -> float:
    return float(np.linalg.norm(v))


class ResidentDisguise(SlotCheckpoints):
    """Slot secrets, statics, the per-step batches and their undoing, the checks and the
    checkpoints of the resident disguise (module docstring). `x` is the standardized training
    matrix (n, 784) in the preset's dtype; blank pixels (zero in every image) are not in `basis`."""

    def __init__(self, x: np.ndarray, basis: ResidentBasis, rng: np.random.Generator, noise_rank: int = NOISE_RANK):
        self.x = x
        self.dtype = x.dtype
        self.basis = basis
        self.hidden = basis.hidden
        self.eps = float(np.finfo(self.dtype).eps)
        n = x.shape[0]
        r = noise_rank  # 0: the clear control (no noise)
        self.factors = rng.standard_normal((n, r))  # G: per image, for the whole run
        self.slots: list[SlotState] = []
        for block, mix, v0 in zip(basis.blocks, basis.mix, basis.v0):
            h = rng.standard_normal((r, len(block))) / math.sqrt(max(r, 1))
            order = rng.permutation(n)
            noisy = np.take(x, order, axis=0)[:, block].astype(np.float64)
            noisy += np.take(self.factors, order, axis=0) @ h
            static = mix.right(noisy, self.dtype)
            del noisy
            hm = mix.transposed_left(h.T).T  # H M (r, |P|)
            b1 = mix.left(hm.T).T  # H M M^T
            probes = rng.standard_normal((self.hidden, PROBES))
            state = owned_state(np.concatenate([v0, np.zeros_like(v0)]))
            v, buf = state[: len(block)], state[len(block) :]
            self.slots.append(
                SlotState(
                    pixels=block,
                    mix=mix,
                    loadings=h,
                    row_order=order,
                    row_index=inverse_permutation(order),
                    static=static,
                    hm=hm,
                    b1=b1,
                    b2=b1 @ h.T,
                    probe_terms=Probes(probes),
                    hmv=hm @ v,
                    hmbuf=hm @ buf,
                    vr=v @ probes,
                    bufr=buf @ probes,
                    v_bound=_norm_bound(v),
                    drift=0.0,
                    checkpoint=(v, buf),
                    checkpoint_state=state,
                )
            )
        # What the disguise tracks for all slots at once (the slots' blocks are disjoint, and every
        # slot's E follows the same recurrence): sum_s H_s M_s V_s and its momentum, E and its
        # momentum (the noise's share of every V_s is M_s^T H_s^T E), sum_s B_s H_s^T
        self._anchor_noise_sum()
        self.e = np.zeros((r, self.hidden))
        self.ebuf = np.zeros((r, self.hidden))
        self._b2_sum = sum((st.b2 for st in self.slots), np.zeros((r, r)))
        # B^T on the pixels (784, r), B_s^T on each slot's block: x[idx] B^T is one product of
        # the gathered rows for every slot, in the data's dtype for float64 data (exactness) and
        # float32 otherwise (the forward's own precision)
        self._b_all = np.zeros((x.shape[1], r), dtype=np.float64 if self.dtype == np.float64 else np.float32)
        for st in self.slots:
            self._b_all[st.pixels] = st.b1.T
        self._e_rows = r
        self._factors_work = self.factors.astype(self._b_all.dtype)
        self._forward: tuple[np.ndarray, np.ndarray] | None = None  # (idx, x[idx] B_all) of the last forward
        self._rows_cache: dict[int, tuple] = {}  # shard -> (rows, S[rows] float64, its row norms)
        self._checked: dict[int, StateProducts] = {}  # shard -> the products of the last state checked
        self.fetches = 0

    # -- state ----------------------------------------------------------------------
    def state_name(self, shard: int) -> str:
        return f"{STATE_PREFIX}{shard}"

    def state_static(self, shard: int) -> tuple[np.ndarray, int]:
        """Slot `shard`'s checkpoint as the node receives it: [V; buf] (2|P_s|, h1) float64 and its version."""
        st = self.slots[shard]
        return st.checkpoint_state, st.checkpoint_version

    def noise_state(self) -> dict[str, np.ndarray]:
        """Each slot's E and its momentum (float64): kept with every model version, on the
        coordinator only, so a resumed run hands each node its V as it was (with the noise's
        share), not V minus it: the difference would show the node its noise subspace."""
        out = {}
        for s in range(len(self.slots)):  # one E for every slot, kept under each slot's name
            out[f"resident_e{s}"] = self.e.copy()
            out[f"resident_ebuf{s}"] = self.ebuf.copy()
        return out

    def adopt(self, w1: np.ndarray, buf_w1: np.ndarray | None, noise: dict | None = None) -> None:
        """Start from a model version's clean w1 (pixel basis), momentum (or zero) and the noise
        state kept with it (`noise_state`): what a resumed run does."""
        vs = self.basis.from_pixels(w1)
        bufs = self.basis.from_pixels(buf_w1) if buf_w1 is not None else [np.zeros_like(v) for v in vs]
        noise = noise or {}
        # one E for every slot: slot 0's as kept (every slot's is the same), or none
        e, ebuf = noise.get("resident_e0"), noise.get("resident_ebuf0")
        if e is not None and ebuf is not None and e.shape == self.e.shape and ebuf.shape == self.ebuf.shape:
            self.e, self.ebuf = np.array(e, dtype=np.float64), np.array(ebuf, dtype=np.float64)
        else:
            self.e, self.ebuf = np.zeros_like(self.e), np.zeros_like(self.ebuf)
        for st, v, buf in zip(self.slots, vs, bufs):
            v = v + st.mix.transposed_left(st.loadings.T @ self.e)
            buf = buf + st.mix.transposed_left(st.loadings.T @ self.ebuf)
            self._set_checkpoint(st, owned_state(np.concatenate([v, buf])), st.version)

    def _set_checkpoint(
        self,
        st: SlotState,
        state: np.ndarray,
        version: int,
        products: StateProducts | None = None,
    ) -> None:
        """`state` (a read-only [V; buf]: `owned_state`, `kept_state`) becomes the slot's
        checkpoint: the tracked V R and its momentum re-anchored on it (`products`: its
        `state_products`, if checked), and the tracked sum of H M V over the slots once every
        slot's checkpoint is at this version."""
        if products is None:
            products = state_products(state, st.probes, st.hm.T)
        k = st.pixels.shape[0]
        st.checkpoint_state = state
        st.checkpoint = (state[:k], state[k:])
        st.checkpoint_version = version
        st.version = version
        st.log = [p for p in st.log if p.version > version]
        st.hmv, st.hmbuf = products.left[0], products.left[1]
        st.vr, st.bufr = products.right[:k], products.right[k:]
        st.v_bound, st.drift = products.v_norm, 0.0
        # between two such versions the sum follows the recurrence (which every checkpoint
        # also follows, to float64 rounding of the node's arithmetic)
        if all(other.checkpoint_version == version for other in self.slots):
            self._anchor_noise_sum()

    def _anchor_noise_sum(self) -> None:
        """The tracked sum over slots of H M V and H M buf, from each slot's checkpoint."""
        self.hmv = np.sum([st.hmv for st in self.slots], axis=0)
        self.hmbuf = np.sum([st.hmbuf for st in self.slots], axis=0)

    def clean(self) -> tuple[np.ndarray, np.ndarray]:
        """(w1, buf_w1) of the clean network in the pixel basis, from the last checkpoints
        (call after `fetch_all`)."""
        vs, bufs = [], []
        for st in self.slots:
            v, buf = st.checkpoint
            noise_v = st.mix.transposed_left(st.loadings.T @ self.e)  # M^T H^T E
            noise_b = st.mix.transposed_left(st.loadings.T @ self.ebuf)
            vs.append(v - noise_v)
            bufs.append(buf - noise_b)
        return self.basis.to_pixels(vs), self.basis.to_pixels(bufs)

    # -- per step -------------------------------------------------------------------
    def batch(
        self, shard: int, rows: np.ndarray | None, start: int, version: int, fetch: bool
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """A batch taking the node's state from version `start` to `version` (the logged updates
        in between) and then computing the forward of `rows` (or, `fetch`, returning its state)."""
        st = self.slots[shard]
        updates = [p for p in st.log if start < p.version <= version]
        params = {
            "a_static": f"train.{shard}",
            "state": self.state_name(shard),
            "from": int(start),
            "version": int(version),
            "momentum": MOMENTUM,
            "lr": [float(p.lr) for p in updates],
            "fetch": bool(fetch),
        }
        arrays: dict[str, np.ndarray] = {}
        if not fetch:
            assert rows is not None, "a forward names its rows"
            arrays["rows"] = rows
        if updates:
            arrays["update_rows"] = np.stack([p.rows for p in updates])
            arrays["dz"] = np.concatenate([p.dz for p in updates])
        return params, arrays

    def replay_from(self, shard: int) -> int:
        """The version a node that takes slot `shard` over starts from (its state static's)."""
        return self.slots[shard].checkpoint_version

    def _noise_rows(self, idx: np.ndarray) -> np.ndarray:
        """[G[idx] | x[idx] B^T] (b, 2 r), in the work dtype: what the step's corrections and
        tracking multiply (kept from the forward for the update)."""
        if self._forward is not None and self._forward[0] is idx:
            return self._forward[1]
        gx = np.empty((idx.shape[0], self._b_all.shape[1] + self._e_rows), dtype=self._b_all.dtype)
        np.take(self._factors_work, idx, axis=0, out=gx[:, : self._e_rows])
        np.matmul(np.take(self.x, idx, axis=0), self._b_all, out=gx[:, self._e_rows :])
        self._forward = (idx, gx)
        return gx

    def combine(self, idx: np.ndarray, results: list[np.ndarray]) -> np.ndarray:
        """The clean z1 (b, h1) without biases from the slots' results y_s for rows idx:
        sum_s y_s - G[idx] (sum_s H_s M_s V_s) - (x[idx] B^T) E, one product; in the work dtype
        (the data's for float64, float32 otherwise: the forward's own precision)."""
        gx = self._noise_rows(idx)
        r = self._e_rows
        w = np.empty((gx.shape[1], self.hidden), dtype=gx.dtype)  # the tracked matrices, negated
        np.negative(self.hmv, out=w[:r])
        np.negative(self.e, out=w[r:])
        z = gx @ w
        for y in results:
            z += y
        return self.basis.out_mix.right(z, z.dtype, inverse=True)  # the nodes' hidden units are N-mixed

    def update(self, idx: np.ndarray, dz: np.ndarray, lr: float) -> None:
        """Issue this step's update (dz: the ascent-direction delta (b, h1)) and track what it
        does to every slot's state. It reaches the nodes with the next forward (or fetch)."""
        gx = self._noise_rows(idx)
        self._forward = None
        r = self._e_rows
        # the nodes' V columns are the hidden units mixed by N: they are sent dz N^-T (mixed in
        # dz's dtype when it is the preset's: float32 arithmetic for a float32 step)
        sent = np.ascontiguousarray(self.basis.out_mix.right(np.asarray(dz), self.dtype, transposed=True, inverse=True))
        d64 = sent.astype(np.float64, copy=False)
        # [G^T dz; B x^T dz]: the noise's share (the same for every slot), then sum_s H_s M_s
        # M_s^T x[:, P_s]^T dz, in one product
        tracked = (gx.T @ sent.astype(gx.dtype, copy=False)).astype(np.float64, copy=False)
        gd = tracked[:r]
        # sum_s H_s M_s g_s = B x^T dz + (sum_s B_s H_s^T) G^T dz, with g_s slot s's V gradient
        hmg = tracked[r:]
        hmg += self._b2_sum @ gd
        _momentum_step(self.hmbuf, self.hmv, hmg, lr)
        _momentum_step(self.ebuf, self.e, gd, lr)
        dz_norm = float(np.sqrt(np.dot(d64.ravel(), d64.ravel())))
        dz_probes = d64 @ self.slots[0].probes if self.slots else None
        for s, (st, rows) in enumerate(zip(self.slots, self.node_rows(idx))):
            srows = self._static_rows(s, rows)
            st.version += 1
            st.log.append(Pending(version=st.version, rows=rows, dz=sent, lr=float(lr)))
            # g R = S^T (dz R)
            probes = dz_probes if st.probes is self.slots[0].probes else d64 @ st.probes
            _momentum_step(st.bufr, st.vr, srows.T @ probes, lr)
            g_bound = st.row_norm * dz_norm
            st.v_bound += lr * g_bound / (1.0 - MOMENTUM)
            st.drift += lr * EPS64 * g_bound * math.sqrt(srows.shape[0]) / (1.0 - MOMENTUM)

    def node_rows(self, idx: np.ndarray) -> list[np.ndarray]:
        """Each slot's node rows for training rows idx (kept for this step's update)."""
        cached = getattr(self, "_node_rows", None)
        if cached is not None and cached[0] is idx:
            return cached[1]
        rows = [np.take(st.row_index, idx).astype(np.int64) for st in self.slots]
        self._node_rows = (idx, rows)
        return rows

    def _static_rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """S_s[rows] in float64, kept from the check of a forward for the update of the same rows."""
        cached = self._rows_cache.get(shard)
        if cached is not None and cached[0] is rows:
            return cached[1]
        srows = np.take(self.slots[shard].static, rows, axis=0).astype(np.float64)
        norms = row_norms(srows)
        self._rows_cache[shard] = (rows, srows, norms)
        self.slots[shard].row_norm = float(np.sqrt(np.dot(norms, norms)))
        return srows

    # -- checks ---------------------------------------------------------------------
    def check_forward(self, shard: int, rows: np.ndarray, y: np.ndarray) -> str | None:
        """Freivalds on y = S[rows] V at the slot's current version: y R against S[rows] (V R).
        A node computes y in float64 and rounds it once to the static's dtype, so the bound is
        that rounding (|y_ij| eps per entry, adding up over the probe as a random walk) plus
        float64 rounding of the product and of the state's recurrence. None when it holds."""
        st = self.slots[shard]
        if y.shape != (rows.shape[0], self.hidden):
            return f"result shape {y.shape}, expected {(rows.shape[0], self.hidden)}"
        srows = self._static_rows(shard, rows)
        norms = self._rows_cache[shard][2]
        return probe_check(y, srows, st.probe_terms, st.vr, self.eps, st.v_bound, st.drift, norms)

    def check_state(self, shard: int, state: np.ndarray) -> str | None:
        """A fetched [V; buf] against the tracked V R and buf R."""
        st = self.slots[shard]
        k = st.pixels.shape[0]
        if state.shape != (2 * k, self.hidden):
            return f"state shape {state.shape} (expected {(2 * k, self.hidden)}) or non-finite entries"
        products = self._checked[shard] = state_products(state, st.probes, st.hm.T)  # kept for accept_state
        if not products.finite:
            return f"state shape {state.shape} (expected {(2 * k, self.hidden)}) or non-finite entries"
        tol = CHECK_SLACK * st.probe_terms.rms * math.sqrt(self.hidden) * (st.drift + EPS64 * st.v_bound)
        for name, got, want in (("V", products.right[:k], st.vr), ("momentum", products.right[k:], st.bufr)):
            err = float(np.abs(got - want).max())
            if err > tol:
                return f"checkpoint {name} R differs from the tracked one by {err:.3e} (bound {tol:.3e})"
        return None

    def replay(self, shard: int) -> np.ndarray:
        """Slot `shard`'s state at its last issued version, computed here from its checkpoint and
        the logged updates (what a node would return to a fetch): for writing a model version
        when no node can be asked, e.g. a stop while every node is gone. Costs the products."""
        st = self.slots[shard]
        v, buf = (np.array(a) for a in st.checkpoint)
        for p in st.log:
            srows = np.take(st.static, p.rows, axis=0).astype(np.float64)
            buf *= MOMENTUM
            buf += srows.T @ p.dz.astype(np.float64)
            v += p.lr * buf
        return np.concatenate([v, buf])
