"""The node's invite code, from --invite CODE, --invite @FILE or ENSHUFFLE_INVITE (no numpy here:
the headless node reads it before its BLAS is configured)."""

from __future__ import annotations

import os

from enshuffle.errors import UsageError

INVITE_ENV = "ENSHUFFLE_INVITE"


def resolve_invite(value: str | None) -> str | None:
    """The invite code: `value` itself, the first line of FILE for `@FILE`, or (no --invite) the
    ENSHUFFLE_INVITE environment variable. A code given on the command line can be read by every
    local user (/proc/PID/cmdline); the environment and a 0600 file cannot."""
    if value is None:
        value = os.environ.get(INVITE_ENV) or None
    if value is not None and value.startswith("@"):
        path = value[1:]
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"--invite {value}: cannot read the invite code from {path} ({getattr(exc, 'strerror', None) or exc})"
            ) from None
        if not value:
            raise UsageError(f"--invite @{path}: the file is empty; put the code from `enshuffle invite` in it")
    return value
