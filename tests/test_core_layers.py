"""Any MLP: the one training step over a list of layers (enshuffle/model.py).

The 2-layer network keeps the notebook's exact behaviour (tests/test_core_seed_notebook.py);
here: deeper networks' gradients are right (finite differences, sigmoid and ReLU), the
in-process distribution equals the centralized run after every step, checkpoints restore
exactly, and the command line takes --layers / --hidden / --activation.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.model import LocalCompute, OptimizerState, check_layers, get_preset, init_params, softmax, train_step
from presets import small_default
from wire_util import enshuffle_cli

RTOL, ATOL = 1e-9, 1e-12


def test_each_preset_has_its_network():
    """seed keeps the notebook's 784-128-10 sigmoid network; default (and adam, derived from it)
    train 784-2048-10 ReLU, wide enough for the resident first layer to pay."""
    expected = {"seed": ((784, 128, 10), "sigmoid"), "default": ((784, 2048, 10), "relu")}
    expected["adam"] = expected["default"]
    for name, (layers, activation) in expected.items():
        preset = get_preset(name)
        assert (preset.layers, preset.activation) == (layers, activation), name
        assert preset.weight_names == ("w1", "b1", "w2", "b2")
    assert get_preset("default").describe() == "784-2048-10 relu"
    deep = get_preset("default", layers=(784, 64, 32, 10), activation="relu")
    assert deep.depth == 3 and deep.hidden == 64 and deep.describe() == "784-64-32-10 relu"
    shapes = {k: v.shape for k, v in init_params(deep, [1, 2, 3]).items()}
    assert shapes == {"w1": (784, 64), "b1": (64,), "w2": (64, 32), "b2": (32,), "w3": (32, 10), "b3": (10,)}


@pytest.mark.parametrize("layers", [(784,), (10, 784), (784, 128, 9), (784, 0, 10)])
def test_a_network_that_is_not_one_is_refused(layers):
    with pytest.raises(ValueError):
        check_layers(layers)


def _loss(params, x, onehot, activation):
    """Mean softmax cross-entropy of a plain-numpy forward pass (independent of model.forward)."""
    a = x
    depth = len(params) // 2
    for l in range(1, depth):
        z = a @ params[f"w{l}"] + params[f"b{l}"]
        a = 1 / (1 + np.exp(-z)) if activation == "sigmoid" else np.maximum(z, 0)
    p = softmax(a @ params[f"w{depth}"] + params[f"b{depth}"])
    return float(-np.mean(np.log(np.sum(p * onehot, axis=1))))


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_the_step_follows_the_gradient_of_a_deep_network(core_dataset, activation):
    """One SGD step with learning rate 1 moves every weight by minus its gradient: compare with
    central differences of the loss on a sample of entries of every layer."""
    preset = replace(
        get_preset("default", dtype="float64", layers=(784, 12, 7, 10), activation=activation),
        optimizer="sgd",
        learning_rate=1.0,
        schedule="constant",
        batch_size=None,
        w1_optimizer="same",
        hidden_optimizer="same",
    )
    inputs = prepare(core_dataset, preset, limit=64)
    x, onehot, labels = inputs.images["train"], inputs.train_onehot, inputs.train_labels
    params = init_params(preset, [5, 6, 7])
    before = {k: v.copy() for k, v in params.items()}
    train_step(LocalCompute(inputs.images), params, None, onehot, labels, preset, OptimizerState(), 1.0)
    rng = np.random.default_rng(0)
    eps = 1e-6
    for name, value in before.items():
        for flat in rng.choice(value.size, size=min(6, value.size), replace=False):
            pos = np.unravel_index(flat, value.shape)
            plus = {k: v.copy() for k, v in before.items()}
            minus = {k: v.copy() for k, v in before.items()}
            plus[name][pos] += eps
            minus[name][pos] -= eps
            grad = (_loss(plus, x, onehot, activation) - _loss(minus, x, onehot, activation)) / (2 * eps)
            step = params[name][pos] - value[pos]
            assert step == pytest.approx(-grad, rel=1e-5, abs=1e-9), (name, pos)


@pytest.mark.parametrize("nodes", [1, 2, 3])
@pytest.mark.parametrize("preset_name,activation", [("default", "sigmoid"), ("default", "relu"), ("seed", "sigmoid")])
def test_a_three_layer_network_distributed_equals_centralized_after_every_step(
    core_dataset, preset_name, activation, nodes
):
    preset = replace(
        get_preset(preset_name, dtype="float64", layers=(784, 24, 16, 10), activation=activation),
        batch_size=100 if preset_name == "default" else None,
    )
    inputs = prepare(core_dataset, preset, limit=600)
    secret = 0x3A7E + nodes
    reference = Trainer(preset, inputs, LocalCompute(inputs.images), secret=secret)
    compute = DistributedCompute(
        inputs.images, nodes, np.random.default_rng(nodes), InProcessExecutor, **inputs.source(), layers=preset.layers
    )
    distributed = Trainer(preset, inputs, compute, secret=secret)
    for step in range(3):
        reference.run_step()
        distributed.run_step()
        assert list(distributed.params) == ["w1", "b1", "w2", "b2", "w3", "b3"]
        for name, want in reference.params.items():
            np.testing.assert_allclose(
                distributed.params[name], want, rtol=RTOL, atol=ATOL, err_msg=f"{name} after step {step + 1}"
            )
    # the ledger's deltas axis is the first hidden layer's width
    for shares in compute.ledger.shares().values():
        assert shares["deltas"] == 1.0
    assert compute.ledger.axes["deltas"] == 24


def test_a_deep_checkpoint_restores_exactly_and_refuses_another_network(core_dataset):
    preset = replace(
        get_preset("default", dtype="float64", layers=(784, 20, 10, 10), activation="relu"), batch_size=100
    )
    inputs = prepare(core_dataset, preset, limit=600)
    first = Trainer(preset, inputs, LocalCompute(inputs.images), secret=9)
    first.run_step(), first.run_step()
    arrays, meta = first.checkpoint()
    assert meta["layers"] == [784, 20, 10, 10] and meta["activation"] == "relu"
    assert {"w3", "b3", "opt.m_w3", "opt.v_b3"} <= set(arrays)
    second = Trainer(preset, inputs, LocalCompute(inputs.images), secret=9)
    second.restore(arrays, meta)
    first.run_step(), second.run_step()
    for name in first.params:
        np.testing.assert_array_equal(first.params[name], second.params[name])
    other = Trainer(small_default(dtype="float64"), inputs, LocalCompute(inputs.images), secret=9)
    with pytest.raises(ValueError, match="784-20-10-10 relu"):
        other.restore(arrays, meta)
    # a version written before networks had a shape is the notebook's 784-128-10
    old_arrays, old_meta = other.checkpoint()
    del old_meta["layers"], old_meta["activation"]
    other.restore(old_arrays, old_meta)


def test_train_takes_hidden_widths_and_saves_every_layer(core_data_dir, core_cache, tmp_path):
    out = tmp_path / "w.npz"
    proc = enshuffle_cli(
        "train",
        "--nodes",
        "0",
        "--hidden",
        "16,8",
        "--activation",
        "relu",
        "--epochs",
        "1",
        "--limit",
        "500",
        "--json",
        "--data",
        str(core_data_dir),
        "--save-weights",
        str(out),
        cache=core_cache,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "784-16-8-10 relu" in proc.stderr
    with np.load(out) as saved:
        assert {k: saved[k].shape for k in saved.files} == {
            "w1": (784, 16),
            "b1": (16,),
            "w2": (16, 8),
            "b2": (8,),
            "w3": (8, 10),
            "b3": (10,),
        }
    assert json.loads(proc.stdout.splitlines()[0])["type"] == "epoch"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layers", "700,10"], "must start with the 784 pixels"),
        (["--layers", "784,x,10"], "comma-separated"),
        (["--layers", "784,10", "--hidden", "5"], "not allowed with"),
    ],
)
def test_a_wrong_network_is_a_one_line_error(core_data_dir, core_cache, args, message):
    proc = enshuffle_cli("train", "--nodes", "0", *args, "--data", str(core_data_dir), cache=core_cache, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_deep_run_over_the_wire_resumes_and_exports_every_layer(core_data_dir, core_cache, tmp_path):
    """Node processes, a 3-layer network, a chain: stop after one epoch, resume to two (the
    network comes from run.json), verify the chain and export all six arrays."""
    run = tmp_path / "run"
    common = ["--data", str(core_data_dir), "--limit", "400", "--out", str(run)]

    def cli(*args):
        return enshuffle_cli(*args, home=tmp_path / "home", cache=core_cache, timeout=300)

    first = cli("train", "--nodes", "2", "--hidden", "12,6", "--epochs", "1", *common)
    assert first.returncode == 0, first.stderr
    assert json.loads((run / "run.json").read_text())["layers"] == [784, 12, 6, 10]
    second = cli("train", "--nodes", "2", "--resume", "--epochs", "2", *common)
    assert second.returncode == 0, second.stderr
    assert "784-12-6-10 relu" in second.stderr  # the default preset's activation
    assert cli("chain", "verify", str(run)).returncode == 0
    out = tmp_path / "model.npz"
    exported = cli("chain", "export", str(run), "--npz", str(out))
    assert exported.returncode == 0, exported.stderr
    with np.load(out) as saved:
        assert sorted(saved.files) == ["b1", "b2", "b3", "w1", "w2", "w3"]
        assert saved["w2"].shape == (12, 6)


class RecordingExecutor:
    """The in-process executor, keeping every batch it runs (what the nodes would receive)."""

    def __init__(self, compute):
        self.inner = InProcessExecutor(compute)
        self.batches = []

    def run(self, batches):
        self.batches.extend(batches)
        return self.inner.run(batches)

    def step_done(self):
        self.inner.step_done()


def _mantissas(x: np.ndarray) -> set:
    """Each value's mantissa and sign: what a power-of-two scale or a permutation keeps."""
    m, _ = np.frexp(np.asarray(x, dtype=np.float64).ravel())
    return set(np.round(m[m != 0], 12).tolist())


