"""What subnormal ("denormal") float32 values cost a node's products, with and without flush-to-zero.

Runs the same products in two child processes, one with IEEE gradual underflow and one after
`enshuffle.fpenv.flush_denormals()` (what `enshuffle node` does at start), and prints the
median time of each (a benchmark, not a test):

    .venv/bin/python scripts/denormal_bench.py [--threads 1] [--repeats 30]

Cases, each (n x 392) @ (392 x 128) float32 as a node computes them:
  normal        Gaussian operands;
  subnormal b   every entry of b subnormal (saturated deltas), A normal;
  subnormal ab  A and b normal but tiny, so every product term underflows;
and two elementwise passes over 4M float32 (x * x with subnormal results, x + x with subnormal
inputs), where the CPU's scalar/vector units rather than the BLAS kernel do the work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, statistics, sys, time
mode, repeats = sys.argv[1], int(sys.argv[2])
from enshuffle.fpenv import flush_denormals, flushing
line = flush_denormals() if mode == "ftz" else "IEEE gradual underflow"
import numpy as np
rng = np.random.default_rng(0)
tiny = np.finfo(np.float32).tiny

def median_ms(f):
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)

out = {"mode": line, "flushing": flushing()}
for n in (128, 4096):
    a = rng.standard_normal((n, 392)).astype(np.float32)
    b = rng.standard_normal((392, 128)).astype(np.float32)
    b_sub = (b * np.float32(tiny * 1e-2)).astype(np.float32)
    a_small = (a * np.float32(1e-20)).astype(np.float32)
    b_small = (b * np.float32(1e-20)).astype(np.float32)
    out[f"normal n={n}"] = median_ms(lambda: a @ b)
    out[f"subnormal b n={n}"] = median_ms(lambda: a @ b_sub)
    out[f"subnormal ab n={n}"] = median_ms(lambda: a_small @ b_small)
x = (rng.standard_normal(4_000_000) * 1e-20).astype(np.float32)
y = rng.standard_normal(4_000_000).astype(np.float32)
s = (y * np.float32(tiny * 1e-2)).astype(np.float32)
out["x*x normal 4M"] = median_ms(lambda: y * y)
out["x*x subnormal results 4M"] = median_ms(lambda: x * x)
out["x+x subnormal inputs 4M"] = median_ms(lambda: s + s)
print(json.dumps(out))
"""


def run(mode: str, threads: int, repeats: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(repeats)], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (OPENBLAS_NUM_THREADS)")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    ieee, ftz = run("ieee", args.threads, args.repeats), run("ftz", args.threads, args.repeats)
    print(f"child 1: {ieee.pop('mode')}; child 2: {ftz.pop('mode')} (flushing: {ftz.pop('flushing')})")
    ieee.pop("flushing")
    print(f"{'case (float32)':32} {'IEEE ms':>9} {'FTZ ms':>9} {'IEEE/FTZ':>9}")
    for case, t in ieee.items():
        print(f"{case:32} {t:9.3f} {ftz[case]:9.3f} {t / ftz[case]:9.2f}")


if __name__ == "__main__":
    main()
