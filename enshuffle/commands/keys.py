"""`enshuffle keys show|forget`: this machine's keys and the coordinators its nodes trust."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from enshuffle.protocol.keys import (
    TRUST_FILE_NAME,
    TrustStore,
    enshuffle_home,
    key_path,
    load_or_create_identity,
    node_keys,
    read_identity,
)


def _key_line(path: Path) -> str:
    return f"{read_identity(path).fingerprint}  {path}"  # a bad file: a one-line error (exit 2)


def cmd_keys_show(args) -> int:
    """`enshuffle keys show`: every key in this home with the --name it serves (nothing is
    created unless --create), and which key `enshuffle node --name NAME` uses."""
    home = enshuffle_home()
    name = getattr(args, "name", None)
    if getattr(args, "create", False):
        for role, role_name in (("coordinator", None), ("node", name)):
            path = key_path(role, home, role_name)
            if not os.path.lexists(path):
                load_or_create_identity(role, home, role_name)
                print(f"created {path}")
    print(f"enshuffle home:  {home}")
    coordinator = key_path("coordinator", home)
    if coordinator.exists():
        ident = read_identity(coordinator)  # a bad file is a one-line error (exit 2)
        print(f"coordinator key: {ident.fingerprint}  {coordinator}")
    else:
        print(
            "coordinator key: none yet (the first `enshuffle coordinator` or `enshuffle invite` creates it; "
            "`enshuffle keys show --create` does now)"
        )
    keys = node_keys(home) if home.is_dir() else []
    if keys:
        print(f"node key{'s' if len(keys) != 1 else ''}:")
        for key_name, path in keys:
            label = f"--name {key_name}" if key_name is not None else "(no --name)"
            print(f"  {label:18} {_key_line(path)}")
    else:
        print("node keys:       none yet (the first `enshuffle node` creates one per --name)")
    if name is not None:
        path = key_path("node", home, name)
        if path.exists():
            print(f"`enshuffle node --name {name}` uses {read_identity(path).fingerprint}  ({path})")
        else:
            print(
                f"`enshuffle node --name {name}` has no key yet: it will create {path} on its first start "
                f"(`enshuffle keys show --name {name} --create` does now)"
            )
    elif keys and keys[0][0] is None:
        print("`enshuffle node` without --name uses the (no --name) key; each --name has its own")
    print(f"trusted coordinators: {home / TRUST_FILE_NAME}")
    sys.stdout.flush()
    return 0


def cmd_keys_forget(args) -> int:
    """`enshuffle keys forget ADDRESS`: drop the trusted coordinator fingerprint kept for ADDRESS."""
    store = TrustStore(enshuffle_home())
    known = store.remembered(args.address)
    if known is None:
        print(f"no coordinator key is remembered for {args.address} (in {store.path})", file=sys.stderr)
        return 1
    store.forget(args.address)
    print(
        f"forgot {known} for {args.address}; the next `enshuffle node --connect {args.address}` trusts the key "
        f"it sees (pin it with --coordinator-key)"
    )
    return 0
