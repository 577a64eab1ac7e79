"""`enshuffle train`: the centralized reference (--nodes 0), in-process nodes (--in-process), or
a coordinator on loopback with K local node processes (--nodes K).

The command layer: argparse's Namespace is read here and nowhere below; the run gets a
`RunSettings`. What a run prints, and the output contract, is in `coordinator.report`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from enshuffle.commands.console import run_console
from enshuffle.commands.options import (apply_resume_settings, check_run_dir_writable, check_weights_path,
                                        data_source, preset_from_args, run_settings)
from enshuffle.coordinator.addresses import volunteer_addresses
from enshuffle.coordinator.cluster import (LOCAL_NODES_CONNECT_S, local_nodes_problem, spawn_local_nodes,
                                           stop_local_nodes)
from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor, default_disguise
from enshuffle.coordinator.ledger import privacy_notes
from enshuffle.coordinator.offload import default_cost_model
from enshuffle.coordinator.report import eprint, listen_text, report_epoch, report_ledger, save_weights
from enshuffle.coordinator.run import local_cluster_run, local_nodes_dir
from enshuffle.coordinator.settings import RunSettings
from enshuffle.coordinator.training import Trainer, load_inputs
from enshuffle.errors import UsageError
from enshuffle.model import LocalCompute


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


def run_local_cluster(settings: RunSettings, preset, inputs, *, nodes: int, run_dir: str | None = None,
                      resume: bool = False, verbose: bool = False, tui: bool = False,
                      data_source: str | None = None) -> int:
    """`enshuffle train --nodes K`: a coordinator on loopback and K local node processes."""
    with tempfile.TemporaryDirectory(prefix="enshuffle-local-") as tmp_dir:
        tmp = Path(tmp_dir)
        run = local_cluster_run(settings, preset, inputs, nodes=nodes, workdir=tmp, run_dir=run_dir, resume=resume,
                                quiet=not verbose, data_source=data_source)
        eprint(f"train: coordinator on {listen_text(run.server.endpoint)}, {nodes} local node processes, "
               f"preset {preset.name}, {preset.describe()}, {preset.dtype}, offload {settings.offload}")
        for line in run.compute.plan_lines(preset.batch_size or inputs.images["train"].shape[0]):
            eprint(f"train: {line}")
        nodes_dir = local_nodes_dir(run_dir, tmp)
        procs = spawn_local_nodes(volunteer_addresses(run.server.endpoint)[0], run.identity.fingerprint, nodes,
                                  nodes_dir)
        eprint(f"train: waiting for the {nodes} local node{'s' if nodes != 1 else ''} to connect "
               f"(at most {LOCAL_NODES_CONNECT_S:g} s)")
        run.local_nodes = True
        run.give_up = run.server.give_up = local_nodes_problem(procs, nodes_dir,
                                                               time.monotonic() + LOCAL_NODES_CONNECT_S)
        try:
            return run_console(run, tui=tui)
        finally:
            finished = run.trainer.finished
            if not run.state.finished:
                run.server.close("shutdown")
            # Nodes leave by themselves after BYE run-finished; after a stop they would wait
            # for the coordinator to come back, which a local cluster never does.
            stop_local_nodes(procs, timeout=5.0 if finished else 0.0)
