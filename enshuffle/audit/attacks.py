"""The curious node: what it can work out from its recording and public information alone.

Input: the node's recording (every verified STATIC and BATCH) and `Public` (the public dataset,
the preset's public settings and the source code, i.e. anything importable from enshuffle that
a node can read). No ground truth enters here; `attack` returns the node's *claims* in its own
coordinates (static names, static rows, static columns), and `enshuffle.audit.scoring` checks them.

Attacks (docs/audit.md says what each needs and what it got):

- multiset match of static columns: every static column, scaled back by each candidate power of
  two, is compared (sorted) with every public pixel column of the same images prepared as the
  preset prepares them. A match gives the column's pixel position, its scale and every value
  exactly (raw 0..255 through the pixel's intensity table);
- mantissa match of the weights a node receives in x_w1 batches against public initial weights
  (the notebook's RandomState(402), and the same seed under the current init): pixel positions;
- moment statistics (skewness, kurtosis, share of the mode) of each column against public
  pixels' (affine- and scale-invariant): positions when values are not exact;
- re-identification of static rows against the public dataset: exact match of the recovered
  values at the recovered positions, and nearest neighbour on standardized values;
- labels: dz1 rows of each dw1 batch clustered (k-means on column-normalized, row-normalized
  rows), clusters named by the public labels of the re-identified images in them;
- rows linked across steps: a batch's `rows` index the static operand, the same in every step;
- w1 outside the node's block: public initial weights plus the updates a node can compute from
  the public images of its re-identified rows and the dz1 it receives;
- FastICA (kurtosis, symmetric) on each static block: mixing of independent sources undone.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np

from enshuffle import model
from enshuffle.audit.recording import RecordedMessage
from enshuffle.model import prepare_inputs

EXPONENTS = np.arange(-12, 13)  # candidate power-of-two scales (the source draws from -4..4)
CLASSES = 10


@dataclass
class Public:
    """What any node may know: the public dataset and the run's public settings (the preset)."""

    train_images: np.ndarray  # (60000, 784) uint8, the public training set
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    preset: model.Preset  # public: the source code and the command line
    # The public indices of the images the run trains on (`training_rows` of the public labels,
    # --limit and the preset: all public); None: the first n
    train_rows: np.ndarray | None = None

    def run_rows(self, n: int) -> np.ndarray:
        """The public indices of the run's n training images, in the run's row order."""
        if self.train_rows is None:
            return np.arange(n)
        assert self.train_rows.shape[0] == n, f"{n} training rows, the subset has {self.train_rows.shape[0]}"
        return self.train_rows


@dataclass
class StaticClaims:
    name: str
    which: str  # "train" | "test"
    rows: int
    cols: int
    dtype: str
    values: np.ndarray  # (rows, cols) int16: claimed raw pixel value 0..255, -1 = no claim
    scale_exp: np.ndarray  # (cols,) claimed static power-of-two scale; -999 = no claim
    positions_stats: np.ndarray  # (cols,) claimed pixel from public statistics, -1 = none
    positions_weights: np.ndarray  # (cols,) claimed pixel from public initial weights, -1 = none
    reid_exact: np.ndarray  # (rows,) claimed public image index (exact match), -1 = none
    reid_nn: np.ndarray  # (rows,) claimed public image index (nearest neighbour), -1 = none
    reid_nn_rows: np.ndarray | None = None  # the rows nearest neighbour was tried on (a sample)
    ica_sources: np.ndarray | None = None  # (len(ica_rows), r) FastICA components
    ica_rows: np.ndarray | None = None  # the static rows ICA ran on (a sample of large blocks)


@dataclass
class Claims:
    statics: dict[str, StaticClaims]
    labels: dict[str, np.ndarray]  # train static name -> (rows,) claimed label, -1 = none
    groups: dict[str, np.ndarray]  # train static name -> (rows,) global class group (unnamed), -1 = none
    grouping: list[tuple[str, np.ndarray, np.ndarray]]  # (static, rows, cluster id) per dw1 batch
    occurrences: list[tuple[str, int, np.ndarray]]  # (static, step, rows) of every train batch
    w1_estimate: np.ndarray | None  # (784, 128) in true pixel/unit coordinates, or None
    w1_source: str = ""
    # The node's own block of the last w1 it was sent: (claimed pixel per row, (rows, 128) values
    # with the static row scales undone; hidden units in the batch's secret order and scale).
    w1_block: tuple[np.ndarray, np.ndarray] | None = None
    notes: list[str] = field(default_factory=list)
    # train static name -> enshuffle.audit.trajectory.TrajectoryClaims (the weight-trajectory attack)
    trajectory: dict = field(default_factory=dict)


