"""The pixel-wide products under a disguise without resident weights, and the "share" disguise.

Both first-layer products contract over the image's pixels, split into k secret blocks P_s (one
per *slot*, a node's place in the run):

| product | X (b,784) @ w1 (x_w1)                          | X^T @ dz1 -> (784,h1) (dw1)                  |
|---------|------------------------------------------------|----------------------------------------------|
| node s  | row indices into its static block, M_s^-1 D_s  | row indices, dz1 (rows and units shuffled,   |
| gets    | w1[P_s] (units shuffled, power-of-two scaled)  | power-of-two scaled, class structure moved)  |
| result  | summed over the slots                          | rows P_s placed                              |

`PixelDisguise` is what both pixel disguises share: each slot's static block of every image set
in a secret row order (drawn at the start, per image set), and per product one column disguise
(the hidden units' order and power-of-two scales) for all slots, so their results add up in it
and are un-permuted once, and each slot's own row order (docs/design.md, "Collusion").

The share disguise hides values, not only positions. Node s holds, for the whole run,

    S_s = (x[:, P_s] D_s^-1 + G H_s) M_s        rows in a secret order

- x are the raw pixels (0..255; the preset's standardization x*alpha + beta is applied here, so a
  zero pixel stays an exact zero), D_s = diag(rms x_j) gives every column the same energy.
- G H_s is secret Gaussian noise of rank NOISE_RANK with the pixels' own scale: G (n, r) is fresh
  for every image, so each row carries r more unknowns than the node has equations. Even a node
  that knew M_s and H_s could not solve a row for its pixels; it cannot learn M_s either, since
  unmixing needs the sources and the noise makes the mixture underdetermined (K + r sources seen
  through K columns).
- M_s is a secret block-diagonal mixing (dense MIX_GROUP blocks, condition <= 4): no column of S_s
  is a pixel, no value of it a pixel value, and w1's rows reach the node only as M_s^-1 D_s w1[P_s].
- Corrections cost the coordinator little: x_w1 subtracts G[idx] (sum_s H_s D_s w1[P_s]) and dw1
  subtracts H_s^T (G[idx]^T dz1): r * h1 * (b + 784) multiply-adds each, plus the mixing
  (784 * 32 * h1 each way). Rounding stays at the pixels' own scale, so distributed training
  equals the centralized run to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from enshuffle.coordinator.disguise.base import Part, exponents, static_name
from enshuffle.coordinator.disguise.decoy import Decoy
from enshuffle.coordinator.disguise.mixing import Mixing
from enshuffle.coordinator.ledger import HIDDEN_VALUES, POSITIONS_HIDDEN
from enshuffle.coordinator.plan import Disguise, gather, inverse_permutation, pow2
from enshuffle.model import INPUTS

NOISE_RANK = 32  # r: per-image Gaussian factors in every static block
NOISE_SCALE = 1.0  # std of each noise element, in units of a normalized pixel's root mean square
MIX_GROUP = 32  # mixing blocks: 32x32 dense, so mixing costs 32 multiply-adds per element
MIX_SPREAD = 1.0  # singular values of each block in [1/2, 2]: condition <= 4
SOURCE_CHUNK_ROWS = 512  # rows of raw pixels converted to float64 at a time (fits in cache)


@dataclass
class ShardStatics:
    """Slot s's secrets: its pixel block's row order, mixing, noise loadings (or, for "shuffle",
    the static power-of-two column scales)."""

    pixels: np.ndarray  # P_s, in the column order the node holds them
    row_order: dict[str, np.ndarray]  # which -> node row i is original row row_order[which][i]
    row_index: dict[str, np.ndarray]  # which -> original row r is node row row_index[which][r]
    # which -> M_s and H_s (NOISE_RANK, |P_s|): each image set has its own, so a copy of a public
    # test set under a slot's secrets tells nothing about that slot's training block.
    mix: dict[str, Mixing] = field(default_factory=dict)
    loadings: dict[str, np.ndarray] = field(default_factory=dict)
    pixel_exp: np.ndarray | None = None  # "shuffle" only


def every_row(idx: np.ndarray, n: int) -> bool:
    """idx is 0..n-1 in order (a full batch): use the array itself instead of a gathered copy."""
    return idx.shape[0] == n and bool(np.array_equal(idx, np.arange(n)))


def pixel_scale(source: dict[str, np.ndarray]) -> np.ndarray:
    """(784,) each pixel's root mean square over every image of every set (0: blank everywhere)."""
    energy, count = np.zeros(INPUTS), 0
    for x in source.values():
        if x.size:
            energy += np.einsum("ij,ij->j", x, x, dtype=np.float64)
            count += x.shape[0]
    return np.sqrt(energy / max(count, 1))


