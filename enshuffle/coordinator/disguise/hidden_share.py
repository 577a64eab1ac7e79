"""The hidden-layer share: a hidden-to-hidden layer's products over k secret blocks of its input units.

Layer l's weights w (n, m) contract over the previous layer's n units, split into k secret blocks
Q_s (docs/design.md, "Hidden layers"). Per batch, with G (b, r) and H (r, n) fresh Gaussian noise
of rank NOISE_RANK at each unit's own scale and M_s a fresh secret block-diagonal mixing of Q_s
(dense MIX_GROUP blocks):

    forward   node s receives (a[:, Q_s] + G H[:, Q_s]) M_s (rows shuffled) and M_s^-1 w[Q_s] (columns
              shuffled, power-of-two scaled); the sum of the partials minus G (H w) is a @ w
    backward  from the forward's operands (the same mixing and noise) and dz (rows and units
              shuffled, power-of-two scaled, with labels its class structure moved as dw1's dz1 is:
              decoy.py), node s computes rows Q_s of a^T dz and columns Q_s of dz w^T; the
              coordinator removes M_s, the noise's share H[:, Q_s]^T (G^T dz) and the decoys'
              (a^T delta) directions and delta (directions w^T)

The corrections cost the coordinator about (r + g) / b of the product.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from enshuffle.coordinator.disguise.base import Part, exponents
from enshuffle.coordinator.disguise.decoy import Decoy
from enshuffle.coordinator.disguise.mixing import Mixing
from enshuffle.coordinator.disguise.pixel_share import NOISE_SCALE
from enshuffle.coordinator.plan import Disguise, pow2

NOISE_RANK = 8  # r: fresh per-batch Gaussian factors over a layer's input units
MIX_GROUP = 8  # dense blocks of each fresh mixing M_s
MIX_SPREAD = 1.0  # singular values of each block in [1/2, 2]

# A forward's secrets, kept for the same batch's backward: (a, a + G H, G, H, [(Q_s, M_s)])
Secrets = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, Mixing]]]


class HiddenShare:
    """The share of every distributed hidden-to-hidden layer: `unit_blocks` layer -> [Q_s]."""

    def __init__(self, unit_blocks: dict[int, list[np.ndarray]]):
        self.unit_blocks = unit_blocks
        self._kept: dict[int, Secrets] = {}  # layer -> the forward's secrets, for its backward

    def noisy(self, a: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a + G H, G, H) in float64: G (b, r) fresh per batch, H (r, n) fresh too, each unit's
        noise at the unit's own root mean square in this batch (a unit that is zero throughout
        gets noise of scale 1, so a dead unit does not show)."""
        a64 = a.astype(np.float64, copy=False)
        rms = np.sqrt(np.einsum("ij,ij->j", a64, a64) / max(a.shape[0], 1))
        rms[rms == 0] = 1.0
        g = rng.standard_normal((a.shape[0], NOISE_RANK))
        h = rng.standard_normal((NOISE_RANK, a.shape[1])) * (rms * NOISE_SCALE / np.sqrt(NOISE_RANK))
        noisy = g @ h
        noisy += a64
        return noisy, g, h

    def forward(
        self, a: np.ndarray, w: np.ndarray, layer: int, rng: np.random.Generator, exposures: list[list[tuple]]
    ) -> "Forward":
        """a (b, n) @ w (n, m) over the slots' blocks of units; `exposures`: what each slot's
        node learns from its part."""
        return Forward(self, a, w, layer, rng, exposures)

    def forget(self, layer: int) -> Secrets | None:
        """The secrets of `layer`'s last forward, no longer kept (its backward takes them)."""
        return self._kept.pop(layer, None)

    def backward(
        self,
        a: np.ndarray,
        dz: np.ndarray,
        w: np.ndarray,
        layer: int,
        rng: np.random.Generator,
        exposures: list[list[tuple]],
        kept: Secrets | None,
        ship_dw: bool,
        ship_da: bool,
        decoy: Decoy | None = None,
    ) -> "Backward":
        """a^T @ dz (n, m) and dz @ w^T (b, n): each shipped one from the slots, the other computed
        here. `kept`: the forward's secrets (`forget`), reused when they are this batch's;
        `decoy`: moves dz's class structure."""
        return Backward(self, a, dz, w, layer, rng, exposures, kept, ship_dw, ship_da, decoy)


class Forward:
    def __init__(
        self,
        share: HiddenShare,
        a: np.ndarray,
        w: np.ndarray,
        layer: int,
        rng: np.random.Generator,
        exposures: list[list[tuple]],
    ):
        self.share, self.a, self.w, self.layer, self.rng, self.exposures = share, a, w, layer, rng, exposures
        self.noisy, self.g, self.h = share.noisy(a, rng)
        self.w64 = w.astype(np.float64, copy=False)
        self.secrets: list[tuple[np.ndarray, Mixing]] = []
        self.undos: list[Disguise] = []
        self.correction: np.ndarray | None = None

    def parts(self) -> Iterator[Part]:
        a, w = self.a, self.w
        for s, block in enumerate(self.share.unit_blocks[self.layer]):
            mix = Mixing(len(block), self.rng, MIX_GROUP, MIX_SPREAD)
            rows, cols = self.rng.permutation(a.shape[0]), self.rng.permutation(w.shape[1])
            col_exp = exponents(w.shape[1], self.rng)
            d = Disguise(rows=rows, cols=cols, col_exp=col_exp)
            a_s = mix.right(np.take(self.noisy, rows, axis=0)[:, block], a.dtype)
            b_s = np.take(mix.inverse_left(self.w64[block]), cols, axis=1)
            b_s *= pow2(col_exp, np.float64)[None, :]
            self.secrets.append((block, mix))
            self.undos.append(d)
            yield Part(s, {"transpose_a": False}, {"a": a_s, "b": b_s.astype(w.dtype)}, self.exposures[s])

    def meanwhile(self) -> None:
        self.correction = self.g @ (self.h @ self.w64)

    def undo(self, results: list[np.ndarray]) -> np.ndarray:
        assert self.correction is not None
        total = -self.correction
        for d, r in zip(self.undos, results):
            total += d.undo(np.asarray(r, dtype=np.float64))
        self.share._kept[self.layer] = (self.a, self.noisy, self.g, self.h, self.secrets)
        return total.astype(self.w.dtype, copy=False)


