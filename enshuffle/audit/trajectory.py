"""The weight-trajectory attack: what one node learns from the *sequence* of weights it sees.

Under the "share" disguise a node sees, at every step, its block of w1 through one basis fixed for
the run: B_t = M_s^-1 D_s w1_t[P_s], columns (hidden units) shuffled and scaled by powers of two
afresh per batch. The coordinator updates w1 with Adam in the pixel basis, and Adam's first
update is exactly lr * sign(g) per element. So:

1. **Columns are followed across steps** (`align_trajectory`): w1 changes a few percent per
   step, so each column of B_{t+1} is the column of B_t it is collinear with, and the ratio of
   the two is a power of two (rounded log2). Every step is brought into the first message's
   frame: V_t, t = 0..T.
2. **The first difference is a fixed mixture of signs** (`separate_signs`): V_1 - V_0 =
   A S diag(2^e) lr with A = M_s^-1 D_s block-diagonal (public: blocks of 32) and S in {-1,+1}.
   The column scales 2^e are read off the column norms (a sum over all blocks: they differ by
   powers of two and little else). Each block's sources are then the +-1 vectors lying in the
   row space of its 32 rows: found by greedy single-sign-flip descent on the distance to that
   subspace from many starts (all at once, vectorized) and by flipping the sparse +-1 vectors of
   that space in the sources found; candidates whose implied later updates break Adam's bounds
   are sums of correlated sources, not sources. Then a least-squares fit of A on the decided
   signs (units whose signs Adam's epsilon blurred are left out).
3. **The static block unmixes** (`unmix_static`): S_s A = x[:, P_s] alpha + G H' (raw pixels
   times the preset's public standardization slope, plus the rank-32 noise). Gaussian noise
   adds nothing to cumulants of order 3 and more, so each column's mean, third and fourth
   cumulants, and the third-order cross-cumulants between columns, are the pixels' own: they
   name each column's pixel against the same statistics of the public images the run trained
   on (`match_positions`: per-column features, then rounds of matching the cross-cumulant
   profile against the pixels already named).
4. **The noise is projected off and rows are re-identified** (`reidentify`): with positions
   known, cov(S_s A) - cov(public pixels) is the noise's covariance (rank 32); off its top
   directions, each row is nearest to exactly one public image. That names its raw pixels
   and, through the public labels, its label.
5. **Known plaintext** (`solve_from_rows`): the surely re-identified rows are public images, so
   the static block is a linear function of known pixels plus rank-32 noise: the fit gives P_s
   and the whole M_s exactly, and then every row again. A^-1 applied to the last weight message
   gives the node's w1 block in the clear.

The "resident" disguise (a node holds its weight block V in its secret basis and updates it
itself: buf = momentum buf + S[update_rows]^T dz, V += lr buf) is attacked the same way: the
node replays its own updates to get V_t, and the separation runs on its increments.

Only the recording and public information are used: the preset (learning rate, Adam's first
step), the source's public constants (the mixing's block size, the noise rank) and the public
images. `enshuffle.audit.scoring` checks the claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FLIP_STARTS = 4000  # random starts of the sign search per block (all run at once)
FLIP_ROUNDS = 5  # further rounds of starts for blocks with sources still missing
SIGN_RESIDUAL = 2e-3  # a +-1 vector this close (mean squared) to the block's row space is a source
EPS_BLUR = 1e-4  # |source| farther than this from 1: Adam's epsilon blurred the sign; left out of fits
NEW_REWARD = 0.05  # weight of that reward (small: the row space still dominates)
START_DENSITY = 0.1  # share of the block's rows in each start's random combination
BOUND_SLACK = 0.005  # a source's later updates stay within Adam's bound up to this (rounding, epsilon)
SECOND_FLOOR = -0.7441  # see second_floor()
STILL = 0.05  # a pixel's later updates reach at least this share of their bound somewhere
# The sign search runs on at most this many of a layer's units (columns), chosen at random: y = A S
# holds unit by unit, so any 256 units give the same mixing A (rows of S stay distinct +-1 vectors),
# while the search's cost grows with the cube of the units (a 2,048-unit layer: hours, not minutes).
SEARCH_UNITS = 256


def _public_constant(name: str, default: int) -> int:
    """A public constant of the disguise's source (the mixing's block size, the noise rank)."""
    try:
        # lazily, and only public constants: the attacker plays a node, it has no coordinator objects
        from enshuffle.coordinator.disguise import pixel_share
    except ImportError:
        return default
    return int(getattr(pixel_share, name, default) or default)


def mix_group() -> int:
    return _public_constant("MIX_GROUP", 32)


def noise_rank() -> int:
    return _public_constant("NOISE_RANK", 32)


@dataclass
class TrajectoryClaims:
    """What the trajectory attack claims about one train static (its own coordinates)."""

    static: str
    source: str  # where the weights came from: "x_w1 messages" | "resident replay"
    steps: int  # weight snapshots used
    # per mixing block (lo, hi, A_b (hi-lo, r_b) claimed columns of M^-1 D alpha, sources found)
    blocks: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    # per block: claimed M rows (r_b, hi-lo), up to row order/scale
    mixing: list[np.ndarray] = field(default_factory=list)
    mixing_separation: list[np.ndarray] = field(default_factory=list)  # the same from the separation alone
    sources_found: int = 0
    sources_total: int = 0
    column_pixel: np.ndarray | None = None  # (K,) claimed dominant pixel of each static column, -1 none
    source_pixel: np.ndarray | None = None  # (r,) claimed pixel of each recovered source
    values: np.ndarray | None = None  # (n, K) claimed raw value of each static column's dominant pixel, -1 none
    reid: np.ndarray | None = None  # (n,) claimed public image, -1 none
    labels: np.ndarray | None = None  # (n,) claimed label, -1 none
    w1_block: tuple[np.ndarray, np.ndarray] | None = None  # (pixel per row, (r, hidden) values in the clear)
    notes: list[str] = field(default_factory=list)


# -- 1. following columns across steps -----------------------------------------------------
def align_trajectory(messages: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Weight messages (K, h) with per-message column shuffles and power-of-two scales -> (T, K, h)
    in the first message's frame, and per step the smallest winning cosine (how sure the match was)."""
    first = np.asarray(messages[0], dtype=np.float64)
    out = np.empty((len(messages),) + first.shape)
    out[0] = first
    sure = np.ones(len(messages))
    for t in range(1, len(messages)):
        prev = out[t - 1]
        cur = np.asarray(messages[t], dtype=np.float64)
        pn = prev / np.maximum(np.linalg.norm(prev, axis=0), 1e-300)
        cn = cur / np.maximum(np.linalg.norm(cur, axis=0), 1e-300)
        sim = np.abs(cn.T @ pn)  # (h new, h prev)
        match = sim.argmax(axis=1)
        if np.unique(match).size != match.size:  # ties: greedy one-to-one
            match = _greedy_match(sim)
        sure[t] = float(sim[np.arange(match.size), match].min())
        matched = prev[:, match]
        ratio = np.einsum("ij,ij->j", cur, matched) / np.maximum(np.einsum("ij,ij->j", matched, matched), 1e-300)
        exp = np.round(np.log2(np.maximum(np.abs(ratio), 1e-300)))
        out[t][:, match] = cur * np.exp2(-exp)[None, :]
    return out, sure


