"""`enshuffle train` and `enshuffle coordinator`: set up a run from the command line, drive it.

The command layer: argparse's Namespace is read here and nowhere below; the run gets a
`RunSettings`. What is printed, and the output contract, is in `report`.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import zmq

from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor, default_disguise
from enshuffle.coordinator.ledger import privacy_notes
from enshuffle.coordinator.offload import check_offload, default_cost_model
from enshuffle.coordinator.report import eprint, listen_text, report_epoch, report_ledger, save_weights
from enshuffle.coordinator.run import (CoordinatorRun, default_run_dir, load_run_settings, run_headless,
                                       run_local_cluster, run_with_tui)
from enshuffle.coordinator.settings import RunSettings
from enshuffle.coordinator.training import Trainer, prepare
from enshuffle.dataset import DataError, load_bundled_subset, load_dataset
from enshuffle.errors import UsageError
from enshuffle.model import CLASSES, INPUTS, NOTEBOOK_LAYERS, PRESETS, LocalCompute, get_preset
from enshuffle.protocol.keys import enshuffle_home


def load_inputs(data: str | None, preset, limit: int | None = None):
    """The training and test sets from `data` (--data: a directory, "bundled", or None to search)."""
    try:
        if data == "bundled":  # the explicit choice of the subset shipped in the package
            dataset = load_bundled_subset()
            eprint(f"data: {dataset.describe()}")
        else:
            dataset = load_dataset(data, log=eprint)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    return prepare(dataset, preset, limit)


def network_layers(args) -> tuple[int, ...] | None:
    """--layers, or --hidden with the pixels and classes around it; None: the preset's network."""
    if getattr(args, "layers", None):
        return tuple(args.layers)
    if getattr(args, "hidden", None):
        return (INPUTS, *args.hidden, CLASSES)
    return None


def preset_from_args(args):
    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    try:
        preset = get_preset(args.preset, epochs=args.epochs, dtype=args.dtype, layers=network_layers(args),
                            activation=getattr(args, "activation", None))
    except ValueError as exc:
        raise UsageError(f"--layers: {exc}") from None
    if getattr(args, "seed", None) is not None:
        preset = replace(preset, seed=args.seed)
    return preset


def check_weights_path(args) -> None:
    """Refuse a --save-weights path that cannot be written before training, not after it."""
    path = getattr(args, "save_weights", None)
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--save-weights {path} is a directory; give a file name such as {target / 'model.npz'}")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise UsageError(f"--save-weights {path}: directory {target.parent} does not exist or is not writable")
    # Permission bits are not the whole story (/proc, read-only mounts, quotas): try it.
    try:
        if target.exists():
            with open(target, "ab"):
                pass
        else:
            with open(target, "xb"):
                pass
            target.unlink()
    except OSError as exc:
        raise UsageError(f"--save-weights {path}: cannot write there ({exc.strerror}); "
                         "choose a writable path") from None


def check_run_dir_writable(run_dir: str) -> None:
    """Refuse a --out that cannot be created or written before the data loads, not after."""
    target = Path(run_dir)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a directory for the run")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {run_dir}: cannot create or write it ({probe} is not a writable directory); "
                         f"choose a writable --out")


def run_settings(args):
    """The run's typed settings from the command line (the Namespace goes no further)."""
    try:
        check_offload(args.offload)  # a resumed run's record may name anything
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return RunSettings(offload=args.offload, limit=getattr(args, "limit", None),
                       disguise=getattr(args, "disguise", None),
                       max_exposure=getattr(args, "max_exposure", None),
                       replicate=bool(getattr(args, "replicate", False)),
                       quarantine_after=getattr(args, "quarantine_after", None),
                       save_weights=getattr(args, "save_weights", None), json=bool(args.json))