# -- helpers -------------------------------------------------------------------------------
def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def _which(name: str) -> str:
    return name.split(".")[0]


def _pow2(e, dtype) -> np.ndarray:
    return np.ldexp(np.ones(np.shape(e), dtype=dtype), e)


def _prepared(public: Public, n_train: int):
    """The run's n_train public training images and the public test images prepared exactly as
    the preset prepares them (the source's own function), and each pixel's intensity table."""
    train_u8 = public.train_images[public.run_rows(n_train)].reshape(n_train, -1)
    test_u8 = public.test_images.reshape(public.test_images.shape[0], -1)
    train_x, test_x = prepare_inputs(train_u8, test_u8, public.preset)
    table = np.full((256, train_x.shape[1]), np.nan, dtype=np.float64)
    for p in range(train_x.shape[1]):  # column by column: no (n, 784) index arrays
        table[train_u8[:, p], p] = train_x[:, p]
        table[test_u8[:, p], p] = test_x[:, p]
    return {"train": (train_u8, train_x), "test": (test_u8, test_x)}, table


def _moments(x: np.ndarray) -> np.ndarray:
    """(n, c) -> (c, 4) affine- and scale-invariant column statistics."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0
    z = (x - mu) / sd
    skew = (z**3).mean(axis=0)
    kurt = (z**4).mean(axis=0)
    srt = np.sort(x, axis=0)
    # share of entries equal to the column's smallest value (background pixels) and largest
    at_min = (x == srt[0]).mean(axis=0)
    at_max = (x == srt[-1]).mean(axis=0)
    return np.stack([np.tanh(skew / 4), np.tanh(kurt / 20), at_min, at_max], axis=1)


# -- statics: values, scales, positions ------------------------------------------------------
def _multiset_match(
    static: np.ndarray, prepared_cols: np.ndarray, other: tuple | None
) -> tuple[np.ndarray, np.ndarray]:
    """For each static column, (pixel, exponent) such that sorted(col * 2**-e) equals the sorted
    public pixel column exactly; -1 / -999 where none does. `other` = (static, public) of the
    other split (test for train), used to break ties between pixels with equal multisets."""
    c = static.shape[1]
    pixel = np.full(c, -1, dtype=np.int64)
    exp = np.full(c, -999, dtype=np.int64)
    if static.dtype != prepared_cols.dtype:
        return pixel, exp
    table: dict[bytes, list[int]] = {}
    srt_pub = np.sort(prepared_cols, axis=0)
    for p in range(srt_pub.shape[1]):
        table.setdefault(_digest(srt_pub[:, p]), []).append(p)
    other_digests = None
    if other is not None and other[0].dtype == other[1].dtype:
        osrt_pub = np.sort(other[1], axis=0)
        other_digests = [_digest(osrt_pub[:, p]) for p in range(osrt_pub.shape[1])]
        osrt = np.sort(other[0], axis=0)
    srt = np.sort(static, axis=0)
    for e in EXPONENTS:
        scaled = srt * _pow2(-int(e), srt.dtype)
        for j in np.flatnonzero(pixel < 0):
            cands = table.get(_digest(scaled[:, j]))
            if not cands:
                continue
            if len(cands) > 1 and other_digests is not None and j < osrt.shape[1]:
                key = _digest(osrt[:, j] * _pow2(-int(e), osrt.dtype))
                narrowed = [p for p in cands if other_digests[p] == key]
                cands = narrowed or cands
            pixel[j], exp[j] = cands[0], int(e)
    return pixel, exp


def _values_from_match(static: np.ndarray, pixel: np.ndarray, exp: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Raw 0..255 claims for matched columns via each pixel's intensity -> prepared value table."""
    out = np.full(static.shape, -1, dtype=np.int16)
    for j in np.flatnonzero(pixel >= 0):
        col = static[:, j].astype(np.float64) * 2.0 ** -int(exp[j])
        t = table[:, pixel[j]]
        known = np.flatnonzero(~np.isnan(t))
        order = np.argsort(t[known], kind="stable")
        vals, ints = t[known][order], known[order]
        pos = np.clip(np.searchsorted(vals, col), 0, len(vals) - 1)
        ok = vals[pos] == col
        out[ok, j] = ints[pos[ok]]
    return out


