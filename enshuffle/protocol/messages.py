"""The enshuffle wire format (ENS2): one codec for every message, mirroring docs/protocol.md.

Every message is exactly ONE ZeroMQ frame (the ROUTER's identity frame is the runtime's business):

    b"ENS2" || kind (1 byte) || body

    kind b"U"  unsigned handshake (HI, DECLINE):    body = inner
    kind b"S"  signed handshake (CHALLENGE, HELLO,  body = inner || Ed25519 signature (64 bytes)
               WELCOME, REFUSE)                          over b"ENS2" || b"S" || inner
    kind b"E"  sealed (everything after the         body = counter (u64be) || AES-256-GCM(inner) || tag (16)
               handshake), see `Channel`

    inner = u8 len(command) || command || u32be len(header) || header || payload_1 || ... || payload_n

The header is a UTF-8 JSON object whose reserved entry "arrays" lists each payload's
{"name", "dtype", "shape"}; the payloads follow the header back to back, each exactly
prod(shape) * itemsize bytes, so the sizes are known (and checked) before anything is viewed.
`COMMANDS` is the spec's command table one to one: required header fields and their types, how
many arrays, which kind. Decoding never unpickles anything: arrays are read-only
`numpy.frombuffer` views on the received (or decrypted) bytes.

The handshake (HI, CHALLENGE, HELLO, WELCOME) yields a `Channel`: two AES-256-GCM keys, one per
direction, derived with HKDF-SHA256 from an X25519 exchange whose two ephemeral public keys are
signed by the two Ed25519 identities (see `enshuffle.protocol.handshake`).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enshuffle.batch import OPS  # the ops a BATCH may name ("Operations" in docs/protocol.md)
from enshuffle.protocol.keys import Identity, verify_signature

PROTOCOL_VERSION = 2
TAG = b"ENS2"
KIND_UNSIGNED, KIND_SIGNED, KIND_SEALED = b"U", b"S", b"E"
SIGNATURE_BYTES = 64
TAG_BYTES = 16  # AES-GCM authentication tag
COUNTER_BYTES = 8
PREFIX_BYTES = 5  # TAG + kind

ALLOWED_DTYPES = ("uint8", "int32", "int64", "float32", "float64")
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in ALLOWED_DTYPES}
_WIRE_NAMES = {wire: name for name, wire in _WIRE_DTYPES.items()}
_WIRE_BY_DTYPE: dict[np.dtype, np.dtype] = {}  # an array's dtype -> its wire dtype, filled as seen
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
BAD_SEAL = "bad-seal"  # a sealed message that does not decrypt, or a repeated counter
WRONG_KIND = "wrong-kind"  # e.g. a BATCH sent in the clear, or a HELLO sealed


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

    max_header_bytes: int = 64 * 1024
    max_message_bytes: int = 1 << 30
    max_ndim: int = 4
    max_handshake_bytes: int = 8 * 1024  # HI/CHALLENGE/HELLO/WELCOME/REFUSE/DECLINE: small


DEFAULT_LIMITS = Limits()


# --- the command table ---------------------------------------------------------------------


# Field types: "str", "int" (not bool), "uint" (int >= 0), "pos" (int >= 1), "num" (finite int or
# float, not bool), "bool", "obj", "list",
# "hex32" (64 lowercase hex chars: a raw 32-byte key), "name" (matches _NAME_RE);
# a trailing "?" also allows null.
@dataclass(frozen=True)
class CommandSpec:
    name: str
    direction: str  # "node->coordinator", "coordinator->node" or "both"
    fields: Mapping[str, str]
    min_arrays: int = 0
    max_arrays: int = 0
    kind: bytes = KIND_SEALED  # how it travels: unsigned, signed (handshake) or sealed


COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec("HI", "node->coordinator", {"protocol": "uint", "nonce": "str"}, kind=KIND_UNSIGNED),
        CommandSpec(
            "CHALLENGE",
            "coordinator->node",
            {
                "protocol": "uint",
                "coordinator_key": "hex32",
                "run_id": "str",
                "challenge": "hex32",
                "nonce": "str",
                "kx": "hex32",
            },
            kind=KIND_SIGNED,
        ),
        CommandSpec(
            "HELLO",
            "node->coordinator",
            {
                "protocol": "uint",
                "node_key": "hex32",
                "name": "str",
                "nonce": "str",
                "challenge": "hex32",
                "coordinator_key": "hex32",
                "run_id": "str",
                "kx": "hex32",
                "capabilities": "obj",
            },
            kind=KIND_SIGNED,
        ),
        CommandSpec(
            "WELCOME",
            "coordinator->node",
            {
                "run_id": "str",
                "coordinator_key": "hex32",
                "node_key": "hex32",
                "nonce": "str",
                "challenge": "hex32",
                "node_id": "str",
                "credit": "pos",
                "heartbeat_ms": "pos",
                "lease": "obj",
            },
            kind=KIND_SIGNED,
        ),
        CommandSpec(
            "REFUSE",
            "coordinator->node",
            {"coordinator_key": "hex32", "nonce": "str?", "code": "str", "text": "str"},
            kind=KIND_SIGNED,
        ),
        CommandSpec("DECLINE", "node->coordinator", {"nonce": "str", "code": "str", "text": "str"}, kind=KIND_UNSIGNED),
        CommandSpec("STATIC", "coordinator->node", {"run_id": "str", "name": "name", "seq": "uint"}, 1, 1),
        CommandSpec(
            "BATCH",
            "coordinator->node",
            {
                "run_id": "str",
                "batch_id": "str",
                "seq": "uint",
                "step": "uint",
                "op": "str",
                "params": "obj",
                "lease_ms": "pos",
            },
            1,
            8,
        ),
        CommandSpec(
            "RESULT",
            "node->coordinator",
            {"run_id": "str", "batch_id": "str", "seq": "uint", "compute_seconds": "num"},
            1,
            8,
        ),
        CommandSpec(
            "REJECT",
            "node->coordinator",
            {"run_id": "str?", "batch_id": "str?", "seq": "uint?", "code": "str", "text": "str"},
        ),
        CommandSpec("HEARTBEAT", "both", {"node_id": "str", "credit": "uint", "outstanding": "uint"}),
        CommandSpec("BYE", "both", {"node_id": "str?", "reason": "str"}),
    )
}

# u8 len(command) || command: how every inner message starts, per command; and back
_COMMAND_PREFIX = {name: bytes([len(name)]) + name.encode("ascii") for name in COMMANDS}
_COMMAND_NAMES = {name.encode("ascii"): name for name in COMMANDS}
# Senders pad the header so the payloads start at a multiple of this many bytes of inner
# (docs/protocol.md section 3); receivers open sealed messages into buffers aligned to it.
PAYLOAD_ALIGN = 64
HANDSHAKE_COMMANDS = tuple(name for name, spec in COMMANDS.items() if spec.kind != KIND_SEALED)
CAPABILITY_FIELDS = {"ops": "list", "threads": "pos", "credit": "pos"}  # HELLO.capabilities
LEASE_FIELDS = {"min_ms": "pos", "multiple": "num", "initial_ms": "pos"}  # WELCOME.lease


_MAX_INT = 2**53  # "int": what a JSON number holds exactly


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT


_HEX32_RE = re.compile(r"[0-9a-f]{64}")
# One test per field type (docs/protocol.md, the command table); a trailing "?" also allows null.
_KIND_TESTS: dict[str, Callable[[Any], bool]] = {
    "str": lambda value: isinstance(value, str),
    "int": _is_int,
    "uint": lambda value: _is_int(value) and value >= 0,
    "pos": lambda value: _is_int(value) and value >= 1,
    "num": lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
    "bool": lambda value: isinstance(value, bool),
    "obj": lambda value: isinstance(value, dict),
    "list": lambda value: isinstance(value, list),
    "hex32": lambda value: isinstance(value, str) and _HEX32_RE.fullmatch(value) is not None,
    "name": lambda value: isinstance(value, str) and _NAME_RE.match(value) is not None,
}


def _kind_test(kind: str) -> Callable[[Any], bool]:
    """The test of one field type, e.g. "uint" or "str?"."""
    if kind.endswith("?"):
        test = _kind_test(kind[:-1])
        return lambda value: value is None or test(value)
    if kind not in _KIND_TESTS:
        raise AssertionError(f"unknown field kind {kind!r}")
    return _KIND_TESTS[kind]


def _type_ok(value: Any, kind: str) -> bool:
    return _kind_test(kind)(value)


# Per command, its fields with their tests, made once: every message sent and received is checked.
_FIELD_TESTS: dict[str, tuple[tuple[str, str, Callable[[Any], bool]], ...]] = {
    command: tuple((name, kind, _kind_test(kind)) for name, kind in spec.fields.items())
    for command, spec in COMMANDS.items()
}
_NESTED_FIELDS = {"HELLO": ("capabilities", CAPABILITY_FIELDS), "WELCOME": ("lease", LEASE_FIELDS)}


def check_header(command: str, header: Mapping[str, Any]) -> None:
    """Raise ProtocolError('bad-header') unless `header` has `command`'s fields, typed right.

    Unknown extra fields are allowed (a later minor revision may add some) and ignored.
    """
    for name, kind, test in _FIELD_TESTS[command]:
        if name not in header:
            raise ProtocolError(BAD_HEADER, f"{command} header lacks field {name!r}", dict(header))
        if not test(header[name]):
            raise ProtocolError(
                BAD_HEADER, f"{command} header field {name!r} must be {kind}, got {header[name]!r:.80}", dict(header)
            )
    if command == "BATCH" and header["op"] not in OPS:
        raise ProtocolError(BAD_HEADER, f"BATCH op {header['op']!r} is not one of {OPS}", dict(header))
    if command in _NESTED_FIELDS:
        outer, fields = _NESTED_FIELDS[command]
        for name, kind in fields.items():
            value = header[outer].get(name)
            if not _type_ok(value, kind):
                raise ProtocolError(
                    BAD_HEADER, f"{command} {outer}.{name} must be {kind}, got {value!r:.80}", dict(header)
                )


# --- encoding ------------------------------------------------------------------------------


# Made once (json.dumps with options makes a new encoder every call); the header's bytes on the wire.
# No circular-reference bookkeeping (a dict of ids per call): a header that contains itself ends in
# RecursionError instead, refused the same way.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)


def canonical_json(obj: Any) -> bytes:
    try:
        return _ENCODER.encode(obj).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_HEADER, f"header is not JSON-serialisable: {exc}") from None


def _wire_array(name: str, array: np.ndarray) -> tuple[dict, memoryview]:
    """The header entry and a zero-copy byte view of one array (copying only if it must)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ProtocolError(BAD_ARRAY, f"array name {name!r} must match {_NAME_RE.pattern}")
    array = np.asarray(array)
    wire = _WIRE_BY_DTYPE.get(array.dtype)  # a dict on dtypes: dtype.name costs microseconds a call
    if wire is None:
        if array.dtype.name not in _WIRE_DTYPES:
            raise ProtocolError(
                BAD_ARRAY, f"array {name!r} has dtype {array.dtype}; allowed: {', '.join(ALLOWED_DTYPES)}"
            )
        wire = _WIRE_BY_DTYPE[array.dtype] = _WIRE_DTYPES[array.dtype.name]
    if array.dtype != wire:  # big-endian input: the wire is little-endian
        array = array.astype(wire)
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn 0-d into 1-d)
        array = array.copy(order="C")
    entry = {"name": name, "dtype": _WIRE_NAMES.get(wire) or wire.name, "shape": list(array.shape)}
    return entry, memoryview(array.reshape(-1)).cast("B")  # type: ignore[arg-type]  # numpy types ndarray as a buffer only on 3.12+


