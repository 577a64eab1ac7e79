"""The coordinator's side of ENS2 (docs/protocol.md): the one place that owns the ROUTER socket.

`CoordinatorServer` is single-threaded by design: whichever thread drives training calls
`run(batches)` (the Executor interface of `DistributedCompute`) and `pump()`; both poll the
socket, so sessions, heartbeats, leases and re-issues are serviced while a step waits for
results and while training is paused. Nothing else touches the socket.

Shards and sessions: a run has k shards (node slots, fixed partitions of pixels and hidden
units). Each shard has one owner session. A session that ends (BYE, silence, a new HELLO with
the same key) loses its shards at once to the least-loaded live session, which first receives
the shard's static operands, and its outstanding batches are re-issued; new sessions take over
shards only at a step boundary, so membership changes never split a step. Which node gets which
shard or batch, under the exposure bound, is decided by `scheduling.Scheduler`; who may join by
`admission.decide`; whether a result holds by `checker.ResultChecker`; how a node's state and
its reason for waiting read by `presence`. This module carries the decisions out over the socket.

What it serves is handed to it at construction: the compute makes it (`CoordinatorServer.factory`
as its executor factory) and gives it a `SlotPlan`, on a `Listener` bound beforehand, with a
`ServerConfig` (leases, heartbeats, checks, quarantine, logging) that nothing changes afterwards.
"""

from __future__ import annotations

import os
import secrets
import time

try:
    import resource
except ImportError:  # not on every platform
    resource = None  # type: ignore[assignment]
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import zmq

from enshuffle import batch as vocabulary
from enshuffle.coordinator import presence
from enshuffle.coordinator.admission import Admit, decide
from enshuffle.coordinator.checker import ResultChecker
from enshuffle.coordinator.distributed import Batch
from enshuffle.coordinator.ledger import ExposureLedger
from enshuffle.coordinator.presence import NodeState, WaitReason
from enshuffle.coordinator.reputation import QUARANTINE_AFTER, Reputation
from enshuffle.coordinator.scheduling import Scheduler
from enshuffle.coordinator.state import CoordinatorControl, CoordinatorState, NodeRow
from enshuffle.protocol.handshake import Pending, check_hello, frame_digest, make_challenge
from enshuffle.protocol.keys import Identity, fingerprint, short_fingerprint
from enshuffle.protocol.text import printable
from enshuffle.protocol.messages import (
    COUNTER_BYTES,
    PREFIX_BYTES,
    PROTOCOL_VERSION,
    TAG_BYTES,
    Channel,
    Limits,
    ProtocolError,
    decode,
    encode,
    inner_parts,
)

LEASE_MIN_MS = 2000
LEASE_MULTIPLE = 4.0
LEASE_INITIAL_MS = 30000


@dataclass(frozen=True)
class LeasePolicy:
    """How long a node may hold a batch: `initial_ms` until five results have been timed, then
    `multiple` x the node's p90 seconds per unit of work x the batch's work, at least `min_ms`.
    WELCOME sends exactly these values."""

    min_ms: int = LEASE_MIN_MS
    multiple: float = LEASE_MULTIPLE
    initial_ms: int = LEASE_INITIAL_MS

    def seconds(self, seconds_per_work, work: float) -> float:
        if len(seconds_per_work) < 5:
            return self.initial_ms / 1000
        p90 = sorted(seconds_per_work)[int(0.9 * (len(seconds_per_work) - 1))]
        return max(self.min_ms / 1000, self.multiple * p90 * work)

    def header(self) -> dict:
        return {"min_ms": self.min_ms, "multiple": self.multiple, "initial_ms": self.initial_ms}


DEFAULT_LEASE = LeasePolicy()
MAX_RESYNCS = 5  # resident-state resyncs a session gets before its rejections count
MAX_PROTOCOL_ERRORS = 50  # malformed/unverifiable messages before a node is evicted (protocol.md section 15)
WARN_BURST, WARN_WINDOW = 10, 10.0  # per peer: log lines, seconds
# A batch rejected by this many distinct node keys aborts the run: the batch itself is at fault.
# One key rejecting again and again never aborts it (it gets quarantined: reputation.REJECTS_AFTER);
# lies, departures and leases never count.
MAX_ATTEMPTS = 3
MAX_SESSIONS = 1024  # live + joining sessions; more get REFUSE `busy`
MAX_PENDING = 1024  # CHALLENGEs awaiting a HELLO (oldest dropped first)
HANDSHAKE_TIMEOUT = 10.0  # seconds from CHALLENGE to the first sealed message
REFUSE_INTERVAL = 10.0  # at most one REFUSE per routing id per this many seconds ...
HANDSHAKE_REPLIES_PER_S = 200  # ... and at most this many CHALLENGE/REFUSE replies per second in all,
ADDRESS_REPLIES_PER_S = HANDSHAKE_REPLIES_PER_S // 2  # ... and at most this many per peer address
MAX_ADDRESSES = 4096  # peer addresses whose reply budget is kept (oldest forgotten first)
MAX_CHALLENGED = 4 * 1024  # connections (routing ids) remembered as having had their one CHALLENGE
ZERO_COPY_BYTES = 64 * 1024
_SEND_MORE, _SEND_LAST = int(zmq.SNDMORE | zmq.NOBLOCK), int(zmq.NOBLOCK)  # a sealed send's two parts
RECEIVE_HWM = 8  # messages queued per connection before libzmq stops reading it (credit 2 + a few)
SWEEP_S = 0.05  # the longest pump() goes without visiting every session (leases, silence, heartbeats)
# A coordinator receives RESULTs (a block of at most samples x hidden units) and small messages: it
# has no use for 1 GiB messages, so libzmq drops bigger frames before buffering them.
COORDINATOR_LIMITS = Limits(max_message_bytes=256 << 20)
# A sealed frame around a RESULT: envelope, counter, tag, command byte and name, header length.
SEALED_OVERHEAD = PREFIX_BYTES + COUNTER_BYTES + TAG_BYTES + 1 + len("RESULT") + 4


# What a node may send in its session, and the method that handles each.
_SESSION_HANDLERS = {"RESULT": "_on_result", "REJECT": "_on_reject", "HEARTBEAT": "_on_heartbeat", "BYE": "_on_bye"}

HANDSHAKE_IVL_MS = 5000  # libzmq closes a connection whose ZMTP greeting is not done by then


def raise_open_file_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit on open files to its hard limit: each connection is a file
    descriptor, and idle connections must not leave none for the chain's files. (soft, hard) after,
    or None where the platform has no such limit."""
    if resource is None:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ValueError, OSError):
        return None


class StepAbandoned(RuntimeError):
    """A stop was requested mid-step with no node left to finish it; the step is dropped."""


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. every node rejects the same batch); the message says why."""


_U128 = (1 << 128) - 1


def reseed(rng) -> bool:
    """Give a NumPy PCG64 Generator a fresh state from 256 bits of os.urandom, in place (what has
    been drawn stays drawn): its 128-bit state and its 128-bit increment (odd, as PCG64's must be)
    are drawn directly, with no seed derivation between (a SeedSequence would spread the same
    256 bits over the same two numbers, at five times the cost per batch). Called between batches
    on the generator of the per-batch disguise secrets: recovering one batch's PCG64 state (it is
    not a cryptographic generator) then predicts no other batch's secrets (docs/design.md, "Where
    the secrets come from"). False if `rng` is not a PCG64 Generator (a test's own generator is
    left alone)."""
    if not isinstance(rng, np.random.Generator) or not isinstance(rng.bit_generator, np.random.PCG64):
        return False
    fresh = int.from_bytes(os.urandom(32), "big")
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": fresh >> 128, "inc": (fresh & _U128) | 1},
        "has_uint32": 0,
        "uinteger": 0,
    }
    return True


def _gone(exc: zmq.ZMQError) -> str:
    """Why a send to a node failed, in words: EHOSTUNREACH from a ROUTER means the peer's
    connection is gone (its process ended or was killed, or the network dropped), not routing."""
    if exc.errno == zmq.EHOSTUNREACH:
        return "the node's process ended or its network dropped"
    return exc.strerror


@dataclass
class Task:
    batch: Batch
    batch_id: str
    work: float
    shape: tuple[int, int]
    dtype: np.dtype  # with `shape`, what its RESULT's array c must be
    result: np.ndarray | None = None
    session: str | None = None  # node_id holding the live lease
    seq: int = -1
    sent_at: float = 0.0
    deadline: float = 0.0
    attempts: int = 0  # distinct node keys that rejected it
    rejected_by: set = field(default_factory=set)
    # node_id -> seq of the copy that node was sent: a re-issue gives the batch a new seq, and the
    # first holder's late answer must still match its own copy (to free its slot, counted `expired`).
    seq_by_node: dict[str, int] = field(default_factory=dict)
    result_bytes: int = 0  # what its RESULT's array takes: a bigger sealed frame is not opened


