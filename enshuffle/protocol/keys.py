"""This machine's Ed25519 identities and the coordinators it has learned to trust.

Owns three things and nothing else:

* where enshuffle keeps its files (`enshuffle_home`);
* one private key per role ("coordinator", "node"), created on first use as an unencrypted
  PKCS#8 PEM file readable only by its owner, and the fingerprints people compare by eye;
* the trust store: the fingerprint each coordinator address presented the first time this node
  connected (trust on first use, as ssh's known_hosts), so a later change is noticed loudly.

Everything here is small and synchronous; the runtime calls it once at start-up and once per
WELCOME.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enshuffle.errors import UsageError

ROLES = ("coordinator", "node")
FINGERPRINT_PREFIX = "SHA256:"
TRUST_FILE_NAME = "known_coordinators.json"
_FINGERPRINT_BYTES = 20  # 160 bits of SHA-256: ample against second pre-images, short to read
_GROUP = 4  # characters per dash-separated group, for reading aloud


class KeyStoreError(UsageError):
    """A key or trust file that cannot be used; the message names the file and what to do.

    It is a UsageError so the command line prints it as one line with exit status 2.
    """


class FingerprintMismatch(KeyStoreError):
    """A coordinator presented a key other than the pinned or remembered one."""

    def __init__(self, message: str, *, address: str, expected: str, actual: str) -> None:
        super().__init__(message)
        self.address = address
        self.expected = expected
        self.actual = actual


def enshuffle_home() -> Path:
    """$ENSHUFFLE_HOME, else $XDG_CONFIG_HOME/enshuffle, else ~/.config/enshuffle."""
    explicit = os.environ.get("ENSHUFFLE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".config"
    return base / "enshuffle"


# --- fingerprints -------------------------------------------------------------------------


def fingerprint(public_bytes: bytes) -> str:
    """'SHA256:' + base32 of the first 20 bytes of SHA-256(raw 32-byte key), dash-grouped by 4."""
    if len(public_bytes) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(public_bytes)}")
    digest = hashlib.sha256(public_bytes).digest()[:_FINGERPRINT_BYTES]
    text = base64.b32encode(digest).decode("ascii")  # 20 bytes -> 32 chars, no padding
    return FINGERPRINT_PREFIX + "-".join(text[i : i + _GROUP] for i in range(0, len(text), _GROUP))


def short_fingerprint(fp: str) -> str:
    """The first two groups ('ABCD-EFGH'): for tables and logs, never for pinning."""
    body = fp[len(FINGERPRINT_PREFIX) :] if fp.startswith(FINGERPRINT_PREFIX) else fp
    return body[: 2 * _GROUP + 1]


def normalize_fingerprint(text: str) -> str:
    """Accept a pasted fingerprint in any case, with or without prefix, dashes or spaces.

    Raises KeyStoreError for anything that is not a full fingerprint: pinning a prefix would
    let an attacker grind a matching key.
    """
    body = text.strip()
    if body.upper().startswith(FINGERPRINT_PREFIX.upper()):
        body = body[len(FINGERPRINT_PREFIX) :]
    body = body.replace("-", "").replace(" ", "").replace(":", "").upper()
    try:
        raw = base64.b32decode(body) if len(body) == 32 else b""
    except ValueError:
        raw = b""
    if len(raw) != _FINGERPRINT_BYTES:
        raise KeyStoreError(
            f"{text!r} is not a full key fingerprint; expected 32 characters like "
            f"SHA256:ABCD-EFGH-...; copy it from `enshuffle keys show` on the coordinator"
        )
    return FINGERPRINT_PREFIX + "-".join(body[i : i + _GROUP] for i in range(0, 32, _GROUP))


# --- identities ----------------------------------------------------------------------------


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Identity:
    """One Ed25519 key pair: signs outgoing messages; `public_bytes` is what peers verify with."""

    private_key: Ed25519PrivateKey = field(repr=False)
    public_bytes: bytes
    fingerprint: str
    path: Path | None = None

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey, path: Path | None = None) -> "Identity":
        public = _raw_public(key)
        return cls(key, public, fingerprint(public), path)

    @classmethod
    def generate(cls) -> "Identity":
        """A fresh key kept only in memory (in-process runs and tests)."""
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @property
    def public_hex(self) -> str:
        return self.public_bytes.hex()

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature of `data`."""
        return self.private_key.sign(data)


@functools.lru_cache(maxsize=4096)
def _public_key(public_bytes: bytes) -> Ed25519PublicKey:
    """Parsed once per key (parsing cost more than the verification itself), bounded cache."""
    return Ed25519PublicKey.from_public_bytes(public_bytes)


