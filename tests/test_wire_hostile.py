"""A running coordinator under hostile input: every bad message is dropped, counted and logged,
no process crashes, and training still ends with the centralized model.

The coordinator (`CoordinatorServer`, real ROUTER on 127.0.0.1) is driven in a thread of this
process so its counters and node rows can be read; two real `enshuffle node` processes and one
in-test `ScriptedNode` (its own key, its own DEALER) do the work. The scripted node computes
honestly and, between its honest answers, sends the hostile messages. The node side (a BATCH
signed by another coordinator, garbage to a node) is covered by tests/test_node_daemon.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import zmq

from enshuffle.coordinator.server import LeasePolicy
from enshuffle.model import get_preset
from enshuffle.protocol.messages import Limits, encode
from wire_util import InProcessRun, ScriptedNode, assert_same_weights, load_inputs, reference_weights, spawn_node

# Far above any honest message of this run (the largest RESULT is 1000 x ~261 float64, ~2 MB),
# low enough that the test's oversize message stays small.
LIMITS = Limits(max_message_bytes=4 << 20)
EPOCHS = 4  # seed preset: full batch, one step an epoch
LIMIT = 1000
# The default first lease (before any result is timed) is 30 s; the held batch below waits one lease.
# Honest batches here take milliseconds, so a 1 s lease only expires the one the test holds.
LEASE = LeasePolicy(min_ms=1000, initial_ms=1000)


@pytest.fixture
def cluster(core_data_dir, tmp_path):
    """An in-process coordinator (3 shards), two node processes and the scripted node."""
    preset = get_preset("seed", epochs=EPOCHS, dtype="float64")
    inputs = load_inputs(core_data_dir, preset, LIMIT)
    run = InProcessRun(preset, inputs, shards=3, min_nodes=3, limits=LIMITS, lease=LEASE).start(hold_at=1)
    fp = run.identity.fingerprint
    procs = [spawn_node(tmp_path / f"node-{i}", run.endpoint, fp, f"proc-{i}", tmp_path) for i in (1, 2)]
    scripted = ScriptedNode(run.endpoint, "scripted")
    try:
        yield run, procs, scripted, reference_weights(preset, inputs), tmp_path
    finally:
        run.close()
        scripted.close()
        for proc in procs:
            proc.stop()


def test_hostile_messages_are_dropped_counted_logged_and_training_finishes(cluster):
    run, procs, scripted, expected, tmp_path = cluster
    counters = run.server.counters

    def describe() -> str:
        return run.describe() + "".join(p.describe() for p in procs)

    scripted.hello()
    # Step 0 runs with everyone computing honestly; the scripted node's lease is measured from it.
    scripted.serve_until(run.held, 60, "step 0 to finish", on_timeout=describe)
    assert len(scripted.results) >= 3, "the scripted node got no share of the work"  # test + train forward, dw1

    def expect_dropped(frames: list, counter: str, log_fragment: str) -> None:
        before, lines = counters[counter], len(run.log_lines())
        scripted.send(frames)
        scripted.serve_until(
            lambda: counters[counter] > before, 10, f"{counter} to count {log_fragment!r}", on_timeout=describe
        )
        new = run.log_lines()[lines:]
        assert any(log_fragment in line for line in new), (log_fragment, new)

    last = scripted.results[-1]  # frames of an honest RESULT the coordinator already used
    ok = scripted.channel  # what the scripted node last sealed is not readable again (its counter moved on)
    valid = {"run_id": run.server.run_id, "batch_id": "0.1", "seq": 1, "compute_seconds": 0.0}
    c_array = np.zeros((2, 2))
    from enshuffle.protocol.messages import Channel, inner_parts

    prefix = inner_parts("RESULT", valid, {"c": c_array})[0]
    stranger_channel = Channel(os.urandom(32), os.urandom(32))  # a key nobody in this session holds

    label = "scripted"
    # What does not authenticate under the session key is dropped but never held against the key.
    unauthenticated = f"on the connection of {label}: "
    expect_dropped([b"ENS2E", b"RESULT"], "dropped", unauthenticated + "bad-frame-count")
    expect_dropped([b"ENS1", b"RESULT", b"{}", bytes(64)], "dropped", unauthenticated + "bad-version")
    expect_dropped(ok.seal_parts([b"\x05STEAL\x00\x00\x00\x02{}"]), "dropped", f"from {label}: unknown-command")
    expect_dropped(ok.seal_parts([b"\x06RESULT\x00\x00\x00\x09{not json"]), "dropped", f"from {label}: bad-header")
    expect_dropped(ok.seal_parts([prefix, bytes(10)]), "dropped", f"from {label}: bad-array")  # 32 bytes declared
    expect_dropped(
        ok.seal("RESULT", {**valid, "batch_id": "no-such-batch", "seq": 10**9}, {"c": c_array}),
        "dropped",
        "for unknown batch no-such-batch",
    )
    # A replayed RESULT: bigger than anything the node now holds, so not even opened (its counter is spent too).
    expect_dropped(last, "oversize", "unopened: larger than anything asked of it")
    expect_dropped(
        stranger_channel.seal("RESULT", valid, {"c": c_array}), "bad_signature", unauthenticated + "bad-seal"
    )  # sealed under another key: does not authenticate
    expect_dropped(
        encode(
            "HELLO",
            {
                "protocol": 2,
                "node_key": scripted.identity.public_hex,
                "name": "x",
                "nonce": "n",
                "challenge": "0" * 64,
                "coordinator_key": "0" * 64,
                "run_id": "r",
                "kx": "0" * 64,
                "capabilities": {"ops": [], "threads": 1, "credit": 1},
            },
            signer=scripted.identity,
        ),
        "dropped",
        unauthenticated + "wrong-kind",
    )  # handshake messages have no place in a session
    # A peer that never said HELLO: dropped and counted too.
    stranger = scripted.ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(run.endpoint)
    before = counters["dropped"]
    stranger.send_multipart([b"ENS2E", b"RESULT"])
    scripted.serve_until(lambda: counters["dropped"] > before, 10, "the stranger's garbage to be counted")
    assert any("unknown peer: bad-frame-count" in line for line in run.log_lines())
    stranger.close(0)

    snap = run.state.snapshot()
    assert snap.nodes[label].state != "lost", describe()  # still a member after all that
    assert snap.nodes[label].refused >= 1
    assert all(p.alive() for p in procs), describe()

    scripted.hold_next(1)
    run.hold_at(3)

    # A batch held past its lease is re-issued; its late RESULT is dropped as expired.
    scripted.serve_until(lambda: len(scripted.held) == 1, 30, "a batch to hold", on_timeout=describe)
    late = scripted.held[0]
    lease_s = late.header["lease_ms"] / 1000
    scripted.serve_until(
        lambda: run.logged(f"lease expired: batch {late.header['batch_id']} on {label}"),
        lease_s + 10,
        "the held batch's lease to expire",
        on_timeout=describe,
    )
    expect_dropped(scripted.result_frames(late), "expired", f"late RESULT for batch {late.header['batch_id']}")

    # Wrong numbers, correctly signed: caught by the coordinator's check of the product, re-issued.
    scripted.held.clear()
    scripted.hold_next(1)
    run.hold_at(-1)
    scripted.serve_until(lambda: scripted.held, 30, "a batch to answer wrongly", on_timeout=describe)
    wrong_for = scripted.held.pop()
    wrong = counters["wrong"]

    def off_by_one(c: np.ndarray) -> None:
        c[0, 0] += 1.0

    mark = len(run.log_lines())  # a re-issued batch keeps its id: look only at what this send causes
    refused = f"refused RESULT for batch {wrong_for.header['batch_id']} from {label}"
    scripted.send(scripted.result_frames(wrong_for, tamper=off_by_one))
    scripted.serve_until(
        lambda: any(refused in line for line in run.log_lines()[mark:]),
        10,
        "the wrong result to be refused",
        on_timeout=describe,
    )
    assert counters["wrong"] == wrong + 1, run.log_lines()[mark:]

    scripted.serve_until(run.done.is_set, 60, "training to finish", on_timeout=describe)
    assert_same_weights(run.finish(), expected)
    for proc in procs:
        assert proc.wait(15) == 0, proc.describe()  # BYE run-finished: a clean exit, never a crash
        assert "Traceback" not in proc.err()