def _lattice_values(static: np.ndarray, raw: bool) -> tuple[np.ndarray, np.ndarray]:
    """Columns whose values lie on a lattice of at most 256 levels: raw presets (x = v * 2**e,
    v integer 0..255: the largest power of two dividing the values) or affine ones (the step
    between distinct values). Returns (values claim or -1, exponent or -999); the affine claim
    assumes the smallest value is intensity 0."""
    n, c = static.shape
    values = np.full((n, c), -1, dtype=np.int16)
    exp = np.full(c, -999, dtype=np.int64)
    x = static.astype(np.float64)
    if raw:
        for e in EXPONENTS[::-1]:  # largest power of two first
            y = x * 2.0 ** -int(e)
            ok = np.all(y == np.round(y), axis=0) & np.all((y >= 0) & (y <= 255), axis=0) & (exp == -999)
            ok &= np.any(x != 0, axis=0)
            exp[ok] = int(e)
            values[:, ok] = np.round(y[:, ok]).astype(np.int16)
        return values, exp
    srt = np.sort(x, axis=0)
    diffs = np.diff(srt, axis=0)
    for j in range(c):
        d = diffs[:, j]
        d = d[d > 0]
        if d.size == 0:
            continue
        step = d.min()
        k = (x[:, j] - srt[0, j]) / step
        if np.max(np.abs(k - np.round(k))) < 1e-3 and k.max() <= 255.5:
            values[:, j] = np.round(k).astype(np.int16)
    return values, exp


def _public_init_candidates(preset) -> list[np.ndarray]:
    """Initial w1 matrices a node can compute from the source: the notebook's RandomState(402)
    (seed preset), and the 402-seeded draws of the scaled init (old and current code)."""
    dt = np.dtype(preset.dtype)
    out = []
    rng = np.random.RandomState(402)
    out.append((rng.randn(784, 128) * 0.01).astype(dt))
    rng = np.random.RandomState(402)
    out.append((rng.randn(784, 128) / math.sqrt(784)).astype(dt))
    try:
        p402 = replace(preset, seed=402)
        seed = model.training_seed(p402, 0) if hasattr(model, "training_seed") else None
        params = model.init_params(p402, seed) if seed is not None else model.init_params(p402)
        out.append(np.asarray(params["w1"], dtype=dt))
    except (TypeError, ValueError):
        pass
    return out


def _mantissa_table(w: np.ndarray):
    m = np.frexp(w.astype(np.float64).ravel())[0]
    order = np.argsort(m, kind="stable")
    return m[order], order


