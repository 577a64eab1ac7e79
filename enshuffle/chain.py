"""The hash chain of model versions: how a run's versions are stored, linked, signed and checked.

The coordinator appends a model version after every epoch (or every N steps). This module owns
everything under RUN_DIR/chain/:

    RUN_DIR/chain/
        KEY                 the run's coordinator public key (64 hex chars), written at first append
        HEAD                the id of the newest version (64 hex chars)
        LOCK                taken (flock) by the one writer while it appends
        <version id>/       one directory per version, named by its full id
            version.json    id, parent id, coordinator key, metadata, array manifest, signature
            0.bin, 1.bin..  each array's raw C-order bytes, in array-name order

A version id is the SHA-256 (hex) of one canonical JSON document (sorted keys, compact, no NaN):
the format tag, the parent id, the coordinator public key, the metadata, and for every array in
name order its name, dtype, shape and the SHA-256 of its raw bytes. Changing any array byte, any
metadata value, the parent link or the signer therefore changes the id. The coordinator signs
(Ed25519) a domain-separated message built from the id, so a batch signature made with the same key
can never pass for a version signature.

Writes are atomic: a version is written into a temp directory inside chain/, fsynced, renamed
into place, and only then HEAD is replaced (temp file + os.replace). A crash leaves either the old
head or the new one; leftovers whose names start with ".tmp-" are ignored by readers and removed by
the next append. Arrays are raw bytes read with numpy.frombuffer: nothing is ever unpickled.

Besides HEAD, every append adds one line to chain/HEADS, the signed, append-only head log:
`{"n": index, "head": id, "epoch": e, "step": s, "prev": SHA-256 of the previous line}` plus an
Ed25519 signature (domain-separated from version signatures). `verify` checks every line's
signature and link and that HEAD's chain contains the newest logged head (HEAD may be one
version ahead: a crash between the two writes; the next append logs it).

What the chain proves: every version reachable from HEAD is exactly what the run's coordinator key
signed, in that order, and (with `verify(expected_key=...)`, `chain verify --key FP`) that the
key is the one the verifier expects. What the head log adds, and where it stops:

* detected: HEAD rolled back or pointed at an older version; the newest versions deleted;
  HEAD deleted while versions exist; HEADS edited, re-ordered, truncated in the middle or
  deleted; a chain re-signed with another key (its fingerprint is not the expected one);
* not detected from the run directory alone: HEAD *and* HEADS rolled back together to an
  earlier consistent state (an old backup of the whole run directory). The coordinator keeps
  the newest log line in its own home too (`record_head_in_home`), so `chain verify` on the
  coordinator's machine catches that as well; elsewhere, compare the head id with the operator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from enshuffle.protocol.keys import fingerprint

try:  # only the writer locks; fcntl is absent on Windows, where one writer is assumed
    import fcntl
except ImportError:  # pragma: no cover - not on this platform
    fcntl = None  # type: ignore[assignment]  # checked before use

FORMAT = "enshuffle-chain/1"
SIGNING_PREFIX = b"enshuffle model version v1\x00"
HEAD_LOG_PREFIX = b"enshuffle head log v1\x00"
HEAD_LOG = "HEADS"
SHORT = 12  # hex chars shown for an id
EXPORT_NAMES = ("w1", "b1", "w2", "b2")  # at least; a deeper network adds w3, b3, ...


def weight_arrays(arrays: dict) -> list[str]:
    """The weight names a version holds, layer by layer: w1, b1, w2, b2, ... (no optimizer state)."""
    layers = sorted({int(n[1:]) for n in arrays if n[:1] in "wb" and n[1:].isdigit()})
    return [f"{kind}{l}" for l in layers for kind in ("w", "b")]


TMP_PREFIX = ".tmp-"
_RECORD = "version.json"
_ID_RE = re.compile(r"[0-9a-f]{64}")
_HEX_RE = re.compile(r"[0-9a-f]+")
_ARRAY_KINDS = "biufc"  # bool, ints, floats, complex: plain bytes, nothing that needs pickle


class ChainError(Exception):
    """A chain that cannot be read or written; the message names the file or version and what to do."""


class ChainIntegrityError(ChainError):
    """A stored version does not match its id, signature or the run's key (tampering or corruption)."""


