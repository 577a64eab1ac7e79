"""Exposure plans, disguises and the exposure ledger.

Plans: blocks partition the contraction axis and are balanced; the node products recombine to
A @ B; every batch has its own disguise. Disguises: un-disguising is exact (permutations and
power-of-two scales lose nothing), checked bitwise. Ledger: with k in-process nodes each node
has received exactly its pixel block of the images and of w1 and its hidden block of w2, and
the batches themselves (captured on their way to the nodes) carry nothing outside those blocks.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from enshuffle.coordinator.distributed import Batch, DistributedCompute, InProcessExecutor
from enshuffle.coordinator.ledger import ExposureLedger
from enshuffle.coordinator.plan import Disguise, build_matmul_plan, new_disguise, pow2
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.model import CLASSES, INPUTS, NOTEBOOK_LAYERS
from presets import small_default

HIDDEN = NOTEBOOK_LAYERS[1]  # the presets' network

# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("K,k", [(784, 7), (784, 4), (784, 1), (128, 3), (13, 2), (10, 7), (5, 5)])
def test_plan_blocks_partition_the_contraction_axis(K, k):
    plan = build_matmul_plan(6, K, 4, k, np.random.default_rng(K * 100 + k))
    assert len(plan.blocks) == len(plan.disguises) == len(plan.k_exp) == k
    everything = np.concatenate(plan.blocks)
    np.testing.assert_array_equal(np.sort(everything), np.arange(K))  # covers K, no index twice
    sizes = np.array([len(b) for b in plan.blocks])
    assert sizes.max() - sizes.min() <= 1
    owner = plan.exposures()
    np.testing.assert_array_equal(np.bincount(owner, minlength=k), sizes)  # the notebook's bincount
    for s, block in enumerate(plan.blocks):
        assert (owner[block] == s).all()


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("scale", [True, False])
def test_combine_of_node_products_equals_product(k, scale, dtype, rtol):
    rng = np.random.default_rng(k)
    n, K, m = 40, 97, 12
    a = rng.standard_normal((n, K)).astype(dtype)
    b = rng.standard_normal((K, m)).astype(dtype)
    plan = build_matmul_plan(n, K, m, k, np.random.default_rng(100 + k), scale=scale)
    results = []
    for s, block in enumerate(plan.blocks):
        a_s, b_s = plan.operands(s, a, b)
        assert a_s.shape == (n, len(block)) and b_s.shape == (len(block), m)
        # Node s gets exactly A[:, K_s] and B[K_s, :], permuted and power-of-two scaled (bitwise).
        d = plan.disguises[s]
        k_scale = pow2(plan.k_exp[s], dtype) if scale else np.ones(len(block), dtype)
        row_scale = pow2(d.row_exp, dtype) if scale else np.ones(n, dtype)
        col_scale = pow2(d.col_exp, dtype) if scale else np.ones(m, dtype)
        np.testing.assert_array_equal(a_s, a[np.ix_(d.rows, block)] * k_scale[None, :] * row_scale[:, None])
        np.testing.assert_array_equal(b_s, b[np.ix_(block, d.cols)] / k_scale[:, None] * col_scale[None, :])
        results.append(a_s @ b_s)
    # rtol: only the order of additions differs from a @ b (K=97 terms).
    np.testing.assert_allclose(plan.combine(results), a @ b, rtol=rtol, atol=rtol)


def test_every_batch_gets_its_own_disguise():
    rng = np.random.default_rng(3)
    first = build_matmul_plan(50, 784, 20, 4, rng)
    second = build_matmul_plan(50, 784, 20, 4, rng)
    disguises = first.disguises + second.disguises
    for x, y in combinations(disguises, 2):
        assert not np.array_equal(x.rows, y.rows)
        assert not np.array_equal(x.cols, y.cols)
        assert not np.array_equal(x.row_exp, y.row_exp)
    # The contraction order inside a block and its scales are new per plan as well.
    assert not any(np.array_equal(p, q) for p, q in zip(first.blocks, second.blocks))
    assert not np.array_equal(first.k_exp[0], second.k_exp[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scale", [True, False])
def test_disguise_undo_inverts_bitwise(dtype, scale):
    """Permutation + power-of-two scaling round trip of random data is exact, bit for bit."""
    rng = np.random.default_rng(11)
    n, m = 37, 11
    block = (rng.standard_normal((n, m)) * 10.0 ** rng.integers(-3, 4, size=(n, m))).astype(dtype)
    d = new_disguise(n, m, rng, scale, scale)
    # What the node returns: R = diag(2**row_exp) P_rows C P_cols diag(2**col_exp).
    node_view = block[np.ix_(d.rows, d.cols)].copy()
    if scale:
        node_view *= pow2(d.row_exp, dtype)[:, None]
        node_view *= pow2(d.col_exp, dtype)[None, :]
        assert (d.row_exp != 0).any() and (d.col_exp != 0).any()
    assert not np.array_equal(node_view, block)  # the disguise really changed something
    before = node_view.copy()
    undone = d.undo(node_view)
    assert undone.dtype == dtype
    np.testing.assert_array_equal(undone, block)
    np.testing.assert_array_equal(node_view, before)  # undo leaves the received result alone


def test_pure_permutation_disguise_undo():
    d = Disguise(rows=np.array([2, 0, 1]), cols=np.array([1, 0]))
    node_view = np.array([[5.0, 4.0], [1.0, 0.0], [3.0, 2.0]])  # rows 2,0,1 and cols 1,0 of arange
    np.testing.assert_array_equal(d.undo(node_view), np.arange(6.0).reshape(3, 2))


# --------------------------------------------------------------------------- ledger


class CapturingExecutor(InProcessExecutor):
    """The real in-process executor, keeping every Batch it is handed (what the nodes receive)."""

    def __init__(self, compute: DistributedCompute):
        super().__init__(compute)
        self.captured: list[Batch] = []

    def run(self, batches: list[Batch]) -> list[np.ndarray]:
        self.captured.extend(batches)
        return super().run(batches)


@pytest.fixture(scope="module")
def ledger_inputs(core_dataset):
    preset = small_default(epochs=1)
    return preset, prepare(core_dataset, preset, limit=512)


def sorted_(a) -> np.ndarray:
    return np.sort(np.asarray(a))


@pytest.mark.parametrize("k", [2, 3, 7])
def test_ledger_records_exactly_each_nodes_blocks(ledger_inputs, k):
    preset, inputs = ledger_inputs
    compute = DistributedCompute(inputs.images, k, np.random.default_rng(k), CapturingExecutor, **inputs.source())
    trainer = Trainer(preset, inputs, compute, secret=k)
    for _ in range(3):
        trainer.run_step()
    ledger = compute.ledger
    names = [f"node-{s + 1}" for s in range(k)]
    assert ledger.nodes() == names

    # The fixed partition: disjoint, covering exactly the pixels that are not blank in every
    # image (blank ones never leave the coordinator), balanced.
    raw = np.concatenate([inputs.raw["train"], inputs.raw["test"]])
    active = np.flatnonzero(raw.max(axis=0) > 0)
    assert 0 < len(active) <= INPUTS
    np.testing.assert_array_equal(np.sort(np.concatenate(compute.pixel_blocks)), active)
    lengths = [len(b) for b in compute.pixel_blocks]
    assert max(lengths) - min(lengths) <= 1

    shares, forms = ledger.shares(), ledger.forms()
    for s, name in enumerate(names):
        pixels = sorted_(compute.pixel_blocks[s])
        np.testing.assert_array_equal(ledger.positions(name, "images"), pixels)
        np.testing.assert_array_equal(ledger.positions(name, "w1"), pixels)
        assert abs(shares[name]["images"] - len(active) / k / INPUTS) <= 1 / INPUTS
        assert forms[name]["images"] == forms[name]["w1"] == "values hidden"
        # Label-dependent work and the thin products stay on the coordinator.
        for kind in ("labels", "outputs", "w2", "activations"):
            assert shares[name][kind] == 0.0 and kind not in forms[name], kind
        # Every node sees each step's dz1 (shuffled, scaled): the ledger must say so, and how.
        assert shares[name]["deltas"] == 1.0 and forms[name]["deltas"] == "positions hidden"
        assert shares[name]["samples"] == 1.0

    # Nothing ever went to a slot beyond the k shards.
    assert {b.shard for b in compute.executor.captured} == set(range(k))


@pytest.mark.parametrize("k", [2, 3, 7])
def test_batches_carry_nothing_outside_the_nodes_blocks(ledger_inputs, k):
    """Checked on the Batch objects and statics themselves, not on what the ledger was told."""
    preset, inputs = ledger_inputs
    compute = DistributedCompute(inputs.images, k, np.random.default_rng(10 + k), CapturingExecutor, **inputs.source())
    trainer = Trainer(preset, inputs, compute, secret=k)
    for _ in range(2):
        trainer.run_step()
    executor = compute.executor

    # Static operands: node s holds one (rows, |P_s|) block per image set, and no column of it is
    # a pixel column (or a multiple of one): |correlation| with every pixel of its block < 0.9.
    for s, st in enumerate(compute.statics):
        pixels = compute.pixel_blocks[s]
        assert set(executor.statics[s]) == {f"{which}.{s}" for which in inputs.images}
        held = executor.statics[s][f"train.{s}"]
        x = inputs.raw["train"][st.row_order["train"]][:, pixels].astype(np.float64)
        assert held.shape == x.shape and held.dtype == inputs.images["train"].dtype
        hz = (held - held.mean(0)) / held.std(0)
        xs = x.std(0)
        xz = (x[:, xs > 0] - x[:, xs > 0].mean(0)) / xs[xs > 0]
        corr = np.abs(hz.T @ xz) / x.shape[0]
        assert corr.max() < 0.9, corr.max()

    kinds = set()
    for batch in executor.captured:
        s = batch.shard
        n_pixels = len(compute.pixel_blocks[s])
        assert batch.op == "matmul" and batch.params["a_static"].endswith(f".{s}")  # only its own static
        for name, array in batch.arrays.items():
            assert INPUTS not in array.shape, f"batch for shard {s} carries a 784-wide {name}"
            assert CLASSES not in array.shape[1:], f"batch for shard {s} carries a 10-wide {name}"
        rows, b = batch.arrays["rows"], batch.arrays["b"]
        assert rows.ndim == 1 and rows.dtype.kind in "iu" and set(batch.arrays) == {"rows", "b"}
        declared = {item[0]: sorted_(item[1]) for item in batch.exposure}
        if batch.params["transpose_a"]:  # dw1: dz1 in, rows P_s of dw1 out
            kinds.add("dw1")
            assert b.shape == (rows.shape[0], HIDDEN)
        else:  # x_w1: the 'b' operand is derived from w1's rows P_s only
            kinds.add("x_w1")
            assert b.shape == (n_pixels, HIDDEN)
            np.testing.assert_array_equal(declared["w1"], sorted_(compute.pixel_blocks[s]))
    assert kinds == {"x_w1", "dw1"}


def assert_float32_product(got: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """got == a @ b up to float32 rounding: |error| <= K * eps32 * sum|a_ik b_kj| bounds any
    summation order (K <= 784 gives 4.7e-5); power-of-two scaling adds no error."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    bound = 1e-4 * (np.abs(a64) @ np.abs(b64))
    assert (np.abs(got - a64 @ b64) <= bound).all()


