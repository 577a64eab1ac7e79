"""What `enshuffle bench` measures: the performance figures, measured side by side in one run.

Each figure is the median of `--repeats` repetitions; ratios are taken between medians measured
in this same run, so a noisy machine moves numerator and denominator together. It is a
benchmark, not a test: nothing here fails on a time.

Every figure with a target (the TARGET_* constants below) is printed beside it (and `--json`
gives each as {"value", "target", "op", "met", "unit", ...} so a script can compare runs), then
the other figures: plan build time, in-process epoch, crypto cost, privacy's cost. What is
measured:

- the exposure plan for the notebook's largest operation (128x60000 @ 60000x784, 7 nodes);
- centralized runs with 1 and with 2 BLAS threads (seed-preset epochs, default-preset steps):
  wall and CPU; ratios use the fastest wall and the cheapest CPU, and say which;
- an in-process distributed epoch (2 nodes, no sockets), with the BLAS threads of the fastest
  centralized epoch;
- the coordinator in this process (a `CoordinatorServer`) with 2 `enshuffle node --threads 1`
  processes on loopback: per seed-preset epoch and per default-preset step, wall, this
  process's CPU, minor page faults, bytes sent and received, crypto, result checks (if the
  server counts `check_seconds`) and round trips (if the compute counts `round_trips`);
- the same with the shuffle-only disguise (privacy's cost), and the seed preset with 7 node
  processes (the coordinator's CPU growth from k = 2 to 7; at most 3 repeats: 7 node
  processes share this machine's cores);
- single small products (an x_w1 batch of 128 rows of a default-preset static block) sent one at
  a time to a node process with every CPU's BLAS threads and to one with `--threads 1`;
- the daemon operators run: `enshuffle coordinator` as a process with two `enshuffle node
  --threads 1` processes, its CPU (from /proc) and wall per seed-preset epoch after the first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from enshuffle.blas import BlasThreadsUnavailable, get_blas_threads, set_blas_threads
from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.disguise.resident import CHECKPOINT_STEPS
from enshuffle.coordinator.distributed import (
    Batch,
    DistributedCompute,
    InProcessExecutor,
    default_disguise,
    static_name,
)
from enshuffle.coordinator.ledger import ExposureLedger, ledger_axes
from enshuffle.coordinator.offload import COST_MODEL_FILE, CostModel, default_cost_model
from enshuffle.coordinator.plan import build_matmul_plan
from enshuffle.coordinator.report import eprint
from enshuffle.coordinator.cluster import (
    LOCAL_NODES_CONNECT_S,
    local_node_keys,
    local_nodes_problem,
    node_home,
    spawn_local_nodes,
    spawn_node,
    stop_local_nodes,
)
from enshuffle.coordinator.run import coordinator_blas_threads
from enshuffle.coordinator.server import CoordinatorServer, Listener
from enshuffle.coordinator.state import CoordinatorState
from enshuffle.coordinator.training import Trainer, load_inputs
from enshuffle.dataset import cache_dir
from enshuffle.model import NOTEBOOK_LAYERS, LocalCompute, get_preset
from enshuffle.protocol.keys import fingerprint, load_or_create_identity
from enshuffle.protocol.messages import Channel

NOTEBOOK_PLAN_SECONDS = 70.8
CRYPTO_BUDGET_EPOCH_S = 0.1  # seed preset, per epoch
CRYPTO_BUDGET_STEP_MS = 0.5  # default preset, per step
PRIVACY_COST_TARGET = 10.0  # % more coordinator CPU than the shuffle-only disguise

# The bench's targets: what a lean coordinator should cost against the centralized run.
TARGET_CPU_SHARE = 30.0  # % of the cheapest centralized CPU per seed-preset epoch
TARGET_WIRE_RATIO = 2.0  # wire epoch / centralized epoch, seed preset
TARGET_STEP_RATIO = 4.0  # default preset step over the wire / centralized step
TARGET_STEP_CPU_RATIO = 2.0  # coordinator CPU per default step / cheapest centralized step
TARGET_BYTES_MB = 200.0  # sent + received per seed-preset epoch, k = 2
TARGET_GROWTH = 40.0  # % coordinator CPU growth from k = 2 to k = 7
TARGET_FAULTS = 5000.0  # coordinator minor page faults per seed-preset epoch
TARGET_ROUND_TRIP_MS = 2.0  # node round trip for a small product, p90
TARGET_CHECK_SHARE = 5.0  # % of the coordinator's CPU spent checking results
TARGET_ROUND_TRIPS = 2.0  # round trips per default-preset step
# The resident design's targets (the work volunteers take off the coordinator), measured by
# --scaling except the cost model's: what a design that pays should leave the coordinator.
TARGET_DEEP_SHARE = 10.0  # % coordinator CPU per 784-2048-2048-10 step / cheapest centralized
TARGET_DEEP_WALL = 1.5  # 784-2048-2048-10 step over the wire / fastest centralized step
TARGET_NARROW_SHARE = 50.0  # % coordinator CPU per 784-128-10 step / cheapest centralized
TARGET_SHIP_NS = 1.5  # coordinator CPU per shipped element (the cost model)

CENTRAL_THREADS = (1, 2)
GROWTH_NODES = 7
GROWTH_MAX_REPEATS = 3
DAEMON = "`enshuffle coordinator` daemon process"
# Default-preset steps per measured figure: one resident checkpoint period, so every figure
# carries one state fetch (what a long run pays per CHECKPOINT_STEPS steps), not zero or two.
STEP_CHUNK = CHECKPOINT_STEPS
BENCH_LOG_LINES = 20  # the coordinator's last log lines shown when a wire run fails
# Unmeasured steps before an over-the-wire step figure: statics and handshakes, and the first two
# checkpoints. Until the first fetch every step's logged update is fresh memory (about 900 page
# faults a step for 784-2048-2048-10), and the first two fetches fault in their states' buffers;
# from the third on, the log and the checkpoints reuse freed memory. A run of thousands of steps
# pays that once; a figure of a few dozen steps would count it many times over.
WIRE_WARMUP_STEPS = 2 * CHECKPOINT_STEPS + 10
# Results sealed and opened per cost-model sample, after SHIP_WARMUP unmeasured ones (a sample's
# first trips pay for cold caches and fresh buffers; a 10-trip sample moved by +-40% with the load)
SHIP_TRIPS = 100
SHIP_WARMUP = 10
COST_SAMPLES = 5  # at least this many samples per cost-model figure (their median)
DAEMON_TIMEOUT_S = 900.0


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


def _percentile(values, q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def measure_plan(repeats: int) -> float:
    rng = np.random.default_rng(0)
    times = []
    for _ in range(max(repeats, 5)):
        t = time.perf_counter()
        build_matmul_plan(128, 60000, 784, 7, rng)
        times.append(time.perf_counter() - t)
    return float(statistics.median(times))


# -- counters and repetitions ------------------------------------------------------------------
def _snapshot(server=None, compute=None) -> dict[str, float]:
    """Cumulative counters of this process (and of the server and compute, if given)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    snap = {"wall": time.perf_counter(), "cpu": time.process_time(), "minflt": float(usage.ru_minflt)}
    if server is not None:
        snap["sent"] = float(server.bytes_sent)
        snap["received"] = float(server.bytes_received)
        snap["crypto"] = server.crypto_total()
        check = getattr(server, "check_seconds", None)  # CPU seconds in result checks (thread_time)
        if check is not None:
            snap["check"] = float(check)
    if compute is not None:
        trips = getattr(compute, "round_trips", None)  # executor.run calls
        if trips is not None:
            snap["round_trips"] = float(trips)
    return snap


