#!/usr/bin/env python3
"""Sweep the result checks (enshuffle.coordinator.verify) over real batches: a benchmark, not a test.

Trains a preset in-process (DistributedCompute with an executor that computes each batch as an
honest node would) and, for every product over a static operand (static[rows] @ b and
static[rows].T @ b, the only kinds of batch nodes compute), checks the honest result with fresh
probes; on every `--lie-every`-th batch it also checks one lie of each kind:

- single:   one random entry off by REL x the RMS of the result (REL: 1e-4 float32, 1e-11 float64)
- single-own: one random entry off by REL x its own magnitude (entries near zero are harmless
            and hard to see: reported, not a target)
- scale:    every entry times (1 + BIAS) (BIAS: 1e-6 float32, 1e-13 float64)
- bias:     every entry plus BIAS x its own magnitude (a same-sign bias)
- nan:      one entry NaN
- zeros:    the whole result zero
- scaled:   every entry times 1.0001

It prints a table: caught/tried per kind, false alarms per honest batch, and the check's CPU time
as a share of the node's product time (both measured here, same process, same BLAS threads).

    .venv/bin/python scripts/verify_sweep.py --preset default --dtype float32 --honest 100000
    .venv/bin/python scripts/verify_sweep.py --preset seed --dtype float64 --limit 2000 --honest 20000
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.coordinator.verify import StaticNorms, judge, measure_matmul
from enshuffle.dataset import load_dataset
from enshuffle.model import get_preset
from enshuffle.kernels import compute_batch

SINGLE = {"float32": 1e-4, "float64": 1e-11}
BIAS = {"float32": 1e-6, "float64": 1e-13}
KINDS = ("single", "single-own", "scale", "bias", "nan", "zeros", "scaled")


def lie(kind: str, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dtype = c.dtype.name
    w = c.astype(np.float64)
    if kind in ("single", "single-own"):
        i = int(rng.integers(c.size))
        size = np.sqrt(np.mean(w * w)) if kind == "single" else abs(w.flat[i])
        w.flat[i] += SINGLE[dtype] * size * rng.choice((-1.0, 1.0))
    elif kind == "scale":
        w *= 1 + BIAS[dtype]
    elif kind == "bias":
        w += BIAS[dtype] * np.abs(w)
    elif kind == "nan":
        w.flat[int(rng.integers(c.size))] = np.nan
    elif kind == "zeros":
        w[:] = 0
    elif kind == "scaled":
        w *= 1.0001
    out = w.astype(c.dtype)
    return out


class SweepExecutor(InProcessExecutor):
    def __init__(self, compute, args, stats):
        super().__init__(compute)
        self.args = args
        self.stats = stats
        self.rng = np.random.default_rng(args.seed)
        self.norms = {}
        self.recorded = []  # (shard, static name, params, b, rows per batch) of real batches, for --resample

    def run(self, batches):
        results = []
        for batch in batches:
            statics = self.statics[batch.shard]
            t0 = time.process_time()
            c = compute_batch(batch.op, batch.params, batch.arrays, statics)
            node = time.process_time() - t0
            results.append(c)
            name = batch.params.get("a_static")
            if batch.op != "matmul" or (not name and not self.args.dynamic) or self.stats["honest"] >= self.args.honest:
                continue
            static = statics[name] if name else None
            norms = self._norms(name, static) if name else None
            if self.args.record is not None and name and len(self.recorded) < self.args.record:
                self.recorded.append(
                    (
                        batch.shard,
                        name,
                        dict(batch.params),
                        batch.arrays["b"].copy(),
                        int(batch.arrays["rows"].shape[0]),
                    )
                )
            self.check(c, batch.arrays, batch.params, static, norms, name, node)
        return results

    def _norms(self, name, static):
        """One StaticNorms per static for the run, as the coordinator keeps them (its probes are drawn once)."""
        if name not in self.norms:
            self.norms[name] = StaticNorms(static, self.rng)
        return self.norms[name]

    def check(self, c, arrays, params, static, norms, name, node):
        """The honest check of one batch, and (every --lie-every) one check per kind of lie."""
        if True:
            batch_params = params
            t0 = time.process_time()
            res = measure_matmul(c, arrays, params, self.rng, static, norms)
            problem = judge(res)
            self.stats["check_seconds"] += time.process_time() - t0
            margins = self.stats["honest_max"]
            margins["worst"] = max(margins["worst"], float(res.worst.max()))
            if res.level is not None:
                margins["level"] = max(margins["level"], res.level)
                margins["worst/reference"] = max(
                    margins["worst/reference"], float(res.worst.max()) / max(res.reference, 0.02)
                )
                for beta, t in res.fits.values():
                    margins["|t|"] = max(margins["|t|"], t)
                    margins["|beta|/u"] = max(margins["|beta|/u"], abs(beta) / res.unit)
            self.stats["node_seconds"] += node
            self.stats["honest"] += 1
            if self.stats["honest"] % 10000 == 0:
                print(
                    f"  {self.stats['honest']} honest batches, {self.stats['false_alarms']} false alarms",
                    file=sys.stderr,
                    flush=True,
                )
            if problem is not None:
                self.stats["false_alarms"] += 1
                self.stats["false_alarm_examples"].append(problem)
            if self.stats["honest"] % self.args.lie_every == 0:
                for kind in KINDS:
                    wrong = lie(kind, c, self.rng)
                    lied = measure_matmul(wrong, arrays, params, self.rng, static, norms)
                    caught = judge(lied) is not None
                    if kind == "single" and lied.reference is not None:
                        self.stats["single_ratios"].append(float(lied.worst.max()) / max(lied.reference, 0.02))
                        kind_key = (
                            (("static " + name.split(".")[0]) if name else "sent")
                            + (" T" if batch_params.get("transpose_a") else "")
                            + f" {c.shape}"
                        )
                        self.stats["by_kind"].setdefault(kind_key, []).append(
                            (
                                float(lied.worst.max()) / max(lied.reference, 0.02),
                                float(res.worst.max()) / max(res.reference, 0.02),
                            )
                        )
                    tried, got = self.stats["lies"].get(kind, (0, 0))
                    self.stats["lies"][kind] = (tried + 1, got + int(caught))

    def resample(self, count: int) -> None:
        """`count` more honest batches from the recorded real ones: the same static block and a
        recorded operand b, with a fresh random choice of rows (a mini-batch is random rows)."""
        while self.stats["honest"] < count:
            shard, name, params, b, n_rows = self.recorded[int(self.rng.integers(len(self.recorded)))]
            static = self.statics[shard][name]
            rows = (
                np.sort(self.rng.choice(static.shape[0], n_rows, replace=False))
                if n_rows < static.shape[0]
                else self.rng.permutation(static.shape[0])
            )
            arrays = {"rows": rows, "b": b}
            t0 = time.process_time()
            c = compute_batch("matmul", params, arrays, self.statics[shard])
            node = time.process_time() - t0
            self.check(c, arrays, params, static, self._norms(name, static), name, node)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=["seed", "default"], default="default")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--limit", type=int, default=None, help="training images (seed preset: full batch of these)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--honest", type=int, default=10000, help="honest batches to check")
    p.add_argument("--lie-every", type=int, default=20, help="check one lie of each kind every N honest batches")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="also check products of two sent operands (a1@w2, a1.T@dz2, dz2@w2.T), which issue 7 "
        "moves to the coordinator",
    )
    p.add_argument(
        "--record",
        type=int,
        default=None,
        metavar="N",
        help="train only until N real static-product batches are recorded, then draw the rest of "
        "the honest batches from them (same static block and operand b, fresh random rows)",
    )
    p.add_argument("--verbose", action="store_true", help="the outlier statistic per kind of batch")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    preset = get_preset(args.preset, dtype=args.dtype, epochs=10**6)
    inputs = prepare(load_dataset(None, log=lambda line: print(line, file=sys.stderr)), preset, args.limit)
    stats = {
        "honest": 0,
        "false_alarms": 0,
        "false_alarm_examples": [],
        "single_ratios": [],
        "by_kind": {},
        "lies": {},
        "check_seconds": 0.0,
        "node_seconds": 0.0,
        "honest_max": {"worst": 0.0, "level": 0.0, "worst/reference": 0.0, "|t|": 0.0, "|beta|/u": 0.0},
    }
    compute = DistributedCompute(
        inputs.images,
        args.shards,
        np.random.default_rng(args.seed),
        lambda c: SweepExecutor(c, args, stats),
        **inputs.source(),
    )
    trainer = Trainer(preset, inputs, compute, secret=args.seed)
    started = time.monotonic()
    executor = compute.executor
    while stats["honest"] < args.honest and (args.record is None or len(executor.recorded) < args.record):
        trainer.run_step()
    if args.record is not None:
        executor.resample(args.honest)
    row = {
        "preset": preset.name,
        "dtype": preset.dtype,
        "limit": args.limit,
        "shards": args.shards,
        "honest_batches": stats["honest"],
        "false_alarms": stats["false_alarms"],
        "lies": {k: {"tried": t, "caught": g} for k, (t, g) in stats["lies"].items()},
        "check_share_of_node_cpu": stats["check_seconds"] / max(stats["node_seconds"], 1e-9),
        "honest_max": stats["honest_max"],
        "wall_seconds": time.monotonic() - started,
        "false_alarm_examples": stats["false_alarm_examples"][:3],
    }
    if args.json:
        print(json.dumps(row))
        return 0
    print(
        f"{preset.name} preset, {preset.dtype}, {args.shards} shards, limit {args.limit}: "
        f"{stats['honest']} honest batches, {stats['false_alarms']} false alarms; check CPU "
        f"{100 * row['check_share_of_node_cpu']:.1f}% of the node's product CPU"
    )
    for kind in KINDS:
        t, g = stats["lies"].get(kind, (0, 0))
        print(f"  {kind:<11} caught {g}/{t} ({100 * g / max(t, 1):.2f}%)")
    print(
        "  largest honest statistics (limits in enshuffle/coordinator/verify.py): "
        + ", ".join(f"{k} {v:.3g}" for k, v in stats["honest_max"].items())
    )
    if stats["single_ratios"]:
        q = np.quantile(stats["single_ratios"], [0.001, 0.01, 0.05, 0.5])
        print("  single lies, worst/reference quantiles 0.1% 1% 5% 50%: " + " ".join(f"{v:.3g}" for v in q))
    if args.verbose:
        for key, pairs in sorted(stats["by_kind"].items()):
            lies, honest = np.array(pairs).T
            print(
                f"    {key}: single lie worst/reference min {lies.min():.3g} p5 {np.quantile(lies, 0.05):.3g}; "
                f"honest max {honest.max():.3g} (n={len(pairs)})"
            )
    for example in row["false_alarm_examples"]:
        print(f"  false alarm: {example}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
