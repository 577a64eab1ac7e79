"""Result verification: Freivalds' test for products with tight per-row rounding bounds.

Unit tests show no false alarms on honest products (random and image-like data, both dtypes,
every shape the network sends) and that a single wrong entry is caught. A wire test shows a node
that returns wrong numbers with a valid signature is refused, its batch is re-issued, and
training still ends with the centralized reference's weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from enshuffle.coordinator.verify import StaticNorms, check_matmul

from wire_util import (
    InProcessRun,
    ScriptedNode,
    assert_same_weights,
    default_preset,
    load_inputs,
    reference_weights,
    spawn_node,
)

DTYPES = (np.float32, np.float64)


def image_like(rng, n, k, dtype):
    """Non-negative, mostly-zero data like raw pixels: rounding errors add up with one sign."""
    x = rng.integers(0, 256, size=(n, k)).astype(dtype)
    x[rng.random((n, k)) < 0.5] = 0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data", ["gaussian", "images"])
def test_static_products_pass_and_a_single_wrong_entry_fails(dtype, data):
    rng = np.random.default_rng(3)
    s = (rng.standard_normal((3000, 392)) if data == "gaussian" else image_like(rng, 3000, 392, np.float64)).astype(
        dtype
    )
    norms = StaticNorms(s)
    b = (rng.standard_normal((392, 128)) * 0.01).astype(dtype)
    for rows in (rng.permutation(3000), np.sort(rng.choice(3000, 128, replace=False))):
        c = s[rows] @ b
        for _ in range(5):  # fresh r each time: no false alarm
            assert check_matmul(c, {"rows": rows, "b": b}, {}, rng, s, norms) is None
        wrong = c.copy()
        wrong[len(rows) // 2, 7] += 0.01 * np.abs(c).mean()
        problem = check_matmul(wrong, {"rows": rows, "b": b}, {}, rng, s, norms)
        assert problem is not None and "Freivalds" in problem


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_static_products(dtype):
    rng = np.random.default_rng(4)
    s = image_like(rng, 3000, 392, dtype)
    norms = StaticNorms(s)
    for rows in (rng.permutation(3000), np.sort(rng.choice(3000, 128, replace=False))):
        d = (rng.standard_normal((len(rows), 128)) * 1e-3).astype(dtype)
        c = s[rows].T @ d
        assert check_matmul(c, {"rows": rows, "b": d}, {"transpose_a": True}, rng, s, norms) is None
        wrong = c.copy()
        wrong[5, 5] += 0.01 * np.abs(c).mean()
        assert check_matmul(wrong, {"rows": rows, "b": d}, {"transpose_a": True}, rng, s, norms) is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_dynamic_products(dtype, transpose):
    rng = np.random.default_rng(5)
    a = rng.random((2000, 64)).astype(dtype)
    b = rng.standard_normal((64 if not transpose else 2000, 10)).astype(dtype)
    c = (a.T if transpose else a) @ b
    params = {"transpose_a": transpose}
    assert check_matmul(c, {"a": a, "b": b}, params, rng) is None
    wrong = c.copy()
    wrong[1, 2] *= 1.01
    assert check_matmul(wrong, {"a": a, "b": b}, params, rng) is not None
    nan = c.copy()
    nan[0, 0] = np.nan
    assert check_matmul(nan, {"a": a, "b": b}, params, rng) is not None


class TamperingNode(ScriptedNode):
    """A node with a valid key and session that returns one wrong entry in its first batches."""

    def __init__(self, *args, wrong: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.wrong_left = wrong

    def result_frames(self, batch, signer=None):
        if self.wrong_left <= 0:
            return super().result_frames(batch, signer)
        self.wrong_left -= 1
        from enshuffle.kernels import compute_batch

        h = batch.header
        c = compute_batch(h["op"], h["params"], batch.arrays, self.statics).copy()
        c.flat[c.size // 2] += 1.0 + abs(c.flat[c.size // 2])
        return self.channel.seal(
            "RESULT",
            {"run_id": h["run_id"], "batch_id": h["batch_id"], "seq": h["seq"], "compute_seconds": 0.001},
            {"c": c},
        )


def train_beside_a_liar(run, tmp_path):
    """Start `run` with a TamperingNode and an honest node process; its final weights."""
    liar = TamperingNode(run.endpoint, name="liar")
    honest = spawn_node(tmp_path / "honest", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
    try:
        run.start()
        liar.hello()
        liar.serve_until(run.done.is_set, 120, "training to finish", on_timeout=run.describe)
        return run.finish()
    finally:
        run.close()
        liar.close()
        honest.stop()


def test_a_node_returning_wrong_numbers_is_refused_and_training_stays_exact(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 1000)
    expected = reference_weights(preset, inputs)
    # Three lies, then honest: below the quarantine limit, so its refused batches come back to it
    # (the exposure bound keeps them off the other node) and it answers them right.
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2, quarantine_after=10)
    weights = train_beside_a_liar(run, tmp_path)
    assert run.server.counters["wrong"] >= 3, run.describe()
    assert run.logged("failed"), run.describe()
    assert run.row("liar").refused >= 3
    assert_same_weights(weights, expected)


# --- tight checks: what a node can no longer slip through --------------------------------------


def static_batch(rng, dtype, transpose, n_static=3000, rows=128):
    """A standardized (mixed-sign) static block and a batch over it, like the default preset's."""
    s = rng.standard_normal((n_static, 392)).astype(dtype)
    r = np.sort(rng.choice(n_static, rows, replace=False))
    b = (rng.standard_normal((rows if transpose else 392, 128)) * 0.05).astype(dtype)
    c = (s[r].T @ b) if transpose else (s[r] @ b)
    return s, {"rows": r, "b": b}, {"transpose_a": transpose}, c