def _match_weights(b: np.ndarray, tables) -> tuple[np.ndarray, np.ndarray, float]:
    """Rows (pixels) and columns (units) of an x_w1 operand b from mantissa matches with public
    initial weights: (pixel per row, unit per column, share of entries matched)."""
    best = (np.full(b.shape[0], -1), np.full(b.shape[1], -1), 0.0)
    m = np.frexp(b.astype(np.float64))[0]
    for srt, order in tables:
        pos = np.clip(np.searchsorted(srt, m), 0, len(srt) - 1)
        hit = srt[pos] == m
        share = float(hit.mean())
        if share <= best[2] or share < 0.05:
            continue
        flat = np.where(hit, order[pos], -1)
        pix = np.where(hit, flat // 128, -1)
        unit = np.where(hit, flat % 128, -1)
        rows = np.full(b.shape[0], -1)
        for i in range(b.shape[0]):
            v = pix[i][pix[i] >= 0]
            if v.size * 4 >= b.shape[1]:
                rows[i] = np.bincount(v).argmax()
        cols = np.full(b.shape[1], -1)
        for j in range(b.shape[1]):
            v = unit[:, j][unit[:, j] >= 0]
            if v.size * 4 >= b.shape[0]:
                cols[j] = np.bincount(v).argmax()
        best = (rows, cols, share)
    return best


# -- rows -------------------------------------------------------------------------------
def _reid_exact(values: np.ndarray, positions: np.ndarray, public_u8: np.ndarray) -> np.ndarray:
    """Static rows whose claimed values at claimed positions equal one public image's."""
    n = values.shape[0]
    usable = np.flatnonzero((positions >= 0) & np.all(values >= 0, axis=0))
    out = np.full(n, -1, dtype=np.int64)
    if usable.size < 8:
        return out
    rng = np.random.default_rng(0)  # hashing weights: any fixed numbers do
    w = rng.integers(1, 2**62, size=usable.size, dtype=np.int64)
    with np.errstate(over="ignore"):
        keys = values[:, usable].astype(np.int64) @ w
        pub = public_u8[:, positions[usable]].astype(np.int64) @ w
    order = np.argsort(pub, kind="stable")
    srt = pub[order]
    pos = np.clip(np.searchsorted(srt, keys), 0, len(srt) - 1)
    hit = srt[pos] == keys
    out[hit] = order[pos[hit]]
    return out


NN_ROWS = 10_000  # nearest-neighbour re-identification tries at most this many static rows


def _reid_nn(
    static: np.ndarray, values: np.ndarray, positions: np.ndarray, public_x: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Nearest public image (standardized at the claimed positions) for static rows `rows`
    (the others stay -1: the distance computation is n x N x K)."""
    out_all = np.full(static.shape[0], -1, dtype=np.int64)
    static, values = static[rows], values[rows]
    n = static.shape[0]
    usable = np.flatnonzero(positions >= 0)
    if usable.size < 8:
        return np.full(n, -1, dtype=np.int64)
    have = np.all(values[:, usable] >= 0, axis=0)
    x = np.where(have[None, :], values[:, usable], static[:, usable]).astype(np.float64)
    p = public_x[:, positions[usable]].astype(np.float64)

    def z(a):
        sd = a.std(axis=0)
        sd[sd == 0] = 1.0
        return (a - a.mean(axis=0)) / sd

    x, p = z(x), z(p)
    p_sq = (p**2).sum(axis=1)[None, :]
    out = np.empty(n, dtype=np.int64)
    for lo in range(0, n, 2048):  # chunks keep the distance matrix small on 60,000 rows
        chunk = x[lo : lo + 2048]
        d = p_sq - 2.0 * (chunk @ p.T) + (chunk**2).sum(axis=1)[:, None]
        two = np.partition(d, 1, axis=1)[:, :2]
        best = np.argmin(d, axis=1)
        # claim only a clear winner: the nearest image much nearer than the second nearest
        confident = two[:, 0] < 0.25 * np.maximum(two[:, 1], 1e-300)
        out[lo : lo + 2048] = np.where(confident, best, -1)
    out_all[rows] = out
    return out_all


# -- labels ------------------------------------------------------------------------------
def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, restarts: int = 4, iters: int = 60) -> np.ndarray:
    """(n, d) -> (n,) cluster ids, k-means++ seeded, best of `restarts` by inertia."""
    n = x.shape[0]
    k = min(k, n)
    best, best_inertia = np.zeros(n, dtype=np.int64), np.inf
    sq = (x**2).sum(axis=1)
    for _ in range(restarts):
        centers = [x[rng.integers(n)]]
        d2 = ((x - centers[0]) ** 2).sum(axis=1)
        for _ in range(k - 1):
            total = d2.sum()
            idx = rng.integers(n) if total <= 0 else rng.choice(n, p=d2 / total)
            centers.append(x[idx])
            d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(axis=1))
        c = np.array(centers)
        labels = np.zeros(n, dtype=np.int64)
        for _ in range(iters):
            dist = sq[:, None] - 2.0 * x @ c.T + (c**2).sum(axis=1)[None, :]
            new = dist.argmin(axis=1)
            counts = np.bincount(new, minlength=k)
            sums = np.zeros_like(c)
            np.add.at(sums, new, x)
            c = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c)
            if np.array_equal(new, labels):
                break
            labels = new
        inertia = float(dist[np.arange(n), labels].sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def delta_features(b: np.ndarray) -> np.ndarray:
    """dz1 rows made invariant to per-column powers of two and per-row magnitude."""
    x = b.astype(np.float64)
    rms = np.sqrt((x**2).mean(axis=0))
    rms[rms == 0] = 1.0
    x = x / rms
    norm = np.linalg.norm(x, axis=1)
    norm[norm == 0] = 1.0
    return x / norm[:, None]


def global_groups(
    grouping: list[tuple[str, np.ndarray, np.ndarray]], name: str, rows_total: int, iters: int = 20
) -> np.ndarray:
    """One class grouping of all static rows from per-batch dz1 clusters, tied together across
    epochs: a row seen in two batches links a cluster of one to a cluster of the other. Label
    propagation on that graph: every (batch, cluster) keeps a 10-vector, seeded one-hot in the
    first batch, each round the average over its rows of the vectors of their other clusters.
    Returns (rows_total,) group ids, -1 for rows never seen."""
    mine = [(rows, ids) for n, rows, ids in grouping if n == name]
    if len(mine) < 2:
        return np.full(rows_total, -1, dtype=np.int64)
    offsets = np.cumsum([0] + [CLASSES] * len(mine))
    node_of = [offsets[b] + ids for b, (_, ids) in enumerate(mine)]  # (batch rows) -> graph node
    all_rows = np.concatenate([rows for rows, _ in mine])
    all_nodes = np.concatenate(node_of)
    vec = np.zeros((offsets[-1], CLASSES))
    vec[offsets[0] + np.arange(CLASSES), np.arange(CLASSES)] = 1.0
    seeded = np.zeros(offsets[-1], dtype=bool)
    seeded[offsets[0] : offsets[1]] = True
    for _ in range(iters):
        per_row = np.zeros((rows_total, CLASSES))
        np.add.at(per_row, all_rows, vec[all_nodes])  # each row: the sum of its clusters' vectors
        incoming = per_row[all_rows] - vec[all_nodes]  # what a row's *other* clusters say
        new = np.zeros_like(vec)
        np.add.at(new, all_nodes, incoming)
        norm = new.sum(axis=1, keepdims=True)
        new = np.where(norm > 0, new / np.maximum(norm, 1e-300), vec)
        new[seeded] = vec[seeded]
        vec = new
    per_row = np.zeros((rows_total, CLASSES))
    np.add.at(per_row, all_rows, vec[all_nodes])
    out = per_row.argmax(axis=1)
    out[per_row.sum(axis=1) == 0] = -1
    return out


# -- ICA ---------------------------------------------------------------------------------
def fast_ica(x: np.ndarray, components: int, rng: np.random.Generator, iters: int = 200) -> np.ndarray:
    """Symmetric FastICA with the kurtosis (cube) contrast: (n, d) -> (n, components) sources.
    Works for both super-Gaussian (sparse pixels) and sub-Gaussian (uniform noise) sources."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    cov = x.T @ x / x.shape[0]
    vals, vecs = np.linalg.eigh(cov)
    keep = np.argsort(vals)[::-1][:components]
    keep = keep[vals[keep] > vals.max() * 1e-10]
    white = vecs[:, keep] / np.sqrt(vals[keep])
    z = x @ white
    r = z.shape[1]
    w = np.linalg.qr(rng.standard_normal((r, r)))[0]
    for _ in range(iters):
        y = z @ w
        w_new = (z.T @ y**3) / z.shape[0] - 3.0 * w
        u, _, vt = np.linalg.svd(w_new, full_matrices=False)
        w_new = u @ vt
        if np.max(np.abs(np.abs(np.sum(w_new * w, axis=0)) - 1.0)) < 1e-7:
            w = w_new
            break
        w = w_new
    return z @ w


def remove_top_components(x: np.ndarray, rank: int) -> np.ndarray:
    """(n, K) minus its `rank` strongest principal directions (centred)."""
    x = x - x.mean(axis=0)
    if rank <= 0:
        return x
    _, _, vt = np.linalg.svd(x[:: max(1, x.shape[0] // 20000)], full_matrices=False)
    top = vt[:rank]
    return x - (x @ top.T) @ top


def _public_noise_rank() -> int:
    """The noise rank of the "share" disguise, if the source defines one (it is public)."""
    try:
        # lazily, and only this public constant: the attacker plays a node, which has no coordinator code
        from enshuffle.coordinator.disguise import pixel_share
    except ImportError:
        return 0
    return int(getattr(pixel_share, "NOISE_RANK", 0) or 0)


# -- the attack --------------------------------------------------------------------------
def attack(
    messages: list[RecordedMessage],
    public: Public,
    *,
    ica: bool = True,
    rng: np.random.Generator | None = None,
    trajectory: bool = True,
) -> Claims:
    """Everything the node claims to know, from its recording and public information."""
    rng = rng or np.random.default_rng(0)
    claims = _attack(messages, public, ica=ica, rng=rng)
    if trajectory:
        # only when asked for: the trajectory attack is the audit's heaviest module
        from enshuffle.audit.trajectory import attack_trajectory

        statics = {m.header["name"]: next(iter(m.arrays.values())) for m in messages if m.command == "STATIC"}
        try:
            claims.trajectory = attack_trajectory(messages, public, statics, rng)
        except Exception as exc:  # noqa: BLE001 - an attack that fails is reported, not fatal
            claims.notes.append(f"weight-trajectory attack failed: {type(exc).__name__}: {exc}")
        for t in claims.trajectory.values():
            claims.notes.extend(t.notes)
    return claims


def _attack(messages: list[RecordedMessage], public: Public, *, ica: bool, rng: np.random.Generator) -> Claims:
    preset = public.preset
    statics = {m.header["name"]: next(iter(m.arrays.values())) for m in messages if m.command == "STATIC"}
    batches = [m for m in messages if m.command == "BATCH" and m.header.get("op") == "matmul"]
    notes: list[str] = []
    n_train = next((a.shape[0] for name, a in statics.items() if _which(name) == "train"), 0)
    prepared, table = _prepared(public, n_train) if n_train else ({}, None)
    inits = _public_init_candidates(preset)
    tables = [_mantissa_table(w) for w in inits]
    raw = getattr(preset, "inputs", "raw") == "raw"

    # Positions from public initial weights: the first x_w1 batch on each static.
    by_weights: dict[str, np.ndarray] = {}
    matched_init: np.ndarray | None = None
    for m in batches:
        name = m.header["params"].get("a_static")
        if not name or m.header["params"].get("transpose_a") or name in by_weights:
            continue
        rows_px, _, share = _match_weights(m.arrays["b"], tables)
        by_weights[name] = rows_px
        if share > 0.5:
            matched_init = next(w for w, t in zip(inits, tables) if _match_weights(m.arrays["b"], [t])[2] == share)
            notes.append(f"x_w1 operand of {name}: {share:.0%} of entries carry public initial weights' mantissas")

    out: dict[str, StaticClaims] = {}
    for name, s in statics.items():
        which = _which(name)
        if which != "train" or which not in prepared:
            continue  # the test split is public anyway: it only breaks ties below
        u8, px = prepared[which]
        other_which = "test" if which == "train" else "train"
        other_name = name.replace(which + ".", other_which + ".", 1)
        other = (statics[other_name], prepared[other_which][1]) if other_name in statics else None
        pixel, exp = _multiset_match(s, px, other)
        values = _values_from_match(s, pixel, exp, table)
        lat_values, lat_exp = _lattice_values(s, raw)
        fill = (pixel < 0) & np.all(lat_values >= 0, axis=0)
        values[:, fill] = lat_values[:, fill]
        exp = np.where(exp == -999, lat_exp, exp)
        # Positions from moments where the multiset found nothing.
        stats_pos = pixel.copy()
        missing = np.flatnonzero(stats_pos < 0)
        if missing.size:
            # statistics need no more than a sample of rows (and memory stays small on 60,000)
            sample = rng.choice(s.shape[0], min(s.shape[0], NN_ROWS), replace=False)
            f_static = _moments(s[sample][:, missing])
            f_pub = _moments(px[rng.choice(px.shape[0], min(px.shape[0], NN_ROWS), replace=False)])
            d = ((f_static[:, None, :] - f_pub[None, :, :]) ** 2).sum(axis=2)
            stats_pos[missing] = d.argmin(axis=1)
        wpos = by_weights.get(name, np.full(s.shape[1], -1))
        if wpos.shape[0] != s.shape[1]:
            wpos = np.full(s.shape[1], -1)
        best_pos = np.where(pixel >= 0, pixel, np.where(wpos >= 0, wpos, -1))
        public_u8 = (
            public.train_images.reshape(public.train_images.shape[0], -1)
            if which == "train"
            else public.test_images.reshape(public.test_images.shape[0], -1)
        )
        reid_exact = _reid_exact(values, best_pos, public_u8)
        nn_pos = np.where(best_pos >= 0, best_pos, stats_pos)
        nn_rows = (
            np.sort(rng.choice(s.shape[0], NN_ROWS, replace=False)) if s.shape[0] > NN_ROWS else np.arange(s.shape[0])
        )
        reid_nn = _reid_nn(s, values, nn_pos, px, nn_rows)
        sources, ica_rows = None, None
        if ica and which == "train":
            ica_rows = (
                np.sort(rng.choice(s.shape[0], NN_ROWS, replace=False))
                if s.shape[0] > NN_ROWS
                else np.arange(s.shape[0])
            )
            block = s[ica_rows].astype(np.float64)
            if not np.all(values >= 0):
                # The source's low-rank noise (NOISE_RANK public factors) sits in the block's
                # strongest principal directions: project them out before unmixing.
                block = remove_top_components(block, _public_noise_rank())
            sources = fast_ica(block, min(s.shape[1], 64), rng)
        out[name] = StaticClaims(
            name=name,
            which=which,
            rows=s.shape[0],
            cols=s.shape[1],
            dtype=str(s.dtype),
            values=values,
            scale_exp=exp,
            positions_stats=stats_pos,
            positions_weights=wpos,
            reid_exact=reid_exact,
            reid_nn=reid_nn,
            reid_nn_rows=nn_rows,
            ica_sources=sources,
            ica_rows=ica_rows,
        )

    # Rows linked across steps and the dz1 channel.
    occurrences, grouping = [], []
    labels: dict[str, np.ndarray] = {}
    for m in batches:
        name = m.header["params"].get("a_static")
        if not name or _which(name) != "train":
            continue
        rows = np.asarray(m.arrays["rows"], dtype=np.int64)
        occurrences.append((name, int(m.header.get("step", 0)), rows))
        if m.header["params"].get("transpose_a") and rows.shape[0] >= CLASSES:
            grouping.append((name, rows, kmeans(delta_features(m.arrays["b"]), CLASSES, rng)))
    # The resident disguise sends each step's dz1 with the rows it belongs to (update_rows, dz):
    # the same clustering, on the deltas exactly as they arrive.
    for m in messages:
        if m.command != "BATCH" or m.header.get("op") != "resident":
            continue
        name = m.header["params"].get("a_static")
        if not name or _which(name) != "train":
            continue
        if "rows" in m.arrays:
            occurrences.append((name, int(m.header.get("step", 0)), np.asarray(m.arrays["rows"], dtype=np.int64)))
        urows, dz = m.arrays.get("update_rows"), m.arrays.get("dz")
        if urows is None or dz is None or urows.ndim != 2 or urows.shape[1] < CLASSES:
            continue
        b = urows.shape[1]
        for j in range(urows.shape[0]):
            grouping.append(
                (
                    name,
                    np.asarray(urows[j], dtype=np.int64),
                    kmeans(delta_features(dz[j * b : (j + 1) * b]), CLASSES, rng),
                )
            )
    for name, c in out.items():
        if c.which != "train":
            continue
        claim = np.full(c.rows, -1, dtype=np.int64)
        reid = np.where(c.reid_exact >= 0, c.reid_exact, c.reid_nn)
        have = reid >= 0
        claim[have] = public.train_labels[reid[have]]
        # Name each dz1 cluster by the public labels of the images its rows were matched to.
        for gname, rows, ids in grouping:
            if gname != name:
                continue
            for k in np.unique(ids):
                members = rows[ids == k]
                known = claim[members][claim[members] >= 0]
                if known.size:
                    fill = members[claim[members] < 0]
                    claim[fill] = np.bincount(known, minlength=CLASSES).argmax()
        labels[name] = claim

    w1_est, w1_source = _w1_estimate(matched_init, inits, out, batches, prepared, public, notes)
    w1_block = _last_w1_block(batches, out)
    groups = {name: global_groups(grouping, name, c.rows) for name, c in out.items() if c.which == "train"}
    for name, ids in groups.items():
        claim = labels[name]
        if (claim >= 0).mean() >= 0.5 or (ids >= 0).mean() < 0.9:
            continue  # images named them already, or one epoch linked no batches together
        # No images to name the groups with: name them by size against the public class counts
        # of the training images the run uses (`Public.run_rows`). Equal counts (all 60,000:
        # 6,000 each; a balanced --limit) give nothing; a subset's unequal counts do.
        counts = np.bincount(public.train_labels[public.run_rows(len(ids))], minlength=CLASSES)
        sizes = np.bincount(ids[ids >= 0], minlength=CLASSES)
        if len(np.unique(counts)) == 1:
            continue
        name_of = np.empty(CLASSES, dtype=np.int64)
        name_of[np.argsort(sizes, kind="stable")] = np.argsort(counts, kind="stable")
        fill = (claim < 0) & (ids >= 0)
        claim[fill] = name_of[ids[fill]]
        notes.append(
            f"{name}: dz1 groups named by their sizes against the public class counts of the first {len(ids)} images"
        )
    return Claims(
        statics=out,
        labels=labels,
        groups=groups,
        grouping=grouping,
        occurrences=occurrences,
        w1_estimate=w1_est,
        w1_source=w1_source,
        notes=notes,
        w1_block=w1_block,
    )


def _last_w1_block(batches, statics) -> tuple[np.ndarray, np.ndarray] | None:
    """The last x_w1 operand (the weights after the last update, when the run ends with a test
    pass), rows placed at the claimed pixels, static row scales undone where they were found."""
    for m in reversed(batches):
        name = m.header["params"].get("a_static")
        if not name or m.header["params"].get("transpose_a"):
            continue
        train_name = name.replace(_which(name) + ".", "train.", 1)
        c = statics.get(train_name)
        if c is None:
            continue
        b = m.arrays["b"].astype(np.float64)
        if b.shape[0] != c.cols:
            return None
        pos = np.where(c.positions_weights >= 0, c.positions_weights, c.positions_stats)
        scale = np.where(c.scale_exp == -999, 0, c.scale_exp)
        return pos, b * (2.0**scale)[:, None]
    return None


def _w1_estimate(matched_init, inits, statics, batches, prepared, public, notes):
    """Final w1 as the node can rebuild it: the public initial weights its x_w1 operands
    matched, plus (plain SGD) the updates lr * X^T dz1 from re-identified public images and the
    dz1 it received, when it can name dz1's units (via its own x_w1 operands across steps)."""
    if matched_init is None:
        # Nothing public matched: the best a node can do is the public seed's draw.
        return (inits[0] if getattr(public.preset, "init", "") == "notebook" else inits[-1]).astype(
            np.float64
        ), "public-seed guess (no match)"
    w = matched_init.astype(np.float64).copy()
    try:
        upd = _sgd_updates(batches, statics, prepared, public, matched_init)
    except Exception as exc:  # noqa: BLE001 - an attack that fails is reported, not fatal
        notes.append(f"w1 updates not rebuilt: {type(exc).__name__}: {exc}")
        upd = None
    if upd is None:
        return w, "public initial weights"
    return w + upd, "public initial weights + rebuilt updates"


def _sgd_updates(batches, statics, prepared, public, w0):
    """Sum over steps of lr * X^T dz1 (plain SGD presets only), units named by following the
    node's own w1 block from one x_w1 operand to the next; None when it cannot be done."""
    preset = public.preset
    if getattr(preset, "optimizer", "") != "sgd":
        return None
    name = next((n for n, c in statics.items() if c.which == "train" and np.all(c.positions_weights >= 0)), None)
    if name is None:
        return None
    c = statics[name]
    pix = c.positions_weights
    reid = np.where(c.reid_exact >= 0, c.reid_exact, -1)
    if np.any(reid < 0):
        return None
    x_pub = prepared["train"][1].astype(np.float64)  # rows: the run's images, in its row order
    at = np.full(public.train_images.shape[0], -1, dtype=np.int64)  # public index -> row of x_pub
    at[public.run_rows(x_pub.shape[0])] = np.arange(x_pub.shape[0])
    reid = at[reid]
    if np.any(reid < 0):
        return None
    xw = [
        m for m in batches if m.header["params"].get("a_static") == name and not m.header["params"].get("transpose_a")
    ]
    dw = [m for m in batches if m.header["params"].get("a_static") == name and m.header["params"].get("transpose_a")]
    if not dw:
        return None
    lr = float(preset.learning_rate)
    named = w0.astype(np.float64)[pix]  # (|P|, 128): the node's block at the current step, true units
    total = np.zeros((784, 128))
    for t, m in enumerate(dw):
        b = m.arrays["b"].astype(np.float64)  # dz1 rows (secret order), units permuted, scaled
        rows = np.asarray(m.arrays["rows"], dtype=np.int64)
        x_rows = x_pub[reid[rows]]  # the public images of those rows, all pixels
        g = x_rows.T @ b  # (784, 128) update directions, units still unnamed and scaled
        # The next x_w1 operand of this static shows the block after the update: name each dz1
        # column by the unit whose change it explains, and read its power-of-two scale.
        nxt = [x for x in xw if int(x.header.get("step", 0)) > int(m.header.get("step", 0))]
        if not nxt:
            return None
        after = nxt[0].arrays["b"].astype(np.float64)
        # undo the static row scale: rows of b carry 2**-pixel_exp; its claim is c.scale_exp
        if np.any(c.scale_exp == -999):
            return None
        after = after * (2.0**c.scale_exp)[:, None]
        own = g[pix]  # (|P|, 128) the node's own update directions
        # after[:, k] = 2**s_k * (named[:, u] + lr * 2**-e_j * own[:, j]) for unknown u, j, s_k, e_j
        unit_of_after = _match_columns(after, named)
        delta = np.zeros_like(named)
        for k, u in enumerate(unit_of_after):
            if u < 0:
                return None
            col = after[:, k]
            s = np.round(np.log2(np.abs(col @ named[:, u]) / (named[:, u] @ named[:, u])))
            delta[:, u] = col * 2.0**-s - named[:, u]
        j_of_unit = _match_columns(delta, own)
        step_update = np.zeros((784, 128))
        for u, j in enumerate(j_of_unit):
            if j < 0:
                return None
            ratio = (delta[:, u] @ own[:, j]) / (own[:, j] @ own[:, j])
            e = np.round(np.log2(abs(ratio) / lr)) if ratio != 0 else 0.0
            step_update[:, u] = lr * 2.0**e * g[:, j]
        total += step_update
        named = named + step_update[pix]
    return total


def _match_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each column of a, the column of b with the largest |cosine| (greedy one-to-one)."""
    an = a / np.maximum(np.linalg.norm(a, axis=0), 1e-300)
    bn = b / np.maximum(np.linalg.norm(b, axis=0), 1e-300)
    sim = np.abs(an.T @ bn)
    out = np.full(a.shape[1], -1)
    used = np.zeros(b.shape[1], dtype=bool)
    for flat in np.argsort(sim, axis=None)[::-1]:
        i, j = divmod(int(flat), b.shape[1])
        if out[i] < 0 and not used[j] and sim[i, j] > 0.5:
            out[i], used[j] = j, True
        if np.all(out >= 0):
            break
    return out
