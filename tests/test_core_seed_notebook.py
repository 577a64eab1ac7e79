"""The 'seed' preset's first epoch equals the seed notebook's own formulas.

`notebook_first_epoch` below is cells In[2] and In[4] of seed/000_22d4028df1660701.txt, copied
statement for statement (only the data loading, the timing and the commented-out pickling are
left out, and the per-sample accuracy loops are vectorized with the same argmax-of-a2 rule).
It returns what the notebook prints for epoch 1 (cost, training accuracy, validation accuracy)
and the weights after the notebook's update, with its bias bug fixed: the notebook sums the
bias gradients to one scalar (`numpy.sum(a2_dz.T)`); the fixed update adds the column sums.
The notebook's validation pass drops the biases; in epoch 1 they are still zero, so that pass
equals ours.

Tolerances: cost rtol 1e-12 (the same float64 operations, only `(1/(2m))*S` versus `S/(2m)`
may differ by an ulp), accuracies exactly (same argmax of bitwise-equal a2), weights rtol 1e-9
(the notebook's `(a2_dz.T @ a1).T` and our `a1.T @ dz2` are the same sums, possibly in another
BLAS order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import numpy as np
import pytest

from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.model import LocalCompute, get_preset

REPO = Path(__file__).resolve().parents[1]
LIMIT = 2000
WEIGHT_RTOL = 1e-9
# Biases start at exactly 0, so after one step they are lr * (a sum of gradients) that can
# cancel; 1e-15 absolute is ~1e-12 of their typical size here and keeps rtol meaningful.
BIAS_ATOL = 1e-15


def notebook_first_epoch(train_X, train_labels, test_X, test_labels) -> dict:
    """In[2] and the first pass of In[4], verbatim apart from the vectorized accuracy loops."""
    # In[2]
    learning_rate = 0.05
    seed = 402

    training_images_count = train_X.shape[0]
    testing_images_count = test_X.shape[0]

    numpy.random.seed(seed)

    train_Y = numpy.zeros((train_labels.size, train_labels.max() + 1))
    train_Y[numpy.arange(train_labels.size), train_labels] = 1

    w1 = numpy.random.randn(784, 128) * 0.01
    b1 = numpy.zeros(128)
    w2 = numpy.random.randn(128, 10) * 0.01
    b2 = numpy.zeros(10)

    # In[4], epoch 0
    # layer 1 forward
    z1 = numpy.dot(train_X, w1) + b1
    a1 = 1 / (1 + numpy.exp(-z1))

    # layer 2 forward
    z2 = numpy.dot(a1, w2) + b2
    a2 = 1 / (1 + numpy.exp(-z2))

    # computing cost
    m = training_images_count
    cost_delta = a2 - train_Y
    cost_delta_squared = numpy.square(cost_delta)

    cost = (1 / (2 * m)) * numpy.sum(cost_delta_squared)
    cost = numpy.squeeze(cost)
    dY_hat = (-1 / m) * cost_delta

    # layer 2 backward
    a2_dz = dY_hat * a2 * (1 - a2)
    z2_dw = numpy.dot(a2_dz.T, a1)
    z2_da = numpy.dot(w2, a2_dz.T)

    # layer 1 backward
    a1_dz = z2_da.T * a1 * (1 - a1)
    z1_dw = numpy.dot(a1_dz.T, train_X)

    # computing training accuracy: `for index ...: predicted = numpy.argmax(a2[index])`
    training_correct = int(numpy.count_nonzero(numpy.argmax(a2, axis=1) == train_labels))
    training_accuracy = training_correct / training_images_count

    # computing validation accuracy (the notebook drops the biases here; they are 0 in epoch 1)
    z1 = numpy.dot(test_X, w1)
    a1 = 1 / (1 + numpy.exp(-z1))
    z2 = numpy.dot(a1, w2)
    a2 = 1 / (1 + numpy.exp(-z2))
    validation_correct = int(numpy.count_nonzero(numpy.argmax(a2, axis=1) == test_labels))
    validation_accuracy = validation_correct / testing_images_count

    # update weights and bias -- with the bias bug fixed: column sums, not one scalar
    z2_db = numpy.sum(a2_dz, axis=0)
    z1_db = numpy.sum(a1_dz, axis=0)
    w2 += learning_rate * z2_dw.T
    b2 += learning_rate * z2_db.T
    w1 += learning_rate * z1_dw.T
    b1 += learning_rate * z1_db.T

    return {
        "cost": float(cost),
        "train_accuracy": training_accuracy,
        "test_accuracy": validation_accuracy,
        "w1": w1,
        "b1": b1,
        "w2": w2,
        "b2": b2,
    }


@pytest.fixture(scope="module")
def notebook(core_dataset) -> dict:
    """The notebook's epoch 1 on the first LIMIT training images and the whole (small) test set."""
    train_X = core_dataset.train_images[:LIMIT]  # uint8, as the notebook's frombuffer arrays
    train_labels = core_dataset.train_labels[:LIMIT]
    assert train_labels.max() == 9  # the notebook sizes its one-hot by the largest label
    state = numpy.random.get_state()  # the notebook seeds the global generator; put it back after
    try:
        return notebook_first_epoch(train_X, train_labels, core_dataset.test_images, core_dataset.test_labels)
    finally:
        numpy.random.set_state(state)