@pytest.mark.parametrize("dtype,rel", [(np.float32, 1e-4), (np.float64, 1e-11)])
@pytest.mark.parametrize("transpose", [False, True])
def test_single_entry_off_at_the_targets_is_caught(dtype, rel, transpose):
    rng = np.random.default_rng(11)
    s, arrays, params, c = static_batch(rng, dtype, transpose)
    norms = StaticNorms(s)
    rms = float(np.sqrt(np.mean(c.astype(np.float64) ** 2)))
    caught = 0
    for trial in range(40):
        assert check_matmul(c, arrays, params, rng, s, norms) is None
        wrong = c.copy()
        wrong.flat[rng.integers(c.size)] += dtype(rel * rms)
        caught += check_matmul(wrong, arrays, params, rng, s, norms) is not None
    assert caught >= 39, caught


@pytest.mark.parametrize("transpose", [False, True])
def test_float32_bias_and_scale_of_every_entry_are_caught(transpose):
    rng = np.random.default_rng(12)
    s, arrays, params, c = static_batch(rng, np.float32, transpose)
    c64 = c.astype(np.float64)
    for wrong in ((c64 * (1 + 1e-6)).astype(np.float32), (c64 + 1e-6 * np.abs(c64)).astype(np.float32)):
        problem = check_matmul(wrong, arrays, params, rng, s)
        assert problem is not None and "correlated" in problem, problem


def test_nan_is_refused_unless_the_operands_produce_it():
    rng = np.random.default_rng(13)
    s, arrays, params, c = static_batch(rng, np.float64, False)
    wrong = c.copy()
    wrong[5, 3] = np.nan
    assert "NaN" in check_matmul(wrong, arrays, params, rng, s)
    inf = c.copy()
    inf[7, 0] = np.inf
    assert "NaN or infinite" in check_matmul(inf, arrays, params, rng, s)
    # A non-finite operand: the exact product has NaN in that row, an honest node returns it.
    s_bad = s.copy()
    s_bad[arrays["rows"][5], 0] = np.nan
    honest = s_bad[arrays["rows"]] @ arrays["b"]
    assert np.isnan(honest[5]).all()
    assert check_matmul(honest, arrays, params, rng, s_bad) is None
    # ... but every other row is still checked.
    wrong = honest.copy()
    wrong[6, 2] += 1.0
    assert check_matmul(wrong, arrays, params, rng, s_bad) is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_replica_check_passes_honest_results_and_catches_one_entry(dtype, transpose):
    from enshuffle.coordinator.verify import check_replica

    rng = np.random.default_rng(14)
    s, arrays, params, c = static_batch(rng, dtype, transpose)
    assert check_replica(c, arrays, params, s) is None
    wrong = c.copy()
    wrong[3, 4] = wrong[3, 4] * (1 + 1e-3) + dtype(1e-3) * float(np.abs(c).mean())
    assert "replica check failed at (3, 4)" in check_replica(wrong, arrays, params, s)


