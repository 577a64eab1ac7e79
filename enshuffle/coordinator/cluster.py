"""Local `enshuffle node` processes: the nodes `enshuffle train --nodes K`, `enshuffle audit` and
`enshuffle bench` start on this machine. One place spawns them (each with its own key in its
own ENSHUFFLE_HOME under a work directory, its log in that home), says why they will not
connect, and stops and reaps them.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from enshuffle.protocol.keys import load_or_create_identity

LOCAL_NODES_CONNECT_S = 60.0  # local node processes that have not connected by then never will


def node_home(workdir: Path, index: int) -> Path:
    """The ENSHUFFLE_HOME of local node `index` (0-based): workdir/node-1, node-2, ..."""
    return workdir / f"node-{index + 1}"


def local_node_keys(workdir: Path, count: int, prefix: str = "local") -> list[bytes]:
    """Create the local nodes' keys up front (each in its own ENSHUFFLE_HOME, under its --name), so
    the coordinator admits exactly them and nobody else."""
    keys = []
    for i in range(count):
        home = node_home(workdir, i)
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys.append(load_or_create_identity("node", home, name=f"{prefix}-{i + 1}").public_bytes)
    return keys


def node_args(endpoint: str, fingerprint: str, name: str) -> list[str]:
    """What follows `python -m enshuffle` to start a node that connects to `endpoint`, pins the
    coordinator key `fingerprint` and calls itself `name`."""
    return ["node", "--connect", endpoint, "--coordinator-key", fingerprint, "--name", name]


def spawn_node(
    endpoint: str,
    fingerprint: str,
    home: Path,
    name: str,
    *,
    threads: int | None = 1,
    record: Path | None = None,
    own_session: bool = True,
) -> subprocess.Popen:
    """Start one `enshuffle node --connect endpoint --coordinator-key fingerprint --name name` with
    ENSHUFFLE_HOME=home (created if missing), its output in home/node.log. `threads` None leaves
    the node its default BLAS threads; `record` makes it keep what it accepts (--record). With
    `own_session` it has a session of its own: Ctrl-C in the terminal reaches the coordinator
    only, which then finishes its step with it and tells it BYE (else it would leave mid-step)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    command = [sys.executable, "-m", "enshuffle", *node_args(endpoint, fingerprint, name)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if record is not None:
        command += ["--record", str(record)]
    log = open(home / "node.log", "wb")
    try:
        return subprocess.Popen(
            command,
            env=dict(os.environ, ENSHUFFLE_HOME=str(home)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=own_session,
        )
    finally:
        log.close()


def spawn_local_nodes(
    endpoint: str,
    fingerprint: str,
    count: int,
    workdir: Path,
    threads: int | None = 1,
    *,
    prefix: str = "local",
    record: Path | None = None,
    own_session: bool = True,
) -> list[subprocess.Popen]:
    """Start `count` local nodes named PREFIX-1, PREFIX-2, ..., each with its own key (its own
    ENSHUFFLE_HOME under `workdir`); the first records into `record` when given."""
    return [
        spawn_node(
            endpoint,
            fingerprint,
            node_home(workdir, i),
            f"{prefix}-{i + 1}",
            threads=threads,
            record=record if i == 0 else None,
            own_session=own_session,
        )
        for i in range(count)
    ]


def stop_local_nodes(procs: list[subprocess.Popen], timeout: float = 5.0) -> None:
    """Give the nodes `timeout` seconds to leave by themselves (after BYE run-finished), then
    SIGTERM (they say BYE and exit), then, 2 s later, SIGKILL; every process is reaped."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(2)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["(nothing logged)"])[-1].strip()


def local_nodes_problem(procs: list[subprocess.Popen], workdir: Path, deadline: float):
    """For `wait_for_nodes(give_up=...)`: why local nodes will not connect (a node exited, or
    none connected in time, with what its log says), or None while waiting still makes sense.
    Once they have connected (`problem.connected()`), only an exit is a reason: a node that lost
    its connection (e.g. while the coordinator was busy) reconnects in its own time."""
    connect_by = [deadline]

    def problem(starting: bool) -> str | None:
        exited = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() is not None]
        if exited and (starting or len(exited) == len(procs)):
            i, rc = exited[0]
            return f"local node {i + 1} exited with status {rc}: {_last_line(node_home(workdir, i) / 'node.log')}"
        if starting and time.monotonic() > connect_by[0]:
            return (
                f"the local nodes did not connect within {LOCAL_NODES_CONNECT_S:g} s; local-1 says: "
                f"{_last_line(node_home(workdir, 0) / 'node.log')}"
            )
        return None

    def connected() -> None:
        connect_by[0] = math.inf

    problem.connected = connected  # type: ignore[attr-defined]
    return problem