def _delta(before: dict, after: dict, per: int = 1) -> dict[str, float]:
    return {k: (after[k] - before[k]) / per for k in after if k in before}


def _medians(rows: list[dict]) -> dict[str, float | None]:
    keys = set.intersection(*(set(r) for r in rows)) if rows else set()
    return {k: _median(r[k] for r in rows) for k in sorted(keys)}


def _epochs(trainer, repeats: int, warmup: int = 1, snap=_snapshot) -> list[dict]:
    """warmup + repeats epochs; per measured epoch, the counters' deltas."""
    for _ in range(warmup):
        trainer.run_epoch()
    rows = []
    for _ in range(repeats):
        before = snap()
        trainer.run_epoch()
        rows.append(_delta(before, snap()))
    return rows


def _steps(trainer, repeats: int, chunk: int = STEP_CHUNK, warmup: int = 10, snap=_snapshot) -> list[dict]:
    """Per chunk of `chunk` steps, the counters' deltas per step. A step that ends an epoch also
    runs the epoch's test pass (and the state fetch before it): it runs, but is left out of its
    chunk's figure, on the centralized side as on the wire."""
    for _ in range(warmup):
        trainer.run_step()
    rows = []
    for _ in range(repeats):
        before = snap()
        left_out: dict[str, float] = {}
        skipped = 0
        for _ in range(chunk):
            if trainer.step + 1 < trainer.steps_per_epoch:
                trainer.run_step()
                continue
            start = snap()
            trainer.run_step()
            skipped += 1
            for key, value in _delta(start, snap()).items():
                left_out[key] = left_out.get(key, 0.0) + value
        if skipped == chunk:  # epochs of one step: nothing but epoch ends to measure
            rows.append(_delta(before, snap(), chunk))
            continue
        whole = _delta(before, snap())
        rows.append({k: (v - left_out.get(k, 0.0)) / (chunk - skipped) for k, v in whole.items()})
    return rows


@contextlib.contextmanager
def _blas_threads(threads: int):
    """Run with `threads` BLAS threads, restored afterwards; yields the count BLAS reports, or
    None when the BLAS cannot be told (then it runs with whatever it has)."""
    try:
        before = get_blas_threads()
        got = set_blas_threads(threads)
    except BlasThreadsUnavailable:
        yield None
        return
    try:
        yield got
    finally:
        set_blas_threads(before)


def measure_centralized(preset, inputs, repeats: int, minibatch: bool = False) -> dict[int, dict]:
    """Centralized seed epochs (or default steps) per BLAS thread count: {threads: medians}."""
    out: dict[int, dict] = {}
    for threads in CENTRAL_THREADS:
        with _blas_threads(threads) as got:
            if got is None and out:
                break  # the BLAS cannot be told: one measurement, with its own thread count
            trainer = Trainer(preset, inputs, LocalCompute(inputs.images))
            rows = _steps(trainer, repeats) if minibatch else _epochs(trainer, repeats)
            out[threads if got is not None else 0] = _medians(rows)
    return out


def _cheapest(by_threads: dict[int, dict], key: str) -> tuple[float, str]:
    threads = min(by_threads, key=lambda t: by_threads[t][key])
    return by_threads[threads][key], _threads_text(threads)


