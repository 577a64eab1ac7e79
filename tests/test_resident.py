"""The resident disguise: weights on the nodes, in their own secret basis.

- in process, a resident run equals the centralized reference of the same reparameterized
  network (LocalCompute with the run's basis) after every step (float64, 1, 2 and 3 slots),
  whether or not the state is fetched every step;
- the probe checks pass every honest result and catch small lies, in float32;
- a node that takes a slot over from its checkpoint replays the logged updates to the same state;
- over the wire, `enshuffle train --nodes 2 --out R` equals `enshuffle train --nodes 0 --reference R`.
"""

from __future__ import annotations

import numpy as np
import pytest

from enshuffle import model
from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.disguise.resident import ResidentBasis
from enshuffle.coordinator.training import Trainer
from enshuffle.batch import BatchError
from enshuffle.kernels import ResidentState, compute_batch
from wire_util import TEST_SECRET, enshuffle_cli, load_inputs, load_npz
from presets import SMALL_NET, small_default

LIMIT = 1500


def resident_pair(data_dir, slots: int, dtype: str, executor=InProcessExecutor, epochs: int = 1, layers=None):
    """(a resident run, its centralized reference, the run's compute), in process."""
    if layers is None:
        preset = small_default(epochs=epochs, dtype=dtype)
    else:
        preset = model.get_preset("default", epochs=epochs, dtype=dtype, layers=layers, activation="relu")
    inputs = load_inputs(data_dir, preset, LIMIT)
    compute = DistributedCompute(
        inputs.images,
        slots,
        np.random.default_rng(5),
        executor,
        disguise="resident",
        offload="matmul",
        layers=preset.layers,
    )
    assert compute.resident is not None
    reference = model.LocalCompute(inputs.images, basis=compute.basis)
    return (
        Trainer(preset, inputs, compute, secret=TEST_SECRET),
        Trainer(preset, inputs, reference, secret=TEST_SECRET),
        compute,
    )


def max_rel(a: dict, b: dict) -> float:
    return max(float(np.abs(np.asarray(a[n], np.float64) - b[n]).max() / (np.abs(b[n]).max() + 1e-300)) for n in b)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_a_resident_run_equals_its_reference_after_every_step(core_data_dir, slots):
    dist, ref, compute = resident_pair(core_data_dir, slots, "float64")
    for _ in range(12):
        dist.run_step()
        ref.run_step()
        dist.sync()  # fetches every slot's state: a checkpoint each step
        assert max_rel(dist.params, ref.params) < 1e-9
    assert compute.resident.fetches == 12 * slots


def test_checkpoints_every_so_many_steps_keep_the_run_exact(core_data_dir):
    dist, ref, compute = resident_pair(core_data_dir, 2, "float64")
    report = dist.run_epoch()  # 12 steps: fetched only at the epoch's end (its test pass)
    ref_report = ref.run_epoch()
    assert max_rel(dist.params, ref.params) < 1e-9
    assert report.test_accuracy == ref_report.test_accuracy
    assert compute.resident.fetches == 2


class CheckingExecutor(InProcessExecutor):
    """Checks every result as the server does, and tries lies of several sizes on the same one."""

    def __init__(self, compute):
        super().__init__(compute)
        self.failed: list[str] = []
        self.caught: dict[str, int] = {}
        self.forwards = 0

    def run(self, batches):
        results = super().run(batches)
        for batch, r in zip(batches, results):
            why = self._compute.check_resident(batch, r)
            if why:
                self.failed.append(why)
            if batch.params.get("fetch"):
                lie = r.copy()
                lie[0, 0] += 1e-6 * np.sqrt(np.mean(r * r))
                caught = self._compute.check_resident(batch, lie) is not None
                self.caught["state"] = self.caught.get("state", 0) + caught
                continue
            self.forwards += 1
            rms = np.sqrt(np.mean(r.astype(np.float64) ** 2))
            for size in (1e-4, 1e-5):
                lie = r.copy()
                lie[3, 5] += np.float32(size * rms)
                key = f"single {size:g}"
                self.caught[key] = self.caught.get(key, 0) + (self._compute.check_resident(batch, lie) is not None)
            lie = (r.astype(np.float64) * (1 + 1e-6 * np.sign(r))).astype(r.dtype)
            self.caught["bias"] = self.caught.get("bias", 0) + (self._compute.check_resident(batch, lie) is not None)
        return results


