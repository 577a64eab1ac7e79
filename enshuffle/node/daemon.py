"""The node daemon: one ENS2 session after another with a coordinator, computing its batches.

Owns the node side of docs/protocol.md: the DEALER socket (one thread owns it; ZeroMQ sockets
are not thread-safe), the handshake and trust check, statics, batch checks and REJECT codes,
heartbeats, loss detection, reconnect back-off, BYE, and the live `NodeState` the node TUI
reads. What a batch means (its memory, its description) is `enshuffle.batch`'s; the arithmetic
itself is `enshuffle.kernels.compute_batch`.

Compute runs in the socket thread: batches are small (well under a second) and heartbeats go
out between them, so no second thread and no lock around the socket is needed. A small batch
costs little more than its arithmetic: products go into buffers the session reuses
(`compute.Workspace`), small ones run on one BLAS thread (`blas.BlasThreads`), and statics are
stored aligned, so BLAS never copies them.

Exit statuses of `NodeDaemon.run()`:

* 0  stopped (stop() / SIGINT / SIGTERM, after BYE `shutdown`), or BYE/REFUSE `run-finished`
     when `exit_on_finish` is true (the default, as under `enshuffle train`; a long-lived
     volunteer daemon passes exit_on_finish=False and keeps reconnecting with back-off);
* 2  the --connect address is one ZeroMQ cannot connect to (see `check_address`);
* 3  the coordinator's key failed the trust check (pin or remembered fingerprint mismatch,
     or an unusable trust file); the node sends one DECLINE (so the operator reads "refused
     our key") and nothing else;
* 4  the coordinator refused us for good: REFUSE `version-mismatch` / `not-allowed` /
     `bad-hello` / `quarantined` naming our verified HELLO, or BYE `evicted` / `protocol-error` /
     `quarantined`; under --keep-running (exit_on_finish false) 3 and 4 back off and retry instead;
* 5  no coordinator answered for `give_up_after` seconds (GIVE_UP_S unless --keep-running,
     which retries for ever); the last line says whether the address does not resolve,
     nothing listens there, it is unreachable, or something listens but never answers HELLO.

This module never imports textual.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
import time
from collections import ChainMap, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zmq

from enshuffle.errors import UsageError
from enshuffle.blas import BlasThreads, BlasThreadsUnavailable, get_blas_threads
from enshuffle.node.invite import resolve_invite
from enshuffle import batch as vocabulary
from enshuffle.batch import OPS, BatchError
from enshuffle.kernels import ResidentState, Workspace, aligned, compute_batch
from enshuffle.fpenv import flushing
from enshuffle.node.policy import Policy
from enshuffle.node.state import NodeControl, NodeState
from enshuffle.protocol.handshake import DIGEST_PREFIX, NodeHandshake
from enshuffle.protocol.keys import (
    FingerprintMismatch,
    Identity,
    KeyStoreError,
    TrustStore,
    fingerprint,
    normalize_fingerprint,
    short_fingerprint,
)
from enshuffle.protocol.text import printable
from enshuffle.protocol.messages import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Channel,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
    verify_self_signed,
)

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_TRUST = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5
GIVE_UP_S = 300.0  # without --keep-running: give up after this long with no coordinator

HELLO_TIMEOUT_S = 5.0
LOST_AFTER_HEARTBEATS = 3  # silence of 3 x heartbeat_ms = coordinator lost (spec 8)
POLL_MS = 100  # longest wait in poll: bounds how late stop/pause are noticed
RATE_LINE_S = 10.0  # a rate line this often while working
IDLE_AFTER_S = 2.0  # no batch for this long: "idle, waiting for work"
BYE_LINGER_MS = 1000  # how long the final BYE may take to leave (spec 2)
WAITING_LOG_S = 10.0  # a coordinator's changing `waiting` text is logged at most this often
MAX_EXPOSURE_TENSORS = 64  # tensor names a coordinator's `exposure` headers may introduce
DEFAULT_RECORD_MAX_BYTES = 2 << 30  # --record stops (with one log line) past this many bytes
# Products below this many multiply-adds run on one BLAS thread (blas.BlasThreads says why). 2^27
# is about 3 ms (float32) to 7 ms (float64) of one core on the 2-core development box: a
# default-preset product (128x392x128, 6.4M) stays on one thread; a full-batch one
# (60000x392x128, 3.0G) uses all of --threads.
PARALLEL_MIN_WORK = 1 << 27
# Frames below this size are copied into libzmq's buffer when sent; larger ones go zero-copy
# (spec 2: large messages SHOULD). A zero-copy frame hands its release to pyzmq's garbage-collector
# thread: measured here, a 66 KB RESULT (a default-preset product) took 46-69 us to send zero-copy
# and 6-21 us copied; at 128 KB copying costs more (95 against 53 us).
ZERO_COPY_BYTES = 128 << 10


def default_max_memory() -> int:
    """A quarter of this machine's RAM, between 64 MiB and 512 MiB: what one batch may make this
    node allocate by default (a full-batch X·W1 partial, 60,000 x 128 float64, is 61 MB)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 4 << 30
    return min(512 << 20, max(64 << 20, ram // 4))


# Messages libzmq queues for this node before it stops reading the connection (backpressure, no
# loss): the daemon drains them into its own queue, which --max-memory bounds, so a few suffice.
# With MAXMSGSIZE (see `receive_limit`) it bounds what one peer can make libzmq hold, before any
# CHALLENGE as after.
RECEIVE_HWM = 8
MAX_HEARTBEAT_MS = 600_000  # a WELCOME asking for more (or < 1) is refused: libzmq takes an int
MAX_RUNS_REMEMBERED = 64  # runs whose last accepted seq the daemon keeps (replay protection)

FINAL_REFUSALS = ("version-mismatch", "not-allowed", "bad-hello", "quarantined")
# REFUSE `duplicate-key` is not final (the other process may be this node's own dead session), but
# it is said loudly every time: two processes share one key.
FINAL_BYES = ("evicted", "protocol-error", "quarantined")
# Where compute_batch's BatchError codes land among the spec's REJECT codes.
BATCH_ERROR_CODES = {
    "bad-batch": "bad-params",
    "unknown-op": "bad-op",
    "unknown-static": "unknown-static",
    "state-behind": "state-behind",
    "state-ahead": "state-ahead",
}


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0, 1, ...): spec section 10.

    min(30 s, 0.5 s * 2^k) * U(0.8, 1.2): the jitter keeps many nodes that lost the same
    coordinator from all knocking at the same instant.
    """
    jitter = rng.uniform(0.8, 1.2) if rng is not None else random.uniform(0.8, 1.2)
    return min(30.0, 0.5 * 2.0 ** min(attempt, 16)) * jitter


def _json_id(value, kind: str):
    """A header value fit to echo in a REJECT (str / uint), else None: never echo junk."""
    if kind == "str":
        return value if isinstance(value, str) and len(value) <= 200 else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else None


class AddressError(UsageError):
    """A --connect address ZeroMQ refuses; the message names it and the expected form."""


def _configure_socket(sock: zmq.Socket) -> None:
    # IPv6 on, so tcp://[::1]:PORT and IPv6-only host names work (IPv4 keeps working).
    sock.setsockopt(zmq.IPV6, 1)


def _connect(sock: zmq.Socket, address: str) -> None:
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        raise AddressError(
            f"cannot connect to {address!r} ({exc}); give the coordinator's "
            f"address as tcp://HOST:PORT, e.g. tcp://192.0.2.7:5555 or "
            f"tcp://[::1]:5555"
        ) from None


def diagnose_silence(address: str, timeout: float = 2.0) -> str:
    """Why nothing answered at `address`, told apart: a name that does not resolve, nothing
    listening (refused), unreachable (no route, timeout), or a listener that says nothing."""
    host, _, port = address[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as exc:
        return f"cannot resolve host {host!r} ({getattr(exc, 'strerror', None) or exc}): check the name in --connect"
    family, kind, proto, _, sockaddr = infos[0]
    probe = socket.socket(family, kind, proto)
    probe.settimeout(timeout)
    try:
        probe.connect(sockaddr)
    except ConnectionRefusedError:
        return (
            f"nothing is listening on {host} port {port} (connection refused): is the coordinator "
            f"running, and is this its address?"
        )
    except OSError as exc:
        why = exc.strerror or "no answer"
        return (
            f"{host} port {port} is unreachable ({why}): check the address, the network and any "
            f"firewall between here and the coordinator"
        )
    finally:
        probe.close()
    return (
        f"{host} port {port} accepts connections but no coordinator answered HELLO: is it an "
        f"enshuffle coordinator speaking protocol {PROTOCOL_VERSION}, and not overloaded?"
    )


def check_address(address: str) -> None:
    """Raise AddressError if ZeroMQ would refuse `address` (called before the daemon starts)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        _configure_socket(sock)
        _connect(sock, address)
    finally:
        sock.close()
        ctx.term()


class RecordError(UsageError):
    """A --record directory that cannot be used; the message names it and what to do."""


class MessageRecorder:
    """`--record DIR`: keeps every STATIC and BATCH this node accepted after verification.

    One file per message, `DIR/%08d-%s.npz` (a running number, the command): the header JSON as
    a uint8 array named `header`, each array as `arr.<name>` (numpy savez, no pickle; read with
    allow_pickle=False). It is what an honest-but-curious node keeps, so `enshuffle audit` can
    play that node against it. Bounded: past `max_bytes` it stops, with one log line.
    """

    def __init__(
        self, directory: str, max_bytes: int = DEFAULT_RECORD_MAX_BYTES, log: Callable[[str], None] | None = None
    ) -> None:
        self.directory = directory
        self.max_bytes = int(max_bytes)
        self.written = 0
        self.count = 0
        self.stopped = False
        self._log = log or (lambda line: None)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise RecordError(
                f"cannot create --record directory {directory}: {exc.strerror}; choose a writable directory"
            ) from None
        if any(name.endswith(".npz") for name in os.listdir(directory)):
            raise RecordError(
                f"--record directory {directory} already holds a recording; choose an empty or new directory"
            )

    def record(self, msg: Message) -> None:
        if self.stopped:
            return
        header_json = json.dumps(dict(msg.header), sort_keys=True).encode("utf-8")
        size = sum(a.nbytes for a in msg.arrays.values()) + len(header_json)
        if self.written + size > self.max_bytes:
            self.stopped = True
            self._log(
                f"recording stopped after {self.count} messages: the next one would pass "
                f"the --record-max-bytes cap of {self.max_bytes} bytes"
            )
            return
        payload = {"header": np.frombuffer(header_json, dtype=np.uint8)}
        payload.update({f"arr.{name}": np.asarray(a) for name, a in msg.arrays.items()})
        path = os.path.join(self.directory, f"{self.count:08d}-{msg.command}.npz")
        try:
            with open(path, "wb") as fh:
                np.savez(fh, **payload)  # type: ignore[arg-type]  # numpy's stub reads a key as allow_pickle
        except OSError as exc:
            self.stopped = True
            self._log(f"recording stopped: cannot write {path}: {exc.strerror}")
            return
        self.count += 1
        self.written += size


class _SessionEnd(Exception):
    """Ends the current session. `status` None = reconnect with back-off, else exit with it."""

    def __init__(self, status: int | None, welcomed: bool = False) -> None:
        super().__init__(status)
        self.status = status
        self.welcomed = welcomed


@dataclass
class _Session:
    """What one WELCOME established; all of it is discarded when the session ends."""

    socket: zmq.Socket
    run_id: str
    node_id: str
    coordinator_key: bytes
    credit: int
    heartbeat_ms: int
    channel: Channel
    statics: dict[str, np.ndarray] = field(default_factory=dict)
    states: dict = field(default_factory=dict)  # name -> kernels.ResidentState (a STATIC with "version")
    static_bytes: int = 0
    pending: deque = field(default_factory=deque)  # (received_at, Message | ProtocolError, nbytes)
    pending_bytes: int = 0
    last_received: float = 0.0
    last_sent: float = 0.0
    wanted_credit: int = 0  # the window last announced (WELCOME's credit, then HEARTBEATs)
    workspace: Workspace = field(default_factory=Workspace)  # buffers reused from batch to batch


class NodeDaemon:
    """A node: connects to `connect`, computes batches until stopped. See the module docstring.

    `identity` signs everything this node sends; `trust` decides whether the coordinator's key
    is acceptable (`pinned`, a fingerprint, overrides it). `state` is written for presenters,
    `control` read for pause, thread count and stop. `credit` is the most batches offered in
    HELLO. `log` receives one line per state change (default: stderr).
    """

    def __init__(
        self,
        connect: str,
        *,
        identity: Identity,
        trust: TrustStore,
        pinned: str | None,
        name: str,
        threads: int,
        state: NodeState | None = None,
        control: NodeControl | None = None,
        credit: int = 2,
        log: Callable[[str], None] | None = None,
        exit_on_finish: bool = True,
        hello_timeout: float = HELLO_TIMEOUT_S,
        limits: Limits = DEFAULT_LIMITS,
        max_static_bytes: int | None = None,
        max_memory: int | None = None,
        invite: str | None = None,
        rng: random.Random | None = None,
        recorder: MessageRecorder | None = None,
        policy: Policy | None = None,
        give_up_after: float | None = None,
        denormals: str | None = None,
    ) -> None:
        self.connect = connect
        self.identity = identity
        self.trust = trust
        self.pinned = normalize_fingerprint(pinned) if pinned else None
        self.name = name
        self.credit_offer = max(1, int(credit))
        self.exit_on_finish = exit_on_finish
        self.hello_timeout = hello_timeout
        self.limits = limits
        # The most one batch's result (and its working copy) may take; what the node holds between
        # batches (static operands and queued messages together) at most as much again. A
        # coordinator asking more gets REJECT too-large. `max_static_bytes` caps statics lower still.
        self.max_memory = int(max_memory) if max_memory else default_max_memory()
        self.max_static_bytes = min(int(max_static_bytes), self.max_memory) if max_static_bytes else self.max_memory
        self.invite = resolve_invite(invite)
        self.rng = rng or random.Random()
        self.recorder = recorder
        self.policy = policy or Policy()
        self.give_up_after = give_up_after  # seconds without a coordinator before exit 5; None: never
        self._denormals = denormals  # what fpenv.flush_denormals() said, when the process set it
        self._rest_until = 0.0  # --max-cpu: no new batch before this (monotonic)
        self._coordinator_waiting = ""  # the coordinator's last word on why we have no work
        self._waiting_logged_at = -WAITING_LOG_S
        self.control = control or NodeControl(threads=threads)
        self.state = state or NodeState()
        self._log = log or (lambda line: print(f"enshuffle node: {line}", file=sys.stderr, flush=True))
        self._applied_threads = max(1, int(threads))  # cmd_node put it in the environment already
        self._blas_warned = False
        # Per-product thread choice, on the OpenBLAS numpy loaded; run() puts the count it found back.
        self._blas = BlasThreads(self._applied_threads, PARALLEL_MIN_WORK)
        self.error: str | None = None  # the fatal error's text when run() returns non-zero
        self.dropped = 0  # invalid or unexpected messages dropped (spec 15)
        self._done_times: deque = deque(maxlen=4096)  # completion times, for the rate
        self._window = {"t": time.monotonic(), "batches": 0, "in": 0, "out": 0}
        self._last_batch_at = 0.0
        self._drop_log_at = 0.0
        self._drops_unlogged = 0
        self._lost_batch_logged = False
        # Replay protection is per run (spec 7), not per session: a reconnect must not let an
        # old BATCH of the same run in again. run_id -> the last accepted seq, newest last.
        self._last_seq: dict[str, int] = {}
        with self.state.lock:
            self.state.connect = connect
            self.state.name = name
            self.state.own_fingerprint = identity.fingerprint
            self.state.threads = self._applied_threads
            self.state.paused = self.control.paused
            self.state.connection = "starting"

    # --- public ------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the daemon to say BYE and return; safe from any thread or a signal handler."""
        self.control.request_stop()

    def run(self) -> int:
        """Sessions with back-off until stopped or refused for good; returns the exit status."""
        ctx = zmq.Context()
        attempt = 0
        status = EXIT_OK
        last_contact = time.monotonic()  # start, or the end of the last welcomed session
        try:
            blas_before = get_blas_threads() if self._blas.available else None
        except (BlasThreadsUnavailable, OSError, AttributeError):
            blas_before = None
        self._say(self._compute_line())
        try:
            while not self.control.stop_requested:
                try:
                    self._session(ctx)
                except AddressError as exc:
                    self._fatal(EXIT_USAGE, "refused", "bad address", str(exc))
                    status = EXIT_USAGE
                    break
                except _SessionEnd as end:
                    if end.status is not None:
                        status = end.status
                        break
                    if end.welcomed:
                        attempt = 0  # spec 10: k resets after a WELCOME
                        last_contact = time.monotonic()
                if self.control.stop_requested:
                    break
                if self.give_up_after is not None and time.monotonic() - last_contact > self.give_up_after:
                    self._fatal(
                        EXIT_UNREACHABLE,
                        "stopped",
                        "gave up",
                        f"no coordinator at {self.connect} for {self.give_up_after:g} s, giving up: "
                        f"{diagnose_silence(self.connect)} (--keep-running retries for ever)",
                    )
                    status = EXIT_UNREACHABLE
                    break
                delay = backoff_delay(attempt, self.rng)
                attempt += 1
                self._set(connection="reconnecting", reason=f"reconnecting in {delay:.1f} s", current_op="")
                self._say(f"reconnecting in {delay:.1f} s")
                self._wait(delay)
        finally:
            ctx.term()  # waits for a final BYE's linger (at most BYE_LINGER_MS), nothing else
            if blas_before is not None:  # an in-process daemon leaves BLAS as it found it
                self._blas.use(blas_before)
        if status == EXIT_OK:
            self._set(connection="stopped", reason="", current_op="")
            self._say("stopped")
        return status

    # --- small helpers -----------------------------------------------------------------

    def _compute_line(self) -> str:
        """How this node computes, said once at start."""
        if self._blas.available:
            threads = f"{self._applied_threads} BLAS thread{'s' if self._applied_threads != 1 else ''}" + (
                f" (products under {PARALLEL_MIN_WORK:,} multiply-adds on one)" if self._applied_threads > 1 else ""
            )
        else:
            threads = f"{self._applied_threads} BLAS thread(s), not adjustable per product"
        denormals = self._denormals or ("denormals: flushed to zero" if flushing() else "denormals: not flushed")
        return f"computing with {threads}; {denormals}"

    def _say(self, line: str) -> None:
        line = printable(line, 4000)  # one line, whatever a coordinator put in it
        self.state.add_log(line)
        self._log(line)

    def _set(self, **fields) -> None:
        with self.state.lock:
            for key, value in fields.items():
                setattr(self.state, key, value)

    def _wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, waking early when a stop is requested (back-off only)."""
        end = time.monotonic() + seconds
        while not self.control.stop_requested:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, POLL_MS / 1000))

    def _fatal(self, status: int, connection: str, reason: str, message: str) -> _SessionEnd:
        self.error = message
        self._set(connection=connection, reason=reason, current_op="")
        self._say(f"error: {message}")
        return _SessionEnd(status)

    def _final(self, status: int, connection: str, reason: str, message: str) -> _SessionEnd:
        """A verdict that ends this node, except under --keep-running (exit_on_finish false): a
        long-lived volunteer daemon says so loudly and backs off instead, so nothing said on the
        wire can end it for good."""
        if self.exit_on_finish:
            return self._fatal(status, connection, reason, message)
        self._set(connection=connection, reason=reason, current_op="")
        self._say(f"error: {message}; --keep-running: trying again later")
        return _SessionEnd(None)

    def _drop(self, what: str) -> None:
        """Count a dropped message; log at most one line a second (a flood must not flood logs)."""
        self.dropped += 1
        now = time.monotonic()
        if now - self._drop_log_at >= 1.0:
            more = f" (+{self._drops_unlogged} more dropped)" if self._drops_unlogged else ""
            self._say(f"dropped {what}{more}")
            self._drop_log_at, self._drops_unlogged = now, 0
        else:
            self._drops_unlogged += 1

    def receive_limit(self) -> int:
        """The largest frame this node could ever accept: a BATCH or STATIC no bigger than
        --max-memory (its header at the header limit) and never above the protocol limit. libzmq
        drops a connection that sends a bigger frame before buffering it."""
        overhead = 64 + self.limits.max_header_bytes
        return min(self.limits.max_message_bytes, self.max_memory + overhead)

    def _new_socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)  # a fresh routing id per session (spec 6, step 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.receive_limit())
        # At most this many messages wait in libzmq before it stops reading (backpressure): a
        # coordinator sends at most credit BATCHes, its statics and a heartbeat a second.
        sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 500)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 30000)
        # No libzmq (ZMTP) heartbeats: a flooded connection with them makes libzmq abort the
        # process (libzmq issues 3937, 4364, 4767). ENS2 HEARTBEATs detect loss (spec 8).
        _configure_socket(sock)
        try:
            _connect(sock, self.connect)
        except AddressError:
            sock.close()
            raise
        return sock

    def _send(self, s: "_Session", command: str, header: dict, arrays: dict | None = None) -> None:
        self._send_frames(s.socket, s.channel.seal(command, header, arrays))

    def _send_frames(self, sock: zmq.Socket, frames: list) -> None:
        size = sum(memoryview(f).nbytes for f in frames)
        sock.send_multipart(frames, copy=size < ZERO_COPY_BYTES)
        self._window["out"] += size
        with self.state.lock:
            self.state.bytes_out += size

    def _recv(self, sock: zmq.Socket) -> list:
        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        size = sum(len(f) for f in frames)
        self._window["in"] += size
        with self.state.lock:
            self.state.bytes_in += size
        return frames

    # --- handshake -----------------------------------------------------------------------

    def _session(self, ctx: zmq.Context) -> None:
        """One session from HELLO to its end; always raises _SessionEnd."""
        sock = self._new_socket(ctx)
        try:
            session = self._handshake(sock)
            self._serve(session)
        finally:
            sock.close()

    def _handshake(self, sock: zmq.Socket) -> _Session:
        # `max_message`: the largest frame libzmq lets in here (receive_limit); a coordinator that
        # reads it never sends a bigger one (which would only cut the connection) and treats the
        # batch or static as refused too-large instead.
        hs = NodeHandshake(
            self.identity,
            self.name,
            {
                "ops": list(OPS),
                "threads": self._applied_threads,
                "credit": self.credit_offer,
                "max_message": self.receive_limit(),
            },
            invite=self.invite,
            replaces=getattr(self, "_last_node_id", None),
        )
        self._set(connection="connecting", reason=f"saying HI to {self.connect}", current_op="")
        self._say(f"connecting to {self.connect} as {self.name} ({short_fingerprint(self.identity.fingerprint)})")
        self._send_frames(sock, hs.hi())
        deadline = time.monotonic() + self.hello_timeout
        challenged = False
        while True:
            if self.control.stop_requested:
                raise _SessionEnd(EXIT_OK)  # no session yet: nothing to say BYE to
            left = deadline - time.monotonic()
            if left <= 0:
                why = diagnose_silence(self.connect)
                self._set(reason=why)
                self._say(f"no answer from {self.connect} within {self.hello_timeout:g} s: {why}")
                raise _SessionEnd(None)
            if not sock.poll(int(min(left * 1000, POLL_MS)) + 1, zmq.POLLIN):
                continue
            frames = self._recv(sock)
            try:
                msg = decode(frames, limits=self.limits)  # handshake messages only: small, never queued
            except ProtocolError as exc:
                self._drop(f"an invalid message before WELCOME ({exc})")
                continue
            if msg.command == "CHALLENGE" and not challenged:
                if self._accept_challenge(sock, hs, msg):
                    challenged = True
            elif msg.command == "WELCOME" and challenged:
                session = self._accept_welcome(sock, hs, msg)
                if session is not None:
                    return session
            elif msg.command == "REFUSE":
                self._handle_refuse(msg, hs)
            else:
                self._drop(f"{msg.command} before WELCOME")

    def _accept_challenge(self, sock: zmq.Socket, hs: NodeHandshake, msg: Message) -> bool:
        """Check the coordinator's key BEFORE saying who we are: a key we do not trust gets one
        DECLINE (so its operator reads "refused our key") and this node stops."""
        try:
            key = hs.check_challenge(msg, version=False)  # the key is checked before its protocol
        except ProtocolError as exc:
            self._drop(f"CHALLENGE ({exc})")
            return False
        fp = fingerprint(key)
        try:
            trust = self.trust.check(self.connect, fp, self.pinned)
        except FingerprintMismatch as exc:
            self._set(coordinator_fingerprint=fp)
            self._decline(
                sock,
                hs,
                "untrusted-key",
                f"node {self.name} expects coordinator key {exc.expected}, this coordinator presented {fp}",
            )
            raise self._final(EXIT_TRUST, "refused", "refused: coordinator fingerprint mismatch", str(exc)) from None
        except KeyStoreError as exc:
            self._decline(sock, hs, "trust-store", f"node {self.name} cannot read its trust store")
            raise self._fatal(EXIT_TRUST, "refused", "refused: trust store unusable", str(exc)) from None
        if msg.header["protocol"] != PROTOCOL_VERSION:
            raise self._final(
                EXIT_REFUSED,
                "refused",
                "refused: version-mismatch",
                f"coordinator {self.connect} speaks protocol {msg.header['protocol']!r:.20}, this node "
                f"{PROTOCOL_VERSION}; upgrade enshuffle",
            )
        self._trust = trust
        self._send_frames(sock, hs.hello(msg))
        return True

    def _decline(self, sock: zmq.Socket, hs: NodeHandshake, code: str, text: str) -> None:
        try:
            sock.setsockopt(zmq.LINGER, BYE_LINGER_MS)
            self._send_frames(sock, encode("DECLINE", {"nonce": hs.nonce, "code": code, "text": text[:300]}))
        except zmq.ZMQError:
            pass

    def _accept_welcome(self, sock: zmq.Socket, hs: NodeHandshake, msg: Message) -> _Session | None:
        """A WELCOME signed by the key we accepted, for our HELLO -> the session (and its first
        sealed message, which tells the coordinator we are in)."""
        h = msg.header
        try:
            channel = hs.welcome(msg)
        except ProtocolError as exc:
            self._drop(f"WELCOME ({exc})")
            return None
        key = hs.coordinator_key
        assert key is not None, "a WELCOME verified against the coordinator's key"
        fp = fingerprint(key)
        trust = getattr(self, "_trust", "known")
        hb = h["heartbeat_ms"]
        if not (isinstance(hb, int) and not isinstance(hb, bool) and 1 <= hb <= MAX_HEARTBEAT_MS):
            # libzmq's options take a C int (2**40 would raise OverflowError), and no sane
            # coordinator asks for beats further apart than 10 minutes: treat it as no answer.
            self._say(
                f"coordinator {self.connect} sent a WELCOME with heartbeat_ms {hb!r:.40}, "
                f"outside 1..{MAX_HEARTBEAT_MS}; ignoring it"
            )
            raise _SessionEnd(None)
        # No libzmq (ZMTP) heartbeats: a flooded connection with them makes libzmq abort the
        # process (libzmq issues 3937, 4364, 4767). ENS2 HEARTBEATs detect loss (spec 8).
        now = time.monotonic()
        credit = min(int(h["credit"]), self.credit_offer)
        self._last_node_id = h["node_id"]  # a reconnect replaces this session (HELLO `replaces`)
        session = _Session(
            socket=sock,
            run_id=h["run_id"],
            node_id=h["node_id"],
            coordinator_key=key,
            credit=credit,
            heartbeat_ms=hb,
            channel=channel,
            last_received=now,
            last_sent=now,
            wanted_credit=credit,
            workspace=Workspace(self._blas, limit=self.max_memory),
        )
        self._heartbeat(session)  # the first sealed message: the coordinator counts us from here
        words = {"pinned": "pinned", "known": "known", "trusted-on-first-use": "trusted on first use"}
        self._coordinator_waiting = ""
        self._set(
            connection="connected",
            reason=self._idle_reason(),
            coordinator_fingerprint=fp,
            trust=trust,
            run_id=session.run_id,
        )
        self._say(
            f"connected to {self.connect} as node {session.node_id}, coordinator {fp} "
            f"({words.get(trust, trust)}), run {session.run_id}, credit {session.credit}"
        )
        self._say("waiting for work")
        self._last_batch_at = now
        return session

    def _handle_refuse(self, msg: Message, hs: NodeHandshake) -> None:
        """A verifiable REFUSE ends the session (final or back-off); anything else is ignored."""
        nonce = hs.nonce
        h = msg.header
        try:
            key = verify_self_signed(msg)
        except ProtocolError as exc:
            self._drop(f"an unverifiable REFUSE ({exc})")
            return
        named = h.get("nonce")
        digest = isinstance(named, str) and named.startswith(DIGEST_PREFIX)
        if named not in (None, nonce) and not digest:
            self._drop("a REFUSE for another HELLO (nonce differs)")
            return
        # A REFUSE without our nonce may be a recording of an old one, and one naming a digest
        # refuses bytes the coordinator could not verify (ours only if the digest is of exactly
        # what we sent): unless it names our verified HELLO, it can never end this node for good,
        # only make it back off and try again (as `busy` does).
        bound = named == nonce or (digest and named in hs.sent_digests)
        fp = fingerprint(key)
        # Like a WELCOME, a REFUSE counts only from the coordinator we would trust: a stranger
        # must not be able to make this node give up (spec 6, on REFUSE).
        expected = (
            (fingerprint(hs.coordinator_key) if hs.coordinator_key else None) or self.pinned or self._remembered()
        )
        if expected is not None and expected != fp:
            self._drop(f"a REFUSE signed by {fp}, not the expected coordinator {expected}")
            return
        code, text = h["code"], printable(h["text"], 300)
        shown_code = printable(code, 40)
        with self.state.lock:
            self.state.coordinator_fingerprint = fp
        if not bound:
            self._set(connection="refused", reason=f"refused: {shown_code}")
            self._say(
                f"coordinator {self.connect} refused this node without naming our HELLO "
                f"({shown_code}): {text}; trying again later"
            )
            raise _SessionEnd(None)
        if code in FINAL_REFUSALS:
            raise self._final(
                EXIT_REFUSED,
                "refused",
                f"refused: {shown_code}",
                f"coordinator {self.connect} refused this node ({shown_code}): {text}",
            )
        if code == "run-finished" and self.exit_on_finish:
            self._say(f"coordinator {self.connect}: the run has finished ({text})")
            raise _SessionEnd(EXIT_OK)
        self._set(connection="refused", reason=f"refused: {shown_code}")
        self._say(f"coordinator {self.connect} refused this node for now ({shown_code}): {text}")
        raise _SessionEnd(None)

    def _remembered(self) -> str | None:
        try:
            return self.trust.remembered(self.connect)
        except KeyStoreError as exc:  # an unusable trust file stops the node, as for a WELCOME
            raise self._fatal(EXIT_TRUST, "refused", "refused: trust store unusable", str(exc)) from None

    # --- the session loop ---------------------------------------------------------------

    def _serve(self, s: _Session) -> None:
        """Receive, compute, answer and keep the heartbeat until the session ends."""
        while True:
            if self.control.stop_requested:
                self._say_bye(s)
                raise _SessionEnd(EXIT_OK, welcomed=True)
            self._apply_controls(s)
            # What arrived while we computed (heartbeats above all) counts before we judge
            # silence: else a long batch would end the session and lose its queued RESULT.
            self._drain(s)
            now = time.monotonic()
            if now - s.last_received > LOST_AFTER_HEARTBEATS * s.heartbeat_ms / 1000:
                self._say(f"lost connection to {self.connect}: nothing for {now - s.last_received:.1f} s")
                raise _SessionEnd(None, welcomed=True)
            if now - s.last_sent >= s.heartbeat_ms / 1000:
                self._heartbeat(s)
            self._tick(now)
            resting = now < self._rest_until  # --max-cpu: heartbeats go on, the next batch waits
            until_hb = s.last_sent + s.heartbeat_ms / 1000 - now
            if s.pending and not resting:
                timeout = 0  # work in hand: just pick up whatever else has arrived
            else:
                timeout = int(
                    max(
                        1,
                        min(POLL_MS, until_hb * 1000 + 1, (self._rest_until - now) * 1000 + 1 if resting else POLL_MS),
                    )
                )
            if s.socket.poll(timeout, zmq.POLLIN):
                self._drain(s)
            if s.pending and time.monotonic() >= self._rest_until:
                self._process(s, *s.pending.popleft())

    def _drain(self, s: _Session) -> None:
        """Move everything that has arrived into `pending`, acting at once on non-batches.

        Only sealed messages that authenticate under this session's key are looked at; a BATCH
        beyond the credit this node granted, or beyond its queue's byte budget, is refused at
        once (REJECT `over-credit` / `too-large`) and never queued."""
        while True:
            try:
                frames = self._recv(s.socket)
            except zmq.Again:
                return
            received = time.monotonic()
            nbytes = sum(len(f) for f in frames)
            try:
                msg = s.channel.open(frames, limits=self.limits)
            except ProtocolError as exc:
                self._drop(f"an invalid message ({exc})")
                continue
            # Stamped once it has authenticated: opening a large message takes time, and that
            # time must not count as the coordinator's silence.
            received = s.last_received = time.monotonic()
            if msg.command in ("BATCH", "STATIC"):
                if msg.command == "BATCH":
                    held = sum(1 for _, m, _ in s.pending if isinstance(m, Message) and m.command == "BATCH")
                    if held >= s.credit:
                        self._reject(
                            s,
                            msg.header,
                            "over-credit",
                            f"this node granted credit {s.credit} and "
                            f"already holds {held} batches; the BATCH was not queued",
                        )
                        continue
                if s.pending_bytes + s.static_bytes + nbytes > self.max_memory:
                    self._reject(
                        s,
                        msg.header,
                        "too-large",
                        f"queueing {nbytes} more bytes beside "
                        f"{s.static_bytes} bytes of statics and {s.pending_bytes} queued would exceed "
                        f"this node's --max-memory {self.max_memory}",
                        msg.command,
                    )
                    continue
                s.pending.append((received, msg, nbytes))
                s.pending_bytes += nbytes
                continue
            if msg.command == "HEARTBEAT":
                self._coordinator_heartbeat(s, msg)
            elif msg.command == "BYE":
                self._coordinator_bye(s, msg)
            else:
                self._drop(f"an unexpected {msg.command}")

    def _coordinator_heartbeat(self, s: _Session, msg: Message) -> None:
        waiting = msg.header.get("waiting")  # optional: why the coordinator sends us nothing
        waiting = printable(waiting, 200) if isinstance(waiting, str) else ""
        if waiting != self._coordinator_waiting:
            self._coordinator_waiting = waiting
            now = time.monotonic()
            # Logged when it changes, at most once per WAITING_LOG_S: a coordinator that changes it
            # on every beat must not fill the volunteer's log (the console shows the latest).
            if waiting and now - self._waiting_logged_at >= WAITING_LOG_S:
                self._waiting_logged_at = now
                self._say(f"coordinator: {waiting}")
            with self.state.lock:
                if self.state.connection in ("connected", "idle"):
                    self.state.reason = self._idle_reason()
        held = len(s.pending)
        believed = msg.header["outstanding"]
        if believed > held and not self._lost_batch_logged and held == 0:
            # Batches we answered may still be in flight, so only a persistent gap is telling;
            # log it once per session rather than on every heartbeat.
            self._lost_batch_logged = True
            self._say(f"coordinator believes this node holds {believed} batch(es), it holds {held}")

    def _coordinator_bye(self, s: _Session, msg: Message) -> None:
        reason = printable(msg.header["reason"], 80)
        if reason in FINAL_BYES:
            raise self._final(
                EXIT_REFUSED,
                "refused",
                f"refused: {reason}",
                f"coordinator {self.connect} ended this node's session ({reason})",
            )
        if reason == "run-finished" and self.exit_on_finish:
            self._say(f"coordinator {self.connect}: the run has finished")
            raise _SessionEnd(EXIT_OK, welcomed=True)
        self._say(f"coordinator {self.connect} said BYE ({reason})")
        raise _SessionEnd(None, welcomed=True)

    def _say_bye(self, s: _Session) -> None:
        """BYE `shutdown`, allowed up to BYE_LINGER_MS to leave when the socket closes."""
        self._set(connection="stopped", reason="saying BYE", current_op="")
        self._say(f"stopping: BYE to {self.connect}")
        s.socket.setsockopt(zmq.LINGER, BYE_LINGER_MS)
        try:
            self._send(s, "BYE", {"node_id": s.node_id, "reason": "shutdown"})
        except zmq.ZMQError as exc:
            self._say(f"could not send BYE: {exc}")

    def _pause_reason(self) -> str | None:
        """Why this node asks for no work: its volunteer paused it, or --hours; None: it wants work."""
        if self.control.paused:
            return "paused by the volunteer (p resumes)"
        return self.policy.outside_hours()

    def _idle_reason(self) -> str:
        paused = self._pause_reason()
        if paused:
            return paused
        return f"waiting for work: {self._coordinator_waiting}" if self._coordinator_waiting else "waiting for work"

    def _heartbeat(self, s: _Session) -> None:
        credit = 0 if self._pause_reason() else s.credit
        self._send(s, "HEARTBEAT", {"node_id": s.node_id, "credit": credit, "outstanding": len(s.pending)})
        s.last_sent = time.monotonic()
        s.wanted_credit = credit

    def _apply_controls(self, s: _Session) -> None:
        """Pause/resume and thread changes from the presenter, applied between batches."""
        why = self._pause_reason()
        paused = why is not None
        if paused != self.state.paused:
            self._set(paused=paused, reason=self._idle_reason())
            self._say(f"paused ({why}): asking for no more batches" if paused else "resumed")
        if (0 if paused else s.credit) != s.wanted_credit:
            self._heartbeat(s)  # tell the coordinator now, not at the next heartbeat
        wanted = max(1, int(self.control.threads))
        if wanted != self._applied_threads:
            try:
                if not self._blas.available:
                    raise BlasThreadsUnavailable("no OpenBLAS thread setter was found")
                self._blas.use(wanted)
                actual = get_blas_threads()
                self._blas.limit = actual  # the most a large product uses; small ones keep one
                self._say(f"BLAS threads: {actual}")
            except (BlasThreadsUnavailable, OSError, AttributeError) as exc:
                actual = wanted
                if not self._blas_warned:
                    self._blas_warned = True
                    self._say(f"cannot change BLAS threads while running ({exc}); restart with --threads {wanted}")
            self._applied_threads = wanted
            self._set(threads=actual)

    def _tick(self, now: float) -> None:
        """Idle detection, the recent rate, and a rate line every RATE_LINE_S while working."""
        while self._done_times and now - self._done_times[0] > 5.0:
            self._done_times.popleft()
        rate = len(self._done_times) / 5.0
        with self.state.lock:
            self.state.rate = rate
            going_idle = self.state.connection == "working" and now - self._last_batch_at > IDLE_AFTER_S
            if going_idle:
                self.state.connection = "idle"
                self.state.reason = self._idle_reason()
                self.state.current_op = ""
        if going_idle:
            self._say("waiting for work")
        w = self._window
        elapsed = now - w["t"]
        if elapsed >= RATE_LINE_S:
            if w["batches"]:
                self._say(
                    f"{w['batches'] / elapsed:.1f} batches/s, in {w['in'] / elapsed / 1e6:.2f} MB/s, "
                    f"out {w['out'] / elapsed / 1e6:.2f} MB/s"
                )
            self._window = {"t": now, "batches": 0, "in": 0, "out": 0}

    # --- batches and statics ------------------------------------------------------------

    def _reject(self, s: _Session, header: dict | None, code: str, text: str, command: str = "BATCH") -> None:
        header = header or {}
        batch_id = _json_id(header.get("batch_id"), "str") if command == "BATCH" else None
        seq = _json_id(header.get("seq"), "uint")
        self._send(
            s,
            "REJECT",
            {
                "run_id": _json_id(header.get("run_id"), "str"),
                "batch_id": batch_id,
                "seq": seq,
                "code": code,
                "text": text[:500],
            },
        )
        s.last_sent = time.monotonic()
        with self.state.lock:
            self.state.refusals += 1
        label = f"batch {batch_id}" if batch_id is not None else f"{command} seq {seq}"
        self._say(f"refused {label}: {code} ({text[:200]})")

    def _process(self, s: _Session, received: float, msg: Message, nbytes: int) -> None:
        """Check and answer one BATCH or STATIC in the order of spec section 7 (it authenticated
        under the session key already: only this session's coordinator could have sealed it)."""
        s.pending_bytes -= nbytes
        h = msg.header
        if h["run_id"] != s.run_id:
            self._reject(
                s, h, "foreign-run", f"run_id {h['run_id']!r:.80} is not this session's run {s.run_id!r}", msg.command
            )
            return
        last_seq = self._last_seq.get(s.run_id, -1)
        if h["seq"] <= last_seq:
            self._reject(
                s,
                h,
                "replayed",
                f"seq {h['seq']} is not above the last accepted seq {last_seq} of run {s.run_id!r}",
                msg.command,
            )
            return
        self._accept_seq(s.run_id, h["seq"])
        self._note_exposure(h.get("exposure"))
        if self.recorder is not None:
            self.recorder.record(msg)
        if msg.command == "STATIC":
            self._store_static(s, msg)
        else:
            self._compute(s, msg, received)

    def _accept_seq(self, run_id: str, seq: int) -> None:
        """Remember `seq` as run_id's last accepted one, keeping only the newest runs."""
        self._last_seq.pop(run_id, None)
        self._last_seq[run_id] = seq  # re-inserted: the dict's order is most recently used last
        while len(self._last_seq) > MAX_RUNS_REMEMBERED:
            self._last_seq.pop(next(iter(self._last_seq)))

    def _note_exposure(self, exposure) -> None:
        """Keep, per tensor, the largest share the coordinator announced (informational)."""
        if not isinstance(exposure, dict):
            return
        with self.state.lock:
            for tensor, share in exposure.items():
                if tensor not in self.state.exposure and (
                    len(self.state.exposure) >= MAX_EXPOSURE_TENSORS or not isinstance(tensor, str) or len(tensor) > 64
                ):
                    continue  # a bounded table: a run has a few dozen tensors, not thousands
                if (
                    isinstance(tensor, str)
                    and isinstance(share, (int, float))
                    and not isinstance(share, bool)
                    and math.isfinite(share)
                ):
                    share = min(1.0, max(0.0, float(share)))
                    if share > self.state.exposure.get(tensor, 0.0):
                        self.state.exposure[tensor] = share

    def _store_static(self, s: _Session, msg: Message) -> None:
        name = msg.header["name"]
        (array,) = msg.arrays.values()
        old = s.states.get(name) or s.statics.get(name)  # one name, one entry: a state or a static
        total = s.static_bytes - (old.nbytes if old is not None else 0) + array.nbytes
        if total > self.max_static_bytes or total + s.pending_bytes > self.max_memory:
            self._reject(
                s,
                msg.header,
                "too-large",
                f"static {name!r} ({array.nbytes} bytes) would make "
                f"{total} bytes of statics beside {s.pending_bytes} queued; this node holds at most "
                f"{min(self.max_static_bytes, self.max_memory)} (--max-memory)",
                "STATIC",
            )
            return
        version = msg.header.get("version")
        if version is not None:  # resident weights: kept writable, updated by the batches
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                self._reject(
                    s,
                    msg.header,
                    "bad-params",
                    f"static {name!r}: version must be a count, got {version!r:.40}",
                    "STATIC",
                )
                return
            try:
                state = ResidentState(array, version)
            except BatchError as exc:
                self._reject(s, msg.header, "bad-params", exc.detail, "STATIC")
                return
            total += state.nbytes - array.nbytes
            if total > self.max_static_bytes:
                self._reject(
                    s,
                    msg.header,
                    "too-large",
                    f"state {name!r} would make {total} bytes of statics; "
                    f"this node keeps at most {self.max_static_bytes}",
                    "STATIC",
                )
                return
            s.statics.pop(name, None)
            s.states[name] = state
            s.static_bytes = total
            self._say(f"stored resident state {name} {list(array.shape)} at version {version}")
            return
        s.states.pop(name, None)
        s.statics[name] = aligned(array)  # read-only, kept for the session
        s.static_bytes = total
        self._say(f"stored static {name} {array.dtype}{list(array.shape)}")

    def _compute(self, s: _Session, msg: Message, received: float) -> None:
        h = msg.header
        op, params = h["op"], h["params"]
        waited = time.monotonic() - received
        if waited * 1000 > h["lease_ms"]:
            self._reject(s, h, "expired", f"waited {waited:.1f} s, beyond its lease of {h['lease_ms']} ms")
            return
        held = ChainMap(s.statics, s.states)  # what the batch may name: statics and states
        need = vocabulary.memory(op, params, msg.arrays, held)
        if need > self.max_memory:
            self._reject(
                s,
                h,
                "too-large",
                f"this batch's result would take {need} bytes; this node's --max-memory is {self.max_memory}",
            )
            return
        label = vocabulary.describe(op, params, msg.arrays, held)
        self._last_batch_at = time.monotonic()
        self._set(connection="working", reason="", current_op=label)
        start = time.perf_counter()
        try:
            # `result` is a view on the session's reused buffer: it is sealed (encrypted into a new
            # frame) below, before the next batch can overwrite it.
            after: list = []  # a resident backward's own update: applied once the result is sent
            result = compute_batch(op, params, msg.arrays, s.statics, s.workspace, s.states, after)
        except BatchError as exc:
            self._reject(s, h, BATCH_ERROR_CODES.get(exc.code, "bad-params"), exc.detail)
            return
        except (ValueError, TypeError, KeyError, IndexError) as exc:  # params of the wrong kind
            self._reject(s, h, "bad-params", f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - spec 15: one bad batch never ends the loop
            self._reject(s, h, "compute-error", f"{type(exc).__name__}: {exc}")
            return
        seconds = time.perf_counter() - start
        try:
            frames = s.channel.seal(
                "RESULT",
                {"run_id": s.run_id, "batch_id": h["batch_id"], "seq": h["seq"], "compute_seconds": seconds},
                {"c": result},
            )
        except ProtocolError as exc:  # e.g. a result dtype the wire does not carry
            self._reject(s, h, "compute-error", f"result cannot be sent: {exc.detail}")
            return
        done = time.monotonic()
        self._done_times.append(done)
        self._window["batches"] += 1
        self._last_batch_at = done
        with self.state.lock:  # counted before it leaves, so a presenter never lags the wire
            self.state.batches_done += 1
        self._send_frames(s.socket, frames)
        s.last_sent = time.monotonic()
        for step in after:  # before the next message is read: every batch sees the state stepped
            step()
        self._rest_until = s.last_sent + self.policy.rest_after(seconds)
