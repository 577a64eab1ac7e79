"""Products of any size: a batch larger than the chunk limit goes out as several batches of whole
rows (docs/protocol.md section 7), and the run is unchanged: weights equal the centralized run's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from enshuffle.batch import combine, split
from enshuffle.coordinator.distributed import Batch, DistributedCompute, InProcessExecutor
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.kernels import compute_batch
from enshuffle.model import LocalCompute
from wire_util import InProcessRun, assert_same_weights, load_inputs, reference_weights, spawn_node
from presets import small_default


def batch_bytes(batch: Batch, result: np.ndarray, static: np.ndarray | None = None) -> int:
    """What one batch needs: its operands, the static rows it gathers, its result."""
    gathered = 0 if static is None else batch.arrays["rows"].shape[0] * static.shape[1] * static.itemsize
    return sum(a.nbytes for a in batch.arrays.values()) + gathered + result.nbytes


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("static", [False, True])
def test_a_large_batch_splits_into_rows_that_make_the_same_product(transpose, static):
    rng = np.random.default_rng(1)
    s = rng.standard_normal((500, 40))
    if static:
        rows = rng.permutation(500)[:300]
        arrays = {"rows": rows, "b": rng.standard_normal((300, 16) if transpose else (40, 16))}
        params = {"a_static": "x", "transpose_a": transpose}
    else:
        arrays = {"a": rng.standard_normal((300, 40)), "b": rng.standard_normal((300, 16) if transpose else (40, 16))}
        params = {"transpose_a": transpose}
    whole = compute_batch("matmul", params, arrays, {"x": s})
    for cap in (20_000, 4_000):  # rows only; then b (or the result) too large: columns as well
        parts, groups = split("matmul", params, arrays, cap, static_cols=40)
        assert len(parts) > 3 and groups[0][0] == ("sum" if transpose else "stack")
        assert (len(groups) > 1) == (cap == 4_000)
        results = [compute_batch("matmul", params, p, {"x": s}) for p in parts]
        for part, result in zip(parts, results):
            assert batch_bytes(Batch(0, "matmul", params, part), result, s if static else None) <= cap
        np.testing.assert_allclose(combine(results, groups), whole, rtol=1e-12, atol=1e-12)
    parts, groups = split("matmul", params, arrays, 10**9, static_cols=40)
    assert len(parts) == 1 and parts[0] is arrays and groups == [(None, 1)]


class SizeRecorder:
    def __init__(self, compute):
        self.inner = InProcessExecutor(compute)
        self.largest = 0
        self.count = 0

    def run(self, batches):
        results = self.inner.run(batches)
        for b, r in zip(batches, results):
            static = self.inner.statics[b.shard].get(b.params.get("a_static")) if "rows" in b.arrays else None
            self.largest = max(self.largest, batch_bytes(b, r, static))
            self.count += 1
        return results

    def step_done(self):
        self.inner.step_done()


def test_a_chunked_three_layer_run_equals_the_centralized_one(core_dataset):
    preset = replace(small_default(dtype="float64", layers=(784, 64, 48, 10)), batch_size=100)
    inputs = prepare(core_dataset, preset, limit=300)
    cap = 64 << 10
    compute = DistributedCompute(
        inputs.images,
        2,
        np.random.default_rng(2),
        SizeRecorder,
        **inputs.source(),
        layers=preset.layers,
        chunk_bytes=cap,
        static_chunk_bytes=cap,
    )
    reference = Trainer(preset, inputs, LocalCompute(inputs.images), secret=4)
    distributed = Trainer(preset, inputs, compute, secret=4)
    while not distributed.finished and distributed.step < 3:
        reference.run_step()
        distributed.run_step()
        for name, want in reference.params.items():
            np.testing.assert_allclose(distributed.params[name], want, rtol=1e-9, atol=1e-12, err_msg=name)
    assert compute.executor.largest <= cap
    assert compute.executor.count > 3 * 2 * 5  # more batches than products: they were split


def test_chunked_batches_over_the_wire(core_data_dir, tmp_path):
    """Real node processes get a run whose every product is cut into 48 KiB pieces."""
    preset = replace(small_default(dtype="float64", epochs=1, layers=(784, 40, 30, 10)), batch_size=100)
    inputs = load_inputs(core_data_dir, preset, 300)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2)
    run.compute.chunk_bytes = run.compute.static_chunk_bytes = 48 << 10
    run.start()
    nodes = [
        spawn_node(tmp_path / f"n{i}", run.endpoint, run.identity.fingerprint, f"n{i}", tmp_path) for i in range(2)
    ]
    try:
        assert_same_weights(run.finish(timeout=120), expected)
    finally:
        run.close()
        for node in nodes:
            node.stop()
    assert run.server.counters["rejected"] == 0
