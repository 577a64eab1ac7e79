"""Scoring the resident hidden-layer attacks (`enshuffle.audit.hidden`) against ground truth from
the coordinator (`DistributedCompute.audit_hidden_truth`: each slot's units Q_s, mixing blocks
M_s, and per step the row mixing L and the batch's rows; the trainer's final weights).

- rows unmixed: a claimed row r of group g is one sample when |r . L_g[:, j]| > 0.999 for some j
  (then r D_g is that sample's dz row and r A_g its a[:, Q_s] M_s row, up to sign);
- unit unmixing: a claimed column c of a block's M^-1 is one unit when M_g c is one unit's axis
  (max |entry| / norm > 0.99); the relative error of M_g rebuilt from the claimed columns (after
  the best order and scale) when all of a block's are found; chance: the same for random claims;
- w block: mean |corr| of the claimed rows of w[Q_s] with the true rows after a greedy one-to-one
  matching; chance: the same for the node's V_s rows as they are (no unmixing);
- class grouping: adjusted Rand index of the claimed clusters of single-sample rows against
  their true labels; the baseline on the rows as sent.
"""

from __future__ import annotations

import numpy as np

from enshuffle.audit.hidden import HiddenClaims
from enshuffle.audit.scoring import _greedy_pairs, adjusted_rand


def save_hidden_truth(truth: dict[str, dict], path) -> None:
    """The hidden ground truth as one npz (kept next to a kept recording, for scoring again)."""
    arrays: dict[str, np.ndarray] = {}
    for state, t in truth.items():
        arrays[f"{state}/units"] = t["units"]
        arrays[f"{state}/labels"] = t["labels"]
        arrays[f"{state}/w_final"] = t["w_final"]
        arrays[f"{state}/mix_bounds"] = np.array(t["mix_bounds"])
        for i, m in enumerate(t["mix_blocks"]):
            arrays[f"{state}/mix/{i}"] = m
        for v, (stack, tail, rows) in t["steps"].items():
            arrays[f"{state}/step/{v}/stack"] = stack
            arrays[f"{state}/step/{v}/tail"] = tail
            if rows is not None:
                arrays[f"{state}/step/{v}/rows"] = rows
    np.savez(path, **arrays)  # type: ignore[arg-type]


def load_hidden_truth(path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with np.load(path, allow_pickle=False) as npz:
        for key in npz.files:
            state, rest = key.split("/", 1)
            t = out.setdefault(state, {"mix_blocks": {}, "steps": {}})
            parts = rest.split("/")
            if parts[0] == "mix":
                t["mix_blocks"][int(parts[1])] = npz[key]
            elif parts[0] == "step":
                t["steps"].setdefault(int(parts[1]), {})[parts[2]] = npz[key]
            else:
                t[parts[0]] = npz[key]
    for t in out.values():
        t["mix_blocks"] = [t["mix_blocks"][i] for i in sorted(t["mix_blocks"])]
        t["mix_bounds"] = [tuple(b) for b in t["mix_bounds"]]
        t["steps"] = {v: (s["stack"], s["tail"], s.get("rows")) for v, s in t["steps"].items()}
    return out


def _l_block(steps: dict, version: int, lo: int) -> np.ndarray | None:
    entry = steps.get(version)
    if entry is None:
        return None
    stack, tail = entry[0], entry[1]
    g = stack.shape[1] if stack.size else 0
    if g and lo // g < stack.shape[0]:
        return stack[lo // g]
    return tail


def _rows_corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-300)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-300)
    sim = np.abs(a @ b.T)
    pairs = _greedy_pairs(sim)
    return float(np.mean([sim[i, j] for i, j in pairs])) if pairs else 0.0


