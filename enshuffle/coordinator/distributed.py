"""The network's products as disguised batches: the coordinator side of distribution.

`DistributedCompute` offers the same methods as `enshuffle.model.LocalCompute`, so the one
training step in `enshuffle.model` runs unchanged. Per product it decides whether the product
ships (`--offload`, offload.py) or is computed here as the centralized run computes it; a shipped
product goes to the k slots (a node's place in the run) as the disguise's parts, one matmul batch
each (or a resident batch: the weights live on the nodes), and comes back undone by the disguise
(the `disguise` package: what each node receives and learns, every secret and its constants).

| call        | product                    | ships under (the disguise's module)                           |
|-------------|----------------------------|----------------------------------------------------------------|
| x_w1, dw1   | X @ w1, X^T @ dz1          | share, shuffle (pixel_share.py, shuffle.py)                    |
| w1_step     | both, w1 kept on the nodes | resident, resident-clear (resident.py)                         |
| a_w, dw_da  | a @ w, a^T @ dz, dz @ w^T  | any, for a hidden-to-hidden layer (hidden_share.py)            |
| hidden_step | the same, w on the nodes   | resident, for a momentum hidden layer (resident_hidden.py)     |

Everything that depends on labels, and the last layer's products, stay here: softmax/loss, dz_L,
its forward and backward (docs/design.md, "Privacy"). No node receives labels or outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np

from enshuffle import batch as vocabulary
from enshuffle.coordinator.disguise import DISGUISES
from enshuffle.coordinator.disguise import decoy as decoys
from enshuffle.coordinator.disguise.base import Product, static_name
from enshuffle.coordinator.disguise.hidden_share import HiddenShare
from enshuffle.coordinator.disguise.pixel_share import PixelDisguise, PixelShare, pixel_scale
from enshuffle.coordinator.disguise.resident import CHECKPOINT_STEPS
from enshuffle.coordinator.disguise.resident import NOISE_RANK as RESIDENT_NOISE_RANK
from enshuffle.coordinator.disguise.resident import ResidentDisguise, resident_basis
from enshuffle.coordinator.disguise.resident_hidden import HiddenResident
from enshuffle.coordinator.disguise.shuffle import PixelShuffle
from enshuffle.coordinator.ledger import (
    CLEAR,
    HIDDEN_VALUES,
    POSITIONS_HIDDEN,
    ExposureLedger,
    activation_kind,
    delta_kind,
    ledger_axes,
)
from enshuffle.coordinator.offload import CostModel, check_offload, decide, plan_lines, step_plan
from enshuffle.coordinator.plan import balanced_blocks
from enshuffle.kernels import ResidentState, compute_batch
from enshuffle.model import INPUTS, NOTEBOOK_LAYERS, hidden_momentum_step, momentum_step

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
    _spec: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def spec(self) -> vocabulary.Params:
        """The typed params (`enshuffle.batch.parse`), parsed once: sizing, splitting and checking a
        batch read them several times. Parsed again if `op` or `params` is replaced (a batch's
        params dict is never changed in place: `fit_batch` makes a new batch)."""
        cached = self._spec
        if cached is None or cached[0] != self.op or cached[1] is not self.params:
            cached = self._spec = (self.op, self.params, vocabulary.parse(self.op, self.params))
        return cached[2]

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


@runtime_checkable
class Batches(Protocol):
    """An executor that takes batches one at a time (a networked one), or `_RunTogether` around one
    that only has `run`."""

    def submit(self, batch: Batch) -> Batch: ...

    def collect(self, batches: list[Batch]) -> list[np.ndarray]: ...

    def forget(self, batches: list[Batch]) -> None: ...


class DistributedCompute:
    """The model's Compute interface, with the two pixel-wide products executed as disguised
    batches on k slots (see the module docstring)."""

    def __init__(
        self,
        images: dict[str, np.ndarray],
        shards: int,
        rng: np.random.Generator,
        executor_factory: Callable[["DistributedCompute"], Executor],
        *,
        disguise: str = "share",
        ledger: ExposureLedger | None = None,
        disguise_rng: np.random.Generator | None = None,
        offload: str = "matmul",
        raw: dict[str, np.ndarray] | None = None,
        affine: tuple[np.ndarray, np.ndarray] | None = None,
        hidden: int | None = None,
        layers: tuple[int, ...] | None = None,
        cost_model: CostModel | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        static_chunk_bytes: int = STATIC_CHUNK_BYTES,
    ):
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
        source = raw if (raw is not None and affine is not None and disguise == "share") else images
        if source is not images:
            assert affine is not None
            alpha, beta = (np.asarray(a, dtype=np.float64) for a in affine)
        else:
            alpha, beta = np.ones(INPUTS), np.zeros(INPUTS)
        # D: every pixel column is divided by its root mean square, so all mixed columns carry the
        # same energy (no pixel's scale shows) and a rarely lit pixel keeps its own precision
        # instead of drowning in its neighbours' rounding.
        scale = pixel_scale(source)
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
            self.resident = ResidentDisguise(
                images["train"], self.basis, rng, noise_rank=0 if clear else RESIDENT_NOISE_RANK
            )
            self._since_checkpoint = 0
            # and each hidden-to-hidden layer's rows, when the trainer steps it with momentum
            # (`adopt` is told which): resident_hidden.py
            self.hidden_resident = {
                layer: HiddenResident(layer, hb, images["train"].dtype, rng, clear=clear)
                for layer, hb in self.basis.hidden_layers.items()
            }
            self.pixel_blocks = list(self.basis.blocks)
        else:
            self.pixel_blocks = [active[b] for b in balanced_blocks(len(active), shards, rng)]
        # The share's noise seed is drawn under every disguise, so the draws after it do not
        # depend on which disguise the run has.
        noise_seed = [int(v) for v in rng.integers(0, 2**63, size=4)]
        # The pixel-wide products' disguise, and its slots' secrets (none under resident, whose
        # batches resident.py makes)
        self.pixel: PixelDisguise | None = None
        if disguise == "share":
            self.pixel = PixelShare(
                images,
                self.pixel_blocks,
                rng,
                source=source,
                alpha=alpha,
                beta=beta,
                norm=np.where(scale > 0, scale, 1.0),
                noise_seed=noise_seed,
            )
        elif disguise == "shuffle":
            self.pixel = PixelShuffle(images, self.pixel_blocks, rng)
        self.statics = self.pixel.statics if self.pixel is not None else []
        # Hidden-to-hidden layer l (2 .. L-1) contracts over layer l-1's units: k secret blocks of
        # them, drawn after every other secret (so a 2-layer run's draws are unchanged). A layer
        # with fewer units than slots stays here.
        self.unit_blocks: dict[int, list[np.ndarray]] = {}
        for layer in range(2, len(self.layers) - 1):
            if self.layers[layer - 1] >= shards:
                self.unit_blocks[layer] = balanced_blocks(self.layers[layer - 1], shards, rng)
        for layer, hr in self.hidden_resident.items():
            self.unit_blocks[layer] = list(hr.basis.blocks)
        self.hidden_share = HiddenShare(self.unit_blocks)  # the layers that do not stay resident
        self._train_batch: int | None = None  # rows of a training step (the first one seen)
        self._audit_rows: np.ndarray | None = None
        self._resident_local: bool | None = None
        self.round_trips = 0  # executor.run calls: each is one round trip to every slot's node
        self.executor = executor_factory(self)
        # submit/collect/forget: the executor's own, or for one that only has `run`, batches that
        # wait and go together at collect
        self._batches: Batches = self.executor if isinstance(self.executor, Batches) else _RunTogether(self.executor)

    # -- static operands -------------------------------------------------------------
    def static_arrays(self, shard: int) -> dict[str, np.ndarray]:
        """What a node serving slot `shard` must hold before it can compute that slot's batches."""
        if self.resident is not None:
            state, _ = self.res.state_static(shard)
            out = {static_name("train", shard): self.res.slots[shard].static, self.res.state_name(shard): state}
            for hr in self.hidden_resident.values():
                out[hr.state_name(shard)] = hr.state_static(shard)[0]
            return out
        assert self.pixel is not None
        return {static_name(w, shard): self.pixel.static(w, shard) for w in self.images}

    def static_fields(self, shard: int, name: str) -> dict:
        """Extra STATIC header fields: a resident state's version."""
        if self.resident is not None and name == self.res.state_name(shard):
            return {"version": self.res.state_static(shard)[1]}
        for hr in self.hidden_resident.values():
            if name == hr.state_name(shard):
                return {"version": hr.state_static(shard)[1]}
        return {}

    def _form(self) -> int:
        return (
            CLEAR
            if self.disguise == "resident-clear"
            else (POSITIONS_HIDDEN if self.disguise == "shuffle" else HIDDEN_VALUES)
        )

    def static_exposure(self, shard: int) -> list[tuple]:
        out = [("images", self.pixel_blocks[shard], self._form()), ("samples", [0], POSITIONS_HIDDEN)]
        if self.resident is not None:  # its block of w1 arrives with the statics, once
            out.append(("w1", self.pixel_blocks[shard], self._form()))
        return out

    def slot_exposure(self, shard: int) -> list[tuple]:
        """Everything a node learns by serving slot `shard` for a run (the exposure bound's unit)."""
        out = self.static_exposure(shard) + [
            ("w1", self.pixel_blocks[shard], self._form()),
            ("deltas", np.arange(self.hidden), self._form() if self.resident is not None else POSITIONS_HIDDEN),
        ]
        for layer in self.unit_blocks:
            out += self._layer_exposure(layer, shard, backward=True, rows_mixed=layer in self.hidden_resident)
        return out

    def _layer_exposure(self, layer: int, shard: int, backward: bool, rows_mixed: bool = False) -> list[tuple]:
        """What one batch of hidden layer `layer` tells slot `shard`'s node: its block of the
        input units (mixed, with noise) and of w{layer}'s rows (mixed); backward also the
        layer's deltas (every unit, shuffled and power-of-two scaled; `rows_mixed`, a resident
        layer's: every row a secret mixture of a group of rows, values hidden)."""
        block = self.unit_blocks[layer][shard]
        out = [
            (activation_kind(layer - 1), block, HIDDEN_VALUES),
            (f"w{layer}", block, HIDDEN_VALUES),
            ("samples", [0], POSITIONS_HIDDEN),
        ]
        if backward:
            out.append(
                (delta_kind(layer), np.arange(self.layers[layer]), HIDDEN_VALUES if rows_mixed else POSITIONS_HIDDEN)
            )
        return out

    def audit_truth(self, shard: int) -> dict:
        """Ground truth for `enshuffle audit`'s scorer (never sent anywhere), per static of the
        slot: its pixel block, row order, and each column's dominant pixel (resident: also the
        mixing blocks and the noise loadings)."""
        if self.resident is not None:
            rs = self.res.slots[shard]
            dominant = np.empty(len(rs.pixels), dtype=np.int64)
            for (lo, hi), m in zip(rs.mix.bounds, rs.mix.blocks):
                dominant[lo:hi] = lo + np.argmax(np.abs(m), axis=0)
            return {
                static_name("train", shard): {
                    "pixels": rs.pixels.copy(),
                    "row_order": rs.row_order.copy(),
                    "column_pixel": rs.pixels[dominant],
                    "which": "train",
                    "mix_blocks": [m.copy() for m in rs.mix.blocks],
                    "mix_bounds": list(rs.mix.bounds),
                    "loadings": rs.loadings.copy(),
                }
            }
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
            out[static_name(w, shard)] = {
                "pixels": st.pixels.copy(),
                "row_order": st.row_order[w].copy(),
                "column_pixel": column_pixel,
                "which": w,
            }
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
            out[hr.state_name(shard)] = {
                "units": st.units.copy(),
                "mix_blocks": [m.copy() for m in st.mix.blocks],
                "mix_bounds": list(st.mix.bounds),
                "steps": dict(hr.audit or {}),
            }
        return out

    @property
    def res(self) -> ResidentDisguise:
        """The first layer's resident disguise, on the paths that only run under it."""
        assert self.resident is not None, "only under the resident disguise"
        return self.resident

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
                parts, groups = vocabulary.split(batch.op, batch.spec, batch.arrays, cap, batch.static_cols)
                pieces.append(groups)
                if parts[0] is batch.arrays:  # it fits: the batch itself
                    yield batch
                else:
                    yield from (
                        Batch(batch.shard, batch.op, batch.params, arrays, batch.exposure, batch.static_cols)
                        for arrays in parts
                    )
                self._keepalive()  # building the next slot's batch of a wide layer takes a while

        handles = []
        try:
            for batch in chunks():
                handles.append(self._batches.submit(batch))
        except BaseException:
            self._batches.forget(handles)
            raise
        return handles, pieces

    def _run(self, product: Product):
        """A disguised product (the disguise package's): its parts go out as matmul batches, it
        does its own share while the nodes compute, and it undoes their results."""
        sent = self._send(self._matmuls(product.parts()))
        product.meanwhile()
        return product.undo(self._receive(sent))

    @staticmethod
    def _matmuls(parts) -> Iterator[Batch]:
        for part in parts:
            yield Batch(part.shard, "matmul", part.params, part.arrays, part.exposure, part.static_cols)

    def _receive(self, sent: tuple[list, list]) -> list[np.ndarray]:
        handles, pieces = sent
        results = self._batches.collect(handles)
        self._keepalive()
        out, at = [], 0
        for groups in pieces:
            count = sum(c for _, c in groups)
            out.append(vocabulary.combine(results[at : at + count], groups))
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
        return step_plan(
            (self._active_pixels(), *self.layers[1:]),
            batch,
            self.k,
            self.offload,
            self.cost_model,
            set(self.unit_blocks),
            resident=self.resident is not None,
            resident_layers=set(self._momentum_layers or self.hidden_resident),
        )

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
        self.res.adopt(
            params["w1"], opt.moments.get("buf_w1"), {k: v for k, v in opt.moments.items() if k.startswith("resident_")}
        )
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
        st = self.res.slots[shard]
        # dz1 reaches the node with its rows, its units mixed by the secret N (clear in the control)
        exposure = [
            ("w1", st.pixels, self._form()),
            ("samples", [0], POSITIONS_HIDDEN),
            ("deltas", np.arange(self.hidden), self._form()),
        ]
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
        return (hr or self.res).replay_from(batch.shard)

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
            params, arrays = hr.batch(
                batch.shard,
                start,
                batch.params["version"],
                a=batch.arrays.get("a"),
                fetch=bool(batch.params.get("fetch")),
                backward=bool(batch.params.get("backward")),
            )
            return self._hidden_batch(hr, batch.shard, params, arrays)
        params, arrays = self.res.batch(
            batch.shard, batch.arrays.get("rows"), start, batch.params["version"], bool(batch.params.get("fetch"))
        )
        return self._resident_batch(batch.shard, params, arrays)

    def check_resident(self, batch: Batch, c: np.ndarray) -> str | None:
        """The probe check of a resident result (resident.py, resident_hidden.py): None if it holds."""
        hr = self._hidden_of(batch)
        if hr is not None:
            return hr.check(batch.shard, batch.params, batch.arrays, c)
        if batch.params.get("fetch"):
            return self.res.check_state(batch.shard, c)
        return self.res.check_forward(batch.shard, batch.arrays["rows"], c)

    def _hidden_batch(self, hr: HiddenResident, shard: int, params: dict, arrays: dict) -> Batch:
        return Batch(
            shard, "resident", params, arrays, self._layer_exposure(hr.layer, shard, backward=True, rows_mixed=True)
        )

    def _hidden_home(self, layer: int, b: int) -> bool:
        """Does resident hidden layer `layer` stay here (shipping does not pay under --offload
        auto)? Decided once per run, since its state lives where it trains."""
        if layer not in self._hidden_local:
            n, m = self.layers[layer - 1], self.layers[layer]
            self._hidden_local[layer] = not self.ships(f"resident{layer}", b, n, m)
        return self._hidden_local[layer]

    def _hidden_shipped(self) -> list[HiddenResident]:
        return [
            self.hidden_resident[layer] for layer in self._momentum_layers if not self._hidden_local.get(layer, True)
        ]

    def hidden_step(
        self,
        a: np.ndarray,
        dz: np.ndarray,
        params: dict[str, np.ndarray],
        layer: int,
        lr: float,
        opt,
        labels: np.ndarray | None = None,
    ) -> np.ndarray:
        """A momentum hidden layer's backward and step: resident on the nodes (each returns its
        block of da and steps its V), or here as the centralized reference does; under a
        disguise without resident weights, its two products go as `dw_da` sends them."""
        name = f"w{layer}"
        if self.resident is None:
            g, da = self.dw_da(a, dz, params[name], layer, labels)
            momentum_step(params, opt, lr, name, g=np.asarray(g, dtype=np.float64))
            return da
        if layer not in self._momentum_layers or self._hidden_home(layer, a.shape[0]):
            basis = self.hidden_resident[layer].basis if layer in self.hidden_resident else None
            return hidden_momentum_step(a, dz, params, layer, lr, opt, basis)
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
        for s, (st, rows) in enumerate(zip(self.res.slots, self.res.node_rows(idx))):
            start = max(st.checkpoint_version, st.version - 1)
            params, arrays = self.res.batch(s, rows, start, st.version, fetch=False)
            batches.append(self._resident_batch(s, params, arrays))
        results = self._receive(self._send(batches))
        return self.res.combine(idx, [np.asarray(r) for r in results])

    def _resident_fetch(self) -> None:
        """Every slot's state after the issued updates (the first layer's and each shipped hidden
        layer's), checked and made the checkpoint."""
        batches = []
        for s, st in enumerate(self.res.slots):
            if st.version == st.checkpoint_version:
                continue
            params, arrays = self.res.batch(s, None, max(st.checkpoint_version, st.version - 1), st.version, fetch=True)
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
            # the checked array itself (float64, as every fetch's result is): its products are
            # reused, and it becomes the checkpoint without a copy (`kept_state`)
            owner = self._hidden_of(batch) or self.res
            owner.accept_state(batch.shard, state, batch.params["version"])
        self._statics_changed(sorted({batch.shard for batch in batches}))

    def w1_step(self, params: dict[str, np.ndarray], idx, dz1: np.ndarray, labels, lr: float, opt) -> None:
        """The first layer's SGD-with-momentum step. Resident: issued to the nodes with the next
        forward (and every CHECKPOINT_STEPS fetched back, checked, as the slot's checkpoint)."""
        if self.resident is None or self._resident_home():
            if self.resident is None:
                g = self.dw1(idx, dz1, labels)
            else:  # the reparameterized network, trained here as LocalCompute(basis) trains it
                g = self.basis.precondition(self.images["train"][self._rows("train", idx)].T @ dz1)
            momentum_step(params, opt, lr, g=g)
            return
        self.res.update(self._rows("train", idx), dz1, lr)

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
        w1, buf = self.res.clean()
        params["w1"] = w1.astype(params["w1"].dtype)
        opt.moments["buf_w1"] = buf
        opt.moments.update(self.res.noise_state())  # kept with the model version, never sent

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
        if not self.ships(
            "x_w1", self.images[which].shape[0] if idx is None else len(idx), self._active_pixels(), w1.shape[1]
        ):
            x = self.images[which] if idx is None else self.images[which][idx]
            return x @ w1
        assert self.pixel is not None
        return self._run(self.pixel.forward(which, self._rows(which, idx), w1, self.rng))

    def dw1(self, idx, dz1: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """X[idx]^T @ dz1 -> (784, h1); slot s computes rows P_s from its static block.

        With the share disguise and `labels`, nodes receive dz1 with its class structure moved
        onto other rows (see `decoy`); the coordinator adds back what that changes (pixel_share.py)."""
        if not self.ships("dw1", dz1.shape[0], self._active_pixels(), dz1.shape[1]):
            x = self.images["train"] if idx is None else self.images["train"][idx]
            return x.T @ dz1
        assert self.pixel is not None
        return self._run(self.pixel.gradient(self._rows("train", idx), dz1, self.rng, self._decoys(labels)))

    def decoy(self, dz: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """dz with its class structure moved onto random rows: (sent, delta, directions), sent =
        dz + delta @ directions (decoy.py), from the run's secret generator."""
        return decoys.decoy(dz, labels, self.rng)

    def _decoys(self, labels: np.ndarray | None) -> decoys.Decoy | None:
        """What a shipped delta's decoys are made with: the share disguise's, given the labels."""
        if labels is None or self.disguise != "share":
            return None
        labels = np.asarray(labels)
        return lambda dz: self.decoy(dz, labels)

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
        if layer not in self.unit_blocks or not self.ships(f"a_w{layer}", a.shape[0], a.shape[1], w.shape[1]):
            return a @ w
        exposures = [self._layer_exposure(layer, s, backward=False) for s in range(len(self.unit_blocks[layer]))]
        return self._run(self.hidden_share.forward(a, w, layer, self.rng, exposures))

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

    def dw_da(
        self, a: np.ndarray, dz: np.ndarray, w: np.ndarray, layer: int, labels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer` >= 2 backward: a^T @ dz (n,m) and dz @ w^T (b,n). The last layer's need
        dz_L, which carries the labels: computed here. A hidden-to-hidden layer's go to the nodes,
        slot s computing rows Q_s of the first and columns Q_s of the second from its forward
        operands (the same mixing and noise) and dz (rows and units shuffled, power-of-two
        scaled, and with `labels` its class structure moved onto other rows as dw1's dz1 is:
        `decoy`); the coordinator removes M_s, the noise's share H[:,Q_s]^T (G^T dz) and the
        decoys' (a^T delta) directions and delta (directions w^T)."""
        kept = self.hidden_share.forget(layer)
        if layer not in self.unit_blocks:
            return a.T @ dz, dz @ w.T
        ship_dw = self.ships(f"dw{layer}", a.shape[0], a.shape[1], dz.shape[1])
        ship_da = self.ships(f"da{layer}", a.shape[0], a.shape[1], dz.shape[1])
        if not (ship_dw or ship_da):
            return a.T @ dz, dz @ w.T
        exposures = [self._layer_exposure(layer, s, backward=True) for s in range(len(self.unit_blocks[layer]))]
        return self._run(
            self.hidden_share.backward(
                a, dz, w, layer, self.rng, exposures, kept, ship_dw, ship_da, self._decoys(labels)
            )
        )

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
            result = self._compute_batch(
                batch.op, batch.params, batch.arrays, self.statics[batch.shard], None, self.states[batch.shard]
            )
            self.bytes_received += result.nbytes
            self.batches += 1
            results.append(result)
        return results

    def step_done(self) -> None:
        pass
