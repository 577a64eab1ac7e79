"""The disguise package's shared pieces: one Mixing for every disguise, and the constants the
offload plan reads from the disguises themselves."""

from __future__ import annotations

import numpy as np
import pytest

from enshuffle.coordinator import offload
from enshuffle.coordinator.disguise import decoy, hidden_share, pixel_share, resident
from enshuffle.coordinator.disguise.mixing import Mixing


@pytest.mark.parametrize("size,group,spread", [(70, 32, 1.0), (24, 8, 1.0), (100, 32, 0.5), (5, 32, 0.5)])
def test_a_mixing_and_its_inverse_transposes_and_right_products_agree_with_the_dense_matrix(size, group, spread):
    m = Mixing(size, np.random.default_rng(size), group, spread)
    dense = m.dense()
    w = np.random.default_rng(1).standard_normal((size, 3))
    x = np.random.default_rng(2).standard_normal((4, size))
    np.testing.assert_allclose(m.left(w), dense @ w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.transposed_left(w), dense.T @ w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.left(m.inverse_left(w)), w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.transposed_left(m.inverse_transposed_left(w)), w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.right(x), x @ dense, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.right(x, transposed=True), x @ dense.T, rtol=1e-12, atol=1e-12)
    singular = np.linalg.svd(dense, compute_uv=False)
    assert singular.max() <= 2.0**spread * (1 + 1e-12) and singular.min() >= 2.0**-spread * (1 - 1e-12)
    assert all(hi - lo <= group for lo, hi in m.bounds)


def test_the_clear_control_mixes_nothing_and_draws_nothing():
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    m = Mixing(40, rng, 32, 0.5, identity=True)
    assert rng.bit_generator.state == state
    np.testing.assert_array_equal(m.dense(), np.eye(40))


def test_the_offload_plan_costs_the_disguises_own_constants():
    assert (offload.PIXEL_NOISE_RANK, offload.PIXEL_MIX_GROUP) == (pixel_share.NOISE_RANK, pixel_share.MIX_GROUP)
    assert (offload.HIDDEN_NOISE_RANK, offload.HIDDEN_MIX_GROUP) == (hidden_share.NOISE_RANK, hidden_share.MIX_GROUP)
    assert offload.DECOY_ROWS == decoy.DECOY_ROWS == 10 * (1 + decoy.DECOY_RANK)
    assert (offload.RESIDENT_MIX_GROUP, offload.RESIDENT_PROBES) == (resident.MIX_GROUP, resident.PROBES)
