"""`enshuffle node --install-service`: a systemd user unit that runs this node as a daemon.

The unit runs the same `enshuffle node` command line the volunteer typed (minus
--install-service and --tui, plus --keep-running), with this Python and this ENSHUFFLE_HOME,
at low CPU priority. systemd stops it with SIGTERM, on which the node says BYE and exits 0.
Nothing here imports numpy or textual.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from enshuffle.protocol.keys import enshuffle_home

UNIT_NAME = "enshuffle-node.service"
SERVICE_NICE = 19  # the unit's default priority: only CPU nobody else wants (BOINC's choice)


def unit_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".config") / "systemd" / "user"


def node_command(args) -> list[str]:
    """The daemon's command line, from the parsed `enshuffle node` arguments."""
    cmd = [sys.executable, "-m", "enshuffle", "node", "--connect", args.connect, "--keep-running"]
    if args.coordinator_key:
        cmd += ["--coordinator-key", args.coordinator_key]
    if args.name:
        cmd += ["--name", args.name]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if getattr(args, "max_cpu", 100) != 100:
        cmd += ["--max-cpu", str(args.max_cpu)]
    if getattr(args, "hours", None):
        cmd += ["--hours", args.hours]
    return cmd


def unit_text(args, home: Path) -> str:
    nice = args.nice or SERVICE_NICE
    exec_start = " ".join(shlex.quote(part) for part in node_command(args))
    return f"""\
# Written by `enshuffle node --install-service`. Start: systemctl --user enable --now {UNIT_NAME}
[Unit]
Description=enshuffle volunteer node for {args.connect}
After=network-online.target

[Service]
Type=simple
ExecStart={exec_start}
Environment=ENSHUFFLE_HOME={home}
Environment=PYTHONUNBUFFERED=1
Nice={nice}
CPUSchedulingPolicy=batch
IOSchedulingClass=idle
# SIGTERM: the node says BYE (its batches are reissued at once) and exits 0.
KillSignal=SIGTERM
TimeoutStopSec=15
Restart=on-failure
RestartSec=30

[Install]
WantedBy=default.target
"""


def install_service(args) -> int:
    home = enshuffle_home().resolve()
    target = unit_dir() / UNIT_NAME
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        existed = target.exists()
        target.write_text(unit_text(args, home))
    except OSError as exc:
        print(f"enshuffle node: cannot write {target}: {exc.strerror}; check that directory", file=sys.stderr)
        return 1
    print(f"{'replaced' if existed else 'wrote'} {target}")
    if not args.coordinator_key:
        print("note: no --coordinator-key: the node trusts the first key it sees at that address; "
              "pin it with the fingerprint the operator gives you")
    print(f"""start now and at login:  systemctl --user daemon-reload && systemctl --user enable --now {UNIT_NAME}
stop:                    systemctl --user stop {UNIT_NAME}   (the node says BYE first)
status and logs:         systemctl --user status {UNIT_NAME};  journalctl --user -u {UNIT_NAME} -f
keep it running after you log out:  loginctl enable-linger $USER
remove:                  systemctl --user disable --now {UNIT_NAME} && rm {target}""")
    return 0