def _threads_text(threads: int) -> str:
    return "default BLAS threads" if threads == 0 else f"{threads} BLAS thread{'s' if threads != 1 else ''}"


# -- the coordinator in this process, node processes on loopback ---------------------------------
def measure_wire(
    preset,
    inputs,
    repeats: int,
    nodes: int = 2,
    minibatch: bool = False,
    disguise: str | None = None,
    offload: str = "matmul",
) -> dict[str, float | None]:
    """Medians per seed-preset epoch (or per default-preset step) of the counters, with `nodes`
    `enshuffle node --threads 1` processes; keys as `_snapshot`'s."""
    Channel.clock = staticmethod(time.thread_time)  # CPU time: what the crypto costs this process
    with tempfile.TemporaryDirectory(prefix="enshuffle-bench-") as tmp_dir, coordinator_blas_threads():
        tmp = Path(tmp_dir)
        identity = load_or_create_identity("coordinator", tmp / "coordinator")
        listener = Listener("tcp://127.0.0.1:*")
        ledger = ExposureLedger(ledger_axes(preset.layers))
        state = CoordinatorState()
        serve = CoordinatorServer.factory(
            listener, identity, state, ledger, admission=Admission(auto=set(local_node_keys(tmp, nodes)))
        )
        procs = spawn_local_nodes(listener.endpoint, identity.fingerprint, nodes, tmp)
        server: CoordinatorServer | None = None
        try:
            compute = DistributedCompute(
                inputs.images,
                nodes,
                np.random.default_rng(2),
                serve,
                ledger=ledger,
                disguise=disguise or default_disguise(preset),
                **inputs.source(),
                layers=preset.layers,
                offload=offload,
                cost_model=default_cost_model(),
            )
            assert isinstance(compute.executor, CoordinatorServer)
            server = compute.executor
            problem = local_nodes_problem(procs, tmp, time.monotonic() + LOCAL_NODES_CONNECT_S)
            if not server.wait_for_nodes(nodes, give_up=problem):
                raise RuntimeError(f"bench: the {nodes} node processes did not start: {server.wait_problem}")
            problem.connected()  # type: ignore[attr-defined]
            trainer = Trainer(preset, inputs, compute)
            snap = lambda: _snapshot(server, compute)  # noqa: E731
            if minibatch:  # warm-up (statics, handshakes, the first checkpoints) outside every figure
                rows = _steps(trainer, repeats, warmup=WIRE_WARMUP_STEPS, snap=snap)
            else:
                rows = _epochs(trainer, repeats, warmup=1, snap=snap)
        except BaseException:
            # why the run stopped is in the coordinator's log (a refusal, a quarantine), which a
            # bench run shows nowhere else
            with state.lock:
                lines = list(state.log)[-BENCH_LOG_LINES:]
            for line in lines:
                eprint(f"bench: coordinator log: {line}")
            raise
        finally:
            if server is not None:
                server.close("run-finished")
            else:
                listener.close()
            stop_local_nodes(procs)
    return _medians(rows)


SCALING_WIDTHS = (128, 512, 1024, 2048, 4096)  # 128: the notebook's width
SCALING_NODES = (2, 4, 7)
# Networks with resident hidden layers: the default preset's deeper shapes
SCALING_DEEP = ((784, 1024, 1024, 10), (784, 2048, 2048, 10))


def measure_scaling(data: str | None, limit: int | None, repeats: int) -> list[dict]:
    """The resident default preset's coordinator CPU and wall per step against the cheapest
    centralized step, for first-layer widths SCALING_WIDTHS (784-h-10 ReLU, 2 node processes),
    for SCALING_NODES node processes at width 1024 and for the deeper SCALING_DEEP networks
    (resident hidden layers); with the resident-clear control's CPU."""
    rows = []
    configs = (
        [((784, h, 10), 2) for h in SCALING_WIDTHS]
        + [((784, 1024, 10), k) for k in SCALING_NODES if k != 2]
        + [(layers, 2) for layers in SCALING_DEEP]
    )
    for layers, nodes in configs:
        hidden = "-".join(str(n) for n in layers[1:-1])
        preset = replace(get_preset("default", layers=layers, activation="relu"), epochs=10_000)
        inputs = load_inputs(data, preset, limit)
        eprint(f"bench: scaling, 784-{hidden}-10 relu, {nodes} node processes")
        central = measure_centralized(preset, inputs, repeats, minibatch=True)
        cpu, _ = _cheapest(central, "cpu")
        wall = min(v["wall"] for v in central.values())
        measured = measure_wire(preset, inputs, repeats, nodes=nodes, minibatch=True)
        control = measure_wire(preset, inputs, repeats, nodes=nodes, minibatch=True, disguise="resident-clear")
        wire = {k: float(measured[k] or 0.0) for k in ("cpu", "wall")}
        clear = {"cpu": float(control["cpu"] or 0.0) or 1e-12}
        rows.append(
            {
                "hidden": hidden,
                "nodes": nodes,
                "central_cpu_ms": 1e3 * cpu,
                "central_wall_ms": 1e3 * wall,
                "cpu_ms": 1e3 * wire["cpu"],
                "wall_ms": 1e3 * wire["wall"],
                "clear_cpu_ms": 1e3 * clear["cpu"],
                "cpu_share": 100 * wire["cpu"] / cpu,
                "wall_ratio": wire["wall"] / wall,
                "privacy_cost": 100 * (wire["cpu"] / clear["cpu"] - 1),
            }
        )
        r = rows[-1]
        eprint(
            f"bench: scaling 784-{hidden}-10 k={nodes}: coordinator CPU {r['cpu_ms']:.2f} ms per step = "
            f"{r['cpu_share']:.0f}% of centralized {r['central_cpu_ms']:.2f} ms; wall {r['wall_ratio']:.2f}x; "
            f"privacy {r['privacy_cost']:+.0f}% against resident-clear"
        )
    return rows