def inner_parts(
    command: str, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
) -> list[bytes | memoryview]:
    """The inner message as parts: [command+header prefix, payload views...] (no copy of arrays)."""
    if command not in COMMANDS:
        raise ProtocolError(UNKNOWN_COMMAND, f"{command!r} is not one of {', '.join(COMMANDS)}")
    spec = COMMANDS[command]
    if "arrays" in header:
        raise ProtocolError(BAD_HEADER, "'arrays' is reserved: pass arrays separately")
    check_header(command, header)
    arrays = dict(arrays or {})
    if not spec.min_arrays <= len(arrays) <= spec.max_arrays:
        raise ProtocolError(
            BAD_ARRAY, f"{command} carries {spec.min_arrays}..{spec.max_arrays} arrays, got {len(arrays)}"
        )
    entries, payloads = [], []
    for name, array in arrays.items():
        entry, payload = _wire_array(name, array)
        entries.append(entry)
        payloads.append(payload)
    full_header = dict(header)
    full_header["arrays"] = entries
    raw_header = canonical_json(full_header)
    command_prefix = _COMMAND_PREFIX[command]
    if payloads:
        # trailing spaces (JSON whitespace) so the first payload starts at a multiple of
        # PAYLOAD_ALIGN bytes of inner: a receiver that opens into an aligned buffer gets aligned
        # arrays (numpy's unaligned float32 paths run at half speed)
        raw_header += b" " * (-(len(command_prefix) + 4 + len(raw_header)) % PAYLOAD_ALIGN)
    prefix = b"".join([command_prefix, len(raw_header).to_bytes(4, "big"), raw_header])
    return [prefix, *payloads]


