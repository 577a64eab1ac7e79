"""The scorer: the attacker's claims against ground truth from the coordinator's objects.

Ground truth (`Truth`) comes from `DistributedCompute.audit_truth(slot)` (each static's pixel
block in column order, row order, the dominant pixel of each column, noise share or not), the
trainer's final w1, and the raw images and labels the run trained on. The attacker
(`enshuffle.audit.attacks`) never sees any of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from enshuffle.audit.attacks import Claims

# the privacy targets for what one node recovers (default preset, 3 nodes)
TARGETS = {
    "labels_named": ("<=", 0.15),
    "reid": ("<=", 0.01),
    "exact_pixels": ("<=", 0.0),
    "positions": ("<=", 0.05),
    "w1_outside_corr": ("<=", 0.1),
}


@dataclass
class Truth:
    statics: dict[str, dict]  # static name -> audit_truth entry
    train_u8: np.ndarray  # (n, 784) raw images the run trained on (original row order)
    test_u8: np.ndarray
    train_labels: np.ndarray
    w1_final: np.ndarray  # (784, 128)
    static_scales: dict[str, np.ndarray]  # static name -> true static column exponents ("shuffle")
    train_index: np.ndarray | None = None  # each training row's public image index (None: the row's own)

    def public_index(self, rows: np.ndarray) -> np.ndarray:
        """The public image index of training rows `rows` (what a re-identification claims)."""
        return rows if self.train_index is None else self.train_index[rows]


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same items (1 = same partition, ~0 = chance)."""
    a = np.unique(a, return_inverse=True)[1]
    b = np.unique(b, return_inverse=True)[1]
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.float64)
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    n = a.shape[0]
    total = n * (n - 1) / 2
    s_ij, s_a, s_b = pairs(table), pairs(table.sum(axis=1)), pairs(table.sum(axis=0))
    expected = s_a * s_b / total if total else 0.0
    top = (s_a + s_b) / 2
    return float((s_ij - expected) / (top - expected)) if top != expected else 1.0


def purity(truth: np.ndarray, clusters: np.ndarray) -> float:
    table = np.zeros((clusters.max() + 1, truth.max() + 1))
    np.add.at(table, (clusters, truth), 1)
    return float(table.max(axis=1).sum() / truth.shape[0])


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else 0.0


def _matched_columns_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |correlation| of a's columns with b's after a greedy one-to-one matching."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    a = a / np.maximum(np.linalg.norm(a, axis=0), 1e-300)
    b = b / np.maximum(np.linalg.norm(b, axis=0), 1e-300)
    sim = np.abs(a.T @ b)
    taken_a = np.zeros(sim.shape[0], dtype=bool)
    taken_b = np.zeros(sim.shape[1], dtype=bool)
    picked = []
    for flat in np.argsort(sim, axis=None)[::-1]:
        i, j = divmod(int(flat), sim.shape[1])
        if not taken_a[i] and not taken_b[j]:
            taken_a[i] = taken_b[j] = True
            picked.append(sim[i, j])
            if len(picked) == min(sim.shape):
                break
    return float(np.mean(picked))