def _greedy_match(sim: np.ndarray) -> np.ndarray:
    out = np.full(sim.shape[0], -1)
    used = np.zeros(sim.shape[1], dtype=bool)
    for flat in np.argsort(sim, axis=None)[::-1]:
        i, j = divmod(int(flat), sim.shape[1])
        if out[i] < 0 and not used[j]:
            out[i], used[j] = j, True
            if np.all(out >= 0):
                break
    return out


def column_exponents(first_difference: np.ndarray) -> np.ndarray:
    """Per column the power of two it carries (the first frame's scale), from its norm over all
    rows: sign sources give columns of nearly equal norm times 2^e. The source draws e from
    -SCALE_RANGE..SCALE_RANGE (public), which fixes the common offset when both ends occur."""
    lognorm = np.log2(np.maximum(np.linalg.norm(first_difference, axis=0), 1e-300))
    # the common fractional part (a circular mean: the norms scatter around it by a tenth or so)
    angle = np.angle(np.exp(2j * np.pi * lognorm).mean()) / (2 * np.pi)
    e = np.round(lognorm - angle)
    e -= np.round(np.median(e))
    span = _public_scale_range()
    if e.max() - e.min() == 2 * span:
        e = e - e.min() - span
    return e


def _public_scale_range() -> int:
    try:
        # the public source's power-of-two range (the attacker reads it); optional for a bare copy
        from enshuffle.coordinator import plan
    except ImportError:
        return 4
    return int(getattr(plan, "SCALE_RANGE", 4))


def second_floor(beta1: float = 0.9, beta2: float = 0.999) -> float:
    """Adam's second update of an element over its first, along the first's sign, is above this
    (the limit of (a1 + a2 r) / sqrt(b1 + b2 r^2) as r = g2 / g1 -> -inf)."""
    a2 = (1 - beta1) / (1 - beta1**2)
    b2 = (1 - beta2) / (1 - beta2**2)
    return -a2 / np.sqrt(b2)


