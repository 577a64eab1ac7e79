"""`enshuffle train`: the centralized reference (--nodes 0), in-process nodes (--in-process), or
a coordinator on loopback with K local node processes (--nodes K).

The command layer: argparse's Namespace is read here and nowhere below; the run gets a
`RunConfig`. What a run prints, and the output contract, is in `coordinator.report`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from enshuffle.commands.console import run_console
from enshuffle.commands.options import check_offload, check_run_dir_writable, check_weights_path, resume, run_config
from enshuffle.coordinator.addresses import volunteer_addresses
from enshuffle.coordinator.cluster import (
    LOCAL_NODES_CONNECT_S,
    local_nodes_problem,
    spawn_local_nodes,
    stop_local_nodes,
)
from enshuffle.coordinator.distributed import DistributedCompute, InProcessExecutor, default_disguise
from enshuffle.coordinator.ledger import privacy_notes
from enshuffle.coordinator.offload import default_cost_model
from enshuffle.coordinator.report import eprint, listen_text, report_epoch, report_ledger, save_weights
from enshuffle.coordinator.run import local_cluster_run, local_nodes_dir
from enshuffle.coordinator.settings import RunConfig, RunRecord
from enshuffle.coordinator.training import Trainer, load_inputs
from enshuffle.errors import UsageError
from enshuffle.model import LocalCompute


def cmd_train(args) -> int:
    config = run_config(args, "train")
    nodes = config.shards
    if config.in_process and nodes == 0:
        raise UsageError(
            "--in-process runs the distributed algorithm with in-process nodes: give --nodes K >= 1 "
            "(--nodes 0 alone is the centralized reference)"
        )
    if config.tui and (nodes == 0 or config.in_process):
        raise UsageError("--tui shows a coordinator and its nodes: use it with --nodes K >= 1 and without --in-process")
    if config.run_dir and (nodes == 0 or config.in_process):
        raise UsageError(
            "--out keeps the model chain of a coordinator run: use it with --nodes K >= 1 and "
            "without --in-process (or --save-weights for the final weights)"
        )
    if config.resume:
        if nodes == 0 or config.in_process:
            raise UsageError(
                "--resume continues a run's model chain: use it with --out RUN_DIR and node "
                "processes (--nodes K >= 1, without --in-process)"
            )
        config = resume(config, "train")
        nodes = config.shards
    check_weights_path(config.save_weights)
    if config.run_dir:
        check_run_dir_writable(config.run_dir)
    check_offload(config.offload)  # a refused --offload is told before the data is loaded
    preset = config.build_preset()
    inputs = load_inputs(config.data, preset, config.limit)
    compute: LocalCompute | DistributedCompute
    reference = config.reference
    if reference and nodes != 0:
        raise UsageError("--reference RUN_DIR trains a resident run's network centrally: use it with --nodes 0")
    secret = None
    if nodes == 0 and reference:
        secret, basis = reference_basis(reference, inputs, preset)
        compute, ledger = LocalCompute(inputs.images, basis=basis), None
        eprint(
            f"train: centralized reference of the resident run in {reference}, preset {preset.name}, "
            f"{preset.describe()}, {preset.dtype}"
        )
    elif nodes == 0:
        compute, ledger = LocalCompute(inputs.images), None
        eprint(f"train: centralized reference, preset {preset.name}, {preset.describe()}, {preset.dtype}")
    elif config.in_process:
        # Partitions and disguises from OS entropy: never from a seed a node could know.
        compute = DistributedCompute(
            inputs.images,
            nodes,
            np.random.default_rng(),
            InProcessExecutor,
            **inputs.source(),
            layers=preset.layers,
            offload=config.offload,
            cost_model=default_cost_model(),
            disguise=config.disguise or default_disguise(preset),
        )
        ledger = compute.ledger
        eprint(
            f"train: {nodes} in-process nodes, preset {preset.name}, {preset.describe()}, {preset.dtype}, "
            f"offload {config.offload}"
        )
        for line in compute.plan_lines(preset.batch_size or inputs.images["train"].shape[0]):
            eprint(f"train: {line}")
    else:
        return run_local_cluster(config, preset, inputs)
    return drive(config, preset, inputs, compute, ledger, secret)


def reference_basis(run_dir: str, inputs, preset):
    """(secret, basis) of the resident run in `run_dir`: what its coordinator drew first from
    its plan secret, for slots as many as the run has."""
    # only on this path (a centralized reference of a resident run): train --nodes 0 stays light
    from enshuffle.coordinator.disguise.resident import resident_basis
    from enshuffle.coordinator.run import plan_secret

    path = Path(run_dir)
    if not (path / "plan.secret").is_file():
        raise UsageError(f"{run_dir} holds no plan.secret: give the --out directory of a resident run")
    record = RunRecord.load(path)
    secret = plan_secret(path)
    return secret, resident_basis(inputs.images["train"], record.shards, preset.layers, np.random.default_rng(secret))


def drive(config: RunConfig, preset, inputs, compute, ledger, secret: int | None = None) -> int:
    """Run every epoch in this process, reporting each; returns the exit status."""
    trainer = Trainer(preset, inputs, compute, secret=secret)
    while not trainer.finished:
        report = trainer.run_step()
        if report is not None:
            report_epoch(report, config.json, preset.epochs)
    if ledger is not None:
        report_ledger(ledger, config.json, notes=privacy_notes(preset, False))
    if config.save_weights:
        save_weights(config.save_weights, trainer.params)
        eprint(f"train: weights written to {config.save_weights}")
    return 0


def run_local_cluster(config: RunConfig, preset, inputs) -> int:
    """`enshuffle train --nodes K`: a coordinator on loopback and K local node processes."""
    nodes, run_dir = config.shards, config.run_dir
    with tempfile.TemporaryDirectory(prefix="enshuffle-local-") as tmp_dir:
        tmp = Path(tmp_dir)
        run = local_cluster_run(config, preset, inputs, workdir=tmp, quiet=not config.verbose)
        eprint(
            f"train: coordinator on {listen_text(run.server.endpoint)}, {nodes} local node processes, "
            f"preset {preset.name}, {preset.describe()}, {preset.dtype}, offload {config.offload}"
        )
        for line in run.compute.plan_lines(preset.batch_size or inputs.images["train"].shape[0]):
            eprint(f"train: {line}")
        nodes_dir = local_nodes_dir(run_dir, tmp)
        procs = spawn_local_nodes(
            volunteer_addresses(run.server.endpoint)[0], run.identity.fingerprint, nodes, nodes_dir
        )
        eprint(
            f"train: waiting for the {nodes} local node{'s' if nodes != 1 else ''} to connect "
            f"(at most {LOCAL_NODES_CONNECT_S:g} s)"
        )
        run.local_nodes = True
        run.give_up = local_nodes_problem(procs, nodes_dir, time.monotonic() + LOCAL_NODES_CONNECT_S)
        try:
            return run_console(run, tui=config.tui)
        finally:
            finished = run.trainer.finished
            if not run.state.finished:
                run.server.close("shutdown")
            # Nodes leave by themselves after BYE run-finished; after a stop they would wait
            # for the coordinator to come back, which a local cluster never does.
            stop_local_nodes(procs, timeout=5.0 if finished else 0.0)
