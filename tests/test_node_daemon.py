"""The node daemon against a scripted coordinator: a real ROUTER on 127.0.0.1, real keys.

Most tests run the real `python -m enshuffle node` process; a few drive `NodeDaemon` in a
thread to look at its `NodeState` and control handling. Every wait is a poll with a timeout.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from wire_util import wait_until
import pytest
import zmq

from enshuffle.blas import BlasThreadsUnavailable, get_blas_threads, set_blas_threads
from enshuffle.node.daemon import EXIT_OK, EXIT_REFUSED, EXIT_TRUST, NodeDaemon, backoff_delay
from enshuffle.node.state import NodeControl, NodeState
from enshuffle.protocol.keys import Identity, TrustStore
from enshuffle.protocol import messages
from enshuffle.protocol.handshake import check_hello, make_challenge
from enshuffle.protocol.messages import (
    HANDSHAKE_COMMANDS,
    OPS,
    PROTOCOL_VERSION,
    Channel,
    Message,
    decode,
    encode,
    verify_self_signed,
)


def verify(msg: Message, key: bytes) -> None:
    """A signed handshake message is checked against `key`; a sealed one authenticated already
    (it opened under the session's key, which only the holder of `key` could derive)."""
    if msg.kind == messages.KIND_SIGNED:
        messages.verify(msg, key)
    else:
        assert msg.kind == messages.KIND_SEALED


REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(11)
LEASE = {"min_ms": 2000, "multiple": 4, "initial_ms": 30000}


class FakeCoordinator:
    """A scripted coordinator: one ROUTER, one coordinator key, the real ENS1 codec."""

    def __init__(self, identity: Identity | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.identity = identity or Identity.generate()
        self.run_id = "run-" + secrets.token_hex(8)
        self.seq = 0
        self.peer: bytes | None = None
        self.node_id = "n1"
        self.pending = None  # the CHALLENGE state for the latest HI
        self.channel: Channel | None = None

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()

    def recv(self, timeout: float = 5.0) -> tuple[bytes, list]:
        if not self.sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise AssertionError(f"nothing from the node within {timeout} s")
        routing, *frames = self.sock.recv_multipart()
        return routing, frames

    def expect(self, command: str, timeout: float = 5.0, skip=("HEARTBEAT",)) -> Message:
        """The next message `command` from the node, skipping heartbeats; decoded."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {command} within {timeout} s")
            routing, frames = self.recv(left)
            if bytes(frames[0])[4:5] == b"E":
                msg = self.channel.open(frames)
            else:
                msg = decode(frames)
            if msg.command == "HI" and command != "HI":  # answer with a CHALLENGE, as a coordinator does
                self.peer = routing
                challenge, self.pending = make_challenge(self.identity, self.run_id, msg)
                self.send_frames(challenge)
                continue
            if msg.command in skip and msg.command != command:
                continue
            assert msg.command == command, f"expected {command}, got {msg.command} {msg.header}"
            self.peer = routing
            return msg

    def expect_any(self, commands: tuple, timeout: float = 10.0) -> Message:
        """The next message that is one of `commands` (heartbeats skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"none of {commands} within {timeout} s"
            _, frames = self.recv(left)
            msg = self.channel.open(frames)
            if msg.command in commands:
                return msg

    def derive(self, hello: Message) -> None:
        """Check `hello` and derive the session key (welcome() does it if not done before)."""
        _, self.channel = check_hello(self.pending, hello, self.identity, self.run_id)
        self._derived_for = hello

    def welcome(self, hello: Message, *, heartbeat_ms: int = 1000, credit: int = 2) -> None:
        if getattr(self, "_derived_for", None) is not hello:
            self.derive(hello)
        self.send(
            "WELCOME",
            {
                "run_id": self.run_id,
                "coordinator_key": self.identity.public_hex,
                "node_key": hello.header["node_key"],
                "nonce": hello.header["nonce"],
                "challenge": self.pending.challenge,
                "node_id": self.node_id,
                "credit": credit,
                "heartbeat_ms": heartbeat_ms,
                "lease": LEASE,
            },
        )

    def send(self, command: str, header: dict, arrays: dict | None = None, signer: Identity | None = None) -> None:
        """Handshake commands signed (by `signer`, default this coordinator); session commands
        sealed under the session key, or with `signer` given, under a key the node does not hold."""
        if command in HANDSHAKE_COMMANDS:
            self.send_frames(encode(command, header, arrays, signer=signer or self.identity))
        elif signer is not None:
            self.send_frames(Channel(os.urandom(32), os.urandom(32)).seal(command, header, arrays))
        else:
            self.send_frames(self.channel.seal(command, header, arrays))

    def send_frames(self, frames: list) -> None:
        self.sock.send_multipart([self.peer, *frames], copy=False)

    def beat(self, outstanding: int = 0) -> None:
        """A coordinator HEARTBEAT: the sign of life a node needs every heartbeat_ms."""
        self.send("HEARTBEAT", {"node_id": self.node_id, "credit": 2, "outstanding": outstanding})

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def static(self, name: str, array: np.ndarray, **extra) -> int:
        seq = self.next_seq()
        self.send("STATIC", {"run_id": self.run_id, "name": name, "seq": seq, **extra}, {"x": array})
        return seq

    def batch(
        self,
        batch_id: str,
        op: str,
        arrays: dict,
        params: dict | None = None,
        *,
        seq: int | None = None,
        run_id: str | None = None,
        signer: Identity | None = None,
        **extra,
    ) -> int:
        seq = self.next_seq() if seq is None else seq
        self.send(
            "BATCH",
            {
                "run_id": run_id or self.run_id,
                "batch_id": batch_id,
                "seq": seq,
                "step": 0,
                "op": op,
                "params": params or {},
                "lease_ms": 30000,
                **extra,
            },
            arrays,
            signer=signer,
        )
        return seq


@pytest.fixture
def coord():
    c = FakeCoordinator()
    yield c
    c.close()


def spawn_node(home: Path, address: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, ENSHUFFLE_HOME=str(home), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "enshuffle", "node", "--connect", address, "--name", "t", "--threads", "1", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def node_proc(tmp_path):
    procs = []

    def start(address: str, *extra: str) -> subprocess.Popen:
        proc = spawn_node(tmp_path / "home", address, *extra)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=5)


@pytest.fixture
def session(coord, node_proc):
    """A node process that has said HELLO and been welcomed: (coordinator, process, node key)."""
    proc = node_proc(coord.address, "--coordinator-key", coord.identity.fingerprint)
    hello = coord.expect("HELLO")
    node_key = verify_self_signed(hello)
    coord.welcome(hello)
    return coord, proc, node_key


def expect_result(coord: FakeCoordinator, node_key: bytes, batch_id: str, seq: int) -> np.ndarray:
    msg = coord.expect("RESULT")
    verify(msg, node_key)
    assert (msg.header["run_id"], msg.header["batch_id"], msg.header["seq"]) == (coord.run_id, batch_id, seq)
    assert msg.header["compute_seconds"] >= 0
    return msg.arrays["c"]


def expect_reject(coord: FakeCoordinator, node_key: bytes, code: str) -> dict:
    msg = coord.expect("REJECT")
    verify(msg, node_key)
    assert msg.header["code"] == code, msg.header
    return msg.header


def good_batch(coord: FakeCoordinator, node_key: bytes, batch_id: str = "ok") -> None:
    """A plain matmul the node must answer correctly: proof it is still up and in sync."""
    a, b = RNG.standard_normal((3, 4)), RNG.standard_normal((4, 2))
    seq = coord.batch(batch_id, "matmul", {"a": a, "b": b}, {"transpose_a": False, "a_static": None})
    np.testing.assert_allclose(expect_result(coord, node_key, batch_id, seq), a @ b, rtol=1e-12)


# --- the real process ------------------------------------------------------------------------


def test_hello_is_signed_and_offers_capabilities(coord, node_proc):
    proc = node_proc(coord.address)
    hello = coord.expect("HELLO")
    node_key = verify_self_signed(hello)
    h = hello.header
    assert h["protocol"] == PROTOCOL_VERSION and h["name"] == "t" and len(h["nonce"]) >= 16
    assert h["node_key"] == node_key.hex()
    assert set(h["capabilities"]["ops"]) == set(OPS)
    assert h["capabilities"]["threads"] == 1 and h["capabilities"]["credit"] >= 1
    assert proc.poll() is None


def test_static_and_batches_give_correct_signed_results(session):
    coord, proc, node_key = session
    images = RNG.integers(0, 255, size=(10, 6)).astype(np.float32)
    coord.static("images/0", images, exposure={"images": 0.25})
    w = RNG.standard_normal((10, 3)).astype(np.float32)
    rows = np.array([7, 0, 3, 3, 9, 1, 2, 4, 5, 6], dtype=np.int64)
    # A = images[rows].T: (6 x 10) @ (10 x 3)
    seq = coord.batch(
        "b1", "matmul", {"b": w, "rows": rows}, {"transpose_a": True, "a_static": "images/0"}, exposure={"w1": 0.5}
    )
    got = expect_result(coord, node_key, "b1", seq)
    assert got.dtype == np.float32 and got.shape == (6, 3)
    np.testing.assert_allclose(got, images[rows].T @ w, rtol=1e-5)
    good_batch(coord, node_key)


def test_batch_sealed_under_another_key_is_dropped_and_node_stays_up(session):
    coord, proc, node_key = session
    intruder = Identity.generate()
    coord.batch("evil", "matmul", {"a": np.ones((2, 2)), "b": np.ones((2, 2))}, signer=intruder)
    good_batch(coord, node_key)  # the next message it answers is this one: "evil" was never computed
    assert proc.poll() is None


def test_foreign_run_is_rejected(session):
    coord, proc, node_key = session
    coord.batch("x", "matmul", {"a": np.ones((2, 2)), "b": np.ones((2, 2))}, run_id="some-other-run")
    assert expect_reject(coord, node_key, "foreign-run")["batch_id"] == "x"
    good_batch(coord, node_key)


def test_replayed_seq_is_rejected(session):
    coord, proc, node_key = session
    good_batch(coord, node_key, "first")
    coord.batch("again", "matmul", {"a": np.ones((2, 2)), "b": np.ones((2, 2))}, seq=coord.seq)  # same seq as "first"
    assert expect_reject(coord, node_key, "replayed")["seq"] == coord.seq
    good_batch(coord, node_key, "after")


def test_unknown_static_and_bad_params_are_rejected(session):
    coord, proc, node_key = session
    coord.batch(
        "s", "matmul", {"b": np.ones((3, 2)), "rows": np.arange(2)}, {"transpose_a": False, "a_static": "never-sent"}
    )
    expect_reject(coord, node_key, "unknown-static")
    coord.batch("p", "matmul", {"a": np.ones((2, 5)), "b": np.ones((3, 2))}, {"transpose_a": False, "a_static": None})
    expect_reject(coord, node_key, "bad-params")
    coord.batch("q", "matmul", {"a": np.ones((2, 2)), "b": np.ones((2, 2))}, {"a_static": 5})  # not a name
    assert expect_reject(coord, node_key, "bad-params")["batch_id"] == "q"
    good_batch(coord, node_key)


def test_garbage_is_dropped_and_node_still_answers(session):
    coord, proc, node_key = session
    coord.send_frames([b"hello"])
    coord.send_frames([b"GET / HTTP/1.1", b"x", b"y", b"z"])
    coord.send_frames([b"ENS1", b"NOPE", b"{}", b"\0" * 64])
    good_batch(coord, node_key)
    # A sealed BATCH whose header does not parse is dropped (spec 7): nothing to answer to.
    coord.send_frames(coord.channel.seal_parts([b"\x05BATCH\x00\x00\x00\x09{not json"]))
    good_batch(coord, node_key, "ok2")
    assert proc.poll() is None


def test_pinned_fingerprint_mismatch_declines_before_saying_hello(coord, node_proc):
    other = Identity.generate()
    proc = node_proc(coord.address, "--coordinator-key", other.fingerprint)
    decline = coord.expect("DECLINE")  # instead of a HELLO: the node never said who it is
    assert decline.header["code"] == "untrusted-key"
    assert other.fingerprint in decline.header["text"] and coord.identity.fingerprint in decline.header["text"]
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == EXIT_TRUST
    assert coord.identity.fingerprint in err and other.fingerprint in err
    # The process has exited; anything it sent after the DECLINE would be queued here now.
    assert not coord.sock.poll(200, zmq.POLLIN)


def test_sigterm_sends_bye_and_exits_zero(session):
    coord, proc, node_key = session
    good_batch(coord, node_key)  # the session is up
    proc.send_signal(signal.SIGTERM)
    bye = coord.expect("BYE")
    verify(bye, node_key)
    assert bye.header == {"node_id": coord.node_id, "reason": "shutdown"}
    assert proc.wait(timeout=5) == 0
    # Its first line says how it computes (spawn_node passes --threads 1).
    err = proc.stderr.read()
    assert "computing with 1 BLAS thread; denormals: " in err, err


def test_silent_coordinator_is_lost_and_node_says_hello_again(coord, node_proc):
    proc = node_proc(coord.address)
    first = coord.expect("HELLO")
    first_peer = coord.peer
    coord.welcome(first, heartbeat_ms=150)
    # Say nothing more: after 3 x 150 ms the node gives up and reconnects after ~0.5 s.
    again = coord.expect("HELLO", timeout=5)
    verify_self_signed(again)
    assert again.header["nonce"] != first.header["nonce"]
    assert coord.peer != first_peer  # a fresh DEALER: a new routing id
    assert proc.poll() is None


def test_headless_node_does_not_import_textual():
    code = (
        "import sys, enshuffle.commands.node, enshuffle.node.daemon; "
        "sys.exit(1 if any(m == 'textual' or m.startswith('textual.') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


# --- the daemon in a thread: state, controls, endings --------------------------------------------


class ThreadedNode:
    def __init__(self, tmp_path: Path, address: str, **kwargs) -> None:
        self.lines: list[str] = []
        self.state = NodeState()
        self.control = NodeControl(threads=1)
        self.identity = Identity.generate()
        self.daemon = NodeDaemon(
            address,
            identity=self.identity,
            trust=TrustStore(tmp_path),
            pinned=kwargs.pop("pinned", None),
            name="thread-node",
            threads=1,
            state=self.state,
            control=self.control,
            log=self.lines.append,
            **kwargs,
        )
        self.status: list[int] = []
        self.thread = threading.Thread(target=lambda: self.status.append(self.daemon.run()), daemon=True)
        self.thread.start()

    def join(self, timeout: float = 5.0) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "daemon did not return"
        return self.status[0]

    def close(self) -> None:
        self.daemon.stop()
        self.thread.join(5)


@pytest.fixture
def threaded(tmp_path):
    nodes = []

    def start(address: str, **kwargs) -> ThreadedNode:
        n = ThreadedNode(tmp_path, address, **kwargs)
        nodes.append(n)
        return n

    yield start
    for n in nodes:
        n.close()


def wait_for(predicate, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll the daemon's state (owned by another thread) until `predicate` holds."""
    wait_until(predicate, timeout, what, interval=0.01)


def heartbeat_with_credit(coord: FakeCoordinator, credit: int, timeout: float = 2.0) -> Message:
    """The first HEARTBEAT announcing `credit` (one sent just before a change may come first)."""
    deadline = time.monotonic() + timeout
    while True:
        hb = coord.expect("HEARTBEAT", skip=(), timeout=max(0.01, deadline - time.monotonic()))
        coord.beat()
        if hb.header["credit"] == credit:
            return hb


def test_state_exposure_pause_and_stop(coord, threaded):
    node = threaded(coord.address)
    hello = coord.expect("HELLO")
    node_key = verify_self_signed(hello)
    coord.welcome(hello, heartbeat_ms=200)
    coord.static("img", np.ones((4, 3), np.float32), exposure={"images": 0.25})
    coord.batch("e1", "matmul", {"a": np.ones((2, 2)), "b": np.ones((2, 2))}, exposure={"images": 0.1, "w1": 0.5})
    expect_result(coord, node_key, "e1", coord.seq)
    snap = node.state.snapshot()
    assert snap.exposure == {"images": 0.25, "w1": 0.5}  # the max per tensor
    assert snap.trust == "trusted-on-first-use" and snap.coordinator_fingerprint == coord.identity.fingerprint
    assert snap.own_fingerprint == node.identity.fingerprint and snap.run_id == coord.run_id
    assert snap.batches_done == 1 and snap.bytes_in > 0 and snap.bytes_out > 0
    assert any("connected to" in line and coord.identity.fingerprint in line for line in node.lines)
    node.control.toggle_pause()
    verify(heartbeat_with_credit(coord, 0), node_key)
    assert node.state.snapshot().paused
    node.control.toggle_pause()
    heartbeat_with_credit(coord, 2)
    node.daemon.stop()
    assert coord.expect("BYE").header["reason"] == "shutdown"
    assert node.join() == EXIT_OK
    assert node.state.snapshot().connection == "stopped"


def test_heartbeats_keep_coming_while_idle(coord, threaded):
    threaded(coord.address)
    hello = coord.expect("HELLO")
    coord.welcome(hello, heartbeat_ms=100)
    for _ in range(5):  # a coordinator that answers heartbeats keeps the session alive
        beat = coord.expect("HEARTBEAT", skip=(), timeout=1.0)
        assert beat.header == {"node_id": "n1", "credit": 2, "outstanding": 0}
        coord.beat()


def test_bye_run_finished_exits_or_reconnects(coord, threaded):
    node = threaded(coord.address)
    coord.welcome(coord.expect("HELLO"))
    coord.send("BYE", {"node_id": None, "reason": "run-finished"})
    assert node.join() == EXIT_OK
    # A long-lived daemon keeps trying instead.
    node = threaded(coord.address, exit_on_finish=False)
    first = coord.expect("HELLO")
    coord.welcome(first)
    coord.send("BYE", {"node_id": None, "reason": "run-finished"})
    assert coord.expect("HELLO").header["nonce"] != first.header["nonce"]


def test_final_refusal_exits_and_busy_retries(coord, threaded):
    node = threaded(coord.address)
    hello = coord.expect("HELLO")
    coord.send(
        "REFUSE",
        {"coordinator_key": coord.identity.public_hex, "nonce": hello.header["nonce"], "code": "busy", "text": "full"},
    )
    hello = coord.expect("HELLO")  # retried after back-off
    # A REFUSE signed by a stranger (not the remembered/pinned key) is ignored... but here
    # nothing is remembered yet, so the genuine coordinator's final REFUSE ends the node.
    coord.send(
        "REFUSE",
        {
            "coordinator_key": coord.identity.public_hex,
            "nonce": hello.header["nonce"],
            "code": "not-allowed",
            "text": "ask the operator to add your key",
        },
    )
    assert node.join() == EXIT_REFUSED
    assert "ask the operator" in node.daemon.error and node.state.snapshot().connection == "refused"


def test_refuse_from_a_stranger_is_ignored_when_pinned(coord, threaded):
    node = threaded(coord.address, pinned=coord.identity.fingerprint)
    hello = coord.expect("HELLO")
    stranger = Identity.generate()
    coord.send(
        "REFUSE",
        {
            "coordinator_key": stranger.public_hex,
            "nonce": hello.header["nonce"],
            "code": "not-allowed",
            "text": "go away",
        },
        signer=stranger,
    )
    coord.welcome(hello)
    wait_for(lambda: node.state.snapshot().connection == "connected", what="connected")
    assert node.daemon.dropped == 1


def test_remembered_key_change_stops_the_node(coord, threaded, tmp_path):
    TrustStore(tmp_path).check(coord.address, Identity.generate().fingerprint)  # an earlier coordinator
    node = threaded(coord.address)
    assert coord.expect("DECLINE").header["code"] == "untrusted-key"
    assert node.join() == EXIT_TRUST
    assert coord.identity.fingerprint in node.daemon.error and str(tmp_path) in node.daemon.error
    assert not coord.sock.poll(100, zmq.POLLIN)


# --- pure parts -------------------------------------------------------------------------------------


def test_backoff_follows_the_spec():
    import random

    rng = random.Random(1)
    for k, base in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (50, 30.0)]:
        delays = [backoff_delay(k, rng) for _ in range(200)]
        assert base * 0.8 <= min(delays) and max(delays) <= base * 1.2
        assert max(delays) - min(delays) > base * 0.2  # jittered, not constant


def test_blas_threads_can_change_at_runtime():
    try:
        before = get_blas_threads()
    except BlasThreadsUnavailable as exc:
        pytest.skip(f"no OpenBLAS here: {exc}")
    try:
        assert set_blas_threads(1) == 1
    finally:
        set_blas_threads(before)
    assert get_blas_threads() == before


# --- regressions: silence after a long batch, per-run replay, bad files and values -------------


def test_heartbeats_that_arrive_during_a_long_batch_keep_the_session_and_its_result(coord, threaded, monkeypatch):
    # The batch is "long" because the test holds it, not because the machine is slow: the node
    # computes until we release it, after it has been busy for more than the 3 heartbeats after
    # which silence would end the session. Nothing depends on how loaded the machine is.
    import enshuffle.node.daemon as daemon_module

    started, release = threading.Event(), threading.Event()
    real = daemon_module.compute_batch

    def held_compute(*args):
        started.set()
        assert release.wait(30), "the test never released the batch"
        return real(*args)

    monkeypatch.setattr(daemon_module, "compute_batch", held_compute)
    node = threaded(coord.address, pinned=coord.identity.fingerprint)
    hello = coord.expect("HELLO")
    node_key = verify_self_signed(hello)
    heartbeat_ms = 500  # silence judged after 1.5 s: far beyond any gap between our beats
    coord.welcome(hello, heartbeat_ms=heartbeat_ms)
    a, b = RNG.standard_normal((40, 30)), RNG.standard_normal((30, 20))
    seq = coord.batch("long", "matmul", {"a": a, "b": b}, {"a_static": None, "transpose_a": False})

    def beat_until(done, what: str) -> None:
        deadline = time.monotonic() + 20
        while not done():
            assert time.monotonic() < deadline, f"{what} within 20 s"
            coord.beat()
            if coord.sock.poll(20, zmq.POLLIN):
                msg = coord.channel.open(coord.recv()[1])
                assert msg.command == "HEARTBEAT", f"unexpected {msg.command} {msg.header}"

    beat_until(started.is_set, "the node started the batch")
    busy_since = time.monotonic()
    beat_until(lambda: time.monotonic() - busy_since > 4 * heartbeat_ms / 1000, "held the batch")
    release.set()
    got = None
    deadline = time.monotonic() + 20
    while got is None:
        assert time.monotonic() < deadline, "no RESULT within 20 s"
        coord.beat()
        if not coord.sock.poll(20, zmq.POLLIN):
            continue
        msg = coord.channel.open(coord.recv()[1])
        if msg.command == "RESULT":
            got = msg
        else:
            assert msg.command == "HEARTBEAT", f"expected RESULT, got {msg.command} {msg.header}"
    verify(got, node_key)
    assert got.header["seq"] == seq
    assert got.header["compute_seconds"] > 3 * heartbeat_ms / 1000  # the case under test happened
    np.testing.assert_allclose(got.arrays["c"], a @ b, rtol=1e-9)
    assert not any("lost connection" in line for line in node.lines), node.lines
    assert node.state.snapshot().connection in ("working", "connected", "idle", "waiting")
    assert node.thread.is_alive()


def test_replay_protection_spans_sessions_of_the_same_run(coord, threaded):
    node = threaded(coord.address)
    hello = coord.expect("HELLO")
    node_key = verify_self_signed(hello)
    coord.welcome(hello)
    a, b = np.ones((2, 2)), np.ones((2, 2))
    params = {"a_static": None, "transpose_a": False}
    coord.seq = 10
    expect_result(coord, node_key, "b11", coord.batch("b11", "matmul", {"a": a, "b": b}, params))
    old = coord.channel.seal(
        "BATCH",
        {
            "run_id": coord.run_id,
            "batch_id": "b5",
            "seq": 5,
            "step": 0,
            "op": "matmul",
            "params": params,
            "lease_ms": 30000,
        },
        {"a": a, "b": b},
    )
    coord.send("BYE", {"node_id": "n1", "reason": "shutdown"})  # a new session of the same run
    coord.welcome(coord.expect("HELLO"))
    coord.send_frames(old)  # a recording from the old session: its key is gone, it is dropped unread
    coord.batch("b5", "matmul", {"a": a, "b": b}, params, seq=5)  # an old seq of this run, sealed anew
    header = expect_reject(coord, node_key, "replayed")
    assert header["seq"] == 5 and "11" in header["text"]
    expect_result(coord, node_key, "b12", coord.batch("b12", "matmul", {"a": a, "b": b}, params))
    assert node.thread.is_alive()


def test_unreadable_trust_file_stops_the_node_with_a_clear_error(coord, threaded, tmp_path):
    (tmp_path / "known_coordinators.json").write_bytes(b'{"coordinators": {"\xff": 1}}')
    node = threaded(coord.address)
    assert coord.expect("DECLINE").header["code"] == "trust-store"
    assert node.join() == EXIT_TRUST
    assert str(tmp_path / "known_coordinators.json") in node.daemon.error


def test_home_that_is_a_file_is_a_one_line_error(coord, tmp_path):
    home = tmp_path / "home"
    home.write_text("oops")
    proc = spawn_node(home, coord.address)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and str(home) in err


@pytest.mark.parametrize("heartbeat_ms", [2**40, 600_001])  # 0 never gets past the codec
def test_welcome_with_an_absurd_heartbeat_is_ignored(coord, threaded, heartbeat_ms):
    node = threaded(coord.address)
    first = coord.expect("HELLO")
    coord.welcome(first, heartbeat_ms=heartbeat_ms)
    again = coord.expect("HELLO", timeout=5)  # backed off and tried again, alive
    assert again.header["nonce"] != first.header["nonce"]
    assert node.thread.is_alive() and any(str(heartbeat_ms) in line for line in node.lines)
    coord.welcome(again)  # a sane WELCOME still works
    wait_for(lambda: node.state.snapshot().connection == "connected", what="connected")


def test_refuse_without_our_nonce_is_never_final(coord, threaded):
    node = threaded(coord.address)
    first = coord.expect("HELLO")
    coord.send(
        "REFUSE",
        {
            "coordinator_key": coord.identity.public_hex,
            "nonce": None,
            "code": "version-mismatch",
            "text": "recorded long ago",
        },
    )
    again = coord.expect("HELLO", timeout=5)
    assert again.header["nonce"] != first.header["nonce"]
    assert node.thread.is_alive() and node.daemon.error is None
    assert any("recorded long ago" in line for line in node.lines)


def _ipv6_router():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    try:
        port = sock.bind_to_random_port("tcp://[::1]")
    except zmq.ZMQError as exc:
        sock.close()
        ctx.term()
        pytest.skip(f"no IPv6 loopback here: {exc}")
    return ctx, sock, port


def test_node_connects_over_ipv6(threaded):
    ctx, sock, port = _ipv6_router()
    try:
        threaded(f"tcp://[::1]:{port}")
        assert sock.poll(5000, zmq.POLLIN), "no HI over IPv6 within 5 s"
        assert decode(sock.recv_multipart()[1:]).command == "HI"
    finally:
        sock.close()
        ctx.term()


def test_malformed_address_is_a_one_line_error(tmp_path):
    proc = spawn_node(tmp_path / "home", "tcp://a b:5555")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and err.count("\n") == 1 and "tcp://a b:5555" in err


# --- a coordinator the node accepted cannot make it allocate without limit --------------------------


def test_a_result_larger_than_max_memory_is_refused_before_allocating(session):
    """The issue's 331-byte BATCH (11585,0)@(0,11585) asked for a 1 GiB result; and 0.5 MB of
    `rows` into a 32 KB static asked for 1 GiB of gathered rows. Both are refused from the header's
    shapes (the node's default --max-memory is at most 512 MiB), and the node answers the next batch."""
    coord, proc, node_key = session
    seq = coord.batch(
        "wide",
        "matmul",
        {"a": np.zeros((11585, 0)), "b": np.zeros((0, 11585))},
        {"transpose_a": False, "a_static": None},
    )
    header = expect_reject(coord, node_key, "too-large")
    assert (header["batch_id"], header["seq"]) == ("wide", seq) and "max-memory" in header["text"]
    coord.static("small", np.ones((64, 64)))  # 32 KB
    coord.batch(
        "gather",
        "matmul",
        {"rows": np.zeros(65536, np.int64), "b": np.ones((64, 2048))},
        {"transpose_a": False, "a_static": "small"},
    )
    assert expect_reject(coord, node_key, "too-large")["batch_id"] == "gather"
    good_batch(coord, node_key)
    assert proc.poll() is None


def test_max_memory_is_the_node_owners_choice(coord, node_proc):
    node_proc(coord.address, "--max-memory", "1M")
    hello = coord.expect("HELLO")
    node_key = verify_self_signed(hello)
    coord.welcome(hello)
    coord.batch(
        "m",
        "matmul",
        {"a": np.ones((400, 10)), "b": np.ones((10, 400))},  # 1.28 MB result
        {"transpose_a": False, "a_static": None},
    )
    assert expect_reject(coord, node_key, "too-large")["batch_id"] == "m"
    good_batch(coord, node_key)  # a small one still goes through
    bad = subprocess.run(
        [sys.executable, "-m", "enshuffle", "node", "--connect", coord.address, "--max-memory", "lots"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "--max-memory" in bad.stderr and "Traceback" not in bad.stderr


def test_a_coordinator_exceeding_the_credit_gets_over_credit_and_nothing_is_queued(coord, threaded):
    """The issue: 2,000 BATCHes sent with credit 2 were all queued and computed. Now the node holds
    at most its credit; every BATCH beyond it is answered REJECT over-credit at once, uncomputed."""
    node = threaded(coord.address, credit=2)
    hello = coord.expect("HELLO")
    node_key = verify_self_signed(hello)
    coord.welcome(hello, credit=2)
    a, b = RNG.standard_normal((300, 300)), RNG.standard_normal((300, 300))
    total = 200
    for i in range(total):
        coord.batch(f"f{i}", "matmul", {"a": a, "b": b}, {"transpose_a": False, "a_static": None})
    results = over = 0
    while results + over < total:
        msg = coord.expect_any(("RESULT", "REJECT"))
        if msg.command == "RESULT":
            results += 1
        else:
            assert msg.header["code"] == "over-credit", msg.header
            over += 1
    assert over > 0 and results < total, (results, over)
    assert node.state.snapshot().batches_done == results
    good_batch(coord, node_key)


def test_data_before_welcome_is_never_queued(coord, threaded):
    """Sealed or oversized messages before the handshake completes are dropped unread, never kept."""
    node = threaded(coord.address)
    routing, frames = coord.recv()
    hi = decode(frames)
    assert hi.command == "HI"
    coord.peer = routing
    junk = Channel(os.urandom(32), os.urandom(32))
    for i in range(30):  # ~30 MB of "BATCH" from a coordinator that has not even challenged it
        coord.send_frames(
            junk.seal(
                "BATCH",
                {
                    "run_id": "r",
                    "batch_id": f"j{i}",
                    "seq": i + 1,
                    "step": 0,
                    "op": "matmul",
                    "params": {},
                    "lease_ms": 1000,
                },
                {"a": np.zeros((1000, 125)), "b": np.zeros((125, 1))},
            )
        )
    challenge, coord.pending = make_challenge(coord.identity, coord.run_id, hi)
    coord.send_frames(challenge)
    hello = coord.expect("HELLO")
    coord.welcome(hello)
    good_batch(coord, verify_self_signed(hello))
    assert node.daemon.dropped >= 30