def measure_round_trips(inputs, count: int, rows: int = 128, warmup: int = 20) -> dict[str, dict]:
    """Small products sent one at a time (`server.run([batch])` each) to two node processes:
    one with every CPU's BLAS threads (the node's default), one with `--threads 1`. A product is
    an x_w1 batch: `rows` rows of the node's static block times a (columns x 128) matrix.
    Per node: round-trip milliseconds (median, p90, all)."""
    variants = {"default": None, "threads1": 1}  # the node's --threads (None: its default)
    with tempfile.TemporaryDirectory(prefix="enshuffle-bench-rt-") as tmp_dir, coordinator_blas_threads():
        tmp = Path(tmp_dir)
        identity = load_or_create_identity("coordinator", tmp / "coordinator")
        keys = set()
        for i, name in enumerate(variants):
            keys.add(load_or_create_identity("node", node_home(tmp, i), name=f"rt-{name}").public_bytes)
        listener = Listener("tcp://127.0.0.1:*")
        procs = [
            spawn_node(listener.endpoint, identity.fingerprint, node_home(tmp, i), f"rt-{name}", threads=threads)
            for i, (name, threads) in enumerate(variants.items())
        ]
        server: CoordinatorServer | None = None
        try:
            # the compute makes the server (its executor) and hands it its slots' statics
            ledger = ExposureLedger()
            executor = DistributedCompute(
                inputs.images,
                len(variants),
                np.random.default_rng(3),
                CoordinatorServer.factory(
                    listener, identity, CoordinatorState(), ledger, admission=Admission(auto=keys)
                ),
                ledger=ledger,
                **inputs.source(),
            ).executor
            assert isinstance(executor, CoordinatorServer)
            server = executor
            problem = local_nodes_problem(procs, tmp, time.monotonic() + LOCAL_NODES_CONNECT_S)
            if not server.wait_for_nodes(len(variants), give_up=problem):
                raise RuntimeError(f"bench: the round-trip node processes did not start: {server.wait_problem}")
            shard_of = {}
            for shard, node_id in enumerate(server.owner):
                assert node_id is not None  # wait_for_nodes returned: every slot is held
                shard_of[server.sessions[node_id].name.removeprefix("rt-")] = shard
            rng = np.random.default_rng(4)

            def product(shard: int) -> Batch:
                name = static_name("train", shard)
                static = server.static_arrays(shard)[name]
                picked = rng.choice(static.shape[0], size=min(rows, static.shape[0]), replace=False)
                b = rng.standard_normal((static.shape[1], NOTEBOOK_LAYERS[1])).astype(static.dtype)
                return Batch(shard, "matmul", {"a_static": name, "transpose_a": False}, {"rows": picked, "b": b})

            for _ in range(warmup):  # statics go out with the first product
                for shard in shard_of.values():
                    server.run([product(shard)])
            times: dict[str, list[float]] = {name: [] for name in variants}
            for _ in range(count):  # interleaved, so both nodes see the same machine load
                for name, shard in shard_of.items():
                    batch = product(shard)
                    t = time.perf_counter()
                    server.run([batch])
                    times[name].append(1000 * (time.perf_counter() - t))
        finally:
            if server is not None:
                server.close("run-finished")
            else:
                listener.close()
            stop_local_nodes(procs)
    return {
        name: {"median_ms": _median(v), "p90_ms": _percentile(v, 0.9), "count": len(v)} for name, v in times.items()
    }


