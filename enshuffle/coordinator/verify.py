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
   residual noise) and larger than BIAS_UNITS rounding units fails. Honest rounding errors are
   not correlated with C, so this catches a bias of a few units in the last place on every
   entry, which no per-row bound can.

NaN and infinities in a result are refused when every operand is finite (the exact product is
then finite); rows whose exact value is not finite (non-finite operands) are not compared.
A perturbation of every entry that is random in sign and no larger than honest rounding cannot
be told from rounding by any check cheaper than recomputing; it also cannot steer the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from enshuffle.batch import Matmul

PROBES = 12  # Gaussian probe vectors: 12 cost about what 8 do (memory-bound) and miss fewer single entries
ABS_LIMIT = 8.0  # test 1: honest |D|/bound measured <= 3.8 on real batches (scripts/verify_sweep.py)
OUTLIER = 4.0  # test 2: limit in units of the k-th largest row; honest max measured 2.8, single lies mostly >= 6
LEVEL_LIMIT = 1.0  # test 3: honest level measured <= 0.33
BIAS_UNITS = 6.0  # test 4: honest correlations measured up to 2.4 rounding units
T_LIMIT = 10.0  # test 4: significance; honest |t| reaches ~70 (rounding is weakly tied to C), so BIAS_UNITS decides
MIN_LEVEL = 0.02  # floor for the level in test 2 (a batch of exact zeros has level 0)
MIN_SAMPLES = 256  # rows x probes below which the batch's level is not estimated (test 2 uses s = 1)
CHUNK_BYTES = 16 << 20  # float64 working set per chunk of A
PASS_BYTES = 1 << 20  # chunk of a one-pass left check: small enough to stay in cache between its products
LEFT_PROBES = 8  # fixed secret probes of a static block (StaticNorms): a product over it is checked
#                  from the result's side alone, one pass over the large operand
REFRESH = 16  # a set of fixed probes serves checks over REFRESH times the block's rows, then StaticNorms
#              draws new ones: the redraw (a pass over the block) costs at most 1/REFRESH of the checks
SQRT3 = float(np.sqrt(3.0))
LEFT_MIN_ROWS = 2048  # float64 products over at least this many rows of a static use the left probes.
# Smaller batches keep the per-row right-probe check: as cheap there, and its per-row bound sees a
# single wrong entry sqrt(rows) times sooner. Float32 products keep it too: the left probes' sums
# over many rows would hide a 1e-4 lie (a 10,000-row float32 batch: 81% caught, against 100%).
SMALL_RESULT = 1 << 18  # results up to this many entries get the exact |C|-weighted bound and |C| regressor
U64 = float(np.finfo(np.float64).eps) / 2


class StaticNorms:
    """Per static block, computed once (and again every REFRESH checks): secret probes and what
    they make of the block, so checking a product over it never reads the block again.

    Row probes L (N, LEFT_PROBES) weight the static's rows (for C = S[rows] @ b: l = L[rows]);
    column probes L_c (K, LEFT_PROBES) weight its columns (for C = S[rows]^T @ b). Kept:
    Q = L^T S and Lam = (L*L)^T (S*S) (each (p, K)), SLc = S @ L_c and S2Lc2 = (S*S) @ (L_c*L_c)
    (each (N, p)). Probes are uniform on [-sqrt(3), sqrt(3)] (unit variance, |l| <= sqrt(3)):
    never near zero for long, so a bound may use their largest square."""

    def __init__(self, static: np.ndarray, rng: np.random.Generator | None = None):
        self.static = static
        self.rng = rng if rng is not None else np.random.default_rng()
        self.finite = bool(np.isfinite(static).all())
        self.rows_checked = 0
        self.drawn = False  # the probes are drawn at the first large check, not before

    def _draw(self) -> None:
        s = self.static
        n, k = s.shape
        p = LEFT_PROBES
        self.row_probes = self.rng.uniform(-SQRT3, SQRT3, (n, p))
        self.col_probes = self.rng.uniform(-SQRT3, SQRT3, (k, p))
        q = np.zeros((p, k))
        lam = np.zeros((p, k))
        self.s_lc = np.empty((n, p))
        self.s2_lc2 = np.empty((n, p))
        lc2 = self.col_probes**2
        for sl in _chunks(n, k):
            chunk = np.asarray(s[sl], dtype=np.float64)
            lr = self.row_probes[sl]
            q += lr.T @ chunk
            np.matmul(chunk, self.col_probes, out=self.s_lc[sl])
            sq = chunk * chunk
            lam += (lr * lr).T @ sq
            np.matmul(sq, lc2, out=self.s2_lc2[sl])
        self.q, self.lam = q, lam
        self.rows_checked = 0
        self.drawn = True

    def prepare(self) -> None:
        """Draw the probes now (a pass over the block), not at the first large check: a coordinator
        does this while it waits for nodes, between pumps, instead of in silence after a WELCOME."""
        if not self.drawn:
            self._draw()

    def used(self, rows: int) -> None:
        """Count a check over `rows` rows; past REFRESH times the block's rows the probes are
        drawn anew, so a node probing which of its lies get caught learns little about any one set."""
        self.rows_checked += rows
        if self.rows_checked >= REFRESH * self.static.shape[0]:
            self._draw()


