"""`enshuffle audit` against resident hidden layers: the attacker plays slot 0's node on a real
in-process run (784-48-40-10 ReLU, layer 2 resident on 2 slots, float32 as on the wire), then is
scored against the coordinator's ground truth.

- the row unmixing from dz's exact zeros undoes a fresh row mixing L of sparse deltas: rows it
  certifies are one sample's (checked against the true L), a large share of them; with the
  deltas' units mixed too (N), it finds nothing to certify;
- the resident-clear control: every row is one sample's, the class grouping of its dz rows
  is far above chance, its units and its w block come out, so the figures mean something;
- the unit unmixing claims no column it has not certified (on resident it finds none);
- the certificate is sound: a mixture of two samples' rows is never certified;
- the node's replayed V is the coordinator's.
"""

from __future__ import annotations

import numpy as np
import pytest

from enshuffle import model
from enshuffle.audit.hidden import _unit_columns, attack_hidden, hidden_steps, single_sample, unmix_rows
from enshuffle.audit.hidden_score import score_hidden
from enshuffle.audit.recording import RecordedMessage
from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.disguise.resident_hidden import ROW_GROUP
from enshuffle.coordinator.training import Trainer
from wire_util import TEST_SECRET, load_inputs

LIMIT = 1500
LAYERS = (784, 48, 128, 10)


class RecordingExecutor(InProcessExecutor):
    """Keeps what slot 0's node accepts, as `enshuffle node --record` does."""

    def __init__(self, compute):
        self.messages: list[RecordedMessage] = []
        super().__init__(compute)

    def _load(self, shard: int) -> None:
        super()._load(shard)
        if shard == 0:
            for name, array in self._compute.static_arrays(0).items():
                header = {"name": name, **self._compute.static_fields(0, name)}
                self.messages.append(RecordedMessage(len(self.messages), "STATIC", header, {"x": np.array(array)}))

    def run(self, batches):
        for b in batches:
            if b.shard == 0:
                header = {"op": b.op, "params": dict(b.params)}
                self.messages.append(
                    RecordedMessage(len(self.messages), "BATCH", header, {k: np.array(v) for k, v in b.arrays.items()})
                )
        return super().run(batches)


def _recorded_run(data_dir, disguise: str, steps: int):
    preset = model.get_preset("default", epochs=1, dtype="float32", layers=LAYERS, activation="relu")
    inputs = load_inputs(data_dir, preset, LIMIT)
    compute = DistributedCompute(
        inputs.images,
        2,
        np.random.default_rng(5),
        RecordingExecutor,
        disguise=disguise,
        offload="matmul",
        layers=preset.layers,
    )
    compute.audit_hidden()
    trainer = Trainer(preset, inputs, compute, secret=TEST_SECRET)
    for _ in range(steps):
        trainer.run_step()
    trainer.sync()
    truth = compute.audit_hidden_truth(0)
    for state, t in truth.items():
        t["labels"] = np.asarray(inputs.train_labels)
        t["w_final"] = np.asarray(trainer.params["w2"], dtype=np.float64)
    return compute, trainer, compute.executor.messages, truth


@pytest.fixture(scope="module")
def resident(core_data_dir):
    return _recorded_run(core_data_dir, "resident", 6)


@pytest.fixture(scope="module")
def clear(core_data_dir):
    return _recorded_run(core_data_dir, "resident-clear", 6)


def test_row_unmixing_finds_no_zeros_to_use_once_the_output_units_are_mixed(resident):
    """Before the deltas' units were mixed (N), dz's exact ReLU zeros undid L row by row (the
    clear control below still shows it). With N, D has no exact zeros: nothing is certified,
    and no claimed row is one sample's."""
    compute, trainer, messages, truth = resident
    claims = attack_hidden(messages, np.random.default_rng(0), max_steps=2)
    assert set(claims) == {"w2.0"}
    figures = score_hidden(claims, truth, np.random.default_rng(1))
    assert sum(int(ok.sum()) for *_, ok in claims["w2.0"].row_unmix) == 0
    assert figures["hidden_rows_single_sample"] == 0.0
    assert figures["hidden_labels_grouping_sent_ari"] < 0.1


def test_row_unmixing_undoes_a_row_mixing_of_sparse_deltas(clear):
    """The same attack on the control's deltas, mixed here by a fresh orthogonal L per group (as
    the design did before N): every row it certifies is one sample's, nearly all of them."""
    compute, trainer, messages, truth = clear
    rng = np.random.default_rng(4)
    steps = hidden_steps(messages)["w2.0"]
    certified = single = total = 0
    for _, _, dz in steps[:2]:
        for lo in range(0, dz.shape[0] - ROW_GROUP + 1, ROW_GROUP):
            lg = np.linalg.qr(rng.standard_normal((ROW_GROUP, ROW_GROUP)))[0]
            d = (lg @ dz[lo : lo + ROW_GROUP].astype(np.float64)).astype(np.float32).astype(np.float64)
            rows, ok = unmix_rows(d, rng)
            single += int(np.count_nonzero(np.abs(rows[ok] @ lg).max(axis=1) > 0.999))
            certified += int(ok.sum())
            total += ROW_GROUP
    # (two samples whose dz rows are proportional cannot be told apart by D: a rotation of the pair)
    assert single >= 0.98 * certified and certified >= 0.5 * total


def test_the_node_replays_its_own_v_as_the_coordinator_tracks_it(resident):
    compute, trainer, messages, truth = resident
    claims = attack_hidden(messages, np.random.default_rng(0), max_steps=1)
    hr = compute.hidden_resident[2]
    v = claims["w2.0"].v_final
    assert v is not None
    w = hr.basis.to_units([v, hr.slots[1].checkpoint[0]])[hr.slots[0].units]
    assert np.allclose(w, trainer.params["w2"][hr.slots[0].units], rtol=1e-4, atol=1e-6)


def test_the_clear_control_is_broken(clear):
    compute, trainer, messages, truth = clear
    claims = attack_hidden(messages, np.random.default_rng(0), max_steps=2)
    figures = score_hidden(claims, truth, np.random.default_rng(1))
    assert figures["hidden_rows_single_sample"] >= 0.95
    assert figures["hidden_labels_grouping_ari"] > 0.2
    # no mixing of units: the columns as sent are certified, and the w block is the node's V
    assert figures["hidden_units_unmixed"] >= 0.5 and figures["hidden_unit_purity_mean"] > 0.99
    assert figures["hidden_w_block_corr"] > 0.99


def test_unit_unmixing_claims_only_what_it_certifies(resident):
    compute, trainer, messages, truth = resident
    claims = attack_hidden(messages, np.random.default_rng(0), max_steps=2)
    mix = truth["w2.0"]["mix_blocks"]
    for (lo, hi, cols), m in zip(claims["w2.0"].unit_unmix, mix):
        if cols.shape[1]:
            v = m @ cols
            assert np.all(np.abs(v).max(axis=0) / np.linalg.norm(v, axis=0) > 0.99)


def test_a_mixture_of_two_samples_is_never_certified():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((32, 200)) * (rng.random((32, 200)) < 0.3)  # sparse dz-like rows
    lg = np.linalg.qr(rng.standard_normal((32, 32)))[0]
    d = lg @ s
    z = _unit_columns(d)
    assert single_sample(lg[:, 0], z)
    mix = (lg[:, 0] + lg[:, 1]) / np.sqrt(2)
    assert not single_sample(mix, z)
    rows, ok = unmix_rows(d, rng)
    assert ok.sum() >= 16
    assert np.all(np.abs(rows[ok] @ lg).max(axis=1) > 0.999)
