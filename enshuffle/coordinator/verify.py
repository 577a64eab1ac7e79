"""Checks that a node's result is the product it was asked for (Freivalds' test, tight bounds).

A node may be faulty or malicious and return wrong numbers with a valid signature. For a
claimed C = A @ B (A is `a`, or rows `rows` of a static operand, maybe transposed) the
coordinator draws P Gaussian probe vectors R and computes the residual D = C·R - A·(B·R) in
float64. A is read in row chunks converted to float64 one chunk at a time: no full-size float64
copy, and the check's own rounding stays far below the node's.

How big may an honest residual be? A float product rounds each partial sum; element (i, j) of
the node's C is off by roughly u·sqrt(K) times the size of its partial sums (a random walk over
K roundings, u the unit roundoff), which is at most about |c_ij| for same-sign data and
|a_i∘b_j| (the root of Σ_k a_ik²·b_kj²) for mixed-sign data. Summed over row i with Gaussian
weights r_j, the residual's scale is at most

    bound_i = u · sqrt(K) · (|C_i| + sqrt(Σ_k a_ik² · q_k)),   q_k = Σ_j b_kj²,

which costs one pass over C and one over A² (computed chunk by chunk with A·(B·R)). This is
per row and from the actual operands: it does not grow with cancellation the way
|A_i|·|B|_F does. Four tests, each needed for a kind of lie (docs/design.md, "Checking
results", has the measured sweep):

1. every entry of D is within ABS_LIMIT·bound_i (NaN/inf fail; catches gross lies);
2. the batch's own honest level s (a robust scale of |D|/bound over all rows and probes; a
   lie in a few entries does not move it) sets a tighter outlier limit OUTLIER·s·bound_i:
   a single wrong entry stands out of the rounding noise of its batch;
3. s itself is at most LEVEL_LIMIT: a batch whose every row is noisier than rounding allows;
4. D is regressed on C·R and |C|·R (what a scale or a same-sign bias of every entry adds to
   D); a coefficient that is both significant (|t| > T_LIMIT, against the batch's own
   residual noise) and larger than BIAS_UNITS rounding units fails. Honest rounding errors are not correlated with C, so this catches a bias of a few
   units in the last place on every entry, which no per-row bound can.

NaN and infinities in a result are refused when every operand is finite (the exact product is
then finite); rows whose exact value is not finite (non-finite operands) are not compared.
A perturbation of every entry that is random in sign and no larger than honest rounding cannot
be told from rounding by any check cheaper than recomputing; it also cannot steer the model.
"""

from __future__ import annotations

import numpy as np

PROBES = 8  # Gaussian probe vectors: products with them are memory-bound, so 8 cost little more than 1
ABS_LIMIT = 8.0  # test 1: honest |D|/bound measured <= 1.5 on real batches (scripts/verify_sweep.py)
OUTLIER = 10.0  # test 2: limit in units of the batch's own level s
LEVEL_LIMIT = 1.0  # test 3: honest s measured <= 0.5
BIAS_UNITS = 4.0  # test 4: a correlation smaller than this many rounding units is not refused
T_LIMIT = 10.0  # test 4: |t| beyond which a correlation is no accident (honest |t| ~ N(0, 1))
MIN_SAMPLES = 256  # rows x probes below which the batch's level is not estimated (test 2 uses s = 1)
CHUNK_BYTES = 16 << 20  # float64 working set per chunk of A
SPOT_CHECKS = 64


class StaticNorms:
    """Facts about a static block computed once: whether every value is finite."""

    def __init__(self, static: np.ndarray):
        self.finite = bool(np.isfinite(static).all())