def score(claims: Claims, truth: Truth) -> dict:
    """Figures (shares in 0..1, correlations) of what the claims got right."""
    exact_ok = exact_all = 0
    pos_w_ok = pos_s_ok = pos_all = 0
    scale_ok = scale_all = 0
    reid_e_ok = reid_n_ok = reid_all = reid_n_all = 0
    ica_best: list[float] = []
    ica_chance: list[float] = []
    per_static = {}
    for name, c in claims.statics.items():
        if c.which != "train":
            continue
        t = truth.statics.get(name)
        if t is None:
            continue
        images = truth.train_u8 if c.which == "train" else truth.test_u8
        order = np.asarray(t["row_order"])
        block = images[order][:, np.asarray(t["pixels"])]  # true raw values in static order (unmixed)
        col_pixel = np.asarray(t["column_pixel"])
        mixed = not np.array_equal(col_pixel, np.asarray(t["pixels"]))
        # exact pixel values: a claim counts when it equals the raw pixel of that row and column
        # (for a mixed block, the column's dominant pixel)
        truth_vals = images[order][:, col_pixel] if mixed else block
        e_ok = int(np.count_nonzero(c.values == truth_vals))
        exact_ok += e_ok
        exact_all += truth_vals.size
        pw = int(np.count_nonzero(c.positions_weights == col_pixel))
        ps = int(np.count_nonzero(c.positions_stats == col_pixel))
        pos_w_ok += pw
        pos_s_ok += ps
        pos_all += col_pixel.size
        if name in truth.static_scales:
            scale_ok += int(np.count_nonzero(c.scale_exp == truth.static_scales[name]))
            scale_all += col_pixel.size
        public = truth.public_index(order)  # re-identifications claim public image indices
        re = int(np.count_nonzero(c.reid_exact == public))
        tried = c.reid_nn_rows if c.reid_nn_rows is not None else np.arange(order.size)
        rn = int(np.count_nonzero(c.reid_nn[tried] == public[tried]))
        reid_e_ok += re
        reid_n_ok += rn
        reid_all += order.size
        reid_n_all += tried.size
        if c.ica_sources is not None:
            src = c.ica_sources - c.ica_sources.mean(axis=0)
            px = block[c.ica_rows if c.ica_rows is not None else slice(None)].astype(np.float64)
            px = px - px.mean(axis=0)
            live = np.linalg.norm(px, axis=0) > 0
            if live.any():
                sn = src / np.maximum(np.linalg.norm(src, axis=0), 1e-300)
                pn = px[:, live] / np.linalg.norm(px[:, live], axis=0)
                ica_best.extend(np.abs(pn.T @ sn).max(axis=1).tolist())
                # chance level: as many random mixtures of the true block's columns
                rnd = px @ np.random.default_rng(1).standard_normal((px.shape[1], src.shape[1]))
                rnd /= np.maximum(np.linalg.norm(rnd, axis=0), 1e-300)
                ica_chance.extend(np.abs(pn.T @ rnd).max(axis=1).tolist())
        per_static[name] = {
            "exact_pixels": e_ok / truth_vals.size,
            "positions_weights": pw / col_pixel.size,
            "positions_statistics": ps / col_pixel.size,
            "reid_exact": re / order.size,
            "reid_nn": rn / max(1, tried.size),
            "mixed": mixed,
        }

    # labels: per train static row, claimed label vs the true label of its original row
    lab_ok = lab_all = 0
    for name, claim in claims.labels.items():
        t = truth.statics.get(name)
        if t is None:
            continue
        true = truth.train_labels[np.asarray(t["row_order"])]
        lab_ok += int(np.count_nonzero(claim == true))
        lab_all += true.size
    global_ari = None
    for name, ids in claims.groups.items():
        t = truth.statics.get(name)
        # only a grouping of (nearly) all rows counts: one epoch links nothing across batches
        if t is None or (ids >= 0).mean() < 0.9 or np.unique(ids[ids >= 0]).size < 2:
            continue
        true = truth.train_labels[np.asarray(t["row_order"])]
        global_ari = adjusted_rand(true[ids >= 0], ids[ids >= 0])
    aris, purities = [], []
    for name, rows, ids in claims.grouping:
        t = truth.statics.get(name)
        if t is None:
            continue
        true = truth.train_labels[np.asarray(t["row_order"])[rows]]
        aris.append(adjusted_rand(true, ids))
        purities.append(purity(true, ids))

    # rows linked across steps: occurrences whose true sample also occurs in another step,
    # linked by the attacker (same static row) to that occurrence
    linked_ok = linkable = 0
    seen: dict[tuple, set] = {}
    for name, step, rows in claims.occurrences:
        t = truth.statics.get(name)
        if t is None:
            continue
        orig = np.asarray(t["row_order"])[rows]
        for r_claim, r_true in zip(rows.tolist(), orig.tolist()):
            seen.setdefault(("true", r_true), set()).add(step)
            seen.setdefault(("claim", name, r_claim), set()).add((step, r_true))
    for key, steps in seen.items():
        if key[0] != "claim":
            continue
        true_ids = {r for _, r in steps}
        for step, r_true in steps:
            if len(seen[("true", r_true)]) > 1:
                linkable += 1
                if len(true_ids) == 1 and len({s for s, _ in steps}) > 1:
                    linked_ok += 1

    # w1 rows inside and outside the node's blocks
    inside = np.zeros(truth.w1_final.shape[0], dtype=bool)
    for name, t in truth.statics.items():
        inside[np.asarray(t["pixels"])] = True
    w1_out = w1_in = None
    if claims.w1_estimate is not None:
        if (~inside).any():
            w1_out = _corr(claims.w1_estimate[~inside], truth.w1_final[~inside])
        if inside.any():
            w1_in = _corr(claims.w1_estimate[inside], truth.w1_final[inside])

    # The node's own block of the final w1, up to the order of hidden units (a network is the
    # same function with its hidden units renumbered): each claimed column matched greedily to
    # the true unit it correlates with best; the figure is the mean |correlation| of the pairs.
    w1_block = w1_block_chance = None
    if claims.w1_block is not None:
        pos, block = claims.w1_block
        truth_block = truth.w1_final[np.clip(pos, 0, truth.w1_final.shape[0] - 1)]
        w1_block = _matched_columns_corr(block, truth_block)
        w1_block_chance = _matched_columns_corr(np.random.default_rng(2).standard_normal(block.shape), truth_block)

    def share(ok, total):
        return ok / total if total else None

    figures = {
        "exact_pixels": share(exact_ok, exact_all),
        "static_scales": share(scale_ok, scale_all),
        "positions_weights": share(pos_w_ok, pos_all),
        "positions_statistics": share(pos_s_ok, pos_all),
        "reid_exact": share(reid_e_ok, reid_all),
        "reid_nn": share(reid_n_ok, reid_n_all),
        "labels_named": share(lab_ok, lab_all),
        "labels_grouping_ari": float(np.mean(aris)) if aris else None,
        "labels_grouping_global_ari": global_ari,
        "labels_cluster_purity": float(np.mean(purities)) if purities else None,
        "rows_linked": share(linked_ok, linkable),
        "w1_outside_corr": w1_out,
        "w1_inside_corr": w1_in,
        "w1_block_corr": w1_block,
        "w1_block_chance": w1_block_chance,
        "ica_best_abs_corr_mean": float(np.mean(ica_best)) if ica_best else None,
        "ica_chance_abs_corr_mean": float(np.mean(ica_chance)) if ica_chance else None,
        "ica_pixels_recovered": float(np.mean(np.asarray(ica_best) >= 0.9)) if ica_best else None,
    }
    figures["positions"] = max(
        v for v in (figures["positions_weights"], figures["positions_statistics"], 0.0) if v is not None
    )
    figures["reid"] = max(v for v in (figures["reid_exact"], figures["reid_nn"], 0.0) if v is not None)
    # what the attacks on single messages got (before the trajectory attack's figures join in)
    figures["exact_pixels_columns"] = figures["exact_pixels"]
    figures["labels_named_dz1"] = figures["labels_named"]
    figures.update(score_trajectory(getattr(claims, "trajectory", {}) or {}, truth))
    # the headline figures: the best any attack got
    headline: tuple[tuple[str, str], ...] = (
        ("positions", "traj_positions"),
        ("reid", "traj_reid"),
        ("exact_pixels", "traj_exact_pixels"),
        ("labels_named", "traj_labels_named"),
    )
    for head, extra in headline:
        if figures.get(extra) is not None:
            figures[head] = max(v for v in (figures.get(head), figures[extra]) if v is not None)
    figures["per_static"] = per_static
    figures["w1_source"] = claims.w1_source
    figures["notes"] = claims.notes
    return figures