def verify_signature(public_bytes: bytes, signature: bytes, data: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `data` by `public_bytes`."""
    try:
        _public_key(bytes(public_bytes)).verify(bytes(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def key_path(role: str, home: Path | None = None, name: str | None = None) -> Path:
    """`{role}_ed25519.pem`, or for a node started with --name NAME `node-NAME_ed25519.pem`: so
    several node processes on one machine (one home) each have their own key."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    base = home if home is not None else enshuffle_home()
    if name:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
        return base / f"{role}-{safe}_ed25519.pem"
    return base / f"{role}_ed25519.pem"


def _os_problem(exc: OSError) -> str:
    """'Permission denied' rather than '[Errno 13] Permission denied: ...' (we name the file)."""
    return exc.strerror or type(exc).__name__


_warned_homes: set[str] = set()


def _ensure_home(home: Path) -> None:
    # 0700 because the directory holds private keys; an existing directory is left as it is
    # (the user chose it), the key file's own mode is what we enforce.
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:  # e.g. ENSHUFFLE_HOME names a file, or a parent is not writable
        raise KeyStoreError(
            f"cannot use {home} as the enshuffle home ({_os_problem(exc)}); make it a directory "
            f"you can write to, or set ENSHUFFLE_HOME to one"
        ) from None
    warn_if_shared(home)


def warn_if_shared(home: Path) -> bool:
    """Say once on stderr if `home` is writable by other users: they could then replace its key
    files, trust file or invites. True if it is."""
    if os.name != "posix":
        return False
    try:
        mode = home.stat().st_mode
    except OSError:
        return False
    if not mode & 0o022:
        return False
    if str(home) not in _warned_homes:
        _warned_homes.add(str(home))
        print(
            f"enshuffle: warning: {home} is writable by other users (mode {stat.S_IMODE(mode):04o}): they could "
            f"replace its keys or trusted fingerprints; run `chmod 700 {home}`",
            file=sys.stderr,
            flush=True,
        )
    return True


def _check_private_mode(path: Path) -> None:
    if os.name != "posix":
        return  # Windows has no mode bits to check; ACLs are the user's business there
    try:
        st = path.stat()
    except OSError as exc:  # e.g. a dangling symbolic link at the key path
        raise KeyStoreError(
            f"key file {path} cannot be opened ({_os_problem(exc)}); if it is a broken link, "
            f"point it at the key or move it aside to create a new key"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyStoreError(f"key file {path} is not a regular file; move it aside and run again to create a new key")
    if st.st_mode & 0o077:
        raise KeyStoreError(
            f"key file {path} is readable or writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {path}` if you trust it, or move it aside to create a new key"
        )


def read_identity(path: Path) -> Identity:
    _check_private_mode(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyStoreError(
            f"key file {path} cannot be read ({_os_problem(exc)}); fix its owner or permissions "
            f"(it must be readable by you and nobody else), or move it aside to create a new key"
        ) from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyStoreError(
            f"key file {path} is not a readable unencrypted PEM private key ({exc}); restore it "
            f"from a backup, or move it aside to create a new key (peers will see a new fingerprint)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyStoreError(
            f"key file {path} holds a {type(key).__name__}, not an Ed25519 key; move it aside to create a new key"
        )
    return Identity.from_private_key(key, path)


def _create_identity(path: Path) -> None:
    """Write a new key atomically; if another process won the race, keep its key."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp uses 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)  # fails if the file exists: never overwrite a key
            except FileExistsError:
                pass  # another process won, or a (dangling) link sits there: reading it says which
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise KeyStoreError(
            f"cannot create key file {path} ({_os_problem(exc)}); make {path.parent} a directory "
            f"you can write to, or set ENSHUFFLE_HOME to one"
        ) from None


def load_or_create_identity(role: str, home: Path | None = None, name: str | None = None) -> Identity:
    """This machine's key for `role` ('coordinator' or 'node'; a node may have one per --name),
    created on first use."""
    path = key_path(role, home, name)
    _ensure_home(path.parent)
    if not os.path.lexists(path):  # lexists: a dangling link is reported, not written through
        _create_identity(path)
    return read_identity(path)


# --- trust on first use ----------------------------------------------------------------------


class TrustStore:
    """Fingerprints of coordinators this node has connected to, one per address (TOFU).

    The file is JSON: {"version": 1, "coordinators": {address: {"fingerprint", "first_seen"}}}.
    It is rewritten atomically (temporary file + rename) so a crash never leaves half a file.
    """

    def __init__(self, home: Path | None = None) -> None:
        self.path = (home if home is not None else enshuffle_home()) / TRUST_FILE_NAME

    def _load(self) -> dict[str, dict]:
        if os.name == "posix":
            try:
                st = self.path.lstat()
            except FileNotFoundError:
                return {}
            except OSError:
                st = None  # read_text below names the problem
            if st is not None and stat.S_ISREG(st.st_mode) and (st.st_uid != os.getuid() or st.st_mode & 0o022):
                raise KeyStoreError(
                    f"trust file {self.path} can be changed by another user (owner uid {st.st_uid}, mode "
                    f"{stat.S_IMODE(st.st_mode):04o}): its fingerprints cannot be trusted; check them, then "
                    f"`chmod 600 {self.path}` (owned by you), or move it aside to trust coordinators afresh"
                )
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError as exc:
            raise KeyStoreError(
                f"trust file {self.path} is damaged (not UTF-8 text: {exc.reason}); delete it to "
                f"trust coordinators afresh on their next connection"
            ) from None
        except OSError as exc:  # a directory, no permission, a parent that is a file, ...
            raise KeyStoreError(
                f"trust file {self.path} cannot be read ({_os_problem(exc)}); make it a readable "
                f"file, or move it aside to trust coordinators afresh on their next connection"
            ) from None
        try:
            doc = json.loads(text)
            entries = doc["coordinators"]
            if not isinstance(entries, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("fingerprint"), str) for v in entries.values()
            ):
                raise ValueError('entries must map an address to {"fingerprint": ...}')
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(
                f"trust file {self.path} is damaged ({exc}); delete it to trust coordinators "
                f"afresh on their next connection"
            ) from None
        return entries

    def _save(self, entries: dict[str, dict]) -> None:
        _ensure_home(self.path.parent)
        text = json.dumps({"version": 1, "coordinators": entries}, indent=2, sort_keys=True) + "\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        except OSError as exc:
            raise self._unwritable(exc) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._unwritable(exc) from None
            raise

    def _unwritable(self, exc: OSError) -> KeyStoreError:
        return KeyStoreError(
            f"trust file {self.path} cannot be written ({_os_problem(exc)}); make "
            f"{self.path.parent} writable and {self.path} a file (or absent), then run again"
        )

    def remembered(self, address: str) -> str | None:
        """The fingerprint stored for `address`, if any."""
        entry = self._load().get(address)
        return entry["fingerprint"] if entry else None

    def forget(self, address: str) -> bool:
        """Drop `address`'s entry (the operator really changed keys); True if there was one."""
        entries = self._load()
        if entries.pop(address, None) is None:
            return False
        self._save(entries)
        return True

    def _remember(self, entries: dict[str, dict], address: str, fp: str) -> None:
        entries[address] = {"fingerprint": fp, "first_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._save(entries)

    def check(self, address: str, fingerprint: str, pinned: str | None = None) -> str:
        """Accept or refuse the key a coordinator at `address` presented.

        Returns 'pinned' (matches --coordinator-key), 'known' (matches the remembered one) or
        'trusted-on-first-use' (first contact; now remembered). Raises FingerprintMismatch.
        """
        actual = normalize_fingerprint(fingerprint)
        entries = self._load()
        if pinned is not None:
            expected = normalize_fingerprint(pinned)
            if expected != actual:
                raise FingerprintMismatch(
                    f"coordinator {address} presented key {actual}, but --coordinator-key pins "
                    f"{expected}; do not connect unless the operator confirms the new key with "
                    f"`enshuffle keys show`, then pin that one",
                    address=address,
                    expected=expected,
                    actual=actual,
                )
            # An explicit pin is the user's word: it replaces whatever was remembered.
            if entries.get(address, {}).get("fingerprint") != actual:
                self._remember(entries, address, actual)
            return "pinned"
        remembered = entries.get(address, {}).get("fingerprint")
        if remembered is None:
            self._remember(entries, address, actual)
            return "trusted-on-first-use"
        if remembered != actual:
            raise FingerprintMismatch(
                f"coordinator {address} presented key {actual}, but {self.path} remembers "
                f"{remembered} for it: someone may be impersonating it. If the operator really "
                f"changed keys (check `enshuffle keys show` on the coordinator), delete the "
                f"{address!r} entry from {self.path} or pass --coordinator-key {actual}",
                address=address,
                expected=remembered,
                actual=actual,
            )
        return "known"


def node_keys(home: Path) -> list[tuple[str | None, Path]]:
    """Every node key file in `home`, as (the --name it serves or None, path); unnamed first."""
    found: list[tuple[str | None, Path]] = []
    for path in sorted(home.glob("node*_ed25519.pem")):
        stem = path.name[: -len("_ed25519.pem")]
        if stem == "node":
            found.append((None, path))
        elif stem.startswith("node-"):
            found.append((stem[len("node-") :], path))
    return sorted(found, key=lambda item: (item[0] is not None, item[0] or ""))