@dataclass(frozen=True)
class VersionInfo:
    version_id: str
    parent_id: str | None
    metadata: dict


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checked: int
    first_bad: str | None
    problem: str | None


def short(version_id: str | None) -> str:
    """The short form of an id shown to people ('-' for no id)."""
    return version_id[:SHORT] if version_id else "-"


def signing_message(version_id: str) -> bytes:
    """The bytes the coordinator signs for a version: a fixed domain prefix plus the hex id."""
    return SIGNING_PREFIX + version_id.encode("ascii")


def canonical_json(value) -> bytes:
    """Canonical JSON bytes: sorted keys, compact, UTF-8, numpy scalars as plain numbers, no NaN."""

    def plain(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            raise TypeError("a numpy array (store arrays in the arrays dict, not in metadata)")
        raise TypeError(f"a {type(obj).__name__}")

    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=plain
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ChainError(
            f"metadata cannot be stored in a model version: {exc}; use only JSON values "
            "(dict with string keys, list, str, finite numbers, bool, None)"
        ) from None


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 (hex) of an array's raw C-order bytes."""
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def manifest_of(arrays: dict[str, np.ndarray]) -> list[dict]:
    """The array manifest that goes into the id: name, dtype, shape, sha256, in name order."""
    out = []
    for name in sorted(arrays):
        a = arrays[name]
        out.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "sha256": array_sha256(a)})
    return out


def compute_id(parent_id: str | None, coordinator_key: str, metadata: dict, manifest: list[dict]) -> str:
    """The version id: SHA-256 (hex) of the canonical JSON of everything a version is."""
    document = {
        "format": FORMAT,
        "parent_id": parent_id,
        "coordinator_key": coordinator_key,
        "metadata": metadata,
        "arrays": manifest,
    }
    return hashlib.sha256(canonical_json(document)).hexdigest()


def _check_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(arrays, dict) or not arrays:
        raise ChainError("a model version needs a non-empty dict of named numpy arrays")
    checked = {}
    for name, a in arrays.items():
        if not isinstance(name, str) or not name:
            raise ChainError(f"array name {name!r} is not a non-empty string")
        a = np.asarray(a)
        if a.dtype.kind not in _ARRAY_KINDS or a.dtype.fields is not None:
            raise ChainError(
                f"array {name!r} has dtype {a.dtype}, which cannot be stored as raw bytes; "
                "use a bool, integer, float or complex array"
            )
        checked[name] = a
    return checked


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _replace_text(directory: Path, name: str, text: str) -> None:
    """Atomically replace directory/name with text (temp file, fsync, os.replace, fsync dir)."""
    tmp = directory / f"{TMP_PREFIX}{name}-{secrets.token_hex(6)}"
    _write_file(tmp, text.encode("ascii"))
    os.replace(tmp, directory / name)
    _fsync_dir(directory)


def _public_key_bytes(signer) -> bytes:
    key = getattr(signer, "public_bytes", None)
    if callable(key):
        key = key()
    if not isinstance(key, (bytes, bytearray)) or len(key) != 32:
        raise ChainError(
            f"the signer's public_bytes must be the 32-byte raw Ed25519 public key; got {type(key).__name__}"
        )
    return bytes(key)


