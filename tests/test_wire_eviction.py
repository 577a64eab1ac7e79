"""protocol.md section 15: a node that keeps sending malformed messages sealed under its own
session key (so only it could have sent them) is logged rate-limited, then told BYE
protocol-error, evicted and refused for the rest of the run, while training goes on with the
honest node. What does not authenticate is dropped and never counts (tests/test_wire_relay.py)."""

from __future__ import annotations

from wire_util import (
    InProcessRun,
    ScriptedNode,
    assert_same_weights,
    default_preset,
    load_inputs,
    reference_weights,
    spawn_node,
    wait_until,
)

import pytest

from enshuffle.coordinator.server import MAX_PROTOCOL_ERRORS, WARN_BURST


def test_a_flooding_node_is_evicted_and_refused(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start(hold_at=2)
    honest = spawn_node(tmp_path / "honest", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
    attacker = ScriptedNode(run.endpoint, "flooder")
    try:
        run.wait_held()
        attacker.hello()
        for i in range(MAX_PROTOCOL_ERRORS + 10):
            attacker.send(attacker.channel.seal_parts([b"\x09HEARTBEAT\x00\x00\x00\x09{not json"]))
        bye = attacker._expect("BYE", 10)
        assert bye.header["reason"] == "protocol-error"
        wait_until(lambda: run.logged("evicted after"), 10, "the eviction to be logged", on_timeout=run.describe)
        # Rate-limited: a burst per window, then one line saying how many were held back (later).
        flood_lines = run.logged("dropped a message from flooder")
        assert WARN_BURST <= len(flood_lines) <= WARN_BURST + 1, flood_lines
        # The same key is refused if it comes back (a full, valid ENS2 handshake).
        again = ScriptedNode(run.endpoint, "flooder", identity=attacker.identity)
        try:
            with pytest.raises(AssertionError, match="refused: not-allowed"):
                again.hello()
        finally:
            again.close()
        weights = run.finish(120)
    finally:
        run.close()
        attacker.close()
        honest.stop()
    assert run.server.counters["dropped"] >= MAX_PROTOCOL_ERRORS
    assert_same_weights(weights, expected)


class NoRoomNode(ScriptedNode):
    """A node that cannot store static operands: it answers every STATIC with REJECT too-large."""

    def _handle(self, msg):
        if msg.command == "STATIC":
            self.reject(msg, "too-large", "no room for this static operand")
            return
        if msg.command == "BATCH":  # it has none of the statics a batch names
            self.reject(msg, "unknown-static", "none held")
            return
        super()._handle(msg)


def test_a_node_that_cannot_store_statics_is_evicted_not_retried(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    small = NoRoomNode(run.endpoint, "small")
    honest = None
    try:
        small.hello()
        small.serve_until(lambda: small.bye, 20, "BYE for the node without room", on_timeout=run.describe)
        assert small.bye.header["reason"] == "evicted"
        assert run.logged("cannot store its static operands"), run.describe()
        honest = spawn_node(tmp_path / "honest", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
        weights = run.finish(120)
    finally:
        run.close()
        small.close()
        if honest is not None:
            honest.stop()
    assert_same_weights(weights, expected)
