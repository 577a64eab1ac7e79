"""The network's products as disguised batches: the coordinator side of distribution.

`DistributedCompute` offers the same methods as `enshuffle.model.LocalCompute`, so the one
training step in `enshuffle.model` runs unchanged. Only the two wide products go to nodes; both
contract over the image's pixels, split into k secret blocks P_s (one per *slot*, a node's place
in the run):

| call | product                 | node s receives (disguise "share", the default)                | result          |
|------|-------------------------|----------------------------------------------------------------|-----------------|
| x_w1 | X (b,784) @ w1          | row indices into its static block; M_s^-1 D_s w1[P_s] (mixed)  | summed          |
| dw1  | X^T @ dz1 -> (784,128)  | row indices; dz1 (rows and units shuffled, power-of-two scaled)| rows P_s placed |

Everything that depends on labels, and the thin products, stay here: softmax/loss, dz2,
a1 @ w2, a1^T @ dz2 and dz2 @ w2^T (docs/design.md, "Privacy"). No node receives labels,
outputs, dz2, w2 or activations.

The disguise "share" hides values, not only positions. Node s holds, for the whole run,

    S_s = (x[:, P_s] D_s^-1 + G H_s) M_s        rows in a secret order

- x are the raw pixels (0..255; the preset's standardization x*alpha + beta is applied here, so a
  zero pixel stays an exact zero), D_s = diag(rms x_j) gives every column the same energy.
- G H_s is secret Gaussian noise of rank NOISE_RANK with the pixels' own scale: G (n, r) is fresh
  for every image, so each row carries r more unknowns than the node has equations. Even a node
  that knew M_s and H_s could not solve a row for its pixels; it cannot learn M_s either, since
  unmixing needs the sources and the noise makes the mixture underdetermined (K + r sources seen
  through K columns).
- M_s is a secret block-diagonal mixing (dense 32x32 blocks, condition <= 4): no column of S_s is
  a pixel, no value of it a pixel value, and w1's rows reach the node only as M_s^-1 D_s w1[P_s].
- Corrections cost the coordinator little: x_w1 subtracts G[idx] (sum_s H_s D_s w1[P_s]) and dw1
  subtracts H_s^T (G[idx]^T dz1): r * 128 * (b + 784) multiply-adds each, plus the mixing
  (784 * 32 * 128 each way). Rounding stays at the pixels' own scale, so distributed training
  equals the centralized run to float rounding.

The disguise "shuffle" is the old permutation-and-power-of-two disguise (pixel blocks in the clear
up to scale), kept as the audit's control: it shows what the attacks recover from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from enshuffle import batch as vocabulary
from enshuffle.coordinator.ledger import (CLEAR, HIDDEN_VALUES, POSITIONS_HIDDEN, ExposureLedger, activation_kind,
                                          delta_kind, ledger_axes)
from enshuffle.coordinator.plan import (Disguise, balanced_blocks, gather, inverse_permutation, pow2,
                                        random_exponents)
from enshuffle.coordinator.offload import CostModel, check_offload, decide, plan_lines, step_plan
from enshuffle.coordinator.resident import NOISE_RANK as RESIDENT_NOISE_RANK
from enshuffle.coordinator.resident import CHECKPOINT_STEPS, ResidentDisguise, resident_basis
from enshuffle.coordinator.resident_hidden import HiddenResident
from enshuffle.kernels import ResidentState, compute_batch
from enshuffle.model import INPUTS, NOTEBOOK_LAYERS, w1_momentum_step

DISGUISES = ("resident", "share", "shuffle", "resident-clear")  # resident-clear: the resident design's control
NOISE_RANK = 32  # r: per-image Gaussian factors in every static block
NOISE_SCALE = 1.0  # std of each noise element, in units of a normalized pixel's root mean square
MIX_GROUP = 32  # mixing blocks: 32x32 dense, so mixing costs 32 multiply-adds per element
SOURCE_CHUNK_ROWS = 512  # rows of raw pixels converted to float64 at a time (fits in cache)
# Hidden-to-hidden layers (docs/design.md, "Hidden layers"): each batch's block of input units is
# mixed with a fresh secret block-diagonal matrix of HIDDEN_MIX_GROUP and carries fresh noise of
# rank HIDDEN_NOISE_RANK; the corrections cost the coordinator about (r + g) / b of the product.
HIDDEN_NOISE_RANK = 8
HIDDEN_MIX_GROUP = 8
# No batch's operands, nor the memory its node needs for it (gathered rows and result), exceed
# this: a larger product goes out as several batches of whole rows (docs/protocol.md section 7),
# within every node's default --max-memory (at least 64 MiB) and far under the message limits.
CHUNK_BYTES = 32 << 20
# Products over an image block (static operand) are split only above this, the default
# --max-memory of a node with 2 GB of RAM or more: a full seed batch (60,000 rows, counted with
# 188 MB of gathered rows) stays one batch, checked with the block's fixed probes in one pass;
# split into row chunks, each chunk's check re-reads its rows of the block (+0.3 s of coordinator
# CPU per epoch, measured).
STATIC_CHUNK_BYTES = 512 << 20
DECOY_RANK = 2  # per class and batch: dz1's mean and this many principal directions move to other rows
DECOY_GRAM_ROWS = 1024  # full batch: a class's principal directions are estimated from this many of its rows


@dataclass
class Batch:
    """One unit of work for one slot: a BATCH's op, params and arrays (their meaning, shape and
    work are `enshuffle.batch`'s). `exposure` is what the receiving node learns."""

    shard: int
    op: str
    params: dict
    arrays: dict[str, np.ndarray]
    exposure: list[tuple] = field(default_factory=list)
    static_cols: int = 0  # columns of the static operand it names (for sizing chunks; not sent)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def default_disguise(preset) -> str:
    """A preset whose first layer trains with momentum keeps it resident on the nodes; the others
    (the seed preset, exact against the notebook) re-send it each step under the share disguise."""
    return "resident" if getattr(preset, "w1_optimizer", "same") == "momentum" else "share"


class Executor(Protocol):
    def run(self, batches: list[Batch]) -> list[np.ndarray]:
        """Compute every batch (on whichever node holds its slot) and return the results in order."""

    def step_done(self) -> None:
        """A step boundary: where membership changes may take effect."""


