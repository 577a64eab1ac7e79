"""The enshuffle wire format (ENS1): one codec for every message, mirroring docs/protocol.md.

A message is a ZeroMQ multipart message (the ROUTER's identity frame is the runtime's business):

    frame 0        b"ENS1"                      protocol tag and major version
    frame 1        command, ASCII               e.g. b"BATCH"
    frame 2        header, UTF-8 JSON object    canonical: sorted keys, compact separators
    frames 3..n+2  array payloads               raw little-endian C-order bytes, one per array
    frame n+3      signature                    Ed25519, 64 bytes, over `signed_bytes(...)`

The header's "arrays" entry lists each payload's {"name", "dtype", "shape"}. `COMMANDS` is the
spec's command table one to one: required header fields and their types, how many arrays, who
signs. `encode` and `decode` both check a header against it, so a malformed message is caught
on the sending side in tests and on the receiving side always.

Decoding never copies array payloads and never unpickles anything: arrays are read-only
`numpy.frombuffer` views on the received frames.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from enshuffle.protocol.keys import Identity, verify_signature

PROTOCOL_VERSION = 1
TAG = b"ENS1"
SIGNATURE_BYTES = 64
DIGEST_BYTES = 32

ALLOWED_DTYPES = ("uint8", "int32", "int64", "float32", "float64")
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")  # array and static-operand names

# ProtocolError codes (also the REJECT codes a node answers a bad BATCH with).
BAD_FRAME_COUNT = "bad-frame-count"
BAD_TAG = "bad-tag"
BAD_VERSION = "bad-version"
UNKNOWN_COMMAND = "unknown-command"
BAD_HEADER = "bad-header"
BAD_ARRAY = "bad-array"
TOO_LARGE = "too-large"
BAD_SIGNATURE = "bad-signature"

# Batch operations a node computes (see "Operations" in docs/protocol.md).
OPS = ("matmul", "sigmoid", "sub", "square", "mul")


class ProtocolError(Exception):
    """A message that breaks the protocol. `code` is machine-readable, `detail` says what/where.

    `header` is the decoded header when the failure came after it parsed (so a node can still
    answer REJECT with the batch's id and seq), else None.
    """

    def __init__(self, code: str, detail: str, header: dict | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.header = header


@dataclass(frozen=True)
class Limits:
    """What a receiver accepts; set the socket's MAXMSGSIZE to max_message_bytes too."""

    max_frames: int = 64
    max_header_bytes: int = 64 * 1024
    max_message_bytes: int = 1 << 30
    max_ndim: int = 4


DEFAULT_LIMITS = Limits()


# --- the command table ---------------------------------------------------------------------

# Field types: "str", "int" (not bool), "uint" (int >= 0), "pos" (int >= 1), "num" (finite int or
# float, not bool), "bool", "obj", "list",
# "hex32" (64 lowercase hex chars: a raw Ed25519 public key), "name" (matches _NAME_RE);
# a trailing "?" also allows null.
@dataclass(frozen=True)
class CommandSpec:
    name: str
    direction: str            # "node->coordinator", "coordinator->node" or "both"
    fields: Mapping[str, str]
    min_arrays: int = 0
    max_arrays: int = 0
    signer: str = "sender"    # whose key signs: "node", "coordinator" or "sender"


COMMANDS: dict[str, CommandSpec] = {spec.name: spec for spec in (
    CommandSpec("HELLO", "node->coordinator",
                {"protocol": "uint", "node_key": "hex32", "name": "str", "nonce": "str",
                 "capabilities": "obj"}, signer="node"),
    CommandSpec("WELCOME", "coordinator->node",
                {"run_id": "str", "coordinator_key": "hex32", "node_key": "hex32", "nonce": "str",
                 "node_id": "str", "credit": "pos", "heartbeat_ms": "pos", "lease": "obj"},
                signer="coordinator"),
    CommandSpec("REFUSE", "coordinator->node",
                {"coordinator_key": "hex32", "nonce": "str?", "code": "str", "text": "str"},
                signer="coordinator"),
    CommandSpec("STATIC", "coordinator->node",
                {"run_id": "str", "name": "name", "seq": "uint"}, 1, 1, signer="coordinator"),
    CommandSpec("BATCH", "coordinator->node",
                {"run_id": "str", "batch_id": "str", "seq": "uint", "step": "uint", "op": "str",
                 "params": "obj", "lease_ms": "pos"}, 1, 8, signer="coordinator"),
    CommandSpec("RESULT", "node->coordinator",
                {"run_id": "str", "batch_id": "str", "seq": "uint", "compute_seconds": "num"},
                1, 8, signer="node"),
    CommandSpec("REJECT", "node->coordinator",
                {"run_id": "str?", "batch_id": "str?", "seq": "uint?", "code": "str", "text": "str"},
                signer="node"),
    CommandSpec("HEARTBEAT", "both",
                {"node_id": "str", "credit": "uint", "outstanding": "uint"}),
    CommandSpec("BYE", "both", {"node_id": "str?", "reason": "str"}),
)}


CAPABILITY_FIELDS = {"ops": "list", "threads": "pos", "credit": "pos"}  # HELLO.capabilities
LEASE_FIELDS = {"min_ms": "pos", "multiple": "num", "initial_ms": "pos"}  # WELCOME.lease


def _type_ok(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _type_ok(value, kind[:-1])
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "uint":
        return _type_ok(value, "int") and value >= 0
    if kind == "pos":
        return _type_ok(value, "int") and value >= 1
    if kind == "num":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "obj":
        return isinstance(value, dict)
    if kind == "list":
        return isinstance(value, list)
    if kind == "hex32":
        return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None
    if kind == "name":
        return isinstance(value, str) and _NAME_RE.match(value) is not None
    raise AssertionError(f"unknown field kind {kind!r}")


def check_header(command: str, header: Mapping[str, Any]) -> None:
    """Raise ProtocolError('bad-header') unless `header` has `command`'s fields, typed right.

    Unknown extra fields are allowed (a later minor revision may add some) and ignored.
    """
    spec = COMMANDS[command]
    for name, kind in spec.fields.items():
        if name not in header:
            raise ProtocolError(BAD_HEADER, f"{command} header lacks field {name!r}", dict(header))
        if not _type_ok(header[name], kind):
            raise ProtocolError(BAD_HEADER, f"{command} header field {name!r} must be {kind}, "
                                f"got {header[name]!r:.80}", dict(header))
    if command == "BATCH" and header["op"] not in OPS:
        raise ProtocolError(BAD_HEADER, f"BATCH op {header['op']!r} is not one of {OPS}", dict(header))
    nested = {"HELLO": ("capabilities", CAPABILITY_FIELDS), "WELCOME": ("lease", LEASE_FIELDS)}
    if command in nested:
        outer, fields = nested[command]
        for name, kind in fields.items():
            value = header[outer].get(name)
            if not _type_ok(value, kind):
                raise ProtocolError(BAD_HEADER, f"{command} {outer}.{name} must be {kind}, "
                                    f"got {value!r:.80}", dict(header))


# --- signing -------------------------------------------------------------------------------

def payload_digest(payload: bytes | memoryview) -> bytes:
    """SHA-256 of one payload frame (hashlib reads the buffer in place, no copy)."""
    return hashlib.sha256(payload).digest()


def signed_bytes(command: bytes, header: bytes, digests: Iterable[bytes]) -> bytes:
    """What the Ed25519 signature covers (docs/protocol.md, "Signatures").

    TAG || u8 len(command) || command || u32be len(header) || header || u16be n || digest_1..n.
    Lengths are explicit so no two different messages share the same signed bytes; payloads
    enter only as digests so signing and verifying never concatenate large frames.
    """
    digests = list(digests)
    return b"".join([TAG, len(command).to_bytes(1, "big"), command,
                     len(header).to_bytes(4, "big"), header,
                     len(digests).to_bytes(2, "big"), *digests])


# --- encoding ------------------------------------------------------------------------------

def canonical_json(obj: Any) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(BAD_HEADER, f"header is not JSON-serialisable: {exc}") from None


def _wire_array(name: str, array: np.ndarray) -> tuple[dict, memoryview]:
    """The header entry and a zero-copy byte view of one array (copying only if it must)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProtocolError(BAD_ARRAY, f"array name {name!r} must match {_NAME_RE.pattern}")
    array = np.asarray(array)
    if array.dtype.name not in _WIRE_DTYPES:
        raise ProtocolError(BAD_ARRAY, f"array {name!r} has dtype {array.dtype}; "
                            f"allowed: {', '.join(ALLOWED_DTYPES)}")
    wire = _WIRE_DTYPES[array.dtype.name]
    if array.dtype != wire:  # big-endian input: the wire is little-endian
        array = array.astype(wire)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
        array = array.copy(order="C")
    entry = {"name": name, "dtype": wire.name, "shape": list(array.shape)}
    return entry, memoryview(array.reshape(-1)).cast("B")


def encode(command: str, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None,
           signer: Identity | None = None) -> list[bytes | memoryview]:
    """Frames for one message. Array frames are memoryviews of the caller's arrays when those
    are C-contiguous little-endian: do not mutate them until the send has completed.

    Every ENS1 command is signed; `signer` is required (it is optional in the signature only so
    tests can build unsigned garbage through `encode_unsigned`).
    """
    if signer is None:
        raise ValueError(f"{command} must be signed: pass signer=<Identity>")
    frames = encode_unsigned(command, header, arrays)
    digests = [payload_digest(f) for f in frames[3:]]
    frames.append(signer.sign(signed_bytes(frames[1], frames[2], digests)))
    return frames


def encode_unsigned(command: str, header: Mapping[str, Any],
                    arrays: Mapping[str, np.ndarray] | None = None) -> list[bytes | memoryview]:
    """Tag, command, header and payload frames, without the signature frame."""
    if command not in COMMANDS:
        raise ProtocolError(UNKNOWN_COMMAND, f"{command!r} is not one of {', '.join(COMMANDS)}")
    spec = COMMANDS[command]
    if "arrays" in header:
        raise ProtocolError(BAD_HEADER, "'arrays' is reserved: pass arrays separately")
    check_header(command, header)
    arrays = dict(arrays or {})
    if not spec.min_arrays <= len(arrays) <= spec.max_arrays:
        raise ProtocolError(BAD_ARRAY, f"{command} carries {spec.min_arrays}..{spec.max_arrays} "
                            f"arrays, got {len(arrays)}")
    entries, payloads = [], []
    for name, array in arrays.items():
        entry, payload = _wire_array(name, array)
        entries.append(entry)
        payloads.append(payload)
    full_header = dict(header)
    full_header["arrays"] = entries
    return [TAG, command.encode("ascii"), canonical_json(full_header), *payloads]


# --- decoding ------------------------------------------------------------------------------

@dataclass
class Message:
    """A decoded message. `header` excludes the "arrays" entry; `arrays` keeps wire order."""

    command: str
    header: dict
    arrays: dict[str, np.ndarray]
    signature: bytes | None
    raw_header: bytes = field(default=b"", repr=False, compare=False)
    payloads: tuple[memoryview, ...] = field(default=(), repr=False, compare=False)


def _as_buffer(frame: Any) -> memoryview:
    """A flat byte view of a bytes / bytearray / memoryview / zmq.Frame without copying."""
    if isinstance(frame, (bytes, bytearray, memoryview)):
        view = memoryview(frame)
    elif hasattr(frame, "buffer"):  # zmq.Frame from recv_multipart(copy=False); no zmq import
        view = frame.buffer
    else:
        raise ProtocolError(BAD_FRAME_COUNT, f"a frame must be bytes-like, got {type(frame).__name__}")
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _parse_header(raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates,
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_HEADER, f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_HEADER, f"header must be a JSON object, got {type(header).__name__}")
    return header


def _parse_entries(command: str, header: dict, n_payloads: int, limits: Limits) -> list[tuple[str, np.dtype, tuple]]:
    entries = header.get("arrays")
    if not isinstance(entries, list):
        raise ProtocolError(BAD_HEADER, "header field 'arrays' must be a list", header)
    if len(entries) != n_payloads:
        raise ProtocolError(BAD_FRAME_COUNT, f"header lists {len(entries)} arrays but the message "
                            f"has {n_payloads} payload frames", header)
    spec = COMMANDS[command]
    if not spec.min_arrays <= n_payloads <= spec.max_arrays:
        raise ProtocolError(BAD_ARRAY, f"{command} carries {spec.min_arrays}..{spec.max_arrays} "
                            f"arrays, got {n_payloads}", header)
    parsed, seen = [], set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}] must be exactly {{name, dtype, shape}}", header)
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in seen:
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}] name {name!r:.80} is invalid or repeated", header)
        seen.add(name)
        if dtype not in _WIRE_DTYPES:
            raise ProtocolError(BAD_ARRAY, f"array {name!r} dtype {dtype!r:.40} is not allowed; "
                                f"allowed: {', '.join(ALLOWED_DTYPES)}", header)
        if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= limits.max_message_bytes
                           for d in shape)):
            # Each dimension is bounded too: a zero elsewhere would let a huge one pass the size check.
            raise ProtocolError(BAD_ARRAY, f"array {name!r} shape {shape!r:.80} must be a list of at "
                                f"most {limits.max_ndim} integers from 0 to {limits.max_message_bytes}", header)
        parsed.append((name, _WIRE_DTYPES[dtype], tuple(shape)))
    return parsed


def decode(frames: list, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and validate one message (without the ROUTER identity frame). Never copies payloads.

    Raises ProtocolError with a precise code; the signature is checked separately by `verify`
    because only the caller knows which key should have signed.
    """
    if not 4 <= len(frames) <= limits.max_frames:
        raise ProtocolError(BAD_FRAME_COUNT, f"{len(frames)} frames; a message has 4 to "
                            f"{limits.max_frames} (tag, command, header, arrays..., signature)")
    views = [_as_buffer(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > limits.max_message_bytes:
        raise ProtocolError(TOO_LARGE, f"message is {total} bytes; the limit is {limits.max_message_bytes}")
    tag = views[0].tobytes()
    if tag != TAG:
        if len(tag) == 4 and tag.startswith(b"ENS"):
            raise ProtocolError(BAD_VERSION, f"peer speaks {tag!r}, this side speaks {TAG!r}")
        raise ProtocolError(BAD_TAG, f"frame 0 is {tag[:16]!r}, not {TAG!r}: not an enshuffle peer")
    command_bytes = views[1].tobytes()
    command = command_bytes.decode("ascii", "replace")
    if command not in COMMANDS:
        raise ProtocolError(UNKNOWN_COMMAND, f"command {command_bytes[:16]!r} is not one of "
                            f"{', '.join(COMMANDS)}")
    if views[2].nbytes > limits.max_header_bytes:
        raise ProtocolError(TOO_LARGE, f"header is {views[2].nbytes} bytes; the limit is "
                            f"{limits.max_header_bytes}")
    raw_header = views[2].tobytes()
    header = _parse_header(raw_header)
    payloads = tuple(views[3:-1])
    entries = _parse_entries(command, header, len(payloads), limits)
    header.pop("arrays")
    check_header(command, header)
    arrays = {}
    for (name, dtype, shape), payload in zip(entries, payloads):
        expected = math.prod(shape) * dtype.itemsize
        if payload.nbytes != expected:
            raise ProtocolError(BAD_ARRAY, f"array {name!r} {dtype.name}{list(shape)} needs {expected} "
                                f"bytes, its frame has {payload.nbytes}", header)
        try:
            array = np.frombuffer(payload, dtype=dtype).reshape(shape)
        except ValueError as exc:  # numpy's own limits (e.g. dimensions it cannot index)
            raise ProtocolError(BAD_ARRAY, f"array {name!r} shape {list(shape)} is not usable: {exc}", header) from None
        array.flags.writeable = False  # a view on a received frame: never write through it
        arrays[name] = array
    signature = views[-1].tobytes()
    if len(signature) != SIGNATURE_BYTES:
        raise ProtocolError(BAD_SIGNATURE, f"signature frame is {len(signature)} bytes, not "
                            f"{SIGNATURE_BYTES}", header)
    return Message(command, header, arrays, signature, raw_header, payloads)


def verify(message: Message, public_bytes: bytes) -> None:
    """Raise ProtocolError('bad-signature') unless `public_bytes` signed exactly this message."""
    if message.signature is None:
        raise ProtocolError(BAD_SIGNATURE, f"{message.command} is unsigned", message.header)
    if not message.raw_header:
        raise ValueError("verify() needs a Message from decode(): it checks the bytes received")
    raw_header, payloads = message.raw_header, message.payloads
    data = signed_bytes(message.command.encode("ascii"), raw_header,
                        (payload_digest(p) for p in payloads))
    if not verify_signature(public_bytes, message.signature, data):
        raise ProtocolError(BAD_SIGNATURE, f"{message.command} signature does not match key "
                            f"{bytes(public_bytes).hex()[:16]}...", message.header)


def embedded_key(message: Message) -> bytes:
    """The public key a HELLO (node_key) or WELCOME/REFUSE (coordinator_key) carries."""
    field_name = {"HELLO": "node_key", "WELCOME": "coordinator_key", "REFUSE": "coordinator_key"}.get(
        message.command)
    if field_name is None:
        raise ValueError(f"{message.command} carries no key; use the key from the session")
    return bytes.fromhex(message.header[field_name])


def verify_self_signed(message: Message) -> bytes:
    """Verify a HELLO/WELCOME/REFUSE against the key it carries; return that key.

    This proves the sender holds the key, not that the key is the right one: the coordinator
    checks a node key against its allow-list, the node a coordinator key against its TrustStore.
    """
    key = embedded_key(message)
    verify(message, key)
    return key