# -- the daemon operators run -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_counters(pid: int) -> tuple[float, float]:
    """(user + system CPU seconds, minor page faults) of process `pid`, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), float(fields[7])


def measure_daemon(data: str | None, limit: int | None, epochs: int) -> dict[str, float | None]:
    """`enshuffle coordinator --preset seed --epochs N` as a process, two `enshuffle node
    --threads 1` processes admitted by an --allow file. At each epoch line the coordinator
    prints, its CPU and minor faults are read from /proc: medians per epoch over epochs 2..N
    (the first carries start-up: data loading, statics, handshakes), so the figure is the
    marginal cost of one more epoch of the daemon, model-chain version included."""
    with tempfile.TemporaryDirectory(prefix="enshuffle-bench-daemon-") as tmp_dir:
        tmp = Path(tmp_dir)
        home = tmp / "coordinator"
        coordinator_fp = load_or_create_identity("coordinator", home).fingerprint
        allow = tmp / "allow.txt"
        allow.write_text("".join(f"{fingerprint(key)}\n" for key in local_node_keys(tmp, 2)))
        port = _free_port()
        command = [
            sys.executable,
            "-m",
            "enshuffle",
            "coordinator",
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--min-nodes",
            "2",
            "--allow",
            str(allow),
            "--out",
            str(tmp / "run"),
            "--preset",
            "seed",
            "--epochs",
            str(epochs),
            "--json",
        ]
        if data:
            command += ["--data", data]
        if limit:
            command += ["--limit", str(limit)]
        err_path = tmp / "coordinator.err"
        with open(err_path, "wb") as err:
            coordinator = subprocess.Popen(
                command,
                env=dict(os.environ, ENSHUFFLE_HOME=str(home)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        assert coordinator.stdout is not None  # stdout=PIPE
        watchdog = threading.Timer(DAEMON_TIMEOUT_S, coordinator.kill)
        watchdog.start()
        procs = spawn_local_nodes(f"tcp://127.0.0.1:{port}", coordinator_fp, 2, tmp, threads=1)
        marks = []  # (wall, cpu, minflt) at each epoch line
        try:
            for line in coordinator.stdout:
                if line.startswith("{") and json.loads(line).get("type") == "epoch":
                    marks.append((time.perf_counter(), *_proc_counters(coordinator.pid)))
            _, status, usage = os.wait4(coordinator.pid, 0)
            coordinator.returncode = os.waitstatus_to_exitcode(status)
        finally:
            watchdog.cancel()
            if coordinator.returncode is None:
                coordinator.kill()
                coordinator.wait()
            coordinator.stdout.close()
            stop_local_nodes(procs)
        if coordinator.returncode != 0 or len(marks) != epochs:
            tail = err_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"bench: `enshuffle coordinator` exited with status {coordinator.returncode} after "
                f"{len(marks)} of {epochs} epochs:\n{tail}"
            )
    per_epoch = [tuple(b - a for a, b in zip(first, second)) for first, second in zip(marks, marks[1:])]
    return {
        "epochs": epochs,
        "wall_seconds_per_epoch": _median(p[0] for p in per_epoch),
        "cpu_seconds_per_epoch": _median(p[1] for p in per_epoch),
        "minflt_per_epoch": _median(p[2] for p in per_epoch),
        "cpu_seconds_total": usage.ru_utime + usage.ru_stime,
    }


# -- the figures --------------------------------------------------------------------------------
class Figures:
    """Ordered figures: {key: {label, value, target, op, met, unit, note}}."""

    def __init__(self):
        self.items: dict[str, dict] = {}

    def add(
        self,
        key: str,
        label: str,
        value,
        unit: str,
        target=None,
        op: str | None = "<=",
        note: str | bool | None = "",  # `x and "..."` leaves None or False where x was not measured
        section: str = "targets",
        signed: bool = False,
        short: str | None = None,
    ) -> None:
        met = None
        if value is not None and target is not None:
            met = bool(value <= target) if op == "<=" else bool(value >= target)
        self.items[key] = {
            "label": label,
            "value": value,
            "unit": unit,
            "target": target,
            "op": op if target is not None else None,
            "met": met,
            "note": note,
            "section": section,
            "signed": signed,
            "short": short,
        }


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _percent(part, whole):
    ratio = _ratio(part, whole)
    return None if ratio is None else 100 * ratio


def build_figures(m: dict, repeats: int) -> Figures:
    """The bench's targets first, then the other figures; value None where not measured."""
    f = Figures()
    c_epoch, c_step = m["centralized_epoch"], m["centralized_step"]
    cheap_cpu, cheap_cpu_which = _cheapest(c_epoch, "cpu")
    fast_wall, fast_wall_which = _cheapest(c_epoch, "wall")
    cheap_step_cpu, cheap_step_which = _cheapest(c_step, "cpu")
    fast_step, fast_step_which = _cheapest(c_step, "wall")
    wire, step = m.get("wire_epoch"), m.get("wire_step")
    daemon, growth, trips = m.get("daemon"), m.get("wire_epoch_k7"), m.get("round_trips")

    cpu = wire["cpu"] if wire else None
    f.add(
        "coordinator_cpu_vs_cheapest_centralized",
        "coordinator CPU per seed epoch / cheapest centralized CPU",
        cpu and 100 * cpu / cheap_cpu,
        "%",
        TARGET_CPU_SHARE,
        note=cpu and f"{cpu:.3f} s vs {cheap_cpu:.3f} s, centralized with {cheap_cpu_which}",
    )
    # (type: ignore[index]: mypy cannot see that `x and r[...]` indexes r only when x was measured)
    d_cpu = daemon and daemon["cpu_seconds_per_epoch"]
    f.add(
        "daemon_cpu_vs_cheapest_centralized",
        "coordinator CPU per seed epoch / cheapest centralized CPU, daemon",
        d_cpu and 100 * d_cpu / cheap_cpu,
        "%",
        TARGET_CPU_SHARE,
        short=f"  the same, {DAEMON}",
        note=d_cpu and f"{d_cpu:.3f} s per epoch after the first, of {daemon['epochs']}",  # type: ignore[index]
    )
    f.add(
        "wire_over_centralized",
        "wire epoch / centralized epoch, seed (wall)",
        _ratio(wire and wire["wall"], fast_wall),
        "x",
        TARGET_WIRE_RATIO,
        note=wire and f"{wire['wall']:.3f} s vs {fast_wall:.3f} s, centralized with {fast_wall_which}",
    )
    d_wall = daemon and daemon["wall_seconds_per_epoch"]
    f.add(
        "daemon_wire_over_centralized",
        "wire epoch / centralized epoch, seed (wall), daemon",
        _ratio(d_wall, fast_wall),
        "x",
        TARGET_WIRE_RATIO,
        short=f"  the same, {DAEMON}",
        note=d_wall and f"{d_wall:.3f} s per epoch",
    )
    f.add(
        "minibatch_wire_over_centralized",
        "default preset: step over the wire / centralized step",
        _ratio(step and step["wall"], fast_step),
        "x",
        TARGET_STEP_RATIO,
        note=step and f"{1000 * step['wall']:.2f} vs {1000 * fast_step:.2f} ms, centralized with {fast_step_which}",
    )
    f.add(
        "minibatch_coordinator_cpu_over_centralized",
        "coordinator CPU per default step / cheapest centralized",
        _ratio(step and step["cpu"], cheap_step_cpu),
        "x",
        TARGET_STEP_CPU_RATIO,
        note=step
        and (f"{1000 * step['cpu']:.2f} vs {1000 * cheap_step_cpu:.2f} ms, centralized with {cheap_step_which}"),
    )
    f.add(
        "bytes_per_epoch_mb",
        "bytes per seed epoch, sent + received, k = 2",
        wire and (wire["sent"] + wire["received"]) / 1e6,
        "MB",
        TARGET_BYTES_MB,
        note=wire and f"{wire['sent'] / 1e6:.1f} MB sent, {wire['received'] / 1e6:.1f} MB received",
    )
    f.add(
        "coordinator_cpu_growth_k2_k7",
        f"coordinator CPU growth, k = 2 to {GROWTH_NODES} (seed)",
        growth and cpu and 100 * (growth["cpu"] / cpu - 1),
        "%",
        TARGET_GROWTH,
        note=growth
        and cpu
        and f"{cpu:.3f} s -> {growth['cpu']:.3f} s; k = {GROWTH_NODES}: median of {m['k7_repeats']}",
        signed=True,
    )
    f.add(
        "minor_faults_per_epoch",
        "coordinator minor page faults per seed epoch",
        wire and wire["minflt"],
        "faults",
        TARGET_FAULTS,
        note=daemon and f"daemon: {daemon['minflt_per_epoch'] / 1000:.1f}k",
    )
    rt = trips and trips["default"]
    f.add(
        "node_round_trip_p90_ms",
        "node round trip, small product, p90",
        rt and rt["p90_ms"],
        "ms",
        TARGET_ROUND_TRIP_MS,
        note=rt and f"median {rt['median_ms']:.2f} ms over {rt['count']}; node with every CPU's BLAS threads",
    )
    rt1 = trips and trips["threads1"]
    f.add(
        "node_round_trip_p90_ms_threads1",
        "node round trip, small product, p90, node --threads 1",
        rt1 and rt1["p90_ms"],
        "ms",
        TARGET_ROUND_TRIP_MS,
        short="  the same, node with --threads 1",
        note=rt1 and f"median {rt1['median_ms']:.2f} ms",
    )
    check = wire.get("check") if wire else None
    f.add(
        "check_share_of_coordinator_cpu",
        "result checks' share of coordinator CPU, seed",
        _percent(check, cpu),
        "%",
        TARGET_CHECK_SHARE,
        note=(
            "the server has no check_seconds"
            if wire and check is None
            else check is not None and f"{check:.3f} s per epoch"
        ),
    )
    s_check = step.get("check") if step else None
    f.add(
        "check_share_default",
        "result checks' share of coordinator CPU, default step",
        _percent(s_check, step and step["cpu"]),
        "%",
        TARGET_CHECK_SHARE,
        short="  the same, default preset",
        note=(
            "the server has no check_seconds"
            if step and s_check is None
            else s_check is not None and f"{1000 * s_check:.3f} ms per step"
        ),
    )
    f.add(
        "round_trips_per_default_step",
        "round trips per default-preset step",
        step.get("round_trips") if step else None,
        "",
        TARGET_ROUND_TRIPS,
        note="the compute has no round_trips" if step and step.get("round_trips") is None else "",
    )

    # The resident design's targets.
    resident = "resident"
    rows = {(r["hidden"], r["nodes"]): r for r in m.get("scaling") or ()}
    # (key, label, --scaling row, its figure, unit, target, what the note compares)
    scaled = (
        ("resident_deep_cpu_share", "784-2048-2048-10 coordinator CPU / cheapest centralized", "2048-2048",
         "cpu_share", "%", TARGET_DEEP_SHARE, ("cpu_ms", "central_cpu_ms")),
        ("resident_deep_wall_ratio", "784-2048-2048-10 step over the wire / fastest centralized", "2048-2048",
         "wall_ratio", "x", TARGET_DEEP_WALL, ("wall_ms", "central_wall_ms")),
        ("resident_narrow_cpu_share", "784-128-10 coordinator CPU per step / cheapest centralized", "128",
         "cpu_share", "%", TARGET_NARROW_SHARE, ("cpu_ms", "central_cpu_ms")),
    )  # fmt: skip
    for key, label, hidden, figure, unit, target, (ours, theirs) in scaled:
        row = rows.get((hidden, 2))
        f.add(
            key,
            label,
            row and row[figure],
            unit,
            target,
            note=f"{row[ours]:.2f} vs {row[theirs]:.2f} ms, 2 node processes" if row else "needs --scaling",
            section=resident,
        )
    f.add(
        "cost_model_ship_ns",
        "coordinator CPU per shipped element (the cost model)",
        m["cost_model"]["ship_ns"] if m.get("cost_model") else None,
        "ns",
        TARGET_SHIP_NS,
        note=m.get("cost_model") and "a 128x1024 float32 result sealed, opened and added",
        section=resident,
    )

    # The other figures.
    other = "other"
    f.add(
        "plan_ms",
        "plan build, 128x60000 @ 60000x784, k = 7",
        1000 * m["plan_seconds"],
        "ms",
        note=f"notebook: {NOTEBOOK_PLAN_SECONDS} s, {NOTEBOOK_PLAN_SECONDS / m['plan_seconds']:,.0f}x faster",
        section=other,
    )
    for t, row in c_epoch.items():
        f.add(
            f"centralized_epoch_s_threads{t}",
            f"centralized seed epoch, {_threads_text(t)}",
            row["wall"],
            "s",
            note=f"CPU {row['cpu']:.3f} s",
            section=other,
        )
    inproc = m["inprocess_epoch"]
    f.add(
        "inprocess_over_centralized",
        "in-process distributed epoch, 2 nodes / centralized",
        _ratio(inproc["wall"], fast_wall),
        "x",
        section=other,
        note=f"{inproc['wall']:.3f} s, {_threads_text(m.get('inprocess_threads', 0))} like the fastest centralized",
    )
    for t, row in c_step.items():
        f.add(
            f"centralized_step_ms_threads{t}",
            f"centralized default step, {_threads_text(t)}",
            1000 * row["wall"],
            "ms",
            note=f"CPU {1000 * row['cpu']:.2f} ms",
            section=other,
        )
    if wire:
        f.add(
            "wire_epoch_s",
            "wire epoch, 2 node processes, loopback",
            wire["wall"],
            "s",
            note=f"coordinator CPU {wire['cpu']:.3f} s",
            section=other,
        )
    if step:
        f.add(
            "minibatch_wire_ms",
            "default preset over the wire, per step",
            1000 * step["wall"],
            "ms",
            note=f"coordinator CPU {1000 * step['cpu']:.2f} ms",
            section=other,
        )
    f.add(
        "crypto_s_per_epoch",
        "coordinator crypto per seed epoch",
        wire and wire["crypto"],
        "s",
        CRYPTO_BUDGET_EPOCH_S,
        note="AES-256-GCM and handshakes, thread CPU",
        section=other,
    )
    f.add(
        "crypto_ms_per_step",
        "coordinator crypto per default step",
        step and 1000 * step["crypto"],
        "ms",
        CRYPTO_BUDGET_STEP_MS,
        section=other,
    )
    shuffle, shuffle_step = m.get("shuffle_epoch"), m.get("shuffle_step")
    # (type: ignore[index]: mypy cannot see that `x and r[...]` indexes r only when x was measured)
    f.add(
        "privacy_cpu_cost_seed",
        "privacy's cost in coordinator CPU, seed epoch",
        shuffle and 100 * (cpu / shuffle["cpu"] - 1),
        "%",
        PRIVACY_COST_TARGET,
        note=shuffle and f"{cpu:.3f} vs {shuffle['cpu']:.3f} s with the shuffle-only disguise",
        section=other,
        signed=True,
    )
    f.add(
        "privacy_cpu_cost_default",
        "privacy's cost in coordinator CPU, default step",
        shuffle_step and 100 * (step["cpu"] / shuffle_step["cpu"] - 1),  # type: ignore[index]
        "%",
        PRIVACY_COST_TARGET,
        note=shuffle_step
        and f"{1000 * step['cpu']:.2f} vs {1000 * shuffle_step['cpu']:.2f} ms with "  # type: ignore[index]
        f"{m.get('step_control', 'shuffle')}",
        section=other,
        signed=True,
    )
    # `x and y` leaves None (or False) behind where a part was not measured.
    for item in f.items.values():
        if item["value"] is False:
            item["value"] = None
        item["note"] = item["note"] or ""
    return f