class BlockMix:
    """A secret invertible (K, K) matrix M, block-diagonal with dense blocks of MIX_GROUP:
    each block is Q1 · diag(d) · Q2 with random orthogonal Q1, Q2 and d in [1/2, 2], so M's
    condition number is at most 4 and M^-1 is exact up to rounding.

    The full blocks are also kept stacked, (g, MIX_GROUP, MIX_GROUP), so applying M or M^-1 to
    a (K, m) operand is one batched product instead of a Python loop over K / 32 blocks."""

    def __init__(self, size: int, rng: np.random.Generator, group: int = MIX_GROUP):
        self.bounds = [(lo, min(lo + group, size)) for lo in range(0, size, group)]
        self.blocks, self.inverses = [], []
        for lo, hi in self.bounds:
            g = hi - lo
            q1, _ = np.linalg.qr(rng.standard_normal((g, g)))
            q2, _ = np.linalg.qr(rng.standard_normal((g, g)))
            d = np.exp2(rng.uniform(-1.0, 1.0, g))
            self.blocks.append((q1 * d) @ q2)
            self.inverses.append((q2.T / d) @ q1.T)
        self.group = group
        self.full = size // group * group  # rows covered by whole blocks
        whole = len(self.bounds) if self.full == size else len(self.bounds) - 1
        self._inv = np.stack(self.inverses[:whole]) if whole else np.zeros((0, group, group))
        self._inv_t = np.ascontiguousarray(self._inv.transpose(0, 2, 1))

    def right(self, x: np.ndarray, dtype) -> np.ndarray:
        """(n, K) -> x @ M, block by block."""
        out = np.empty(x.shape, dtype=dtype)
        for (lo, hi), m in zip(self.bounds, self.blocks):
            np.matmul(x[:, lo:hi], m, out=out[:, lo:hi])
        return out

    def _left(self, stacked: np.ndarray, tail: np.ndarray | None, w: np.ndarray) -> np.ndarray:
        out = np.empty(w.shape, dtype=np.float64)
        full, g = self.full, self.group
        if full:
            np.matmul(stacked, w[:full].reshape(full // g, g, w.shape[1]),
                      out=out[:full].reshape(full // g, g, w.shape[1]))
        if tail is not None:
            np.matmul(tail, w[full:], out=out[full:])
        return out

    def inverse_left(self, w: np.ndarray) -> np.ndarray:
        """(K, m) -> M^-1 @ w."""
        return self._left(self._inv, self.inverses[-1] if self.full < w.shape[0] else None, w)

    def right_transposed(self, x: np.ndarray) -> np.ndarray:
        """(n, K) -> x @ M^T, block by block (undoes a node's d @ (M^-1 w)^T = d w^T M^-T)."""
        out = np.empty(x.shape, dtype=np.float64)
        for (lo, hi), m in zip(self.bounds, self.blocks):
            np.matmul(x[:, lo:hi], m.T, out=out[:, lo:hi])
        return out

    def inverse_transposed_left(self, r: np.ndarray) -> np.ndarray:
        """(K, m) -> M^-T @ r: undoes a node's (x M)^T @ d = M^T (x^T d)."""
        return self._left(self._inv_t, self.inverses[-1].T if self.full < r.shape[0] else None, r)


@dataclass
class ShardStatics:
    """Slot s's secrets: its pixel block's row order, mixing, noise loadings (or, for "shuffle",
    the static power-of-two column scales)."""

    pixels: np.ndarray  # P_s, in the column order the node holds them
    row_order: dict[str, np.ndarray]  # which -> node row i is original row row_order[which][i]
    row_index: dict[str, np.ndarray]  # which -> original row r is node row row_index[which][r]
    # which -> M_s and H_s (NOISE_RANK, |P_s|): each image set has its own, so a copy of a public
    # test set under a slot's secrets tells nothing about that slot's training block.
    mix: dict[str, BlockMix] = field(default_factory=dict)
    loadings: dict[str, np.ndarray] = field(default_factory=dict)
    pixel_exp: np.ndarray | None = None  # "shuffle" only


def _every_row(idx: np.ndarray, n: int) -> bool:
    """idx is 0..n-1 in order (a full batch): use the array itself instead of a gathered copy."""
    return idx.shape[0] == n and bool(np.array_equal(idx, np.arange(n)))


def static_name(which: str, shard: int) -> str:
    return f"{which}.{shard}"


class DistributedCompute:
    """The model's Compute interface, with the two pixel-wide products executed as disguised
    batches on k slots (see the module docstring)."""

    def __init__(self, images: dict[str, np.ndarray], shards: int, rng: np.random.Generator,
                 executor_factory: Callable[["DistributedCompute"], Executor], *, disguise: str = "share",
                 ledger: ExposureLedger | None = None, disguise_rng: np.random.Generator | None = None,
                 offload: str = "matmul", raw: dict[str, np.ndarray] | None = None,
                 affine: tuple[np.ndarray, np.ndarray] | None = None, hidden: int | None = None,
                 layers: tuple[int, ...] | None = None, cost_model: CostModel | None = None,
                 chunk_bytes: int = CHUNK_BYTES, static_chunk_bytes: int = STATIC_CHUNK_BYTES):
        if shards < 1:
            raise ValueError("need at least one shard")
        if disguise not in DISGUISES:
            raise ValueError(f"disguise must be one of {', '.join(DISGUISES)}")
        check_offload(offload)
        self.offload = offload  # "matmul": ship every product that can go; "auto": only where it pays
        self.cost_model = cost_model or CostModel()
        self.images = images
        self.chunk_bytes = int(chunk_bytes)  # most bytes one batch may need (batch.split)
        self.static_chunk_bytes = int(static_chunk_bytes)  # the same for a product over an image block
        # The network: its first hidden width sizes w1's products; its hidden-to-hidden layers
        # (2 .. L-1) are distributed too. `hidden` alone means 784-hidden-10.
        if layers is None:
            layers = (INPUTS, int(hidden or NOTEBOOK_LAYERS[1]), NOTEBOOK_LAYERS[-1])
        self.layers = tuple(int(n) for n in layers)
        self.hidden = self.layers[1]  # w1's columns: the first hidden layer's width
        self.k = shards
        self.disguise = disguise
        # Two secrets: `rng` draws the run's partitions, noise and mixings (a resumed run must
        # draw the same ones, so the coordinator seeds it from a secret kept in the run dir);
        # per-batch disguises come from fresh OS entropy unless a test passes its own generator.
        # Neither may come from a public seed: a node could replay the draws and undo them.
        self.rng = disguise_rng if disguise_rng is not None else np.random.default_rng()
        self.ledger = ledger if ledger is not None else ExposureLedger(ledger_axes(self.layers))
        # "share" works on raw pixels when it has them (images = raw * alpha + beta, applied here).
        self.source = raw if (raw is not None and affine is not None and disguise == "share") else images
        if self.source is not images:
            self.alpha, self.beta = (np.asarray(a, dtype=np.float64) for a in affine)
        else:
            self.alpha, self.beta = np.ones(INPUTS), np.zeros(INPUTS)
        # D: every pixel column is divided by its root mean square, so all mixed columns carry the
        # same energy (no pixel's scale shows) and a rarely lit pixel keeps its own precision
        # instead of drowning in its neighbours' rounding.
        energy, count = np.zeros(INPUTS), 0
        for x in self.source.values():
            if x.size:
                energy += np.einsum("ij,ij->j", x, x, dtype=np.float64)
                count += x.shape[0]
        scale = np.sqrt(energy / max(count, 1))
        # Pixels that are zero in every image add nothing to any product and have a zero
        # gradient: they stay here, and no node learns which pixels are blank.
        active = np.flatnonzero(scale > 0) if disguise == "share" else np.arange(INPUTS)
        self.resident: ResidentDisguise | None = None
        self.hidden_resident: dict[int, HiddenResident] = {}
        self._momentum_layers: tuple[int, ...] = ()
        self._hidden_local: dict[int, bool] = {}
        self._forward_which = "train"
        if disguise in ("resident", "resident-clear"):
            # The first layer's weights live on the nodes (resident.py): pixels nonzero in some
            # standardized training image are split; the rest never leave.
            clear = disguise == "resident-clear"  # no mixing, no noise: what the audit must break
            self.basis = resident_basis(images["train"], shards, self.layers, rng, clear=clear)
            self.resident = ResidentDisguise(images["train"], self.basis, rng, noise_rank=0 if clear else RESIDENT_NOISE_RANK)
            self._since_checkpoint = 0
            # and each hidden-to-hidden layer's rows, when the trainer steps it with momentum
            # (`adopt` is told which): resident_hidden.py
            self.hidden_resident = {layer: HiddenResident(layer, hb, images["train"].dtype, rng, clear=clear)
                                    for layer, hb in self.basis.hidden_layers.items()}
            self.pixel_blocks = list(self.basis.blocks)
        else:
            self.pixel_blocks = [active[b] for b in balanced_blocks(len(active), shards, rng)]
        self.norm = np.where(scale > 0, scale, 1.0)
        self.noise_seed = [int(v) for v in rng.integers(0, 2**63, size=4)]
        self.statics = []
        for block in (self.pixel_blocks if self.resident is None else []):
            order = {w: rng.permutation(x.shape[0]) for w, x in images.items()}
            st = ShardStatics(pixels=block, row_order=order,
                              row_index={w: inverse_permutation(o) for w, o in order.items()})
            if disguise == "share":
                for which in sorted(images):
                    st.mix[which] = BlockMix(len(block), rng)
                    st.loadings[which] = rng.standard_normal((NOISE_RANK, len(block))) * (NOISE_SCALE / np.sqrt(NOISE_RANK))
            else:
                st.pixel_exp = random_exponents(len(block), rng, True)
            self.statics.append(st)
        self._factors: dict[str, np.ndarray] = {}
        # Per-step constants of the share disguise: D alpha per pixel, and [H D alpha; beta] as
        # one (NOISE_RANK + 1, 784) matrix so x_w1's corrections are a single product.
        self._w_scale = (self.norm * self.alpha)[:, None]
        self._corrections = {}
        for which in images:
            corrections = self._corrections[which] = np.zeros((NOISE_RANK + 1, INPUTS))
            for st in self.statics:
                if which in st.loadings:
                    corrections[:NOISE_RANK, st.pixels] = st.loadings[which] * self._w_scale[st.pixels, 0]
            corrections[NOISE_RANK] = self.beta
        self._full_support: np.ndarray | None = None
        # Hidden-to-hidden layer l (2 .. L-1) contracts over layer l-1's units: k secret blocks of
        # them, drawn after every other secret (so a 2-layer run's draws are unchanged). A layer
        # with fewer units than slots stays here.
        self.unit_blocks: dict[int, list[np.ndarray]] = {}
        for layer in range(2, len(self.layers) - 1):
            if self.layers[layer - 1] >= shards:
                self.unit_blocks[layer] = balanced_blocks(self.layers[layer - 1], shards, rng)
        for layer, hr in self.hidden_resident.items():
            self.unit_blocks[layer] = list(hr.basis.blocks)
        self._hidden_secrets: dict[int, tuple] = {}  # layer -> the forward's secrets, for its backward
        self._train_batch: int | None = None  # rows of a training step (the first one seen)
        self._audit_rows: np.ndarray | None = None
        self._resident_local: bool | None = None
        self.round_trips = 0  # executor.run calls: each is one round trip to every slot's node
        self.executor = executor_factory(self)
        # submit/collect/forget: the executor's own, or for one that only has `run`, batches that
        # wait and go together at collect
        self._batches = self.executor if hasattr(self.executor, "submit") else _RunTogether(self.executor)

    # -- static operands -------------------------------------------------------------
    def factors(self, which: str) -> np.ndarray:
        """G for `which`: (n, NOISE_RANK) standard normal, one row per image (original order),
        drawn from the run's secret; kept here for the corrections."""
        g = self._factors.get(which)
        if g is None:
            tag = sorted(self.images).index(which)
            gen = np.random.default_rng(self.noise_seed + [tag])
            g = self._factors[which] = gen.standard_normal((self.images[which].shape[0], NOISE_RANK))
        return g

    def _factor_rows(self, which: str, idx: np.ndarray) -> np.ndarray:
        g = self.factors(which)
        return g if _every_row(idx, g.shape[0]) else np.take(g, idx, axis=0)

    def _static(self, which: str, st: ShardStatics) -> np.ndarray:
        if self.disguise == "shuffle":
            out = gather(self.images[which], st.row_order[which], st.pixels)
            out *= pow2(st.pixel_exp, out.dtype)[None, :]
            return out
        order = st.row_order[which]
        block = np.take(self.source[which], order, axis=0)[:, st.pixels] / self.norm[st.pixels]
        block += np.take(self.factors(which), order, axis=0) @ st.loadings[which]
        return st.mix[which].right(block, self.images[which].dtype)  # the preset's dtype on the wire

    def static_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """What a node serving slot `shard` must hold before it can compute that slot's batches."""
        if self.resident is not None:
            state, _ = self.resident.state_static(shard)
            out = {static_name("train", shard): self.resident.slots[shard].static,
                   self.resident.state_name(shard): state}
            for hr in self.hidden_resident.values():
                out[hr.state_name(shard)] = hr.state_static(shard)[0]
            return out
        return {static_name(w, shard): self._static(w, self.statics[shard]) for w in self.images}

    def static_fields(self, shard: int, name: str) -> dict:
        """Extra STATIC header fields: a resident state's version."""
        if self.resident is not None and name == self.resident.state_name(shard):
            return {"version": self.resident.state_static(shard)[1]}
        for hr in self.hidden_resident.values():
            if name == hr.state_name(shard):
                return {"version": hr.state_static(shard)[1]}
        return {}

    def _form(self) -> int:
        return CLEAR if self.disguise == "resident-clear" else (
            POSITIONS_HIDDEN if self.disguise == "shuffle" else HIDDEN_VALUES)

    def static_exposure(self, shard: int) -> list[tuple]:
        out = [("images", self.pixel_blocks[shard], self._form()), ("samples", [0], POSITIONS_HIDDEN)]
        if self.resident is not None:  # its block of w1 arrives with the statics, once
            out.append(("w1", self.pixel_blocks[shard], self._form()))
        return out

    def slot_exposure(self, shard: int) -> list[tuple]:
        """Everything a node learns by serving slot `shard` for a run (the exposure bound's unit)."""
        out = self.static_exposure(shard) + [("w1", self.pixel_blocks[shard], self._form()),
                                             ("deltas", np.arange(self.hidden),
                                              self._form() if self.resident is not None else POSITIONS_HIDDEN)]
        for layer in self.unit_blocks:
            out += self._layer_exposure(layer, shard, backward=True, rows_mixed=layer in self.hidden_resident)
        return out

    def _layer_exposure(self, layer: int, shard: int, backward: bool, rows_mixed: bool = False) -> list[tuple]:
        """What one batch of hidden layer `layer` tells slot `shard`'s node: its block of the
        input units (mixed, with noise) and of w{layer}'s rows (mixed); backward also the
        layer's deltas (every unit, shuffled and power-of-two scaled; `rows_mixed`, a resident
        layer's: every row a secret mixture of a group of rows, values hidden)."""
        block = self.unit_blocks[layer][shard]
        out = [(activation_kind(layer - 1), block, HIDDEN_VALUES), (f"w{layer}", block, HIDDEN_VALUES),
               ("samples", [0], POSITIONS_HIDDEN)]
        if backward:
            out.append((delta_kind(layer), np.arange(self.layers[layer]),
                        HIDDEN_VALUES if rows_mixed else POSITIONS_HIDDEN))
        return out

    def audit_truth(self, shard: int) -> dict:
        """Ground truth for `enshuffle audit`'s scorer (never sent anywhere), per static of the
        slot: its pixel block, row order, and each column's dominant pixel (resident: also the
        mixing blocks and the noise loadings)."""
        if self.resident is not None:
            rs = self.resident.slots[shard]
            dominant = np.empty(len(rs.pixels), dtype=np.int64)
            for (lo, hi), m in zip(rs.mix.bounds, rs.mix.blocks):
                dominant[lo:hi] = lo + np.argmax(np.abs(m), axis=0)
            return {static_name("train", shard): {"pixels": rs.pixels.copy(), "row_order": rs.row_order.copy(),
                                                  "column_pixel": rs.pixels[dominant], "which": "train",
                                                  "mix_blocks": [m.copy() for m in rs.mix.blocks],
                                                  "mix_bounds": list(rs.mix.bounds), "loadings": rs.loadings.copy()}}
        st = self.statics[shard]
        out = {}
        for w in self.images:
            if w not in st.mix:
                column_pixel = st.pixels.copy()
            else:
                dominant = np.empty(len(st.pixels), dtype=np.int64)
                for (lo, hi), m in zip(st.mix[w].bounds, st.mix[w].blocks):
                    dominant[lo:hi] = lo + np.argmax(np.abs(m), axis=0)
                column_pixel = st.pixels[dominant]
            out[static_name(w, shard)] = {"pixels": st.pixels.copy(), "row_order": st.row_order[w].copy(),
                                          "column_pixel": column_pixel, "which": w}
        return out

    def audit_hidden(self) -> None:
        """Keep, for `enshuffle audit`'s scorer, each resident hidden layer's per-step secrets
        (its row mixings and the batch's rows); never sent anywhere."""
        for hr in self.hidden_resident.values():
            hr.audit = {}

    def audit_hidden_truth(self, shard: int) -> dict:
        """Ground truth of slot `shard`'s resident hidden layers: per state name, its units Q_s,
        its mixing blocks, and what `audit_hidden` kept per version."""
        out = {}
        for hr in self.hidden_resident.values():
            st = hr.slots[shard]
            out[hr.state_name(shard)] = {"units": st.units.copy(), "mix_blocks": [m.copy() for m in st.mix.blocks],
                                         "mix_bounds": list(st.mix.bounds), "steps": dict(hr.audit or {})}
        return out

    def _send(self, batches) -> tuple[list, list]:
        """Start one round trip: every batch `batches` yields goes out as soon as it is built (if
        the executor can `submit`), so a node computes while the next slot's batch is prepared
        and while the caller does its own share of the product; `_receive` waits for the results.
        A batch larger than `chunk_bytes` (`static_chunk_bytes` over an image block) goes as
        several (`enshuffle.batch.split`)."""
        self.round_trips += 1
        pieces: list[list[tuple[str | None, int]]] = []  # per batch: how its chunks' results combine

        def chunks():
            for batch in batches:
                cap = self.static_chunk_bytes if batch.params.get("a_static") else self.chunk_bytes
                parts, groups = vocabulary.split(batch.op, batch.params, batch.arrays, cap, batch.static_cols)
                pieces.append(groups)
                if parts[0] is batch.arrays:  # it fits: the batch itself
                    yield batch
                else:
                    yield from (Batch(batch.shard, batch.op, batch.params, arrays, batch.exposure, batch.static_cols)
                                for arrays in parts)
                self._keepalive()  # building the next slot's batch of a wide layer takes a while

        handles = []
        try:
            for batch in chunks():
                handles.append(self._batches.submit(batch))
        except BaseException:
            self._batches.forget(handles)
            raise
        return handles, pieces

    def _receive(self, sent: tuple[list, list]) -> list[np.ndarray]:
        handles, pieces = sent
        results = self._batches.collect(handles)
        self._keepalive()
        out, at = [], 0
        for groups in pieces:
            count = sum(c for _, c in groups)
            out.append(vocabulary.combine(results[at:at + count], groups))
            at += count
        return out

    def _keepalive(self) -> None:
        """Let a networked executor service its socket (heartbeats) between long stretches of the
        coordinator's own work: a node calls its coordinator lost after 3 s without a message."""
        keepalive = getattr(self.executor, "keepalive", None)
        if keepalive is not None:
            keepalive()

    def _rows(self, which: str, idx: np.ndarray | None) -> np.ndarray:
        return np.arange(self.images[which].shape[0]) if idx is None else np.asarray(idx)

    # -- the two products that go out -------------------------------------------------
    def ships(self, name: str, b: int, n: int, m: int) -> bool:
        """Does product `name` ((b,n) by (n,m) or its transposes) go to the nodes? (offload.py)"""
        return decide(name, b, n, m, self.k, self.offload, self.cost_model).ship

    def plan(self, batch: int) -> list:
        """The offload plan of one training step of `batch` rows (offload.step_plan)."""
        return step_plan((self._active_pixels(), *self.layers[1:]), batch, self.k, self.offload,
                         self.cost_model, set(self.unit_blocks), resident=self.resident is not None,
                         resident_layers=set(self._momentum_layers or self.hidden_resident))

    def plan_lines(self, batch: int) -> list[str]:
        """The plan as printed at start."""
        return plan_lines(self.plan(batch), self.cost_model, self.offload, batch)

    def _active_pixels(self) -> int:
        return sum(len(block) for block in self.pixel_blocks)

    # -- the resident first layer (resident.py) -----------------------------------------
    def _resident_home(self) -> bool:
        """Does the resident first layer stay here (shipping it does not pay under --offload auto)?
        Decided once per run from the training batch, since its state lives where it trains."""
        if self._resident_local is None:
            b = self._train_batch or self.images["train"].shape[0]
            self._resident_local = not self.ships("resident", b, self._active_pixels(), self.hidden)
        return self._resident_local

    def adopt(self, params: dict[str, np.ndarray], opt, fresh: bool, momentum_layers: tuple[int, ...] = ()) -> None:
        """The trainer's parameters at the start (`fresh`) or after a resume: a fresh run's w1 is
        M_s V_0 on each block (and each momentum hidden layer's w likewise); a resumed one's
        clean weights and momentum become every slot's state."""
        if self.resident is None:
            return
        self._momentum_layers = tuple(layer for layer in momentum_layers if layer in self.hidden_resident)
        if fresh:
            params["w1"] = self.basis.to_pixels(self.basis.v0).astype(params["w1"].dtype)
            for layer in self._momentum_layers:
                hb = self.hidden_resident[layer].basis
                params[f"w{layer}"] = hb.to_units(hb.v0).astype(params[f"w{layer}"].dtype)
            return
        self.resident.adopt(params["w1"], opt.moments.get("buf_w1"),
                            {k: v for k, v in opt.moments.items() if k.startswith("resident_")})
        for layer in self._momentum_layers:
            self.hidden_resident[layer].adopt(params[f"w{layer}"], opt.moments.get(f"buf_w{layer}"))
        self._statics_changed(range(self.k), reset=True)

    def _statics_changed(self, shards, reset: bool = False) -> None:
        """Tell the executor these slots' state statics are a new checkpoint (`reset`: a resumed
        run's, which replaces what nodes hold)."""
        changed = getattr(self.executor, "statics_changed", None)
        if changed is not None:
            for shard in shards:
                changed(shard, reset=reset)

    def _resident_batch(self, shard: int, params: dict, arrays: dict) -> Batch:
        st = self.resident.slots[shard]
        # dz1 reaches the node with its rows, its units mixed by the secret N (clear in the control)
        exposure = [("w1", st.pixels, self._form()), ("samples", [0], POSITIONS_HIDDEN),
                    ("deltas", np.arange(self.hidden), self._form())]
        return Batch(shard, "resident", params, arrays, exposure)

    def _hidden_of(self, batch: Batch) -> HiddenResident | None:
        """The hidden layer whose state a resident batch names (None: the first layer's)."""
        for hr in self.hidden_resident.values():
            if batch.params.get("state") == hr.state_name(batch.shard):
                return hr
        return None

    def replay_from(self, batch: Batch) -> int:
        """The version a node that takes over `batch`'s state starts from (its state static's)."""
        hr = self._hidden_of(batch)
        return (hr or self.resident).replay_from(batch.shard)

    def fit_batch(self, batch: Batch, held: int | None) -> Batch:
        """`batch` for a node whose state for its slot is at version `held` (None: the node gets
        the slot's state static first, at its checkpoint's version): the updates it lacks."""
        if batch.op != "resident":
            return batch
        start = self.replay_from(batch) if held is None else held
        if start == batch.params["from"]:
            return batch
        hr = self._hidden_of(batch)
        if hr is not None:
            if start == batch.params["version"] and batch.arrays.get("a") is None:
                # a fetch from a node already at the version: it keeps the last update, which the
                # node applies idempotently (a BATCH carries at least one array)
                return batch
            params, arrays = hr.batch(batch.shard, start, batch.params["version"], a=batch.arrays.get("a"),
                                      fetch=bool(batch.params.get("fetch")),
                                      backward=bool(batch.params.get("backward")))
            return self._hidden_batch(hr, batch.shard, params, arrays)
        params, arrays = self.resident.batch(batch.shard, batch.arrays.get("rows"), start,
                                             batch.params["version"], bool(batch.params.get("fetch")))
        return self._resident_batch(batch.shard, params, arrays)

    def check_resident(self, batch: Batch, c: np.ndarray) -> str | None:
        """The probe check of a resident result (resident.py, resident_hidden.py): None if it holds."""
        hr = self._hidden_of(batch)
        if hr is not None:
            return hr.check(batch.shard, batch.params, batch.arrays, c)
        if batch.params.get("fetch"):
            return self.resident.check_state(batch.shard, c)
        return self.resident.check_forward(batch.shard, batch.arrays["rows"], c)

    def _hidden_batch(self, hr: HiddenResident, shard: int, params: dict, arrays: dict) -> Batch:
        return Batch(shard, "resident", params, arrays, self._layer_exposure(hr.layer, shard, backward=True,
                                                                             rows_mixed=True))

    def _hidden_home(self, layer: int, b: int) -> bool:
        """Does resident hidden layer `layer` stay here (shipping does not pay under --offload
        auto)? Decided once per run, since its state lives where it trains."""
        if layer not in self._hidden_local:
            n, m = self.layers[layer - 1], self.layers[layer]
            self._hidden_local[layer] = not self.ships(f"resident{layer}", b, n, m)
        return self._hidden_local[layer]

    def _hidden_shipped(self) -> list[HiddenResident]:
        return [self.hidden_resident[layer] for layer in self._momentum_layers
                if not self._hidden_local.get(layer, True)]

    def hidden_step(self, a: np.ndarray, dz: np.ndarray, params: dict[str, np.ndarray], layer: int, lr: float,
                    opt, labels: np.ndarray | None = None) -> np.ndarray:
        """A momentum hidden layer's backward and step: resident on the nodes (each returns its
        block of da and steps its V), or here as the centralized reference does; under a
        disguise without resident weights, its two products go as `dw_da` sends them."""
        name = f"w{layer}"
        if self.resident is None:
            g, da = self.dw_da(a, dz, params[name], layer, labels)
            w1_momentum_step(params, opt, np.asarray(g, dtype=np.float64), lr, name)
            return da
        if layer not in self._momentum_layers or self._hidden_home(layer, a.shape[0]):
            da = dz @ params[name].T
            g = a.T.astype(np.float64) @ dz.astype(np.float64)
            if layer in self.hidden_resident:
                g = self.hidden_resident[layer].basis.precondition(g)
            w1_momentum_step(params, opt, g, lr, name)
            return da
        hr = self.hidden_resident[layer]
        if hr.audit is not None:
            hr.audit_rows = self._audit_rows
        hr.backward_operands(a, dz, lr, self.rng)
        batches = []
        for s, st in enumerate(hr.slots):
            params_s, arrays = hr.batch(s, max(st.checkpoint_version, st.version - 1), st.version, backward=True)
            batches.append(self._hidden_batch(hr, s, params_s, arrays))
        results = self._receive(self._send(batches))
        da = hr.combine_backward([np.asarray(r) for r in results], a.shape[0])
        hr.track()
        return da.astype(dz.dtype, copy=False)

    def _resident_forward(self, idx: np.ndarray) -> np.ndarray:
        batches = []
        for s, (st, rows) in enumerate(zip(self.resident.slots, self.resident.node_rows(idx))):
            start = max(st.checkpoint_version, st.version - 1)
            params, arrays = self.resident.batch(s, rows, start, st.version, fetch=False)
            batches.append(self._resident_batch(s, params, arrays))
        results = self._receive(self._send(batches))
        return self.resident.combine(idx, [np.asarray(r) for r in results])

    def _resident_fetch(self) -> None:
        """Every slot's state after the issued updates (the first layer's and each shipped hidden
        layer's), checked and made the checkpoint."""
        batches = []
        for s, st in enumerate(self.resident.slots):
            if st.version == st.checkpoint_version:
                continue
            params, arrays = self.resident.batch(s, None, max(st.checkpoint_version, st.version - 1),
                                                 st.version, fetch=True)
            batches.append(self._resident_batch(s, params, arrays))
        for hr in self._hidden_shipped():
            for s, hst in enumerate(hr.slots):
                if hst.version != hst.checkpoint_version:
                    params, arrays = hr.batch(s, max(hst.checkpoint_version, hst.version - 1), hst.version, fetch=True)
                    batches.append(self._hidden_batch(hr, s, params, arrays))
        self._since_checkpoint = 0
        if not batches:
            return
        for batch, state in zip(batches, self._receive(self._send(batches))):
            owner = self._hidden_of(batch) or self.resident
            owner.accept_state(batch.shard, np.asarray(state, dtype=np.float64), batch.params["version"])
        self._statics_changed(sorted({batch.shard for batch in batches}))

    def w1_step(self, params: dict[str, np.ndarray], idx, dz1: np.ndarray, labels, lr: float, opt) -> None:
        """The first layer's SGD-with-momentum step. Resident: issued to the nodes with the next
        forward (and every CHECKPOINT_STEPS fetched back, checked, as the slot's checkpoint)."""
        if self.resident is None or self._resident_home():
            if self.resident is None:
                g = self.dw1(idx, dz1, labels)
            else:  # the reparameterized network, trained here as LocalCompute(basis) trains it
                g = self.basis.precondition(self.images["train"][self._rows("train", idx)].T @ dz1)
            w1_momentum_step(params, opt, g, lr)
            return
        self.resident.update(self._rows("train", idx), dz1, lr)

    def sync(self, params: dict[str, np.ndarray], opt) -> None:
        """Bring the trainer's w1 (and its momentum) up to date from the nodes: before a test pass
        and before a model version is written. When the nodes cannot be asked (a stop while none
        is connected), the states are replayed here from the checkpoints and the logged updates."""
        if self.resident is None or (self._resident_home() and not self._hidden_shipped()):
            return
        try:
            self._resident_fetch()
        except RuntimeError:  # the executor's own (no node left, a stop, an abort): replay here
            owners: list[ResidentDisguise | HiddenResident] = [self.resident, *self._hidden_shipped()]
            for owner in owners:
                self._statics_changed(owner.replay_pending())
        for hr in self._hidden_shipped():
            w, buf = hr.clean()
            params[f"w{hr.layer}"] = w.astype(params[f"w{hr.layer}"].dtype)
            opt.moments[f"buf_w{hr.layer}"] = buf
        if self._resident_home():
            return
        w1, buf = self.resident.clean()
        params["w1"] = w1.astype(params["w1"].dtype)
        opt.moments["buf_w1"] = buf
        opt.moments.update(self.resident.noise_state())  # kept with the model version, never sent

    def x_w1(self, which: str, idx, w1: np.ndarray) -> np.ndarray:
        """X[idx] @ w1, contraction over pixels: each slot multiplies its static block (or, when
        shipping does not pay, computed here as the centralized run does)."""
        self._forward_which = which
        if self.resident is not None:
            if which != "train" or self._resident_home():  # the test pass is never shipped
                x = self.images[which] if idx is None else self.images[which][idx]
                self._keepalive()  # a test pass at home is long: nodes hear from us between its products
                return x @ w1
            if self._train_batch is None:
                self._train_batch = self.images["train"].shape[0] if idx is None else len(idx)
            self._audit_rows = self._rows("train", idx)  # the step's rows, for the audit's ground truth
            return self._resident_forward(self._rows("train", idx)).astype(w1.dtype, copy=False)
        if not self.ships("x_w1", self.images[which].shape[0] if idx is None else len(idx),
                          self._active_pixels(), w1.shape[1]):
            x = self.images[which] if idx is None else self.images[which][idx]
            return x @ w1
        idx = self._rows(which, idx)
        share = self.disguise == "share"
        n = idx.shape[0]
        width = w1.shape[1]
        if share:
            scaled = w1 * self._w_scale  # D alpha w1, (784, h1) float64
        # This step's column disguise (hidden units' order and power-of-two scales) is one for all
        # slots, so their results add up in it and are un-permuted once; each slot's row order is
        # its own (docs/design.md, "Collusion").
        cols, col_exp = self.rng.permutation(width), random_exponents(width, self.rng, True)
        row_orders = []

        def batches():
            for s, st in enumerate(self.statics):
                order = self.rng.permutation(n)
                if share:
                    b = st.mix[which].inverse_left(gather(scaled, st.pixels, cols)).astype(w1.dtype, copy=False)
                else:
                    b = gather(w1, st.pixels, cols)
                    b *= pow2(-st.pixel_exp, b.dtype)[:, None]
                b *= pow2(col_exp, b.dtype)[None, :]
                row_orders.append(order)
                yield Batch(s, "matmul", {"a_static": static_name(which, s), "transpose_a": False},
                            {"rows": st.row_index[which][idx[order]], "b": b},
                            [("w1", st.pixels, self._form()), ("samples", [0], POSITIONS_HIDDEN)])

        handles = self._send(batches())
        if share:  # while the nodes compute: -G[idx] (sum_s H_s D_s w1[P_s]) + beta @ w1, one product
            correction = np.concatenate([-self._factor_rows(which, idx), np.ones((n, 1))], axis=1) \
                @ (self._corrections[which] @ w1)
        total = None
        for order, r in zip(row_orders, self._receive(handles)):
            rows_back = np.take(r, inverse_permutation(order), axis=0)  # the batch's row order
            if total is None:
                total = rows_back.astype(np.float64, copy=False)
            else:
                total += rows_back
        back = inverse_permutation(cols)
        total = np.take(total, back, axis=1)
        total *= pow2(-col_exp[back], np.float64)[None, :]
        if share:
            total += correction
        return total.astype(w1.dtype, copy=False)

    def dw1(self, idx, dz1: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """X[idx]^T @ dz1 -> (784, h1); slot s computes rows P_s from its static block.

        With the share disguise and `labels`, nodes receive dz1 with its class structure moved
        onto other rows (see `decoy`); the coordinator adds back what that changes."""
        if not self.ships("dw1", dz1.shape[0], self._active_pixels(), dz1.shape[1]):
            x = self.images["train"] if idx is None else self.images["train"][idx]
            return x.T @ dz1
        idx = self._rows("train", idx)
        share = self.disguise == "share"
        moved = None
        if share and labels is not None:
            exact = dz1
            dz1, delta, directions = self.decoy(dz1, np.asarray(labels))
            moved = (delta, directions)
        width = dz1.shape[1]
        out = np.zeros((INPUTS, width), dtype=np.float64 if share else dz1.dtype)
        # One column disguise for the step's slots (see x_w1), applied to dz1 once; each slot
        # gets its own contraction (sample) order.
        cols, col_exp = self.rng.permutation(width), random_exponents(width, self.rng, True)
        shuffled = np.take(dz1, cols, axis=1)
        shuffled *= pow2(col_exp, shuffled.dtype)[None, :]
        disguises = [Disguise(rows=np.arange(len(st.pixels)), cols=cols, row_exp=st.pixel_exp, col_exp=col_exp)
                     for st in self.statics]

        def batches():
            for s, st in enumerate(self.statics):
                order = self.rng.permutation(idx.shape[0])  # the contraction (sample) order
                yield Batch(s, "matmul", {"a_static": static_name("train", s), "transpose_a": True},
                            {"rows": st.row_index["train"][idx[order]], "b": np.take(shuffled, order, axis=0)},
                            [("deltas", np.arange(width), POSITIONS_HIDDEN), ("samples", [0], POSITIONS_HIDDEN)],
                            static_cols=len(st.pixels))

        handles = self._send(batches())
        if not share:
            for st, d, r in zip(self.statics, disguises, self._receive(handles)):
                out[st.pixels] = d.undo(r)
            return out
        # While the nodes compute: G^T (what was sent), and x^T delta for the decoys.
        noise = self._factor_rows("train", idx).T @ dz1.astype(np.float64, copy=False)
        if moved is not None:
            delta, directions = moved
            undo_decoy = (self._source_t_times(idx, delta) * self.alpha[:, None]) @ directions
        for st, d, r in zip(self.statics, disguises, self._receive(handles)):
            part = d.undo(st.mix["train"].inverse_transposed_left(np.asarray(r, dtype=np.float64)))
            part -= st.loadings["train"].T @ noise
            part *= (self.norm[st.pixels] * self.alpha[st.pixels])[:, None]
            out[st.pixels] = part
        if moved is not None:  # x^T dz1 = x^T sent - (x^T delta) directions
            out -= undo_decoy
            dz1 = exact
        # A pixel that is zero in every row of the batch has a gradient of exactly zero; rounding
        # of the noise would leave ~1e-17 instead, which Adam's normalisation would inflate.
        out[~self._support(idx)] = 0.0
        if self.source is not self.images:
            out += np.outer(self.beta, dz1.sum(axis=0, dtype=np.float64))
        return out.astype(dz1.dtype, copy=False)

    def decoy(self, dz1: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """dz1 (b,128) with its class structure moved onto random rows: (sent, delta, directions)
        with sent = dz1 + delta @ directions.

        Rows of dz1 for one class point alike (dz2's one-hot shape times w2^T): clustering them
        groups a batch by class, and a static row seen in several batches links the groups into
        one grouping of the whole training set. Here each class's mean row and its DECOY_RANK
        principal directions (within the batch) are taken off its rows and given to a random
        other row instead: the node sees clusters of random rows, and no class sums to zero.
        delta is (b, q), directions (q, 128), q = classes * (1 + DECOY_RANK): what the
        coordinator subtracts costs b * 784 * q multiply-adds. All classes at once: one batched
        eigenproblem over the smaller Gram matrices, no loop over classes or rows."""
        d = dz1.astype(np.float64, copy=False)  # read only
        n, m = d.shape
        r = DECOY_RANK
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        c = counts.shape[0]
        onehot = np.zeros((n, c))
        onehot[np.arange(n), inverse] = 1.0
        means = (onehot.T @ d) / counts[:, None]  # (c, m)
        if n <= 4 * m:
            centered = d - means[inverse]
            # Mini-batch: a class has a dozen rows. Rows grouped by class and zero-padded to
            # (c, width, m) (padding adds nothing to a Gram): one batched eigenproblem on the small
            # (width x width) Grams.
            order = np.argsort(inverse, kind="stable")
            starts = np.cumsum(counts) - counts
            slot = np.empty(n, dtype=np.int64)
            slot[order] = np.arange(n) - np.repeat(starts, counts)
            padded = np.zeros((c, int(counts.max()), m))
            padded[inverse, slot] = centered
            vectors = np.linalg.eigh(padded @ padded.transpose(0, 2, 1))[1][:, :, -r:]  # (c, width, r)
            top = padded.transpose(0, 2, 1) @ vectors  # (c, m, r)
            top /= np.maximum(np.linalg.norm(top, axis=1, keepdims=True), 1e-300)
            weights = (centered @ top.transpose(1, 0, 2).reshape(m, c * r)).reshape(n, c, r)
        else:
            # Full batch: thousands of rows a class. Each class's principal directions from the
            # (m x m) Gram of at most DECOY_GRAM_ROWS of its rows drawn at random (a loop over the
            # at most 10 classes, not over rows); then one batched eigenproblem. The centred rows
            # are never formed: (d_i - mean) @ top = d_i @ top - mean @ top.
            order = np.argsort(inverse, kind="stable")
            grams = []
            for e, k, mean in zip(np.cumsum(counts), counts, means):
                members = order[e - k:e]
                if k > DECOY_GRAM_ROWS:
                    members = self.rng.choice(members, DECOY_GRAM_ROWS, replace=False)
                g = np.take(d, members, axis=0) - mean
                grams.append(g.T @ g)
            top = np.linalg.eigh(np.stack(grams))[1][:, :, -r:]  # (c, m, r)
            flat = top.transpose(1, 0, 2).reshape(m, c * r)
            weights = (d @ flat - (means @ flat)[inverse]).reshape(n, c, r)
        weights *= onehot[:, :, None]  # each row's weight on its own class's directions only
        structure = np.concatenate([onehot, weights.reshape(n, c * r)], axis=1)  # (n, q)
        directions = np.concatenate([means, top.transpose(0, 2, 1).reshape(c * r, m)])  # (q, m)
        delta = np.take(structure, self.rng.permutation(n), axis=0) - structure
        sent = delta @ directions
        sent += d
        return sent.astype(dz1.dtype, copy=False), delta, directions

    def _source_t_times(self, idx: np.ndarray, m: np.ndarray) -> np.ndarray:
        """x[idx]^T @ m for the raw training pixels: (784, q) in float64.

        The pixels stay in their own dtype (uint8 for raw data) and are converted a few hundred
        rows at a time into a small reused buffer that stays in cache: 40% less CPU for the full
        batch than one product over a 376 MB float64 copy, which is not kept either."""
        x = self.source["train"]
        if not _every_row(idx, x.shape[0]):
            return np.take(x, idx, axis=0).astype(np.float64).T @ m
        if x.dtype == np.float64:
            return x.T @ m
        rows = SOURCE_CHUNK_ROWS
        buf = np.empty((min(rows, x.shape[0]), x.shape[1]))
        out = np.zeros((x.shape[1], m.shape[1]))
        for start in range(0, x.shape[0], rows):
            stop = min(start + rows, x.shape[0])
            chunk = buf[:stop - start]
            np.copyto(chunk, x[start:stop])
            out += chunk.T @ m[start:stop]
        return out

    def _support(self, idx: np.ndarray) -> np.ndarray:
        """(784,) bool: pixels nonzero in some training row idx (cached for the full batch)."""
        x = self.source["train"]
        if idx.shape[0] == x.shape[0]:
            if self._full_support is None:
                self._full_support = np.any(x != 0, axis=0)
            return self._full_support
        return np.any(np.take(x, idx, axis=0) != 0, axis=0)

    # -- hidden-to-hidden layers: split over their input units ---------------------
    def a_w(self, a: np.ndarray, w: np.ndarray, layer: int) -> np.ndarray:
        """Layer `layer` >= 2 forward, a (b,n) @ w (n,m). The last layer's is label-adjacent and
        thin: computed here. A hidden-to-hidden layer's goes to the nodes, slot s multiplying its
        block Q_s of the n units: it receives (a[:,Q_s] + G H[:,Q_s]) M_s (rows shuffled) and
        M_s^-1 w[Q_s] (columns shuffled, power-of-two scaled); the sum of the partials minus
        G (H w) is a @ w."""
        if layer in self._momentum_layers:
            if self._forward_which != "train" or self._hidden_home(layer, a.shape[0]):
                self._keepalive()
                return a @ w  # the test pass, or a layer that stays here: w is the trainer's
            return self._hidden_forward(a, layer).astype(w.dtype, copy=False)
        if layer not in self.unit_blocks or not self.ships(f"a_w{layer}", *a.shape, w.shape[1]):
            return a @ w
        noisy, g, h = self._noisy(a)
        w64 = w.astype(np.float64, copy=False)
        secrets = []

        def batches():
            for s, block in enumerate(self.unit_blocks[layer]):
                mix = BlockMix(len(block), self.rng, group=HIDDEN_MIX_GROUP)
                d = Disguise(rows=self.rng.permutation(a.shape[0]), cols=self.rng.permutation(w.shape[1]),
                             col_exp=random_exponents(w.shape[1], self.rng, True))
                a_s = mix.right(np.take(noisy, d.rows, axis=0)[:, block], a.dtype)
                b_s = np.take(mix.inverse_left(w64[block]), d.cols, axis=1)
                b_s *= pow2(d.col_exp, np.float64)[None, :]
                secrets.append((block, mix))
                d_list.append(d)
                yield Batch(s, "matmul", {"transpose_a": False}, {"a": a_s, "b": b_s.astype(w.dtype)},
                            self._layer_exposure(layer, s, backward=False))

        d_list: list[Disguise] = []
        handles = self._send(batches())
        correction = g @ (h @ w64)  # while the nodes compute
        results = self._receive(handles)
        total = -correction
        for d, r in zip(d_list, results):
            total += d.undo(np.asarray(r, dtype=np.float64))
        self._hidden_secrets[layer] = (a, noisy, g, h, secrets)
        return total.astype(w.dtype, copy=False)

    def _hidden_forward(self, a: np.ndarray, layer: int) -> np.ndarray:
        """z = a w from the nodes' resident blocks (resident_hidden.py)."""
        hr = self.hidden_resident[layer]
        operands = hr.forward_operands(a, self.rng)
        batches = []
        for s, (st, op) in enumerate(zip(hr.slots, operands)):
            start = max(st.checkpoint_version, st.version)
            params, arrays = hr.batch(s, start, st.version, a=op)
            batches.append(self._hidden_batch(hr, s, params, arrays))
        return hr.combine_forward([np.asarray(r) for r in self._receive(self._send(batches))])

    def dw_da(self, a: np.ndarray, dz: np.ndarray, w: np.ndarray, layer: int,
              labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer` >= 2 backward: a^T @ dz (n,m) and dz @ w^T (b,n). The last layer's need
        dz_L, which carries the labels: computed here. A hidden-to-hidden layer's go to the nodes,
        slot s computing rows Q_s of the first and columns Q_s of the second from its forward
        operands (the same mixing and noise) and dz (rows and units shuffled, power-of-two
        scaled, and with `labels` its class structure moved onto other rows as dw1's dz1 is:
        `decoy`); the coordinator removes M_s, the noise's share H[:,Q_s]^T (G^T dz) and the
        decoys' (a^T delta) directions and delta (directions w^T)."""
        kept = self._hidden_secrets.pop(layer, None)
        if layer not in self.unit_blocks:
            return a.T @ dz, dz @ w.T
        ship_dw = self.ships(f"dw{layer}", a.shape[0], a.shape[1], dz.shape[1])
        ship_da = self.ships(f"da{layer}", a.shape[0], a.shape[1], dz.shape[1])
        if not (ship_dw or ship_da):
            return a.T @ dz, dz @ w.T
        if kept is None or kept[0] is not a:  # no forward of this batch kept: fresh secrets
            noisy, g, h = self._noisy(a)
            secrets = [(block, BlockMix(len(block), self.rng, group=HIDDEN_MIX_GROUP))
                       for block in self.unit_blocks[layer]]
        else:
            _, noisy, g, h, secrets = kept
        exact = dz
        moved = None
        if labels is not None and self.disguise == "share":
            dz, delta, directions = self.decoy(dz, np.asarray(labels))
            moved = (delta, directions)
        dz64 = dz.astype(np.float64, copy=False)
        w64 = w.astype(np.float64, copy=False)
        n, m = a.shape[1], dz.shape[1]
        disguises = []

        def batches():
            for s, (block, mix) in enumerate(secrets):
                rows, cols = self.rng.permutation(dz.shape[0]), self.rng.permutation(m)
                exp = random_exponents(m, self.rng, True)
                a_s = mix.right(np.take(noisy, rows, axis=0)[:, block], a.dtype)
                d_s = np.take(np.take(dz64, rows, axis=0), cols, axis=1) * pow2(exp, np.float64)[None, :]
                wt_s = (np.take(mix.inverse_left(w64[block]), cols, axis=1) * pow2(-exp, np.float64)[None, :]).T
                disguises.append((Disguise(rows=np.arange(len(block)), cols=cols, col_exp=exp),
                                  Disguise(rows=rows, cols=np.arange(len(block)))))
                exposure = self._layer_exposure(layer, s, backward=True)
                d_s = d_s.astype(dz.dtype)
                if ship_dw:
                    yield Batch(s, "matmul", {"transpose_a": True}, {"a": a_s, "b": d_s}, exposure)
                if ship_da:
                    yield Batch(s, "matmul", {"transpose_a": False}, {"a": d_s, "b": wt_s.astype(w.dtype)},
                                exposure)

        handles = self._send(batches())
        noise = g.T @ dz64 if ship_dw else None  # (r, m), while the nodes compute
        local_dw = None if ship_dw else a.T @ exact
        local_da = None if ship_da else exact @ w.T
        undo_dw = undo_da = None
        if moved is not None:  # what the decoy rows add to each product
            delta, directions = moved
            if ship_dw:
                undo_dw = (a.astype(np.float64, copy=False).T @ delta) @ directions
            if ship_da:
                undo_da = delta @ (directions @ w64.T)
        results = iter(self._receive(handles))
        dw = np.empty((n, m))
        da = np.empty((a.shape[0], n))
        for (block, mix), (d_w, d_a) in zip(secrets, disguises):
            if ship_dw:
                part = mix.inverse_transposed_left(d_w.undo(np.asarray(next(results), dtype=np.float64)))
                part -= h[:, block].T @ noise
                dw[block] = part
            if ship_da:
                da[:, block] = mix.right_transposed(d_a.undo(np.asarray(next(results), dtype=np.float64)))
        if undo_dw is not None:
            dw -= undo_dw
        if undo_da is not None:
            da -= undo_da
        if local_dw is not None:
            return local_dw, da.astype(exact.dtype, copy=False)
        if local_da is not None:
            return dw.astype(exact.dtype, copy=False), local_da
        return dw.astype(exact.dtype, copy=False), da.astype(exact.dtype, copy=False)

    def _noisy(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a + G H, G, H) in float64: G (b, r) fresh per batch, H (r, n) fresh too, each unit's
        noise at the unit's own root mean square in this batch (a unit that is zero throughout
        gets noise of scale 1, so a dead unit does not show)."""
        a64 = a.astype(np.float64, copy=False)
        rms = np.sqrt(np.einsum("ij,ij->j", a64, a64) / max(a.shape[0], 1))
        rms[rms == 0] = 1.0
        g = self.rng.standard_normal((a.shape[0], HIDDEN_NOISE_RANK))
        h = self.rng.standard_normal((HIDDEN_NOISE_RANK, a.shape[1])) * (rms * NOISE_SCALE / np.sqrt(HIDDEN_NOISE_RANK))
        noisy = g @ h
        noisy += a64
        return noisy, g, h

    def step_done(self) -> None:
        """A step's end: every CHECKPOINT_STEPS shipped resident steps, the nodes' states are
        fetched back, checked, and made each slot's checkpoint."""
        if self.resident is not None and (not self._resident_home() or self._hidden_shipped()):
            self._since_checkpoint += 1
            if self._since_checkpoint >= CHECKPOINT_STEPS:
                self._resident_fetch()
        self.executor.step_done()


class _RunTogether:
    """An executor with only `run` behind the submit/collect interface: submitted batches wait
    and go out together, in one `run`, at collect."""

    def __init__(self, executor: Executor):
        self.executor = executor

    def submit(self, batch: Batch) -> Batch:
        return batch

    def collect(self, batches: list[Batch]) -> list[np.ndarray]:
        return self.executor.run(list(batches))

    def forget(self, batches: list[Batch]) -> None:
        pass


class InProcessExecutor:
    """Runs every slot's batches in this process through the node's own compute function.

    One simulated node per slot, named node-1..node-k; each holds its slot's static operands,
    exactly what a networked node would receive in STATIC messages.
    """

    def __init__(self, compute: DistributedCompute):
        self._compute_batch = compute_batch
        self.ledger = compute.ledger
        self.names = [f"node-{s + 1}" for s in range(compute.k)]
        self.statics: list[dict[str, np.ndarray]] = []
        self.bytes_sent = 0
        self.bytes_received = 0
        self.batches = 0
        self.states: list[dict] = []
        self._compute = compute
        for s, name in enumerate(self.names):
            self.statics.append({})
            self.states.append({})
            self._load(s)
            self.ledger.record(name, compute.static_exposure(s))

    def _load(self, shard: int) -> None:
        """Slot `shard`'s statics as a node receives them (a resident state as its node stores it)."""
        for name, array in self._compute.static_arrays(shard).items():
            fields = self._compute.static_fields(shard, name)
            if "version" in fields:
                self.states[shard][name] = ResidentState(array, fields["version"])
            else:
                self.statics[shard][name] = array
            self.bytes_sent += array.nbytes

    def statics_changed(self, shard: int, reset: bool = False) -> None:
        """A slot's state static is a new checkpoint. The simulated node already holds the state
        it came from; `reset` (a resumed run's state replaces it) loads it afresh."""
        if reset:
            self._load(shard)

    def run(self, batches: list[Batch]) -> list[np.ndarray]:
        results = []
        for batch in batches:
            self.ledger.record(self.names[batch.shard], batch.exposure)
            self.bytes_sent += batch.nbytes()
            result = self._compute_batch(batch.op, batch.params, batch.arrays, self.statics[batch.shard],
                                         None, self.states[batch.shard])
            self.bytes_received += result.nbytes
            self.batches += 1
            results.append(result)
        return results

    def step_done(self) -> None:
        pass
