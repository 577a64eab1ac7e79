"""`enshuffle chain log|verify|export RUN_DIR`: inspect a run's hash chain of model versions."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from enshuffle.chain import (
    EXPORT_NAMES,
    SHORT,
    TMP_PREFIX,
    Chain,
    ChainError,
    ChainIntegrityError,
    VersionInfo,
    VerifyReport,
    home_head_problem,
    short,
    trust_problem,
    weight_arrays,
)
from enshuffle.errors import UsageError
from enshuffle.protocol.keys import (
    KeyStoreError,
    enshuffle_home,
    fingerprint,
    key_path,
    load_or_create_identity,
    normalize_fingerprint,
)


def _open_for_cli(run_dir: str) -> Chain:
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"run directory {run_dir} does not exist; give the RUN_DIR a coordinator wrote (--out)")
    if not (path / "chain").is_dir():
        raise UsageError(
            f"{run_dir} has no chain/ directory: it is not a run directory, or no model "
            "version has been written to it yet"
        )
    return Chain(path)


def _log_line(info: VersionInfo) -> str:
    meta = info.metadata
    metrics = meta.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {}
    accuracy = metrics.get("test_accuracy", meta.get("test_accuracy"))
    created = meta.get("created")
    try:
        when = datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S")  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):  # not a time this machine can show
        when = "-"
    acc = f"{accuracy:.4f}" if isinstance(accuracy, (int, float)) else "-"
    return (
        f"{short(info.version_id)}  parent {short(info.parent_id):<{SHORT}}  "
        f"epoch {meta.get('epoch', '-')!s:>3}  step {meta.get('step', '-')!s:>6}  test_acc {acc}  {when}"
    )


def cmd_log(args) -> int:
    """`enshuffle chain log RUN_DIR [--json]`: the versions, newest first."""
    chain = _open_for_cli(args.run_dir)
    try:
        versions = chain.versions()
    except ChainError as exc:
        raise UsageError(str(exc)) from None
    versions.reverse()
    if not versions:
        try:
            logged = len(chain.head_log())
        except ChainError:
            logged = 0
        stored = len(chain.stored_ids())
        if stored or logged:
            # Versions on disk that HEAD does not reach: HEAD is missing or damaged, not an empty run.
            print(
                f"enshuffle chain log: {chain.dir} holds {stored} version director{'ies' if stored != 1 else 'y'} "
                f"and a head log of {logged} entr{'ies' if logged != 1 else 'y'}, but no HEAD leads to them; run "
                f"`enshuffle chain verify {args.run_dir}` to see what is wrong",
                file=sys.stderr,
            )
            return 1
    if args.json:  # JSON lines, as `train --json`: one object per version, each with its type
        for v in versions:
            print(
                json.dumps(
                    {"type": "version", "version_id": v.version_id, "parent_id": v.parent_id, "metadata": v.metadata}
                )
            )
    elif not versions:
        print(f"no model versions in {chain.dir} yet", file=sys.stderr)
    else:
        for info in versions:
            print(_log_line(info))
    return 0


def _this_machines_coordinator() -> tuple[str | None, Path]:
    """(fingerprint of this machine's coordinator key or None, its home). Never creates a key."""
    home = enshuffle_home()
    if not key_path("coordinator", home).is_file():
        return None, home
    try:
        return load_or_create_identity("coordinator", home).fingerprint, home
    except KeyStoreError:
        return None, home


def cmd_verify(args) -> int:
    """`enshuffle chain verify RUN_DIR [--key FP]`: 0 and 'ok: N versions verified, signed by ...', or 1
    naming what is wrong: a bad version, a rolled-back head, or a signing key that is not the expected one."""
    chain = _open_for_cli(args.run_dir)
    home = None
    expected: str | None
    if getattr(args, "key", None):
        try:
            expected = normalize_fingerprint(args.key)
        except KeyStoreError as exc:
            raise UsageError(f"--key: {exc}") from None
        whose = "the key given with --key"
    else:
        expected, home = _this_machines_coordinator()
        whose = "this machine's coordinator key"
    report = chain.verify(expected)
    if report.ok and home is not None:
        problem = home_head_problem(chain, home)
        if problem is not None:
            report = VerifyReport(False, report.checked, None, problem)
    if not report.ok:
        # The problem usually names the version itself: say it once.
        problem_text = report.problem or ""
        where = (
            f"version {report.first_bad}: "
            if report.first_bad and short(report.first_bad) not in problem_text and report.first_bad not in problem_text
            else ""
        )
        before = f" ({report.checked} versions verified before it)" if report.checked else ""
        print(f"FAILED: {where}{report.problem}{before}", file=sys.stderr)
        return 1
    key = chain.run_key()
    if key is None:
        print(f"ok: {report.checked} versions verified (the chain is empty)")
        return 0
    signed_by = fingerprint(bytes.fromhex(key))
    if expected is None:
        print(
            f"FAILED: every version checks out, but nothing says {signed_by}, the key that signed them, is the "
            f"right one: this machine has no coordinator key to compare with; pass --key FINGERPRINT (from "
            f"`enshuffle keys show` on the run's coordinator)",
            file=sys.stderr,
        )
        return 1
    print(f"ok: {report.checked} versions verified, signed by coordinator key {signed_by} ({whose})")
    return 0


def cmd_export(args) -> int:
    """`enshuffle chain export RUN_DIR [--version ID] --npz FILE`: write w1, b1, w2, b2, ... as a plain .npz."""
    chain = _open_for_cli(args.run_dir)
    # The checks of `chain verify` first: a chain re-signed by another key or rolled back is not
    # exported as if it were this coordinator's model.
    expected: str | None
    if getattr(args, "key", None):
        try:
            expected, home = normalize_fingerprint(args.key), None
        except KeyStoreError as exc:
            raise UsageError(f"--key: {exc}") from None
    else:
        expected, home = _this_machines_coordinator()
    try:
        problem = trust_problem(chain, expected, home)
    except ChainError as exc:
        problem = str(exc)
    if problem is not None:
        print(
            f"enshuffle chain export: FAILED: {problem}; nothing written (`enshuffle chain verify {args.run_dir}` "
            f"says the same)",
            file=sys.stderr,
        )
        return 1
    try:
        version_id = chain.resolve(args.version) if args.version else chain.head()
        if version_id is None:
            raise UsageError(f"{chain.dir} has no model version yet; nothing to export")
        arrays, _ = chain.load(version_id)
    except ChainIntegrityError as exc:
        print(f"enshuffle chain export: {exc}", file=sys.stderr)
        return 1
    except ChainError as exc:
        raise UsageError(str(exc)) from None
    names = weight_arrays(arrays)
    missing = [n for n in (*EXPORT_NAMES, *names) if n not in arrays]
    if missing:
        raise UsageError(
            f"version {short(version_id)} has no {', '.join(missing)}; it holds {', '.join(sorted(arrays))}"
        )
    target = Path(args.npz)
    if not target.parent.is_dir():
        raise UsageError(f"directory {target.parent} for --npz {args.npz} does not exist; create it first")
    if target.is_dir():
        raise UsageError(f"--npz {args.npz} is a directory; give a file name such as {target / 'model.npz'}")
    if target.exists() and not getattr(args, "force", False):
        raise UsageError(f"{args.npz} already exists; add --force to overwrite it, or choose another --npz")
    tmp = target.with_name(f"{TMP_PREFIX}{target.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as fh:  # a file object, so numpy does not append ".npz" to the name
            np.savez(fh, **{n: arrays[n] for n in names})  # type: ignore[arg-type]  # mypy matches **arrays against allow_pickle: bool
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise UsageError(f"cannot write {args.npz}: {exc.strerror}; choose a writable path") from None
    finally:
        tmp.unlink(missing_ok=True)
    signer_hex = chain.run_key()
    if expected is None and signer_hex is not None:
        print(
            f"enshuffle chain export: warning: this machine has no coordinator key, so nothing says "
            f"{fingerprint(bytes.fromhex(signer_hex))}, the key that signed this chain, is the right one "
            f"(pass --key FINGERPRINT where the export command takes it, or run `enshuffle chain verify --key`)",
            file=sys.stderr,
        )
    print(f"wrote {', '.join(names)} of version {short(version_id)} to {target}")
    return 0