def cmd_train(args) -> int:
    if args.in_process and args.nodes == 0:
        raise UsageError("--in-process runs the distributed algorithm with in-process nodes: give --nodes K >= 1 "
                         "(--nodes 0 alone is the centralized reference)")
    if args.tui and (args.nodes == 0 or args.in_process):
        raise UsageError("--tui shows a coordinator and its nodes: use it with --nodes K >= 1 and without --in-process")
    if args.out and (args.nodes == 0 or args.in_process):
        raise UsageError("--out keeps the model chain of a coordinator run: use it with --nodes K >= 1 and "
                         "without --in-process (or --save-weights for the final weights)")
    if getattr(args, "resume", False):
        if args.nodes == 0 or args.in_process:
            raise UsageError("--resume continues a run's model chain: use it with --out RUN_DIR and node "
                             "processes (--nodes K >= 1, without --in-process)")
        args.nodes = apply_resume_settings(args, "train")
    check_weights_path(args)
    if args.out:
        check_run_dir_writable(args.out)
    run_settings(args)  # a refused --offload is told before the data is loaded
    preset = preset_from_args(args)
    inputs = load_inputs(args.data, preset, args.limit)
    compute: LocalCompute | DistributedCompute
    reference = getattr(args, "reference", None)
    if reference and args.nodes != 0:
        raise UsageError("--reference RUN_DIR trains a resident run's network centrally: use it with --nodes 0")
    secret = None
    if args.nodes == 0 and reference:
        secret, basis = reference_basis(reference, inputs, preset)
        compute, ledger = LocalCompute(inputs.images, basis=basis), None
        eprint(f"train: centralized reference of the resident run in {reference}, preset {preset.name}, "
               f"{preset.describe()}, {preset.dtype}")
    elif args.nodes == 0:
        compute, ledger = LocalCompute(inputs.images), None
        eprint(f"train: centralized reference, preset {preset.name}, {preset.describe()}, {preset.dtype}")
    elif args.in_process:
        # Partitions and disguises from OS entropy: never from a seed a node could know.
        settings = run_settings(args)
        compute = DistributedCompute(inputs.images, args.nodes, np.random.default_rng(), InProcessExecutor,
                                     **inputs.source(), layers=preset.layers, offload=settings.offload,
                                     cost_model=default_cost_model(),
                                     disguise=settings.disguise or default_disguise(preset))
        ledger = compute.ledger
        eprint(f"train: {args.nodes} in-process nodes, preset {preset.name}, {preset.describe()}, {preset.dtype}, "
               f"offload {args.offload}")
        for line in compute.plan_lines(preset.batch_size or inputs.images["train"].shape[0]):
            eprint(f"train: {line}")
    else:
        return run_local_cluster(run_settings(args), preset, inputs, nodes=args.nodes, run_dir=args.out,
                                 resume=bool(getattr(args, "resume", False)),
                                 verbose=bool(getattr(args, "verbose", False)), tui=bool(args.tui),
                                 data_source=data_source(args.data))
    return drive(run_settings(args), preset, inputs, compute, ledger, secret)


def reference_basis(run_dir: str, inputs, preset):
    """(secret, basis) of the resident run in `run_dir`: what its coordinator drew first from
    its plan secret, for slots as many as the run has."""
    # only on this path (a centralized reference of a resident run): train --nodes 0 stays light
    from enshuffle.coordinator.resident import resident_basis
    from enshuffle.coordinator.run import load_run_settings, plan_secret
    path = Path(run_dir)
    if not (path / "plan.secret").is_file():
        raise UsageError(f"{run_dir} holds no plan.secret: give the --out directory of a resident run")
    settings = load_run_settings(str(path))
    secret = plan_secret(path)
    return secret, resident_basis(inputs.images["train"], int(settings["shards"]), preset.layers,
                                  np.random.default_rng(secret))


def drive(settings, preset, inputs, compute, ledger, secret: int | None = None) -> int:
    """Run every epoch in this process, reporting each; returns the exit status."""
    trainer = Trainer(preset, inputs, compute, secret=secret)
    while not trainer.finished:
        report = trainer.run_step()
        if report is not None:
            report_epoch(report, settings.json, preset.epochs)
    if ledger is not None:
        report_ledger(ledger, settings.json, notes=privacy_notes(preset, False))
    if settings.save_weights:
        save_weights(settings.save_weights, trainer.params)
        eprint(f"train: weights written to {settings.save_weights}")
    return 0