def mantissas(values: np.ndarray) -> np.ndarray:
    """frexp mantissa: the same for x and x * 2**e, different for different odd integers."""
    return np.frexp(values)[0]


@pytest.mark.parametrize("k", [2, 7])
def test_weight_operands_hold_exactly_the_nodes_rows_and_no_mantissa_survives(ledger_inputs, k):
    """Mark every row of w1 with its own odd number. Under the shuffle-only control, power-of-two
    scaling keeps an odd number's mantissa, so the mantissas in a captured operand name exactly
    the rows P_s it came from (the attack works). Under the real disguise the mixing leaves no
    marked mantissa to find, and the product is still right."""
    _, inputs = ledger_inputs
    # Odd numbers up to 1567 are exact in float32, the default preset's dtype.
    w1 = np.repeat(2.0 * np.arange(INPUTS)[:, None] + 1, HIDDEN, axis=1).astype(np.float32)
    marks = mantissas(2.0 * np.arange(INPUTS) + 1)
    pixel_of = {m: r for r, m in enumerate(marks)}
    idx = np.arange(0, 500, 3)
    x = inputs.images["train"][idx]

    control = DistributedCompute(inputs.images, k, np.random.default_rng(20 + k), CapturingExecutor, disguise="shuffle")
    assert_float32_product(control.x_w1("train", idx, w1), x, w1)
    for batch in control.executor.captured:
        b = batch.arrays["b"]
        # each row of b is one pixel's row of w1 (all its entries share one mantissa) ...
        assert (mantissas(b) == mantissas(b[:, :1])).all()
        rows = sorted_([pixel_of[m] for m in mantissas(b[:, 0].astype(np.float64))])
        # ... and together they are exactly P_s
        np.testing.assert_array_equal(rows, sorted_(control.pixel_blocks[batch.shard]))

    compute = DistributedCompute(inputs.images, k, np.random.default_rng(20 + k), CapturingExecutor, **inputs.source())
    assert_float32_product(compute.x_w1("train", idx, w1), x, w1)
    for batch in compute.executor.captured:
        b = batch.arrays["b"]
        found = np.isin(mantissas(b.astype(np.float64)), marks)
        assert found.mean() < 0.01, f"{found.mean():.1%} of the operand's entries carry a row's mark"


