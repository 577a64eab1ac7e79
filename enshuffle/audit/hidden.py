"""The curious node against resident hidden layers (resident_hidden.py): what it works out from
the per-step A_s = L a[:, Q_s] M_s, D = L dz and its own V_s trajectory.

It sees no ground truth: `attack_hidden` returns claims in the node's own coordinates (a state
name, a step's version, a row group, its basis's columns), `enshuffle.audit.hidden_score`
checks them. The attacks, in the order they build on each other:

1. Row unmixing from D's exact zeros. The layer's pre-activation gradient dz = da * relu'(z) is
   exactly zero wherever a unit is off for a sample (about half the units, more as training
   goes on). D's rows in a group of ROW_GROUP are one orthogonal mixing L_g of ROW_GROUP such
   sparse rows, the same L_g as A's, and nothing else: complete orthogonal dictionary learning.
   Each row of L_g^T is a direction orthogonal to every column of D where that sample is off;
   peeled one at a time (`unmix_rows`) and certified by its exact zeros (`single_sample`). A
   certified row r gives r D = one sample's dz row and r A = that sample's a[:, Q_s] M_s.
   With the deltas' units mixed too (D = L dz N^-T, as the design now sends them), D keeps no
   exact zeros and this certifies nothing but groups where one sample alone has a nonzero delta.
2. Unit unmixing (M_s) from single-sample activations: ReLU activations are non-negative with
   exact zeros, so each column c of M_s^-1 (within a MIX_GROUP block) makes Y c exactly zero
   on every sample whose unit is off: the same sparse-direction search over the rows of the
   unmixed A's, certified by exact zeros (`unmix_units`). The found columns give M_s up to order
   and scale, and w[Q_s] = M_s V_s (N^-1) follows from the node's own V_s (replayed from its
   state and updates).
   Without step 1 it runs on the rows as sent (mixed over samples: no exact zeros), as an ICA
   would.
3. Class grouping: the single-sample dz rows are k-means clustered (10 clusters, signs and
   magnitudes normalized), over the whole run; as a baseline the rows as sent are too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from enshuffle.audit.attacks import CLASSES, kmeans
from enshuffle.audit.recording import RecordedMessage
from enshuffle.coordinator.disguise.resident import MIX_GROUP
from enshuffle.coordinator.disguise.resident_hidden import ROW_GROUP
from enshuffle.kernels import ResidentState

ZERO_REL = 1e-6  # |r . column| below this share of the row's largest entry counts as an exact zero
SPARE_ZEROS = 4  # exact zeros beyond the k - 1 that any direction can be made to have
CANDIDATES = 12  # columns tried as a sample's direction per peel
MAX_STEPS = 32  # steps whose row groups are unmixed
MAX_UNIT_ROWS = 4000  # rows the unit unmixing uses


@dataclass
class HiddenClaims:
    state: str  # e.g. "w2.0"
    layer: int
    units: int  # |Q_s|
    steps: int  # backward steps recorded
    # step 1: (version, group start row, (found, ROW_GROUP) rows of the claimed L_g^T, certified mask)
    row_unmix: list[tuple[int, int, np.ndarray, np.ndarray]] = field(default_factory=list)
    # step 2: per MIX_GROUP block (lo, hi) of the node's columns, (lo, hi, (hi - lo, found) columns of M^-1)
    unit_unmix: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    unit_unmix_source: str = ""  # "single-sample rows" or "rows as sent"
    w_block: np.ndarray | None = None  # (|Q_s|, m): claimed rows of w[Q_s] (node's unit order, any scale)
    v_final: np.ndarray | None = None  # the node's V_s after the last update it received
    # step 3: (version, group start, row index within the claimed rows, cluster id)
    grouping: list[tuple[int, int, int, int]] = field(default_factory=list)
    # the baseline: (version, row of D as sent, cluster id)
    grouping_sent: list[tuple[int, int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _exact_zeros(y: np.ndarray) -> int:
    a = np.abs(y)
    top = float(a.max()) if a.size else 0.0
    return int(np.count_nonzero(a <= ZERO_REL * top)) if top > 0 else 0


def _unit_columns(y: np.ndarray) -> np.ndarray:
    """Columns scaled to unit norm; columns (numerically) zero dropped."""
    n = np.linalg.norm(y, axis=0)
    keep = n > 1e-6 * (n.max() if n.size else 0.0)
    return y[:, keep] / n[keep]


def sparse_direction(
    y: np.ndarray, rng: np.random.Generator, starts: int = 3, iters: int = 30
) -> tuple[np.ndarray, int]:
    """A unit vector c making c @ y sparse (reweighted l1 on the sphere: c the smallest eigenvector
    of sum_u w_u y_u y_u^T, w_u = 1 / max(|c . y_u|, delta), delta shrinking), the best of `starts`
    random starts by its count of exact zeros. y (d, N) with unit columns."""
    d = y.shape[0]
    best: tuple[np.ndarray, int] | None = None
    for _ in range(starts):
        c: np.ndarray = rng.standard_normal((d,))
        c = c / np.linalg.norm(c)
        delta = 0.3
        for _ in range(iters):
            w = 1.0 / np.maximum(np.abs(c @ y), delta)
            c = np.linalg.eigh((y * w) @ y.T)[1][:, 0]
            delta = max(delta * 0.6, 1e-8)
        z = _exact_zeros(c @ y)
        if best is None or z > best[1]:
            best = (c, z)
    assert best is not None
    return best


def _robust_rank(cols: np.ndarray, extra: np.ndarray | None = None) -> int:
    """The rank of [cols, extra] once every column of `cols` the rank depends on alone (leverage
    1: a direction can always be chosen to zero a few columns more than its structure does) is
    dropped."""
    if cols.shape[1] == 0:
        return 0 if extra is None else int(np.linalg.matrix_rank(extra, tol=1e-6)) if extra.size else 0
    both = cols if extra is None or not extra.size else np.hstack([cols, extra])
    u, s, vt = np.linalg.svd(both, full_matrices=False)
    rank = int(np.count_nonzero(s > 1e-6 * float(s[0])))
    lev = np.sum(vt[:rank, : cols.shape[1]] ** 2, axis=0)
    kept = cols[:, lev < 0.99]
    both = kept if extra is None or not extra.size else np.hstack([kept, extra])
    if both.shape[1] == 0:
        return 0
    s = np.linalg.svd(both, compute_uv=False)
    return int(np.count_nonzero(s > 1e-6 * float(s[0])))


def single_sample(c: np.ndarray, z: np.ndarray) -> bool:
    """Is direction c (in z's space, z (k, N) unit columns) one sample's row? A mixture of rows
    is exactly zero only on columns where all of its samples are off (and on as many more as its
    free ratios can be tuned to), and those span at most k - (its sample count) dimensions; one
    sample's zero columns span k - 1, without depending on any single column."""
    k = z.shape[0]
    if k == 1:
        return True
    y = np.abs(c @ z)
    zero = y <= ZERO_REL * float(y.max())
    if np.count_nonzero(zero) < k - 1 + SPARE_ZEROS:  # any k - 1 columns have a direction zeroing them
        return False
    return _robust_rank(z[:, zero]) >= k - 1


def polish(c: np.ndarray, z: np.ndarray, rng: np.random.Generator, rounds: int = 6) -> np.ndarray:
    """c moved onto the exact null space of the columns it (nearly) zeroes; when that space has
    more than one dimension (a sparser sample hides in it), the sparsest direction within it."""
    k = z.shape[0]
    for _ in range(rounds):
        y = np.abs(c @ z)
        near = y <= max(1e-3 * float(y.max()), float(np.sort(y)[min(k - 2, y.shape[0] - 1)]) if k > 1 else 0.0)
        u, s, _ = np.linalg.svd(z[:, near], full_matrices=True)
        s = np.concatenate([s, np.zeros(k - s.shape[0])]) if s.shape[0] < k else s
        null = u[:, s <= 1e-5 * max(float(s[0]), 1e-300)]
        if null.shape[1] == 0:
            return c
        c = null @ (null.T @ c)
        if np.linalg.norm(c) < 1e-9:
            c = null[:, 0]
        c = c / np.linalg.norm(c)
        if null.shape[1] == 1:
            return c
        sub = _unit_columns(null.T @ z)
        if sub.shape[1] < null.shape[1]:
            return c
        # within it, the column direction zeroing most of the others (one sample alone on there)
        counts = np.count_nonzero(np.abs(sub.T @ sub) <= ZERO_REL, axis=1)
        c = null @ sub[:, int(np.argmax(counts))]
    return c


def unmix_rows(
    d: np.ndarray, rng: np.random.Generator, starts: int = 3, rounds: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Rows r (orthonormal, (g, g)) such that r @ d is one sample's sparse row, for d = L_g dz_g
    with L_g orthogonal, peeled one at a time. A column of d where one sample alone is on is
    that sample's row of L_g itself: every column is a candidate, and one whose direction zeroes
    many columns exactly is certified (`single_sample`), projected out of the others (a column
    where two were on becomes the other's), and so on; when no column is, a reweighted-l1
    search on the sphere (`sparse_direction`, `polish`). What is never certified stays mixed.
    Returns (rows, certified)."""
    g = d.shape[0]
    d = np.asarray(d, dtype=np.float64)
    # samples whose row is zero throughout are invisible: search d's column space only
    u, s, _ = np.linalg.svd(_unit_columns(d), full_matrices=True)
    s = np.concatenate([s, np.zeros(g - s.shape[0])]) if s.shape[0] < g else s
    basis = u[:, s > 1e-5 * max(float(s[0]), 1e-300)]
    hidden = u[:, s <= 1e-5 * max(float(s[0]), 1e-300)]
    full = _unit_columns(d)
    rows: list[np.ndarray] = []
    while basis.shape[1] > 0:
        k = basis.shape[1]
        z = _unit_columns(basis.T @ d)
        c = np.ones(1) if k == 1 else None
        if c is None and z.shape[1] >= k:
            # candidates: the columns themselves, most exact zeros first
            counts = np.count_nonzero(np.abs(z.T @ z) <= ZERO_REL, axis=1)
            for u in np.argsort(-counts)[:CANDIDATES]:
                cand = z[:, u] if single_sample(z[:, u], z) else polish(z[:, u], z, rng)
                if single_sample(cand, z):
                    c = cand
                    break
        for _ in range(rounds if c is None and k > 1 and z.shape[1] >= k else 0):
            cand, _ = sparse_direction(z, rng, starts=starts)
            cand = polish(cand, z, rng)
            if single_sample(cand, z):
                c = cand
                break
        if c is None:
            break
        r = basis @ c
        r = r / np.linalg.norm(r)
        # in the whole space too: the columns r zeroes, with the rows found and the invisible
        # directions, span all of r's complement (a mixture of two rows left would not)
        y = np.abs(r @ full)
        known = np.hstack([np.array(rows).reshape(-1, g).T, hidden])
        if _robust_rank(full[:, y <= ZERO_REL * float(y.max())], known) < g - 1:
            break
        rows.append(r)
        u = np.linalg.svd(basis - np.outer(rows[-1], rows[-1] @ basis), full_matrices=False)[0]
        basis = u[:, : k - 1]
    certified = [True] * len(rows) + [False] * (g - len(rows))
    # what is left, as close to the rows as sent as it can be (a sent row there stays itself)
    rest = np.hstack([basis, hidden])
    if rest.shape[1]:
        proj = rest @ rest.T
        pick = np.sort(np.argsort(-np.linalg.norm(proj, axis=0))[: rest.shape[1]])
        rows.extend(np.linalg.qr(proj[:, pick])[0].T)
    return np.array(rows), np.array(certified, dtype=bool)


def _ica_unmixing(y: np.ndarray, rng: np.random.Generator, iters: int = 100) -> np.ndarray:
    """Symmetric FastICA (cube contrast) on y's rows: (d, d) columns c, each y @ c one source."""
    x = y - y.mean(axis=0)
    vals, vecs = np.linalg.eigh(x.T @ x / x.shape[0])
    keep = vals > vals.max() * 1e-10
    white = vecs[:, keep] / np.sqrt(vals[keep])
    z = x @ white
    r = z.shape[1]
    w = np.linalg.qr(rng.standard_normal((r, r)))[0]
    for _ in range(iters):
        w_new = (z.T @ (z @ w) ** 3) / z.shape[0] - 3.0 * w
        u, _, vt = np.linalg.svd(w_new, full_matrices=False)
        w_new = u @ vt
        done = np.max(np.abs(np.abs(np.sum(w_new * w, axis=0)) - 1.0)) < 1e-8
        w = w_new
        if done:
            break
    return white @ w


def _zero_polish(c: np.ndarray, rows: np.ndarray, share: float = 0.3, iters: int = 12) -> np.ndarray:
    """Trimmed least squares: c the null direction of the `share` of rows it makes smallest."""
    n = max(rows.shape[1], int(share * rows.shape[0]))
    for _ in range(iters):
        near = np.argsort(np.abs(rows @ c))[:n]
        c = np.linalg.svd(rows[near], full_matrices=False)[2][-1]
    return c


def unmix_units(y: np.ndarray, rng: np.random.Generator, want: int, tries: int | None = None) -> np.ndarray:
    """Columns c (d, found) of an unmixing of y = X M (X non-negative with exact zeros, M dense
    (d, d)): the columns as sent (right when there is no mixing), then FastICA's directions, each
    made exact by trimmed least squares on the rows it nearly zeroes; kept when y @ c is exactly
    zero on at least 5% of the rows, distinct up to sign (|cos| < 0.99)."""
    d = y.shape[1]
    y = np.asarray(y, dtype=np.float64)
    norms = np.linalg.norm(y, axis=1)
    rows = y[norms > 0] / norms[norms > 0, None]
    if rows.shape[0] < 2 * d:
        return np.zeros((d, 0))
    need = max(d, int(0.05 * rows.shape[0]))
    found: list[np.ndarray] = []
    # candidates: the columns as sent (no mixing at all), then FastICA's directions
    for attempt in range(tries or 2):
        cands = np.eye(d) if attempt == 0 else _ica_unmixing(rows, rng).T
        for c in cands:
            if attempt:
                c = _zero_polish(c / np.linalg.norm(c), rows)
            if _exact_zeros(rows @ c) < need or any(abs(float(c @ f)) > 0.99 for f in found):
                continue
            found.append(c)
        if len(found) >= want:
            break
    return np.array(found[:want]).T if found else np.zeros((d, 0))


def _replay_state(messages: list[RecordedMessage], state: str) -> np.ndarray | None:
    """The node's own V for `state` after every update it was sent (as its daemon computes it)."""
    st: ResidentState | None = None
    for m in messages:
        if m.command == "STATIC" and m.header.get("name") == state:
            arr = next(iter(m.arrays.values()))
            st = ResidentState(arr, int(m.header.get("version", 0)))
        elif m.command == "BATCH" and m.header.get("op") == "resident" and st is not None:
            p = m.header.get("params", {})
            if p.get("state") != state or "update_a" not in m.arrays:
                continue
            count = p["version"] - p["from"]
            ua, dz = m.arrays["update_a"], m.arrays["dz"]
            b = ua.shape[0] // max(count, 1)
            for j in range(st.version - p["from"], count):
                st.apply(ua[j * b : (j + 1) * b], dz[j * b : (j + 1) * b], float(p["lr"][j]), float(p["momentum"]))
                st.version = p["from"] + j + 1
    return None if st is None else st.v


def _dz_features(x: np.ndarray) -> np.ndarray:
    """dz rows, each made unit norm and its sign fixed by its largest entry."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    top = x[np.arange(x.shape[0]), np.argmax(np.abs(x), axis=1)]
    return x * np.where(top < 0, -1.0, 1.0)[:, None]


def hidden_steps(messages: list[RecordedMessage]) -> dict[str, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Per hidden-layer state: (version, A, D) of every backward batch, in order."""
    out: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for m in messages:
        if m.command != "BATCH" or m.header.get("op") != "resident":
            continue
        p = m.header.get("params", {})
        if not p.get("backward") or "update_a" not in m.arrays:
            continue
        count = p["version"] - p["from"]
        ua, dz = m.arrays["update_a"], m.arrays["dz"]
        b = ua.shape[0] // count
        out.setdefault(p["state"], []).append((int(p["version"]), ua[-b:], dz[-b:]))
    return out


def attack_hidden(
    messages: list[RecordedMessage], rng: np.random.Generator, max_steps: int = MAX_STEPS, starts: int = 3
) -> dict[str, HiddenClaims]:
    """Every attack above on every hidden-layer state the node holds."""
    out: dict[str, HiddenClaims] = {}
    for state, steps in hidden_steps(messages).items():
        layer = int(state.split(".")[0][1:])
        k = steps[0][1].shape[1]
        claims = HiddenClaims(state=state, layer=layer, units=k, steps=len(steps))
        # the first steps (dz densest in live units before many die) and the rest spread over the run
        first = np.arange(min(max_steps // 2, len(steps)))
        spread = np.linspace(0, len(steps) - 1, min(max_steps - first.shape[0], len(steps))).round().astype(int)
        picked = np.unique(np.concatenate([first, spread]))
        single_a, single_d, where = [], [], []
        for i in picked:
            version, a, dz = steps[i]
            a64, d64 = a.astype(np.float64), dz.astype(np.float64)
            for lo in range(0, a.shape[0], ROW_GROUP):
                hi = min(lo + ROW_GROUP, a.shape[0])
                rows, ok = unmix_rows(d64[lo:hi], rng, starts=starts)
                claims.row_unmix.append((version, lo, rows, ok))
                for j in np.flatnonzero(ok):
                    single_a.append(rows[j] @ a64[lo:hi])
                    single_d.append(rows[j] @ d64[lo:hi])
                    where.append((version, lo, int(j)))
        certified = sum(int(ok.sum()) for *_, ok in claims.row_unmix)
        total = sum(ok.shape[0] for *_, ok in claims.row_unmix)
        claims.notes.append(
            f"{state}: {certified} of {total} rows of {len(picked)} steps unmixed to one sample each "
            "(certified by exact zeros of dz)"
        )
        # 2. units
        if len(single_a) >= 4 * MIX_GROUP:
            y = np.array(single_a)
            claims.unit_unmix_source = "single-sample rows"
        else:
            y = np.concatenate([s[1].astype(np.float64) for s in (steps[i] for i in picked)])
            claims.unit_unmix_source = "rows as sent"
        if y.shape[0] > MAX_UNIT_ROWS:
            y = y[rng.choice(y.shape[0], MAX_UNIT_ROWS, replace=False)]
        v = _replay_state(messages, state)
        claims.v_final = v
        w_rows = None if v is None else np.array(v)  # a block not unmixed: claimed as held
        for lo in range(0, k, MIX_GROUP):
            hi = min(lo + MIX_GROUP, k)
            cols = unmix_units(y[:, lo:hi], rng, hi - lo)
            claims.unit_unmix.append((lo, hi, cols))
            if v is not None and w_rows is not None and cols.shape[1]:
                # M_g = P Lambda C^-1: rows of C^+ V_g are rows of w[Q_s] (order, scale unknown)
                est = np.linalg.pinv(cols) @ v[lo:hi]
                w_rows[lo : lo + est.shape[0]] = est
        claims.w_block = w_rows
        found = sum(c.shape[1] for _, _, c in claims.unit_unmix)
        claims.notes.append(
            f"{state}: {found} of {k} unmixing columns of M_s found (exact zeros of ReLU "
            f"activations, from {claims.unit_unmix_source})"
        )
        # 3. class grouping, over the run
        if len(single_d) >= CLASSES:
            ids = kmeans(_dz_features(np.array(single_d)), CLASSES, rng)
            claims.grouping = [(ver, lo, j, int(c)) for (ver, lo, j), c in zip(where, ids)]
        sent = [(ver, r) for ver, _, dz in (steps[i] for i in picked) for r in range(dz.shape[0])]
        sent_x = np.concatenate([steps[i][2] for i in picked])
        ids = kmeans(_dz_features(sent_x), CLASSES, rng)
        claims.grouping_sent = [(ver, r, int(c)) for (ver, r), c in zip(sent, ids)]
        out[state] = claims
    return out