def test_with_replicate_the_coordinators_own_product_refuses_a_liar(core_data_dir, tmp_path):
    """--replicate alone (Freivalds off) still refuses every wrong result of an untrusted node."""
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2, verify_results=False, replicate=True, quarantine_after=10)
    weights = train_beside_a_liar(run, tmp_path)
    assert run.server.counters["wrong"] >= 3 and run.logged("replica check failed"), run.describe()
    assert_same_weights(weights, expected)


@pytest.mark.parametrize("transpose", [False, True])
def test_large_float64_products_are_checked_with_the_blocks_fixed_probes(transpose):
    """A full-batch float64 product (the seed preset's) is checked from the left with the static
    block's fixed secret probes: honest results pass again and again, and a single entry off by
    1e-11 of the RMS, a scale of every entry and a NaN are each caught; the block is read once."""
    from enshuffle.coordinator import verify

    rng = np.random.default_rng(21)
    n = 3 * verify.LEFT_MIN_ROWS
    s = image_like(rng, n, 392, np.float64)
    norms = StaticNorms(s, rng)
    rows = rng.permutation(n)
    if transpose:
        b = rng.standard_normal((n, 128)) * 1e-3
        c = s[rows].T @ b
    else:
        b = rng.standard_normal((392, 128)) * 0.01
        c = s[rows] @ b
    arrays, params = {"rows": rows, "b": b}, {"transpose_a": transpose}
    res = verify.measure_matmul(c, arrays, params, rng, s, norms)
    assert res.axis == "column" and norms.drawn  # the left-probe path ran
    rms = float(np.sqrt(np.mean(c * c)))
    caught = 0
    for _ in range(20):
        assert check_matmul(c, arrays, params, rng, s, norms) is None
        wrong = c.copy()
        wrong.flat[rng.integers(c.size)] += 1e-11 * rms
        caught += check_matmul(wrong, arrays, params, rng, s, norms) is not None
    assert caught == 20
    assert check_matmul(c * (1 + 1e-12), arrays, params, rng, s, norms) is not None
    nan = c.copy()
    nan[1, 1] = np.nan
    assert "NaN" in check_matmul(nan, arrays, params, rng, s, norms)


def test_fixed_probes_are_drawn_anew_after_refresh_rows():
    from enshuffle.coordinator import verify

    rng = np.random.default_rng(22)
    n = verify.LEFT_MIN_ROWS
    s = rng.standard_normal((n, 64))
    norms = StaticNorms(s, rng)
    b = rng.standard_normal((64, 8))
    rows = rng.permutation(n)
    c = s[rows] @ b
    assert check_matmul(c, {"rows": rows, "b": b}, {}, rng, s, norms) is None
    first = norms.row_probes.copy()
    for _ in range(verify.REFRESH - 1):
        check_matmul(c, {"rows": rows, "b": b}, {}, rng, s, norms)
    assert not np.array_equal(first, norms.row_probes)


def test_a_result_computed_with_subnormals_flushed_passes():
    """enshuffle node flushes subnormals to zero (FTZ/DAZ): an honest float32 product of tiny
    values then differs from the exact one by up to K x the smallest normal, which the check
    allows for; a real lie on the same data is still caught."""
    rng = np.random.default_rng(23)
    s = rng.standard_normal((3000, 392)).astype(np.float32)
    rows = np.sort(rng.choice(3000, 128, replace=False))
    b = (rng.standard_normal((392, 128)) * 1e-36).astype(np.float32)  # products fall below 1.2e-38
    exact = s[rows].astype(np.float64) @ b.astype(np.float64)
    flushed = exact.astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    flushed[np.abs(flushed) < tiny] = 0  # what FTZ leaves of the smallest entries (at most K x tiny off)
    assert np.count_nonzero(flushed == 0) > 0
    assert check_matmul(flushed, {"rows": rows, "b": b}, {}, rng, s) is None
    wrong = flushed.copy()
    wrong[3, 3] += 1e-30
    assert check_matmul(wrong, {"rows": rows, "b": b}, {}, rng, s) is not None
