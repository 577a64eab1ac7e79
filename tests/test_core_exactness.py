"""Exactness: distributed training equals the centralized reference after every step.

The brief's last notebook cell, done right: the same `Trainer` runs once on `LocalCompute`
(the centralized numpy reference) and once on `DistributedCompute` with 1, 2, 3 and 7
in-process nodes, for both presets and both disguises, and the weights are compared
after each step, not only at the end.

TOLERANCE (float64 throughout): rtol=1e-9, atol=1e-12. Why these numbers: power-of-two
disguises are exact, so the only difference is the order in which partial sums are added
(blocks of the contraction axis, in permuted order). For a dot product over K <= 784 terms the
reordering error is bounded by about K * eps * sum|terms| ~ 784 * 2.2e-16 ~ 2e-13 relative to
the terms' magnitudes; three steps of updates add a few such errors. rtol 1e-9 leaves more than
three orders of magnitude of margin (observed: below 1e-10 relative, 1e-17 absolute). atol 1e-12
covers entries whose exact value is near zero (biases start at 0; gradient sums cancel), where a
relative bound is meaningless; weights themselves are O(1e-2), so 1e-12 is still a 1e-10
relative check on them. No bitwise claims: permuted contraction order is not bitwise-exact.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.model import LocalCompute, evaluate
from presets import small_default

RTOL, ATOL = 1e-9, 1e-12
STEPS = 3
TRAIN_LIMIT = 600


def float64_preset(name: str):
    """The preset in float64; 'default' with a batch of 100 so 3 steps stay within one small epoch."""
    preset = small_default(name, dtype="float64")
    if name == "default":
        preset = replace(preset, batch_size=100)
    return preset


def assert_same_weights(got: dict, want: dict, where: str) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype == np.float64
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=ATOL, err_msg=f"{name} {where}")


@pytest.mark.parametrize("nodes", [1, 2, 3, 7])
@pytest.mark.parametrize("disguise", ["share", "shuffle"])
@pytest.mark.parametrize("preset_name", ["seed", "default"])
def test_distributed_weights_equal_centralized_after_every_step(core_dataset, preset_name, disguise, nodes):
    preset = float64_preset(preset_name)
    inputs = prepare(core_dataset, preset, limit=TRAIN_LIMIT)
    secret = 0x5EC12E7 + nodes
    reference = Trainer(preset, inputs, LocalCompute(inputs.images), secret=secret)
    compute = DistributedCompute(
        inputs.images,
        nodes,
        np.random.default_rng(1000 + nodes),
        InProcessExecutor,
        disguise=disguise,
        **inputs.source(),
    )
    distributed = Trainer(preset, inputs, compute, secret=secret)
    assert_same_weights(distributed.params, reference.params, "at initialisation")

    for step in range(1, STEPS + 1):
        want_report = reference.run_step()
        got_report = distributed.run_step()
        assert_same_weights(distributed.params, reference.params, f"after step {step} ({nodes} nodes, {disguise})")
        assert (got_report is None) == (want_report is None)
        if want_report is not None:  # the seed preset is full batch: every step ends an epoch
            np.testing.assert_allclose(got_report.cost, want_report.cost, rtol=RTOL)
            # An argmax can flip only where two outputs tie to within rounding: allow one sample.
            n_train, n_test = len(inputs.train_labels), len(inputs.test_labels)
            assert abs(got_report.train_accuracy - want_report.train_accuracy) <= 1 / n_train
            assert abs(got_report.test_accuracy - want_report.test_accuracy) <= 1 / n_test

    # The work really went through the nodes: every step sent batches to every shard.
    assert compute.executor.batches >= STEPS * 2 * nodes
    # The test-set forward pass (evaluate) agrees too, on the trained weights.
    params = reference.params
    want_z1 = inputs.images["test"] @ params["w1"]
    # Additive shares carry noise 2**12 times the largest pixel: their rounding is ~2**12 * eps of
    # the product's scale, so entries near zero are compared on that scale (1e-9 of the largest).
    np.testing.assert_allclose(
        compute.x_w1("test", None, params["w1"]), want_z1, rtol=RTOL, atol=RTOL * float(np.abs(want_z1).max())
    )
    got = evaluate(compute, "test", params, inputs.test_labels, preset)
    want = evaluate(LocalCompute(inputs.images), "test", params, inputs.test_labels, preset)
    assert abs(got - want) <= 1 / len(inputs.test_labels)


def test_distributed_run_is_not_the_reference_object(core_dataset):
    """Guard against a vacuous pass: the distributed compute must not fall back to LocalCompute's
    numbers by sharing state; a wrong shard result has to show up in the weights."""
    preset = float64_preset("default")
    inputs = prepare(core_dataset, preset, limit=TRAIN_LIMIT)

    class Corrupting(InProcessExecutor):
        def run(self, batches):
            results = super().run(batches)
            for batch, result in zip(batches, results):
                if batch.op == "matmul" and batch.params.get("a_static", "") and batch.shard == 1:
                    result[0, 0] += 1e-3  # one wrong element from node 2 in the image products
            return results

    reference = Trainer(preset, inputs, LocalCompute(inputs.images), secret=11)
    distributed = Trainer(
        preset, inputs, DistributedCompute(inputs.images, 3, np.random.default_rng(5), Corrupting), secret=11
    )
    reference.run_step()
    distributed.run_step()
    with pytest.raises(AssertionError):
        assert_same_weights(distributed.params, reference.params, "after a corrupted step")