def _chunks(n: int, cols: int, size: int = CHUNK_BYTES):
    step = max(1, size // (8 * max(cols, 1)))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _reference(
    a_rows, n_out: int, transpose: bool, br: np.ndarray, q: np.ndarray, src_rows: int, gathered: bool = False
):
    """A·(B·R) (n_out, P) and Σ_k a_ik²·q_k (n_out,) in float64, reading A in chunks.

    `a_rows(sl)` returns rows `sl` of the operand as stored (before any transpose), `src_rows`
    of them; `gathered`: a new array each time (a gather of rows), which may then be squared in
    place when it is float64 already. Without transpose, A = stored and output row i is stored
    row i; with transpose, A = storedᵀ and the contraction runs over stored rows, so chunks add up."""
    p = br.shape[1]

    def scratch(sl) -> np.ndarray:  # rows `sl` in float64, in an array of the check's own
        chunk = a_rows(sl)
        return chunk if gathered and chunk.dtype == np.float64 else chunk.astype(np.float64)

    if not transpose:
        rhs = np.empty((n_out, p))
        sq = np.empty(n_out)
        for sl in _chunks(src_rows, br.shape[0]):
            chunk = scratch(sl)
            rhs[sl] = chunk @ br
            np.square(chunk, out=chunk)
            sq[sl] = chunk @ q
        return rhs, sq
    rhs = np.zeros((n_out, p))
    sq = np.zeros(n_out)
    for sl in _chunks(src_rows, n_out):
        chunk = scratch(sl)
        rhs += chunk.T @ br[sl]
        np.square(chunk, out=chunk)
        sq += chunk.T @ q[sl]
    return rhs, sq


@dataclass
class Residual:
    """What check_matmul measures of one result; `judge` turns it into a verdict."""

    rows: int  # rows of C
    nonfinite_rows: int  # rows of C with NaN/inf though the exact product is finite there
    worst: np.ndarray  # per compared row: max over probes of |D| / bound
    level: float | None  # the batch's robust residual level (None: too few samples)
    fits: dict  # regressor name -> (beta, |t|)
    unit: float  # the dtype's unit roundoff
    lhs: np.ndarray
    rhs: np.ndarray
    reference: float | None = None  # the k-th largest row's residual (k = 1% of rows, >= 3)
    axis: str = "row"  # what a line of worst/lhs/rhs is: a row of C (right probes) or a column (left)


def _median(x: np.ndarray) -> float:
    """The (upper) median of every entry, by one partition (np.median's checks cost more at this size)."""
    flat = x.ravel()
    mid = flat.size // 2
    return float(np.partition(flat, mid)[mid])