def test_probe_checks_pass_honest_results_and_catch_small_lies_in_float32(core_data_dir):
    dist, _, compute = resident_pair(core_data_dir, 2, "float32", executor=CheckingExecutor, epochs=2)
    while not dist.finished:
        dist.run_step()
    ex = compute.executor
    assert ex.failed == []
    assert ex.forwards == 2 * 2 * dist.steps_per_epoch
    # every single-entry lie of 1e-4 of the result's RMS (nearly every one of 1e-5), and a 1e-6
    # relative bias of every entry
    assert ex.caught["single 0.0001"] == ex.forwards
    assert ex.caught["single 1e-05"] >= 0.9 * ex.forwards
    assert ex.caught["bias"] == ex.forwards
    assert ex.caught["state"] == compute.resident.fetches > 0


def test_a_node_taking_a_slot_over_replays_the_updates_since_the_checkpoint(core_data_dir):
    dist, _, compute = resident_pair(core_data_dir, 2, "float32")
    for _ in range(5):
        dist.run_step()
    res = compute.resident
    shard = 1
    st = res.slots[shard]
    # a newcomer holds the slot's static and its checkpoint (version 0 here: nothing fetched yet)
    state, version = res.state_static(shard)
    assert version == 0 and st.version == 5
    statics = {f"train.{shard}": st.static}
    states = {res.state_name(shard): ResidentState(state, version)}
    rows = np.arange(7)
    params, arrays = res.batch(shard, rows, version, st.version, fetch=False)
    y_new = compute_batch("resident", params, arrays, statics, None, states)
    # the node that served the slot all along, brought to the same version
    held = compute.executor.states[shard][res.state_name(shard)]
    params, arrays = res.batch(shard, rows, held.version, st.version, fetch=False)
    y_old = compute_batch(
        "resident", params, arrays, compute.executor.statics[shard], None, compute.executor.states[shard]
    )
    np.testing.assert_array_equal(y_new, y_old)
    assert res.check_forward(shard, rows, y_new) is None
    # a batch that starts past what a node holds is refused, not guessed at
    behind = {res.state_name(shard): ResidentState(state, 0)}
    params, arrays = res.batch(shard, rows, 3, st.version, fetch=False)
    with pytest.raises(BatchError) as err:
        compute_batch("resident", params, arrays, statics, None, behind)
    assert err.value.code == "state-behind"
    # applying a batch twice does not apply its updates twice (versions are idempotent)
    again = compute_batch(
        "resident", params, arrays, compute.executor.statics[shard], None, compute.executor.states[shard]
    )
    np.testing.assert_array_equal(again, y_old)


def test_initial_weights_in_each_nodes_basis_are_white():
    """V_0 is drawn i.i.d. in the node's basis: its covariance carries nothing of M_s (a V_0 of
    M_s^-1 times i.i.d. pixel weights would show (M_s^T M_s)^-1)."""
    rng = np.random.default_rng(3)
    basis = ResidentBasis(np.arange(784), 2, 4096, rng)
    v = basis.v0[0][:32] * np.sqrt(784)
    cov = v @ v.T / v.shape[1]
    m = basis.mix[0].blocks[0]
    leak = np.linalg.inv(m.T @ m)
    leak /= np.trace(leak) / 32
    off = ~np.eye(32, dtype=bool)
    assert np.abs(cov[off]).max() < 0.1  # white up to sampling error (4096 columns)
    assert np.abs(leak[off]).max() > 0.1  # what a non-white V_0 would have shown


