"""`enshuffle audit`: run the audit (`audit.runner.run_audit`) and print its table or JSON."""

from __future__ import annotations

import json

from enshuffle.audit.runner import plain, run_audit
from enshuffle.commands.options import network_layers


ROWS = [
    ("labels_named", "training labels named correctly", "labels_named"),
    ("labels_grouping_ari", "  grouping by class only (adjusted Rand, dz1 clusters)", None),
    ("labels_cluster_purity", "  cluster purity", None),
    ("labels_grouping_global_ari", "  one grouping of all rows, linked across epochs (ARI)", None),
    ("reid", "rows re-identified against the public data", "reid"),
    ("reid_exact", "  by exact match of visible pixels", None),
    ("reid_nn", "  by nearest neighbour on statistics", None),
    ("exact_pixels", "its pixel values, exactly", "exact_pixels"),
    ("static_scales", "static power-of-two scales undone", None),
    ("positions", "its pixel positions", "positions"),
    ("positions_weights", "  from public initial weights (mantissas)", None),
    ("positions_statistics", "  from public image statistics", None),
    ("rows_linked", "rows linked across steps", None),
    ("w1_outside_corr", "w1 rows outside its block (correlation)", "w1_outside_corr"),
    ("w1_inside_corr", "w1 rows inside its block (correlation)", None),
    ("w1_block_corr", "  its last w1 block, up to hidden-unit order (mean |corr|)", None),
    ("w1_block_chance", "  same for a random block (chance)", None),
    ("ica_pixels_recovered", "ICA: pixel columns recovered (|corr| >= 0.9)", None),
    ("ica_best_abs_corr_mean", "ICA: mean best |corr| with a pixel column", None),
    ("ica_chance_abs_corr_mean", "  same for random mixtures of the true block (chance)", None),
    ("traj_sources_separated", "weight trajectory: sources separated (first Adam step)", None),
    ("traj_mixing_error_separation", "  its mixing M_s from the separation alone, rel. error", None),
    ("traj_mixing_error", "  its mixing M_s, relative error (rows aligned)", None),
    ("traj_mixing_chance", "  same for a random claim (chance)", None),
    ("traj_positions", "  pixel positions (unmixed, cumulants, noise off)", None),
    ("traj_reid", "  rows re-identified against the public data", None),
    ("traj_exact_pixels", "  pixel values, exactly", None),
    ("traj_labels_named", "  training labels named", None),
    ("traj_w1_block_corr", "  its w1 block in the clear, up to unit order (|corr|)", None),
    ("traj_w1_block_exact", "  its w1 block: entries within 1e-4 relative", None),
    ("hidden_rows_single_sample", "resident hidden layer: rows unmixed to one sample (dz zeros)", None),
    ("hidden_units_unmixed", "  its units unmixed (M_s columns, ReLU zeros)", None),
    ("hidden_unit_purity_mean", "  unit purity of the claimed M_s^-1 columns (mean)", None),
    ("hidden_unit_purity_chance", "  same for random columns (chance)", None),
    ("hidden_mixing_error", "  its mixing M_s, relative error (order, scale matched)", None),
    ("hidden_w_block_corr", "  its w block in the clear, rows matched (mean |corr|)", None),
    ("hidden_w_block_chance", "  same for its V_s rows as held (chance)", None),
    ("hidden_labels_grouping_ari", "  single-sample dz rows grouped by class (ARI)", None),
    ("hidden_labels_grouping_sent_ari", "  dz rows as sent grouped by class (ARI)", None),
]


def format_table(figures: dict) -> str:
    s = figures["settings"]
    lines = [
        f"What one curious node recovered: preset {s['preset']}, {s['nodes']} nodes, {s['epochs']} epoch(s), "
        f"{s['limit']} images, disguise {s['disguise']}",
        f"{'what':<58}{'recovered':>10}  {'target':>8}  ok",
    ]
    for key, text, target_key in ROWS:
        value = figures.get(key)
        # correlations, indices and errors, not shares
        ratio = "corr" in key or "ari" in key or "chance" in key or "error" in key or "purity" in key
        shown = (
            "n/a"
            if value is None
            else (f"{value:.1e}" if "error" in key else f"{value:.3f}" if ratio else f"{value:.1%}")
        )
        target = ""
        ok = ""
        if target_key:
            limit = figures["targets"][target_key]
            target = f"<= {limit:.2f}" if "corr" in target_key else f"<= {limit:.0%}"
            ok = "yes" if figures["meets_targets"][target_key] else "NO"
        lines.append(f"{text:<58}{shown:>10}  {target:>8}  {ok}")
    if figures.get("w1_source"):
        lines.append(f"(w1 estimate: {figures['w1_source']})")
    for note in figures.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def cmd_audit(args) -> int:
    figures = run_audit(
        preset_name=args.preset,
        nodes=args.nodes,
        epochs=args.epochs,
        limit=args.limit,
        data=args.data,
        disguise=args.disguise,
        record_dir=args.record,
        layers=network_layers(args),
        activation=args.activation,
    )
    if args.json:
        print(json.dumps(plain(figures)), flush=True)
    else:
        print(format_table(figures), flush=True)
    return 0