def _fits(d: np.ndarray, regressors: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """`_fit` of d on each regressor alone, from one product: the residual sum of squares of a
    one-regressor fit is d.d - (x.d)^2 / x.x."""
    dv = d.ravel()
    if dv.size < 16:
        return {name: (0.0, 0.0) for name in regressors}
    xs = np.stack([x.ravel() for x in regressors.values()])
    xd = xs @ dv
    xx = np.einsum("ij,ij->i", xs, xs)
    dd = float(dv @ dv)
    out = {}
    for name, sxd, sxx in zip(regressors, xd, xx):
        if not (sxx > 0 and np.isfinite(sxx)):
            out[name] = (0.0, 0.0)
            continue
        beta = float(sxd / sxx)
        rss = max(dd - float(sxd) ** 2 / float(sxx), 0.0)
        se = np.sqrt(rss / (dv.size - 1) / float(sxx))
        out[name] = (beta, float(abs(beta) / se) if se > 0 else (np.inf if beta != 0 else 0.0))
    return out


def measure_matmul(
    c: np.ndarray,
    arrays: dict[str, np.ndarray],
    params: dict,
    rng: np.random.Generator,
    static: np.ndarray | None = None,
    norms: StaticNorms | None = None,
) -> Residual:
    """Freivalds residual of a claimed C = A @ B, (n, K) @ (K, m) -> (n, m), in units of the rounding bound.

    A float64 product over LEFT_MIN_ROWS or more rows of a static block with finite operands is
    checked from the left with the block's fixed probes (`_measure_static`); anything else with
    fresh right probes, as below."""
    spec = Matmul.parse(params)
    transpose = spec.transpose_a
    _, k, _ = spec.dims(arrays, None if static is None else static.shape)  # the contraction
    if static is not None and arrays["rows"].shape[0] >= LEFT_MIN_ROWS and c.dtype == np.float64:
        if norms is None or norms.static is not static:
            norms = StaticNorms(static, rng)
        if norms.finite:
            res = _measure_static(c, arrays["rows"], arrays["b"], transpose, norms)
            if res is not None:
                return res
    b = arrays["b"]
    u = float(np.finfo(c.dtype).eps) / 2
    r = rng.standard_normal((b.shape[1], PROBES))
    b64 = b if b.dtype == np.float64 else b.astype(np.float64)  # read only: no copy of a float64 b
    br = b64 @ r
    q = np.einsum("ij,ij->i", b64, b64)
    if static is None:
        a = arrays["a"]
        rhs, sq = _reference(lambda sl: a[sl], c.shape[0], transpose, br, q, a.shape[0])
    else:
        rows = arrays["rows"]
        if transpose and rows.shape[0] * 4 >= static.shape[0]:
            # C = S[rows]ᵀ·B, so A·(B·R) = Sᵀ·U with U[rows] = B·R (np.add.at sums repeated rows):
            # read S once in its stored order instead of gathering S[rows].
            u_br = np.zeros((static.shape[0], PROBES))
            np.add.at(u_br, rows, br)
            u_q = np.bincount(rows, weights=q, minlength=static.shape[0])
            rhs, sq = _reference(lambda sl: static[sl], c.shape[0], True, u_br, u_q, static.shape[0])
        else:
            rhs, sq = _reference(
                lambda sl: static[rows[sl]], c.shape[0], transpose, br, q, rows.shape[0], gathered=True
            )
    c64 = c.astype(np.float64) if c.dtype != np.float64 else c
    row_norms = np.sqrt(np.einsum("ij,ij->i", c64, c64))
    lhs = c64 @ r
    # plus an absolute floor: a node that flushes subnormals to zero (enshuffle node does) moves an
    # entry by up to K times the dtype's smallest normal, which no relative bound covers.
    floor = max(k, 1) * float(np.finfo(c.dtype).tiny) * np.sqrt(np.sum(r * r, axis=0)).max()
    bound = u * np.sqrt(max(k, 1)) * (row_norms + np.sqrt(sq)) + floor + np.finfo(np.float64).tiny
    # Rows whose exact value is not finite (only with non-finite operands) cannot be compared;
    # in every other row a NaN or infinity in C is a lie.
    compared = np.isfinite(rhs).all(axis=1) & np.isfinite(sq)
    nonfinite = int((~np.isfinite(row_norms) & compared).sum())
    if nonfinite:
        return Residual(
            rows=c.shape[0],
            nonfinite_rows=nonfinite,
            worst=np.zeros(0),
            level=None,
            fits={},
            unit=u,
            lhs=np.zeros((0, PROBES)),
            rhs=np.zeros((0, PROBES)),
        )
    if not compared.all():
        lhs, rhs, bound, c64 = lhs[compared], rhs[compared], bound[compared], c64[compared]
    d = lhs - rhs
    dn = d / bound[:, None]
    ratio = np.abs(dn)
    worst = ratio.max(axis=1) if ratio.size else np.zeros(0)
    worst[np.isnan(worst)] = np.inf
    level = fits = None
    reference = None
    if ratio.size >= MIN_SAMPLES:
        level = _median(ratio) / 0.6745  # a normal's scale from its median absolute value
        # The k-th largest row (k = 1% of rows, at least 3): a lie in one or two rows cannot move
        # it, and honest rows whose bound fits less tightly than most are measured by it.
        k = min(worst.size, max(3, worst.size // 100))
        reference = float(np.partition(worst, worst.size - k)[worst.size - k])
        fits = _fits(dn, {"C·r": lhs / bound[:, None], "|C|·r": (np.abs(c64) @ r) / bound[:, None]})
    return Residual(
        rows=c.shape[0],
        nonfinite_rows=nonfinite,
        worst=worst,
        level=level,
        fits=fits or {},
        unit=u,
        lhs=lhs,
        rhs=rhs,
        reference=reference,
    )


def _measure_static(
    c: np.ndarray, rows: np.ndarray, b: np.ndarray, transpose: bool, norms: StaticNorms
) -> Residual | None:
    """Left-probe Freivalds over a static block S (N, K): D = l^T C - (l^T A) B, (p, m), with l
    the block's fixed secret probes, so the block itself is never read (Q, Lam, SLc, S2Lc2 are
    kept in `norms`). One pass over the large operand: C for S[rows] @ b (plus one for its column
    norms when C is large), b for S[rows]^T @ b (plus one for b*b).

    Bound of D[p, j] (a random walk of roundings, see the module docstring): the node's
    u sqrt(K') sqrt(sum_i l_ip^2 (c_ij^2 + sum_k a_ik^2 b_kj^2)) over its contraction K', plus
    this check's own float64 roundings (its sums over n rows and over the block's N rows).
    None when the exact product is not finite (non-finite b): the right-probe check handles it."""
    if not norms.drawn:
        norms._draw()
    p = LEFT_PROBES
    n_static, k_static = norms.static.shape
    n = rows.shape[0]
    u = float(np.finfo(c.dtype).eps) / 2
    c64 = c if c.dtype == np.float64 else c.astype(np.float64)
    b64 = b if b.dtype == np.float64 else b.astype(np.float64)
    if not transpose:
        full = n == n_static and bool(np.all(np.bincount(rows, minlength=n_static) == 1))
        probes = np.take(norms.row_probes, rows, axis=0)  # (n, p)
        big = c.size > SMALL_RESULT
        if big:  # l^T C and C's column norms in one pass over C, chunk by chunk (in cache)
            lhs, colsq = np.zeros((p, c.shape[1])), np.zeros(c.shape[1])
            for sl in _chunks(n, c.shape[1], PASS_BYTES):
                chunk = c64[sl]
                lhs += probes[sl].T @ chunk
                colsq += np.einsum("ij,ij->j", chunk, chunk)
        else:
            lhs = probes.T @ c64
        if full:  # l^T S[rows] = L^T S for a whole permutation: kept
            q, lam = norms.q, norms.lam
        else:
            a = np.take(norms.static, rows, axis=0).astype(np.float64, copy=False)
            q, lam = probes.T @ a, (probes * probes).T @ (a * a)
        rhs = q @ b64
        b2 = b64 * b64
        ab = lam @ b2
        qb = (q * q) @ b2
        if big:  # column norms times the largest probe square: an upper bound
            cterm = (probes * probes).max(axis=0)[:, None] * colsq[None, :]
            absreg = None
        else:
            cterm = (probes * probes).T @ (c64 * c64)
            absreg = probes.T @ np.abs(c64)
        contraction = k_static
        bound = u * np.sqrt(contraction) * np.sqrt(cterm + ab) + U64 * (
            np.sqrt(n) * np.sqrt(cterm)
            + np.sqrt(n_static if full else n) * np.sqrt(ab)
            + np.sqrt(k_static) * np.sqrt(qb)
        )
    else:
        lc = norms.col_probes  # (K, p) over C's rows
        lhs = lc.T @ c64
        w = np.take(norms.s_lc, rows, axis=0)  # (n, p): (S[rows] Lc)
        weights = np.concatenate([np.take(norms.s2_lc2, rows, axis=0), w * w], axis=1)
        # (S[rows] Lc)^T b and the weighted sums of b*b in one pass over b, chunk by chunk
        rhs, sums = np.zeros((p, b.shape[1])), np.zeros((2 * p, b.shape[1]))
        step = max(1, PASS_BYTES // (8 * b.shape[1]))
        square = np.empty((min(step, n), b.shape[1]))
        for sl in _chunks(n, b.shape[1], PASS_BYTES):
            chunk = b64[sl]
            rhs += w[sl].T @ chunk
            sq = np.multiply(chunk, chunk, out=square[: chunk.shape[0]])
            sums += weights[sl].T @ sq
        ab, wb = sums[:p], sums[p:]
        lc2 = lc * lc
        cterm = lc2.T @ (c64 * c64)
        absreg = lc.T @ np.abs(c64)
        bound = u * np.sqrt(n) * np.sqrt(cterm + ab) + U64 * (
            np.sqrt(k_static) * (np.sqrt(cterm) + np.sqrt(ab)) + np.sqrt(n) * np.sqrt(wb)
        )
    norms.used(n)
    if not np.isfinite(rhs).all():
        return None
    # the absolute floor for flushed subnormals (see measure_matmul): K' x the smallest normal per
    # entry, at most sqrt(3) x that per line of C in D
    flushed = (n if transpose else k_static) * float(np.finfo(c.dtype).tiny) * SQRT3 * c.shape[0]
    bound = bound + flushed + np.finfo(np.float64).tiny
    m = lhs.shape[1]
    if not np.isfinite(lhs).all():
        bad = int((~np.isfinite(c64)).any(axis=1).sum())
        return Residual(
            rows=c.shape[0],
            nonfinite_rows=max(bad, 1),
            worst=np.zeros(0),
            level=None,
            fits={},
            unit=u,
            lhs=np.zeros((0, p)),
            rhs=np.zeros((0, p)),
        )
    d = lhs - rhs
    ratio = np.abs(d) / bound
    worst = ratio.max(axis=0)  # per column of C
    level = _median(ratio) / 0.6745
    k = min(m, max(3, m // 100))
    reference = float(np.partition(worst, m - k)[m - k])
    dn = d / bound
    regressors = {"C·r": lhs / bound}
    if absreg is not None:
        regressors["|C|·r"] = absreg / bound
    fits = _fits(dn, regressors)
    return Residual(
        rows=m,
        nonfinite_rows=0,
        worst=worst,
        level=level if ratio.size >= MIN_SAMPLES else None,
        fits=fits,
        unit=u,
        lhs=lhs.T,
        rhs=rhs.T,
        reference=reference,
        axis="column",
    )


def judge(res: Residual) -> str | None:
    """None if the measured residual is what honest rounding produces, else a sentence saying why not."""
    if res.nonfinite_rows:
        return (
            f"result has NaN or infinite entries in {res.nonfinite_rows} of {res.rows} rows, though the "
            f"exact product is finite there"
        )
    if res.worst.size and not res.worst.max() <= ABS_LIMIT:
        return _row_failure(res, ABS_LIMIT)
    if res.level is None:
        return None
    assert res.reference is not None  # measured whenever the level is
    # A lie proportional to C (a scale or a same-sign bias) is named as such before the level
    # test, which it also fails.
    for name, (beta, t) in res.fits.items():
        if t > T_LIMIT and abs(beta) > BIAS_UNITS * res.unit:
            return (
                f"Freivalds check failed: the result differs from the product by {beta:.3g} x {name} "
                f"(t = {t:.1f}); honest rounding is not correlated with it"
            )
    if res.level > LEVEL_LIMIT:
        return (
            f"Freivalds check failed: the whole result is noisier than rounding allows "
            f"(level {res.level:.2f} of the bound, at most {LEVEL_LIMIT:g})"
        )
    limit = OUTLIER * max(res.reference, MIN_LEVEL)
    if not res.worst.max() <= limit:
        return _row_failure(res, limit)
    return None


def check_matmul(
    c: np.ndarray,
    arrays: dict[str, np.ndarray],
    params: dict,
    rng: np.random.Generator,
    static: np.ndarray | None = None,
    norms: StaticNorms | None = None,
) -> str | None:
    """None if C passes, else a sentence saying what failed. C = A @ B (n, K) @ (K, m) -> (n, m)."""
    return judge(measure_matmul(c, arrays, params, rng, static, norms))


def _row_failure(res: Residual, limit: float) -> str:
    i = int(np.argmax(res.worst))
    j = int(np.argmax(np.abs(res.lhs[i] - res.rhs[i])))
    return (
        f"Freivalds check failed at {res.axis} {i}: C·r = {res.lhs[i, j]:.9g}, A·(B·r) = {res.rhs[i, j]:.9g}, "
        f"off by {res.worst[i]:.3g} times the rounding bound (limit {limit:.3g}); "
        f"{int((res.worst > limit).sum())} of {res.worst.size} {res.axis}s off"
    )


def check_replica(
    c: np.ndarray, arrays: dict[str, np.ndarray], params: dict, static: np.ndarray | None = None
) -> str | None:
    """Adaptive replication: recompute C = A @ B here in float64 (row chunks) and compare every
    entry with u·sqrt(K)·(|c_ij| + sqrt(Σ_k a_ik²·b_kj²)) times ABS_LIMIT. As costly as the product
    itself (twice: the bound needs A²·B²); for new or once-lying nodes only (--replicate)."""
    b64 = arrays["b"].astype(np.float64)
    b2 = b64 * b64
    spec = Matmul.parse(params)
    transpose = spec.transpose_a
    _, k, _ = spec.dims(arrays, None if static is None else static.shape)  # the contraction
    if static is None:
        src, rows = arrays["a"], None
    else:
        src, rows = static, arrays["rows"]
    n_src = src.shape[0] if rows is None else rows.shape[0]
    u = float(np.finfo(c.dtype).eps) / 2
    ref = np.zeros(c.shape)
    var = np.zeros(c.shape)
    for sl in _chunks(n_src, src.shape[1]):
        chunk = (src[sl] if rows is None else src[rows[sl]]).astype(np.float64)
        if transpose:
            ref += chunk.T @ b64[sl]
            np.square(chunk, out=chunk)
            var += chunk.T @ b2[sl]
        else:
            ref[sl] = chunk @ b64
            np.square(chunk, out=chunk)
            var[sl] = chunk @ b2
    c64 = c.astype(np.float64)
    limit = ABS_LIMIT * u * np.sqrt(max(k, 1)) * (np.abs(ref) + np.sqrt(var)) + np.finfo(np.float64).tiny
    off = ~(np.abs(c64 - ref) <= limit) & np.isfinite(ref)
    if off.any():
        i, j = np.unravel_index(int(np.argmax(off)), off.shape)
        return (
            f"replica check failed at ({i}, {j}): got {c64[i, j]:.9g}, recomputed {ref[i, j]:.9g} "
            f"({int(off.sum())} of {off.size} entries off)"
        )
    return None
