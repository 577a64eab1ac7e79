"""`enshuffle train` and `enshuffle coordinator`: set up a run, drive the trainer, report.

Output contract: human lines on stdout (one per epoch, then the exposure table), or with
`--json` one JSON object per epoch and a last one holding the exposure ledger. Progress
and diagnostics go to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from enshuffle.cli import UsageError


def eprint(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_inputs(args, preset):
    from enshuffle.coordinator.training import prepare
    from enshuffle.dataset import DataError, load_dataset

    try:
        dataset = load_dataset(args.data, log=eprint)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    return prepare(dataset, preset, getattr(args, "limit", None))


def preset_from_args(args):
    from dataclasses import replace

    from enshuffle.model import PRESETS, get_preset

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = get_preset(args.preset, epochs=args.epochs, dtype=args.dtype)
    if getattr(args, "seed", None) is not None:
        preset = replace(preset, seed=args.seed)
    return preset


def format_epoch(report, total: int) -> str:
    return (f"epoch {report.epoch:>3}/{total}  cost {report.cost:.6f}  train acc {report.train_accuracy:.4f}"
            f"  test acc {report.test_accuracy:.4f}  {report.seconds:.2f} s")


def save_weights(path: str, params: dict[str, np.ndarray]) -> None:
    try:
        with open(path, "wb") as fh:
            np.savez(fh, **{k: params[k] for k in ("w1", "b1", "w2", "b2")})
    except OSError as exc:
        raise UsageError(f"cannot write weights to {path}: {exc.strerror}; choose a writable path") from None


def check_weights_path(args) -> None:
    """Refuse a --save-weights path that cannot be written before training, not after it."""
    path = getattr(args, "save_weights", None)
    if not path:
        return
    import os
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--save-weights {path} is a directory; give a file name such as {target / 'model.npz'}")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UsageError(f"--save-weights {path}: directory {target.parent} does not exist or is not writable")


def report_epoch(report, args, total: int) -> None:
    if args.json:
        print(json.dumps(report.as_dict()), flush=True)
    else:
        print(format_epoch(report, total), flush=True)


def report_ledger(ledger, args, extra: dict | None = None, notes: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps({"ledger": ledger.shares(), "forms": ledger.forms(), "notes": notes or [],
                          **(extra or {})}), flush=True)
    else:
        print()
        print("Exposure ledger: share of each kind of information each node has received, and in what form")
        print(ledger.table())
        for note in notes or []:
            print(f"- {note}")


def cmd_train(args) -> int:
    if args.tui and (args.nodes == 0 or args.in_process):
        raise UsageError("--tui shows a coordinator and its nodes: use it with --nodes K >= 1 and without --in-process")
    if args.out and (args.nodes == 0 or args.in_process):
        raise UsageError("--out keeps the model chain of a coordinator run: use it with --nodes K >= 1 and "
                         "without --in-process (or --save-weights for the final weights)")
    check_weights_path(args)
    preset = preset_from_args(args)
    inputs = load_inputs(args, preset)
    if args.nodes == 0:
        from enshuffle.model import LocalCompute

        compute, ledger = LocalCompute(inputs.images), None
        eprint(f"train: centralized reference, preset {preset.name}, {preset.dtype}")
    elif args.in_process:
        from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor

        # Partitions and disguises from OS entropy: never from a seed a node could know.
        compute = DistributedCompute(inputs.images, args.nodes, np.random.default_rng(), InProcessExecutor,
                                     **inputs.source())
        ledger = compute.ledger
        eprint(f"train: {args.nodes} in-process nodes, preset {preset.name}, {preset.dtype}, offload {args.offload}")
    else:
        from enshuffle.coordinator.run import run_local_cluster

        return run_local_cluster(args, preset, inputs)
    return drive(args, preset, inputs, compute, ledger)


def drive(args, preset, inputs, compute, ledger) -> int:
    """Run every epoch in this process, reporting each; returns the exit status."""
    from enshuffle.coordinator.training import Trainer

    trainer = Trainer(preset, inputs, compute)
    while not trainer.finished:
        report = trainer.run_step()
        if report is not None:
            report_epoch(report, args, preset.epochs)
    if ledger is not None:
        from enshuffle.coordinator.ledger import privacy_notes

        report_ledger(ledger, args, notes=privacy_notes(preset, False))
    if getattr(args, "save_weights", None):
        save_weights(args.save_weights, trainer.params)
        eprint(f"train: weights written to {args.save_weights}")
    return 0


def cmd_coordinator(args) -> int:
    """`enshuffle coordinator`: listen for volunteers' nodes and train."""
    from enshuffle.coordinator.run import CoordinatorRun, default_run_dir, load_run_settings

    run_dir = args.out
    shards = args.min_nodes
    if args.resume:
        if not run_dir:
            raise UsageError("--resume needs --out RUN_DIR naming the run to continue")
        settings = load_run_settings(run_dir)
        requested = args.epochs
        if requested is not None and requested < settings["epochs"]:
            raise UsageError(f"--epochs {requested} is fewer than the {settings['epochs']} epochs {run_dir} was "
                             f"started with; a resumed run can only be extended (give more epochs, or none)")
        args.preset, args.epochs, args.dtype = settings["preset"], settings["epochs"], settings["dtype"]
        if requested is not None and requested > settings["epochs"]:
            args.epochs = requested
            eprint(f"coordinator: extending {run_dir} from {settings['epochs']} to {requested} epochs (a cosine "
                   f"learning-rate decay is recomputed over {requested} epochs from here)")
        args.offload, args.seed, args.limit = settings["offload"], settings["seed"], settings.get("limit")
        shards = int(settings["shards"])
        eprint(f"coordinator: resuming {run_dir} with its settings: preset {args.preset}, {args.epochs} epochs, "
               f"{args.dtype}, offload {args.offload}, {shards} shards (other training options are ignored; --epochs N extends it)")
    from enshuffle.coordinator.admission import Admission
    from enshuffle.protocol.keys import enshuffle_home

    if args.open and args.allow:
        raise UsageError("--open admits every key, --allow FILE only the listed ones: choose one")
    admission = Admission(allow_file=args.allow, open_=args.open, home=enshuffle_home())
    preset = preset_from_args(args)
    inputs = load_inputs(args, preset)
    try:
        run = CoordinatorRun(args, preset, inputs, bind=args.bind, shards=shards, min_nodes=args.min_nodes,
                             run_dir=run_dir or default_run_dir(), resume=args.resume,
                             checkpoint_every=args.checkpoint_every, admission=admission)
    except OSError as exc:
        raise UsageError(str(exc)) from None
    endpoint = run.server.endpoint
    host = endpoint[len("tcp://"):].rpartition(":")[0]
    connect = endpoint if host not in ("0.0.0.0", "*", "[::]") else endpoint.replace(host, "THIS_HOST", 1)
    eprint(f"coordinator: listening on {endpoint}, run {run.server.run_id}, model chain in {run.run_dir}")
    eprint(f"coordinator: fingerprint {run.identity.fingerprint}")
    if args.open:
        eprint("coordinator: WARNING: --open: ANY node that reaches this port is admitted and receives "
               "training data; use --allow FILE or invite codes (enshuffle invite) to choose who joins")
    eprint(f"coordinator: {admission.describe()}")
    eprint("coordinator: on each volunteer machine run:")
    eprint(f"    enshuffle node --connect {connect} --coordinator-key {run.identity.fingerprint}"
           + ("" if args.open else "   (plus --invite CODE from `enshuffle invite`, unless its key is in --allow)"))
    if connect != endpoint:
        eprint("  (replace THIS_HOST with this machine's address as the volunteers reach it)")

    from enshuffle.coordinator.run import run_headless, run_with_tui

    return run_with_tui(run) if args.tui else run_headless(run)