def encode(
    command: str,
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray] | None = None,
    signer: Identity | None = None,
) -> list[bytes]:
    """The single frame (as a one-element list) of a handshake message: HI/DECLINE unsigned,
    CHALLENGE/HELLO/WELCOME/REFUSE signed by `signer`. Session messages go through `Channel.seal`."""
    spec = COMMANDS.get(command)
    if spec is None:
        raise ProtocolError(UNKNOWN_COMMAND, f"{command!r} is not one of {', '.join(COMMANDS)}")
    if spec.kind == KIND_SEALED:
        raise ValueError(f"{command} travels sealed: use the session's Channel.seal")
    inner = b"".join(bytes(p) for p in inner_parts(command, header, arrays))
    if spec.kind == KIND_UNSIGNED:
        return [TAG + KIND_UNSIGNED + inner]
    if signer is None:
        raise ValueError(f"{command} must be signed: pass signer=<Identity>")
    return [TAG + KIND_SIGNED + inner + signer.sign(TAG + KIND_SIGNED + inner)]


# --- decoding ------------------------------------------------------------------------------


@dataclass
class Message:
    """A decoded message. `header` excludes the "arrays" entry; `arrays` keeps wire order.

    `inner` is the exact inner bytes received (the signed part of a handshake message, which
    enters the session-key transcript); `signature` is None for unsigned and sealed messages."""

    command: str
    header: dict
    arrays: dict[str, np.ndarray]
    signature: bytes | None
    inner: bytes = field(default=b"", repr=False, compare=False)
    kind: bytes = KIND_SEALED


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
    out = dict(pairs)
    if len(out) != len(pairs):  # a key came twice: which one
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def _parse_header(raw: bytes | memoryview) -> dict:
    try:
        text = str(raw, "utf-8")
        if text.startswith("\ufeff"):  # what json.loads refuses too
            raise ValueError("Unexpected UTF-8 BOM")
        header = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(BAD_HEADER, f"header is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(BAD_HEADER, f"header must be a JSON object, got {type(header).__name__}")
    return header


def _parse_entries(command: str, header: dict, limits: Limits) -> tuple[list[tuple[str, np.dtype, tuple, int]], int]:
    """The checked array entries as (name, wire dtype, shape, bytes), and their bytes in all."""
    entries = header.get("arrays")
    if not isinstance(entries, list):
        raise ProtocolError(BAD_HEADER, "header field 'arrays' must be a list (empty when there are none)", header)
    spec = COMMANDS[command]
    if not spec.min_arrays <= len(entries) <= spec.max_arrays:
        raise ProtocolError(
            BAD_ARRAY, f"{command} carries {spec.min_arrays}..{spec.max_arrays} arrays, got {len(entries)}", header
        )
    parsed, seen, total = [], set(), 0
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or len(entry) != 3
            or not ("name" in entry and "dtype" in entry and "shape" in entry)
        ):
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}] must be exactly {{name, dtype, shape}}", header)
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not _NAME_RE.match(name) or name in seen:
            raise ProtocolError(BAD_ARRAY, f"arrays[{i}] name {name!r:.80} is invalid or repeated", header)
        seen.add(name)
        wire = _WIRE_DTYPES.get(dtype) if isinstance(dtype, str) else None
        if wire is None:
            raise ProtocolError(
                BAD_ARRAY,
                f"array {name!r} dtype {dtype!r:.40} is not allowed; allowed: {', '.join(ALLOWED_DTYPES)}",
                header,
            )
        if not isinstance(shape, list) or len(shape) > limits.max_ndim or not _dims_ok(shape, limits):
            # Each dimension is bounded too: a zero elsewhere would let a huge one pass the size check.
            raise ProtocolError(
                BAD_ARRAY,
                f"array {name!r} shape {shape!r:.80} must be a list of at "
                f"most {limits.max_ndim} integers from 0 to {limits.max_message_bytes}",
                header,
            )
        nbytes = math.prod(shape) * wire.itemsize
        parsed.append((name, wire, tuple(shape), nbytes))
        total += nbytes
    return parsed, total