class Chain:
    """One run's chain of model versions in RUN_DIR/chain. Reading needs no key; appending needs a signer."""

    def __init__(self, run_dir, signer=None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "chain"
        self.signer = signer
        self._records: dict[str, dict] = {}  # id -> parsed record; ids are content hashes
        self.last_log_entry: dict | None = None  # the head log line of the last append

    # ----- reading

    def _require_run_dir(self) -> None:
        if not self.run_dir.is_dir():
            raise ChainError(
                f"run directory {self.run_dir} does not exist; give the RUN_DIR a coordinator wrote (--out)"
            )

    def _read_head_text(self) -> str | None:
        self._require_run_dir()
        try:
            return (self.dir / "HEAD").read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ChainError(
                f"{self.dir / 'HEAD'} cannot be read ({exc.strerror}); it should be a file "
                f"holding the newest version's id"
            ) from None

    def head(self) -> str | None:
        """The newest version's id, or None for a chain with no version yet."""
        text = self._read_head_text()
        if text is None:
            return None
        if not _ID_RE.fullmatch(text):
            raise ChainError(
                f"{self.dir / 'HEAD'} does not hold a version id (got {text[:40]!r}); "
                f"run `enshuffle chain verify {self.run_dir}`"
            )
        return text

    def run_key(self) -> str | None:
        """The run's coordinator public key (hex) from chain/KEY, or None before the first append."""
        try:
            text = (self.dir / "KEY").read_text(encoding="ascii", errors="replace").strip()
        except FileNotFoundError:
            return None
        if not (len(text) == 64 and _HEX_RE.fullmatch(text)):
            raise ChainError(f"{self.dir / 'KEY'} does not hold a 64-hex-digit public key (got {text[:40]!r})")
        return text

    def _read_record(self, version_id: str) -> dict:
        """Parse a version's version.json (no integrity check). FileNotFoundError if the version is absent."""
        path = self.dir / version_id / _RECORD
        if not (self.dir / version_id).is_dir():
            raise FileNotFoundError(path)
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise ChainIntegrityError(f"version {short(version_id)}: {path} is missing") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ChainIntegrityError(
                f"version {short(version_id)}: {path} is not valid JSON ({type(exc).__name__})"
            ) from None
        problem = _record_shape_problem(record)
        if problem:
            raise ChainIntegrityError(f"version {short(version_id)}: {path} {problem}")
        if record["version_id"] != version_id:
            raise ChainIntegrityError(
                f"version {short(version_id)}: {path} claims id {short(record['version_id'])}, "
                "not the id it is stored under"
            )
        return record

    def _cached_record(self, version_id: str) -> dict:
        if version_id not in self._records:
            self._records[version_id] = self._read_record(version_id)
        return self._records[version_id]

    def versions(self) -> list[VersionInfo]:
        """Every version from genesis to head (oldest first), following parent links from HEAD."""
        out: list[VersionInfo] = []
        current, seen = self.head(), set()
        while current is not None:
            if current in seen:
                raise ChainError(f"parent links in {self.dir} form a loop; run `enshuffle chain verify {self.run_dir}`")
            seen.add(current)
            try:
                record = self._cached_record(current)
            except FileNotFoundError:
                child = f" (parent of {short(out[-1].version_id)})" if out else " (HEAD)"
                raise ChainError(
                    f"version {short(current)}{child} is missing from {self.dir}; "
                    f"run `enshuffle chain verify {self.run_dir}`"
                ) from None
            out.append(VersionInfo(current, record["parent_id"], record["metadata"]))
            current = record["parent_id"]
        out.reverse()
        return out

    def stored_ids(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if _ID_RE.fullmatch(p.name) and p.is_dir())

    def resolve(self, id_or_prefix: str) -> str:
        """The full id of the one stored version whose id starts with id_or_prefix."""
        self._require_run_dir()
        prefix = id_or_prefix.strip().lower()
        if not prefix or not _HEX_RE.fullmatch(prefix):
            raise ChainError(
                f"{id_or_prefix!r} is not a version id or prefix (hex digits, as `enshuffle chain log` shows)"
            )
        matches = [v for v in self.stored_ids() if v.startswith(prefix)]
        if not matches:
            raise ChainError(
                f"no version in {self.dir} starts with {prefix!r}; see `enshuffle chain log {self.run_dir}`"
            )
        if len(matches) > 1:
            shown = ", ".join(short(m) for m in matches[:5])
            raise ChainError(f"{prefix!r} matches {len(matches)} versions ({shown}); give more digits")
        return matches[0]

    def load(self, version_id: str) -> tuple[dict[str, np.ndarray], dict]:
        """A version's arrays and metadata, after checking its key, id, signature and array hashes."""
        version_id = self.resolve(version_id)
        try:
            record = self._read_record(version_id)
        except FileNotFoundError:
            raise ChainError(f"version {short(version_id)} is missing from {self.dir}") from None
        problem = self._content_problem(version_id, record, self.run_key())
        if problem is None:
            arrays, problem = self._read_arrays(version_id, record)
        if problem is not None:
            raise ChainIntegrityError(
                f"version {short(version_id)} in {self.dir}: {problem}; "
                "it was modified or corrupted: do not use it, restore the run directory from a copy"
            )
        return arrays, record["metadata"]

    # ----- checking

    def _content_problem(self, version_id: str, record: dict, run_key: str | None) -> str | None:
        """What is wrong with a version's record (key, id, signature), or None. Arrays are checked apart."""
        if run_key is None:
            return f"the run's key file {self.dir / 'KEY'} is missing, so no signature can be checked"
        if record["coordinator_key"] != run_key:
            return (
                f"it is signed by key {record['coordinator_key'][:16]}..., not the run's coordinator "
                f"key {run_key[:16]}... (from {self.dir / 'KEY'})"
            )
        recomputed = compute_id(record["parent_id"], record["coordinator_key"], record["metadata"], record["arrays"])
        if recomputed != version_id:
            return (
                f"its metadata, parent link or array list was modified: the record hashes to "
                f"{short(recomputed)}, not to its id"
            )
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(run_key)).verify(
                bytes.fromhex(record["signature"]), signing_message(version_id)
            )
        except (InvalidSignature, ValueError):
            return "its signature does not verify with the run's coordinator key (forged or corrupted)"
        return None

    def _read_arrays(self, version_id: str, record: dict) -> tuple[dict[str, np.ndarray], str | None]:
        """Read and hash-check every array of a version: (arrays, None) or ({}, problem)."""
        arrays = {}
        for index, entry in enumerate(record["arrays"]):
            path = self.dir / version_id / f"{index}.bin"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return {}, f"array file {path.name} ({entry['name']!r}) is missing"
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                return {}, (
                    f"array {entry['name']!r} ({path.name}) was modified: its bytes do not match "
                    "the SHA-256 recorded in the version"
                )
            try:
                dtype = np.dtype(entry["dtype"])
                if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
                    raise TypeError(dtype)
                # copy: frombuffer over bytes is read-only, and callers (a resumed run) update in place
                arrays[entry["name"]] = np.frombuffer(data, dtype=dtype).reshape(entry["shape"]).copy()
            except (TypeError, ValueError):
                return {}, f"array {entry['name']!r} has an unusable dtype/shape {entry['dtype']}/{entry['shape']}"
        return arrays, None

    def verify(self, expected_fingerprint: str | None = None) -> VerifyReport:
        """Check HEAD, then every version from genesis to head (key, id, signature, arrays, parent
        link), then the head log. `expected_fingerprint`: the coordinator key that must have signed."""
        try:
            report = self._verify_versions(expected_fingerprint)
        except ChainError as exc:  # whatever a malformed file raises, a report names it
            return VerifyReport(False, 0, None, str(exc))
        return report

    def _verify_versions(self, expected_fingerprint: str | None) -> VerifyReport:
        head_text = self._read_head_text()
        if head_text is None:
            stored = self.stored_ids()
            if stored or (self.dir / HEAD_LOG).exists():
                return VerifyReport(
                    False,
                    0,
                    None,
                    f"the HEAD file {self.dir / 'HEAD'} is missing, but {len(stored)} versions are "
                    f"stored: the chain's head was removed; restore the run directory from a copy",
                )
            return VerifyReport(True, 0, None, None)
        if not _ID_RE.fullmatch(head_text):
            return VerifyReport(
                False, 0, head_text[:SHORT] or None, f"the HEAD file {self.dir / 'HEAD'} does not hold a version id"
            )
        try:
            run_key = self.run_key()
        except ChainError as exc:
            return VerifyReport(False, 0, short(head_text), str(exc))

        # Walk from HEAD to genesis, remembering each version's record (or why it is unreadable).
        walk: list[tuple[str, dict | None, str | None]] = []
        current, seen = head_text, set()
        while current is not None:
            if current in seen:
                return VerifyReport(False, 0, short(current), "parent links form a loop")
            seen.add(current)
            try:
                record = self._read_record(current)
            except FileNotFoundError:
                if not walk:
                    return VerifyReport(
                        False,
                        0,
                        short(current),
                        f"HEAD points at version {short(current)}, which is missing from {self.dir}",
                    )
                walk.append((current, None, "missing"))
                break
            except ChainError as exc:
                walk.append((current, None, str(exc)))
                break
            walk.append((current, record, None))
            current = record["parent_id"]
        walk.reverse()  # oldest first

        checked = 0
        for position, (version_id, entry, read_problem) in enumerate(walk):
            if read_problem == "missing":
                child = walk[position + 1][0]
                return VerifyReport(
                    False, checked, short(child), f"its parent version {short(version_id)} is missing from {self.dir}"
                )
            if read_problem is not None:
                return VerifyReport(False, checked, short(version_id), read_problem)
            assert entry is not None  # a record was read exactly when there is no read problem
            problem = self._content_problem(version_id, entry, run_key)
            if problem is None:
                _, problem = self._read_arrays(version_id, entry)
            if problem is not None:
                return VerifyReport(False, checked, short(version_id), problem)
            checked += 1
        problem = self._head_log_problem([v for v, _, _ in walk], run_key)
        if problem is not None:
            return VerifyReport(False, checked, None, problem)
        if expected_fingerprint is not None and run_key is not None:
            signed_by = fingerprint(bytes.fromhex(run_key))
            if signed_by != expected_fingerprint:
                return VerifyReport(
                    False,
                    checked,
                    None,
                    f"the chain is signed by coordinator key {signed_by}, not the expected "
                    f"{expected_fingerprint}: it was re-signed or is another run's; do not trust it",
                )
        return VerifyReport(True, checked, None, None)

    # ----- the head log

    def head_log(self) -> list[dict]:
        """The parsed lines of chain/HEADS (no signature check); [] if there is none."""
        try:
            text = (self.dir / HEAD_LOG).read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as exc:
            raise ChainError(f"{self.dir / HEAD_LOG} cannot be read ({exc})") from None
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                raise ChainError(f"{self.dir / HEAD_LOG} line {number} is not valid JSON") from None
            entries.append(entry)
        return entries

    def _head_log_problem(self, chain_ids: list[str], run_key: str | None) -> str | None:
        """Why the head log does not vouch for this HEAD (rolled back, truncated, forged), or None."""
        path = self.dir / HEAD_LOG
        entries = self.head_log()
        if not entries and len(chain_ids) == 1 and not path.exists():
            return None  # a crash between the first HEAD and its log line: the next append logs it
        if not entries:
            return (
                f"the head log {path} is missing or empty, but the chain has {len(chain_ids)} versions: "
                f"it was removed, so dropped versions could not be noticed; restore the run directory"
            )
        assert run_key is not None  # every version's signature was checked against it first
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(run_key))
        prev = None
        for index, entry in enumerate(entries):
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("sig"), str)
                and entry.get("n") == index
                and isinstance(entry.get("head"), str)
                and _ID_RE.fullmatch(entry["head"])
                and entry.get("prev") == prev
            ):
                return (
                    f"the head log {path} line {index + 1} is malformed or out of order "
                    f"(lines edited, removed or re-ordered)"
                )
            body = {k: v for k, v in entry.items() if k != "sig"}
            try:
                key.verify(bytes.fromhex(entry["sig"]), HEAD_LOG_PREFIX + canonical_json(body))
            except (InvalidSignature, ValueError):
                return f"the head log {path} line {index + 1} is not signed by the run's coordinator key"
            prev = hashlib.sha256(canonical_json(entry)).hexdigest()
        position = {v: i for i, v in enumerate(chain_ids)}
        newest = entries[-1]
        last = position.get(newest["head"])
        if last is None or last < len(chain_ids) - 2:
            return (
                f"HEAD was rolled back or replaced: the head log's newest entry ({len(entries)}) is version "
                f"{short(newest['head'])} (epoch {newest.get('epoch')}, step {newest.get('step')}), which "
                f"{'HEAD' + chr(39) + 's chain does not contain' if last is None else 'is newer than HEAD'}; "
                f"restore the newest versions from a copy"
            )
        logged = [e["head"] for e in entries]
        if any(h not in position for h in logged):
            return f"the head log {path} names a version that HEAD's chain does not contain (a forked chain)"
        return None

    def _append_head_log(self, version_id: str, metadata: dict) -> dict:
        """Append one signed line for `version_id` to chain/HEADS (under the writer lock); the line."""
        entries = self.head_log()
        if entries and entries[-1].get("head") == version_id:
            return entries[-1]
        prev = hashlib.sha256(canonical_json(entries[-1])).hexdigest() if entries else None
        body = {
            "n": len(entries),
            "head": version_id,
            "epoch": metadata.get("epoch"),
            "step": metadata.get("step"),
            "prev": prev,
        }
        entry = dict(body, sig=bytes(self.signer.sign(HEAD_LOG_PREFIX + canonical_json(body))).hex())
        with open(self.dir / HEAD_LOG, "ab") as fh:
            fh.write(canonical_json(entry) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        return entry

    # ----- writing

    @contextlib.contextmanager
    def _writer_lock(self):
        with open(self.dir / "LOCK", "a+b") as fh:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            yield

    def _clean_leftovers(self) -> None:
        """Remove temp files/dirs a crashed append left behind (only ever called under the writer lock)."""
        for entry in self.dir.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                if entry.is_dir():
                    for child in entry.iterdir():
                        child.unlink()
                    entry.rmdir()
                else:
                    entry.unlink()

    def append(self, arrays: dict[str, np.ndarray], metadata: dict) -> str:
        """Write a new version whose parent is the current head, make it the head, and return its id."""
        if self.signer is None:
            raise ChainError(f"appending to {self.dir} needs the coordinator's signing key (Chain(..., signer=...))")
        key_hex = _public_key_bytes(self.signer).hex()
        arrays = _check_arrays(arrays)
        if not isinstance(metadata, dict):
            raise ChainError(f"metadata must be a dict, got {type(metadata).__name__}")
        # store exactly what is hashed: a JSON round trip turns tuples into lists, numpy scalars into numbers
        metadata = json.loads(canonical_json(metadata))
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._writer_lock():
            self._clean_leftovers()
            run_key = self.run_key()
            if run_key is None:
                _replace_text(self.dir, "KEY", key_hex + "\n")
            elif run_key != key_hex:
                raise ChainError(
                    f"{self.dir / 'KEY'} holds coordinator key {run_key[:16]}..., but this coordinator's key "
                    f"is {key_hex[:16]}...; run with the key that started this run, or use a new RUN_DIR"
                )
            parent = self.head()
            if parent is not None and not (self.dir / parent).is_dir():
                raise ChainError(
                    f"HEAD points at version {short(parent)}, which is missing from {self.dir}; "
                    f"run `enshuffle chain verify {self.run_dir}` and restore the run directory"
                )
            if parent is not None:  # a crash between HEAD and its log line: log the head first
                self._append_head_log(parent, self._cached_record(parent)["metadata"])
            manifest = manifest_of(arrays)
            version_id = compute_id(parent, key_hex, metadata, manifest)
            if not (self.dir / version_id).is_dir():  # present already if a crash came just before HEAD
                self._write_version_dir(version_id, parent, key_hex, metadata, manifest, arrays)
            _replace_text(self.dir, "HEAD", version_id + "\n")
            self.last_log_entry = self._append_head_log(version_id, metadata)
        return version_id

    def _write_version_dir(self, version_id, parent, key_hex, metadata, manifest, arrays) -> None:
        signature = self.signer.sign(signing_message(version_id))
        record = {
            "format": FORMAT,
            "version_id": version_id,
            "parent_id": parent,
            "coordinator_key": key_hex,
            "metadata": metadata,
            "arrays": manifest,
            "signature": bytes(signature).hex(),
        }
        tmp = self.dir / f"{TMP_PREFIX}version-{secrets.token_hex(6)}"
        tmp.mkdir()
        for index, entry in enumerate(manifest):
            _write_file(tmp / f"{index}.bin", np.ascontiguousarray(arrays[entry["name"]]).data)
        _write_file(tmp / _RECORD, json.dumps(record, sort_keys=True, indent=1, ensure_ascii=False).encode("utf-8"))
        _fsync_dir(tmp)
        os.rename(tmp, self.dir / version_id)
        _fsync_dir(self.dir)


def _home_heads_path(home: Path, genesis: str, chain_dir: Path) -> Path:
    """One record per chain *and* run directory: a copy of a run, extended, is a branch of its
    own, and must not make the original look rolled back. (Restoring an old backup in place is
    what the record is for: same directory, same record.)"""
    where = hashlib.sha256(str(Path(chain_dir).resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(home) / "heads" / f"{genesis}-{where}.json"


def record_head_in_home(chain: Chain, home: Path) -> None:
    """Keep the chain's newest head log line in the coordinator's home too (outside RUN_DIR), so
    that rolling back HEAD and HEADS together is caught by `chain verify` on this machine."""
    entries = chain.head_log()
    if not entries or not isinstance(entries[0].get("head"), str):
        return
    path = _home_heads_path(home, entries[0]["head"], chain.dir)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _replace_text(path.parent, path.name, json.dumps(entries[-1], sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home only loses this extra check; the run directory still has the log


def home_head_problem(chain: Chain, home: Path) -> str | None:
    """Whether the run directory's head log is behind the one this machine's coordinator recorded."""
    entries = chain.head_log()
    if not entries or not isinstance(entries[0].get("head"), str):
        return None
    path = _home_heads_path(home, entries[0]["head"], chain.dir)
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    n = recorded.get("n") if isinstance(recorded, dict) else None
    if not isinstance(n, int):
        return None
    if n >= len(entries) or entries[n] != recorded:
        return (
            f"the chain was rolled back: this machine's coordinator wrote version {short(recorded.get('head'))} "
            f"(head log entry {n + 1}, epoch {recorded.get('epoch')}), but {chain.dir / HEAD_LOG} "
            f"{'has only ' + str(len(entries)) + ' entries' if n >= len(entries) else 'differs there'}; "
            f"restore the newest versions from a copy"
        )
    return None


def trust_problem(chain: Chain, expected_fingerprint: str | None, home: Path | None) -> str | None:
    """What `chain verify` checks, as one answer for `chain export` and `--resume`: every version,
    its signer (when `expected_fingerprint` is known) and the head log, also against the head this
    machine's coordinator recorded in `home`. None when the chain may be used."""
    report = chain.verify(expected_fingerprint)
    if not report.ok:
        where = f"version {report.first_bad}: " if report.first_bad else ""
        return f"{where}{report.problem}"
    return home_head_problem(chain, home) if home is not None else None


def _record_shape_problem(record) -> str | None:
    """Why a parsed version.json is not a version record, or None. Keeps ids out of paths unless hex."""
    if not isinstance(record, dict):
        return "is not a JSON object"
    for field, kind in (
        ("version_id", str),
        ("coordinator_key", str),
        ("signature", str),
        ("metadata", dict),
        ("arrays", list),
    ):
        if not isinstance(record.get(field), kind):
            return f"has no valid {field!r}"
    if record.get("format") != FORMAT:
        return f"has format {record.get('format')!r}, expected {FORMAT!r}"
    if not _ID_RE.fullmatch(record["version_id"]):
        return "has a version_id that is not 64 hex digits"
    if "parent_id" not in record:
        return "has no 'parent_id' (null for the first version)"
    parent = record["parent_id"]
    if parent is not None and not (isinstance(parent, str) and _ID_RE.fullmatch(parent)):
        return "has a parent_id that is neither null nor 64 hex digits"
    for entry in record["arrays"]:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(n, int) and n >= 0 for n in entry["shape"])
        ):
            return "has a malformed entry in 'arrays'"
    return None