def test_every_hidden_layer_is_distributed_disguised_and_in_the_ledger_and_bound(core_dataset):
    from enshuffle.coordinator.scheduling import Scheduler

    preset = replace(small_default(dtype="float64", layers=(784, 40, 30, 20, 10)), batch_size=100)
    inputs = prepare(core_dataset, preset, limit=300)
    compute = DistributedCompute(
        inputs.images, 2, np.random.default_rng(7), RecordingExecutor, **inputs.source(), layers=preset.layers
    )
    assert sorted(compute.unit_blocks) == [2, 3]  # the last layer (label-adjacent) stays home
    trainer = Trainer(preset, inputs, compute, secret=11)
    seen = []  # every hidden layer's operands as the coordinator holds them
    forward = compute.a_w

    def a_w(a, w, layer):
        seen.extend([a.copy(), w.copy()])
        return forward(a, w, layer)

    compute.a_w = a_w
    reference = Trainer(preset, inputs, LocalCompute(inputs.images), secret=11)
    trainer.run_step()
    reference.run_step()
    for name in reference.params:
        np.testing.assert_allclose(trainer.params[name], reference.params[name], rtol=RTOL, atol=ATOL)

    hidden = [b for b in compute.executor.batches if "a" in b.arrays]
    assert {kind for b in hidden for kind, *_ in b.exposure} == {
        "activations",
        "activations2",
        "w2",
        "w3",
        "samples",
        "deltas2",
        "deltas3",
    }
    # no sent value is an activation or a weight of w2..w4, even up to a power-of-two scale
    plain = set().union(*(_mantissas(v) for v in seen))
    assert len(seen) == 6 and len(plain) > 1000
    for b in hidden:
        for name, array in b.arrays.items():
            sent = _mantissas(array)
            assert len(sent & plain) <= 0.001 * len(sent), (b.exposure, name)

    shares = compute.ledger.shares()
    for node, share in shares.items():
        for kind, width in (("w2", 40), ("activations", 40), ("w3", 30), ("activations2", 30)):
            assert share[kind] == pytest.approx(0.5, abs=1 / width), (node, kind)
        assert share["deltas2"] == share["deltas3"] == 1.0
        assert share["w4"] == share["activations3"] == 0.0 and share["deltas"] == 1.0
    # the bound covers every distributed layer: a node holding slot 0 may not take slot 1
    scheduler = Scheduler(compute.ledger, {})
    scheduler.attach(2, compute.slot_exposure)
    assert set(scheduler.bound) == {"images", "w1", "w2", "w3", "activations", "activations2"}

    class Node:
        node_id = label = "node-1"  # holds slot 0's blocks in the ledger above
        want, shards_held, queue, outstanding = 1, {0}, [], {}

    assert scheduler.eligible(Node(), 0) and not scheduler.eligible(Node(), 1)


