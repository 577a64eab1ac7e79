"""`enshuffle node --install-service`: a systemd user unit that runs this node as a daemon.

The unit runs the same `enshuffle node` command line the volunteer typed (minus
--install-service and --tui, plus --keep-running), with this Python and this ENSHUFFLE_HOME,
at low CPU priority unless --nice says otherwise. An invite code goes into the unit's
environment (ENSHUFFLE_INVITE), not its command line: once used, the coordinator knows the node's
key, and a used code is harmless. Each --name gets a unit of its own (enshuffle-node-NAME.service),
so two nodes of one user do not overwrite each other. systemd stops it with SIGTERM, on which the
node says BYE and exits 0; exit statuses 2-4 (a wrong value, a refusal) are final and do not
restart it. Every value is quoted by systemd's rules (systemd.syntax(7), systemd.service(5)).
Nothing here imports numpy or textual.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from enshuffle.protocol.keys import enshuffle_home

UNIT_PREFIX = "enshuffle-node"
SERVICE_NICE = 19  # the unit's default priority: only CPU nobody else wants (BOINC's choice)
FINAL_EXIT_STATUSES = "2 3 4"  # a wrong value, refused by / refusing the coordinator: retrying cannot help
UNIT_NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ServiceError(ValueError):
    """A value that cannot go into a unit file."""


def unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".config") / "systemd" / "user"


def unit_name(name: str | None) -> str:
    """enshuffle-node.service, or enshuffle-node-NAME.service for --name NAME."""
    if name is None:
        return f"{UNIT_PREFIX}.service"
    if not UNIT_NAME_CHARS.fullmatch(name):
        raise ServiceError(f"--name {name!r} cannot name a unit: use up to 64 letters, digits, '.', '_' or '-'")
    return f"{UNIT_PREFIX}-{name}.service"


def _check_value(what: str, value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ServiceError(f"{what} {value!r} holds a control character (a newline?); it cannot go into a unit file")
    return value


def quote_exec_arg(arg: str) -> str:
    """One ExecStart= word: double-quoted, with backslash and quote escaped (C-style escapes are
    decoded inside quotes), `%` doubled (specifiers) and `$` doubled (variable expansion)."""
    _check_value("a command-line word", arg)
    body = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{body}"'


def quote_environment(name: str, value: str) -> str:
    """One Environment= assignment, quoted as a whole; `%` doubled ($ is not expanded there)."""
    _check_value(f"the value of {name}", value)
    body = f"{name}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{body}"'


def _plain(text: str) -> str:
    """Text for a free-form setting (Description=): specifiers escaped, no control characters."""
    return _check_value("the description", text).replace("%", "%%")


def node_command(args) -> list[str]:
    """The daemon's command line, from the parsed `enshuffle node` arguments (no invite: see module)."""
    cmd = [sys.executable, "-m", "enshuffle", "node", "--connect", args.connect, "--keep-running"]
    if args.coordinator_key:
        cmd += ["--coordinator-key", args.coordinator_key]
    if args.name:
        cmd += ["--name", args.name]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if getattr(args, "max_memory", None):
        cmd += ["--max-memory", str(args.max_memory)]
    if getattr(args, "max_cpu", 100) != 100:
        cmd += ["--max-cpu", str(args.max_cpu)]
    if getattr(args, "hours", None):
        cmd += ["--hours", args.hours]
    if getattr(args, "record", None):
        # The service starts in /: a relative directory must mean what it meant here.
        cmd += ["--record", os.path.abspath(args.record), "--record-max-bytes", str(args.record_max_bytes)]
    return cmd


def service_nice(args) -> int:
    """--nice as given (0 included), else the service's default of 19."""
    nice = getattr(args, "nice", None)
    return SERVICE_NICE if nice is None else nice


def unit_text(args, home: Path) -> str:
    name = unit_name(args.name)
    exec_start = " ".join(quote_exec_arg(part) for part in node_command(args))
    environment = [quote_environment("ENSHUFFLE_HOME", str(home)), quote_environment("PYTHONUNBUFFERED", "1")]
    invite = getattr(args, "invite", None)
    if invite:
        environment.append(quote_environment("ENSHUFFLE_INVITE", invite))
    env_lines = "\n".join(f"Environment={e}" for e in environment)
    return f"""\
# Written by `enshuffle node --install-service`. Start: systemctl --user enable --now {name}
[Unit]
Description={_plain(f"enshuffle volunteer node {args.name or ''} for {args.connect}".replace("  ", " "))}
# No ordering after the network: a user unit cannot wait for the system's network targets.
# The node waits for its coordinator by itself (--keep-running retries for ever).

[Service]
Type=simple
ExecStart={exec_start}
{env_lines}
Nice={service_nice(args)}
CPUSchedulingPolicy=batch
IOSchedulingClass=idle
# SIGTERM: the node says BYE (its batches are reissued at once) and exits 0.
KillSignal=SIGTERM
TimeoutStopSec=15
Restart=on-failure
RestartSec=30
# A wrong value (2) or a refusal by or of the coordinator (3, 4) is final: restarting cannot help.
RestartPreventExitStatus={FINAL_EXIT_STATUSES}

[Install]
WantedBy=default.target
"""


def install_service(args) -> int:
    home = enshuffle_home().resolve()
    try:
        name = unit_name(args.name)
        text = unit_text(args, home)
    except ServiceError as exc:
        print(f"enshuffle node: error: {exc}", file=sys.stderr)
        return 2
    target = unit_dir() / name
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        # The unit may hold an invite code: readable by this user only.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(target, 0o600)
    except OSError as exc:
        print(f"enshuffle node: cannot write {target}: {exc.strerror}; check that directory", file=sys.stderr)
        return 1
    print(f"{'replaced' if existed else 'wrote'} {target}")
    if not args.coordinator_key:
        print(
            "note: no --coordinator-key: the node trusts the first key it sees at that address; "
            "pin it with the fingerprint the operator gives you"
        )
    print(f"""start now and at login:  systemctl --user daemon-reload && systemctl --user enable --now {name}
stop:                    systemctl --user stop {name}   (the node says BYE first)
status and logs:         systemctl --user status {name};  journalctl --user -u {name} -f
keep it running after you log out:  loginctl enable-linger $USER
remove:                  systemctl --user disable --now {name} && rm {target}""")
    return 0
