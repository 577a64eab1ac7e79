"""Round-trip latency of small products on real `enshuffle node` processes (a benchmark, not a test).

For work on the node itself; `enshuffle bench` measures the same round trip for its table. One
in-process CoordinatorServer on loopback and one `enshuffle node` process per configuration,
all at once: each product goes to one node, the next only after its result came back (and was
checked), and the nodes take turns in a freshly shuffled order, so every configuration sees the
same machine load (on a shared 2-core box that matters more than anything measured). Prints per
configuration the median, p90 and p99 round trip, and the node process's CPU time and minor page
faults per product (after a warm-up):

    .venv/bin/python scripts/node_latency_bench.py [--products 500] [--threads default 1]

A configuration is `default` (no --threads: what a volunteer runs), a number N (--threads N), or
DIR:THREADS to run the node from another copy of the package (it runs in DIR, with DIR on its
PYTHONPATH), e.g. a before/after of the node on the same load:

    git archive OLD enshuffle | tar -x -C /tmp/old
    .venv/bin/python scripts/node_latency_bench.py --threads /tmp/old:default /tmp/old:1 default 1

Each node serves one slot of `--images` random images: with k configurations a static block is
images x 784/k float32, and `--rows` defaults to 128 x k/2 rows so that a product has the
default preset's 6.4M multiply-adds ((128x392)·(392x128) with 2 nodes). `--rows N` with
N = --images makes full-batch products (rows a permutation). `--transpose` sends S[rows].T @ b.
`--no-check` turns the coordinator's Freivalds check off, to see the node alone; `--hog` keeps one
busy-looping process running alongside (a volunteer's own work, another job on the box).
Environment: NODE_PROFILE=FILE runs each node under cProfile (FILE.N); NODE_WRAPPER=PROG runs
`PROG python -m enshuffle node ...` (e.g. a script calling perf record).
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
from enshuffle.coordinator.cluster import node_args, stop_local_nodes
from enshuffle.coordinator.run import coordinator_blas_threads
from enshuffle.coordinator.server import CoordinatorServer, Listener, ServerConfig
from enshuffle.coordinator.state import CoordinatorState
from enshuffle.protocol.keys import load_or_create_identity

WARMUP = 20  # products per node before measuring: statics, first leases, BLAS start-up


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def proc_counters(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of process `pid` so far, every thread."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def spawn_node(endpoint: str, fingerprint: str, home: Path, name: str, config: str, index: int) -> subprocess.Popen:
    path, _, threads = config.rpartition(":")
    profile = os.environ.get("NODE_PROFILE")
    prefix = ["-m", "cProfile", "-o", f"{profile}.{index}"] if profile else []
    args = [sys.executable, *prefix, "-m", "enshuffle", *node_args(endpoint, fingerprint, name)]
    if threads != "default":
        args += ["--threads", threads]
    wrapper = os.environ.get("NODE_WRAPPER")
    if wrapper:
        args = [wrapper, *args]
    env = {**os.environ, "ENSHUFFLE_HOME": str(home)}
    if path:  # another copy of the package, ahead of the installed one
        env["PYTHONPATH"] = path
    log = open(home / "node.log", "wb")
    try:
        # `python -m` puts the working directory first on sys.path: run from DIR, or a checkout
        # in the current directory would shadow it.
        return subprocess.Popen(
            args,
            env=env,
            cwd=path or None,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def measure(
    configs: list[str], products: int, rows: int | None, images: int, check: bool, transpose: bool
) -> tuple[dict, str]:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(images, 784)).astype(np.float32)
    names = [f"n{i}" for i in range(len(configs))]
    with tempfile.TemporaryDirectory(prefix="enshuffle-nodelat-") as tmp, coordinator_blas_threads():
        tmp = Path(tmp)
        identity = load_or_create_identity("coordinator", tmp / "coordinator")
        keys = set()
        for name in names:
            (tmp / name).mkdir(mode=0o700)
            keys.add(load_or_create_identity("node", tmp / name, name=name).public_bytes)
        listener = Listener("tcp://127.0.0.1:*")
        procs = [
            spawn_node(listener.endpoint, identity.fingerprint, tmp / name, name, config, i)
            for i, (name, config) in enumerate(zip(names, configs))
        ]
        ledger = ExposureLedger()
        server = DistributedCompute(
            {"train": x},
            len(configs),
            np.random.default_rng(2),
            CoordinatorServer.factory(
                listener,
                identity,
                CoordinatorState(),
                ledger,
                config=ServerConfig(verify_results=check),
                admission=Admission(auto=keys),
            ),
            ledger=ledger,
        ).executor
        try:
            server.wait_for_nodes(len(configs))
            shard_of = {server.sessions[node_id].name: shard for shard, node_id in enumerate(server.owner)}
            statics = {shard: server.static_arrays(shard)[static_name("train", shard)] for shard in shard_of.values()}
            k = next(iter(statics.values())).shape[1]
            n = rows or min(images, max(1, 128 * len(configs) // 2))
            shape = f"({k}x{n})·({n}x128)" if transpose else f"({n}x{k})·({k}x128)"

            def product(shard: int) -> Batch:
                static = statics[shard]
                picked = rng.permutation(static.shape[0])[:n] if n < static.shape[0] else rng.permutation(n)
                b = rng.standard_normal((n, 128) if transpose else (static.shape[1], 128)).astype(np.float32)
                return Batch(
                    shard,
                    "matmul",
                    {"a_static": static_name("train", shard), "transpose_a": transpose},
                    {"rows": picked, "b": b},
                )

            for _ in range(WARMUP):
                for shard in shard_of.values():
                    server.run([product(shard)])
            times = {name: [] for name in names}
            before = {name: proc_counters(p.pid) for name, p in zip(names, procs)}
            order = list(names)
            for _ in range(products):
                rng.shuffle(order)
                for name in order:
                    batch = product(shard_of[name])
                    start = time.perf_counter()
                    server.run([batch])
                    times[name].append(1000 * (time.perf_counter() - start))
            after = {name: proc_counters(p.pid) for name, p in zip(names, procs)}
        finally:
            server.close("run-finished")
            stop_local_nodes(procs)
    results = {}
    for name, config in zip(names, configs):
        ms = times[name]
        results[config] = {
            "median": statistics.median(ms),
            "p90": percentile(ms, 0.9),
            "p99": percentile(ms, 0.99),
            "cpu_ms": 1000 * (after[name][0] - before[name][0]) / products,
            "faults": (after[name][1] - before[name][1]) / products,
        }
    return results, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, default=500, help="products per configuration")
    parser.add_argument("--rows", type=int, default=None, help="rows of the static block per product")
    parser.add_argument("--images", type=int, default=60000, help="rows of each static block")
    parser.add_argument(
        "--threads",
        nargs="+",
        default=["default", "1"],
        help="node configurations: default, N or DIR:THREADS (one node process each)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="measure this many times (new node processes)")
    parser.add_argument("--transpose", action="store_true", help="S[rows].T @ b (the backward product)")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--hog", action="store_true", help="one busy-looping process alongside")
    args = parser.parse_args()
    for _ in range(args.repeats):
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.hog else None
        try:
            results, shape = measure(args.threads, args.products, args.rows, args.images, args.check, args.transpose)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
        print(
            f"{args.products} products {shape} float32 per node, check {'on' if args.check else 'off'}, "
            f"hog {'on' if args.hog else 'off'}, load average {os.getloadavg()[0]:.1f}"
        )
        for config, r in results.items():
            print(
                f"  node {config:>22}: median {r['median']:.2f} ms, p90 {r['p90']:.2f} ms, p99 {r['p99']:.2f} ms; "
                f"node CPU {r['cpu_ms']:.2f} ms, {r['faults']:.0f} page faults per product",
                flush=True,
            )


if __name__ == "__main__":
    main()
