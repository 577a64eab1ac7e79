"""Admitted nodes that misbehave inside a valid session (their own key, sealed correctly): they
may cost the run some work, never stop it. Each test plays one such node (`ScriptedNode`, a real
DEALER on 127.0.0.1 with its own key) beside real `enshuffle node` processes and ends with the
centralized model."""

from __future__ import annotations

from wire_util import (
    InProcessRun,
    ScriptedNode,
    assert_same_weights,
    default_preset,
    load_inputs,
    reference_weights,
    spawn_node,
)

from enshuffle.coordinator.reputation import REJECTS_AFTER
from enshuffle.coordinator.server import LeasePolicy


class RejectingNode(ScriptedNode):
    """Takes its statics, then answers every BATCH with REJECT (a valid code, a valid seal)."""

    def _handle(self, msg):
        if msg.command == "BATCH":
            self.reject(msg, "compute-error", "no")
            self.rejected = getattr(self, "rejected", 0) + 1
            return
        super()._handle(msg)


def test_a_node_rejecting_every_batch_is_quarantined_and_the_run_finishes(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    # Two slots and two nodes: under the exposure bound neither may take the other's block, so each
    # rejected batch can only go back to the node that rejected it (what used to abort the run).
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2).start()
    liar = RejectingNode(run.endpoint, "rejecter")
    procs = []
    try:
        liar.hello()
        procs.append(spawn_node(tmp_path / "h1", run.endpoint, run.identity.fingerprint, "honest-1", tmp_path))
        liar.serve_until(
            lambda: run.logged("quarantined node rejecter") or run.done.is_set(),
            60,
            "the rejecting node to be quarantined",
            on_timeout=run.describe,
        )
        assert run.error is None, f"the run was aborted: {run.error!r}"
        assert liar.rejected == REJECTS_AFTER, liar.rejected
        # Its block waits for a node the bound allows; a newcomer takes it and the run goes on.
        procs.append(spawn_node(tmp_path / "h2", run.endpoint, run.identity.fingerprint, "honest-2", tmp_path))
        weights = run.finish(120)
    finally:
        run.close()
        liar.close()
        for p in procs:
            p.stop()
    assert run.server.counters["rejected"] == REJECTS_AFTER
    assert run.server.counters["quarantined"] == 1
    assert_same_weights(weights, expected)