@pytest.mark.slow
@pytest.mark.parametrize(
    "network, shipped",
    [
        (list(SMALL_NET), "resident"),  # 784-128-10: the first layer
        (["--hidden", "48,40", "--activation", "relu"], "resident2"),  # the plan ships the hidden layer resident
    ],
)
def test_a_resident_run_over_the_wire_equals_its_central_reference(
    core_data_dir, core_cache, tmp_path, network, shipped
):
    args = [
        "--data",
        str(core_data_dir),
        "--limit",
        str(LIMIT),
        "--epochs",
        "2",
        "--dtype",
        "float64",
        "--offload",
        "matmul",
        *network,
    ]
    wire = enshuffle_cli(
        "train",
        "--nodes",
        "2",
        *args,
        "--out",
        str(tmp_path / "run"),
        "--save-weights",
        str(tmp_path / "a.npz"),
        home=tmp_path / "home",
        cache=core_cache,
    )
    assert wire.returncode == 0, wire.stderr
    assert shipped in wire.stdout + wire.stderr
    central = enshuffle_cli(
        "train",
        "--nodes",
        "0",
        *args,
        "--reference",
        str(tmp_path / "run"),
        "--save-weights",
        str(tmp_path / "b.npz"),
        home=tmp_path / "home",
        cache=core_cache,
    )
    assert central.returncode == 0, central.stderr
    a, b = load_npz(tmp_path / "a.npz"), load_npz(tmp_path / "b.npz")
    assert sorted(a) == sorted(b)
    assert max_rel(a, b) < 1e-9


def test_the_coordinator_replays_a_slot_when_no_node_can_be_asked(core_data_dir):
    """A model version written while every node is gone (a stop) comes from the checkpoint and
    the logged updates, replayed here: the same state a node would have returned."""
    dist, _, compute = resident_pair(core_data_dir, 2, "float64")
    for _ in range(5):
        dist.run_step()
    res = compute.resident
    for shard in range(2):
        node = compute.executor.states[shard][res.state_name(shard)]
        replayed = res.replay(shard)
        k = res.slots[shard].pixels.shape[0]
        assert node.version == 4  # the fifth update has not gone out with a forward yet
        assert res.slots[shard].version == 5
        assert np.abs(replayed[:k] - node.v).max() > 0  # it includes the pending update
        assert res.check_state(shard, replayed) is None


def test_a_resumed_run_hands_each_node_its_state_as_it_was(core_data_dir):
    """Resuming re-derives every V_s from the model version; with the noise state kept beside it
    a node that served the slot gets back exactly its own V (noise's share included). Without it
    (V minus the noise's share) the difference would show the node the noise subspace, and
    projecting that off its static block would remove the noise."""
    resume_hands_back_states(core_data_dir, lambda compute: compute.resident)


def resume_hands_back_states(data_dir, owner, layers=None) -> None:
    """Seven steps, a model version, and a run resumed from it under the same plan secret (the same
    blocks, mixings, noise and statics): every slot's state static of `owner(compute)` (a resident
    disguise) is exactly the V and momentum its node held, and the next step is the first run's."""
    if layers is None:
        preset = small_default(epochs=1, dtype="float64")
    else:
        preset = model.get_preset("default", epochs=1, dtype="float64", layers=layers, activation="relu")
    inputs = load_inputs(data_dir, preset, LIMIT)

    def compute():
        return DistributedCompute(
            inputs.images,
            2,
            np.random.default_rng(5),
            InProcessExecutor,
            disguise="resident",
            offload="matmul",
            layers=preset.layers,
        )

    first = compute()
    trainer = Trainer(preset, inputs, first, secret=TEST_SECRET)
    for _ in range(7):
        trainer.run_step()
    arrays, meta = trainer.checkpoint()  # a model version: clean weights, momentum, the noise state
    held = [first.executor.states[s][owner(first).state_name(s)] for s in range(2)]
    resumed = compute()
    again = Trainer(preset, inputs, resumed, secret=TEST_SECRET)
    again.restore(arrays, meta)
    for s in range(2):
        state, _ = owner(resumed).state_static(s)
        k = state.shape[0] // 2
        assert np.abs(state[:k] - held[s].v).max() < 1e-12 * np.abs(held[s].v).max()
        assert np.abs(state[k:] - held[s].buf).max() < 1e-12 * np.abs(held[s].buf).max()
    # and the resumed run goes on exactly as the first would have
    trainer.run_step()
    again.run_step()
    trainer.sync()
    again.sync()
    assert max_rel(again.params, trainer.params) < 1e-9


