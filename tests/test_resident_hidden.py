"""Resident hidden layers: a hidden-to-hidden layer's rows live on the nodes, in their own basis.

- in process, a run of 784-48-40-10 (and a deeper one) whose first and hidden layers are both
  resident equals the centralized reference of the same reparameterized network after every
  step (float64), with the states fetched every step or only at the epoch's checkpoints;
- the probe checks pass every honest forward, backward and checkpoint in float32 and catch small
  lies in each;
- a node that takes a slot over replays the logged hidden updates to the same state;
- what a node is sent of a hidden layer: no row is one sample's activations (every row mixes
  ROW_GROUP samples), and its units are mixed.
"""

from __future__ import annotations

import numpy as np
import pytest

from enshuffle import model
from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.disguise.resident_hidden import ROW_GROUP, RowMix
from enshuffle.kernels import BatchError, ResidentState, compute_batch
from test_resident import LIMIT, max_rel, resident_pair, resume_hands_back_states
from wire_util import load_inputs


def _pair(data_dir, slots: int, dtype: str, layers=(784, 48, 40, 10), executor=InProcessExecutor, epochs=1):
    return resident_pair(data_dir, slots, dtype, executor=executor, epochs=epochs, layers=layers)


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_a_run_with_resident_hidden_layers_equals_its_reference_after_every_step(core_data_dir, slots):
    dist, ref, compute = _pair(core_data_dir, slots, "float64")
    assert set(compute.hidden_resident) == {2}
    for _ in range(8):
        dist.run_step()
        ref.run_step()
        dist.sync()  # fetches every slot's states: a checkpoint each step
        assert max_rel(dist.params, ref.params) < 1e-9
    assert compute.hidden_resident[2].fetches == 8 * slots
    assert not compute._hidden_home(2, dist.batch_size)  # it really went to the nodes


def test_two_resident_hidden_layers_and_epoch_checkpoints_stay_exact(core_data_dir):
    dist, ref, compute = _pair(core_data_dir, 2, "float64", layers=(784, 40, 36, 32, 10))
    report = dist.run_epoch()  # fetched only at the epoch's end (its test pass)
    ref_report = ref.run_epoch()
    assert max_rel(dist.params, ref.params) < 1e-9
    assert report.test_accuracy == ref_report.test_accuracy
    assert {layer: hr.fetches for layer, hr in compute.hidden_resident.items()} == {2: 2, 3: 2}


class CheckingExecutor(InProcessExecutor):
    """Checks every result as the server does, and tries lies on the same ones."""

    def __init__(self, compute):
        super().__init__(compute)
        self.failed: list[str] = []
        self.tried: dict[str, int] = {}
        self.caught: dict[str, int] = {}

    def run(self, batches):
        results = super().run(batches)
        for batch, r in zip(batches, results):
            if self._compute._hidden_of(batch) is None:
                continue
            why = self._compute.check_resident(batch, r)
            if why:
                self.failed.append(why)
            kind = "fetch" if batch.params.get("fetch") else "backward" if batch.params.get("backward") else "forward"
            rms = np.sqrt(np.mean(r.astype(np.float64) ** 2))
            lies = {"single": r.copy(), "bias": (r.astype(np.float64) * (1 + 1e-5 * np.sign(r))).astype(r.dtype)}
            lies["single"][1, 2] += r.dtype.type(1e-4 * rms)
            for name, lie in lies.items():
                key = f"{kind} {name}"
                self.tried[key] = self.tried.get(key, 0) + 1
                self.caught[key] = self.caught.get(key, 0) + (self._compute.check_resident(batch, lie) is not None)
        return results


def test_hidden_probe_checks_pass_honest_results_and_catch_small_lies_in_float32(core_data_dir):
    dist, _, compute = _pair(core_data_dir, 2, "float32", executor=CheckingExecutor, epochs=2)
    while not dist.finished:
        dist.run_step()
    ex = compute.executor
    assert ex.failed == []
    assert ex.tried["forward single"] == ex.tried["backward single"] == 2 * 2 * dist.steps_per_epoch
    assert ex.tried["fetch single"] > 0
    assert ex.caught == ex.tried


