"""Round-trip latency of small products on a real `enshuffle node` process (a benchmark, not a test).

For work on the node itself; `enshuffle bench` measures the same round trip for its table.
Starts an in-process CoordinatorServer and ONE `enshuffle node` process on loopback, lets it
receive a float32 static block (`--images` random images, one slot: images x 784), then sends
`--batches` small products one at a time (`server.run([batch])`, the next only after the
previous result came back and was checked) and prints, per node configuration, the median and
p90 wall time per round trip and the node process's CPU time and minor page faults per product:

    .venv/bin/python scripts/node_latency_bench.py [--batches 300] [--rows 128] [--threads default 1]

A configuration is `default` (no --threads: what a volunteer runs), a number N (--threads N),
or DIR:THREADS to run the node from another copy of the package (it runs in DIR, with DIR on its
PYTHONPATH; e.g. `git archive OLD enshuffle | tar -x -C DIR` for a before/after).
`--repeats` alternates the configurations. `--no-check` turns the coordinator's Freivalds check
off, to see the node alone. `--hog` keeps one busy-looping process running during each
measurement (a volunteer's own work, or another job on a shared box): on 2 cores that is when
threads that wait for each other cost most. Environment: NODE_PROFILE=FILE runs the node under cProfile;
NODE_WRAPPER=PROG runs `PROG python -m enshuffle node ...` (e.g. a script calling perf record).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.distributed import Batch, DistributedCompute, static_name
from enshuffle.coordinator.ledger import ExposureLedger
from enshuffle.coordinator.run import coordinator_blas_threads, local_node_keys, stop_local_nodes
from enshuffle.coordinator.server import CoordinatorServer
from enshuffle.coordinator.state import CoordinatorState
from enshuffle.protocol.keys import load_or_create_identity


PROFILE = os.environ.get("NODE_PROFILE")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def node_faults(pid: int) -> int:
    """Minor page faults of process `pid` so far."""
    return int(_stat(pid)[7])


def node_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn_node(endpoint: str, fingerprint: str, home: Path, threads: str, path: str = "") -> subprocess.Popen:
    prefix = ["-m", "cProfile", "-o", PROFILE] if PROFILE else []
    args = [sys.executable, *prefix, "-m", "enshuffle", "node", "--connect", endpoint, "--coordinator-key", fingerprint,
            "--name", "local-1"]
    if threads != "default":
        args += ["--threads", threads]
    wrapper = os.environ.get("NODE_WRAPPER")  # e.g. a script running the node under perf record
    if wrapper:
        args = [wrapper, *args]
    log = open(home / "node.log", "wb")
    try:
        env = {**os.environ, "ENSHUFFLE_HOME": str(home)}
        if path:  # another copy of the package (e.g. an old commit's), ahead of the installed one
            env["PYTHONPATH"] = path
        # `python -m` puts the working directory first on sys.path: run from DIR, or a checkout
        # under the current directory would shadow it.
        return subprocess.Popen(args, env=env, cwd=path or None,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()


def measure(config: str, batches: int, rows: int, images: int, check: bool, transpose: bool) -> dict:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(images, 784)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="enshuffle-nodelat-") as tmp, coordinator_blas_threads():
        tmp = Path(tmp)
        identity = load_or_create_identity("coordinator", tmp / "coordinator")
        server = CoordinatorServer("tcp://127.0.0.1:*", identity, CoordinatorState(), ExposureLedger(),
                                   admission=Admission(auto=set(local_node_keys(tmp, 1))))
        server.verify_results = check
        path, _, threads = config.rpartition(":")
        node = spawn_node(server.endpoint, identity.fingerprint, tmp / "node-1", threads, path)
        try:
            compute = DistributedCompute({"train": x}, 1, np.random.default_rng(2), server.attach)
            server.wait_for_nodes(1)
            name = static_name("train", 0)
            static = server.static_arrays(0)[name]
            k = static.shape[1]
            shape = f"({k}x{rows})·({rows}x128)" if transpose else f"({rows}x{k})·({k}x128)"

            def batch() -> Batch:
                idx = rng.choice(static.shape[0], size=rows, replace=False)
                b = rng.standard_normal((rows, 128) if transpose else (k, 128)).astype(np.float32)
                return Batch(0, "matmul", {"a_static": name, "transpose_a": transpose}, {"rows": idx, "b": b})

            times = []
            for i in range(batches + 20):
                if i == 20:  # after the warm-up: statics, first leases, BLAS start-up
                    faults_before, cpu_before = node_faults(node.pid), node_cpu(node.pid)
                bt = batch()
                start = time.perf_counter()
                (c,) = server.run([bt])
                elapsed = time.perf_counter() - start
                server.step_done()
                if i >= 20:
                    times.append(elapsed)
            faults = node_faults(node.pid) - faults_before
            cpu = node_cpu(node.pid) - cpu_before
            del compute
        finally:
            server.close("run-finished")
            stop_local_nodes([node])
    ms = [1000 * t for t in times]
    return {"median": statistics.median(ms), "p90": percentile(ms, 0.9), "max": max(ms),
            "faults": faults / batches, "cpu_ms": 1000 * cpu / batches, "shape": shape}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--rows", type=int, default=128, help="rows of the static block per product")
    parser.add_argument("--images", type=int, default=6000, help="rows of the static block")
    parser.add_argument("--threads", nargs="+", default=["default", "1"],
                        help="node configurations: THREADS or DIR:THREADS (DIR on the node's PYTHONPATH)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the configurations this many times")
    parser.add_argument("--transpose", action="store_true", help="S[rows].T @ b (the backward product)")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--hog", action="store_true", help="one busy-looping process alongside")
    args = parser.parse_args()
    for _ in range(args.repeats):
        for threads in args.threads:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
            try:
                r = measure(threads, args.batches, args.rows, args.images, args.check, args.transpose)
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            print(f"node {threads:>24}: median {r['median']:.2f} ms, p90 {r['p90']:.2f} ms, "
                  f"max {r['max']:.1f} ms; node CPU {r['cpu_ms']:.2f} ms, {r['faults']:.0f} page faults per "
                  f"product ({args.batches} products {r['shape']} float32)", flush=True)


if __name__ == "__main__":
    main()