def _mixing_error(cols: np.ndarray, m: np.ndarray) -> float | None:
    """||M_claimed - M|| / ||M|| with M_claimed = P Lambda C^-1 at the best order P and scale."""
    if cols.shape[1] != m.shape[0]:
        return None
    prod = m @ cols  # = P Lambda when right
    unit = np.argmax(np.abs(prod), axis=0)
    if len(set(unit.tolist())) != m.shape[0]:
        return None
    lam = prod[unit, np.arange(m.shape[0])]
    claimed = np.zeros_like(m)
    inv = np.linalg.inv(cols)
    claimed[unit] = lam[:, None] * inv
    return float(np.linalg.norm(claimed - m) / np.linalg.norm(m))


def score_hidden(claims: dict[str, HiddenClaims], truth: dict[str, dict], rng: np.random.Generator) -> dict:
    """Figures for each attacked state (keyed hidden_*), the first state's at the top level."""
    out: dict = {}
    per_state = {}
    for state, c in claims.items():
        t = truth.get(state)
        if t is None:
            continue
        steps, labels = t["steps"], t.get("labels")
        single = total = 0
        true_row_label: dict[tuple[int, int, int], int] = {}
        for version, lo, rows, _ok in c.row_unmix:
            lb = _l_block(steps, version, lo)
            if lb is None:
                continue
            sim = np.abs(rows @ lb)
            total += rows.shape[0]
            hit = sim.max(axis=1) > 0.999
            single += int(np.count_nonzero(hit))
            batch_rows = steps[version][2]
            for j in np.flatnonzero(hit):
                if batch_rows is not None and labels is not None:
                    true_row_label[(version, lo, int(j))] = int(labels[batch_rows[lo + int(np.argmax(sim[j]))]])
        f: dict = {"rows_single_sample": single / total if total else None, "rows_tried": total}
        # units
        purity, chance, errors, found = [], [], [], 0
        for (lo, hi, cols), m in zip(c.unit_unmix, t["mix_blocks"]):
            if cols.shape[1]:
                v = m @ cols
                pur = np.abs(v).max(axis=0) / np.linalg.norm(v, axis=0)
                purity.extend(pur.tolist())
                found += int(np.count_nonzero(pur > 0.99))
                r = m @ rng.standard_normal(cols.shape)
                chance.extend((np.abs(r).max(axis=0) / np.linalg.norm(r, axis=0)).tolist())
            err = _mixing_error(cols, m)
            if err is not None:
                errors.append(err)
        f["units_unmixed"] = found / c.units if c.units else None
        f["unit_purity_mean"] = float(np.mean(purity)) if purity else None
        f["unit_purity_chance"] = float(np.mean(chance)) if chance else None
        f["mixing_error"] = float(np.mean(errors)) if errors else None
        f["mixing_blocks_solved"] = len(errors) / max(len(c.unit_unmix), 1)
        w_true = t.get("w_final")
        if w_true is not None and c.w_block is not None:
            wq = w_true[t["units"]]
            f["w_block_corr"] = _rows_corr(c.w_block, wq)
            f["w_block_chance"] = _rows_corr(c.v_final, wq) if c.v_final is not None else None
        # class grouping
        got = [(true_row_label[(v, lo, j)], cid) for v, lo, j, cid in c.grouping if (v, lo, j) in true_row_label]
        if len(got) >= 2:
            arr = np.array(got)
            f["labels_grouping_ari"] = adjusted_rand(arr[:, 0], arr[:, 1])
            f["labels_grouped_rows"] = len(got)
        if labels is not None and c.grouping_sent:
            sent = [
                (int(labels[steps[v][2][r]]), cid)
                for v, r, cid in c.grouping_sent
                if v in steps and steps[v][2] is not None
            ]
            if len(sent) >= 2:
                arr = np.array(sent)
                f["labels_grouping_sent_ari"] = adjusted_rand(arr[:, 0], arr[:, 1])
        per_state[state] = f
    if per_state:
        first = per_state[sorted(per_state)[0]]
        out.update({f"hidden_{k}": v for k, v in first.items()})
        out["hidden_states"] = per_state
    return out