def test_dz1_reaches_nodes_without_its_class_structure(ledger_inputs):
    """The attack: cluster the rows of each dw1 batch (k-means on unit rows) and compare with the
    rows' true labels. Sent as it is (no labels given: the control), dz1 groups a batch by class;
    with its class structure moved onto random rows, the same attack finds the decoys instead."""
    from enshuffle.audit.attacks import kmeans
    from enshuffle.audit.scoring import adjusted_rand
    from enshuffle.model import LocalCompute, sigmoid, softmax

    preset, inputs = ledger_inputs
    trained = Trainer(preset, inputs, LocalCompute(inputs.images), secret=3)
    for _ in range(3):  # a model a few steps in: its dz1 already points one way per class
        trained.run_step()
    p = trained.params
    rng = np.random.default_rng(0)

    def clustered(with_labels: bool) -> float:
        compute = DistributedCompute(inputs.images, 2, np.random.default_rng(4), CapturingExecutor, **inputs.source())
        scores = []
        for _ in range(4):
            idx = np.sort(rng.choice(inputs.images["train"].shape[0], 128, replace=False))
            a1 = sigmoid(inputs.images["train"][idx] @ p["w1"] + p["b1"])
            probs = softmax(a1 @ p["w2"] + p["b2"])
            dz2 = (inputs.train_onehot[idx] - probs) / len(idx)
            dz1 = (dz2 @ p["w2"].T) * a1 * (1 - a1)
            compute.executor.captured.clear()
            got = compute.dw1(idx, dz1, inputs.train_labels[idx] if with_labels else None)
            np.testing.assert_allclose(
                got, inputs.images["train"][idx].T @ dz1, rtol=1e-4, atol=1e-4 * float(np.abs(got).max())
            )
            batch = compute.executor.captured[0]
            st = compute.statics[batch.shard]
            truth = inputs.train_labels[st.row_order["train"][batch.arrays["rows"]]]
            rows = batch.arrays["b"].astype(np.float64)
            found = kmeans(unit(rows), 10, rng)
            # The stronger attacker strips what it found (each cluster's mean and two principal
            # directions, as the decoys are built) and clusters what is left.
            for c in np.unique(found):
                block = rows[found == c] - rows[found == c].mean(axis=0)
                top = np.linalg.svd(block, full_matrices=False)[2][:2]
                rows[found == c] = block - (block @ top.T) @ top
            scores.append((adjusted_rand(truth, found), adjusted_rand(truth, kmeans(unit(rows), 10, rng))))
        return np.mean(scores, axis=0)

    def unit(x):
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-300)

    plain, hidden = clustered(with_labels=False), clustered(with_labels=True)
    print(
        f"adjusted Rand index of the clustering (direct, after stripping found clusters): "
        f"plain dz1 {plain[0]:.3f} {plain[1]:.3f}, class structure moved {hidden[0]:.3f} {hidden[1]:.3f}"
    )
    assert plain[0] > 0.5  # the attack works on plain dz1
    assert hidden[0] < 0.1 and hidden[1] < 0.25


