"""A real `enshuffle node` process that lies: the daemon unchanged, its arithmetic wrapped.

    python tests/lying_node.py KIND [node arguments...]

KIND is one of single (one entry off by 1e-3 of the result's RMS in float32, 1e-11 in
float64), bias (every entry plus 1e-6 of its magnitude in float32, 1e-13 in float64), nan (one
entry NaN), scaled (every entry times 1.0001), zeros (all zero). Every result is signed with the
node's real key; only the numbers are wrong. Used by tests/test_reputation.py.
"""

from __future__ import annotations

import sys

import numpy as np

import enshuffle.node.daemon as daemon

# float32: ten times the size the sweep (scripts/verify_sweep.py) measures at 1e-4, where the check
# catches at least 99% but not every one: this end-to-end test asserts that *no* lie gets in, so
# it uses a lie the check catches every time; the sweep is where the 1e-4 rate is measured.
SINGLE = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-11}
BIAS = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-13}


def lie(kind: str, c: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = np.array(c, dtype=np.float64)
    if kind == "single":
        i = int(rng.integers(w.size))
        w.flat[i] += SINGLE[c.dtype] * np.sqrt(np.mean(w * w))
    elif kind == "bias":
        w += BIAS[c.dtype] * np.abs(w)
    elif kind == "nan":
        w.flat[int(rng.integers(w.size))] = np.nan
    elif kind == "scaled":
        w *= 1.0001
    elif kind == "zeros":
        w[:] = 0
    else:
        raise SystemExit(f"lying_node.py: unknown kind {kind!r}")
    return w.astype(c.dtype)


def main() -> int:
    kind, node_args = sys.argv[1], sys.argv[2:]
    honest = daemon.compute_batch
    rng = np.random.default_rng()

    def compute_batch(op, params, arrays, statics, *workspace):
        return lie(kind, honest(op, params, arrays, statics, *workspace), rng)

    daemon.compute_batch = compute_batch
    from enshuffle.cli import main as cli_main

    return cli_main(["node", *node_args])


if __name__ == "__main__":
    sys.exit(main())
