"""`enshuffle bench`: the performance figures, measured side by side in one run.

Each figure is the median of `--repeats` repetitions; ratios are taken between medians measured
in this same run, so a noisy machine moves numerator and denominator together. It is a
benchmark, not a test: nothing here fails on a time.

Measured, for the seed preset (full batch, float64, all training images):
- plan build time for the notebook's largest operation (128x60000 @ 60000x784, 7 nodes),
  against the notebook's own 70.8 s (measured on this machine class, see docs/design.md);
- centralized epoch: wall and CPU seconds (BLAS may use every core);
- in-process distributed epoch (2 nodes): wall seconds;
- wire epoch with 2 local node processes over loopback: wall seconds, the coordinator
  process's own CPU seconds, bytes sent and received per epoch and per step per node;
- the coordinator's cryptography (handshakes, AES-256-GCM sealing and opening) per seed-preset
  epoch and per default-preset step, beside the budget (0.1 s and 0.5 ms).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NOTEBOOK_PLAN_SECONDS = 70.8
CRYPTO_BUDGET_EPOCH_S = 0.1    # seed preset, per epoch (issue 8)
CRYPTO_BUDGET_STEP_MS = 0.5    # default preset, per step


def _median(values):
    return float(statistics.median(values))


def measure_plan(repeats: int) -> float:
    from enshuffle.coordinator.plan import build_matmul_plan

    rng = np.random.default_rng(0)
    times = []
    for _ in range(max(repeats, 5)):
        t = time.perf_counter()
        build_matmul_plan(128, 60000, 784, 7, rng)
        times.append(time.perf_counter() - t)
    return _median(times)


def _epochs(trainer, repeats: int, warmup: int = 1, probe=None):
    """Run warmup + repeats epochs; per measured epoch: (wall, cpu, probe delta)."""
    for _ in range(warmup):
        trainer.run_epoch()
    rows = []
    for _ in range(repeats):
        before = probe() if probe else 0
        w, c = time.perf_counter(), time.process_time()
        trainer.run_epoch()
        rows.append((time.perf_counter() - w, time.process_time() - c, (probe() - before) if probe else 0))
    return rows


def _steps(trainer, repeats: int, chunk: int = 60, warmup: int = 10, cpu: list | None = None) -> list[float]:
    """Seconds per step, one figure per chunk of `chunk` steps (CPU seconds per step into `cpu`)."""
    for _ in range(warmup):
        trainer.run_step()
    figures = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(chunk):
            trainer.run_step()
        figures.append((time.perf_counter() - t) / chunk)
        if cpu is not None:
            cpu.append((time.process_time() - c) / chunk)
    return figures


def cmd_bench(args) -> int:
    from dataclasses import replace

    from enshuffle.coordinator.commands import eprint, load_inputs
    from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
    from enshuffle.coordinator.training import Trainer
    from enshuffle.model import LocalCompute, get_preset

    repeats = args.repeats
    preset = replace(get_preset("seed"), epochs=10_000)
    args.limit = None
    inputs = load_inputs(args, preset)
    n = inputs.images["train"].shape[0]
    results: dict[str, float] = {"train_images": n, "repeats": repeats}

    eprint("bench: plan build for 128x60000 @ 60000x784 over 7 nodes")
    results["plan_seconds"] = measure_plan(repeats)
    results["plan_speedup_vs_notebook"] = NOTEBOOK_PLAN_SECONDS / results["plan_seconds"]

    eprint("bench: centralized epoch (seed preset, full batch, float64)")
    rows = _epochs(Trainer(preset, inputs, LocalCompute(inputs.images)), repeats)
    results["centralized_epoch_seconds"] = _median(r[0] for r in rows)
    results["centralized_epoch_cpu_seconds"] = _median(r[1] for r in rows)

    eprint("bench: in-process distributed epoch, 2 nodes")
    compute = DistributedCompute(inputs.images, 2, np.random.default_rng(1), InProcessExecutor, **inputs.source())
    rows = _epochs(Trainer(preset, inputs, compute), repeats)
    results["inprocess_epoch_seconds"] = _median(r[0] for r in rows)
    results["inprocess_over_centralized"] = results["inprocess_epoch_seconds"] / results["centralized_epoch_seconds"]

    mini = replace(get_preset("default"), epochs=10_000)
    mini_inputs = load_inputs(args, mini)
    eprint("bench: default preset (mini-batches of 128, float32): centralized steps")
    results["minibatch_centralized_ms_per_step"] = 1000 * _median(
        _steps(Trainer(mini, mini_inputs, LocalCompute(mini_inputs.images)), repeats))

    if not args.skip_wire:
        eprint("bench: wire epoch, 2 local node processes over loopback")
        results.update(measure_wire(preset, inputs, repeats))
        eprint("bench: default preset over the wire, 2 local node processes")
        results.update(measure_wire(mini, mini_inputs, repeats, minibatch=True))
        # What the privacy costs, side by side: the same runs with the old shuffle-only disguise.
        eprint("bench: the same two runs with the shuffle-only disguise (privacy's cost)")
        shuffle = measure_wire(preset, inputs, repeats, disguise="shuffle")
        shuffle_mini = measure_wire(mini, mini_inputs, repeats, minibatch=True, disguise="shuffle")
        results["shuffle_coordinator_cpu_seconds_per_epoch"] = shuffle["coordinator_cpu_seconds_per_epoch"]
        results["shuffle_minibatch_coordinator_cpu_ms_per_step"] = shuffle_mini["minibatch_coordinator_cpu_ms_per_step"]
        results["privacy_cpu_cost_seed"] = (results["coordinator_cpu_seconds_per_epoch"]
                                            / shuffle["coordinator_cpu_seconds_per_epoch"] - 1.0)
        results["privacy_cpu_cost_default"] = (results["minibatch_coordinator_cpu_ms_per_step"]
                                               / shuffle_mini["minibatch_coordinator_cpu_ms_per_step"] - 1.0)
        results["minibatch_wire_over_centralized"] = (results["minibatch_wire_ms_per_step"]
                                                      / results["minibatch_centralized_ms_per_step"])
        results["wire_over_centralized"] = results["wire_epoch_seconds"] / results["centralized_epoch_seconds"]
        results["coordinator_cpu_over_centralized_cpu"] = (results["coordinator_cpu_seconds_per_epoch"]
                                                           / results["centralized_epoch_cpu_seconds"])

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


def measure_wire(preset, inputs, repeats: int, nodes: int = 2, minibatch: bool = False,
                 disguise: str = "share") -> dict[str, float]:
    from enshuffle.coordinator.distributed import DistributedCompute
    from enshuffle.coordinator.ledger import ExposureLedger
    from enshuffle.coordinator.run import spawn_local_nodes, stop_local_nodes
    from enshuffle.coordinator.server import CoordinatorServer
    from enshuffle.coordinator.state import CoordinatorState
    from enshuffle.coordinator.training import Trainer
    from enshuffle.protocol.keys import load_or_create_identity

    from enshuffle.coordinator.admission import Admission
    from enshuffle.coordinator.run import coordinator_blas_threads, local_node_keys

    from enshuffle.protocol.messages import Channel

    Channel.clock = staticmethod(time.thread_time)  # CPU time: what the crypto costs this process
    with tempfile.TemporaryDirectory(prefix="enshuffle-bench-") as tmp, coordinator_blas_threads():
        identity = load_or_create_identity("coordinator", Path(tmp) / "coordinator")
        server = CoordinatorServer("tcp://127.0.0.1:*", identity, CoordinatorState(), ExposureLedger(),
                                   admission=Admission(auto=set(local_node_keys(Path(tmp), nodes))))
        procs = spawn_local_nodes(server.endpoint, identity.fingerprint, nodes, Path(tmp))
        try:
            compute = DistributedCompute(inputs.images, nodes, np.random.default_rng(2), server.attach,
                                         ledger=server.ledger, disguise=disguise, **inputs.source())
            server.wait_for_nodes(nodes)
            trainer = Trainer(preset, inputs, compute)
            if minibatch:
                for _ in range(10):
                    trainer.run_step()  # warm-up outside the crypto figure too
                crypto = server.crypto_total()
                cpu = []
                figures = _steps(trainer, repeats, warmup=0, cpu=cpu)
                steps_run = repeats * 60
                return {"minibatch_wire_ms_per_step": 1000 * _median(figures),
                        "minibatch_coordinator_cpu_ms_per_step": 1000 * _median(cpu),
                        "crypto_ms_per_step": 1000 * (server.crypto_total() - crypto) / steps_run}
            trainer.run_epoch()  # warm-up: statics and handshakes are a start-up cost, not per epoch
            crypto = server.crypto_total()
            rows = _epochs(trainer, repeats, warmup=0, probe=lambda: server.bytes_sent)
            crypto_per_epoch = (server.crypto_total() - crypto) / repeats
            before = server.bytes_received
            trainer.run_epoch()
            received = server.bytes_received - before
        finally:
            server.close("run-finished")
            stop_local_nodes(procs)
    steps = trainer.steps_per_epoch
    sent = _median(r[2] for r in rows)
    return {
        "wire_epoch_seconds": _median(r[0] for r in rows),
        "coordinator_cpu_seconds_per_epoch": _median(r[1] for r in rows),
        "wire_bytes_sent_per_epoch": sent,
        "wire_bytes_received_per_epoch": received,
        "wire_bytes_per_step_per_node": (sent + received) / steps / nodes,
        "crypto_seconds_per_epoch": crypto_per_epoch,
    }


def print_table(r: dict) -> None:
    lines = [
        f"training images                         {r['train_images']:>12,.0f}   (median of {r['repeats']} runs each)",
        f"plan build, 128x60000 @ 60000x784, k=7  {r['plan_seconds'] * 1000:>12.3f} ms"
        f"  (notebook: {NOTEBOOK_PLAN_SECONDS} s, {r['plan_speedup_vs_notebook']:,.0f}x faster)",
        f"centralized epoch (seed, float64)       {r['centralized_epoch_seconds']:>12.3f} s"
        f"  (CPU {r['centralized_epoch_cpu_seconds']:.3f} s)",
        f"in-process distributed epoch, 2 nodes   {r['inprocess_epoch_seconds']:>12.3f} s"
        f"  (ratio to centralized {r['inprocess_over_centralized']:.2f})",
    ]
    lines.append(f"default preset, ms per step (batch 128)  {r['minibatch_centralized_ms_per_step']:>12.2f} ms"
                 "  centralized")
    if "wire_epoch_seconds" in r:
        lines += [
            f"wire epoch, 2 node processes, loopback  {r['wire_epoch_seconds']:>12.3f} s"
            f"  (ratio to centralized {r['wire_over_centralized']:.2f}; target <= 1.5)",
            f"coordinator CPU per wire epoch          {r['coordinator_cpu_seconds_per_epoch']:>12.3f} s"
            f"  ({100 * r['coordinator_cpu_over_centralized_cpu']:.0f}% of centralized CPU; target <= 25%)",
            f"bytes sent / received per epoch         {r['wire_bytes_sent_per_epoch'] / 1e6:>12.1f} MB"
            f" / {r['wire_bytes_received_per_epoch'] / 1e6:.1f} MB",
            f"bytes per step per node (in + out)      {r['wire_bytes_per_step_per_node'] / 1e6:>12.1f} MB",
            f"default preset over the wire, per step  {r['minibatch_wire_ms_per_step']:>12.2f} ms"
            f"  ({r['minibatch_wire_over_centralized']:.1f}x centralized; 469 steps per epoch)",
            f"coordinator CPU per default-preset step {r['minibatch_coordinator_cpu_ms_per_step']:>12.2f} ms",
            f"privacy's cost in coordinator CPU, seed {100 * r['privacy_cpu_cost_seed']:>+11.1f} %"
            f"  ({r['coordinator_cpu_seconds_per_epoch']:.3f} s vs {r['shuffle_coordinator_cpu_seconds_per_epoch']:.3f} s"
            " per epoch with the shuffle-only disguise; target <= +10%)",
            f"privacy's cost, default preset per step {100 * r['privacy_cpu_cost_default']:>+11.1f} %"
            f"  ({r['minibatch_coordinator_cpu_ms_per_step']:.2f} vs {r['shuffle_minibatch_coordinator_cpu_ms_per_step']:.2f}"
            " ms; target <= +10%)",
            f"coordinator crypto per seed epoch       {r['crypto_seconds_per_epoch']:>12.3f} s"
            f"  (budget {CRYPTO_BUDGET_EPOCH_S} s: AES-256-GCM over every byte sent and received)",
            f"coordinator crypto per default step     {r['crypto_ms_per_step']:>12.3f} ms"
            f"  (budget {CRYPTO_BUDGET_STEP_MS} ms)",
        ]
    print("\n".join(lines))
    sys.stdout.flush()
