"""`enshuffle invite`: make an invite code for a volunteer and print the node command; list or
revoke this home's codes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from enshuffle.coordinator.admission import (
    INVITE_DAYS,
    INVITED_FILE,
    INVITES_FILE,
    REUSABLE_MAX_KEYS,
    create_invite,
    invite_expired,
    invite_expires_at,
    invite_id,
    load_invites,
    write_private,
)
from enshuffle.errors import UsageError
from enshuffle.protocol.keys import enshuffle_home, load_or_create_identity


def _list_invites(home: Path) -> int:
    invites = load_invites(home, include_used=True)
    if not invites:
        print(f"no invite codes in {home / INVITES_FILE}")
        return 0
    now = time.time()
    for ident, entry in sorted(invites.items(), key=lambda kv: kv[1].get("created", "")):
        if entry.get("used"):
            state = f"used {entry['used']}"
        elif invite_expired(entry, now):
            state = "expired"
        elif invite_expires_at(entry) is not None:
            state = "valid until " + time.strftime("%Y-%m-%d %H:%M", time.localtime(invite_expires_at(entry)))
        else:
            state = "valid"
        kind = "reusable" if entry.get("reusable") else "one-time"
        print(f"{ident}  {kind:8}  created {entry.get('created', '?')}  {state}")
    print(f"(revoke one with `enshuffle invite --revoke ID`; keys an invite admitted stay in {home / INVITED_FILE})")
    return 0


def _revoke_invite(home: Path, which: str) -> int:
    invites = load_invites(home, include_used=True)
    ident = which if which in invites else invite_id(which) if which.isascii() else which
    if ident not in invites:
        print(
            f"enshuffle invite: no invite {which!r} in {home / INVITES_FILE} (see `enshuffle invite --list`)",
            file=sys.stderr,
        )
        return 1
    del invites[ident]
    write_private(home / INVITES_FILE, json.dumps({"version": 1, "invites": invites}, indent=2) + "\n")
    print(f"revoked invite {ident}: it admits no new node (keys it admitted stay in {home / INVITED_FILE})")
    return 0


def cmd_invite(args) -> int:
    """`enshuffle invite`: a code for one node (or --reusable), and the exact node command;
    --list and --revoke manage the codes."""
    home = enshuffle_home()
    if getattr(args, "list", False):
        return _list_invites(home)
    if getattr(args, "revoke", None):
        return _revoke_invite(home, args.revoke)
    identity = load_or_create_identity("coordinator", home)
    try:
        code = create_invite(home, args.reusable, getattr(args, "expires", None))
    except OSError as exc:
        raise UsageError(f"cannot write {home / INVITES_FILE} ({exc.strerror}); make {home} writable") from None
    connect = args.connect
    if connect is None:  # this machine as volunteers may reach it (THIS_HOST when it has no address)
        from enshuffle.coordinator.addresses import volunteer_addresses  # only when no --connect is given

        connect = volunteer_addresses("tcp://0.0.0.0:5555")[0]
    kind = "reusable" if args.reusable else "one-time"
    print(f"{kind} invite code: {code}")
    print("on the volunteer's machine run:")
    print(f"    ENSHUFFLE_INVITE={code} enshuffle node --connect {connect} --coordinator-key {identity.fingerprint}")
    print(
        "(in the environment, the code stays out of the node's command line, which other local users can "
        "read; `--invite @FILE` reads it from a file)"
    )
    if args.connect is None:
        print(
            "(the address is this machine's as far as it knows; give --connect tcp://HOST:PORT for the one "
            "volunteers reach, e.g. behind NAT)"
        )
    days = f"{INVITE_DAYS} days" if getattr(args, "expires", None) is None else "the time --expires gave"
    print(
        f"(the code works with any coordinator started with this ENSHUFFLE_HOME for {days}; "
        + (
            f"it admits up to {REUSABLE_MAX_KEYS} node keys; delete it from "
            if args.reusable
            else "it is used up by the first node; see "
        )
        + f"{home / INVITES_FILE})"
    )
    sys.stdout.flush()
    return 0
