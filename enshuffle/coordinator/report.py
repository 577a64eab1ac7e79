"""What a coordinator run tells its operator: epoch lines, the exposure table, the join commands.

Output contract: human lines on stdout (one per epoch, then the exposure table), or with
`--json` one JSON object per epoch and a last one holding the exposure ledger. Progress
and diagnostics go to stderr (`eprint`) so stdout stays machine-readable.
"""

from __future__ import annotations

import json
import textwrap
import sys

import numpy as np

from enshuffle.coordinator.addresses import split_endpoint, volunteer_addresses
from enshuffle.errors import UsageError


def eprint(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def format_epoch(report, total: int) -> str:
    return (
        f"epoch {report.epoch:>3}/{total}  cost {report.cost:.6f}  train acc {report.train_accuracy:.4f}"
        f"  test acc {report.test_accuracy:.4f}  {report.seconds:.2f} s"
    )


def save_weights(path: str, params: dict[str, np.ndarray]) -> None:
    try:
        with open(path, "wb") as fh:
            # w1, b1, w2, b2, ...: one pair per layer
            np.savez(fh, **params)  # type: ignore[arg-type]  # mypy matches **arrays against allow_pickle: bool
    except OSError as exc:
        raise UsageError(f"cannot write weights to {path}: {exc.strerror}; choose a writable path") from None


def report_epoch(report, json_lines: bool, total: int) -> None:
    if json_lines:
        print(json.dumps({"type": "epoch", **report.as_dict()}), flush=True)
    else:
        print(format_epoch(report, total), flush=True)


LEDGER_WIDTH = 80  # the final table fits an 80-column terminal (or a log viewer)


def report_ledger(ledger, json_lines: bool, extra: dict | None = None, notes: list[str] | None = None) -> None:
    if json_lines:
        print(
            json.dumps(
                {
                    "type": "ledger",
                    "ledger": ledger.shares(),
                    "forms": ledger.forms(),
                    "notes": notes or [],
                    **(extra or {}),
                }
            ),
            flush=True,
        )
    else:
        print()
        print("Exposure ledger: share of each kind of information each node has")
        print("received, and in what form")
        print(ledger.table(width=LEDGER_WIDTH))
        for note in notes or []:
            print("\n".join(textwrap.wrap(note, LEDGER_WIDTH, initial_indent="- ", subsequent_indent="  ")))


def listen_text(endpoint: str) -> str:
    """The bound endpoint as people write it: tcp://0.0.0.0:5555, not tcp://[::ffff:0.0.0.0]:5555."""
    host, port = split_endpoint(endpoint)
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def join_commands(endpoint: str, fingerprint: str) -> list[str]:
    """The `enshuffle node` command line(s) a volunteer runs, one per address of this machine."""
    return [
        f"enshuffle node --connect {address} --coordinator-key {fingerprint}"
        for address in volunteer_addresses(endpoint)
    ]
