"""The `enshuffle` command line: argument parsing and dispatch.

Every sub-command's handler lives in `enshuffle.commands` and is imported lazily, by name, so
`enshuffle node` never pays for numpy-heavy coordinator code or for textual.
A handler takes the parsed arguments and returns an exit status. A wrong value is a one-line
error and exit status 2 (argparse's own convention), never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from enshuffle import __version__
from enshuffle.errors import UsageError  # re-exported: the CLI turns it into one-line messages
from enshuffle.memory import keep_freed_memory
from enshuffle.node.policy import PolicyError, parse_window


ENVIRONMENT_HELP = """\
environment:
  ENSHUFFLE_HOME   keys and the coordinators a node trusts
                   (default $XDG_CONFIG_HOME/enshuffle, else ~/.config/enshuffle)
  ENSHUFFLE_CACHE  downloaded MNIST (default $XDG_CACHE_HOME/enshuffle, else ~/.cache/enshuffle)
  ENSHUFFLE_INVITE an invite code for `enshuffle node`, as --invite CODE (kept out of `ps`)

exit status: 0 done (a run finished, or a node stopped when asked); 1 failed or a check
failed; 2 a wrong command-line value; 3/4 a node refused by or refusing its coordinator;
5 a node found no coordinator (or its host name does not resolve); 130 a run interrupted
before it finished (Ctrl-C, SIGTERM, q, its terminal closed) - resume it with --resume.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows every option's default, unless it has none worth saying or its help names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or action.option_strings == []
            or isinstance(action, argparse._HelpAction)
        ):
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


def _int_at_least(minimum: int):
    """An argparse type: a whole number >= minimum, with a message naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _threads(text: str) -> int:
    """--threads: 1 up to the CPUs this process may use (more only makes BLAS threads fight)."""
    value = _positive_int(text)
    if value > _cores():
        raise argparse.ArgumentTypeError(f"expected 1..{_cores()} (the CPUs this machine lets us use), got {value}")
    return value


def _percent(text: str) -> int:
    value = _positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"expected a percentage 1..100, got {value}")
    return value


def _nice(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number 0..19, got {text!r}") from None
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"expected 0..19 (19 is the lowest priority), got {value}")
    return value


def _hours(text: str) -> str:
    try:
        parse_window(text)
    except PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _no_control(text: str, what: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise argparse.ArgumentTypeError(f"{what} must not hold control characters (a newline?), got {text!r}")
    return text


def _name(text: str) -> str:
    """--name: what the operator sees; printable, 1-64 characters."""
    _no_control(text, "a name")
    if not 0 < len(text) <= 64 or text != text.strip():
        raise argparse.ArgumentTypeError(f"expected 1-64 characters without leading or trailing spaces, got {text!r}")
    return text


def _endpoint(text: str) -> str:
    _no_control(text, "an address")
    if not text.startswith("tcp://") or ":" not in text[len("tcp://") :]:
        raise argparse.ArgumentTypeError(f"expected an address like tcp://127.0.0.1:5555, got {text!r}")
    host, _, port = text[len("tcp://") :].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected an address like tcp://127.0.0.1:5555 with a port 1-65535, got {text!r}"
        )
    return text


def _duration(text: str) -> float:
    """An argparse type: 90m, 24h, 7d (or plain seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    body = text.strip().lower()
    unit = units.get(body[-1:], None)
    try:
        value = float(body[:-1] if unit else body) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90m, 24h or 7d, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration, got {text!r}")
    return value


def _size(text: str) -> int:
    """An argparse type: a byte count such as 512M, 2G or 1000000 (at least 1M)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    body = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = body[-1:] if body[-1:] in ("K", "M", "G") else ""
    number = body[:-1] if unit else body
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 2G, got {text!r}") from None
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(f"expected at least 1M, got {text!r}")
    return value


def _version() -> str:
    return __version__


def _widths(text: str) -> tuple[int, ...]:
    """784,2048,2048,10 -> (784, 2048, 2048, 10): comma-separated positive whole numbers."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated unit counts such as 784,2048,10, got {text!r}"
        ) from None
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"unit counts must be positive, got {text!r}")
    return widths


