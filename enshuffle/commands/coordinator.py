"""`enshuffle coordinator`: listen for volunteers' nodes and train, or continue a run (--resume)."""

from __future__ import annotations

import zmq

from enshuffle.commands.console import run_console
from enshuffle.commands.options import check_offload, check_run_dir_writable, resume, run_config
from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.report import eprint, listen_text
from enshuffle.coordinator.run import CoordinatorRun
from enshuffle.coordinator.training import load_inputs
from enshuffle.errors import UsageError
from enshuffle.protocol.keys import enshuffle_home


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


def cmd_coordinator(args) -> int:
    """`enshuffle coordinator`: listen for volunteers' nodes and train."""
    config = run_config(args, "coordinator")
    if config.resume:
        config = resume(config, "coordinator")
    check_offload(config.offload)  # a refused --offload is told before anything starts
    serving = config.serving
    assert serving.bind is not None and config.run_dir is not None  # completed by run_config or resume
    check_bind(serving.bind)  # a taken port is told before minutes of data loading, not after
    if serving.open and serving.allow:
        raise UsageError("--open admits every key, --allow FILE only the listed ones: choose one")
    admission = Admission(allow_file=serving.allow, open_=serving.open, home=enshuffle_home())
    check_run_dir_writable(config.run_dir)  # before minutes of data loading, not after
    preset = config.build_preset()
    inputs = load_inputs(config.data, preset, config.limit)
    try:
        run = CoordinatorRun(config, preset, inputs, admission=admission)
    except OSError as exc:
        raise UsageError(str(exc)) from None
    commands = run.state.join_commands
    eprint(f"coordinator: network {preset.describe()}, preset {preset.name}, {preset.dtype}")
    for line in run.compute.plan_lines(preset.batch_size or inputs.images["train"].shape[0]):
        eprint(f"coordinator: {line}")
    eprint(
        f"coordinator: listening on {listen_text(run.server.endpoint)}, run {run.server.run_id}, "
        f"model chain in {run.run_dir}"
    )
    eprint(f"coordinator: fingerprint {run.identity.fingerprint}")
    if serving.open:
        eprint(
            "coordinator: WARNING: --open: ANY node that reaches this port is admitted and receives "
            "training data; use --allow FILE or invite codes (enshuffle invite) to choose who joins"
        )
    eprint(f"coordinator: {admission.describe()}")
    eprint("coordinator: on each volunteer machine run" + (" one of:" if len(commands) > 1 else ":"))
    for command in commands:
        eprint(f"    {command}")
    for note in run.state.join_notes:
        eprint(f"  ({note})")

    return run_console(run, tui=config.tui)
