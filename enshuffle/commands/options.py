"""What `train`, `coordinator`, `audit` and `bench` read from the command line in common: the
run's frozen configuration (`run_config`, then `resume` for --resume), the network's shape, and
the paths checked before any data loads."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from enshuffle.coordinator import settings
from enshuffle.coordinator.offload import check_offload as check_offload_value
from enshuffle.coordinator.report import eprint
from enshuffle.coordinator.run import default_run_dir
from enshuffle.coordinator.settings import RunConfig, RunRecord, Serving
from enshuffle.errors import UsageError


def network_layers(args) -> tuple[int, ...] | None:
    """--layers, or --hidden with the pixels and classes around it; None: the preset's network."""
    return settings.network_layers(vars(args).get("layers"), vars(args).get("hidden"))


def check_weights_path(path: str | None) -> None:
    """Refuse a --save-weights path that cannot be written before training, not after it."""
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
        raise UsageError(
            f"--save-weights {path}: cannot write there ({exc.strerror}); choose a writable path"
        ) from None


def check_run_dir_writable(run_dir: str) -> None:
    """Refuse a --out that cannot be created or written before the data loads, not after."""
    target = Path(run_dir)
    if target.exists() and not target.is_dir():
        raise UsageError(f"--out {run_dir} is a file; give a directory for the run")
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {run_dir}: cannot create or write it ({probe} is not a writable directory); choose a writable --out"
        )


def run_config(args, command: str) -> RunConfig:
    """The run's frozen configuration from `enshuffle train` or `enshuffle coordinator`'s command
    line, built once; with --resume it is completed from the run directory's record by `resume`.
    The parsed arguments go no further."""
    option = vars(args).get  # the options one of the two commands does not have are None
    coordinator = command == "coordinator"
    serving = Serving(
        bind=option("bind"),
        allow=option("allow"),
        open=bool(option("open")),
        min_nodes=option("min_nodes"),
        checkpoint_every=option("checkpoint_every"),
        quarantine_after=option("quarantine_after"),
        replicate=bool(option("replicate")),
    )
    config = RunConfig(
        preset=args.preset,
        epochs=args.epochs,
        dtype=args.dtype,
        seed=option("seed"),
        layers=network_layers(args),
        activation=option("activation"),
        offload=args.offload,
        limit=option("limit"),
        data=option("data"),
        disguise=option("disguise"),
        max_exposure=option("max_exposure"),
        save_weights=option("save_weights"),
        json=bool(args.json),
        run_dir=option("out"),
        resume=bool(option("resume")),
        serving=serving,
        keep_serving=coordinator,
        tui=bool(option("tui")),
        verbose=bool(option("verbose")),
        in_process=bool(option("in_process")),
        reference=option("reference"),
    )
    if config.resume:
        return config  # completed by `resume`
    if coordinator:
        serving = serving.completed()[0]
        assert serving.min_nodes is not None  # completed: every option has its value
        return replace(config, serving=serving, shards=serving.min_nodes, run_dir=config.run_dir or default_run_dir())
    return replace(config, shards=args.nodes)


def resume(config: RunConfig, who: str) -> RunConfig:
    """--resume: `config` continuing the run in its RUN_DIR, with the line saying what was taken
    from the run (and, for the coordinator, how it serves as the run did)."""
    if not config.run_dir:
        raise UsageError("--resume needs --out RUN_DIR naming the run to continue")
    record = RunRecord.load(config.run_dir)
    resumed = config.resumed(record)
    extended = f" (was {record.epochs})" if resumed.epochs != record.epochs else ""
    layers = "-".join(map(str, resumed.layers or ()))
    shards = resumed.shards
    eprint(
        f"{who}: resuming {config.run_dir} with its settings: preset {resumed.preset}, {layers} "
        f"{resumed.activation}, {resumed.epochs} epochs{extended}, "
        f"{resumed.dtype}, offload {resumed.offload}, {shards} block{'s' if shards != 1 else ''}"
        + (f", data {resumed.data}" if record.data_source else "")
        + " (other training options are ignored)"
    )
    if config.keep_serving:
        taken = config.serving.completed(record.serving)[1]
        if taken:
            eprint(f"{who}: serving as the run did: {' '.join(taken)} (give an option to change it)")
    return resumed


def check_offload(offload: str) -> None:
    """A refused --offload is told before the data is loaded."""
    try:
        check_offload_value(offload)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