def _dims_ok(shape: list, limits: Limits) -> bool:
    """Every dimension an int (not a bool) from 0 to the message limit."""
    top = limits.max_message_bytes
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= top:
            return False
    return True


def decode_inner(
    inner: memoryview | bytes,
    *,
    limits: Limits = DEFAULT_LIMITS,
    kind: bytes = KIND_SEALED,
    signature: bytes | None = None,
) -> Message:
    """Parse and validate the inner bytes of one message. Never copies payloads."""
    view = memoryview(inner)
    if view.nbytes < 1 + 1 + 4:
        raise ProtocolError(BAD_HEADER, f"message of {view.nbytes} bytes is too short")
    n = view[0]
    command_bytes = view[1 : 1 + n].tobytes()
    command = _COMMAND_NAMES.get(command_bytes)
    if command is None:
        raise ProtocolError(UNKNOWN_COMMAND, f"command {command_bytes[:16]!r} is not one of {', '.join(COMMANDS)}")
    if COMMANDS[command].kind != kind:
        raise ProtocolError(WRONG_KIND, f"{command} must travel as kind {COMMANDS[command].kind!r}, came as {kind!r}")
    if view.nbytes < 1 + n + 4:
        raise ProtocolError(BAD_HEADER, "message ends inside its header length")
    header_len = int.from_bytes(view[1 + n : 5 + n], "big")
    if header_len > limits.max_header_bytes:
        raise ProtocolError(TOO_LARGE, f"header is {header_len} bytes; the limit is {limits.max_header_bytes}")
    start = 5 + n
    if view.nbytes < start + header_len:
        raise ProtocolError(BAD_HEADER, f"message ends inside its {header_len}-byte header")
    header = _parse_header(view[start : start + header_len])
    entries, need = _parse_entries(command, header, limits)
    header.pop("arrays")
    check_header(command, header)
    offset = start + header_len
    if view.nbytes - offset != need:
        raise ProtocolError(
            BAD_ARRAY, f"the arrays need {need} bytes after the header, the message has {view.nbytes - offset}", header
        )
    arrays = {}
    for name, dtype, shape, nbytes in entries:
        try:
            array = np.frombuffer(view[offset : offset + nbytes], dtype=dtype).reshape(shape)
        except ValueError as exc:  # numpy's own limits (e.g. dimensions it cannot index)
            raise ProtocolError(BAD_ARRAY, f"array {name!r} shape {list(shape)} is not usable: {exc}", header) from None
        array.flags.writeable = False  # a view on received bytes: never write through it
        arrays[name] = array
        offset += nbytes
    keep = bytes(view) if kind != KIND_SEALED else b""
    return Message(command, header, arrays, signature, keep, kind)


