"""A resident slot's checkpoint is the fetched state itself, checked as it was received.

- `state_products` of a state as a message opens it (not on 8 bytes) equal an aligned copy's,
  and a NaN or an infinity anywhere in it is found;
- with every result sealed and opened as the server opens it, a fetched state becomes the
  checkpoint without a copy, stays as fetched while later messages are opened, cannot be made
  writable, and the run stays equal to its reference; NaN, infinite and slightly wrong states
  are still refused;
- over the wire, with real node processes, each checkpoint is the RESULT's own buffer and stays
  intact through the traffic of the steps after it.
"""

from __future__ import annotations

import numpy as np
import pytest

from enshuffle.coordinator.disguise import resident, resident_hidden
from enshuffle.coordinator.disguise.resident import STATE_CHUNK, state_products
from enshuffle.coordinator.distributed import InProcessExecutor
from enshuffle.model import get_preset
from enshuffle.protocol.messages import Channel
from test_resident import max_rel, resident_pair
from wire_util import InProcessRun, load_inputs, spawn_node

LAYERS = (784, 48, 40, 10)  # the first layer and one hidden layer resident
HEADER = {"run_id": "r", "batch_id": "b", "seq": 1, "compute_seconds": 0.0}


def unaligned(a: np.ndarray) -> np.ndarray:
    """A read-only float64 copy of `a` 3 bytes into a buffer, as an opened message's array may sit."""
    raw = np.empty(a.nbytes + 3, dtype=np.uint8)
    out = np.frombuffer(memoryview(raw)[3:], dtype=np.float64).reshape(a.shape)
    np.copyto(out, a)
    out.flags.writeable = False
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("k, width, j", [(STATE_CHUNK * 2 + 37, 96, 32), (STATE_CHUNK - 5, 40, 2)])
def test_an_unaligned_states_products_are_an_aligned_copys(k, width, j):
    rng = np.random.default_rng(3)
    state = rng.standard_normal((2 * k, width))
    right, left = rng.standard_normal((width, 2)), rng.standard_normal((k, j))
    want, got = state_products(state, right, left), state_products(unaligned(state), right, left)
    assert want.finite and got.finite
    np.testing.assert_array_equal(got.right, want.right)
    np.testing.assert_array_equal(got.left, want.left)
    assert got.v_norm == want.v_norm == pytest.approx(float(np.linalg.norm(state[:k])), rel=1e-13)
    np.testing.assert_allclose(want.right, state @ right, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(want.left, np.stack([left.T @ state[:k], left.T @ state[k:]]), rtol=1e-12, atol=1e-12)
    for row in (0, k - 1, k, 2 * k - 1):
        for value in (np.nan, np.inf, -np.inf):
            bad = state.copy()
            bad[row, width // 2] = value
            assert not state_products(bad, right, left).finite
            assert not state_products(unaligned(bad), right, left).finite


class SealingExecutor(InProcessExecutor):
    """The nodes' results sealed and opened through a session's channels, as the server receives
    them, and checked as it checks them; a fetched state is also tried with a NaN, an infinity
    and a small lie. Every fetched state opened is kept (`fetched`)."""

    def __init__(self, compute):
        super().__init__(compute)
        self.node = Channel(b"n" * 32, b"c" * 32)
        self.coordinator = Channel(b"c" * 32, b"n" * 32)
        self.failed: list[str] = []
        self.refused = 0
        self.fetched: list[np.ndarray] = []

    def _received(self, result: np.ndarray) -> np.ndarray:
        return self.coordinator.open(self.node.seal("RESULT", HEADER, {"c": result})).arrays["c"]

    def run(self, batches):
        results = []
        for batch, result in zip(batches, super().run(batches)):
            if batch.params.get("fetch"):
                n, rms = result.shape[0], float(np.sqrt(np.mean(result * result)))
                bad = [result.copy() for _ in range(3)]
                bad[0][0, 1] = np.nan
                bad[1][n - 1, 1] = np.inf
                bad[2][n // 2, 1] += 1e-6 * rms  # the first row of the momentum
                self.refused += sum(self._compute.check_resident(batch, self._received(b)) is not None for b in bad)
            c = self._received(result)
            why = self._compute.check_resident(batch, c)  # last, as the server checks the one it keeps
            if why:
                self.failed.append(why)
            if batch.params.get("fetch"):
                self.fetched.append(c)
            results.append(c)
        return results


def test_a_fetched_state_is_kept_as_opened_and_stays_intact_while_the_run_stays_exact(core_data_dir, monkeypatch):
    dist, ref, compute = resident_pair(core_data_dir, 2, "float64", executor=SealingExecutor, layers=LAYERS)
    ex = compute.executor
    owners = [compute.resident, compute.hidden_resident[2]]
    passes = []  # the arrays `state_products` read
    for module in (resident, resident_hidden):

        def counted(state, right, left, products=module.state_products):
            passes.append(state)
            return products(state, right, left)

        monkeypatch.setattr(module, "state_products", counted)
    for step in range(6):
        dist.run_step()
        ref.run_step()
        if step % 2 == 0:
            passes.clear()
            dist.sync()  # fetches every slot's states: each becomes its checkpoint
            # one pass per state checked (the honest one and its three wrong copies), none again
            # when the honest one becomes the checkpoint
            assert len(passes) == 4 * 4 and all(any(p is c for p in passes) for c in ex.fetched[-4:])
            kept = [(st.checkpoint_state, st.checkpoint_state.copy()) for owner in owners for st in owner.slots]
            for st_state, _ in kept:
                assert any(np.shares_memory(st_state, c) for c in ex.fetched)  # no copy was made
                assert not st_state.flags.writeable
                with pytest.raises(ValueError):
                    st_state.flags.writeable = True
            assert max_rel(dist.params, ref.params) < 1e-9  # the trainer's weights: as of a fetch
        else:  # a step's traffic since the fetch, every message opened through the same channel
            for st_state, as_fetched in kept:
                np.testing.assert_array_equal(st_state, as_fetched)
    assert ex.failed == []
    fetches = sum(owner.fetches for owner in owners)
    assert fetches == 3 * 2 * 2 and ex.refused == 3 * fetches


def test_over_the_wire_a_checkpoint_is_the_results_own_buffer_and_stays_intact(core_data_dir, tmp_path):
    """Real node processes: the checkpoint a fetch at an epoch's end leaves is the array the server
    opened (no copy), and is still the state fetched after the next epoch's first steps."""
    preset = get_preset("default", epochs=2, dtype="float64", layers=LAYERS, activation="relu")
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2, disguise="resident")
    owners = [run.compute.resident, run.compute.hidden_resident[2]]
    fetched: list[tuple[np.ndarray, np.ndarray]] = []  # (the array accepted, its values then)
    for owner in owners:
        accept = owner.accept_state

        def recording(shard, state, version, accept=accept):
            fetched.append((state, state.copy()))
            accept(shard, state, version)

        owner.accept_state = recording
    per_epoch = run.trainer.steps_per_epoch
    run.start(hold_at=per_epoch + 3)
    nodes = [
        spawn_node(tmp_path / f"n{i}", run.endpoint, run.identity.fingerprint, f"n{i}", tmp_path) for i in range(2)
    ]
    try:
        run.wait_held(timeout=120)
        assert len(fetched) == 4  # the first epoch's test pass fetched every slot's states
        assert not run.compute._hidden_home(2, preset.batch_size)  # the hidden layer's went to the nodes
        for owner in owners:
            for st in owner.slots:
                values = next(v for s, v in fetched if np.shares_memory(s, st.checkpoint_state))  # no copy
                np.testing.assert_array_equal(st.checkpoint_state, values)
                assert not st.checkpoint_state.flags.writeable
        run.finish(timeout=120)
    finally:
        run.close()
        for node in nodes:
            node.stop()
    assert run.server.counters["wrong"] == 0
