"""A running coordinator under hostile input: every bad message is dropped, counted and logged,
no process crashes, and training still ends with the centralized model.

The coordinator (`CoordinatorServer`, real ROUTER on 127.0.0.1) is driven in a thread of this
process so its counters and node rows can be read; two real `enshuffle node` processes and one
in-test `ScriptedNode` (its own key, its own DEALER) do the work. The scripted node computes
honestly and, between its honest answers, sends the hostile messages. The node side (a BATCH
signed by another coordinator, garbage to a node) is covered by tests/test_node_daemon.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from core_data import core_cache, core_data_dir  # noqa: F401  (fixtures)
from enshuffle.model import get_preset
from enshuffle.protocol.keys import Identity, load_or_create_identity
from enshuffle.protocol.messages import Limits, decode, encode
from wire_util import (InProcessRun, ScriptedNode, assert_same_weights, load_inputs, reference_weights,
                       spawn_node, wait_until)

# Far above any honest message of this run (the largest RESULT is 1000 x ~261 float64, ~2 MB),
# low enough that the test's oversize message stays small.
LIMITS = Limits(max_message_bytes=4 << 20)
EPOCHS = 4  # seed preset: full batch, one step an epoch
LIMIT = 1000


@pytest.fixture
def cluster(core_data_dir, tmp_path):
    """An in-process coordinator (3 shards), two node processes and the scripted node."""
    preset = get_preset("seed", epochs=EPOCHS, dtype="float64")
    inputs = load_inputs(core_data_dir, preset, LIMIT)
    run = InProcessRun(preset, inputs, shards=3, min_nodes=3, limits=LIMITS).start(hold_at=1)
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
    assert len(scripted.results) >= 5, "the scripted node got no share of the work"

    def expect_dropped(frames: list, counter: str, log_fragment: str) -> None:
        before, lines = counters[counter], len(run.log_lines())
        scripted.send(frames)
        scripted.serve_until(lambda: counters[counter] > before, 10, f"{counter} to count {log_fragment!r}",
                             on_timeout=describe)
        new = run.log_lines()[lines:]
        assert any(log_fragment in line for line in new), (log_fragment, new)

    last = scripted.results[-1]  # frames of an honest RESULT the coordinator already used
    ok_header = decode(last).header
    c_array = decode(last).arrays["c"]
    valid = {"run_id": run.server.run_id, "batch_id": ok_header["batch_id"], "seq": ok_header["seq"],
             "compute_seconds": 0.0}
    bad_array = list(encode("RESULT", valid, {"c": c_array}, signer=scripted.identity))
    bad_array[3] = bytes(bad_array[3])[: len(bad_array[3]) // 2]  # the header says more bytes than the frame has
    # Five 1 MiB arrays: 5 MiB in all, over the limit, though each frame alone is under it (so
    # the message reaches decode() rather than libzmq's per-frame MAXMSGSIZE cut-off).
    oversize = encode("RESULT", valid, {n: np.zeros(1 << 20, np.uint8) for n in "abcde"}, signer=scripted.identity)
    other_node = load_or_create_identity("node", tmp_path / "node-1")  # a real node's key, not the scripted node's

    label = "scripted"
    expect_dropped([b"ENS1", b"RESULT"], "dropped", f"from {label}: bad-frame-count")
    expect_dropped([b"ENS1", b"STEAL", b"{}", bytes(64)], "dropped", f"from {label}: unknown-command")
    expect_dropped([b"ENS1", b"RESULT", b"{not json", bytes(64)], "dropped", f"from {label}: bad-header")
    expect_dropped(bad_array, "dropped", f"from {label}: bad-array")
    expect_dropped(oversize, "dropped", f"from {label}: too-large")
    expect_dropped(encode("RESULT", {**valid, "batch_id": "no-such-batch", "seq": 10 ** 9}, {"c": c_array},
                          signer=scripted.identity), "dropped", "for unknown batch no-such-batch")
    expect_dropped(last, "dropped", f"for unknown batch {ok_header['batch_id']}")  # a duplicate RESULT
    expect_dropped(encode("RESULT", valid, {"c": c_array}, signer=other_node), "bad_signature",
                   f"refused RESULT from {label}")
    # A peer that never said HELLO: dropped and counted too.
    stranger = scripted.ctx.socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(run.endpoint)
    before = counters["dropped"]
    stranger.send_multipart([b"ENS1", b"RESULT"])
    scripted.serve_until(lambda: counters["dropped"] > before, 10, "the stranger's garbage to be counted")
    assert any("unknown peer: bad-frame-count" in line for line in run.log_lines())
    stranger.close(0)

    snap = run.state.snapshot()
    assert snap.nodes[label].state != "lost", describe()  # still a member after all that
    assert snap.nodes[label].refused >= 1
    assert all(p.alive() for p in procs), describe()

    # A RESULT for a batch it holds, signed by another node's key: refused and re-issued at once
    # (not after the lease), so training goes on without the scripted node's answer.
    scripted.hold_next(2)  # this one, and the next for the lease test below
    run.hold_at(3)
    scripted.serve_until(lambda: scripted.held, 30, "a batch to hold", on_timeout=describe)
    forged_for = scripted.held[0]
    bad_sig, reissued = counters["bad_signature"], counters["reissued"]
    forged_id = forged_for.header["batch_id"]
    scripted.send(scripted.result_frames(forged_for, signer=other_node))
    # Only the signature path logs this line; had the lease run out first, it would say "lease expired".
    scripted.serve_until(lambda: run.logged(f"refused RESULT for batch {forged_id} from {label}: its signature"),
                         10, "the forged result's batch to be re-issued", on_timeout=describe)
    assert counters["bad_signature"] == bad_sig + 1 and counters["reissued"] > reissued
    assert not run.logged(f"lease expired: batch {forged_id} "), describe()
    # The genuine answer, now too late: the batch is no longer this node's.
    expect_dropped(scripted.result_frames(forged_for), "dropped", f"for unknown batch {forged_for.header['batch_id']}")

    # A batch held past its lease is re-issued; its late RESULT is dropped as expired.
    scripted.serve_until(lambda: len(scripted.held) == 2, 30, "a second batch to hold", on_timeout=describe)
    late = scripted.held[1]
    lease_s = late.header["lease_ms"] / 1000
    scripted.serve_until(lambda: run.logged(f"lease expired: batch {late.header['batch_id']} on {label}"),
                         lease_s + 10, "the held batch's lease to expire", on_timeout=describe)
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

    scripted.send(scripted.result_frames(wrong_for, tamper=off_by_one))
    scripted.serve_until(lambda: run.logged(f"refused RESULT for batch {wrong_for.header['batch_id']} from {label}"),
                         10, "the wrong result to be refused", on_timeout=describe)
    assert counters["wrong"] == wrong + 1

    scripted.serve_until(run.done.is_set, 60, "training to finish", on_timeout=describe)
    assert_same_weights(run.finish(), expected)
    for proc in procs:
        assert proc.wait(15) == 0, proc.describe()  # BYE run-finished: a clean exit, never a crash
        assert "Traceback" not in proc.err()