def test_a_withheld_result_cannot_freeze_the_run(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    # Two slots, two nodes: no other node may take the withholder's block (exposure bound), so its
    # re-issued batch can only go back to it, behind the copy it keeps. Credit 2: one batch held
    # leaves its window half free, which the stuck check used to wait for.
    lease = LeasePolicy(min_ms=1000, initial_ms=1000)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2, lease=lease).start(hold_at=1)
    node = ScriptedNode(run.endpoint, "withholder")  # answers all but what `hold_next` names
    honest = None
    try:
        node.hello()
        honest = spawn_node(tmp_path / "h", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
        node.serve_until(run.held, 60, "step 1", on_timeout=run.describe)
        node.hold_next(1)
        run.hold_at(-1)
        node.serve_until(
            lambda: node.bye is not None and run.logged("stuck:"),
            30,
            "the withholder's session to be ended",
            on_timeout=run.describe,
        )
        assert node.bye.header["reason"] == "stuck"
        assert len(node.held) == 1
        node.held.clear()
        node.hello()  # as the real daemon does after a BYE that is not final: a new session
        node.serve_until(run.done.is_set, 60, "training to finish", on_timeout=run.describe)
        weights = run.finish()
    finally:
        run.close()
        node.close()
        if honest is not None:
            honest.stop()
    assert run.server.counters["expired"] >= 1
    assert_same_weights(weights, expected)


def test_unsolicited_results_cost_no_decryption_and_count_where_attributable(core_data_dir, tmp_path):
    import numpy as np

    from enshuffle.coordinator.server import MAX_PROTOCOL_ERRORS

    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start(hold_at=2)
    honest = spawn_node(tmp_path / "h", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
    liar = ScriptedNode(run.endpoint, "unsolicited")
    try:
        run.wait_held()
        liar.hello()
        liar.serve_until(
            lambda: run.row("unsolicited") and run.row("unsolicited").state != "joining",
            10,
            "the liar to join",
            on_timeout=run.describe,
        )
        header = {"run_id": run.server.run_id, "batch_id": "0.1", "seq": 1, "compute_seconds": 0.0}
        big = np.zeros((512, 512))  # 2 MiB: no batch of this run was ever asked of it
        for _ in range(20):
            liar.sign_and_send("RESULT", header, {"c": big})
        liar.serve_until(
            lambda: run.server.counters["oversize"] >= 20, 20, "the big RESULTs to be dropped", on_timeout=run.describe
        )
        session = next(s for s in run.server.sessions.values() if s.label == "unsolicited")
        assert session.channel.received == 0, "a RESULT nobody asked for was decrypted"  # only its first HEARTBEAT
        assert run.row("unsolicited").refused == 0  # not opened, so not attributed
        # Small enough to open: sealed under its key, for a batch never sent to it: a strike each.
        for i in range(MAX_PROTOCOL_ERRORS):
            liar.sign_and_send("RESULT", {**header, "batch_id": f"no-such-{i}"}, {"c": np.zeros((2, 2))})
        liar.serve_until(
            lambda: [x for x in run.logged("node unsolicited (") if "left: evicted" in x],
            20,
            "the liar to be evicted",
            on_timeout=run.describe,
        )
        weights = run.finish(120)
    finally:
        run.close()
        liar.close()
        honest.stop()
    assert_same_weights(weights, expected)


def test_each_batch_disguise_secrets_come_from_a_fresh_seed(core_data_dir):
    """A node that recovered the disguise generator's PCG64 state (from what one batch showed it)
    must not be able to predict the next batch's secrets."""
    import numpy as np

    from enshuffle.coordinator.server import reseed

    gen = np.random.default_rng()
    stolen = np.random.Generator(np.random.PCG64())
    stolen.bit_generator.state = gen.bit_generator.state  # everything the attacker could learn
    assert reseed(gen)
    assert gen.bit_generator.state["state"]["inc"] % 2 == 1  # PCG64's increment is odd
    assert not np.array_equal(gen.integers(0, 2**63, 8), stolen.integers(0, 2**63, 8))
    again = np.random.Generator(np.random.PCG64())
    again.bit_generator.state = gen.bit_generator.state
    assert reseed(gen) and gen.bit_generator.state["state"] != again.bit_generator.state["state"]
    assert not reseed(np.random.Generator(np.random.MT19937()))  # a test's own generator stays as it is
    # In a run, once per batch submitted.
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 300)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    node = ScriptedNode(run.endpoint, "n")
    try:
        node.hello()
        node.serve_until(run.done.is_set, 60, "training to finish", on_timeout=run.describe)
        run.finish()
    finally:
        run.close()
        node.close()
    assert run.server.counters["reseeded"] == run.server._batch_counter > 0


def test_a_node_too_small_for_a_static_is_told_so_not_cut_off_in_a_loop(core_data_dir, tmp_path):
    """A node's libzmq drops a connection on a frame above its --max-memory (MAXMSGSIZE). It says
    that limit in HELLO, so the coordinator never sends such a frame: it evicts the node as if it
    had refused the static operand, and the run goes on with a node that can hold it."""
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 1000)  # the image block alone is 6 MB
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    small = spawn_node(
        tmp_path / "small", run.endpoint, run.identity.fingerprint, "small", tmp_path, "--max-memory", "1M"
    )
    big = None
    try:
        assert small.wait(60) == 4, small.describe() + run.describe()
        assert "evicted" in small.err(), small.err()
        assert run.logged("node small cannot store its static operands"), run.describe()
        big = spawn_node(tmp_path / "big", run.endpoint, run.identity.fingerprint, "big", tmp_path)
        weights = run.finish(120)
    finally:
        run.close()
        small.stop()
        if big is not None:
            big.stop()
    assert_same_weights(weights, expected)