def check_bind(bind: str) -> None:
    """Refuse an address this machine cannot listen on (port taken, foreign address) up front."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.bind(bind)
    except zmq.ZMQError as exc:
        raise UsageError(f"cannot listen on {bind}: {exc.strerror}; choose another --bind address or port") from None
    finally:
        sock.close()
        ctx.term()  # the port is free again when this returns


def data_source(data: str | None) -> str | None:
    """--data as a --resume elsewhere must read it: an absolute directory, `bundled`, or None (search)."""
    if data is None or data == "bundled":
        return data
    return os.path.abspath(data)


DEFAULT_BIND = "tcp://127.0.0.1:5555"
SERVING_DEFAULTS = {"bind": DEFAULT_BIND, "allow": None, "open": False, "min_nodes": 1, "checkpoint_every": None,
                    "quarantine_after": 3, "replicate": False}


def serving_settings(args) -> dict:
    """How `enshuffle coordinator` serves (kept in run.json, so --resume serves the same way)."""
    return {"bind": args.bind, "allow": os.path.abspath(args.allow) if args.allow else None, "open": bool(args.open),
            "min_nodes": args.min_nodes, "checkpoint_every": args.checkpoint_every,
            "quarantine_after": args.quarantine_after, "replicate": bool(args.replicate)}


def apply_serving_settings(args, stored: dict | None) -> list[str]:
    """Fill the serving options not given on this command line from the run's (then from the
    defaults); returns what was taken from the run, for the resume line."""
    stored = stored or {}
    taken = []
    admission_given = bool(args.allow or args.open)
    for name, default in SERVING_DEFAULTS.items():
        value = getattr(args, name)
        given = admission_given if name in ("allow", "open") else value not in (None, False)
        if not given and stored.get(name) not in (None, False):
            setattr(args, name, stored[name])
            option = "--" + name.replace("_", "-")
            taken.append(option if stored[name] is True else f"{option} {stored[name]}")
        elif getattr(args, name) is None:
            setattr(args, name, default)
    return taken


def apply_resume_settings(args, who: str) -> int:
    """--resume: take the run's training settings from RUN_DIR/run.json; returns its shard count.

    A new --epochs is honoured (it is how a finished run is extended); the other training
    options are the run's, since the chain's versions only make sense with them."""
    if not args.out:
        raise UsageError("--resume needs --out RUN_DIR naming the run to continue")
    settings = load_run_settings(args.out)
    if args.epochs is not None and args.epochs < settings["epochs"]:
        raise UsageError(f"--epochs {args.epochs} is fewer than the {settings['epochs']} epochs {args.out} was "
                         f"started with; a resumed run can only be extended (give more epochs, or none)")
    epochs = args.epochs if args.epochs is not None else settings["epochs"]
    extended = f" (was {settings['epochs']})" if epochs != settings["epochs"] else ""
    args.preset, args.epochs, args.dtype = settings["preset"], epochs, settings["dtype"]
    args.offload, args.seed, args.limit = settings["offload"], settings["seed"], settings.get("limit")
    # A run written before networks had a shape is the notebook's 784-128-10 sigmoid network.
    args.layers, args.hidden = tuple(settings.get("layers") or NOTEBOOK_LAYERS), None
    args.activation = settings.get("activation") or "sigmoid"
    if getattr(args, "data", None) is None and settings.get("data_source"):
        args.data = settings["data_source"]
    shards = int(settings["shards"])
    layers = "-".join(map(str, args.layers))
    eprint(f"{who}: resuming {args.out} with its settings: preset {args.preset}, {layers} {args.activation}, "
           f"{args.epochs} epochs{extended}, "
           f"{args.dtype}, offload {args.offload}, {shards} block{'s' if shards != 1 else ''}"
           + (f", data {args.data}" if settings.get("data_source") else "") + " (other training options are ignored)")
    if who == "coordinator":
        taken = apply_serving_settings(args, settings.get("serving"))
        if taken:
            eprint(f"{who}: serving as the run did: {' '.join(taken)} (give an option to change it)")
    return shards


def cmd_coordinator(args) -> int:
    """`enshuffle coordinator`: listen for volunteers' nodes and train."""
    run_dir = args.out
    if args.resume:
        shards = apply_resume_settings(args, "coordinator")
    else:
        apply_serving_settings(args, None)
        shards = args.min_nodes
    run_settings(args)  # a refused --offload is told before anything starts
    check_bind(args.bind)  # a taken port is told before minutes of data loading, not after
    if args.open and args.allow:
        raise UsageError("--open admits every key, --allow FILE only the listed ones: choose one")
    admission = Admission(allow_file=args.allow, open_=args.open, home=enshuffle_home())
    run_dir = run_dir or default_run_dir()
    check_run_dir_writable(run_dir)  # before minutes of data loading, not after
    preset = preset_from_args(args)
    inputs = load_inputs(args.data, preset, args.limit)
    try:
        run = CoordinatorRun(run_settings(args), preset, inputs, bind=args.bind, shards=shards,
                             min_nodes=args.min_nodes,
                             run_dir=run_dir, resume=args.resume,
                             checkpoint_every=args.checkpoint_every, admission=admission,
                             serving=serving_settings(args), data_source=data_source(args.data))
    except OSError as exc:
        raise UsageError(str(exc)) from None
    commands = run.state.join_commands
    eprint(f"coordinator: network {preset.describe()}, preset {preset.name}, {preset.dtype}")
    for line in run.compute.plan_lines(preset.batch_size or inputs.images["train"].shape[0]):
        eprint(f"coordinator: {line}")
    eprint(f"coordinator: listening on {listen_text(run.server.endpoint)}, run {run.server.run_id}, "
           f"model chain in {run.run_dir}")
    eprint(f"coordinator: fingerprint {run.identity.fingerprint}")
    if args.open:
        eprint("coordinator: WARNING: --open: ANY node that reaches this port is admitted and receives "
               "training data; use --allow FILE or invite codes (enshuffle invite) to choose who joins")
    eprint(f"coordinator: {admission.describe()}")
    eprint("coordinator: on each volunteer machine run" + (" one of:" if len(commands) > 1 else ":"))
    for command in commands:
        eprint(f"    {command}")
    for note in run.state.join_notes:
        eprint(f"  ({note})")

    return run_with_tui(run) if args.tui else run_headless(run)