def test_a_deep_network_over_the_wire_equals_the_centralized_run(core_data_dir, core_cache, tmp_path):
    """Two node processes, 784-32-24-10 in float64 with --seed: the hidden layer goes to the nodes
    over ENS2 and the final weights equal the centralized run's; the ledger shows its blocks."""
    from wire_util import train_wire_and_central

    args = [
        "--hidden",
        "32,24",
        "--dtype",
        "float64",
        "--epochs",
        "1",
        "--limit",
        "300",
        "--seed",
        "5",
        "--data",
        str(core_data_dir),
        "--json",
        "--offload",
        "matmul",
    ]
    wire, _ = train_wire_and_central(2, args, tmp_path, core_cache)
    ledger = json.loads(wire.stdout.splitlines()[-1])
    for shares in ledger["ledger"].values():
        assert shares["w2"] == shares["activations"] == 0.5 and shares["deltas2"] == 1.0
        assert shares["w3"] == 0.0 and shares["activations2"] == 0.0
    assert set(ledger["forms"]["local-1"]) >= {"w2", "activations", "deltas2"}


def test_a_wide_networks_test_pass_goes_in_row_blocks_with_the_same_accuracy(core_dataset, monkeypatch):
    from enshuffle import model

    preset = small_default(dtype="float64", layers=(784, 64, 32, 10))
    inputs = prepare(core_dataset, preset, limit=300)
    params = init_params(preset, [1, 2, 3])
    calls = []

    class Counting(LocalCompute):
        def x_w1(self, which, idx, w1):
            calls.append(None if idx is None else len(idx))
            return super().x_w1(which, idx, w1)

    whole = model.evaluate(Counting(inputs.images), "test", params, inputs.test_labels, preset)
    assert calls == [None]  # 64 units: one block
    calls.clear()
    monkeypatch.setattr(model, "EVAL_BYTES", 8 * 64 * 100)  # blocks of 100 rows
    blocked = model.evaluate(Counting(inputs.images), "test", params, inputs.test_labels, preset)
    n = inputs.test_labels.shape[0]
    assert calls == [100] * (n // 100) + ([n % 100] if n % 100 else []) and blocked == whole


def _between_class_share(x: np.ndarray, labels: np.ndarray) -> float:
    """The share of x's variance that the class means explain (1: rows are their class's mean)."""
    centered = x - x.mean(axis=0)
    means = np.stack([centered[labels == c].mean(axis=0) for c in np.unique(labels)])
    counts = np.array([(labels == c).sum() for c in np.unique(labels)])
    return float((counts[:, None] * means**2).sum() / (centered**2).sum())


def test_a_hidden_layers_deltas_reach_the_nodes_with_their_class_structure_moved(core_dataset):
    """As dz1 for dw1: each class's mean and principal directions of dz2 go onto random rows
    (`decoy`); the weights still equal the centralized run's."""
    preset = replace(small_default(dtype="float64", layers=(784, 48, 32, 10)), batch_size=128)
    inputs = prepare(core_dataset, preset, limit=600)
    compute = DistributedCompute(
        inputs.images, 2, np.random.default_rng(3), InProcessExecutor, **inputs.source(), layers=preset.layers
    )
    seen = []
    decoy = compute.decoy

    def recording(dz, labels):
        sent, delta, directions = decoy(dz, labels)
        seen.append((dz.copy(), sent.copy(), np.asarray(labels).copy()))
        return sent, delta, directions

    compute.decoy = recording
    reference = Trainer(preset, inputs, LocalCompute(inputs.images), secret=8)
    distributed = Trainer(preset, inputs, compute, secret=8)
    for _ in range(4):
        reference.run_step()
        distributed.run_step()
    for name, want in reference.params.items():
        np.testing.assert_allclose(distributed.params[name], want, rtol=RTOL, atol=ATOL, err_msg=name)
    hidden = [(dz, sent, labels) for dz, sent, labels in seen if dz.shape[1] == 32]  # dz2 of layer 2
    assert len(hidden) == 4 and len(seen) == 8  # and dz1 of every step
    for dz, sent, labels in hidden:
        # measured: about 0.07 sent against 0.999 for the true dz2
        assert _between_class_share(sent, labels) < 0.5 * _between_class_share(dz, labels), (
            _between_class_share(sent, labels),
            _between_class_share(dz, labels),
        )


@pytest.mark.parametrize("rows", [1, 127, 128, 129, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_centralized_momentum_step_in_blocks_of_rows_is_the_whole_matrix_step(rows, dtype):
    # model.momentum_step works through the weights in blocks of rows (one pass over
    # w and buf); each entry gets buf = 0.9 buf + g, w += (lr buf) rounded to w's dtype, whatever
    # the block edges, from a given g exactly, and from lhs^T dz computed in the operands' dtype.
    from enshuffle.model import OptimizerState, momentum_step
    from enshuffle.momentum import block_rows

    cols = 2048
    assert block_rows(cols) == 128  # the sizes above straddle its block edges
    rng = np.random.default_rng(rows)
    w0 = rng.standard_normal((rows, cols)).astype(dtype)
    buf0 = rng.standard_normal((rows, cols))
    g = rng.standard_normal((rows, cols))
    lhs = rng.standard_normal((5, rows)).astype(dtype)
    dz = rng.standard_normal((5, cols)).astype(dtype)
    for given in (True, False):
        params, opt = {"w2": w0.copy()}, OptimizerState(moments={"buf_w2": buf0.copy()})
        if given:
            momentum_step(params, opt, 0.05, "w2", g=g)
            grad = g
        else:
            momentum_step(params, opt, 0.05, "w2", lhs=lhs, dz=dz)
            grad = (lhs.T @ dz).astype(np.float64)
        buf = 0.9 * buf0 + grad
        want = w0 + (0.05 * buf).astype(dtype)
        assert params["w2"].dtype == dtype
        tight = 0 if given else 8 * np.finfo(dtype).eps
        assert np.allclose(opt.moments["buf_w2"], buf, rtol=tight, atol=tight)
        assert np.allclose(params["w2"], want, rtol=tight, atol=tight)
    fresh = {"w1": w0.copy()}, OptimizerState()
    momentum_step(fresh[0], fresh[1], 0.05, "w1", g=g)  # a first step starts from buf = 0
    assert np.array_equal(fresh[1].moments["buf_w1"], g)
    assert np.array_equal(fresh[0]["w1"], w0 + (0.05 * g).astype(dtype))