def test_a_node_taking_a_hidden_slot_over_replays_the_logged_updates(core_data_dir):
    dist, _, compute = _pair(core_data_dir, 2, "float32")
    for _ in range(5):
        dist.run_step()
    hr = compute.hidden_resident[2]
    shard = 1
    state, version = hr.state_static(shard)
    assert version == 0 and hr.slots[shard].version == 5
    states = {hr.state_name(shard): ResidentState(state, version)}
    params, arrays = hr.batch(shard, version, hr.slots[shard].version, fetch=True)
    got = compute_batch("resident", params, arrays, {}, None, states)
    assert hr.check_state(shard, got) is None
    held = compute.executor.states[shard][hr.state_name(shard)]
    assert np.allclose(got, np.concatenate([held.v, held.buf]), rtol=0, atol=1e-9)
    assert np.allclose(got, hr.replay(shard), rtol=0, atol=1e-9)
    # the same fetch again is idempotent; the last step's backward again is refused (its V is
    # gone), not applied twice
    assert np.array_equal(compute_batch("resident", params, arrays, {}, None, states), got)
    params, arrays = hr.batch(shard, 4, 5, backward=True)
    with pytest.raises(BatchError) as err:
        compute_batch("resident", params, arrays, {}, None, states)
    assert err.value.code == "state-ahead"


def test_a_backward_left_to_run_after_its_reply_steps_the_state_as_the_immediate_one():
    # The node replies to a backward first and steps V while the coordinator combines: the reply
    # is the same, the state is untouched until the step runs, and then equals the immediate path's.
    rng = np.random.default_rng(3)
    start = rng.standard_normal((8, 5))  # [V; buf], V (4, 5)
    params = {"state": "w2.0", "from": 2, "version": 4, "momentum": 0.9, "lr": [0.1, 0.2], "backward": True}
    arrays = {"update_a": rng.standard_normal((6, 4)), "dz": rng.standard_normal((6, 5))}
    now, later = ResidentState(start, 2), ResidentState(start, 2)
    want = compute_batch("resident", params, arrays, {}, None, {"w2.0": now})
    after: list = []
    got = compute_batch("resident", params, arrays, {}, None, {"w2.0": later}, after)
    assert np.array_equal(got, want) and len(after) == 1
    assert later.version == 3  # the carried update before the step's own one is applied at once
    assert not np.array_equal(later.v, now.v)
    after[0]()
    assert later.version == now.version == 4
    assert np.array_equal(later.v, now.v) and np.array_equal(later.buf, now.buf)
    # a forward has nothing to leave for later
    forward = {"state": "w2.0", "from": 4, "version": 4, "momentum": 0.9, "lr": [], "backward": False}
    compute_batch("resident", forward, {"a": rng.standard_normal((3, 4))}, {}, None, {"w2.0": later}, after)
    assert len(after) == 1


def test_malformed_hidden_batches_are_batch_errors():
    state = ResidentState(np.zeros((8, 5)), 0)  # V (4, 5)
    states = {"w2.0": state}
    good = {"state": "w2.0", "from": 0, "version": 1, "momentum": 0.9, "lr": [0.1], "backward": True}
    arrays = {"update_a": np.ones((3, 4), np.float32), "dz": np.ones((3, 5), np.float32)}
    out = compute_batch("resident", good, arrays, {}, None, states)
    assert out.shape == (3, 4) and state.version == 1
    cases = [
        (
            {**good, "from": 1, "version": 2},
            {"update_a": np.ones((3, 3), np.float32), "dz": np.ones((3, 5), np.float32)},
        ),
        ({**good, "from": 1, "version": 2}, {"update_a": np.ones((3, 4), np.float32), "dz": np.ones((3, 5))}),
        ({**good, "from": 1, "version": 1}, {}),  # a backward without its own update
        ({**good, "from": 1, "version": 2, "lr": [float("inf")]}, arrays),
        ({"state": "w2.0", "from": 1, "version": 1, "momentum": 0.9, "lr": []}, {"a": np.ones((2, 3), np.float32)}),
    ]
    for params, arr in cases:
        with pytest.raises(BatchError):
            compute_batch("resident", params, arr, {}, None, states)
    assert state.version == 1  # nothing malformed moved it


def test_no_row_a_node_receives_is_one_samples_activations(core_data_dir):
    """What slot 0 is sent of layer 2 for one batch: every row is a mixture of ROW_GROUP
    activation rows, its units mixed: no sent row lies near any true row, nor its unmixing."""
    dist, _, compute = _pair(core_data_dir, 2, "float64")
    dist.run_step()
    hr = compute.hidden_resident[2]
    a = np.abs(np.random.default_rng(0).standard_normal((128, 48)))  # ReLU-like activations
    operands = hr.forward_operands(a, np.random.default_rng(1))
    st = hr.slots[0]
    truth = a[:, st.units]
    sent = operands[0]
    unmixed = sent @ np.linalg.inv(st.mix.dense())  # what knowing M_s would leave: L a[:, Q_s]
    assert np.allclose(np.abs(unmixed).sum(), np.abs(compute.hidden_resident[2]._kept[1].apply(truth)).sum())

    def best_match(seen):
        """Each sent row's largest centred correlation with any true row."""
        s_c = seen - seen.mean(axis=0)
        t_c = truth - truth.mean(axis=0)
        cos = (s_c / np.linalg.norm(s_c, axis=1, keepdims=True)) @ (t_c / np.linalg.norm(t_c, axis=1, keepdims=True)).T
        return np.abs(cos).max(axis=1)

    assert np.allclose(best_match(truth), 1.0)  # the measure sees a row that is one sample
    for seen in (sent, unmixed):
        assert np.median(best_match(seen)) < 0.7
        assert best_match(seen).max() < 0.9
    # and the row mixing is orthogonal (so the gradient the node steps with is exact)
    rowmix = RowMix(128, np.random.default_rng(2))
    x = np.random.default_rng(3).standard_normal((128, 7))
    assert np.allclose(rowmix.apply(rowmix.apply(x), transposed=True), x)
    assert rowmix.count == 128 // ROW_GROUP


