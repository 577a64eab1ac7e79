"""Helpers for the end-to-end wire tests: real processes and real sockets on 127.0.0.1.

What lives here:

* `wait_until`: the only way these tests wait (a poll with a deadline and a small interval);
* `Proc`, `spawn_node`, `spawn_coordinator`, `enshuffle_cli`: `python -m enshuffle` processes
  whose stdout/stderr go to files (a pipe nobody reads could fill and stall a process);
* `InProcessRun`: a `CoordinatorServer` + `DistributedCompute` + `Trainer` driven in a thread of
  the test process, with step-boundary holds so a test can act at a precise point of a run
  (the server is pumped while held, exactly as `CoordinatorRun` pumps it while paused);
* `ScriptedNode`: an in-test ENS1 node on its own DEALER with its own key. It computes what it
  is sent honestly (with the real node's `compute_batch`) unless told to hold a batch, and can
  send arbitrary frames: the hostile peer of the robustness tests;
* `reference_weights`, `assert_same_weights`: the centralized run and the comparison.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import zmq

from enshuffle.coordinator.distributed import DistributedCompute
from enshuffle.coordinator.ledger import ExposureLedger, ledger_axes
from enshuffle.coordinator.server import CoordinatorServer, ServerConfig
from enshuffle.coordinator.state import CoordinatorState
from enshuffle.coordinator.training import Inputs, Trainer, prepare
from enshuffle.dataset import load_idx_dir
from enshuffle.model import LocalCompute, Preset
from enshuffle.kernels import compute_batch
from enshuffle.protocol.keys import Identity
from enshuffle.protocol.handshake import NodeHandshake
from enshuffle.protocol.messages import OPS, Channel, Message, decode
from presets import SMALL_NET, small_default

REPO = Path(__file__).resolve().parents[1]
# Distributed and centralized runs add the same products in another order (the contraction
# order inside a block is permuted, blocks are summed separately), so in float64 they differ by
# a few units of rounding per product: measured up to ~2e-11 relative on individual weights
# after a few Adam steps, ~1e-14 absolute. rtol 1e-9 leaves two orders of margin; atol 1e-12
# only covers weights that are themselves ~0 (where a relative bound means nothing) and is
# ~1e-10 of the weights' scale (0.01-0.3), far below any real error (a lost or doubled batch
# moves weights by ~1e-3).
RTOL = 1e-9
ATOL = 1e-12


# --- waiting -------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.02,
    on_timeout: Callable[[], str] | None = None,
    idle: Callable[[], None] | None = None,
):
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout` s.

    Between polls it calls `idle` (e.g. serve a socket), or waits `interval` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        if idle is not None:
            idle()
        else:
            time.sleep(interval)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the CLI's --bind wants an explicit port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes -----------------------------------------------------------------------------


class Proc:
    """A `python -m enshuffle ...` process with its stdout/stderr in files under `logdir`."""

    def __init__(self, args: list[str], env: dict, logdir: Path, name: str):
        logdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.args = args
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "enshuffle", *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        self.pid = self.popen.pid

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout} s; stderr:\n{self.err()[-3000:]}"
            ) from None

    def stop(self) -> None:
        """Cleanup: kill if still running, reap."""
        if self.alive():
            self.popen.kill()  # SIGKILL ends a SIGSTOPped process too
        self.popen.wait(10)

    def describe(self) -> str:
        return f"--- {self.name} (rc {self.popen.poll()}) stderr:\n{self.err()[-2000:]}"


def process_env(home: Path | None, cache: Path | None = None) -> dict:
    """The test process's environment, with ENSHUFFLE_HOME `home` (when given; else the test
    process's own) and ENSHUFFLE_CACHE `cache` (likewise)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if home is not None:
        env["ENSHUFFLE_HOME"] = str(home)
    if cache is not None:
        env["ENSHUFFLE_CACHE"] = str(cache)
    return env


def spawn_node(
    home: Path, endpoint: str, pin: str | None, name: str, logdir: Path, *extra: str, proc_name: str | None = None
) -> Proc:
    """An `enshuffle node` process with its own ENSHUFFLE_HOME (so its own key)."""
    home.mkdir(parents=True, exist_ok=True)
    args = ["node", "--connect", endpoint, "--name", name, "--threads", "1", *extra]
    if pin:
        args += ["--coordinator-key", pin]
    return Proc(args, process_env(home), logdir, proc_name or name)