def test_node_shares_follow_every_record_and_load():
    """The shares a BATCH header announces are kept as records come in: always what the masks say,
    also after a load over what a node had."""
    ledger = ExposureLedger({"images": 8, "samples": 1, "deltas": 4})

    def counted(node):
        return {
            t: ledger.positions(node, t).size / ledger.axes[t]
            for t in ledger.shares()[node]
            if ledger.positions(node, t).size
        }

    ledger.record("a", [("images", np.array([0, 1, 1]), 1), ("samples", [0])])
    assert ledger.node_shares("a") == counted("a") == {"images": 0.25, "samples": 1.0}
    ledger.record("a", [("images", range(4), 3), ("deltas", np.arange(4))])
    assert ledger.node_shares("a") == counted("a") == {"images": 0.5, "samples": 1.0, "deltas": 1.0}
    shares = ledger.node_shares("a")
    shares["images"] = 0.0  # a copy: the caller's to change
    assert ledger.node_shares("a")["images"] == 0.5
    other = ExposureLedger(dict(ledger.axes))
    other.record("a", [("images", [7])])
    assert other.node_shares("a") == {"images": 0.125}
    other.load({"a": {**ledger.export()["a"]}})
    assert other.node_shares("a") == ledger.node_shares("a")
    assert other.forms() == ledger.forms()


