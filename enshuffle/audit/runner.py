"""`enshuffle audit`: a short real run with one recording node, then the attacker, then the table.

The coordinator runs in this process (as `enshuffle train --nodes K` does), K `enshuffle node`
processes on loopback, the first with `--record`. After the run, `attacks.attack` gets only the
recording and public information; `scoring.score` compares its claims with ground truth read
from this process's coordinator objects.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from enshuffle.audit.attacks import Public, attack
from enshuffle.audit.hidden import attack_hidden
from enshuffle.audit.hidden_score import save_hidden_truth, score_hidden
from enshuffle.audit.recording import load_recording
from enshuffle.audit.scoring import TARGETS, Truth, meets_targets, score
from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.cluster import local_node_keys, spawn_local_nodes, stop_local_nodes
from enshuffle.coordinator.run import CoordinatorRun, run_headless
from enshuffle.coordinator.settings import RunConfig, Serving
from enshuffle.coordinator.training import prepare
from enshuffle.dataset import DataError, load_dataset, training_rows
from enshuffle.errors import UsageError
from enshuffle.model import get_preset

# Two epochs: rows come back in a second epoch (linking), and the seed preset needs 2 steps to
# show an update.
DEFAULT_EPOCHS = {"default": 2, "seed": 2}


def _eprint(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def truth_from(run, slots: list[int], dataset, rows: np.ndarray):
    """Ground truth from the coordinator objects of this process (never given to the attacker);
    `rows`: the dataset indices of the images the run trained on."""
    compute = run.compute
    statics: dict[str, dict] = {}
    scales: dict[str, np.ndarray] = {}
    for slot in slots:
        statics.update(compute.audit_truth(slot))
        st = compute.statics[slot] if slot < len(compute.statics) else None  # none under resident
        # the "shuffle" control's static column scales
        pixel_exp = getattr(st, "pixel_exp", None)
        if pixel_exp is not None:
            for which in compute.images:
                scales[f"{which}.{slot}"] = np.asarray(pixel_exp)
        # the secret mixing of each static (Mixing blocks over its columns), for the trajectory
        # attack's claimed M_s
        for which, mix in (getattr(st, "mix", None) or {}).items():
            entry = statics.get(f"{which}.{slot}")
            if entry is not None and getattr(mix, "blocks", None) is not None:
                entry["mix_bounds"] = [tuple(b) for b in mix.bounds]
                entry["mix_blocks"] = [np.asarray(b) for b in mix.blocks]
    return Truth(
        statics=statics,
        train_u8=dataset.train_images[rows].reshape(rows.shape[0], -1),
        test_u8=dataset.test_images.reshape(dataset.test_images.shape[0], -1),
        train_labels=np.asarray(dataset.train_labels[rows]),
        w1_final=np.asarray(run.trainer.params["w1"], dtype=np.float64),
        static_scales=scales,
        train_index=rows,
    )


def _run_rows(dataset, limit: int, preset) -> np.ndarray:
    """The dataset indices of the images the audited run trains on (what `prepare` keeps)."""
    rows = training_rows(dataset.train_labels, limit, preset.subset)
    return np.arange(dataset.train_labels.shape[0]) if rows is None else rows


def hidden_truth_from(run, slots: list[int], dataset, rows: np.ndarray) -> dict:
    """The resident hidden layers' ground truth (audit_hidden_truth), with the batch labels and
    the final weights; empty when the run has none."""
    compute = run.compute
    out: dict = {}
    if not hasattr(compute, "audit_hidden_truth"):
        return out
    for slot in slots:
        for state, entry in compute.audit_hidden_truth(slot).items():
            layer = int(state.split(".")[0][1:])
            entry["labels"] = np.asarray(dataset.train_labels[rows])
            entry["w_final"] = np.asarray(run.trainer.params[f"w{layer}"], dtype=np.float64)
            out[state] = entry
    return out


def run_audit(
    *,
    preset_name: str = "default",
    nodes: int = 3,
    epochs: int | None = None,
    limit: int = 2000,
    data: str | None = None,
    disguise: str | None = None,
    record_dir: str | None = None,
    log=_eprint,
    ica: bool = True,
    layers: tuple[int, ...] | None = None,
    activation: str | None = None,
) -> dict:
    """Run, record, attack, score; returns the figures (see scoring.score) plus the settings."""
    if nodes < 2:
        raise UsageError(f"--nodes {nodes}: an audit needs at least 2 nodes (one records, the bound needs others)")
    try:
        dataset = load_dataset(data, log=log)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    available = dataset.train_images.shape[0]
    if limit > available:
        raise UsageError(f"--limit {limit}: the data has only {available} training images")
    epochs = epochs or DEFAULT_EPOCHS.get(preset_name, 1)
    preset = get_preset(preset_name, epochs=epochs, layers=layers, activation=activation)
    inputs = prepare(dataset, preset, limit)
    rows = _run_rows(dataset, limit, preset)  # the dataset indices of the images it trains on
    with tempfile.TemporaryDirectory(prefix="enshuffle-audit-") as tmp_dir:
        tmp = Path(tmp_dir)
        record = Path(record_dir) if record_dir else tmp / "recording"
        if record.exists() and any(record.iterdir()):
            raise UsageError(f"--record {record} is not empty; give a new or empty directory")
        config = RunConfig(
            offload="matmul",
            limit=limit,
            disguise=disguise,
            shards=nodes,
            serving=Serving(bind="tcp://127.0.0.1:*", min_nodes=nodes),
        )
        # As `train --nodes K` does: the audit's own node processes, and nobody else, are admitted.
        admission = Admission(auto=set(local_node_keys(tmp, nodes, prefix="audit")))
        run = CoordinatorRun(config, preset, inputs, home=tmp / "coordinator", quiet=True, admission=admission)
        run.print_reports = False
        if hasattr(run.compute, "audit_hidden"):
            run.compute.audit_hidden()  # keep the hidden layers' per-step secrets for the scorer
        disguise = run.compute.disguise  # the preset's when none was asked for
        log(
            f"audit: {nodes} node processes on {run.server.endpoint}, preset {preset.name}, {epochs} epoch(s), "
            f"{limit} training images, disguise {disguise}; audit-1 records into {record}"
        )
        # In this process's session: Ctrl-C reaches the audit's node processes too.
        procs = spawn_local_nodes(
            run.server.endpoint, run.identity.fingerprint, nodes, tmp, prefix="audit", record=record, own_session=False
        )
        try:
            # SIGINT/SIGTERM stop the run gracefully and take the node processes along
            status = run_headless(run)
        finally:
            if not run.state.finished:
                run.server.close("shutdown")
            stop_local_nodes(procs, timeout=10.0)
        if status != 0 or not run.trainer.finished:
            raise UsageError(f"the audited run did not finish (status {status}); see the node logs")
        messages = load_recording(record)
        slots = sorted({int(m.header["name"].split(".")[1]) for m in messages if m.command == "STATIC"})
        if not slots:
            raise UsageError("the recording node received no static operand; nothing to audit")
        log(f"audit: {len(messages)} messages recorded (slots {slots}); attacking")
        public = Public(
            train_images=dataset.train_images.reshape(available, -1),
            train_labels=np.asarray(dataset.train_labels),
            test_images=dataset.test_images.reshape(dataset.test_images.shape[0], -1),
            test_labels=np.asarray(dataset.test_labels),
            preset=preset,
            train_rows=rows,  # public: the rule, --limit and the labels
        )
        started = time.perf_counter()
        claims = attack(messages, public, ica=ica)
        try:
            hidden_claims = attack_hidden(messages, np.random.default_rng(0))
        except Exception as exc:  # noqa: BLE001 - an attack that fails is reported, not fatal
            hidden_claims = {}
            log(f"audit: the resident hidden-layer attacks failed: {type(exc).__name__}: {exc}")
        log(f"audit: attacks took {time.perf_counter() - started:.1f} s")
        truth = truth_from(run, slots, dataset, rows)
        hidden_truth = hidden_truth_from(run, slots, dataset, rows)
        if record_dir:
            save_hidden_truth(hidden_truth, Path(str(record) + "-truth.npz"))
    figures = score(claims, truth)
    figures.update(score_hidden(hidden_claims, hidden_truth, np.random.default_rng(1)))
    figures.setdefault("notes", []).extend(n for c in hidden_claims.values() for n in c.notes)
    figures["settings"] = {
        "preset": preset.name,
        "nodes": nodes,
        "epochs": epochs,
        "limit": limit,
        "disguise": disguise,
        "data": dataset.describe(),
        "slots": slots,
        "messages": len(messages),
    }
    figures["targets"] = {k: v[1] for k, v in TARGETS.items()}
    figures["meets_targets"] = meets_targets(figures)
    return plain(figures)


def plain(value):
    """Figures as plain JSON values (numpy scalars and arrays included)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