def frame_kind(frames: list, limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, memoryview]:
    """Check the envelope of a received message: one frame, size, tag; returns (kind, frame view)."""
    if not frames:
        raise ProtocolError(BAD_FRAME_COUNT, "an empty message")
    view = _as_buffer(frames[0])
    tag = view[:4].tobytes()
    if tag != TAG:
        if len(tag) == 4 and tag.startswith(b"ENS"):
            raise ProtocolError(BAD_VERSION, f"peer speaks {tag!r}, this side speaks {TAG!r}")
        raise ProtocolError(BAD_TAG, f"frame starts {tag[:16]!r}, not {TAG!r}: not an enshuffle peer")
    if len(frames) != 1:
        raise ProtocolError(BAD_FRAME_COUNT, f"{len(frames)} frames; an ENS2 message is exactly one frame")
    if view.nbytes > limits.max_message_bytes:
        raise ProtocolError(TOO_LARGE, f"message is {view.nbytes} bytes; the limit is {limits.max_message_bytes}")
    kind = view[4:5].tobytes()
    if kind not in (KIND_UNSIGNED, KIND_SIGNED, KIND_SEALED):
        raise ProtocolError(BAD_TAG, f"unknown message kind {kind!r}")
    return kind, view


def decode(frames: list, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse a handshake message (unsigned or signed, not sealed). The signature is checked by
    `verify` / `verify_self_signed`, because only the caller knows which key should have signed."""
    kind, view = frame_kind(frames, limits)
    if kind == KIND_SEALED:
        raise ProtocolError(WRONG_KIND, "a sealed message outside a session")
    if view.nbytes > limits.max_handshake_bytes:
        raise ProtocolError(
            TOO_LARGE, f"handshake message is {view.nbytes} bytes; the limit is {limits.max_handshake_bytes}"
        )
    if kind == KIND_UNSIGNED:
        return decode_inner(view[5:], limits=limits, kind=kind)
    if view.nbytes < PREFIX_BYTES + SIGNATURE_BYTES:
        raise ProtocolError(BAD_SIGNATURE, "signed message too short to hold a signature")
    return decode_inner(view[5:-SIGNATURE_BYTES], limits=limits, kind=kind, signature=view[-SIGNATURE_BYTES:].tobytes())


def verify(message: Message, public_bytes: bytes) -> None:
    """Raise ProtocolError('bad-signature') unless `public_bytes` signed exactly this message."""
    if message.signature is None or message.kind != KIND_SIGNED:
        raise ProtocolError(BAD_SIGNATURE, f"{message.command} is not a signed message", message.header)
    if not verify_signature(public_bytes, message.signature, TAG + KIND_SIGNED + message.inner):
        raise ProtocolError(
            BAD_SIGNATURE,
            f"{message.command} signature does not match key {bytes(public_bytes).hex()[:16]}...",
            message.header,
        )


def embedded_key(message: Message) -> bytes:
    """The public key a HELLO (node_key) or CHALLENGE/WELCOME/REFUSE (coordinator_key) carries."""
    field_name = {
        "HELLO": "node_key",
        "WELCOME": "coordinator_key",
        "REFUSE": "coordinator_key",
        "CHALLENGE": "coordinator_key",
    }.get(message.command)
    if field_name is None:
        raise ValueError(f"{message.command} carries no key; use the key from the session")
    return bytes.fromhex(message.header[field_name])


def verify_self_signed(message: Message) -> bytes:
    """Verify a HELLO/CHALLENGE/WELCOME/REFUSE against the key it carries; return that key.

    This proves the sender holds the key, not that the key is the right one: the coordinator
    checks a node key against its admission rules, the node a coordinator key against its TrustStore.
    """
    key = embedded_key(message)
    verify(message, key)
    return key


# --- sealed session messages ---------------------------------------------------------------


def _aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 buffer of nbytes starting at a multiple of PAYLOAD_ALIGN, so a padded
    message's arrays are aligned views of it."""
    raw = np.empty(nbytes + PAYLOAD_ALIGN - 1, dtype=np.uint8)
    start = -raw.ctypes.data % PAYLOAD_ALIGN
    return raw[start : start + nbytes]


class Channel:
    """One session's AEAD state: AES-256-GCM, one key per direction, a 64-bit message counter.

    The 12-byte nonce is 4 zero bytes || the counter (big-endian); the counter starts at 0, grows
    by one per message sent and never repeats under a key (keys are fresh per session). The
    receiver accepts only counters above the last one it opened, so a replayed or reordered
    message fails. The AAD is the 13-byte envelope b"ENS2" || b"E" || counter.
    `seconds` adds up the time spent sealing and opening (what `enshuffle bench` reports), by `clock`.
    """

    # Larger messages are encrypted part by part, without joining them; smaller ones are joined
    # (one copy) and sealed in one call on the session's AESGCM object. A new cipher context costs
    # about what copying 128 KiB does (measured): above that, the copy costs more.
    STREAM_THRESHOLD = 128 << 10
    # What `seconds` is measured with: wall time by default (a cheap clock); `enshuffle bench`
    # sets time.thread_time, the CPU time of this thread, which a busy machine does not inflate.
    clock = staticmethod(time.perf_counter)

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        self._send_aes = algorithms.AES(send_key)  # for the part-by-part cipher contexts
        self._send = AESGCM(send_key)
        self._recv = AESGCM(recv_key)
        self.sent = 0  # next counter to send
        self.received = -1  # last counter opened
        self.seconds = 0.0

    def seal(self, command: str, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> list:
        """The one frame (as a one-element list) of a sealed message."""
        if COMMANDS.get(command) is None or COMMANDS[command].kind != KIND_SEALED:
            raise ValueError(f"{command} is not a session message")
        return self.seal_parts(inner_parts(command, header, arrays))

    def seal_parts(self, parts: list) -> list:
        """Seal inner bytes given as parts (what `seal` encoded; tests seal malformed ones)."""
        start = self.clock()
        counter = self.sent
        self.sent += 1
        envelope = TAG + KIND_SEALED + counter.to_bytes(COUNTER_BYTES, "big")
        nonce = bytes(4) + envelope[PREFIX_BYTES:]
        views = [memoryview(p) for p in parts]
        size = sum(v.nbytes for v in views)
        # numpy's empty: no zero-filling of a buffer every byte of which is written below
        out = memoryview(np.empty(len(envelope) + size + TAG_BYTES, dtype=np.uint8))  # type: ignore[arg-type]  # numpy types ndarray as a buffer only on 3.12+
        out[: len(envelope)] = envelope
        body = out[len(envelope) :]
        if size <= self.STREAM_THRESHOLD:
            self._send.encrypt_into(nonce, b"".join(views), envelope, body)
        else:
            enc = Cipher(self._send_aes, modes.GCM(nonce)).encryptor()
            enc.authenticate_additional_data(envelope)
            offset = 0
            for view in views:
                n = view.nbytes
                if n:
                    # update_into may hold back up to a block; it wants room for len + 15 bytes,
                    # which the tag's 16 bytes of slack cover
                    offset += enc.update_into(view, body[offset : offset + n + 15])
            tail = enc.finalize()
            body[offset : offset + len(tail)] = tail
            offset += len(tail)
            body[offset : offset + TAG_BYTES] = enc.tag
        self.seconds += self.clock() - start
        return [out]

    def open(self, frames: list, *, limits: Limits = DEFAULT_LIMITS) -> Message:
        """Decrypt, check the counter, then decode one sealed message. Its arrays are read-only
        views of a plaintext buffer of its own, allocated here and never written again: a
        receiver may keep them (a fetched resident state becomes a checkpoint without a copy)."""
        kind, view = frame_kind(frames, limits)
        if kind != KIND_SEALED:
            raise ProtocolError(WRONG_KIND, f"a {kind!r} message inside a session; only sealed ones belong here")
        if view.nbytes < PREFIX_BYTES + COUNTER_BYTES + TAG_BYTES:
            raise ProtocolError(BAD_SEAL, f"sealed message of {view.nbytes} bytes is too short")
        start = self.clock()
        envelope = view[: PREFIX_BYTES + COUNTER_BYTES].tobytes()
        counter = int.from_bytes(envelope[5:], "big")
        if counter <= self.received:
            raise ProtocolError(
                BAD_SEAL, f"counter {counter} is not above {self.received}: a replayed or reordered message"
            )
        out = _aligned_empty(view.nbytes - len(envelope) - TAG_BYTES)  # fully written: not zeroed
        try:
            # (out is a writable buffer; the ignore: numpy types ndarray as a buffer only on 3.12+)
            self._recv.decrypt_into(bytes(4) + envelope[5:], view[len(envelope) :], envelope, out)  # type: ignore[arg-type]
        except InvalidTag:
            raise ProtocolError(BAD_SEAL, "sealed message does not authenticate under this session's key") from None
        self.received = counter
        self.seconds += self.clock() - start
        return decode_inner(memoryview(out), limits=limits, kind=KIND_SEALED)  # type: ignore[arg-type]  # numpy types ndarray as a buffer only on 3.12+