def _mixing_error(
    claimed: list[np.ndarray], bounds: list[tuple], blocks: list[np.ndarray]
) -> tuple[float | None, float | None]:
    """Relative error of the claimed mixing after the best row order and scale per block (rows
    of M are the pixels, in an order no node can know; a missing row counts as all wrong), and
    the same for a random claim of the same shape (chance)."""
    err = chance = total = 0.0
    rng = np.random.default_rng(3)
    for (lo, hi), m, c in zip(bounds, blocks, claimed):
        total += float((m * m).sum())
        for guess, acc in ((c, "err"), (rng.standard_normal(c.shape), "chance")):
            aligned = np.zeros_like(m)
            if guess.shape[0]:
                gn = guess / np.maximum(np.linalg.norm(guess, axis=1, keepdims=True), 1e-300)
                mn = m / np.linalg.norm(m, axis=1, keepdims=True)
                match = _greedy_pairs(np.abs(gn @ mn.T))
                for i, j in match:
                    scale = (guess[i] @ m[j]) / max(guess[i] @ guess[i], 1e-300)
                    aligned[j] = scale * guess[i]
            e = float(((aligned - m) ** 2).sum())
            if acc == "err":
                err += e
            else:
                chance += e
    if total == 0:
        return None, None
    return float(np.sqrt(err / total)), float(np.sqrt(chance / total))


def _greedy_pairs(sim: np.ndarray) -> list[tuple[int, int]]:
    taken_a = np.zeros(sim.shape[0], dtype=bool)
    taken_b = np.zeros(sim.shape[1], dtype=bool)
    out = []
    for flat in np.argsort(sim, axis=None)[::-1]:
        i, j = divmod(int(flat), sim.shape[1])
        if not taken_a[i] and not taken_b[j]:
            taken_a[i] = taken_b[j] = True
            out.append((i, j))
            if len(out) == min(sim.shape):
                break
    return out