@dataclass
class Session:
    routing_id: bytes
    node_id: str
    key: bytes
    fingerprint: str
    name: str
    label: str  # how the ledger and the operator know this node across reconnects
    credit: int
    want: int
    channel: Channel  # sealing and opening under the session key
    address: str = ""
    admitted: str = ""  # how admission let it in: open, local, allow-list, invited, invite code
    joined: bool = False  # the node's first sealed message arrived: it accepted our key
    joining_since: float = field(default_factory=time.monotonic)
    heartbeat_inner: tuple | None = None  # ((credit, outstanding), encoded HEARTBEAT) last sent
    outstanding: dict[str, Task] = field(default_factory=dict)
    stale: dict[str, float] = field(default_factory=dict)  # batch_id -> when to call the node stuck
    queue: deque = field(default_factory=deque)
    shards_held: set[int] = field(default_factory=set)  # static operands this session has received
    state_versions: dict[str, int] = field(default_factory=dict)  # resident state name -> its version here
    resyncs: int = 0  # state-behind/ahead rejections answered with the checkpoint again
    statics_held: set[str] = field(default_factory=set)  # by name: only those a batch sent to it used
    last_seen: float = field(default_factory=time.monotonic)
    last_sent: float = field(default_factory=time.monotonic)
    seconds_per_work: deque = field(default_factory=lambda: deque(maxlen=20))
    done: int = 0
    protocol_errors: int = 0
    rate_window: deque = field(default_factory=lambda: deque(maxlen=64))
    lease: LeasePolicy = DEFAULT_LEASE
    max_message: int = 0  # the largest frame the node says it takes (HELLO capabilities); 0: not said
    group: str | None = None  # keys that count as one party for the exposure bound (one invite code)

    def window(self) -> int:
        return min(self.credit, self.want)

    def lease_seconds(self, work: float) -> float:
        return self.lease.seconds(self.seconds_per_work, work)


KEEPALIVE_S = 0.1  # keepalive() services the socket at most this often between the coordinator's own work


@dataclass(frozen=True)
class ServerConfig:
    """How a coordinator serves, fixed for its run and given at construction: its leases (the
    policy WELCOME sends), heartbeats and credit, what a message may be, how many nodes it takes,
    the exposure bound, how results are checked, when a key is quarantined, its reply budget per
    peer address, and where its log lines go (besides the state's log)."""

    lease: LeasePolicy = DEFAULT_LEASE
    heartbeat_ms: int = 1000
    max_credit: int = 2
    limits: Limits = COORDINATOR_LIMITS  # what a node's message may be (docs/protocol.md section 14)
    max_sessions: int = MAX_SESSIONS
    max_exposure: float | None = None  # --max-exposure: raises the bound above one slot's block
    verify_results: bool = True  # Freivalds' test on every result (docs/design.md, "Checking results")
    replicate: bool = False  # also compute results of untrusted keys here and compare (--replicate)
    quarantine_after: int = QUARANTINE_AFTER  # wrong results before a key is quarantined
    address_replies_per_s: float = float(ADDRESS_REPLIES_PER_S)  # CHALLENGEs a second per peer address
    log: Callable[[str], None] | None = None  # each log line, after the state's log; None: only there


@dataclass(frozen=True)
class SlotPlan:
    """What the server needs of the compute it serves, handed to it at construction: the number
    of slots, what serving one exposes, each slot's static operands (and their STATIC fields),
    how a resident batch is fitted to what a node holds and checked, and the generator of the
    per-batch disguise secrets (reseeded between batches). The compute holds the server as its
    executor; the server holds only these."""

    slots: int
    slot_exposure: Callable[[int], list]
    static_arrays: Callable[[int], dict[str, np.ndarray]]
    static_exposure: Callable[[int], list]
    static_fields: Callable[[int, str], dict] = lambda shard, name: {}
    fit_batch: Callable[[Batch, int | None], Batch] = lambda batch, held: batch
    replay_from: Callable[[Batch], int] = lambda batch: 0
    check_resident: Callable[[Batch, np.ndarray], str | None] = lambda batch, c: (
        "a resident result cannot be checked without a resident disguise"
    )
    disguise_rng: object = None

    @classmethod
    def of(cls, compute) -> "SlotPlan":
        """The plan of a `DistributedCompute` (or anything with its slot methods)."""
        return cls(
            slots=compute.k,
            slot_exposure=compute.slot_exposure,
            static_arrays=compute.static_arrays,
            static_exposure=compute.static_exposure,
            static_fields=getattr(compute, "static_fields", lambda shard, name: {}),
            fit_batch=compute.fit_batch,
            replay_from=compute.replay_from,
            check_resident=compute.check_resident,
            disguise_rng=getattr(compute, "rng", None),
        )


class Listener:
    """The coordinator's ROUTER socket, bound: made before the run so a coordinator that cannot
    listen stops before anything else is set up, and handed to `CoordinatorServer`."""

    def __init__(self, bind: str, config: ServerConfig | None = None, context: zmq.Context | None = None):
        config = config or ServerConfig()
        raise_open_file_limit()
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.IPV6, 1)  # tcp://[::]:PORT and IPv6 peers; IPv4 still works
        self.sock.setsockopt(zmq.LINGER, 0)
        # A TCP connection that never completes its ZMTP greeting (a plain connect that says
        # nothing) is closed by libzmq after this long instead of 30 s: idle connects cannot pile up.
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.limits.max_message_bytes)
        # At most RCVHWM messages wait per connection (then libzmq stops reading that peer's TCP
        # stream): an honest node has at most credit + a few in flight; a flooding stranger's
        # backlog stays small instead of the default 1,000 messages. With MAXMSGSIZE this bounds
        # what one connection can make libzmq hold: RCVHWM x MAXMSGSIZE, authenticated or not
        # (except an unfinished multi-part message: docs/protocol.md section 16).
        self.sock.setsockopt(zmq.RCVHWM, max(RECEIVE_HWM, 2 * config.max_credit + 4))
        # No libzmq (ZMTP) heartbeats: with them, a peer that floods a connection until libzmq
        # stops reading it makes libzmq abort the whole process (`Assertion failed: !_io_error`,
        # stream_engine_base.cpp; libzmq issues 3937, 4364, 4767), as scripts/fuzz_load.py did.
        # Loss is detected by ENS2's own HEARTBEATs (docs/protocol.md section 8).
        try:
            self.sock.bind(bind)
        except zmq.ZMQError as exc:
            self.sock.close(0)
            raise OSError(f"cannot listen on {bind}: {exc.strerror}; choose another --bind address or port") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.config = config  # what the socket was set up for (message size, credit)

    def close(self) -> None:
        self.sock.close(0)


