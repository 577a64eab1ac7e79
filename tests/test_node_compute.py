"""The node's kernels: reused buffers, per-product BLAS threads, aligned statics, flush-to-zero.

No wall-clock assertions: allocation is measured with tracemalloc (numpy reports its data
buffers to it), thread counts are read back from OpenBLAS, and flush-to-zero is checked by its
effect on values, in a child process so this one keeps IEEE gradual underflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from enshuffle.blas import BlasThreads, BlasThreadsUnavailable, get_blas_threads, idle_env
from enshuffle.kernels import Workspace, aligned, compute_batch
from enshuffle.protocol.messages import Channel

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(5)


def static_case(dtype, n: int, k: int, m: int, rows: np.ndarray, transpose: bool):
    static = RNG.standard_normal((n, k)).astype(dtype)
    b = RNG.standard_normal((rows.shape[0] if transpose else k, m)).astype(dtype)
    params = {"a_static": "s", "transpose_a": transpose}
    return params, {"rows": rows, "b": b}, {"s": static}


def exact(params, arrays, statics) -> np.ndarray:
    """The product in float64 from first principles (no node code)."""
    b = arrays["b"].astype(np.float64)
    if params.get("a_static"):
        a = statics[params["a_static"]][arrays["rows"]].astype(np.float64)
    else:
        a = arrays["a"].astype(np.float64)
    return (a.T if params.get("transpose_a") else a) @ b


CASES = [
    ("gather", lambda: RNG.integers(0, 300, 128)),  # a mini-batch: rows repeat, no permutation
    ("permutation", lambda: RNG.permutation(300)),  # full batch: the static is read in place
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kind,rows", CASES, ids=[c[0] for c in CASES])
def test_workspace_products_equal_fresh_ones_batch_after_batch(dtype, transpose, kind, rows):
    ws = Workspace()
    for _ in range(3):  # the same buffers serve every batch
        params, arrays, statics = static_case(dtype, 300, 40, 24, rows(), transpose)
        got = compute_batch("matmul", params, arrays, statics, ws)
        fresh = compute_batch("matmul", params, arrays, statics)
        assert ws.owns(got) and not ws.owns(fresh)
        assert got.dtype == dtype and got.shape == fresh.shape
        np.testing.assert_array_equal(got, fresh)  # same BLAS calls: bit for bit
        tol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, exact(params, arrays, statics), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("transpose", [False, True])
def test_plain_products_use_the_workspace_too(transpose):
    ws = Workspace()
    a = RNG.standard_normal((30, 20) if transpose else (20, 30))
    b = RNG.standard_normal((30, 7))
    params = {"a_static": None, "transpose_a": transpose}
    got = compute_batch("matmul", params, {"a": a, "b": b}, {}, ws)
    assert ws.owns(got)
    np.testing.assert_allclose(got, (a.T if transpose else a) @ b, rtol=1e-12)


def test_a_sealed_result_survives_the_next_batch_overwriting_the_buffer():
    """The daemon seals a result before computing the next batch into the same buffer. Sealing
    encrypts into a new frame, so what is on its way out cannot change: checked by reopening the
    first frame after the second batch has overwritten the buffer it came from."""
    key_c2n, key_n2c = os.urandom(32), os.urandom(32)
    node, coordinator = Channel(key_n2c, key_c2n), Channel(key_c2n, key_n2c)
    ws = Workspace()
    statics = {"s": RNG.standard_normal((500, 64))}
    sent, expected = [], []
    for i in range(2):
        arrays = {"rows": RNG.integers(0, 500, 200), "b": RNG.standard_normal((64, 32))}
        c = compute_batch("matmul", {"a_static": "s"}, arrays, statics, ws)
        expected.append(np.array(c))  # a copy, taken before anything else runs
        sent.append(
            node.seal("RESULT", {"run_id": "r", "batch_id": f"b{i}", "seq": i + 1, "compute_seconds": 0.0}, {"c": c})
        )
    # The second batch did reuse the first one's buffer (else this test would prove nothing)...
    assert np.shares_memory(c, ws.array("result", (200, 32), np.float64))
    assert not np.array_equal(expected[0], expected[1])
    # ...and the first frame still carries the first result.
    for frames, want in zip(sent, expected):
        np.testing.assert_array_equal(coordinator.open(frames).arrays["c"], want)


@pytest.mark.parametrize("transpose", [False, True])
def test_a_full_batch_product_allocates_no_fresh_arrays_once_warm(transpose):
    """The full-batch case (rows a permutation of the static's rows, 60,000 in the seed preset):
    after the first batch has sized the buffers, a batch allocates only index-sized arrays (the
    permutation check and the inverse permutation, rows x 8 bytes each), not the rows x 128
    intermediate and result; without a workspace every batch allocates them afresh."""
    n, k, m = 20000, 64, 128
    params, arrays, statics = static_case(np.float64, n, k, m, RNG.permutation(n), transpose)
    wide_bytes = n * m * 8  # (S @ b) when not transposed, b[inverse] when transposed
    ws = Workspace()
    compute_batch("matmul", params, arrays, statics, ws)  # warm-up: the buffers are sized here
    tracemalloc.start()
    try:
        for workspace, limit in ((ws, 3 * n * 8 + 65536), (None, None)):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            c = compute_batch("matmul", params, arrays, statics, workspace)
            peak = tracemalloc.get_traced_memory()[1] - base
            if workspace is not None:
                assert peak < limit, f"a warm batch allocated {peak} bytes"
                assert ws.owns(c)
            else:
                assert peak >= wide_bytes  # the measurement sees what a fresh product costs
            del c
    finally:
        tracemalloc.stop()


def test_buffers_kept_from_other_kinds_of_batch_stay_within_the_limit():
    """A mini-batch product leaves a large gather buffer; a later full-batch one needs scratch
    instead. With a limit, the growing buffer first lets go of what the current batch does not
    use; without one, everything ever used is kept."""
    n, k, m = 2000, 64, 32
    statics = {"s": RNG.standard_normal((n, k))}
    gather_batch = ({"a_static": "s"}, {"rows": RNG.integers(0, n, 2 * n), "b": RNG.standard_normal((k, m))})
    full_batch = ({"a_static": "s"}, {"rows": RNG.permutation(n), "b": RNG.standard_normal((k, m))})
    limit = 3 * n * m * 8  # scratch + result of the full batch fit, the gather buffer on top does not
    kept = {}
    for label, ws in (("limited", Workspace(limit=limit)), ("unlimited", Workspace())):
        for params, arrays in (gather_batch, full_batch):
            c = compute_batch("matmul", params, arrays, statics, ws)
            np.testing.assert_allclose(c, exact(params, arrays, statics), rtol=1e-12)
        kept[label] = ws.nbytes
    assert kept["limited"] <= limit < kept["unlimited"], kept


def test_an_unaligned_static_is_stored_aligned_once_so_blas_never_copies_it():
    n, k = 4000, 50
    values = RNG.standard_normal((n, k))
    raw = bytearray(values.nbytes + 8)
    view = np.frombuffer(memoryview(raw)[3 : 3 + values.nbytes], dtype=np.float64).reshape(n, k)
    view[...] = values
    view.flags.writeable = False
    assert not view.flags.aligned  # what a payload after a 3-byte-odd header looks like
    stored = aligned(view)
    assert stored.flags.aligned and not stored.flags.writeable
    np.testing.assert_array_equal(stored, values)
    assert aligned(stored) is stored  # already aligned: kept as it is
    params = {"a_static": "s", "transpose_a": False}
    arrays = {"rows": RNG.permutation(n), "b": RNG.standard_normal((k, 16))}
    ws = Workspace()
    compute_batch("matmul", params, arrays, {"s": stored}, ws)
    tracemalloc.start()
    try:
        peaks = {}
        for label, static in (("aligned", stored), ("unaligned", view)):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            c = compute_batch("matmul", params, arrays, {"s": static}, ws)
            peaks[label] = tracemalloc.get_traced_memory()[1] - base
            np.testing.assert_allclose(c, values[arrays["rows"]] @ arrays["b"], rtol=1e-12)
    finally:
        tracemalloc.stop()
    assert peaks["unaligned"] >= values.nbytes  # numpy copied the whole static for BLAS
    assert peaks["aligned"] < values.nbytes // 10, peaks


class CountingSetter:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, n):
        self.calls.append(n)


def test_blas_threads_one_thread_for_small_products_and_set_only_on_change():
    threads = BlasThreads(limit=4, parallel_min_work=1000)
    setter = threads._setter = CountingSetter()
    assert threads.threads_for(999) == 1 and threads.threads_for(1000) == 4
    for work in (10, 20, 5000, 6000, 30):
        threads.for_product(work)
    assert setter.calls == [1, 4, 1]  # one call per change, none per product


def test_a_workspace_sets_the_blas_thread_count_per_product():
    try:
        before = get_blas_threads()
    except BlasThreadsUnavailable as exc:
        pytest.skip(f"no OpenBLAS here: {exc}")
    threads = BlasThreads(limit=2, parallel_min_work=50 * 40 * 24)
    ws = Workspace(threads)
    try:
        small = static_case(np.float64, 300, 40, 24, RNG.integers(0, 300, 49), False)
        compute_batch("matmul", *small, ws)
        assert get_blas_threads() == 1
        large = static_case(np.float64, 300, 40, 24, RNG.integers(0, 300, 50), False)
        compute_batch("matmul", *large, ws)
        assert get_blas_threads() == 2
    finally:
        threads.use(before)
    assert get_blas_threads() == before


def test_idle_blas_workers_sleep_unless_the_user_said_otherwise():
    assert idle_env({}) == {"OPENBLAS_THREAD_TIMEOUT": "4"}
    assert idle_env({"OPENBLAS_THREAD_TIMEOUT": "20"}) == {}


# --- flush-to-zero, in child processes -------------------------------------------------------

FTZ_CHILD = textwrap.dedent("""
    import sys, threading
    from enshuffle.fpenv import flush_denormals, flushing
    line = flush_denormals() if sys.argv[1] == "flush" else "left alone"
    import numpy as np  # after the mode is set: OpenBLAS's workers start now and copy it
    seen = []
    t = threading.Thread(target=lambda: seen.append(flushing()))
    t.start(); t.join()
    rng = np.random.default_rng(3)
    k = 300
    a = rng.standard_normal((3000, k)).astype(np.float32)
    b = rng.standard_normal((k, 64)).astype(np.float32)
    normal = a @ b
    # every term below the smallest normal float32: 3000 x 300 x 64 is split over both BLAS threads
    under = (np.full((3000, k), 1e-25, np.float32) @ np.full((k, 64), 1e-20, np.float32))
    # a quarter of b subnormal, the rest normal
    mixed_b = b.copy()
    mixed_b[::4] *= np.float32(1e-39)
    mixed = a @ mixed_b
    np.savez(sys.argv[2], normal=normal, under=under, mixed=mixed, a=a, mixed_b=mixed_b,
             thread=np.array(seen[0]), main=np.array(flushing()))
    print(line)
""")


def run_child(tmp_path: Path, mode: str) -> tuple[str, dict]:
    out = tmp_path / f"{mode}.npz"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", FTZ_CHILD, mode, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as z:
        return proc.stdout.strip(), {name: z[name] for name in z.files}


def test_flush_to_zero_reaches_blas_workers_and_changes_only_subnormal_values(tmp_path):
    line, flushed = run_child(tmp_path, "flush")
    if "not flushed" in line:
        pytest.skip(line)
    _, ieee = run_child(tmp_path, "ieee")
    assert line == "denormals: flushed to zero (FTZ/DAZ)"
    assert flushed["main"] and flushed["thread"]  # this thread, and one started later
    assert not ieee["main"] and not ieee["thread"]
    # Subnormal terms: IEEE keeps ~3e-38 per entry, flush-to-zero gives exactly 0, in every row
    # (both BLAS threads computed some).
    assert (ieee["under"] > 0).all() and (flushed["under"] == 0).all()
    # Normal data: bit for bit what IEEE arithmetic gives.
    np.testing.assert_array_equal(flushed["normal"], ieee["normal"])
    # Subnormal inputs count as zero: within K x (smallest normal) of the exact product, which is
    # far below float32 rounding of these O(10) entries.
    exact = flushed["a"].astype(np.float64) @ flushed["mixed_b"].astype(np.float64)
    k = flushed["a"].shape[1]
    tiny = float(np.finfo(np.float32).tiny)
    rounding = np.finfo(np.float32).eps * np.abs(flushed["a"]).astype(np.float64) @ np.abs(flushed["mixed_b"])
    assert (np.abs(flushed["mixed"] - exact) <= k * rounding + k * tiny).all()
    np.testing.assert_allclose(flushed["mixed"], ieee["mixed"], rtol=1e-5, atol=1e-5)


def test_flush_to_zero_leaves_an_unknown_platform_alone(monkeypatch):
    from enshuffle import fpenv

    assert not fpenv.flushing()  # pytest's own process keeps IEEE gradual underflow
    monkeypatch.setattr(fpenv, "_layout", lambda: None)
    line = fpenv.flush_denormals()
    assert line.startswith("denormals: not flushed (no known flush-to-zero control")
    assert not fpenv.flushing()


def test_the_node_sets_its_blas_environment_before_numpy_loads():
    code = (
        "import os, sys; from enshuffle.commands.node import _apply_thread_env; _apply_thread_env(1); "
        "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], os.environ['OPENBLAS_NUM_THREADS']); "
        "sys.exit(1 if 'numpy' in sys.modules else 0)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # the environment is set before numpy loads
    assert proc.stdout.split() == ["4", "1"]