def _w1_block_exact(pos: np.ndarray, block: np.ndarray, w1: np.ndarray) -> tuple[float | None, float | None]:
    """The claimed w1 block (rows at claimed pixels, columns in some unit order) against the true
    final w1: (mean |corr| of greedily matched columns, share of entries within 1e-4 relative of
    the true entry, columns matched as for the correlation)."""
    ok = (pos >= 0) & (pos < w1.shape[0])
    if not ok.any():
        return None, None
    a, t = block[ok], w1[pos[ok]]
    an = (a - a.mean(axis=0)) / np.maximum(np.linalg.norm(a - a.mean(axis=0), axis=0), 1e-300)
    tn = (t - t.mean(axis=0)) / np.maximum(np.linalg.norm(t - t.mean(axis=0), axis=0), 1e-300)
    pairs = _greedy_pairs(np.abs(an.T @ tn))
    corr = float(np.mean([abs(an[:, i] @ tn[:, j]) for i, j in pairs]))
    close = sum(int(np.count_nonzero(np.abs(a[:, i] - t[:, j]) <= 1e-4 * np.abs(t[:, j]))) for i, j in pairs)
    return corr, close / block.size


def score_trajectory(trajectory: dict, truth: Truth) -> dict:
    """Figures of the weight-trajectory attack (enshuffle.audit.trajectory), "traj_*"."""
    out: dict[str, object] = {
        k: None
        for k in (
            "traj_sources_separated",
            "traj_mixing_error",
            "traj_mixing_chance",
            "traj_mixing_error_separation",
            "traj_positions",
            "traj_reid",
            "traj_exact_pixels",
            "traj_labels_named",
            "traj_w1_block_corr",
            "traj_w1_block_exact",
            "traj_w1_outside_corr",
        )
    }
    out["traj_source"] = None
    found = total = 0
    errs: list[float] = []
    chances: list[float] = []
    weights: list[float] = []
    seps: list[float] = []
    pos_ok = pos_all = reid_ok = reid_all = ex_ok = ex_all = lab_ok = lab_all = 0
    corrs: list[float] = []
    exacts: list[float] = []
    for name, c in trajectory.items():
        t = truth.statics.get(name)
        if t is None:
            continue
        out["traj_source"] = c.source
        found += c.sources_found
        total += c.sources_total or len(t["pixels"])
        if c.mixing and t.get("mix_blocks") is not None:
            e, ch = _mixing_error(c.mixing, t["mix_bounds"], t["mix_blocks"])
            if e is not None and ch is not None:
                sep = _mixing_error(c.mixing_separation or c.mixing, t["mix_bounds"], t["mix_blocks"])[0]
                errs.append(e)
                chances.append(ch)
                weights.append(len(t["pixels"]))
                seps.append(sep if sep is not None else e)
        order = np.asarray(t["row_order"])
        col_pixel = np.asarray(t["column_pixel"])
        if c.column_pixel is not None:
            pos_ok += int(np.count_nonzero(c.column_pixel == col_pixel))
            pos_all += col_pixel.size
        if c.reid is not None:
            reid_ok += int(np.count_nonzero(c.reid == order))
            reid_all += order.size
        if c.values is not None:
            truth_vals = truth.train_u8[order][:, col_pixel]
            ex_ok += int(np.count_nonzero(c.values == truth_vals))
            ex_all += truth_vals.size
        if c.labels is not None:
            lab_ok += int(np.count_nonzero(c.labels == truth.train_labels[order]))
            lab_all += order.size
        if c.w1_block is not None:
            corr, exact = _w1_block_exact(np.asarray(c.w1_block[0]), np.asarray(c.w1_block[1]), truth.w1_final)
            if corr is not None and exact is not None:
                corrs.append(corr)
                exacts.append(exact)
    if total:
        out["traj_sources_separated"] = found / total
    if errs:
        out["traj_mixing_error"] = float(np.average(errs, weights=weights))
        out["traj_mixing_chance"] = float(np.average(chances, weights=weights))
        out["traj_mixing_error_separation"] = float(np.average(seps, weights=weights))
    for key, ok, all_ in (
        ("traj_positions", pos_ok, pos_all),
        ("traj_reid", reid_ok, reid_all),
        ("traj_exact_pixels", ex_ok, ex_all),
        ("traj_labels_named", lab_ok, lab_all),
    ):
        out[key] = ok / all_ if all_ else None
    if corrs:
        out["traj_w1_block_corr"] = float(np.mean(corrs))
        out["traj_w1_block_exact"] = float(np.mean(exacts))
    return out


def meets_targets(figures: dict) -> dict[str, bool]:
    out = {}
    for key, (_, limit) in TARGETS.items():
        value = figures.get(key)
        out[key] = value is None or value <= limit + 1e-12
    return out