def _add_network_options(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--layers",
        type=_widths,
        default=None,
        metavar="784,H,...,10",
        help="the network's units per layer, pixels first and classes last (default: the preset's: "
        "784,2048,10 for default and adam, the notebook's 784,128,10 for seed)",
    )
    group.add_argument(
        "--hidden",
        type=_widths,
        default=None,
        metavar="H[,H...]",
        help="only the hidden widths: --hidden 2048,2048 is --layers 784,2048,2048,10",
    )
    p.add_argument(
        "--activation",
        choices=["sigmoid", "relu"],
        default=None,
        help="the hidden units' activation (default: the preset's: relu for default and adam, the "
        "notebook's sigmoid for seed)",
    )


def _add_training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=["seed", "default", "adam"],
        default="default",
        help="seed: the notebook's run, bias bugs fixed; default: a preset that trains well (its first "
        "layer resident on the nodes); adam: the default with Adam on the first layer too, so w1 "
        "is re-sent every step under the share disguise (the audit's control)",
    )
    _add_network_options(p)
    p.add_argument("--epochs", type=_positive_int, default=None, help="number of epochs (default: the preset's)")
    p.add_argument(
        "--offload",
        choices=["auto", "matmul"],
        default="auto",
        help="which products nodes compute: auto ships each product only where that saves the "
        "coordinator CPU (cost model from `enshuffle bench`; the plan is printed at start), "
        "matmul every product that can go (the pixel-wide ones and every hidden-to-hidden "
        "layer's)",
    )
    p.add_argument(
        "--disguise",
        choices=["resident", "share", "shuffle"],
        default=None,
        help="resident: each node keeps its block of w1 in a secret basis and updates it itself "
        "(presets whose first layer trains with momentum: default); share: w1 re-sent each step "
        "(the seed preset's, exact against the notebook); shuffle: the weak permutation control",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="directory with MNIST-format IDX files, or `bundled` for the 3,500-image subset inside "
        "the package (default: Fashion-MNIST, then MNIST, then the bundled subset)",
    )
    p.add_argument(
        "--dtype", choices=["float32", "float64"], default=None, help="floating-point type (default: the preset's)"
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="use only N training images (quick runs): the same number of each class, each class's "
        "first in file order (the seed preset: the first N, as the notebook)",
    )
    p.add_argument(
        "--max-exposure",
        type=_fraction,
        default=None,
        metavar="SHARE",
        help="let one node hold up to this share (0..1) of the images' pixels and of w1 "
        "(default: one node's block, 1/min-nodes); raising it is marked in the ledger",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON lines: one object per epoch, then the ledger; each has a `type` key",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed: initial weights and sample order (default: from the run's secret; "
        "the seed preset keeps the notebook's public 402). A seed you pass is as secret as you "
        "keep it; plans and disguises always come from secret randomness",
    )


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1 (e.g. 0.5), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enshuffle",
        formatter_class=HelpFormatter,
        epilog=ENVIRONMENT_HELP,
        description="Train a neural network on volunteers' machines without giving any one of them the model.",
    )
    parser.add_argument("--version", action="version", version=f"enshuffle {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_SubParser)
    sub.required = True

    p = sub.add_parser("train", help="train the network: centralized, in-process, or with local node processes")
    _add_training_options(p)
    p.add_argument(
        "--nodes", type=_non_negative_int, default=2, help="number of nodes; 0 is the centralized reference (default 2)"
    )
    p.add_argument(
        "--in-process", action="store_true", help="run the distributed algorithm in this process, without sockets"
    )
    p.add_argument(
        "--save-weights",
        metavar="FILE.npz",
        default=None,
        help="write the final weights here (w1, b1, w2, b2, ... one pair per layer)",
    )
    p.add_argument(
        "--out",
        metavar="RUN_DIR",
        default=None,
        help="keep the run here: model chain, settings, the local nodes' keys (default: not kept)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out RUN_DIR from its chain's head; a larger --epochs extends it",
    )
    p.add_argument("--tui", action="store_true", help="show the coordinator console")
    p.add_argument(
        "--reference",
        metavar="RUN_DIR",
        default=None,
        help="with --nodes 0: train the same reparameterized network as the resident run in RUN_DIR "
        "(its secret and slot count), centrally, to compare with it",
    )
    p.set_defaults(handler="enshuffle.commands.train:cmd_train")

    p = sub.add_parser("bench", help="measure the performance figures (the bench's targets among them) side by side")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    _add_network_options(p)
    p.add_argument("--repeats", type=_positive_int, default=3, help="repetitions per measurement (median)")
    p.add_argument(
        "--data", metavar="DIR", default=None, help="MNIST-format IDX files to time with (default: as for train)"
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="time with only N training images (quick runs; figures then are not comparable with full runs)",
    )
    p.add_argument(
        "--skip-wire",
        action="store_true",
        help="skip every measurement with node processes (loopback, round trips, daemon)",
    )
    p.add_argument(
        "--skip-daemon", action="store_true", help="skip the standalone `enshuffle coordinator` process measurement"
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="also measure the resident design's coordinator share per step for first-layer widths "
        "512-4096 and for 2, 4 and 7 node processes (several minutes)",
    )
    p.add_argument(
        "--round-trips",
        type=_positive_int,
        default=300,
        metavar="N",
        help="small products sent one at a time to each round-trip node (default 300)",
    )
    p.set_defaults(handler="enshuffle.commands.bench:cmd_bench")

    p = sub.add_parser("coordinator", help="run a coordinator that volunteers' nodes connect to")
    _add_training_options(p)
    p.add_argument(
        "--bind",
        type=_endpoint,
        default=None,
        help="address to listen on (default: tcp://127.0.0.1:5555, or the resumed run's)",
    )
    p.add_argument(
        "--min-nodes",
        type=_positive_int,
        default=None,
        help="nodes to wait for before training, and the number of blocks the images and w1 are "
        "split into: each node holds one block (default 1, or the resumed run's)",
    )
    p.add_argument(
        "--out",
        metavar="RUN_DIR",
        default=None,
        help="run directory (chain, state) (default: runs/run-DATE-TIME-XXXX under the current directory)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the chain's head in RUN_DIR, listening, admitting and reading --data as "
        "the run did unless told otherwise; a larger --epochs extends a finished run",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="write a model version every N steps (default: every epoch)",
    )
    p.add_argument(
        "--allow",
        metavar="FILE",
        default=None,
        help="admit the node keys listed in FILE (one fingerprint per line, # comments; re-read on SIGHUP)",
    )
    p.add_argument(
        "--open",
        action="store_true",
        help="admit ANY node key (no allow-list): anyone who can reach the port receives data",
    )
    p.add_argument("--tui", action="store_true", help="show the coordinator console")
    p.add_argument(
        "--quarantine-after",
        type=_positive_int,
        default=None,
        metavar="N",
        help="quarantine a node's key for the run after N wrong results (default 3, or the resumed run's)",
    )
    p.add_argument(
        "--replicate",
        action="store_true",
        help="also recompute here every result of a node not yet trusted (fewer than 20 "
        "results accepted, or one refused) and compare entry by entry",
    )
    p.set_defaults(handler="enshuffle.commands.coordinator:cmd_coordinator")

    p = sub.add_parser("invite", help="make an invite code for a volunteer and print the node command")
    p.add_argument(
        "--connect",
        type=_endpoint,
        default=None,
        help="the coordinator's address as volunteers reach it, for the printed command "
        "(default: this machine's first network address, port 5555)",
    )
    p.add_argument("--reusable", action="store_true", help="a code any number of nodes may use (default: one node)")
    p.add_argument(
        "--expires",
        type=_duration,
        default=None,
        metavar="DURATION",
        help="the code stops admitting new nodes after this long, e.g. 24h or 7d (default: never)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="list this home's invite codes instead of making one")
    group.add_argument(
        "--revoke",
        metavar="CODE_OR_ID",
        default=None,
        help="delete an invite code (the code, or the id --list shows); keys it admitted stay admitted",
    )
    p.set_defaults(handler="enshuffle.commands.invite:cmd_invite")

    p = sub.add_parser("node", help="contribute this machine's CPU to a coordinator")
    p.add_argument("--connect", type=_endpoint, required=True, help="coordinator address, tcp://HOST:PORT")
    p.add_argument(
        "--coordinator-key",
        metavar="FINGERPRINT",
        default=None,
        help="pin the coordinator's key (see `enshuffle keys show` on the coordinator)",
    )
    p.add_argument("--name", type=_name, default=None, help="a name the operator sees (default: host name)")
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="BLAS threads for computing, at most the CPU count (default: every CPU)",
    )
    p.add_argument(
        "--invite",
        metavar="CODE",
        default=None,
        help="an invite code from the operator (`enshuffle invite` on the coordinator); "
        "ENSHUFFLE_INVITE in the environment does the same without showing it to `ps`",
    )
    p.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        metavar="BYTES",
        help="most memory one batch may make this node allocate, e.g. 512M or 2G "
        "(default: a quarter of RAM, at most 512M)",
    )
    p.add_argument(
        "--keep-running",
        action="store_true",
        help="retry an unreachable coordinator for ever and, when a run finishes, wait for the "
        "next one (a long-running daemon); without it the node gives up after 5 minutes "
        "without a coordinator",
    )
    p.add_argument(
        "--nice",
        type=_nice,
        default=None,
        help="CPU priority, 0 (normal) to 19 (only what nobody else wants) (default: 0; 19 for --install-service)",
    )
    p.add_argument(
        "--max-cpu",
        type=_percent,
        default=100,
        metavar="PERCENT",
        help="rest between batches so computing takes at most this share of the time",
    )
    p.add_argument(
        "--hours",
        type=_hours,
        default=None,
        metavar="HH:MM-HH:MM",
        help="compute only in this daily window, local time (e.g. 22:00-07:00); paused outside it (default: always)",
    )
    p.add_argument(
        "--install-service",
        action="store_true",
        help="write a systemd user unit running this node command with --keep-running, print how "
        "to start, stop and read its logs, and exit",
    )
    p.add_argument("--tui", action="store_true", help="show the node app")
    p.add_argument(
        "--record",
        metavar="DIR",
        default=None,
        help="keep every verified STATIC and BATCH as DIR/%%08d-COMMAND.npz (what `enshuffle audit` "
        "plays a curious node against)",
    )
    p.add_argument(
        "--record-max-bytes",
        type=_positive_int,
        default=2 << 30,
        metavar="BYTES",
        help="stop recording past this many bytes (default 2 GiB)",
    )
    p.set_defaults(handler="enshuffle.commands.node:cmd_node")

    p = sub.add_parser("audit", help="run a short real run, record one node and play it as a curious attacker")
    p.add_argument(
        "--preset",
        choices=["seed", "default", "adam"],
        default="default",
        help="training preset of the audited run (default: default; adam with the share disguise is "
        "the weight-trajectory control)",
    )
    _add_network_options(p)
    p.add_argument("--nodes", type=_positive_int, default=3, help="node processes (default 3); one records")
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="epochs of the audited run (default 2: rows come back in the second)",
    )
    p.add_argument("--limit", type=_positive_int, default=2000, metavar="N", help="training images used (default 2000)")
    p.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="MNIST-format IDX files (default: Fashion-MNIST, then MNIST, then the bundled subset); "
        "the attacker uses the same public files",
    )
    p.add_argument(
        "--disguise",
        choices=["resident", "resident-clear", "share", "shuffle"],
        default=None,
        help="resident (the default preset's disguise) or its control resident-clear (no mixing, no "
        "noise); share (the seed preset's) or its control shuffle (permutations and powers of two); "
        "default: the preset's",
    )
    p.add_argument(
        "--record",
        metavar="DIR",
        default=None,
        help="keep the recording here (default: a temporary directory, removed afterwards)",
    )
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(handler="enshuffle.commands.audit:cmd_audit")

    p = sub.add_parser("keys", help="this machine's keys")
    p.set_defaults(help_of=p)  # bare `enshuffle keys`: its actions, as bare `enshuffle` lists commands
    ksub = p.add_subparsers(dest="keys_command", metavar="ACTION")
    kp = ksub.add_parser("show", help="list the keys in this home with the --name each serves")
    kp.add_argument(
        "--name", type=_name, default=None, help="say which key `enshuffle node --name NAME` uses (one key per name)"
    )
    kp.add_argument(
        "--create", action="store_true", help="create the coordinator key and the node key (for --name) if missing"
    )
    kp.set_defaults(handler="enshuffle.commands.keys:cmd_keys_show")
    kp = ksub.add_parser(
        "forget",
        help="forget the coordinator key a node trusts for ADDRESS (after the operator "
        "really changed keys), so the next connection trusts or pins afresh",
    )
    kp.add_argument("address", metavar="ADDRESS", type=_endpoint, help="the --connect address, tcp://HOST:PORT")
    kp.set_defaults(handler="enshuffle.commands.keys:cmd_keys_forget")

    p = sub.add_parser("chain", help="inspect a run's hash chain of model versions")
    p.set_defaults(help_of=p)
    csub = p.add_subparsers(dest="chain_command", metavar="ACTION")
    cp = csub.add_parser("log", help="list model versions, newest first")
    cp.add_argument("run_dir", metavar="RUN_DIR")
    cp.add_argument(
        "--json", action="store_true", help='JSON lines, newest first: one {"type": "version", ...} object per version'
    )
    cp.set_defaults(handler="enshuffle.commands.chain:cmd_log")
    cp = csub.add_parser("verify", help="check every id, signature, parent link, the head log and the signing key")
    cp.add_argument("run_dir", metavar="RUN_DIR")
    cp.add_argument(
        "--key",
        metavar="FINGERPRINT",
        default=None,
        help="the coordinator key that must have signed the chain (default: this machine's coordinator key)",
    )
    cp.set_defaults(handler="enshuffle.commands.chain:cmd_verify")
    cp = csub.add_parser("export", help="write a version's weights as .npz")
    cp.add_argument("run_dir", metavar="RUN_DIR")
    cp.add_argument("--version", metavar="ID", default=None, help="version id or unique prefix (default: head)")
    cp.add_argument("--npz", metavar="FILE", required=True, help="the .npz file to write (w1, b1, w2, b2)")
    cp.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    cp.set_defaults(handler="enshuffle.commands.chain:cmd_export")
    return parser


class _SubParser(argparse.ArgumentParser):
    """Sub-command parsers: defaults shown in --help, like the top level."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", _SubParser)
        return super().add_subparsers(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        # Bare `enshuffle`: the list of commands, not an error.
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        # `enshuffle keys`, `enshuffle chain`: the list of their actions, not an error.
        getattr(args, "help_of", parser).print_help()
        return 0
    keep_freed_memory()  # every step's large arrays reuse the heap instead of faulting in afresh
    module_name, _, func_name = args.handler.partition(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(handler(args) or 0)
    except UsageError as exc:
        print(f"enshuffle {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"enshuffle {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `enshuffle ... | head`: the reader has gone, which is no error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