def small_network_unless_given(args) -> list[str]:
    """SMALL_NET (the notebook's 784-128-10 sigmoid network) unless `args` choose a network."""
    return [] if {"--hidden", "--layers", "--activation"} & set(args) else list(SMALL_NET)


def spawn_coordinator(home: Path, port: int, cache: Path, logdir: Path, name: str, *extra: str) -> Proc:
    """`enshuffle coordinator` on loopback; with --offload matmul unless `extra` says otherwise, so
    the nodes get work even where keeping it home would be cheaper (what wire tests exercise), and
    on the small network unless `extra` chooses one."""
    offload = [] if "--offload" in extra else ["--offload", "matmul"]
    network = small_network_unless_given(extra)
    return Proc(
        ["coordinator", "--bind", f"tcp://127.0.0.1:{port}", *offload, *network, *extra],
        process_env(home, cache),
        logdir,
        name,
    )


def enshuffle_cli(
    *args: str, home: Path | None = None, cache: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run one `python -m enshuffle ...` to completion, its output captured (env: `process_env`)."""
    return subprocess.run(
        [sys.executable, "-m", "enshuffle", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=process_env(home, cache),
    )


def _resident(args: list[str]) -> bool:
    """Does `enshuffle train` with these arguments run the resident disguise (the default preset's)?"""
    preset = args[args.index("--preset") + 1] if "--preset" in args else "default"
    disguise = args[args.index("--disguise") + 1] if "--disguise" in args else None
    return preset != "seed" and disguise in (None, "resident")


def train_wire_and_central(nodes: int, args: list[str], tmp_path: Path, cache: Path):
    """`enshuffle train` with `nodes` node processes and centrally (--nodes 0), same arguments;
    asserts both succeeded and their final weights agree; returns the two CompletedProcesses.
    On the small network unless `args` choose one.
    A resident run trains a reparameterized network: its central reference is `--nodes 0
    --reference RUN_DIR` (its secret and slots), so the wire run keeps a run directory."""
    args = [*args, *small_network_unless_given(args)]
    extra, reference = [], []
    if _resident(args):
        run_dir = args[args.index("--out") + 1] if "--out" in args else str(tmp_path / "run")
        extra = [] if "--out" in args else ["--out", run_dir]
        reference = ["--reference", run_dir]
    wire = enshuffle_cli(
        "train",
        "--nodes",
        str(nodes),
        *args,
        *extra,
        "--save-weights",
        str(tmp_path / "a.npz"),
        home=tmp_path / "home",
        cache=cache,
    )
    assert wire.returncode == 0, wire.stderr
    central_args = [a for i, a in enumerate(args) if a != "--out" and (i == 0 or args[i - 1] != "--out")]
    central = enshuffle_cli(
        "train",
        "--nodes",
        "0",
        *central_args,
        *reference,
        "--save-weights",
        str(tmp_path / "b.npz"),
        home=tmp_path / "home",
        cache=cache,
    )
    assert central.returncode == 0, central.stderr
    assert_same_weights(load_npz(tmp_path / "a.npz"), load_npz(tmp_path / "b.npz"))
    return wire, central


def coordinator_fingerprint(home: Path) -> str:
    """The coordinator key's fingerprint in `home`, as `enshuffle keys show` prints it."""
    proc = enshuffle_cli("keys", "show", "--create", home=home)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith("coordinator key:"):
            return line.split()[2]
    raise AssertionError(f"no coordinator key line in `enshuffle keys show`:\n{proc.stdout}")


def cpu_seconds(pid: int | None = None) -> float:
    """User+system CPU time of process `pid` (/proc), or of this whole process (all threads)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- data and references ---------------------------------------------------------------------


def load_inputs(data_dir: Path, preset: Preset, limit: int) -> Inputs:
    return prepare(load_idx_dir(data_dir), preset, limit)


# The training secret of in-process runs and their references (initial weights, sample order).
TEST_SECRET = 0x7E57


def reference_weights(preset: Preset, inputs: Inputs, secret: int = TEST_SECRET) -> dict[str, np.ndarray]:
    """The centralized run (plain numpy, this process) of the same preset, data and secret."""
    trainer = Trainer(preset, inputs, LocalCompute(inputs.images), secret=secret)
    while not trainer.finished:
        trainer.run_step()
    return dict(trainer.params)


def assert_same_weights(got, expected) -> None:
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    for name in expected:
        a, b = np.asarray(got[name]), np.asarray(expected[name])
        assert a.dtype == np.float64 and a.shape == b.shape, (name, a.dtype, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=f"weights {name} differ")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --- a coordinator driven in this process ----------------------------------------------------


class InProcessRun:
    """CoordinatorServer + DistributedCompute + Trainer, trained in a background thread.

    `hold_at(n)`: the thread stops before global step n (0-based, counted over the whole run)
    and keeps pumping the server (sessions, heartbeats, HELLOs) until the hold moves on;
    `held()` tells whether it is there. The test thread never touches the server's socket; it
    reads `state.snapshot()` and the server's counters.
    """

    def __init__(
        self,
        preset: Preset,
        inputs: Inputs,
        *,
        shards: int,
        min_nodes: int,
        seed: int = 7,
        admission=None,
        disguise: str = "share",
        **config,
    ):
        """`disguise`: the compute's (with "resident", on the preset's layers). `config`:
        ServerConfig fields (limits, heartbeat_ms, max_sessions, max_exposure, lease,
        verify_results, replicate, quarantine_after, address_replies_per_s)."""
        self.preset = preset
        self.state = CoordinatorState()
        self.identity = Identity.generate()
        # on the preset's layers as `enshuffle coordinator` makes it, when the compute is told them
        ledger = ExposureLedger(None if disguise == "share" else ledger_axes(preset.layers))
        self.compute = DistributedCompute(
            inputs.images,
            shards,
            np.random.default_rng(seed),
            CoordinatorServer.factory(
                "tcp://127.0.0.1:*",
                self.identity,
                self.state,
                ledger,
                config=ServerConfig(log=self._log, **config),
                admission=admission,
            ),
            ledger=ledger,
            **inputs.source(),
            **({} if disguise == "share" else {"disguise": disguise, "layers": preset.layers}),
        )
        self.server = self.compute.executor
        self.endpoint = self.server.endpoint
        self.trainer = Trainer(preset, inputs, self.compute, secret=TEST_SECRET)
        self.min_nodes = min_nodes
        self.lines: list[str] = []
        self.steps_done = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._hold = 0  # hold before this global step; -1: no hold
        self._held = threading.Event()
        self._stall_wanted = False  # while held: stop pumping (a coordinator busy with its own work)
        self._stalled = threading.Event()
        self._unstall = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._main, name="in-process-coordinator", daemon=True)

    def _log(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def log_lines(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def logged(self, fragment: str) -> list[str]:
        return [line for line in self.log_lines() if fragment in line]

    def start(self, hold_at: int = -1) -> "InProcessRun":
        self._hold = hold_at
        self.thread.start()
        return self

    def wait_waiting_for_nodes(self, timeout: float = 30) -> None:
        """Until the coordinator waits for nodes: its thread is then out of BLAS (statics are
        prepared). Before a Popen with a `preexec_fn`, which fork()s this whole process: forked
        while that thread is inside BLAS, OpenBLAS's fork handlers wait on it for ever."""
        wait_until(
            lambda: self.state.snapshot().status.startswith("waiting for nodes"),
            timeout,
            "the coordinator to wait for nodes",
            on_timeout=self.describe,
        )

    def hold_at(self, step: int) -> None:
        """Hold before global step `step` (-1: run to the end); releases a current hold if later."""
        self._hold = step
        self._held.clear()

    def stall(self, timeout: float = 30) -> None:
        """While held: the run thread stops pumping its socket (no heartbeats, nothing read) until
        `unstall()`, as a coordinator busy with its own work for seconds is."""
        self._unstall.clear()
        self._stall_wanted = True
        wait_until(self._stalled.is_set, timeout, "the coordinator to stall", on_timeout=self.describe)

    def unstall(self) -> None:
        self._unstall.set()

    def held(self) -> bool:
        return self._held.is_set()

    def wait_held(self, timeout: float = 30) -> None:
        wait_until(
            lambda: self.held() or self.done.is_set(),
            timeout,
            f"the run to reach step {self._hold}",
            on_timeout=self.describe,
        )
        assert not self.done.is_set(), f"the run ended before step {self._hold}: {self.error!r}"

    def _main(self) -> None:
        try:
            self.server.wait_for_nodes(self.min_nodes)
            with self.state.lock:
                self.state.status = "training"  # as CoordinatorRun.run says once the nodes are there
            while not self.trainer.finished:
                while 0 <= self._hold <= self.steps_done:
                    self._held.set()
                    if self._stall_wanted:
                        self._stalled.set()
                        self._unstall.wait()
                        self._stall_wanted = False
                        self._stalled.clear()
                    self.server.pump(100)
                self._held.clear()
                self.trainer.run_step()
                self.steps_done += 1
            self.server.close("run-finished")
        except BaseException as exc:  # surfaced by finish(); the test fails with it
            self.error = exc
            try:
                self.server.close("shutdown")
            except zmq.ZMQError:
                pass
        finally:
            self.done.set()

    def finish(self, timeout: float = 60) -> dict[str, np.ndarray]:
        """Release every hold, wait for the end of training; the final weights."""
        self.hold_at(-1)
        wait_until(self.done.is_set, timeout, "training to finish", on_timeout=self.describe)
        if self.error is not None:
            raise AssertionError(f"the coordinator failed: {self.error!r}\n{self.describe()}") from self.error
        return dict(self.trainer.params)

    def row(self, label: str):
        return self.state.snapshot().nodes.get(label)

    def describe(self) -> str:
        snap = self.state.snapshot()
        rows = "\n".join(
            f"  {r.name}: {r.state} node_id={r.node_id} done={r.batches_done} out={r.outstanding} "
            f"reissued={r.reissued} refused={r.refused}"
            for r in snap.nodes.values()
        )
        return (
            f"status={snap.status!r} steps_done={self.steps_done} counters={self.server.counters}\n{rows}\n"
            + "\n".join(self.log_lines()[-30:])
        )

    def close(self) -> None:
        """Cleanup after a failed test: stop holding; the daemon thread dies with the process."""
        self.unstall()
        self.hold_at(-1)


# --- an in-test node -------------------------------------------------------------------------


class ScriptedNode:
    """An ENS2 node in the test thread: honest compute, plus whatever frames a test sends.

    Single-threaded like the real node: only the thread that calls its methods touches the
    socket. `serve_until(pred)` handles STATIC/BATCH (answering each with a correct RESULT,
    except batches `hold_next` asked to keep), notes a BYE in `bye`, and sends heartbeats while
    waiting.
    """

    def __init__(
        self,
        endpoint: str,
        name: str = "scripted",
        identity: Identity | None = None,
        context: zmq.Context | None = None,
    ):
        self.identity = identity or Identity.generate()
        self.name = name
        self._own_ctx = context is None
        self.ctx = context or zmq.Context()
        self.endpoint = endpoint
        self.sock = self._socket()
        self.statics: dict[str, np.ndarray] = {}
        self.results: list[list] = []  # frames of every RESULT sent, in order
        self.held: list[Message] = []  # batches received and kept unanswered
        self._hold = 0
        self.run_id = ""
        self.node_id = ""
        self.coordinator_key = b""
        self.channel: Channel | None = None
        self.heartbeat_s = 1.0
        self._last_sent = 0.0
        self.credit = 2  # what its heartbeats ask for; 0 is a paused volunteer
        self.bye: Message | None = None  # the last BYE the coordinator sent

    def _socket(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def close(self) -> None:
        self.sock.close(0)
        if self._own_ctx:
            self.ctx.term()

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames)
        self._last_sent = time.monotonic()

    def sign_and_send(
        self, command: str, header: dict, arrays: dict | None = None, signer: Identity | None = None
    ) -> list:
        """Seal and send a session message (the name is from ENS1, where every message was signed)."""
        frames = self.channel.seal(command, header, arrays)
        self.send(frames)
        return frames

    def hello(self, timeout: float = 10, invite: str | None = None, **extra) -> None:
        """The whole ENS2 handshake: HI, CHALLENGE, HELLO, WELCOME, then a first sealed HEARTBEAT.
        Again after a session: on a new connection, as the real daemon does (one CHALLENGE per
        connection). `extra`: further NodeHandshake arguments (replaces=NODE_ID)."""
        if self.channel is not None:
            self.sock.close(0)
            self.sock = self._socket()
            self.channel = None
        hs = NodeHandshake(
            self.identity, self.name, {"ops": list(OPS), "threads": 1, "credit": 2}, invite=invite, **extra
        )
        self.handshake = hs
        self.send(hs.hi())
        challenge = self._expect("CHALLENGE", timeout)
        hs.check_challenge(challenge)
        self.hello_frames = hs.hello(challenge)
        self.send(self.hello_frames)
        welcome = self._expect("WELCOME", timeout)
        self.channel = hs.welcome(welcome)
        self.run_id = welcome.header["run_id"]
        self.node_id = welcome.header["node_id"]
        self.coordinator_key = bytes.fromhex(welcome.header["coordinator_key"])
        self.heartbeat_s = welcome.header["heartbeat_ms"] / 1000
        self.sign_and_send("HEARTBEAT", {"node_id": self.node_id, "credit": self.credit, "outstanding": 0})

    def _expect(self, command: str, timeout: float) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(50, zmq.POLLIN):
                frames = self.sock.recv_multipart()
                sealed = self.channel is not None and bytes(frames[0])[4:5] == b"E"
                msg = self.channel.open(frames) if sealed else decode(frames)
                if msg.command in (command, "REFUSE"):
                    if msg.command == "REFUSE" and command != "REFUSE":
                        raise AssertionError(f"{self.name}: refused: {msg.header['code']}: {msg.header['text']}")
                    return msg
        raise AssertionError(f"{self.name}: no {command} within {timeout} s")

    def hold_next(self, count: int = 1) -> None:
        """Keep the next `count` batches unanswered (in `held`) instead of computing them."""
        self._hold += count

    def result_frames(
        self, batch: Message, signer: Identity | None = None, tamper: Callable[[np.ndarray], None] | None = None
    ) -> list:
        """A signed RESULT for `batch` (not sent): correct, unless `tamper` edits it in place first."""
        h = batch.header
        c = compute_batch(h["op"], h["params"], batch.arrays, self.statics)
        if tamper is not None:
            c = np.array(c)
            tamper(c)
        return self.channel.seal(
            "RESULT",
            {"run_id": h["run_id"], "batch_id": h["batch_id"], "seq": h["seq"], "compute_seconds": 0.001},
            {"c": c},
        )

    def reject(self, msg: Message, code: str, text: str) -> list:
        """Answer a STATIC or BATCH with a REJECT sealed in this session (a STATIC has no batch id)."""
        h = msg.header
        return self.sign_and_send(
            "REJECT",
            {"run_id": h["run_id"], "batch_id": h.get("batch_id"), "seq": h["seq"], "code": code, "text": text},
        )

    def answer(self, batch: Message, signer: Identity | None = None) -> list:
        frames = self.result_frames(batch, signer)
        self.send(frames)
        self.results.append(frames)
        return frames

    def pump(self, timeout_ms: int = 20) -> None:
        """Handle what arrived within `timeout_ms`; keep the heartbeat."""
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            while True:
                try:
                    frames = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(self.channel.open(frames))
        if time.monotonic() - self._last_sent >= self.heartbeat_s / 2:
            self.sign_and_send(
                "HEARTBEAT", {"node_id": self.node_id, "credit": self.credit, "outstanding": len(self.held)}
            )

    def _handle(self, msg: Message) -> None:
        if msg.command == "BYE":
            self.bye = msg
        elif msg.command == "STATIC":
            (array,) = msg.arrays.values()
            self.statics[msg.header["name"]] = array
        elif msg.command == "BATCH":
            if self._hold > 0:
                self._hold -= 1
                self.held.append(msg)
            else:
                self.answer(msg)

    def serve_until(
        self, predicate: Callable[[], object], timeout: float, what: str, on_timeout: Callable[[], str] | None = None
    ):
        """Serve (compute, heartbeat) until `predicate` is truthy; AssertionError after `timeout` s."""
        return wait_until(predicate, timeout, what, on_timeout=on_timeout, idle=lambda: self.pump(20))


def default_preset(epochs: int = 2) -> Preset:
    return small_default(epochs=epochs, dtype="float64")