class PixelDisguise:
    """The slots' static blocks and the two pixel-wide products; a subclass says what a slot's
    static and w1 operand are and how a result is undone (PixelShare here, PixelShuffle in
    shuffle.py). `images`: the preset's inputs per image set; `blocks`: the slots' pixels P_s."""

    form = HIDDEN_VALUES  # what a node learns of the pixels and of w1 (ledger.py)

    def __init__(self, images: dict[str, np.ndarray], blocks: list[np.ndarray], rng: np.random.Generator):
        self.images = images
        self.statics: list[ShardStatics] = []
        for block in blocks:
            order = {w: rng.permutation(x.shape[0]) for w, x in images.items()}
            st = ShardStatics(
                pixels=block, row_order=order, row_index={w: inverse_permutation(o) for w, o in order.items()}
            )
            self._draw(st, rng)
            self.statics.append(st)

    # -- what a subclass says --------------------------------------------------------
    def _draw(self, st: ShardStatics, rng: np.random.Generator) -> None:
        """Draw slot `st`'s secrets beyond its row orders."""
        raise NotImplementedError

    def static(self, which: str, shard: int) -> np.ndarray:
        """Slot `shard`'s static block of image set `which`, as its node holds it."""
        raise NotImplementedError

    def _w1_operand(self, which: str, w1: np.ndarray) -> np.ndarray:
        """w1 as every slot's rows of it are taken from (before the step's column disguise)."""
        return w1

    def _w1_block(self, which: str, st: ShardStatics, w1: np.ndarray, cols: np.ndarray, dtype) -> np.ndarray:
        """Slot st's rows of `_w1_operand`'s w1 (columns in the order `cols`), as its node
        receives them (in w1's `dtype`), before the step's column scales."""
        raise NotImplementedError

    def _forward_correction(self, which: str, idx: np.ndarray, w1: np.ndarray) -> np.ndarray | None:
        """What x_w1 adds to the slots' sum (computed while the nodes compute)."""
        return None

    def _gradient_meanwhile(self, product: "Gradient") -> None:
        """dw1's corrections, while the nodes compute."""

    def _gradient_undo(self, product: "Gradient", results: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    # -- the products ----------------------------------------------------------------
    def forward(self, which: str, idx: np.ndarray, w1: np.ndarray, rng: np.random.Generator) -> "Forward":
        """X[idx] @ w1 over the slots' static blocks of `which`."""
        return Forward(self, which, idx, w1, rng)

    def gradient(
        self, idx: np.ndarray, dz1: np.ndarray, rng: np.random.Generator, decoy: Decoy | None = None
    ) -> "Gradient":
        """X[idx]^T @ dz1 -> (784, h1) over the slots' training blocks. `decoy` (a disguise that
        moves dz1's class structure): dz1 -> (sent, delta, directions), sent = dz1 + delta
        directions."""
        return Gradient(self, idx, dz1, rng, decoy)


class Forward:
    """x_w1 (PixelDisguise.forward). One column disguise for all slots, each slot's own row order."""

    def __init__(self, disguise: PixelDisguise, which: str, idx: np.ndarray, w1: np.ndarray, rng: np.random.Generator):
        self.disguise, self.which, self.idx, self.w1, self.rng = disguise, which, idx, w1, rng
        width = w1.shape[1]
        self.operand = disguise._w1_operand(which, w1)
        self.cols, self.col_exp = rng.permutation(width), exponents(width, rng)
        self.row_orders: list[np.ndarray] = []
        self.correction: np.ndarray | None = None

    def parts(self) -> Iterator[Part]:
        d, which, idx = self.disguise, self.which, self.idx
        for s, st in enumerate(d.statics):
            order = self.rng.permutation(idx.shape[0])
            b = d._w1_block(which, st, self.operand, self.cols, self.w1.dtype)
            b *= pow2(self.col_exp, b.dtype)[None, :]
            self.row_orders.append(order)
            yield Part(
                s,
                {"a_static": static_name(which, s), "transpose_a": False},
                {"rows": st.row_index[which][idx[order]], "b": b},
                [("w1", st.pixels, d.form), ("samples", [0], POSITIONS_HIDDEN)],
            )

    def meanwhile(self) -> None:
        self.correction = self.disguise._forward_correction(self.which, self.idx, self.w1)

    def undo(self, results: list[np.ndarray]) -> np.ndarray:
        total: np.ndarray | None = None
        for order, r in zip(self.row_orders, results):
            rows_back = np.take(r, inverse_permutation(order), axis=0)  # the batch's row order
            if total is None:
                total = rows_back.astype(np.float64, copy=False)
            else:
                total += rows_back
        assert total is not None  # at least one slot
        back = inverse_permutation(self.cols)
        total = np.take(total, back, axis=1)
        total *= pow2(-self.col_exp[back], np.float64)[None, :]
        if self.correction is not None:
            total += self.correction
        return total.astype(self.w1.dtype, copy=False)


class Gradient:
    """dw1 (PixelDisguise.gradient). One column disguise for the step's slots, applied to dz1
    once; each slot gets its own contraction (sample) order."""

    def __init__(
        self, disguise: PixelDisguise, idx: np.ndarray, dz1: np.ndarray, rng: np.random.Generator, decoy: Decoy | None
    ):
        self.disguise, self.idx, self.rng = disguise, idx, rng
        self.exact = dz1
        self.moved: tuple[np.ndarray, np.ndarray] | None = None
        if decoy is not None:
            dz1, delta, directions = decoy(dz1)
            self.moved = (delta, directions)
        self.sent = dz1
        width = dz1.shape[1]
        self.cols, self.col_exp = rng.permutation(width), exponents(width, rng)
        shuffled = np.take(dz1, self.cols, axis=1)
        shuffled *= pow2(self.col_exp, shuffled.dtype)[None, :]
        self.shuffled = shuffled
        self.undos = [
            Disguise(rows=np.arange(len(st.pixels)), cols=self.cols, row_exp=st.pixel_exp, col_exp=self.col_exp)
            for st in disguise.statics
        ]
        self.noise: np.ndarray | None = None
        self.undo_decoy: np.ndarray | None = None

    def parts(self) -> Iterator[Part]:
        idx, width = self.idx, self.sent.shape[1]
        for s, st in enumerate(self.disguise.statics):
            order = self.rng.permutation(idx.shape[0])  # the contraction (sample) order
            yield Part(
                s,
                {"a_static": static_name("train", s), "transpose_a": True},
                {"rows": st.row_index["train"][idx[order]], "b": np.take(self.shuffled, order, axis=0)},
                [("deltas", np.arange(width), POSITIONS_HIDDEN), ("samples", [0], POSITIONS_HIDDEN)],
                static_cols=len(st.pixels),
            )

    def meanwhile(self) -> None:
        self.disguise._gradient_meanwhile(self)

    def undo(self, results: list[np.ndarray]) -> np.ndarray:
        return self.disguise._gradient_undo(self, results)


class PixelShare(PixelDisguise):
    """The share disguise (module docstring). `source`: the pixels the statics are made from (raw
    pixels, with `alpha`, `beta` the preset's standardization x*alpha + beta, or the inputs
    themselves with alpha 1 and beta 0); `norm`: D's diagonal, each pixel's root mean square (1
    for a blank one); `noise_seed`: the seed of every image set's factors G."""

    form = HIDDEN_VALUES

    def __init__(
        self,
        images: dict[str, np.ndarray],
        blocks: list[np.ndarray],
        rng: np.random.Generator,
        *,
        source: dict[str, np.ndarray],
        alpha: np.ndarray,
        beta: np.ndarray,
        norm: np.ndarray,
        noise_seed: list[int],
    ):
        self.source, self.alpha, self.beta, self.norm = source, alpha, beta, norm
        self.noise_seed = noise_seed
        super().__init__(images, blocks, rng)
        self._factors: dict[str, np.ndarray] = {}
        # Per-step constants: D alpha per pixel, and [H D alpha; beta] as one (NOISE_RANK + 1, 784)
        # matrix so x_w1's corrections are a single product.
        self._w_scale = (self.norm * self.alpha)[:, None]
        self._corrections = {}
        for which in images:
            corrections = self._corrections[which] = np.zeros((NOISE_RANK + 1, INPUTS))
            for st in self.statics:
                if which in st.loadings:
                    corrections[:NOISE_RANK, st.pixels] = st.loadings[which] * self._w_scale[st.pixels, 0]
            corrections[NOISE_RANK] = self.beta
        self._full_support: np.ndarray | None = None

    def _draw(self, st: ShardStatics, rng: np.random.Generator) -> None:
        for which in sorted(self.images):
            st.mix[which] = Mixing(len(st.pixels), rng, MIX_GROUP, MIX_SPREAD)
            st.loadings[which] = rng.standard_normal((NOISE_RANK, len(st.pixels))) * (NOISE_SCALE / np.sqrt(NOISE_RANK))

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
        return g if every_row(idx, g.shape[0]) else np.take(g, idx, axis=0)

    def static(self, which: str, shard: int) -> np.ndarray:
        st = self.statics[shard]
        order = st.row_order[which]
        block = np.take(self.source[which], order, axis=0)[:, st.pixels] / self.norm[st.pixels]
        block += np.take(self.factors(which), order, axis=0) @ st.loadings[which]
        return st.mix[which].right(block, self.images[which].dtype)  # the preset's dtype on the wire

    def _w1_operand(self, which: str, w1: np.ndarray) -> np.ndarray:
        return w1 * self._w_scale  # D alpha w1, (784, h1) float64

    def _w1_block(self, which: str, st: ShardStatics, w1: np.ndarray, cols: np.ndarray, dtype) -> np.ndarray:
        return st.mix[which].inverse_left(gather(w1, st.pixels, cols)).astype(dtype, copy=False)

    def _forward_correction(self, which: str, idx: np.ndarray, w1: np.ndarray) -> np.ndarray:
        """-G[idx] (sum_s H_s D_s w1[P_s]) + beta @ w1, one product."""
        return np.concatenate([-self._factor_rows(which, idx), np.ones((idx.shape[0], 1))], axis=1) @ (
            self._corrections[which] @ w1
        )

    def _gradient_meanwhile(self, product: Gradient) -> None:
        """G^T (what was sent), and x^T delta for the decoys."""
        product.noise = self._factor_rows("train", product.idx).T @ product.sent.astype(np.float64, copy=False)
        if product.moved is not None:
            delta, directions = product.moved
            product.undo_decoy = (self._source_t_times(product.idx, delta) * self.alpha[:, None]) @ directions

    def _gradient_undo(self, product: Gradient, results: list[np.ndarray]) -> np.ndarray:
        idx, dz1 = product.idx, product.sent
        out = np.zeros((INPUTS, dz1.shape[1]), dtype=np.float64)
        for st, d, r in zip(self.statics, product.undos, results):
            part = d.undo(st.mix["train"].inverse_transposed_left(np.asarray(r, dtype=np.float64)))
            part -= st.loadings["train"].T @ product.noise
            part *= (self.norm[st.pixels] * self.alpha[st.pixels])[:, None]
            out[st.pixels] = part
        if product.undo_decoy is not None:  # x^T dz1 = x^T sent - (x^T delta) directions
            out -= product.undo_decoy
            dz1 = product.exact
        # A pixel that is zero in every row of the batch has a gradient of exactly zero; rounding
        # of the noise would leave ~1e-17 instead, which Adam's normalisation would inflate.
        out[~self._support(idx)] = 0.0
        if self.source is not self.images:
            out += np.outer(self.beta, dz1.sum(axis=0, dtype=np.float64))
        return out.astype(dz1.dtype, copy=False)

    def _source_t_times(self, idx: np.ndarray, m: np.ndarray) -> np.ndarray:
        """x[idx]^T @ m for the raw training pixels: (784, q) in float64.

        The pixels stay in their own dtype (uint8 for raw data) and are converted a few hundred
        rows at a time into a small reused buffer that stays in cache: 40% less CPU for the full
        batch than one product over a 376 MB float64 copy, which is not kept either."""
        x = self.source["train"]
        if not every_row(idx, x.shape[0]):
            return np.take(x, idx, axis=0).astype(np.float64).T @ m
        if x.dtype == np.float64:
            return x.T @ m
        rows = SOURCE_CHUNK_ROWS
        buf = np.empty((min(rows, x.shape[0]), x.shape[1]))
        out = np.zeros((x.shape[1], m.shape[1]))
        for start in range(0, x.shape[0], rows):
            stop = min(start + rows, x.shape[0])
            chunk = buf[: stop - start]
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