class Backward:
    def __init__(
        self,
        share: HiddenShare,
        a: np.ndarray,
        dz: np.ndarray,
        w: np.ndarray,
        layer: int,
        rng: np.random.Generator,
        exposures: list[list[tuple]],
        kept: Secrets | None,
        ship_dw: bool,
        ship_da: bool,
        decoy: Decoy | None,
    ):
        self.a, self.w, self.rng, self.exposures = a, w, rng, exposures
        self.ship_dw, self.ship_da = ship_dw, ship_da
        if kept is None or kept[0] is not a:  # no forward of this batch kept: fresh secrets
            self.noisy, self.g, self.h = share.noisy(a, rng)
            self.secrets = [
                (block, Mixing(len(block), rng, MIX_GROUP, MIX_SPREAD)) for block in share.unit_blocks[layer]
            ]
        else:
            _, self.noisy, self.g, self.h, self.secrets = kept
        self.exact = dz
        self.moved: tuple[np.ndarray, np.ndarray] | None = None
        if decoy is not None:
            dz, delta, directions = decoy(dz)
            self.moved = (delta, directions)
        self.dz = dz
        self.dz64 = dz.astype(np.float64, copy=False)
        self.w64 = w.astype(np.float64, copy=False)
        self.undos: list[tuple[Disguise, Disguise]] = []
        self.noise: np.ndarray | None = None
        self.local_dw: np.ndarray | None = None
        self.local_da: np.ndarray | None = None
        self.undo_dw: np.ndarray | None = None
        self.undo_da: np.ndarray | None = None

    def parts(self) -> Iterator[Part]:
        a, dz, w, m = self.a, self.dz, self.w, self.dz.shape[1]
        for s, (block, mix) in enumerate(self.secrets):
            rows, cols = self.rng.permutation(dz.shape[0]), self.rng.permutation(m)
            exp = exponents(m, self.rng)
            a_s = mix.right(np.take(self.noisy, rows, axis=0)[:, block], a.dtype)
            d_s = np.take(np.take(self.dz64, rows, axis=0), cols, axis=1) * pow2(exp, np.float64)[None, :]
            wt_s = (np.take(mix.inverse_left(self.w64[block]), cols, axis=1) * pow2(-exp, np.float64)[None, :]).T
            self.undos.append(
                (
                    Disguise(rows=np.arange(len(block)), cols=cols, col_exp=exp),
                    Disguise(rows=rows, cols=np.arange(len(block))),
                )
            )
            d_s = d_s.astype(dz.dtype)
            if self.ship_dw:
                yield Part(s, {"transpose_a": True}, {"a": a_s, "b": d_s}, self.exposures[s])
            if self.ship_da:
                yield Part(s, {"transpose_a": False}, {"a": d_s, "b": wt_s.astype(w.dtype)}, self.exposures[s])

    def meanwhile(self) -> None:
        """The noise's share (r, m), the product kept here, and what the decoy rows add."""
        a, exact, w = self.a, self.exact, self.w
        self.noise = self.g.T @ self.dz64 if self.ship_dw else None
        self.local_dw = None if self.ship_dw else a.T @ exact
        self.local_da = None if self.ship_da else exact @ w.T
        if self.moved is not None:
            delta, directions = self.moved
            if self.ship_dw:
                self.undo_dw = (a.astype(np.float64, copy=False).T @ delta) @ directions
            if self.ship_da:
                self.undo_da = delta @ (directions @ self.w64.T)

    def undo(self, results: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        a, exact = self.a, self.exact
        n, m = a.shape[1], self.dz.shape[1]
        out = iter(results)
        dw = np.empty((n, m))
        da = np.empty((a.shape[0], n))
        for (block, mix), (d_w, d_a) in zip(self.secrets, self.undos):
            if self.ship_dw:
                assert self.noise is not None
                part = mix.inverse_transposed_left(d_w.undo(np.asarray(next(out), dtype=np.float64)))
                part -= self.h[:, block].T @ self.noise
                dw[block] = part
            if self.ship_da:
                da[:, block] = mix.right(d_a.undo(np.asarray(next(out), dtype=np.float64)), np.float64, transposed=True)
        if self.undo_dw is not None:
            dw -= self.undo_dw
        if self.undo_da is not None:
            da -= self.undo_da
        if self.local_dw is not None:
            return self.local_dw, da.astype(exact.dtype, copy=False)
        if self.local_da is not None:
            return dw.astype(exact.dtype, copy=False), self.local_da
        return dw.astype(exact.dtype, copy=False), da.astype(exact.dtype, copy=False)