def _chunks(n: int, cols: int):
    step = max(1, CHUNK_BYTES // (8 * max(cols, 1)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _reference(a_rows, n_out: int, transpose: bool, br: np.ndarray, q: np.ndarray, src_rows: int):
    """A·(B·R) (n_out, P) and Σ_k a_ik²·q_k (n_out,) in float64, reading A in chunks.

    `a_rows(sl)` returns rows `sl` of the operand as stored (before any transpose), `src_rows`
    of them. Without transpose, A = stored and output row i is stored row i; with transpose,
    A = storedᵀ and the contraction runs over stored rows, so chunks add up."""
    p = br.shape[1]
    if not transpose:
        rhs = np.empty((n_out, p))
        sq = np.empty(n_out)
        for sl in _chunks(src_rows, br.shape[0]):
            chunk = a_rows(sl).astype(np.float64)
            rhs[sl] = chunk @ br
            np.square(chunk, out=chunk)
            sq[sl] = chunk @ q
        return rhs, sq
    rhs = np.zeros((n_out, p))
    sq = np.zeros(n_out)
    for sl in _chunks(src_rows, n_out):
        chunk = a_rows(sl).astype(np.float64)
        rhs += chunk.T @ br[sl]
        np.square(chunk, out=chunk)
        sq += chunk.T @ q[sl]
    return rhs, sq


def _regression_problem(d: np.ndarray, regressors: dict[str, np.ndarray], unit: float) -> str | None:
    """Test 4: a coefficient of D on one regressor that is significant and above rounding."""
    dv = d.ravel()
    n = dv.size
    if n < 16:
        return None
    for name, x in regressors.items():
        xv = x.ravel()
        xx = float(xv @ xv)
        if not xx > 0 or not np.isfinite(xx):
            continue
        beta = float(xv @ dv) / xx
        resid = dv - beta * xv
        se = np.sqrt(float(resid @ resid) / (n - 1) / xx)
        t = abs(beta) / se if se > 0 else (np.inf if beta != 0 else 0.0)
        if t > T_LIMIT and abs(beta) > unit:
            return (f"Freivalds check failed: the result differs from the product by {beta:.3g} × {name} "
                    f"(t = {t:.1f}); honest rounding is not correlated with it")
    return None


def check_matmul(c: np.ndarray, arrays: dict[str, np.ndarray], params: dict, rng: np.random.Generator,
                 static: np.ndarray | None = None, norms: StaticNorms | None = None) -> str | None:
    """None if C passes, else a sentence saying what failed. C = A @ B (n, K) @ (K, m) -> (n, m)."""
    b = arrays["b"]
    transpose = bool(params.get("transpose_a"))
    u = float(np.finfo(c.dtype).eps) / 2
    r = rng.standard_normal((b.shape[1], PROBES))
    b64 = b.astype(np.float64)
    br = b64 @ r
    q = np.einsum("ij,ij->i", b64, b64)
    if static is None:
        a = arrays["a"]
        k = a.shape[0] if transpose else a.shape[1]
        operands_finite = bool(np.isfinite(a).all())
        rhs, sq = _reference(lambda sl: a[sl], c.shape[0], transpose, br, q, a.shape[0])
    else:
        rows = arrays["rows"]
        k = rows.shape[0] if transpose else static.shape[1]
        operands_finite = norms.finite if norms is not None else bool(np.isfinite(static).all())
        if transpose and rows.shape[0] * 4 >= static.shape[0]:
            # C = S[rows]ᵀ·B, so A·(B·R) = Sᵀ·U with U[rows] = B·R (np.add.at sums repeated rows):
            # read S once in its stored order instead of gathering S[rows].
            u_br = np.zeros((static.shape[0], PROBES))
            np.add.at(u_br, rows, br)
            u_q = np.bincount(rows, weights=q, minlength=static.shape[0])
            rhs, sq = _reference(lambda sl: static[sl], c.shape[0], True, u_br, u_q, static.shape[0])
        else:
            rhs, sq = _reference(lambda sl: static[rows[sl]], c.shape[0], transpose, br, q, rows.shape[0])
    operands_finite = operands_finite and bool(np.isfinite(b).all())
    c64_rows = np.sqrt(np.einsum("ij,ij->i", c, c, dtype=np.float64))
    if operands_finite and not np.isfinite(c64_rows).all():
        bad = int((~np.isfinite(c).all(axis=1)).sum())
        return (f"result has NaN or infinite entries in {bad} of {c.shape[0]} rows, though every operand is "
                f"finite (the exact product is finite)")
    lhs = c.astype(np.float64) @ r if c.dtype != np.float64 else c @ r
    d = lhs - rhs
    bound = u * np.sqrt(max(k, 1)) * (c64_rows + np.sqrt(sq)) + np.finfo(np.float64).tiny
    compared = np.isfinite(rhs).all(axis=1) & np.isfinite(bound)  # non-finite exact rows: nothing to compare
    if not compared.all():
        d, bound, lhs, rhs = d[compared], bound[compared], lhs[compared], rhs[compared]
    ratio = np.abs(d) / bound[:, None]
    worst = np.where(np.isnan(ratio), np.inf, ratio).max(axis=1) if ratio.size else np.zeros(0)
    if worst.size and not worst.max() <= ABS_LIMIT:
        i = int(np.argmax(worst))
        return _row_failure(i, worst, lhs, rhs, bound, ABS_LIMIT)
    if ratio.size >= MIN_SAMPLES:
        level = float(np.median(ratio)) / 0.6745  # scale of a normal from its median absolute value
        if level > LEVEL_LIMIT:
            return (f"Freivalds check failed: the whole result is noisier than rounding allows "
                    f"(level {level:.2f} of the bound, at most {LEVEL_LIMIT:g})")
        limit = OUTLIER * max(level, 0.02)
        if not worst.max() <= limit:
            i = int(np.argmax(worst))
            return _row_failure(i, worst, lhs, rhs, bound, limit)
        abs_c = np.abs(c).astype(np.float64) if c.dtype != np.float64 else np.abs(c)
        regressors = {"C·r": lhs, "|C|·r": (abs_c @ r)[compared]}
        return _regression_problem(d / bound[:, None], {n: x / bound[:, None] for n, x in regressors.items()},
                                   BIAS_UNITS * u)
    return None


def _row_failure(i, worst, lhs, rhs, bound, limit) -> str:
    j = int(np.argmax(np.abs(lhs[i] - rhs[i])))
    return (f"Freivalds check failed at row {i}: C·r = {lhs[i, j]:.9g}, A·(B·r) = {rhs[i, j]:.9g}, "
            f"off by {worst[i]:.3g} times the rounding bound (limit {limit:.3g}); "
            f"{int((worst > limit).sum())} of {worst.size} rows off")


def check_elementwise(op: str, c: np.ndarray, arrays: dict[str, np.ndarray], params: dict,
                      rng: np.random.Generator) -> str | None:
    """Recompute a random sample of entries (`--offload all`, being retired); NaN/inf refused."""
    from enshuffle.node.compute import compute_batch

    ref = arrays.get("a", arrays.get("b"))
    if c.shape != ref.shape:
        return f"result shape {c.shape} differs from the operand shape {ref.shape}"
    if c.size == 0:
        return None
    if not np.isfinite(c).all() and all(np.isfinite(x).all() for x in arrays.values()):
        return "result has NaN or infinite entries, though every operand is finite"
    n = min(SPOT_CHECKS, c.size)
    flat = rng.choice(c.size, size=n, replace=False)
    i, j = np.unravel_index(flat, c.shape)
    sample = {name: np.ascontiguousarray(arr[i, j][None, :]) for name, arr in arrays.items()}
    expected = compute_batch(op, params, sample, {})[0]
    got = c[i, j]
    eps = np.finfo(c.dtype).eps
    tol = 8 * eps * np.maximum(np.abs(expected), np.finfo(c.dtype).tiny) + 8 * np.finfo(c.dtype).tiny
    bad = ~(np.abs(got.astype(np.float64) - expected.astype(np.float64)) <= tol)
    if np.any(bad):
        k = int(np.argmax(bad))
        return (f"spot check failed at ({int(i[k])}, {int(j[k])}): got {got[k]:.6g}, expected {expected[k]:.6g} "
                f"({int(bad.sum())} of {n} sampled entries off)")
    return None