def test_a_resumed_run_hands_each_hidden_slot_its_state_and_goes_on_exactly(core_data_dir):
    resume_hands_back_states(core_data_dir, lambda compute: compute.hidden_resident[2], layers=(784, 48, 40, 10))


def test_the_deltas_a_node_is_sent_keep_no_exact_zeros_of_the_off_units(core_data_dir):
    """dz is exactly zero wherever a ReLU unit is off; those zeros would give away which rows of
    D belong to one sample (and so L). Mixed over rows (L) and units (N), D has none left; the
    clear control keeps them all (so the count would see them)."""
    for clear, expect_zeros in ((False, False), (True, True)):
        preset = model.get_preset("default", epochs=1, dtype="float32", layers=(784, 48, 40, 10), activation="relu")
        inputs = load_inputs(core_data_dir, preset, LIMIT)
        compute = DistributedCompute(
            inputs.images,
            2,
            np.random.default_rng(5),
            InProcessExecutor,
            disguise="resident-clear" if clear else "resident",
            offload="matmul",
            layers=preset.layers,
        )
        hr = compute.hidden_resident[2]
        rng = np.random.default_rng(0)
        a = np.maximum(rng.standard_normal((128, 48)), 0).astype(np.float32)
        dz = (rng.standard_normal((128, 40)) * (rng.random((128, 40)) < 0.5)).astype(np.float32)
        hr.forward_operands(a, rng)
        operands, sent = hr.backward_operands(a, dz, 0.1, rng)
        zeros = np.count_nonzero(sent == 0) / sent.size
        assert np.count_nonzero(dz == 0) / dz.size > 0.4
        assert (zeros > 0.4) if expect_zeros else (zeros < 0.01)
        a_zeros = np.count_nonzero(operands[0] == 0) / operands[0].size
        assert (a_zeros > 0.4) if expect_zeros else (a_zeros < 0.01)


def test_a_fetch_from_a_node_already_at_the_version_carries_the_update_again(core_data_dir):
    """A batch carries at least one array: a hidden state's fetch for a node whose backward has
    already applied the step's update carries that update once more, which the node skips."""
    dist, _, compute = _pair(core_data_dir, 2, "float64")
    dist.run_step()
    hr = compute.hidden_resident[2]
    st = hr.slots[0]
    assert st.version > st.checkpoint_version
    params, arrays = hr.batch(0, st.version, st.version, fetch=True)
    assert arrays and params["from"] == st.version - 1
    state = compute.executor.states[0][hr.state_name(0)]
    assert state.version == st.version
    out = compute_batch("resident", params, arrays, {}, states={hr.state_name(0): state})
    assert state.version == st.version and hr.check_state(0, out) is None


@pytest.mark.parametrize("k", [1, 127, 128, 129, 300])
def test_a_state_steps_in_blocks_of_rows_as_one_whole_update(k):
    # ResidentState.apply works through V in blocks of rows (one pass over V and buf);
    # it is the recurrence buf = mu buf + A^T D, V += lr buf whatever the block edges.
    from enshuffle.momentum import block_rows

    cols = 2048
    assert block_rows(cols) == 128  # the sizes above straddle its block edges
    rng = np.random.default_rng(k)
    start = rng.standard_normal((2 * k, cols))
    a = rng.standard_normal((5, k)).astype(np.float32)
    d = rng.standard_normal((5, cols)).astype(np.float32)
    state = ResidentState(start, 0)
    state.apply(a, d, 0.05, 0.9)
    buf = 0.9 * start[k:] + a.T.astype(np.float64) @ d.astype(np.float64)
    assert np.allclose(state.buf, buf, rtol=1e-14, atol=1e-14)
    assert np.allclose(state.v, start[:k] + 0.05 * buf, rtol=1e-14, atol=1e-14)