# -- the cost model and every measurement ---------------------------------------------------------
def measure_cost_model(repeats: int) -> CostModel:
    """`--offload auto`'s two figures on this machine, as CPU time of this thread:
    - madd_ns: a centralized product's CPU per multiply-add, (128, 784) @ (784, 512) in float32
      (the default preset's dtype and batch) with the BLAS threads as they are;
    - ship_ns: what the coordinator spends per element it ships in the resident design, counted
      for each element both ways: a float32 result of the default job's size (128 x 1024) sealed
      with ENS2's AES-256-GCM, opened again and added into the step's sum. (The resident
      disguises' mixings and probe checks are multiply-adds, counted apart by `product_costs`.)"""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((128, 784)).astype(np.float32)
    b = rng.standard_normal((784, 512)).astype(np.float32)
    block = rng.standard_normal((128, 1024)).astype(np.float32)
    total = np.zeros_like(block)
    sender, receiver = Channel(b"k" * 32, b"l" * 32), Channel(b"l" * 32, b"k" * 32)
    header = {"run_id": "r", "batch_id": "x", "seq": 1, "compute_seconds": 0.0}
    madd, ship = [], []

    def trip() -> None:
        opened = receiver.open(sender.seal("RESULT", header, {"c": block}))
        np.add(total, opened.arrays["c"], out=total)

    for _ in range(max(COST_SAMPLES, repeats)):
        t0 = time.thread_time()
        for _ in range(20):
            a @ b
        madd.append((time.thread_time() - t0) / (20 * a.shape[0] * a.shape[1] * b.shape[1]))
        for _ in range(SHIP_WARMUP):
            trip()
        t0 = time.thread_time()
        for _ in range(SHIP_TRIPS):
            trip()
        ship.append((time.thread_time() - t0) / (SHIP_TRIPS * block.size))
    return CostModel(
        ship_ns=statistics.median(ship) * 1e9,
        madd_ns=statistics.median(madd) * 1e9,
        source="measured by enshuffle bench",
    )


