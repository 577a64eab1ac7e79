"""Who may join: an allow-list file, invite codes, keys admitted automatically, or anyone (--open).

* `--allow FILE`: one fingerprint per line (`SHA256:ABCD-...`, any case, dashes optional),
  `#` starts a comment, blank lines are ignored. Re-read on SIGHUP (`reload()`); a file that
  has become unreadable or has a bad line keeps the previous list and says so.
* invite codes (`enshuffle invite`): kept in `invites.json` (mode 0600) in the coordinator's
  ENSHUFFLE_HOME. A node proves it holds a code without sending it: its HELLO carries
  `invite = {"id": SHA-256(code)[:16 hex], "proof": HMAC-SHA256(code, challenge || node_key)}`
  (hex), so a recorded HELLO reveals nothing reusable. A one-time code is consumed by its first
  use; the key it admitted is remembered in `invited_nodes` (one fingerprint per line) so that
  node can reconnect. Every code expires (INVITE_DAYS after it was made) and admits at most
  `max_keys` keys (one; REUSABLE_MAX_KEYS for --reusable), so one party holding a reusable code
  cannot mint keys without end, nor more sessions than that.
  A volunteer passes the code in ENSHUFFLE_INVITE or as `--invite @FILE`, so it is not in the
  node's command line (which every local user can read).
* `auto`: keys admitted by the program itself (`enshuffle train`'s local nodes).
* `open`: anyone; the coordinator says so loudly at start.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from enshuffle.protocol.handshake import invite_id, invite_proof
from enshuffle.batch import OPS
from enshuffle.protocol.keys import KeyStoreError, fingerprint, normalize_fingerprint, short_fingerprint
from enshuffle.protocol.messages import PROTOCOL_VERSION

INVITES_FILE = "invites.json"
INVITED_FILE = "invited_nodes"
INVITE_DAYS = 7  # an invite code is good for this long after `enshuffle invite`
REUSABLE_MAX_KEYS = 16  # keys one --reusable code may admit


def read_allow_file(path: Path) -> set[str]:
    """The fingerprints in an allow-list file; KeyStoreError naming the file and line if unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyStoreError(
            f"allow-list {path} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
            f"give a text file with one node fingerprint per line"
        ) from None
    allowed = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            allowed.add(normalize_fingerprint(entry))
        except KeyStoreError:
            raise KeyStoreError(
                f"allow-list {path} line {number}: {entry[:60]!r} is not a full key "
                f"fingerprint (copy it from `enshuffle keys show` on the node)"
            ) from None
    return allowed


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_invites(home: Path, include_used: bool = False) -> dict[str, dict]:
    """The invite codes in `home` that may still admit a node (with `include_used`, also the
    one-time codes already used, kept to tell a second node why it is refused)."""
    try:
        doc = json.loads((home / INVITES_FILE).read_text(encoding="utf-8"))
        invites = doc["invites"]
        return {
            k: v
            for k, v in invites.items()
            if isinstance(v, dict) and isinstance(v.get("code"), str) and (include_used or not v.get("used"))
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def invite_expires_at(entry: dict) -> float | None:
    """When an invite stops admitting: `expires_at` (every code has one, INVITE_DAYS by default)
    or `expires` (set by --expires), whichever comes first; None for a code written before codes
    expired."""
    times = [t for t in (entry.get("expires_at"), entry.get("expires")) if isinstance(t, (int, float))]
    return min(times) if times else None


def invite_expired(entry: dict, now: float | None = None) -> bool:
    expires = invite_expires_at(entry)
    return expires is not None and (time.time() if now is None else now) >= expires


def invite_problem(entry: dict, fp: str, now: float | None = None) -> str | None:
    """Why a valid invite code no longer admits key `fp` (used, expired, or its keys used up), or
    None. Entries written before these limits existed count as reusable-sized and never expire."""
    stored = entry.get("keys")
    keys: list = stored if isinstance(stored, list) else []
    if entry.get("used") and fp not in keys:
        return (
            f"this invite code was already used (by another node, {entry['used']}): each one-time "
            f"code admits one node; ask the operator for a new one (enshuffle invite)"
        )
    if invite_expired(entry, now):
        return "this invite code has expired; ask the operator for a new one (enshuffle invite)"
    given = entry.get("max_keys")
    limit: int = given if isinstance(given, int) else REUSABLE_MAX_KEYS
    if fp not in keys and len(keys) >= limit:
        return f"this invite code has admitted its {limit} node keys already; ask the operator for a new one"
    return None


def create_invite(home: Path, reusable: bool, expires_in: float | None = None) -> str:
    """A new invite code, stored in the coordinator's home; returns the code. It expires after
    INVITE_DAYS days, or `expires_in` seconds when given."""
    code = secrets.token_hex(16)
    invites = load_invites(home, include_used=True)
    now = time.time()
    invites[invite_id(code)] = {
        "code": code,
        "reusable": bool(reusable),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "expires_at": int(now + (expires_in if expires_in is not None else INVITE_DAYS * 86400)),
        "max_keys": REUSABLE_MAX_KEYS if reusable else 1,
        "keys": [],
    }
    write_private(home / INVITES_FILE, json.dumps({"version": 1, "invites": invites}, indent=2) + "\n")
    return code


def _keys(n: int) -> str:
    return f"{n} key{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class Admit:
    """A HELLO is welcomed: `how` says by what (open, local, allow-list, invited, invite code);
    `replaces` are the sessions of the same key it ends (the node reconnecting)."""

    how: str
    replaces: tuple = ()


@dataclass(frozen=True)
class Refuse:
    """A HELLO is refused with REFUSE `code` and `text` (for the node); `warn`, when set, is a line
    for the operator's log (a second process with a connected key)."""

    code: str
    text: str
    warn: str = ""


def decide(
    key: bytes,
    header: dict,
    challenge: str,
    *,
    admission,
    finished: bool,
    banned: bool,
    quarantine,
    twins,
    sessions: int,
    max_sessions: int,
    heartbeat_ms: int,
    now: float,
    address: str = "",
) -> Admit | Refuse:
    """Whether a verified HELLO from node `key` joins: `Admit`, or `Refuse(code, text)`.

    It reads only what it is given: `admission` (an `Admission`, or None to admit every key; its
    `check` may use up a one-time invite code, as it does whatever else refuses the HELLO),
    whether the run has `finished`, whether the key is `banned` (evicted) or under `quarantine`
    (its `reputation` record, or None), the live or joining sessions of the same key (`twins`:
    anything with `node_id`, `last_seen`, `address`, `label`), how many `sessions` there are in
    all against `max_sessions`, the heartbeat period and the time `now` (time.monotonic())."""
    fp = fingerprint(key)
    admitted, how = (True, "open") if admission is None else admission.check(key, header.get("invite"), challenge)
    twins = tuple(twins)
    refuse = None
    if header["protocol"] != PROTOCOL_VERSION:
        refuse = Refuse("version-mismatch", f"this coordinator speaks protocol {PROTOCOL_VERSION}")
    elif finished:
        refuse = Refuse("run-finished", "training has ended")
    elif banned:
        refuse = Refuse(
            "not-allowed", "this node was evicted from the run for sending malformed or unverifiable messages"
        )
    elif not admitted:
        why = getattr(admission, "refusal_text", None)
        refuse = Refuse(
            "not-allowed",
            why(key, header.get("invite"), challenge)
            if why
            else f"key {fp} is not admitted here: ask the operator to add it to the "
            f"coordinator's --allow file, or for an invite code (enshuffle invite)",
        )
    elif quarantine is not None:
        refuse = Refuse(
            "quarantined",
            f"this node's key is quarantined for this run ({quarantine.lies} wrong "
            f"results; last: {quarantine.reason[:200]}); ask the operator to re-admit it",
        )
    else:
        caps = header["capabilities"]
        ops = caps.get("ops") if isinstance(caps, dict) else None
        credit = caps.get("credit") if isinstance(caps, dict) else None
        if not isinstance(ops, list) or not set(OPS) <= set(ops) or not isinstance(credit, int) or credit < 1:
            refuse = Refuse("bad-hello", f"capabilities must list every op of {', '.join(OPS)} and a credit >= 1")
    if refuse is None and twins:
        live = twins[0]
        # A session still heard from recently is a second process with the same key (twins),
        # not this node reconnecting: refuse the newcomer and say where the other one is.
        # A node's own reconnect names the session it leaves (HELLO `replaces`, signed by the
        # key): it replaces that session even when its heartbeats are recent (the coordinator
        # was the silent one, busy with its own work).
        own = isinstance(header.get("replaces"), str) and header["replaces"] == live.node_id
        if not own and now - live.last_seen < 2 * heartbeat_ms / 1000:
            refuse = Refuse(
                "duplicate-key",
                f"another node with key {short_fingerprint(fp)} is already connected "
                f"(from {live.address or 'an unknown address'}, as {live.label}); "
                f"each node process needs its own key: give each a different --name "
                f"or ENSHUFFLE_HOME",
                warn=f"refused a second node with the key of {live.label} "
                f"({short_fingerprint(fp)}) from {address or 'unknown'}: the key is already "
                f"connected from {live.address or 'unknown'}; each process needs its own --name",
            )
    if refuse is None and sessions - len(twins) >= max_sessions:
        refuse = Refuse("busy", f"this coordinator takes at most {max_sessions} nodes")
    return refuse if refuse is not None else Admit(how, twins)


class Admission:
    """Decides whether a node key may join; `describe()` is the start-up line."""

    def __init__(
        self,
        *,
        allow_file: str | Path | None = None,
        open_: bool = False,
        home: Path | None = None,
        auto: set[bytes] | None = None,
    ) -> None:
        self.allow_file = Path(allow_file) if allow_file else None
        self.open = open_
        self.home = home
        self.auto = {fingerprint(k) for k in (auto or set())}
        self.allowed: set[str] = read_allow_file(self.allow_file) if self.allow_file else set()
        self.invited_by: dict[str, str] = {}  # fingerprint -> id of the invite code that admitted it
        self.invited: set[str] = self._read_invited()

    def _read_invited(self) -> set[str]:
        if self.home is None or not (self.home / INVITED_FILE).exists():
            return set()
        try:
            invited = read_allow_file(self.home / INVITED_FILE)
            for line in (self.home / INVITED_FILE).read_text(encoding="utf-8").splitlines():
                entry, _, comment = line.partition("#")
                words = comment.split()
                if len(words) == 2 and words[0] == "invite":
                    try:
                        self.invited_by[normalize_fingerprint(entry.strip())] = words[1]
                    except KeyStoreError:
                        pass
            return invited
        except (KeyStoreError, OSError, UnicodeDecodeError):
            return set()

    def group_of(self, key: bytes) -> str | None:
        """The party a key belongs to for the exposure bound: the invite code that admitted it
        (every key of one code counts as one node), or None."""
        ident = self.invited_by.get(fingerprint(key))
        return f"invite {ident}" if ident else None

    def admit_key(self, key: bytes) -> None:
        self.auto.add(fingerprint(key))

    def reload(self) -> str:
        """Re-read the allow-list (SIGHUP); one line saying what happened."""
        self.invited = self._read_invited()
        if self.allow_file is None:
            return "admission: no --allow file to re-read"
        try:
            self.allowed = read_allow_file(self.allow_file)
        except KeyStoreError as exc:
            return f"admission: {exc}; keeping the previous list of {_keys(len(self.allowed))}"
        return f"admission: re-read {self.allow_file}: {_keys(len(self.allowed))} allowed"

    def describe(self) -> str:
        if self.open:
            return "admission: OPEN (--open): ANY node key may join and receive data"
        parts = []
        if self.allow_file:
            parts.append(f"{_keys(len(self.allowed))} from {self.allow_file}")
        if self.home is not None:
            invited = len(self.invited)
            parts.append(f"invite codes (enshuffle invite), {invited} invited key{'s' if invited != 1 else ''}")
        if self.auto:
            parts.append(f"{len(self.auto)} local nodes")
        return "admission: " + (
            ", ".join(parts) if parts else "nobody yet (use --allow FILE, enshuffle invite or --open)"
        )

    def check(self, key: bytes, invite, challenge: str) -> tuple[bool, str]:
        """(admitted, how) for a verified HELLO's node key and its optional `invite` field."""
        fp = fingerprint(key)
        if self.open:
            return True, "open"
        if fp in self.auto:
            return True, "local"
        if fp in self.allowed:
            return True, "allow-list"
        if fp in self.invited:
            return True, "invited"
        if isinstance(invite, dict) and self.home is not None:
            ident, proof = invite.get("id"), invite.get("proof")
            if isinstance(ident, str) and isinstance(proof, str) and len(proof) == 64:
                entry = load_invites(self.home).get(ident)
                if entry and hmac.compare_digest(invite_proof(entry["code"], challenge, key.hex()), proof):
                    problem = invite_problem(entry, fp)
                    if problem is not None:
                        return False, problem
                    self._use_invite(ident, entry, fp)
                    return True, "invite code"
        return False, ""

    def refusal_text(self, key: bytes, invite, challenge: str) -> str:
        """Why `check` refused this key, in words for the node: its invite was already used, is
        not one of this home's, or it brought none."""
        fp = fingerprint(key)
        if isinstance(invite, dict) and self.home is not None:
            ident, proof = invite.get("id"), invite.get("proof")
            entry = load_invites(self.home, include_used=True).get(ident) if isinstance(ident, str) else None
            proven = (
                entry is not None
                and isinstance(proof, str)
                and hmac.compare_digest(invite_proof(entry["code"], challenge, key.hex()), proof)
            )
            problem = invite_problem(entry, fp) if proven and entry is not None else None
            if problem is not None:
                return problem
            return (
                "the invite code is not one this coordinator made (mistyped, from another coordinator, or "
                "removed): ask the operator for a new one (enshuffle invite)"
            )
        return (
            f"key {fp} is not admitted here: ask the operator to add it to the coordinator's --allow file, "
            f"or for an invite code (enshuffle invite)"
        )

    def _use_invite(self, ident: str, entry: dict, fp: str) -> None:
        home = self.home
        assert home is not None  # invite codes are read from the home
        self.invited.add(fp)
        self.invited_by[fp] = ident
        try:
            with open(home / INVITED_FILE, "a", encoding="utf-8") as fh:
                fh.write(f"{fp}  # invite {ident}\n")
            os.chmod(home / INVITED_FILE, 0o600)
            invites = load_invites(home, include_used=True)  # used codes are kept, to say why they refuse
            if not entry.get("reusable"):
                # Kept, marked used, so a second node presenting it is told why it is refused.
                if ident in invites:
                    invites[ident] = dict(
                        invites[ident], used=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), keys=[fp]
                    )
            elif ident in invites:
                stored = invites[ident].get("keys")
                known: list = stored if isinstance(stored, list) else []
                invites[ident]["keys"] = sorted(set(known) | {fp})
            write_private(home / INVITES_FILE, json.dumps({"version": 1, "invites": invites}, indent=2) + "\n")
        except OSError:
            pass  # admitted for this process at least; the operator sees the key in the log