def test_results_too_large_to_check_are_refused(core_data_dir):
    dist, _, compute = resident_pair(core_data_dir, 2, "float32")
    dist.run_step()
    res = compute.resident
    rows = np.arange(8)
    params, arrays = res.batch(0, rows, res.slots[0].version - 1, res.slots[0].version, fetch=False)
    y = compute_batch("resident", params, arrays, compute.executor.statics[0], None, compute.executor.states[0])
    assert res.check_forward(0, rows, y) is None
    lie = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    lie[:, 0] = 2e19  # squares overflow float32: a bound computed there would be infinite
    assert res.check_forward(0, rows, lie) is not None


@pytest.mark.parametrize("change", ["huge lr", "nan momentum", "no update rows", "narrow static", "bool version"])
def test_a_malformed_resident_batch_is_a_batch_error(change):
    static = np.ones((10, 4), np.float32)
    state = ResidentState(np.zeros((8, 3)), 0)
    params = {
        "a_static": "train.0",
        "state": "w1.0",
        "from": 0,
        "version": 1,
        "lr": [0.1],
        "momentum": 0.9,
        "fetch": False,
    }
    arrays = {"rows": np.arange(3), "update_rows": np.zeros((1, 2), np.int64), "dz": np.zeros((2, 3), np.float32)}
    statics = {"train.0": static}
    if change == "huge lr":
        params["lr"] = [10**400]
    elif change == "nan momentum":
        params["momentum"] = float("nan")
    elif change == "no update rows":
        arrays["update_rows"], arrays["dz"] = np.zeros((1, 0), np.int64), np.zeros((0, 3), np.float32)
    elif change == "narrow static":
        statics["train.0"] = np.ones((10, 5), np.float32)
    else:
        params["version"] = True
    with pytest.raises(BatchError):
        compute_batch("resident", params, arrays, statics, None, {"w1.0": state})
    assert state.version == 0 and not state.v.any()  # nothing applied


def test_results_a_node_flushes_to_zero_pass_and_lies_beside_them_do_not():
    # A node sets flush-to-zero: a float32 result entry below float32's smallest normal comes back
    # as 0. A row of such results (the deltas of a sample the network already fits, unmixed, as
    # the resident-clear control sends them) must pass the probe check; a lie must not.
    from enshuffle.coordinator.disguise.resident import Probes, probe_check

    rng = np.random.default_rng(7)
    n, m, b = 64, 32, 6
    x = rng.standard_normal((n, m)) * 0.01  # the secret operand X; the check sees X R only
    probes = Probes(rng.standard_normal((m, 2)))
    tracked = x @ probes.r
    lhs = rng.standard_normal((b, n)).astype(np.float32)
    lhs[2] = np.sign(lhs[2]) * np.float32(2e-38)  # normal float32 inputs whose products are subnormal
    exact = lhs.astype(np.float64) @ x
    assert 0 < np.abs(exact[2]).max() < np.finfo(np.float32).tiny
    out = exact.astype(np.float32)
    out[np.abs(out) < np.finfo(np.float32).tiny] = 0  # what a node with FTZ returns
    eps = float(np.finfo(np.float32).eps) / 2
    v_bound = float(np.linalg.norm(x))
    assert probe_check(out, lhs.astype(np.float64), probes, tracked, eps, v_bound, 0.0) is None
    for row, col, by in ((0, 3, 1e-4 * float(np.sqrt(np.mean(out[0] ** 2)))), (2, 5, 1e-30)):
        lie = out.copy()
        lie[row, col] += np.float32(by)
        assert probe_check(lie, lhs.astype(np.float64), probes, tracked, eps, v_bound, 0.0) is not None