def measure_all(
    *,
    data: str | None,
    limit: int | None,
    repeats: int,
    round_trips: int,
    skip_wire: bool = False,
    skip_daemon: bool = False,
    scaling: bool = False,
    layers: tuple[int, ...] | None = None,
    activation: str | None = None,
) -> tuple[dict, dict]:
    """Every measurement `enshuffle bench` reports: (measurements, settings); `layers` and
    `activation` choose the network of the default-preset (per step) figures."""
    started = time.perf_counter()
    k7_repeats = min(repeats, GROWTH_MAX_REPEATS)
    preset = replace(get_preset("seed"), epochs=10_000)
    inputs = load_inputs(data, preset, limit)
    m: dict = {}

    eprint("bench: the offload cost model (coordinator CPU per shipped element, centralized CPU per multiply-add)")
    model = measure_cost_model(repeats)
    m["cost_model"] = {"ship_ns": model.ship_ns, "madd_ns": model.madd_ns}
    try:
        model.save(cache_dir() / COST_MODEL_FILE)
        eprint(
            f"bench: {model.ship_ns:.2f} ns per shipped element, {model.madd_ns:.4f} ns per multiply-add; "
            f"kept in {cache_dir() / COST_MODEL_FILE} for --offload auto"
        )
    except OSError as exc:
        eprint(f"bench: cannot keep the cost model in {cache_dir()}: {exc.strerror}")

    eprint("bench: plan build for 128x60000 @ 60000x784 over 7 nodes")
    m["plan_seconds"] = measure_plan(repeats)

    eprint(f"bench: centralized epochs (seed preset, full batch, float64), BLAS threads {CENTRAL_THREADS}")
    m["centralized_epoch"] = measure_centralized(preset, inputs, repeats)

    # The in-process run (coordinator and simulated nodes in one process) with the BLAS threads of
    # the fastest centralized epoch: on a loaded 2-core box the other count can be several times slower.
    threads = min(m["centralized_epoch"], key=lambda t: m["centralized_epoch"][t]["wall"])
    eprint(f"bench: in-process distributed epoch, 2 nodes, {_threads_text(threads)}")
    with _blas_threads(threads) if threads else contextlib.nullcontext():
        compute = DistributedCompute(inputs.images, 2, np.random.default_rng(1), InProcessExecutor, **inputs.source())
        m["inprocess_epoch"] = _medians(_epochs(Trainer(preset, inputs, compute), repeats))
    m["inprocess_threads"] = threads

    # --layers / --hidden / --activation choose the network of the default-preset (per step) figures
    mini = replace(get_preset("default", layers=layers, activation=activation), epochs=10_000)
    mini_inputs = load_inputs(data, mini, limit)
    eprint(
        f"bench: default preset ({mini.describe()}, mini-batches of 128, float32): centralized steps, "
        f"BLAS threads {CENTRAL_THREADS}"
    )
    m["centralized_step"] = measure_centralized(mini, mini_inputs, repeats, minibatch=True)

    if not skip_wire:
        eprint("bench: seed preset over the wire, 2 node processes on loopback")
        m["wire_epoch"] = measure_wire(preset, inputs, repeats)
        eprint("bench: default preset over the wire, 2 node processes")
        m["wire_step"] = measure_wire(mini, mini_inputs, repeats, minibatch=True)
        eprint(
            "bench: the same two runs with their controls, the shuffle-only disguise for the seed preset and "
            "resident-clear (no mixing, no noise) for the resident default preset (privacy's cost)"
        )
        m["shuffle_epoch"] = measure_wire(preset, inputs, repeats, disguise="shuffle")
        control = "resident-clear" if default_disguise(mini) == "resident" else "shuffle"
        m["shuffle_step"] = measure_wire(mini, mini_inputs, repeats, minibatch=True, disguise=control)
        m["step_control"] = control
        eprint(f"bench: seed preset with {GROWTH_NODES} node processes (median of {k7_repeats})")
        m["wire_epoch_k7"] = measure_wire(preset, inputs, k7_repeats, nodes=GROWTH_NODES)
        eprint(
            f"bench: {round_trips} small products one at a time, to a node with every CPU's BLAS "
            "threads and to one with --threads 1"
        )
        m["round_trips"] = measure_round_trips(mini_inputs, round_trips)
        if not skip_daemon:
            epochs = repeats + 1
            eprint(
                f"bench: `enshuffle coordinator` with 2 `enshuffle node --threads 1` processes, seed preset, "
                f"{epochs} epochs"
            )
            m["daemon"] = measure_daemon(data, limit, epochs)

    if scaling and not skip_wire:
        m["scaling"] = measure_scaling(data, limit, repeats)

    settings = {
        "repeats": repeats,
        "k7_repeats": k7_repeats,
        "train_images": int(inputs.images["train"].shape[0]),
        "seed_network": preset.describe(),  # the network of the seed-preset (per epoch) figures
        "default_network": mini.describe(),  # the network of the default-preset (per step) figures
        "round_trip_products": round_trips,
        "skip_wire": bool(skip_wire),
        "skip_daemon": bool(skip_wire or skip_daemon),
        "seconds": time.perf_counter() - started,
    }
    m["k7_repeats"] = k7_repeats
    return m, settings