class CoordinatorServer:
    """ROUTER socket, sessions, leases, statics and the Executor interface for DistributedCompute.

    Made by the compute it serves, which hands it its `SlotPlan` (`executor_factory`), on a
    `Listener` (or an address to bind), with its `ServerConfig`."""

    def __init__(
        self,
        listener: Listener | str,
        identity: Identity,
        state: CoordinatorState,
        ledger: ExposureLedger,
        plan: SlotPlan,
        *,
        config: ServerConfig | None = None,
        control: CoordinatorControl | None = None,
        context: zmq.Context | None = None,
        admission=None,
    ):
        config = config or ServerConfig()
        if isinstance(listener, str):
            listener = Listener(listener, config, context)
        elif listener.config.limits != config.limits or listener.config.max_credit != config.max_credit:
            raise ValueError("the listener was set up for other limits or credit than the server's config")
        self.config = config
        self.identity = identity
        self.lease = config.lease  # sent in WELCOME; what every session's leases follow
        self.admission = admission  # enshuffle.coordinator.admission.Admission; None admits everyone
        self.max_sessions = config.max_sessions
        self.limits = config.limits  # what a node's message may be (docs/protocol.md section 14)
        self.state = state
        self.ledger = ledger
        self.control = control or CoordinatorControl()
        self.heartbeat_ms = config.heartbeat_ms
        self.max_credit = config.max_credit
        self._log = config.log or (lambda line: None)
        self.run_id = secrets.token_hex(8)
        self.listener = listener
        self.ctx = listener.ctx
        self.sock = listener.sock
        self.endpoint = listener.endpoint
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.sessions: dict[str, Session] = {}  # node_id -> live session
        self.by_routing: dict[bytes, str] = {}
        self.labels: dict[bytes, str] = {}  # node key -> ledger label (stable across reconnects)
        self._label_set: set[str] = set()
        self.joining: dict[bytes, Session] = {}  # routing id -> WELCOMEd, no sealed message yet
        self.pending: OrderedDict[bytes, Pending] = OrderedDict()  # routing id -> CHALLENGE sent
        self._refused_at: OrderedDict[bytes, float] = OrderedDict()  # routing id -> last REFUSE
        self._reply_budget = (time.monotonic(), float(HANDSHAKE_REPLIES_PER_S))
        self.address_replies_per_s = config.address_replies_per_s
        self._address_budget: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (when, tokens)
        self._challenged: OrderedDict[bytes, None] = OrderedDict()  # one CHALLENGE per connection
        self.crypto_seconds = 0.0  # handshakes + sealing/opening: what `enshuffle bench` reports
        self._dirty = True  # something changed that the next pump() must act on at once
        self._swept_at = 0.0
        self.plan = plan  # what the compute this server serves hands it
        self._statics: dict[int, dict[str, np.ndarray]] = {}
        self._seq = 0
        self._node_counter = 0
        self._batch_counter = 0
        self._tasks: dict[str, Task] = {}
        self.step = 0
        self.finished = False
        self.counters = {
            "dropped": 0,
            "expired": 0,
            "rejected": 0,
            "reissued": 0,
            "bad_signature": 0,
            "wrong": 0,
            "refused": 0,
            "declined": 0,
            "handshakes": 0,
            "challenges": 0,
            "quarantined": 0,
            "oversize": 0,
            "reseeded": 0,
        }
        self.bytes_sent = 0
        self.bytes_received = 0
        self._waiting_logged = False
        self._status_before_wait: str | None = None  # the status "waiting for nodes" replaced mid-run
        self._min_nodes_wanted = 0  # wait_for_nodes(count): until then a node waits for the others
        # (starting: bool) -> why no node will ever come (e.g. every local node process exited), or
        # None: given to wait_for_nodes, and asked again while a step waits with no node
        self._give_up: Callable[[bool], str | None] | None = None
        self.wait_problem: str | None = None
        self._published_at = 0.0
        self._warnings: dict[str, tuple[float, int, int]] = {}
        self.banned: set[bytes] = set()
        # per node key: accepted, refused and why, quarantine
        self.reputation = Reputation(quarantine_after=config.quarantine_after)
        self.checker = ResultChecker(
            self.static_arrays,
            plan.check_resident,
            verify=config.verify_results,
            replicate=config.replicate,
            needs_replica=self.reputation.needs_replica,
        )
        self._pumped_at = 0.0  # when pump() last polled the socket (keepalive)
        # Shard ownership and the exposure bound (docs/design.md, "Privacy"): per bounded kind, the
        # share a node may ever hold; by default one slot's block. A slot never moves to a node it
        # would push over.
        # The same ledger per group of keys (the keys one invite code admitted): the bound holds per
        # group too. Kept here only for the bound; the operator's ledger stays per node key.
        self.group_ledger = ExposureLedger(ledger.axes)
        self.scheduler = Scheduler(
            ledger,
            self.sessions,
            max_exposure=config.max_exposure,
            log=self.log,
            changed=self._mark_dirty,
            group_ledger=self.group_ledger,
        )
        self.scheduler.attach(plan.slots, plan.slot_exposure)
        with self.state.lock:
            self.state.exposure_bound = self.bound["images"]
            self.state.bound_raised = self.bound_raised

    @classmethod
    def factory(
        cls, listener: Listener | str, identity: Identity, state: CoordinatorState, ledger: ExposureLedger, **options
    ) -> Callable[[object], "CoordinatorServer"]:
        """An `executor_factory` for `DistributedCompute`: the server it makes is handed the
        compute's `SlotPlan` (`options`: the constructor's keywords)."""
        return lambda compute: cls(listener, identity, state, ledger, SlotPlan.of(compute), **options)

    def _mark_dirty(self) -> None:
        self._dirty = True

    @property
    def owner(self) -> list[str | None]:
        """owner[shard]: the node id serving each shard, or None (read-only view for reports)."""
        return self.scheduler.owner

    @property
    def bound(self) -> dict[str, float]:
        return self.scheduler.bound

    @property
    def bound_raised(self) -> bool:
        return self.scheduler.bound_raised

    @property
    def check_seconds(self) -> float:
        """This thread's CPU in result checks (what `enshuffle bench` reports)."""
        return self.checker.seconds

    # -- plumbing ---------------------------------------------------------------------
    def log(self, line: str) -> None:
        line = printable(line, 4000)  # one line, whatever a peer put in it (names, texts, reasons)
        self.state.add_log(line)
        self._log(line)

    def eligible(self, session: "Session", shard: int) -> bool:
        """May `session` serve `shard` under the exposure bound? (`Scheduler.eligible`)"""
        return self.scheduler.eligible(session, shard)

    def static_arrays(self, shard: int) -> dict[str, np.ndarray]:
        arrays = self._statics.get(shard)
        if arrays is None:
            arrays = self._statics[shard] = self.plan.static_arrays(shard)
        return arrays

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, session: Session, command: str, header: dict, arrays: dict | None = None) -> bool:
        (frame,) = session.channel.seal(command, header, arrays)  # a sealed message is one frame
        try:
            # send_multipart's two sends, without its per-call checks and flag arithmetic. Zero-copy
            # pays only for large frames; for small ones pyzmq's Frame costs more than a copy.
            self.sock.send(session.routing_id, _SEND_MORE)
            self.sock.send(frame, _SEND_LAST, copy=len(frame) < ZERO_COPY_BYTES)
        except zmq.ZMQError as exc:
            why = f"its connection closed without a BYE ({_gone(exc)})"
            if session.done == 0:
                why += (
                    "; before its first result: it may have refused this coordinator's key (a wrong "
                    "--coordinator-key on the node?) or been killed"
                )
            self._end_session(session, why)
            return False
        session.last_sent = time.monotonic()
        self.bytes_sent += len(frame)
        return True

    def _send_raw(self, routing_id: bytes, command: str, header: dict) -> None:
        start = time.perf_counter()
        frames = encode(command, header, None, self.identity)
        self.crypto_seconds += time.perf_counter() - start
        try:
            self.sock.send_multipart([routing_id, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the peer is gone; nothing to tell

    def _address_allowed(self, address: str) -> bool:
        """Per peer address, at most ADDRESS_REPLIES_PER_S CHALLENGEs a second: one host opening
        connection after connection cannot take the whole global budget."""
        host = address.rsplit(":", 1)[0] if address.count(":") == 1 else address  # never a port here
        now = time.monotonic()
        rate = self.address_replies_per_s
        since, tokens = self._address_budget.pop(host, (now, rate))
        tokens = min(rate, tokens + (now - since) * rate)
        allowed = tokens >= 1.0
        self._address_budget[host] = (now, tokens - 1.0 if allowed else tokens)
        while len(self._address_budget) > MAX_ADDRESSES:
            self._address_budget.popitem(last=False)
        return allowed

    def _reply_allowed(self) -> bool:
        """The global budget for unauthenticated replies (CHALLENGE, REFUSE): a flood of HIs or
        HELLOs cannot make this coordinator sign more than HANDSHAKE_REPLIES_PER_S a second."""
        now = time.monotonic()
        since, tokens = self._reply_budget
        tokens = min(float(HANDSHAKE_REPLIES_PER_S), tokens + (now - since) * HANDSHAKE_REPLIES_PER_S)
        if tokens < 1.0:
            self._reply_budget = (now, tokens)
            return False
        self._reply_budget = (now, tokens - 1.0)
        return True

    def _refuse(self, routing_id: bytes, nonce, code: str, text: str) -> bool:
        """One signed REFUSE, at most one per routing id per REFUSE_INTERVAL and within the budget."""
        now = time.monotonic()
        last = self._refused_at.get(routing_id)
        if (last is not None and now - last < REFUSE_INTERVAL) or not self._reply_allowed():
            self.counters["dropped"] += 1  # answered already, or over the budget: silence
            return False
        self._refused_at[routing_id] = now
        self._refused_at.move_to_end(routing_id)
        while len(self._refused_at) > MAX_PENDING:
            self._refused_at.popitem(last=False)
        self.counters["refused"] += 1
        self._send_raw(
            routing_id,
            "REFUSE",
            {
                "coordinator_key": self.identity.public_hex,
                "nonce": nonce if isinstance(nonce, str) else None,
                "code": code,
                "text": text,
            },
        )
        return True

    # -- the Executor interface --------------------------------------------------------
    def run(self, batches: list[Batch]) -> list[np.ndarray]:
        """Send every batch to the owner of its shard and wait for all results."""
        return self.collect([self.submit(batch) for batch in batches])

    def submit(self, batch: Batch) -> Task:
        """Queue one batch and send it now if its node has credit: the node computes while the
        caller prepares the next slot's batch. `collect` waits for the results."""
        self._batch_counter += 1
        held = self.static_arrays(batch.shard)
        spec, arrays = batch.spec, batch.arrays
        shape = vocabulary.result_shape(batch.op, spec, arrays, held)
        dtype = vocabulary.result_dtype(batch.op, spec, arrays, held)
        task = Task(
            batch=batch,
            batch_id=f"{self.step}.{self._batch_counter}",
            work=vocabulary.work(batch.op, spec, arrays, held),
            shape=shape,
            dtype=dtype,
            result_bytes=shape[0] * shape[1] * dtype.itemsize,
        )
        self._tasks[task.batch_id] = task
        # This batch's disguise secrets are drawn: the next batch's come from a fresh seed.
        if reseed(self.plan.disguise_rng):
            self.counters["reseeded"] += 1
        self.scheduler.enqueue(task)
        self._dirty = False
        self._dispatch()
        return task

    def forget(self, tasks: list[Task]) -> None:
        """Drop submitted tasks whose results are no longer wanted (a late result is then dropped)."""
        for t in tasks:
            self._tasks.pop(t.batch_id, None)

    def collect(self, tasks: list[Task]) -> list[np.ndarray]:
        """Wait until every task has its (checked) result; results in the tasks' order."""
        try:
            while any(t.result is None for t in tasks):
                if self.control.stop_requested and not any(s.want > 0 for s in self.sessions.values()):
                    raise StepAbandoned(
                        "stop requested while no node is connected or every node has paused: the step cannot finish"
                    )
                if self._give_up is not None and (not self.sessions or self.scheduler.blocked):
                    # A local cluster: a block waiting under the bound waits for a node that exited.
                    problem = self._give_up(bool(self.scheduler.blocked))
                    if problem:
                        raise TrainingAborted(problem)
                self.pump(timeout_ms=self._poll_timeout())
        finally:
            self.forget(tasks)
        return [t.result for t in tasks if t.result is not None]  # every one has its result here

    def step_done(self) -> None:
        """Step boundary: idle sessions take over shards from sessions holding several. The
        socket is also serviced here (heartbeats, arrivals, leases): with --offload auto a step
        may send nothing at all, and nodes must not be left unheard for a whole epoch."""
        self._dirty = True
        self.step += 1
        self.scheduler.rebalance()
        self.keepalive()

    def keepalive(self) -> None:
        """Service the socket if it has not been for KEEPALIVE_S (heartbeats, arrivals, leases):
        cheap enough to call between any two pieces of the coordinator's own work."""
        if time.monotonic() - self._pumped_at >= KEEPALIVE_S:
            self.pump(timeout_ms=0)

    # -- membership --------------------------------------------------------------------
    def live_count(self) -> int:
        return len(self.sessions)

    def wait_for_nodes(
        self,
        count: int,
        should_stop: Callable[[], bool] = lambda: False,
        give_up: Callable[[bool], str | None] | None = None,
    ) -> bool:
        """Pump until `count` nodes are connected; False if asked to stop first, or when
        `give_up(True)` names a reason to stop waiting (kept in `wait_problem`). `give_up` is
        asked again (`give_up(blocked)`) whenever a step waits with no node, or with a block no
        node may take: a local cluster's node processes that exited will not come back."""
        self.wait_problem = None
        self._give_up = give_up
        self._min_nodes_wanted = count

        def ready() -> int:  # a paused node cannot compute: it does not count toward --min-nodes
            return sum(1 for s in self.sessions.values() if s.want > 0)

        def say_waiting() -> None:
            self._set_status(presence.nodes_wanted_status(ready(), count, len(self.sessions)))

        # Statics and their check probes are prepared now, before the first node is welcomed, so
        # sending and checking them later never silences the coordinator after a WELCOME (the
        # probes used to be drawn at the first large check, seconds under load).
        for shard in range(len(self.owner)):
            self.checker.prepare(shard)
        if ready() < count:
            self.log(f"waiting for {count} node{'s' if count != 1 else ''} to connect ({ready()} so far)")
            self._waiting_logged = True  # no second "waiting" line from pump()
        while ready() < count:
            if should_stop():
                return False
            problem = give_up(True) if give_up is not None else None
            if problem:
                self.wait_problem = problem
                return False
            say_waiting()
            self.pump(timeout_ms=200)
        self._min_nodes_wanted = 0
        self._waiting_logged = False  # the wait is over: a later one is logged again
        self.scheduler.rebalance()
        return True

    def _set_status(self, text: str) -> None:
        if self.state.status != text:
            with self.state.lock:
                self.state.status = text

    def crypto_total(self) -> float:
        """Seconds this coordinator spent on cryptography: handshakes, sealing and opening."""
        live = sum(s.channel.seconds for s in (*self.sessions.values(), *self.joining.values()))
        return self.crypto_seconds + live

    def _end_session(self, session: Session, why: str) -> None:
        self._dirty = True
        self.crypto_seconds += session.channel.seconds
        session.channel.seconds = 0.0
        if self.joining.get(session.routing_id) is session:
            del self.joining[session.routing_id]
            self._forget(session)
            return
        if self.sessions.pop(session.node_id, None) is None:
            return
        self.by_routing.pop(session.routing_id, None)
        self.log(f"node {session.label} ({session.node_id}) left: {why}")
        with self.state.lock:
            row = self.state.nodes.get(session.label)
            if row is not None:
                row.state = NodeState.LOST.value
                row.reason = why
                row.outstanding = 0
        self._forget(session)
        # Re-issue what this node was responsible for: live leases it held and batches queued
        # for it. Expired copies it still held are already re-issued (maybe leased elsewhere).
        orphans = {t.batch_id: t for t in session.outstanding.values() if t.session == session.node_id}
        orphans.update((t.batch_id, t) for t in session.queue)
        session.outstanding.clear()
        session.stale.clear()
        session.queue.clear()
        self.scheduler.release(session.node_id)
        for task in orphans.values():
            if task.result is None and task.batch_id in self._tasks:
                task.session = None
                self._reissue(task, session, "its node left", counts=False)

    def _forget(self, session: Session) -> None:
        """Free what this coordinator keeps about a departed key unless it still matters: a key
        that never received anything leaves no label, row or warning counter behind."""
        self._warnings.pop(session.label, None)
        if any(s.key == session.key for s in (*self.sessions.values(), *self.joining.values())):
            return
        if any(v > 0 for v in self.ledger.node_shares(session.label).values()):
            return  # it holds data: its label and row stay, so the ledger and console stay true
        if self.labels.get(session.key) == session.label:
            del self.labels[session.key]
            self._label_set.discard(session.label)
            with self.state.lock:
                self.state.nodes.pop(session.label, None)

    def _reissue(self, task: Task, previous: Session | None, why: str, counts: bool = True) -> None:
        """Send `task` again. Only rejections by distinct keys count toward MAX_ATTEMPTS: a node that
        leaves, vanishes, runs out its lease, lies or rejects again and again (it gets itself
        quarantined) never makes the run abort."""
        self._dirty = True
        if counts:
            task.attempts += 1
        self.counters["reissued"] += 1
        if previous is not None:
            with self.state.lock:
                row = self.state.nodes.get(previous.label)
                if row is not None:
                    row.reissued += 1
        if task.attempts >= MAX_ATTEMPTS:
            raise TrainingAborted(
                f"batch {task.batch_id} ({task.batch.op}) was rejected by {task.attempts} "
                f"different nodes, last because {why}; check the nodes' logs"
            )
        self.scheduler.reissue(task, previous)

    # -- the poll loop -------------------------------------------------------------------
    def _poll_timeout(self) -> int:
        return max(1, min(self.heartbeat_ms // 2, 250))

    def pump(self, timeout_ms: int = 100) -> None:
        """Handle what arrived within `timeout_ms`, then heartbeats, leases and sending.

        Sending runs when something changed (a result, a rejection, a membership or credit
        change, new work); the pass over every session for leases, silence and heartbeats runs
        every SWEEP_S: with 1,000 idle nodes beating once a second, a pass per arriving heartbeat
        would cost the coordinator a million session visits a second."""
        self._readmit_requested()
        if self._dirty:
            self._dirty = False
            self._dispatch()
        events = dict(self.poller.poll(timeout_ms))
        self._pumped_at = time.monotonic()
        if self.sock in events:
            for _ in range(1000):  # drain, but come up for air
                try:
                    frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    self._handle(frames)
                except (TrainingAborted, StepAbandoned):
                    raise
                except Exception as exc:  # one bad message never takes the coordinator down
                    self.counters["dropped"] += 1
                    self._warn("internal", f"dropped a message that could not be handled: {exc!r}")
        now = time.monotonic()
        if self._dirty:
            self._dirty = False
            self.scheduler.requeue_waiting()
            self._dispatch()
        if now - self._swept_at < SWEEP_S:
            return
        self._swept_at = now
        self._housekeeping()
        self.scheduler.requeue_waiting()
        self._dispatch()
        all_paused = bool(self.sessions) and all(s.want == 0 for s in self.sessions.values())
        stalled = any(s.queue for s in self.sessions.values())
        bound_wait = self.scheduler.bound_wait()
        if bound_wait:
            if self._status_before_wait is None:
                self._status_before_wait = self.state.status
            self._set_status(presence.bound_wait_status(bound_wait))
        elif not self.sessions or (all_paused and stalled):
            if not self._waiting_logged and (self.scheduler.waiting or self.owner):
                self.log(presence.no_nodes_log(len(self.sessions)))
                self._waiting_logged = True
            if self.scheduler.waiting or stalled:
                if self._status_before_wait is None:
                    self._status_before_wait = self.state.status
                self._set_status(presence.no_nodes_status(len(self.sessions)))
        else:
            self._waiting_logged = False
            if self._status_before_wait is not None:  # nodes are back: say what we were doing again
                self._set_status(self._status_before_wait)
                self._status_before_wait = None

    def _dispatch(self) -> None:
        self.scheduler.route_around_paused()
        for session in list(self.sessions.values()):
            deferred = []
            while session.queue and len(session.outstanding) < session.window():
                task = session.queue.popleft()
                if task.result is not None or task.batch_id not in self._tasks:
                    continue
                if task.batch_id in session.outstanding:
                    # It still holds the expired copy: one slot per batch, so credit stays true.
                    deferred.append(task)
                    continue
                if not self._send_batch(session, task):
                    return
            session.queue.extendleft(reversed(deferred))

    def _ensure_static(self, session: Session, shard: int, names: list[str]) -> bool:
        """Send the static operands `names` a batch uses (a resident batch: its block and its
        state) that the session lacks: a block leaves only with a product that uses it
        (evaluating the test set ships no training block)."""
        if all(n in session.statics_held for n in names):
            return True
        arrays = self.static_arrays(shard)
        missing = [n for n in names if n not in session.statics_held]
        too_big = [arrays[n].nbytes for n in missing if not self._fits(session, arrays[n].nbytes)]
        if too_big:
            # It would cut the connection on such a frame (its MAXMSGSIZE): as if it had rejected it.
            self.counters["rejected"] += 1
            self.reputation.rejected(session.key, "too-large", "static operand beyond its max_message")
            self.log(
                f"node {session.label} cannot store its static operands (one is {max(too_big)} bytes; it takes "
                f"messages of at most {session.max_message} bytes: its --max-memory); evicting it from this run"
            )
            self._send(session, "BYE", {"node_id": session.node_id, "reason": "evicted"})
            self.banned.add(session.key)
            self._end_session(session, "it cannot store its static operands")
            return False
        for name in missing:
            self.ledger.record(session.label, self.plan.static_exposure(shard))
            if session.group is not None:
                self.group_ledger.record(session.group, self.plan.static_exposure(shard))
            header = {
                "run_id": self.run_id,
                "name": name,
                "seq": self._next_seq(),
                "exposure": self.ledger.announced(session.label),
            }
            fields = self.plan.static_fields(shard, name)
            header.update(fields)
            if not self._send(session, "STATIC", header, {"x": arrays[name]}):
                return False
            session.statics_held.add(name)
            if "version" in fields:  # a resident state: the node now holds it at this version
                session.state_versions[name] = int(fields["version"])
        session.shards_held.add(shard)
        return True

    def _fits(self, session: Session, payload_bytes: int) -> bool:
        """Would a message with `payload_bytes` of arrays fit the node's stated frame limit?"""
        return (
            not session.max_message
            or payload_bytes + SEALED_OVERHEAD + self.limits.max_header_bytes <= session.max_message
        )

    def _send_batch(self, session: Session, task: Task) -> bool:
        size = sum(a.nbytes for a in task.batch.arrays.values())
        if not self._fits(session, size):
            # Its libzmq would cut the connection on this frame: handled as its REJECT too-large.
            self.counters["rejected"] += 1
            self._warn(
                session.label,
                f"batch {task.batch_id} ({size} bytes) not sent to {session.label}: it takes "
                f"messages of at most {session.max_message} bytes (its --max-memory)",
            )
            counts = session.key not in task.rejected_by
            task.rejected_by.add(session.key)
            quarantine = self.reputation.rejected(session.key, "too-large", f"batch of {size} bytes")
            task.session = None
            self._reissue(task, session, "it is larger than a node takes (too-large)", counts=counts)
            if quarantine and session.node_id in self.sessions:
                self._quarantine(session)
            return True
        # Held by the session from here on, so a failed send below re-issues it with the rest.
        if not self.eligible(session, task.batch.shard):  # every path above checks; kept as a guard
            self._warn(
                "bound-guard",
                f"exposure bound: batch {task.batch_id} not sent to {session.label}; "
                f"its block goes to a node the bound allows",
            )
            self.scheduler.refuse(session, task)
            return True
        session.outstanding[task.batch_id] = task
        task.session = session.node_id
        if task.batch.op == "resident":
            held = session.state_versions.get(task.batch.params["state"])
            past = bool(task.batch.params.get("backward")) and held is not None and held >= task.batch.params["version"]
            if held is not None and (held < self.plan.replay_from(task.batch) or past):
                # it served the slot before the last checkpoint: the updates it lacks are gone from
                # the log, so it gets the checkpoint again (so does a node sent this backward
                # before, a re-issue: its state is already past the V the backward needs)
                session.statics_held.discard(task.batch.params["state"])
                session.state_versions.pop(task.batch.params["state"], None)
        names = [task.batch.params["a_static"]] if task.batch.params.get("a_static") else []
        if task.batch.op == "resident":
            names.append(task.batch.params["state"])  # its block and its state
        if names and not self._ensure_static(session, task.batch.shard, names):
            return False
        now = time.monotonic()
        lease = session.lease_seconds(task.work)
        task.seq = self._next_seq()
        task.seq_by_node[session.node_id] = task.seq
        task.sent_at = now
        task.deadline = now + lease
        # What this node has now seen in all (cumulative), so its volunteer knows what is on the machine.
        self.ledger.record(session.label, task.batch.exposure)
        if session.group is not None:
            self.group_ledger.record(session.group, task.batch.exposure)
        exposure = self.ledger.announced(session.label)
        batch = task.batch
        if batch.op == "resident":  # the updates this node's copy of the slot's state lacks
            batch = self.plan.fit_batch(batch, session.state_versions.get(batch.params["state"]))
        header = {
            "run_id": self.run_id,
            "batch_id": task.batch_id,
            "seq": task.seq,
            "step": self.step,
            "op": batch.op,
            "params": batch.params,
            "lease_ms": max(1, int(lease * 1000)),
            "exposure": exposure,
        }
        if not self._send(session, "BATCH", header, batch.arrays):
            return False
        if batch.op == "resident":
            session.state_versions[batch.params["state"]] = int(batch.params["version"])
        return True

    def statics_changed(self, shard: int, reset: bool = False) -> None:
        """Slot `shard`'s statics changed (a resident state's new checkpoint): prepared afresh for
        the next node that takes the slot. `reset` (a resumed run's state): every holder gets them again."""
        self._statics.pop(shard, None)
        if reset:
            names = set(self.static_arrays(shard))
            for session in self.sessions.values():
                session.shards_held.discard(shard)
                session.statics_held.difference_update(names)
                for name in names:
                    session.state_versions.pop(name, None)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._expire_handshakes(now)
        silence = 3 * self.heartbeat_ms / 1000
        for session in list(self.sessions.values()):
            if not session.outstanding and not session.stale:  # the common case, idle nodes: cheap
                if now - session.last_seen > silence:
                    self._end_session(session, f"silent for {now - session.last_seen:.1f} s (heartbeat lost)")
                elif now - session.last_sent > self.heartbeat_ms / 1000:
                    self._heartbeat(session)
                continue
            # A node computes a batch in the thread that heartbeats, so while it holds a live
            # lease, silence is judged by the lease, not by the heartbeat.
            live = [t.deadline for t in session.outstanding.values() if t.session == session.node_id]
            if now - session.last_seen > silence and (not live or now > max(live)):
                self._end_session(session, f"silent for {now - session.last_seen:.1f} s (heartbeat lost)")
                continue
            for task in list(session.outstanding.values()):
                if task.result is None and now > task.deadline and task.session == session.node_id:
                    # The slot stays occupied until the node answers: a stuck node gets no more work.
                    task.session = None
                    session.stale[task.batch_id] = now + max(self.lease.min_ms / 1000, task.deadline - task.sent_at)
                    self.counters["expired"] += 1
                    self.log(
                        f"lease expired: batch {task.batch_id} on {session.label} "
                        f"after {now - task.sent_at:.1f} s; reissuing"
                    )
                    self._reissue(task, session, "its lease expired", counts=False)
            # A node that has not answered an expired batch for another lease period is stuck or
            # withholding it (alive for heartbeats, answering other batches or none): end its
            # session, so its work can go elsewhere, or to its next session if it recovers. Its
            # copy of the batch holds a slot until then, and a re-issue to it would wait behind it.
            stuck_at = min(session.stale.values(), default=None)
            if session.node_id in self.sessions and stuck_at is not None and now > stuck_at:
                self._send(session, "BYE", {"node_id": session.node_id, "reason": "stuck"})
                self._end_session(session, "stuck: a batch whose lease expired has had no answer for another lease")
                continue
            if now - session.last_sent > self.heartbeat_ms / 1000:
                self._heartbeat(session)
        self._publish_rows(now)

    def _heartbeat(self, session: Session) -> None:
        """HEARTBEAT, its encoded header kept while credit and outstanding stay the same (an idle
        node gets the same one every second: encoding it once saves most of its cost)."""
        why = None if session.outstanding or session.want == 0 else self.waiting_reason(session)
        reason = why.text() if why is not None else None
        key = (session.credit, len(session.outstanding), reason)
        if session.heartbeat_inner is None or session.heartbeat_inner[0] != key:
            header = {"node_id": session.node_id, "credit": key[0], "outstanding": key[1]}
            if reason:
                header["waiting"] = reason  # optional field: the node shows why it has no work
            session.heartbeat_inner = (key, inner_parts("HEARTBEAT", header)[0])
        frames = session.channel.seal_parts([session.heartbeat_inner[1]])
        try:
            self.sock.send_multipart([session.routing_id, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._end_session(session, f"its connection closed without a BYE ({_gone(exc)})")
            return
        session.last_sent = time.monotonic()
        self.bytes_sent += len(frames[0])

    def _publish_rows(self, now: float) -> None:
        # Presenters refresh at a few Hz: publishing more often only costs the training loop.
        if now - self._published_at < 0.2:
            return
        self._published_at = now
        presence.publish_rows(
            self.state, self.sessions.values(), self.ledger.shares(), self.ledger.forms(), now, self.node_state
        )

    def waiting_reason(self, session: Session) -> WaitReason | None:
        """Why a live, unpaused node with no batch in hand has none (`presence.waiting_reason`),
        or None for the ordinary gap between two batches."""
        return presence.waiting_reason(
            session.node_id,
            connected=len(self.sessions),
            needed=self._min_nodes_wanted,
            paused=self.control.paused,
            finished=self.finished,
            scheduler=self.scheduler,
        )

    def node_state(self, session: Session) -> tuple[NodeState, str]:
        """(state, reason) as the operator sees a live node: working / paused / standby / waiting."""
        return presence.node_state(
            busy=bool(session.outstanding), paused=session.want == 0, reason=lambda: self.waiting_reason(session)
        )

    # -- handling what arrives -----------------------------------------------------------
    def _handle(self, frames: list) -> None:
        routing_id = bytes(frames[0].buffer)
        body = frames[1:]
        size = sum(len(f.buffer) for f in body)
        self.bytes_received += size
        session = self.sessions.get(self.by_routing.get(routing_id, "")) or self.joining.get(routing_id)
        if session is not None:
            self._handle_sealed(session, body, size)
            return
        try:
            msg = decode(body, limits=self.limits)
        except ProtocolError as exc:
            self.counters["dropped"] += 1
            if exc.code == "bad-version":
                self._warn(
                    "unknown peers",
                    f"dropped a message from a peer speaking another protocol version "
                    f"({printable(exc.detail, 200)}); it must upgrade enshuffle",
                )
            else:
                self._warn("unknown peers", f"dropped a malformed message from an unknown peer: {exc.code}")
            return
        try:
            address = body[0].get("Peer-Address")
        except (zmq.ZMQError, AttributeError):
            address = ""
        if msg.command == "HI":
            self._on_hi(routing_id, msg, body[0].buffer, address)
        elif msg.command == "HELLO":
            self._on_hello(routing_id, msg, address, body[0].buffer)
        elif msg.command == "DECLINE":
            self._on_decline(routing_id, msg, address)
        else:
            self.counters["dropped"] += 1
            self._warn("unknown peers", f"dropped {msg.command} from a peer without a session")

    def _largest_expected(self, session: Session) -> int:
        """The largest sealed frame this node may send now: a RESULT for the biggest batch it holds
        (header at its limit), else a message without arrays (HEARTBEAT, REJECT, BYE)."""
        largest = max((t.result_bytes for t in session.outstanding.values()), default=0)
        return SEALED_OVERHEAD + self.limits.max_header_bytes + largest

    def _handle_sealed(self, session: Session, body: list, size: int) -> None:
        """One message on a session's connection; `size` is its frames' bytes."""
        if size > self._largest_expected(session):
            # Nothing asked of this node needs a frame this big: not opened (no decryption), and not
            # held against the key, since nothing shows the key sealed it.
            self.counters["dropped"] += 1
            self.counters["oversize"] += 1
            self._warn(
                session.label,
                f"dropped a {size}-byte message on the connection of {session.label} unopened: "
                f"larger than anything asked of it ({self._largest_expected(session)} bytes)",
            )
            return
        opened_before = session.channel.received
        try:
            msg = session.channel.open(body, limits=self.limits)
        except ProtocolError as exc:
            self.counters["dropped"] += 1
            if exc.code == "bad-seal":
                self.counters["bad_signature"] += 1
            if session.channel.received == opened_before:
                # It did not authenticate (a replay, a splice, bytes injected on the path, a frame
                # that is not even sealed): nothing ties it to this key. Dropped, never a strike.
                self._warn(
                    session.label, f"dropped a message on the connection of {session.label}: {printable(exc, 300)}"
                )
            elif session.joined:
                # Sealed under the session key, then malformed: only the node could have sent it.
                self._count_refused(session)
                self._protocol_error(session, f"dropped a message from {session.label}: {printable(exc, 300)}")
            else:
                self._warn(
                    "unknown peers", f"dropped a message from joining node {session.label}: {printable(exc, 300)}"
                )
            return
        session.last_seen = time.monotonic()
        if not session.joined:
            self._join(session)
        handler = _SESSION_HANDLERS.get(msg.command)
        if handler is None:
            self.counters["dropped"] += 1
            self._protocol_error(session, f"dropped unexpected {msg.command} from {session.label}")
            return
        if msg.command != "HEARTBEAT":
            self._dirty = True  # a slot freed, a batch to reissue, a member gone: act now
        getattr(self, handler)(session, msg)

    def _warn(self, key: str, line: str) -> None:
        """Log, at most WARN_BURST lines per `key` every WARN_WINDOW seconds; say how many were held back."""
        now = time.monotonic()
        start, shown, held = self._warnings.get(key, (now, 0, 0))
        if now - start > WARN_WINDOW:
            if held:
                self.log(f"({held} more like the last from {key} were not logged)")
            start, shown, held = now, 0, 0
        if shown < WARN_BURST:
            self.log(line)
            shown += 1
        else:
            held += 1
        self._warnings[key] = (start, shown, held)

    def _protocol_error(self, session: Session, line: str) -> None:
        """Count a malformed or unverifiable message; a node past the limit is told BYE and banned."""
        session.protocol_errors += 1
        self._warn(session.label, line)
        if session.protocol_errors >= MAX_PROTOCOL_ERRORS and session.node_id in self.sessions:
            self._send(session, "BYE", {"node_id": session.node_id, "reason": "protocol-error"})
            self.banned.add(session.key)
            self._end_session(
                session,
                f"evicted after {session.protocol_errors} malformed or unverifiable "
                f"messages; its key is refused for the rest of this run",
            )

    def _count_refused(self, session: Session) -> None:
        with self.state.lock:
            row = self.state.nodes.get(session.label)
            if row is not None:
                row.refused += 1

    def _expire_handshakes(self, now: float) -> None:
        while self.pending:
            routing_id, pending = next(iter(self.pending.items()))
            if now - pending.created <= HANDSHAKE_TIMEOUT and len(self.pending) <= MAX_PENDING:
                break
            del self.pending[routing_id]
        for routing_id, session in list(self.joining.items()):
            if now - session.joining_since > HANDSHAKE_TIMEOUT:
                del self.joining[routing_id]
                self._forget(session)
        while self._refused_at:
            routing_id, at = next(iter(self._refused_at.items()))
            if now - at <= REFUSE_INTERVAL:
                break
            del self._refused_at[routing_id]

    def _on_hi(self, routing_id: bytes, msg, frame=b"", address: str = "") -> None:
        """HI: one CHALLENGE per connection (routing id) ever, within the budget of its peer address
        and the global one. A real node says HI once per connection; a DECLINE or a HELLO ends
        that connection's handshake, so HI again on it is never answered."""
        if routing_id in self.pending or routing_id in self._challenged:
            self.counters["dropped"] += 1
            return
        if msg.header["protocol"] != PROTOCOL_VERSION:
            # HI is unsigned: the REFUSE names the exact bytes received, not the node's nonce, so
            # a HI rewritten on the way makes the node retry, never give up.
            self._refuse(
                routing_id,
                frame_digest(frame),
                "version-mismatch",
                f"this coordinator speaks protocol {PROTOCOL_VERSION}; upgrade enshuffle",
            )
            return
        if not self._address_allowed(address) or not self._reply_allowed():
            self.counters["dropped"] += 1
            return
        self._challenged[routing_id] = None
        while len(self._challenged) > MAX_CHALLENGED:
            self._challenged.popitem(last=False)
        start = time.perf_counter()
        frames, pending = make_challenge(self.identity, self.run_id, msg)
        self.crypto_seconds += time.perf_counter() - start
        self.pending[routing_id] = pending
        self.counters["challenges"] += 1
        self._expire_handshakes(time.monotonic())
        try:
            self.sock.send_multipart([routing_id, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            self.pending.pop(routing_id, None)

    def _on_decline(self, routing_id: bytes, msg, address: str) -> None:
        """A node that checked our key and does not trust it: tell the operator (rate-limited)."""
        pending = self.pending.pop(routing_id, None)
        if pending is None or msg.header["nonce"] != pending.nonce:
            self.counters["dropped"] += 1
            return
        self.counters["declined"] += 1
        self._warn(
            "declined",
            f"a node at {address or 'an unknown address'} refused our key "
            f"{short_fingerprint(self.identity.fingerprint)} ({msg.header['code']}): "
            f"{printable(msg.header['text'], 300)}",
        )

    def _on_hello(self, routing_id: bytes, msg, address: str = "", frame=b"") -> None:
        pending = self.pending.pop(routing_id, None)
        header = msg.header
        if pending is None:
            # No CHALLENGE on this connection: a replayed or out-of-order HELLO. Nothing to answer
            # beyond one rate-limited REFUSE (a real node always says HI first).
            self.counters["dropped"] += 1
            self._warn(
                "unknown peers",
                f"dropped a HELLO without a CHALLENGE (from {address or 'unknown'}): "
                f"a replay, or a node speaking an older protocol",
            )
            return
        start = time.perf_counter()
        try:
            key, channel = check_hello(pending, msg, self.identity, self.run_id)
        except ProtocolError as exc:
            self.crypto_seconds += time.perf_counter() - start
            self.counters["bad_signature"] += 1
            self._warn("unknown peers", f"refused a HELLO from {address or 'unknown'}: {printable(exc.detail, 300)}")
            # Unverified: bound to the exact bytes received (a HELLO altered on the way is refused
            # under a digest the node does not recognise, so it retries).
            self._refuse(routing_id, frame_digest(frame), "bad-hello", exc.detail)
            return
        self.crypto_seconds += time.perf_counter() - start
        self.counters["handshakes"] += 1
        fp = fingerprint(key)
        verdict = decide(
            key,
            header,
            pending.challenge,
            admission=self.admission,
            finished=self.finished,
            banned=key in self.banned,
            quarantine=self.reputation.records[key] if self.reputation.is_quarantined(key) else None,
            twins=[s for s in (*self.sessions.values(), *self.joining.values()) if s.key == key],
            sessions=len(self.sessions) + len(self.joining),
            max_sessions=self.max_sessions,
            heartbeat_ms=self.heartbeat_ms,
            now=time.monotonic(),
            address=address,
        )
        if not isinstance(verdict, Admit):
            if verdict.warn:
                self._warn("twins", verdict.warn)
            if self._refuse(routing_id, header.get("nonce"), verdict.code, verdict.text):
                self._warn(
                    "refused",
                    f"refused node {printable(header.get('name'), 40)!r} "
                    f"({short_fingerprint(fp)}) from {address or 'unknown'}: "
                    f"{verdict.code}",
                )
            return
        for old in verdict.replaces:
            self._end_session(old, "it reconnected (a new HELLO with the same key)")
        self._node_counter += 1
        node_id = f"n{self._node_counter}"
        label = self.labels.get(key)
        if label is None:
            # Brackets are reserved for the fingerprint suffix that tells same-named nodes apart.
            name = printable(header["name"], 40).replace("[", "(").replace("]", ")") or "node"
            taken = name in self._label_set or name in self.ledger.nodes()  # resumed rows included
            label = name if not taken else f"{name}[{short_fingerprint(fp)}]"
            self.labels[key] = label
            self._label_set.add(label)
        credit = min(int(header["capabilities"]["credit"]), self.max_credit)
        max_message = header["capabilities"].get("max_message")
        max_message = (
            max_message if isinstance(max_message, int) and not isinstance(max_message, bool) and max_message > 0 else 0
        )
        session = Session(
            routing_id=routing_id,
            node_id=node_id,
            key=key,
            fingerprint=fp,
            name=printable(header["name"], 200),
            label=label,
            credit=credit,
            want=credit,
            address=address,
            channel=channel,
            admitted=verdict.how,
            lease=self.lease,
            max_message=max_message,
            group=self.admission.group_of(key) if hasattr(self.admission, "group_of") else None,
        )
        self.joining[routing_id] = session
        self.reputation.record(key, label, fp)
        start = time.perf_counter()
        frames = encode(
            "WELCOME",
            {
                "run_id": self.run_id,
                "coordinator_key": self.identity.public_hex,
                "node_key": key.hex(),
                "nonce": header["nonce"],
                "challenge": pending.challenge,
                "node_id": node_id,
                "credit": credit,
                "heartbeat_ms": self.heartbeat_ms,
                "lease": self.lease.header(),
            },
            signer=self.identity,
        )
        self.crypto_seconds += time.perf_counter() - start
        try:
            self.sock.send_multipart([routing_id, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            del self.joining[routing_id]
            self._forget(session)
            return

    def _join(self, session: Session) -> None:
        """The node's first sealed message: it has checked our key and holds the session key.
        Only now does it count as connected and may it receive data."""
        del self.joining[session.routing_id]
        self._dirty = True
        session.joined = True
        self.sessions[session.node_id] = session
        self.by_routing[session.routing_id] = session.node_id
        with self.state.lock:
            row = self.state.nodes.get(session.label)
            if row is None:
                row = self.state.nodes[session.label] = NodeRow(
                    node_id=session.node_id, name=session.label, fingerprint=session.fingerprint
                )
            row.node_id = session.node_id
            row.address = session.address
            row.state = NodeState.CONNECTED.value
            row.last_seen = time.time()
        self.log(
            f"node {session.label} joined as {session.node_id} ({short_fingerprint(session.fingerprint)}), "
            f"credit {session.credit}, admitted by {session.admitted or 'open'}"
        )

    def _task_for(self, session: Session, msg, what: str) -> Task | None:
        batch_id, seq = msg.header.get("batch_id"), msg.header.get("seq")
        task = session.outstanding.get(batch_id) if batch_id is not None else None
        # Sealed under this session's key: only the node could have sent it, so it counts against it.
        if msg.header.get("run_id") != self.run_id:
            self.counters["dropped"] += 1
            self._count_refused(session)
            self._protocol_error(
                session,
                f"dropped {what} from {session.label}: it is for run "
                f"{printable(msg.header.get('run_id'), 80)!r}, not this run",
            )
            return None
        if task is None or task.seq_by_node.get(session.node_id) != seq:
            self.counters["dropped"] += 1
            self._count_refused(session)
            self._protocol_error(
                session,
                f"dropped {what} from {session.label} for unknown batch "
                f"{printable(batch_id, 80)} (seq {seq}): never sent to it",
            )
            return None
        return task

    def _on_result(self, session: Session, msg) -> None:
        task = self._task_for(session, msg, "RESULT")
        if task is None:
            return
        del session.outstanding[task.batch_id]
        session.stale.pop(task.batch_id, None)
        now = time.monotonic()
        if task.session != session.node_id or task.result is not None or task.batch_id not in self._tasks:
            self.counters["expired"] += 1
            self.log(f"dropped a late RESULT for batch {task.batch_id} from {session.label}: its lease had expired")
            return
        c = msg.arrays.get("c")
        expected_dtype = task.dtype
        if c is None or tuple(c.shape) != tuple(task.shape) or c.dtype != expected_dtype:
            got = "nothing" if c is None else f"{c.dtype}{tuple(c.shape)}"
            self.counters["dropped"] += 1
            self._count_refused(session)
            wrong = f"expected array c {expected_dtype}{task.shape}, got {got}"
            self.log(f"refused RESULT for batch {task.batch_id} from {session.label}: {wrong}")
            self._refuse_lie(session, task, "wrong-shape", wrong)
            return
        problem = self.checker.check(task.batch, c, session.key)
        if problem is not None:
            self.counters["wrong"] += 1
            self._count_refused(session)
            self.log(f"refused RESULT for batch {task.batch_id} from {session.label}: {problem}")
            self._refuse_lie(session, task, "failed-check", problem)
            return
        self.reputation.accepted(session.key)
        task.result = c  # a read-only view that keeps ZeroMQ's frame alive; un-disguising copies it
        session.done += 1
        session.rate_window.append(now)
        if task.work > 0:
            session.seconds_per_work.append((now - task.sent_at) / task.work)

    def _refuse_lie(self, session: Session, task: Task, reason: str, problem: str) -> None:
        """A signed result that is wrong: re-issue the batch (not counted toward the abort limit) and
        count it against the key; at the reputation's limit the key is quarantined."""
        task.session = None
        self._reissue(task, session, f"its result was refused ({reason})", counts=False)
        if self.reputation.refused(session.key, reason, problem) and session.node_id in self.sessions:
            self._quarantine(session)

    def _quarantine(self, session: Session) -> None:
        rec = self.reputation.records[session.key]
        self.counters["quarantined"] += 1
        why = (
            f"{rec.lies} wrong results"
            if rec.lies >= self.reputation.quarantine_after
            else f"{rec.rejects} rejected batches in a row"
        )
        self.log(
            f"quarantined node {session.label} ({short_fingerprint(session.fingerprint)}) for this run after "
            f"{why} ({rec.summary()}); its shards move to other nodes. Re-admit it with "
            f"`a` on its row in the console or SIGHUP"
        )
        self._send(session, "BYE", {"node_id": session.node_id, "reason": "quarantined"})
        self._end_session(session, "quarantined")
        with self.state.lock:
            row = self.state.nodes.get(session.label)
            if row is not None:
                row.state = NodeState.QUARANTINED.value
                row.quarantine = rec.reason

    def _readmit_requested(self) -> None:
        """Operator requests (console key, SIGHUP) to lift quarantines, taken from the control."""
        take = getattr(self.control, "take_readmits", None)
        for which in take() if take is not None else ():
            done = self.reputation.readmit(which)
            if not done:
                self.log(f"re-admit {which or 'all'}: no quarantined node matches")
            for rec in done:
                self.log(f"re-admitted node {rec.label} ({short_fingerprint(rec.fingerprint)}): it may connect again")
                with self.state.lock:
                    row = self.state.nodes.get(rec.label)
                    if row is not None and row.state == NodeState.QUARANTINED:
                        row.state = NodeState.GONE.value
                        row.quarantine = ""

    def _on_reject(self, session: Session, msg) -> None:
        self.counters["rejected"] += 1
        self._count_refused(session)
        code, text = msg.header.get("code"), msg.header.get("text")
        code_text = f"{printable(code, 40)}: {printable(text, 200)}"
        if msg.header.get("batch_id") is None and code in ("too-large", "compute-error"):
            # It cannot store a static operand, so it cannot serve any shard of this run.
            self.reputation.rejected(session.key, str(code), str(text))
            self.log(f"node {session.label} cannot store its static operands ({code_text}); evicting it from this run")
            self._send(session, "BYE", {"node_id": session.node_id, "reason": "evicted"})
            self.banned.add(session.key)
            self._end_session(session, "it cannot store its static operands")
            return
        self._warn(
            session.label,
            f"node {session.label} rejected batch {printable(msg.header.get('batch_id'), 40)}: {code_text}",
        )
        task = self._task_for(session, msg, "REJECT") if msg.header.get("batch_id") else None
        if task is None:
            return
        del session.outstanding[task.batch_id]
        session.stale.pop(task.batch_id, None)
        if code == "unknown-static":
            session.shards_held.discard(task.batch.shard)
            session.statics_held.difference_update(self.static_arrays(task.batch.shard))
        # A node whose copy of a slot's state is not where we thought gets the checkpoint again; a
        # session that keeps asking is refusing, and is counted as any other rejection.
        resync = code in ("state-behind", "state-ahead") and session.resyncs < MAX_RESYNCS
        if resync:
            session.resyncs += 1
            state = task.batch.params.get("state")
            if state is not None:  # a resident batch's: the node gets the checkpoint again
                session.statics_held.discard(state)
                session.state_versions.pop(state, None)
        # A resync is the coordinator's bookkeeping, not the node's refusal: it counts for nothing.
        quarantine = not resync and self.reputation.rejected(session.key, str(code), str(text))
        if task.session == session.node_id and task.result is None:
            task.session = None
            # Counted once per key: only several nodes refusing the same batch say the batch is bad.
            counts = not resync and session.key not in task.rejected_by
            if not resync:
                task.rejected_by.add(session.key)
            self._reissue(task, session, f"a node rejected it ({code_text})", counts=counts)
        if quarantine and session.node_id in self.sessions:
            self._quarantine(session)

    def _on_heartbeat(self, session: Session, msg) -> None:
        want = int(msg.header.get("credit", session.credit))
        if want != session.want:
            self._dirty = True
            self.log(f"node {session.label} {'paused' if want == 0 else f'asks for {want} batches at a time'}")
        session.want = want

    def _on_bye(self, session: Session, msg) -> None:
        self._end_session(session, f"said BYE ({printable(msg.header.get('reason'), 80)})")

    # -- shutting down -----------------------------------------------------------------
    def close(self, reason: str = "shutdown") -> None:
        """Tell every node BYE and close the socket."""
        self.finished = reason == "run-finished"
        self.log("messages: " + ", ".join(f"{k} {v}" for k, v in self.counters.items()))
        self._published_at = 0.0
        self._publish_rows(time.monotonic())  # the final counts, not the last throttled ones
        for session in list(self.sessions.values()):
            self._send(session, "BYE", {"node_id": session.node_id, "reason": reason})
        self.sessions.clear()
        with self.state.lock:
            closed, why = presence.closed_reason(self.finished)
            for row in self.state.nodes.values():
                if row.state not in (NodeState.LOST, NodeState.QUARANTINED):
                    row.state, row.reason = closed.value, why
                row.outstanding = 0
        self.listener.close()

    def describe(self) -> str:
        """One line per session and task queue, for diagnosing a stalled run."""
        lines = [f"owner={self.owner} waiting={[t.batch_id for t in self.scheduler.waiting]} tasks={list(self._tasks)}"]
        for s in self.sessions.values():
            lines.append(
                f"{s.node_id} {s.label} window={s.window()} held={sorted(s.shards_held)} "
                f"outstanding={list(s.outstanding)} queue={[t.batch_id for t in s.queue]}"
            )
        return "\n".join(lines)