def test_a_record_keeps_each_position_weakest_form_and_the_announced_shares():
    """Recording what a node holds already changes nothing; a weaker form of a held position, or a
    new position, changes the form and share, and the rounded shares a header announces follow."""
    ledger = ExposureLedger({"images": 3, "deltas": 4})
    ledger.record("a", [("images", np.array([0, 0, 1]), 1)])
    assert ledger.announced("a") == {"images": round(2 / 3, 6)}
    ledger.record("a", [("images", [1, 0], 1), ("images", [0], 1)])  # nothing new
    assert ledger.forms()["a"] == {"images": "values hidden"}
    ledger.record("a", [("images", [1, 1], 3), ("deltas", np.array([], dtype=np.int64))])
    assert ledger.forms()["a"] == {"images": "clear"}
    assert list(ledger.positions("a", "images")) == [0, 1]
    assert ledger.announced("a") == {"images": round(2 / 3, 6), "deltas": 0.0}
    ledger.record("a", [("images", [2], 2), ("images", [0], 3)])
    assert ledger.announced("a") == ledger.node_shares("a") == {"images": 1.0, "deltas": 0.0}
    assert ledger.export()["a"]["images"] == "v2:" + bytes([3, 3, 2]).hex()
    announced = ledger.announced("a")
    announced["images"] = 0.0  # a copy: the caller's to change
    assert ledger.announced("a")["images"] == 1.0