def assert_weights_match_notebook(params: dict, notebook: dict) -> None:
    for name in ("w1", "w2"):
        np.testing.assert_allclose(params[name], notebook[name], rtol=WEIGHT_RTOL, err_msg=name)
    for name in ("b1", "b2"):
        np.testing.assert_allclose(params[name], notebook[name], rtol=WEIGHT_RTOL, atol=BIAS_ATOL, err_msg=name)


def test_trainer_seed_epoch_one_equals_notebook(core_dataset, notebook):
    preset = get_preset("seed")
    inputs = prepare(core_dataset, preset, limit=LIMIT)
    trainer = Trainer(preset, inputs, LocalCompute(inputs.images))
    report = trainer.run_epoch()

    assert report.epoch == 1
    np.testing.assert_allclose(report.cost, notebook["cost"], rtol=1e-12)
    assert report.train_accuracy == notebook["train_accuracy"]
    assert report.test_accuracy == notebook["test_accuracy"]
    assert_weights_match_notebook(trainer.params, notebook)
    # The fix is visible: one bias per unit, not the notebook's single scalar added to all of them.
    assert np.unique(trainer.params["b1"]).size > 1 and np.unique(trainer.params["b2"]).size > 1


def test_seven_in_process_nodes_match_notebook(core_dataset, notebook):
    """The notebook's 7 schedulers, done as block products: same first epoch (to rounding)."""
    preset = get_preset("seed")
    inputs = prepare(core_dataset, preset, limit=LIMIT)
    compute = DistributedCompute(inputs.images, 7, np.random.default_rng(7), InProcessExecutor)
    trainer = Trainer(preset, inputs, compute)
    report = trainer.run_epoch()

    np.testing.assert_allclose(report.cost, notebook["cost"], rtol=1e-9)
    assert abs(report.train_accuracy - notebook["train_accuracy"]) <= 1 / LIMIT
    assert_weights_match_notebook(trainer.params, notebook)


def test_cli_seed_epoch_one_equals_notebook(core_data_dir, core_cache, notebook, tmp_path):
    weights = tmp_path / "seed-epoch1.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "enshuffle",
            "train",
            "--preset",
            "seed",
            "--epochs",
            "1",
            "--nodes",
            "0",
            "--json",
            "--limit",
            str(LIMIT),
            "--data",
            str(core_data_dir),
            "--save-weights",
            str(weights),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ENSHUFFLE_CACHE": str(core_cache)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 1, proc.stdout
    epoch = lines[0]
    assert epoch["epoch"] == 1
    np.testing.assert_allclose(epoch["cost"], notebook["cost"], rtol=1e-12)
    assert epoch["train_accuracy"] == notebook["train_accuracy"]
    assert epoch["test_accuracy"] == notebook["test_accuracy"]
    with np.load(weights, allow_pickle=False) as saved:
        assert_weights_match_notebook({k: saved[k] for k in saved.files}, notebook)
