"""What `train`, `coordinator`, `audit` and `bench` read from the command line in common: the
preset and network, the paths checked before any data loads, the run's settings, --resume."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from enshuffle.coordinator.offload import refuse_all
from enshuffle.coordinator.report import eprint
from enshuffle.coordinator.run import load_run_settings
from enshuffle.coordinator.settings import RunSettings
from enshuffle.errors import UsageError
from enshuffle.model import CLASSES, INPUTS, NOTEBOOK_LAYERS, PRESETS, get_preset


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
        refuse_all(args.offload)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return RunSettings(offload=args.offload, limit=getattr(args, "limit", None),
                       disguise=getattr(args, "disguise", None),
                       max_exposure=getattr(args, "max_exposure", None),
                       replicate=bool(getattr(args, "replicate", False)),
                       quarantine_after=getattr(args, "quarantine_after", None),
                       save_weights=getattr(args, "save_weights", None), json=bool(args.json))


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
