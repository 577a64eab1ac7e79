"""An on-path relay between a real `enshuffle node` process and a coordinator on loopback
(tests/wire_relay.py): what it can do is drop, repeat and rewrite bytes, never seal or sign.
None of that may end the honest node or get its key refused: a frame that does not open under
the session key says nothing about who sent it, and a refusal of a message nobody verified is
not a verdict on the node."""

from __future__ import annotations

import threading

from wire_relay import Relay
from wire_util import (
    InProcessRun,
    assert_same_weights,
    default_preset,
    load_inputs,
    reference_weights,
    spawn_node,
    wait_until,
)

from enshuffle.coordinator.server import MAX_PROTOCOL_ERRORS

REPLAYS = MAX_PROTOCOL_ERRORS + 10


def _train_through_relay(core_data_dir, tmp_path, to_server, name: str):
    """A one-epoch run whose one node, a real `enshuffle node` called `name`, reaches the
    coordinator through a `Relay` that passes what the node sends through `to_server`. The run
    must end and the node exit 0 with it; returns the run, the node, the weights it trained and
    the centralized model's."""
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    relay = Relay(int(run.endpoint.rsplit(":", 1)[1]), to_server=to_server)
    node = spawn_node(tmp_path / "node", relay.endpoint, run.identity.fingerprint, name, tmp_path)
    try:
        wait_until(
            lambda: run.done.is_set() or not node.alive(),
            120,
            "the run to end or the node to exit",
            on_timeout=run.describe,
        )
        assert node.wait(30) == 0, node.describe() + run.describe()
        weights = run.finish()
    finally:
        relay.close()
        node.stop()
        run.close()
    return run, node, weights, expected


def test_a_relay_replaying_sealed_frames_gets_no_key_banned_and_the_run_finishes(core_data_dir, tmp_path):
    replayed = []
    lock = threading.Lock()

    def replay(msg: list[bytes]) -> list[list[bytes]]:
        # Every sealed message the node sends arrives once as sent and then ten times more
        # (each copy byte-exact, its counter spent), until REPLAYS copies went out.
        if msg[0][4:5] != b"E":
            return [msg]
        with lock:
            extra = min(10, REPLAYS - len(replayed))
            replayed.extend([msg] * extra)
        return [msg] * (1 + extra)

    run, _, weights, expected = _train_through_relay(core_data_dir, tmp_path, replay, "honest")
    assert len(replayed) == REPLAYS, len(replayed)
    counters = run.server.counters
    assert counters["dropped"] >= REPLAYS, counters  # a replayed RESULT is not even opened (oversize)
    assert not run.server.banned, "a relay's replays got the honest node's key banned"
    assert run.row("honest").refused == 0, run.describe()
    assert not run.logged("evicted"), run.describe()
    assert_same_weights(weights, expected)


def test_refusals_of_bytes_altered_on_the_way_are_not_final_for_a_pinned_node(core_data_dir, tmp_path):
    altered = []

    def tamper(msg: list[bytes]) -> list[list[bytes]]:
        frame = msg[0]
        if frame[:5] == b"ENS2U" and b'"protocol":2' in frame and "hi" not in altered:
            altered.append("hi")  # the first HI claims protocol 1: the coordinator refuses the version
            return [[frame.replace(b'"protocol":2', b'"protocol":1')]]
        if frame[:5] == b"ENS2S" and b"\x05HELLO" in frame[:12] and "hello" not in altered:
            altered.append("hello")  # the first HELLO gets one bit of its signature flipped
            return [[frame[:-1] + bytes([frame[-1] ^ 1])]]
        return [msg]

    run, node, weights, expected = _train_through_relay(core_data_dir, tmp_path, tamper, "pinned")
    assert altered == ["hi", "hello"], altered
    assert run.server.counters["refused"] == 2, run.server.counters
    assert "without naming our HELLO" in node.err(), node.err()
    assert_same_weights(weights, expected)
