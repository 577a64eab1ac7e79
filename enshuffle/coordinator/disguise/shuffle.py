"""The "shuffle" disguise: the audit's control for the pixel-wide products.

Positions hidden, values in the clear up to scale: node s holds its pixel block P_s of every image
set in a secret row order, each column scaled by a secret power of two (drawn once), and receives
w1[P_s] with the inverse scales, the step's hidden units shuffled and power-of-two scaled (the
column disguise every pixel disguise shares, pixel_share.py). Power-of-two scales are exact, so
undoing costs no rounding; the audit shows what the attacks recover from it.
"""

from __future__ import annotations

import numpy as np

from enshuffle.coordinator.disguise.base import exponents
from enshuffle.coordinator.disguise.pixel_share import Gradient, PixelDisguise, ShardStatics
from enshuffle.coordinator.ledger import POSITIONS_HIDDEN
from enshuffle.coordinator.plan import gather, pow2
from enshuffle.model import INPUTS


class PixelShuffle(PixelDisguise):
    form = POSITIONS_HIDDEN

    def _draw(self, st: ShardStatics, rng: np.random.Generator) -> None:
        st.pixel_exp = exponents(len(st.pixels), rng)

    def static(self, which: str, shard: int) -> np.ndarray:
        st = self.statics[shard]
        out = gather(self.images[which], st.row_order[which], st.pixels)
        assert st.pixel_exp is not None
        out *= pow2(st.pixel_exp, out.dtype)[None, :]
        return out

    def _w1_block(self, which: str, st: ShardStatics, w1: np.ndarray, cols: np.ndarray, dtype) -> np.ndarray:
        b = gather(w1, st.pixels, cols)
        assert st.pixel_exp is not None
        b *= pow2(-st.pixel_exp, b.dtype)[:, None]
        return b

    def _gradient_undo(self, product: Gradient, results: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((INPUTS, product.sent.shape[1]), dtype=product.sent.dtype)
        for st, d, r in zip(self.statics, product.undos, results):
            out[st.pixels] = d.undo(r)
        return out