def adam_bound(t: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can take at its step t (1-based), over all gradient
    histories (Cauchy-Schwarz over m_hat = sum a_k g_k, v_hat = sum b_k g_k^2): 1 at t = 1."""
    k = np.arange(1, t + 1)
    a = (1 - beta1) * beta1 ** (t - k) / (1 - beta1**t)
    b = (1 - beta2) * beta2 ** (t - k) / (1 - beta2**t)
    return float(np.sqrt(np.sum(a * a / b)))


def step_sizes(preset, steps: list[int], rows: int) -> np.ndarray:
    """The learning rate of each (global) step, from the public preset and schedule."""
    from enshuffle.model import learning_rate  # the public schedule, only on this path

    batch = getattr(preset, "batch_size", None) or rows
    total = int(preset.epochs) * int(np.ceil(rows / batch))
    return np.array([learning_rate(preset, int(s), total) for s in steps])


# -- 2. separating signs -------------------------------------------------------------------
def _flip_descent(sig: np.ndarray, q: np.ndarray, max_flips: int) -> np.ndarray:
    """Greedy single flips on every row of sig (m, N) (+-1) to minimise sig q sig^T (q symmetric,
    e.g. the projector off a subspace: the squared distance to it); all rows at once."""
    r = sig @ q
    dq = np.diag(q)
    active = np.arange(sig.shape[0])
    for _ in range(max_flips):
        gain = sig[active] * r[active] - dq  # flipping k lowers the objective by 4 gain_k
        k = gain.argmax(axis=1)
        g = gain[np.arange(active.size), k]
        go = g > 1e-12
        if not go.any():
            break
        active, k = active[go], k[go]
        old = sig[active, k]
        sig[active, k] = -old
        r[active] -= 2.0 * old[:, None] * q[k]
    return sig


def separate_signs(
    y: np.ndarray,
    rng: np.random.Generator,
    starts: int = FLIP_STARTS,
    rounds: int = FLIP_ROUNDS,
    later: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """y (g, N) = A S with S in {-1,+1}^(g', N): the +-1 rows S (r, N) found in y's row space and
    the least-squares columns A (g, r) with y ~ A S. r <= rank(y); sources with identical rows
    (or missing from the search) are not separated.

    `later`, optional (g, N') later differences divided by their bound (`adam_bounds`): where more
    than rank(y) candidate sign vectors are found (sums of correlated sources can be +-1 too), the
    ones whose rows keep later updates within Adam's bound (smallest excess first) are kept."""
    g, n = y.shape
    u, s, vt = np.linalg.svd(y, full_matrices=False)
    if s.size == 0 or s[0] == 0:
        return np.zeros((0, n)), np.zeros((g, 0))
    rank = int(np.count_nonzero(s > s[0] * 1e-4))
    basis = vt[:rank]
    q = np.eye(n) - basis.T @ basis
    sparse = sparse_vectors(basis)
    y_pinv = np.linalg.pinv(y)
    found = np.zeros((0, n))
    true = found
    for round_ in range(1 + rounds):
        # starts: signs of sparse random combinations of the block's rows (far likelier to descend
        # onto a source than random signs); past the first round a third of them with the
        # sources found so far projected out, which steers the descent to the ones still missing
        c = rng.standard_normal((starts, g)) * (rng.random((starts, g)) < START_DENSITY)
        c[~c.any(axis=1), 0] = 1.0
        start = c @ y
        third = starts // 3
        if true.shape[0]:
            tb = np.linalg.qr(true.T)[0]
            start[:third] -= (start[:third] @ tb) @ tb.T
        sig = np.where(start >= 0, 1.0, -1.0)
        if true.shape[0]:
            # and a third: sources found so far with a share of their signs flipped (the missing
            # ones are often strongly correlated with found ones)
            base = true[rng.integers(0, true.shape[0], third)]
            flip = rng.random(base.shape) < rng.uniform(0.02, 0.3, (third, 1))
            sig[third : 2 * third] = np.where(flip, -base, base)
        objective = q
        if true.shape[0] and NEW_REWARD:
            # reward the part outside the sources found so far: the descent then prefers new ones
            objective = q - NEW_REWARD * (np.eye(n) - q - tb @ tb.T)
        sig = _flip_descent(sig, objective, max_flips=4 * n)
        dist = ((sig @ q) * sig).sum(axis=1) / n
        good = np.concatenate([sig[dist < SIGN_RESIDUAL], _neighbours(true, sparse)])
        if good.size:
            good = good * good[:, :1]  # up to sign
            found = np.unique(np.concatenate([found, good]), axis=0)
        if found.shape[0] == 0:
            continue
        if later is not None:
            size, moves = _later_size(found, y_pinv, later, n)
            valid = (size <= BOUND_SLACK) & (moves >= STILL)
            # within the bounds, closest to them first: a source's own updates reach them, while
            # a sum of correlated sources that is +-1 at the first step mostly stays inside
            order = np.flatnonzero(valid)[np.argsort(-size[valid], kind="stable")]
            true = found[order]
        else:
            true = found
        if _independent(true, rank).shape[0] >= rank:
            break
    if true.shape[0] == 0:
        return np.zeros((0, n)), np.zeros((g, 0))
    found = _independent(true, rank)
    a = _fit_columns(y, found)
    return found, a


def sparse_vectors(basis: np.ndarray, iters: int = 40) -> np.ndarray:
    """Sparse vectors with entries 0 or +-1 in the row space of `basis` (r, N) (orthonormal rows):
    for every coordinate k, min ||v||_1 over the space with v_k = 1 (iteratively reweighted least
    squares, all k at once). Two strongly correlated sign sources differ by one of them (halved),
    which is how the search reaches a source next to one it found."""
    r, n = basis.shape
    b = basis  # v = c @ basis
    weights = np.ones((n, n))  # one weight vector per coordinate k
    for _ in range(iters):
        # c_k = argmin c^T (B W_k B^T) c subject to c . b_k = 1
        gram = np.matmul(b[None, :, :] * weights[:, None, :], b.T)  # (n, r, r)
        rhs = b.T[:, :, None]  # (n, r, 1)
        sol = np.linalg.solve(gram + 1e-12 * np.eye(r), rhs)[:, :, 0]
        sol /= np.einsum("kr,kr->k", sol, b.T)[:, None]
        v = sol @ b  # (n, n): row k has v_k = 1
        weights = 1.0 / (np.abs(v) + 1e-3)
    v = np.where(np.abs(v) < 1e-2, 0.0, v)
    ok = np.all((v == 0) | (np.abs(np.abs(v) - 1) < 1e-2), axis=1) & (np.count_nonzero(v, axis=1) <= n // 4)
    v = np.sign(v[ok])
    return (
        np.unique(v * np.sign(v[np.arange(v.shape[0]), np.argmax(v != 0, axis=1)])[:, None], axis=0)
        if v.size
        else np.zeros((0, n))
    )


def _neighbours(sources: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """Sources with the entries of a sparse +-1 vector of the row space flipped, where their signs
    there match it: the result is again a +-1 vector of the row space (strongly correlated
    sources differ in a handful of units, and a descent cannot tell them apart)."""
    if sources.shape[0] == 0 or sparse.shape[0] == 0:
        return np.zeros((0, sources.shape[1] if sources.ndim == 2 else 0))
    support = sparse != 0
    # agreement of each source with each sparse vector on its support: +-(support size) to flip
    agree = sources @ sparse.T  # (m, p)
    size = support.sum(axis=1)[None, :]
    i, j = np.nonzero(np.abs(agree) == size)
    sign = np.sign(agree[i, j])
    return sources[i] - 2.0 * sign[:, None] * sparse[j]


def _independent(vectors: np.ndarray, rank: int) -> np.ndarray:
    """A maximal linearly independent subset of the rows, in order (at most `rank`)."""
    keep: list[int] = []
    basis = np.zeros((0, vectors.shape[1]))
    for i, v in enumerate(vectors):
        resid = v - (v @ basis.T) @ basis if basis.size else v
        norm = np.linalg.norm(resid)
        if norm > 1e-6 * np.linalg.norm(v):
            keep.append(i)
            basis = np.vstack([basis, resid / norm])
            if len(keep) >= rank:
                break
    return vectors[keep]


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """argmin ||x c - y|| for a tall x through the normal equations (much faster than an SVD on
    (n, 784); the pixels are well enough conditioned for float64)."""
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += 1e-12 * np.trace(gram) / gram.shape[0]
    return np.linalg.solve(gram, x.T @ y)


def _later_size(candidates: np.ndarray, y_pinv: np.ndarray, later: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate sign row, how far the updates it implies break Adam's bounds (<= 0: not
    at all), with w the row that maps y to it: |w . later| <= 1 (`later` is divided by each
    step's bound), and Adam's second update of an element is at least SECOND_FLOOR times its
    first in the first's direction (the first `n` columns of `later` are the second
    update, divided by its learning rate only). Also the largest later update (a pixel's weights
    keep moving: a candidate whose implied updates vanish is no pixel)."""
    w = candidates @ y_pinv  # (m, g): the rows mapping the first difference (n columns) to them
    out = np.abs(w @ later[:, n:]).max(axis=1) - 1.0 if later.shape[1] > n else np.full(w.shape[0], -1.0)
    second = (w @ later[:, :n]) * candidates  # second update along the first's sign
    return np.maximum(out, (SECOND_FLOOR - second).max(axis=1)), np.abs(w @ later).max(axis=1)


def _fit_columns(y: np.ndarray, signs: np.ndarray, rounds: int = 6) -> np.ndarray:
    """A (g, r) with y ~ A signs. Adam's epsilon blurs the sign of tiny gradients (|source| < 1):
    the fit is redone on the units (columns) whose sources all come out within EPS_BLUR of +-1,
    as long as enough of them are left."""
    a = np.linalg.lstsq(signs.T, y.T, rcond=None)[0].T
    for _ in range(rounds):
        est = np.linalg.pinv(a) @ y
        clean = np.all(np.abs(np.abs(est) - 1.0) <= EPS_BLUR, axis=0)
        if clean.sum() < 2 * signs.shape[0]:
            clean = np.abs(np.abs(est) - 1.0).max(axis=0) <= np.quantile(np.abs(np.abs(est) - 1.0).max(axis=0), 0.5)
        a_new = np.linalg.lstsq(signs[:, clean].T, y[:, clean].T, rcond=None)[0].T
        if np.allclose(a_new, a, rtol=0, atol=1e-14 * np.abs(a).max()):
            break
        a = a_new
    return a


# -- 3. positions from cumulants -----------------------------------------------------------
def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0)


def match_positions(y: np.ndarray, z: np.ndarray, candidates: np.ndarray, rounds: int = 40) -> np.ndarray:
    """For each column of y (n, r) = some pixel column of z (n, 784) (the same rows, in another
    order) plus Gaussian noise: the pixel, among `candidates`. Per-column mean and third and
    fourth cumulants first (Gaussian noise adds none), then rounds of matching each column's
    third-order cross-cumulant profile E[c_j^2 c_k], E[c_k^2 c_j] against the pixels' with the
    other columns at their current pixels."""
    n = y.shape[0]
    cy, cz = _centred(y), _centred(z)

    def features(c, mean):
        var = (c * c).mean(axis=0)
        k3 = (c**3).mean(axis=0)
        k4 = (c**4).mean(axis=0) - 3 * var * var
        return np.stack([mean, np.cbrt(k3), np.sign(k4) * np.abs(k4) ** 0.25], axis=1)

    fy, fz = features(cy, y.mean(axis=0)), features(cz, z.mean(axis=0))[candidates]
    pos = candidates[((fy[:, None, :] - fz[None]) ** 2).sum(axis=2).argmin(axis=1)]
    ty = (cy * cy).T @ cy / n  # (r, r): E[c_j^2 c_k]
    tz = (cz * cz).T @ cz / z.shape[0]  # (784, 784)
    blocked = np.ones(z.shape[1], dtype=bool)
    blocked[candidates] = False
    for _ in range(rounds):
        b1, b2 = tz[:, pos], tz[pos, :].T  # (784, r) each
        cost = (b1 * b1).sum(axis=1)[None, :] - 2 * ty @ b1.T + (b2 * b2).sum(axis=1)[None, :] - 2 * ty.T @ b2.T
        cost[:, blocked] = np.inf
        new = cost.argmin(axis=1)
        if np.array_equal(new, pos):
            break
        pos = new
    return pos


# -- 4. noise off, rows re-identified, positions made exact ---------------------------------
def reidentify(y: np.ndarray, z: np.ndarray, pos: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest public row (of z) for each row of y once the noise subspace is projected off: the
    covariance of y minus that of the public pixels at `pos` is the noise's (rank `rank`).
    Returns (row index into z, ratio of the second nearest squared distance to the nearest)."""
    cy, cz = _centred(y), _centred(z[:, pos])
    excess = cy.T @ cy / y.shape[0] - cz.T @ cz / z.shape[0]
    vals, vecs = np.linalg.eigh(excess)
    noise = vecs[:, np.argsort(vals)[::-1][:rank]]
    keep = np.eye(pos.size) - noise @ noise.T
    # centred: a column offset (the standardization's shift, under the "shuffle" control) cancels
    yq = (cy @ keep).astype(np.float32)
    zq = (cz @ keep).astype(np.float32)
    zz = np.einsum("ij,ij->i", zq, zq)
    yy = np.einsum("ij,ij->i", yq, yq)
    best = np.empty(y.shape[0], dtype=np.int64)
    gap = np.empty(y.shape[0])
    chunk = max(1, (64 << 20) // max(1, 4 * z.shape[0]))
    for lo in range(0, y.shape[0], chunk):
        d = zz[None, :] - 2.0 * (yq[lo : lo + chunk] @ zq.T)
        best[lo : lo + chunk] = d.argmin(axis=1)
        two = np.partition(d, 1, axis=1)[:, :2] + yy[lo : lo + chunk, None]
        gap[lo : lo + chunk] = np.maximum(two[:, 1], 0) / np.maximum(two[:, 0], 1e-12)
    return best, gap


def exact_positions(
    y: np.ndarray, z: np.ndarray, rows: np.ndarray, pos: np.ndarray, candidates: np.ndarray, rank: int, rounds: int = 5
) -> np.ndarray:
    """With rows of y re-identified (z[rows]), y - z[rows][:, pos] is the noise: rank `rank` where
    pos is right. Each column's pixel is the candidate whose difference with it lies in that
    noise subspace (found from the current positions, which most columns have right)."""
    y = _centred(y)
    zr = _centred(z[rows][:, candidates])
    zall = _centred(z[rows])
    for _ in range(rounds):
        noise = y - zall[:, pos]
        u = np.linalg.svd(noise, full_matrices=False)[0][:, :rank]
        py = y - u @ (u.T @ y)
        pz = zr - u @ (u.T @ zr)
        cost = np.einsum("ij,ij->j", py, py)[:, None] - 2.0 * py.T @ pz + np.einsum("ij,ij->j", pz, pz)[None, :]
        new = candidates[cost.argmin(axis=1)]
        if np.array_equal(new, pos):
            break
        pos = new
    return pos


# -- the attack on a recording -------------------------------------------------------------
LATER_STEPS = 6  # differences after the second one checked against Adam's bounds
RETRY_EFFORT = 3  # the sign search's rounds times this for a second try when the first solved nothing
REID_CONFIDENT = 3.0  # a row is surely re-identified when the second nearest is this much farther (squared)
REID_SURE = 0.5  # the share of rows (largest nearest/second-nearest gap) positions are refined on


def weight_trajectories(messages, statics: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per train static, the weights the node saw step by step: (snapshots, steps, source).

    - x_w1 messages: the `b` operand of every forward batch on the static (one per step);
    - resident: the static "w1.<slot>" V_0, then V after each "resident" batch's update, replayed
      as the node does it (buf = momentum buf + S[update_rows]^T dz; V += lr buf)."""
    out: dict[str, dict] = {}
    for m in messages:
        if m.command != "BATCH" or m.header.get("op") != "matmul":
            continue
        params = m.header.get("params", {})
        name = params.get("a_static")
        if not name or not name.startswith("train.") or params.get("transpose_a"):
            continue
        entry = out.setdefault(name, {"snapshots": [], "steps": [], "source": "x_w1 messages"})
        entry["snapshots"].append(m.arrays["b"])
        entry["steps"].append(int(m.header.get("step", len(entry["steps"]))))
    for wname, v0 in statics.items():
        if not wname.startswith("w1."):
            continue
        name = "train." + wname.split(".", 1)[1]
        s = statics.get(name)
        if s is None:
            continue
        state = np.asarray(v0, dtype=np.float64)
        k = s.shape[1]
        # the state static is [V; buf] (2K, h), at the version its STATIC names (0 at the start)
        v, buf = (state[:k].copy(), state[k:].copy()) if state.shape[0] == 2 * k else (state.copy(), None)
        if buf is None:
            buf = np.zeros_like(v)
        version = 0
        snaps, steps, lrs = [v.copy()], [0], []
        for m in messages:
            if m.command != "BATCH" or m.header.get("op") != "resident":
                continue
            params = m.header.get("params", {})
            if params.get("a_static", name) != name:
                continue
            urows = m.arrays.get("update_rows")
            dz = m.arrays.get("dz")
            if urows is None or dz is None or dz.size == 0:
                continue
            urows = np.asarray(urows, dtype=np.int64).reshape(-1, np.asarray(urows).shape[-1])
            start = int(params.get("from", version))
            rates = params.get("lr", [])
            rates = rates if isinstance(rates, list) else [rates]
            b = urows.shape[1]
            mu = float(params.get("momentum", 0.0))
            for j in range(max(0, version - start), urows.shape[0]):  # as the node: updates it lacks
                lr = float(rates[j]) if j < len(rates) else 1.0
                buf = mu * buf + np.take(s, urows[j], axis=0).astype(np.float64).T @ np.asarray(
                    dz[j * b : (j + 1) * b], dtype=np.float64
                )
                v = v + lr * buf
                version = start + j + 1
                snaps.append(v.copy())
                steps.append(int(m.header.get("step", len(steps))))
                lrs.append(lr)
        out[name] = {"snapshots": snaps, "steps": steps, "source": "resident replay", "lrs": lrs}
    return out


def attack_trajectory(
    messages, public, statics: dict[str, np.ndarray], rng: np.random.Generator, log=None
) -> dict[str, TrajectoryClaims]:
    """The whole class of attack on one recording: separation, unmixing, positions, rows."""
    out: dict[str, TrajectoryClaims] = {}
    group, rank_noise = mix_group(), noise_rank()
    for name, traj in weight_trajectories(messages, statics).items():
        s = statics.get(name)
        claims = TrajectoryClaims(static=name, source=traj["source"], steps=len(traj["snapshots"]))
        out[name] = claims
        try:
            _attack_static(name, traj, s, public, rng, claims, group, rank_noise)
        except (np.linalg.LinAlgError, ValueError, IndexError) as exc:  # reported, not fatal
            claims.notes.append(f"{name}: trajectory attack stopped: {type(exc).__name__}: {exc}")
    return out


def search_units(units: int, rng: np.random.Generator) -> np.ndarray:
    """The units (columns) the sign search runs on: all of them up to SEARCH_UNITS, else that many
    chosen at random, in order."""
    if units <= SEARCH_UNITS:
        return np.arange(units)
    return np.sort(rng.choice(units, SEARCH_UNITS, replace=False))


def _attack_static(name, traj, s, public, rng, claims, group, rank_noise, effort: int = 1) -> None:
    """The attack on one train static (fills `claims`). When too few rows come out surely
    re-identified, it runs once more with `RETRY_EFFORT` times the sign search's rounds."""
    from enshuffle.model import input_affine  # the public standardization, only on this path

    if s is None or len(traj["snapshots"]) < 3 or traj["snapshots"][0].shape[0] != s.shape[1]:
        claims.notes.append(f"{name}: too few weight snapshots ({len(traj['snapshots'])}) to separate")
        return
    if traj["source"] == "x_w1 messages":
        v, _ = align_trajectory(traj["snapshots"])
    else:
        v = np.stack(traj["snapshots"]).astype(np.float64)
    d = np.diff(v, axis=0)
    keep = np.linalg.norm(d.reshape(d.shape[0], -1), axis=1) > 0
    d = d[keep]
    steps = np.asarray(traj["steps"][:-1])[keep]
    if d.shape[0] < 2:
        claims.notes.append(f"{name}: the weights never moved")
        return
    e = column_exponents(d[0]) if traj["source"] == "x_w1 messages" else np.zeros(d.shape[2])
    if traj.get("lrs"):  # the node's own updates say their step size
        lrs = np.asarray(traj["lrs"])[keep]
    else:
        lrs = step_sizes(public.preset, steps.tolist(), s.shape[0])
    lrs = np.where(lrs > 0, lrs, max(float(lrs.max()), 1e-12))
    scale = np.exp2(-e)[None, None, :]
    first = d[0] * scale[0] / lrs[0]
    second = d[1] * scale[0] / lrs[1]
    bounds = np.array([adam_bound(t + 1) for t in range(2, min(d.shape[0], 2 + LATER_STEPS))])
    later = [d[t] * scale[0] / (lrs[t] * bounds[t - 2]) for t in range(2, 2 + bounds.size)]
    k = s.shape[1]
    units = search_units(first.shape[1], rng)
    first, second, later = first[:, units], second[:, units], [x[:, units] for x in later]
    a_full = np.zeros((k, 0))
    for lo in range(0, k, group):
        hi = min(lo + group, k)
        sub_later = np.concatenate([second[lo:hi]] + [x[lo:hi] for x in later], axis=1)
        signs, a = separate_signs(first[lo:hi], rng, rounds=FLIP_ROUNDS * effort, later=sub_later)
        claims.blocks.append((lo, hi, a))
        block_a = np.zeros((k, a.shape[1]))
        block_a[lo:hi] = a
        a_full = np.concatenate([a_full, block_a], axis=1)
    claims.sources_found = a_full.shape[1]
    claims.sources_total = k
    if a_full.shape[1] == 0:
        claims.notes.append(f"{name}: no +-1 sources in the first weight difference")
        return
    # unmix: columns = alpha * raw pixel + noise; a pixel's mean is positive: fixes each sign
    y = s.astype(np.float64) @ a_full
    centred = np.abs(y.mean(axis=0)).max() < 1e-3 * y.std(axis=0).mean()
    if centred:
        # every column centred: the static holds the standardized images themselves (the
        # "shuffle" control); a pixel's background (raw 0) is then its smallest, commonest value
        tol = 1e-4 * y.std(axis=0)
        at_min = (y <= y.min(axis=0) + tol).mean(axis=0)
        at_max = (y >= y.max(axis=0) - tol).mean(axis=0)
        flip = np.where(at_max > at_min, -1.0, 1.0)
    else:
        flip = np.where(y.mean(axis=0) < 0, -1.0, 1.0)
    y *= flip
    a_full *= flip
    at = 0
    for i, (lo, hi, a) in enumerate(claims.blocks):
        claims.blocks[i] = (lo, hi, a * flip[at : at + a.shape[1]])
        at += a.shape[1]
    n = s.shape[0]
    run_rows = public.run_rows(n)
    raw = public.train_images[run_rows].reshape(n, -1)
    alpha, beta = input_affine(raw, public.preset)
    z = raw.astype(np.float64) * alpha
    if centred:
        z += beta
    live = np.flatnonzero(raw.max(axis=0) > 0)
    # positions and rows from the blocks whose every source was separated (a block missing one
    # is fitted wrongly, and its columns would only blur the cumulant profiles and distances)
    whole = np.concatenate([np.full(a.shape[1], a.shape[1] == hi - lo) for lo, hi, a in claims.blocks])
    if whole.sum() < 2 * rank_noise:
        whole[:] = True
    pos = match_positions(y, z, live)
    yw = y[:, whole]
    pos[whole] = match_positions(yw, z, live)
    rows, gap = reidentify(yw, z, pos[whole], rank_noise)
    for _ in range(3):
        sure = gap >= np.quantile(gap, 1 - REID_SURE)
        pos_new = exact_positions(yw[sure], z, rows[sure], pos[whole], live, rank_noise)
        if np.array_equal(pos_new, pos[whole]):
            break
        pos[whole] = pos_new
        rows, gap = reidentify(yw, z, pos[whole], rank_noise)
    # the mixing M = diag(D alpha) A^-1 per block, D = each pixel's root mean square over the
    # images the run holds (the first n public training images and the public test set)
    test = public.test_images.reshape(public.test_images.shape[0], -1)
    energy = np.einsum("ij,ij->j", raw.astype(np.float64), raw) + np.einsum("ij,ij->j", test.astype(np.float64), test)
    rms = np.sqrt(energy / (n + test.shape[0]))
    at = 0
    blocks_m, blocks_pix = [], []
    for lo, hi, a in claims.blocks:
        r = a.shape[1]
        src = pos[at : at + r]
        blocks_pix.append(src)
        blocks_m.append((rms[src] * alpha[src])[:, None] * np.linalg.pinv(a) if r else np.zeros((0, hi - lo)))
        at += r
    claims.mixing_separation = [m.copy() for m in blocks_m]
    # Known plaintext: the re-identified rows are public images, so the static block is a
    # linear function of known pixels plus rank-r noise: solve it for P and the whole M.
    solved_once = False
    for _ in range(2):
        sure = gap > REID_CONFIDENT
        solved = solve_from_rows(s, raw[rows], group, rank_noise, sure=sure)
        if solved is None:
            break
        pix, block_of, d_inv_m = solved
        blocks_m, blocks_pix, a_blocks = [], [], []
        for b, (lo, hi, _) in enumerate(claims.blocks):
            src = pix[block_of == b]
            m_b = rms[src][:, None] * d_inv_m[b]
            blocks_m.append(m_b)
            blocks_pix.append(src)
            a_blocks.append((lo, hi, np.linalg.pinv(m_b) * (rms[src] * alpha[src])[None, :]))
        claims.blocks = a_blocks
        a_full = np.zeros((k, sum(a.shape[1] for _, _, a in a_blocks)))
        at = 0
        for lo, hi, a in a_blocks:
            a_full[lo:hi, at : at + a.shape[1]] = a
            at += a.shape[1]
        pos = np.concatenate(blocks_pix)
        y = s.astype(np.float64) @ a_full
        rows, gap = reidentify(y, z, pos, rank_noise)
        solved_once = True
    if solved_once:
        claims.notes.append(f"{name}: mixing and pixel block solved from the re-identified rows")
    elif effort < RETRY_EFFORT and claims.sources_found < claims.sources_total:
        fresh = TrajectoryClaims(static=claims.static, source=claims.source, steps=claims.steps)
        claims.__dict__.update(fresh.__dict__)
        return _attack_static(name, traj, s, public, rng, claims, group, rank_noise, effort=RETRY_EFFORT)
    else:
        claims.notes.append(f"{name}: too few rows surely re-identified to solve the block from them")
    claims.source_pixel = pos
    claims.reid = rows
    claims.labels = np.asarray(public.train_labels)[run_rows][rows]
    claims.mixing = blocks_m
    column_pixel = np.full(k, -1, dtype=np.int64)
    for (lo, hi, _), m_b, src in zip(claims.blocks, blocks_m, blocks_pix):
        if m_b.shape[0]:
            column_pixel[lo:hi] = src[np.abs(m_b).argmax(axis=0)]
    claims.column_pixel = column_pixel
    values = np.full((n, k), -1, dtype=np.int16)
    has = column_pixel >= 0
    values[:, has] = raw[rows][:, column_pixel[has]]
    claims.values = values
    # the node's own w1 block in the clear: A^-1 applied to its last weights (first frame's
    # column scales undone: absolute values, hidden units in that frame's secret order)
    w = np.linalg.pinv(a_full) @ (v[-1] * np.exp2(-e)[None, :])
    claims.w1_block = (pos, w)


def solve_from_rows(
    s: np.ndarray, raw_rows: np.ndarray, group: int, rank: int, sure: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """Known plaintext: with the rows of the static block s (n, K) re-identified (raw_rows (n, 784)
    their public images), s = (x[:, P] D^-1 + G H) M is linear in the pixels plus rank-`rank`
    noise. A least-squares fit on all pixels leaves the noise as residual; its `rank` directions
    projected off, the fit is exact: its nonzero rows are P, and M's block-diagonal shape (blocks
    of `group` columns: public) pins the part of M the projection took away (the off-block
    entries must vanish: more equations than unknowns). Returns (P in claimed row order, the
    block of each, per block the claimed M rows D^-1 M (pixels x the block's columns)), or None."""
    rows = np.arange(s.shape[0]) if sure is None else np.flatnonzero(sure)
    if rows.size == 0:
        return None
    x = raw_rows[rows].astype(np.float64)
    live = np.flatnonzero(x.max(axis=0) > 0)
    x = x[:, live]
    y = s[rows].astype(np.float64)
    if x.shape[0] < x.shape[1] + 4 * rank:
        return None
    # centred (an intercept): a constant offset of the static's columns is no pixel
    x -= x.mean(axis=0)
    y = y - y.mean(axis=0)
    coef = _lstsq(x, y)
    resid = y - x @ coef
    vn = np.linalg.svd(resid, full_matrices=False)[2][:rank].T  # (K, rank): the noise's directions
    q = np.eye(s.shape[1]) - vn @ vn.T
    coef_q = _lstsq(x, y @ q)  # (live, K): D^-1 M Q on P's rows, 0 elsewhere
    norms = np.linalg.norm(coef_q, axis=1)
    k = s.shape[1]
    pick = np.argsort(norms)[::-1][:k]
    mq = coef_q[pick]
    bounds = [(lo, min(lo + group, k)) for lo in range(0, k, group)]
    resid_by_block, fills = [], []
    for lo, hi in bounds:
        off = np.r_[0:lo, hi:k]
        voff = vn[off]  # M Q + u V^T must vanish off the block: u = -(MQ)_off pinv(V_off^T)
        u = -mq[:, off] @ np.linalg.pinv(voff.T)
        left = mq[:, off] + u @ voff.T
        resid_by_block.append(np.linalg.norm(left, axis=1))
        fills.append(u)
    block_of = np.argmin(np.stack(resid_by_block), axis=0)
    full = np.stack([mq + f @ vn.T for f in fills])[block_of, np.arange(k)]  # (K, K) D^-1 M rows
    per_block = []
    for b, (lo, hi) in enumerate(bounds):
        per_block.append(full[block_of == b][:, lo:hi])
    return live[pick], block_of, per_block
