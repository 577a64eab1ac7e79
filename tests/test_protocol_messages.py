"""ENS1 codec: round trips, zero copy, and every malformed message caught with the right code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from enshuffle.protocol.keys import Identity
from enshuffle.protocol.messages import (ALLOWED_DTYPES, COMMANDS, PROTOCOL_VERSION, TAG, Limits,
                                         ProtocolError, decode, encode, encode_unsigned,
                                         signed_bytes, verify, verify_self_signed)

REPO = Path(__file__).resolve().parents[1]
COORD = Identity.generate()
NODE = Identity.generate()
RNG = np.random.default_rng(7)


def _array(dtype: str, shape=(3, 4)) -> np.ndarray:
    if dtype.startswith("float"):
        return RNG.standard_normal(shape).astype(dtype)
    return RNG.integers(0, 200, size=shape).astype(dtype)


# One valid header per command, with the key each is signed by and the arrays it carries.
def _examples() -> dict[str, tuple[dict, dict, Identity]]:
    return {
        "HELLO": ({"protocol": PROTOCOL_VERSION, "node_key": NODE.public_hex, "name": "lab-pc",
                   "nonce": "a1b2", "capabilities": {"ops": ["matmul", "sigmoid"], "threads": 2,
                                                      "credit": 4}}, {}, NODE),
        "WELCOME": ({"run_id": "run-1", "coordinator_key": COORD.public_hex, "node_key": NODE.public_hex,
                     "nonce": "a1b2", "node_id": "n1", "credit": 4, "heartbeat_ms": 1000,
                     "lease": {"min_ms": 2000, "multiple": 4.0, "initial_ms": 30000}}, {}, COORD),
        "REFUSE": ({"coordinator_key": COORD.public_hex, "nonce": "a1b2", "code": "version-mismatch",
                    "text": "this coordinator speaks protocol 1"}, {}, COORD),
        "STATIC": ({"run_id": "run-1", "name": "x/0", "seq": 0}, {"x/0": _array("uint8", (5, 7))}, COORD),
        "BATCH": ({"run_id": "run-1", "batch_id": "b-17", "seq": 1, "step": 3, "op": "matmul",
                   "params": {"transpose_a": False, "a_static": None}, "lease_ms": 2000},
                  {"a": _array("float32", (2, 3)), "b": _array("float32", (3, 5))}, COORD),
        "RESULT": ({"run_id": "run-1", "batch_id": "b-17", "seq": 1, "compute_seconds": 0.004},
                   {"c": _array("float32", (2, 5))}, NODE),
        "REJECT": ({"run_id": "run-1", "batch_id": "b-17", "seq": 1, "code": "unknown-static",
                    "text": "no static operand 'x/3'"}, {}, NODE),
        "HEARTBEAT": ({"node_id": "n1", "credit": 3, "outstanding": 1}, {}, NODE),
        "BYE": ({"node_id": "n1", "reason": "shutdown"}, {}, COORD),
    }


EXAMPLES = _examples()


def _frames(command: str, **header_changes) -> list:
    header, arrays, signer = EXAMPLES[command]
    return encode(command, {**header, **header_changes}, arrays, signer)


def _code(frames, limits: Limits = Limits()) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits=limits)
    return info.value.code


def _with_header(frames: list, mutate) -> list:
    """Frames whose header JSON was changed by `mutate(dict)` (not re-signed)."""
    header = json.loads(bytes(frames[2]))
    mutate(header)
    return [*frames[:2], json.dumps(header).encode(), *frames[3:]]


def test_the_command_table_is_what_the_examples_cover():
    assert set(EXAMPLES) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_command_round_trips_and_verifies(command):
    header, arrays, signer = EXAMPLES[command]
    message = decode(encode(command, header, arrays, signer))
    assert message.command == command
    assert message.header == header
    assert list(message.arrays) == list(arrays)
    for name, array in arrays.items():
        assert message.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(message.arrays[name], array)
    verify(message, signer.public_bytes)
    other = NODE if signer is COORD else COORD
    with pytest.raises(ProtocolError) as info:
        verify(message, other.public_bytes)
    assert info.value.code == "bad-signature"


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_arrays_of_every_allowed_dtype_and_shape_round_trip(dtype):
    arrays = {"scalar": _array(dtype, ()), "empty": _array(dtype, (0, 3)),
              "vector": _array(dtype, (7,)), "block": _array(dtype, (2, 3, 4, 5))}
    header = {"run_id": "r", "batch_id": "b", "seq": 0, "compute_seconds": 0}
    message = decode(encode("RESULT", header, arrays, NODE))
    for name, array in arrays.items():
        assert message.arrays[name].shape == array.shape
        assert message.arrays[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(message.arrays[name], array)
    verify(message, NODE.public_bytes)


def test_header_is_canonical_json_and_frame_layout_matches_the_spec():
    frames = _frames("BATCH")
    assert frames[0] == TAG and frames[1] == b"BATCH"
    header = json.loads(frames[2])
    assert frames[2] == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert header["arrays"] == [{"name": "a", "dtype": "float32", "shape": [2, 3]},
                                {"name": "b", "dtype": "float32", "shape": [3, 5]}]
    assert len(frames) == 3 + 2 + 1 and len(frames[-1]) == 64


def test_encode_does_not_copy_contiguous_arrays_and_decode_does_not_copy_frames():
    a = _array("float64", (50, 40))
    frames = encode("STATIC", {"run_id": "r", "name": "x", "seq": 0}, {"x": a}, COORD)
    assert isinstance(frames[3], memoryview)
    assert np.shares_memory(np.frombuffer(frames[3], np.uint8), a)
    received = [bytes(f) for f in frames]  # what a socket hands over: new buffers
    decoded = decode(received).arrays["x"]
    assert np.shares_memory(decoded, np.frombuffer(received[3], np.uint8))
    assert not decoded.flags.writeable


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly():
    base = _array("float64", (6, 8))
    arrays = {"t": base.T, "be": base.astype(">f8"), "strided": base[::2, ::3]}
    frames = encode("RESULT", {"run_id": "r", "batch_id": "b", "seq": 0, "compute_seconds": 0.1},
                    arrays, NODE)
    message = decode(frames)
    for name, array in arrays.items():
        np.testing.assert_array_equal(message.arrays[name], array)
    assert message.arrays["be"].dtype == np.dtype("<f8")


def test_round_trip_over_real_zeromq_sockets_without_copies():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.linger = 0
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        big = _array("float32", (600, 500))  # 1.2 MB: above pyzmq's copy threshold
        header = {"run_id": "run-1", "batch_id": "b-1", "seq": 5, "compute_seconds": 0.25}
        dealer.send_multipart(encode("RESULT", header, {"c": big}, NODE), copy=False)
        assert router.poll(5000), "no message arrived within 5 s"
        identity, *frames = router.recv_multipart(copy=False)
        assert all(isinstance(f, zmq.Frame) for f in frames)
        message = decode(frames)
        verify(message, NODE.public_bytes)
        assert message.header == header
        np.testing.assert_array_equal(message.arrays["c"], big)
        assert np.shares_memory(message.arrays["c"], np.frombuffer(frames[3].buffer, np.uint8))
    finally:
        router.close()
        dealer.close()
        ctx.term()


# --- malformed messages ------------------------------------------------------------------------

def test_wrong_frame_count():
    frames = _frames("BATCH")
    assert _code(frames[:3]) == "bad-frame-count"
    assert _code([]) == "bad-frame-count"
    assert _code(frames[:-2] + frames[-1:]) == "bad-frame-count"  # one payload missing
    assert _code(frames[:-1] + [b"extra"] + frames[-1:]) == "bad-frame-count"
    assert _code(frames, Limits(max_frames=5)) == "bad-frame-count"


def test_wrong_protocol_tag_and_version():
    frames = _frames("HEARTBEAT")
    assert _code([b"HTTP/1.1", *frames[1:]]) == "bad-tag"
    assert _code([b"ENS2", *frames[1:]]) == "bad-version"


def test_unknown_command():
    frames = _frames("HEARTBEAT")
    assert _code([frames[0], b"PING", *frames[2:]]) == "unknown-command"
    assert _code([frames[0], b"\xff\x00", *frames[2:]]) == "unknown-command"
    with pytest.raises(ProtocolError) as info:
        encode("PING", {}, None, NODE)
    assert info.value.code == "unknown-command"


@pytest.mark.parametrize("raw", [b"not json", b"\xff\xfe{}", b'[1, 2]', b'"text"', b"",
                                 b'{"node_id":"n","credit":1,"outstanding":NaN,"arrays":[]}',
                                 b'{"node_id":"n","node_id":"m","credit":1,"outstanding":0,"arrays":[]}'])
def test_header_not_a_json_object(raw):
    frames = _frames("HEARTBEAT")
    assert _code([*frames[:2], raw, *frames[3:]]) == "bad-header"


@pytest.mark.parametrize("command,field", [(c, f) for c in sorted(COMMANDS) for f in COMMANDS[c].fields])
def test_every_missing_header_field_is_caught(command, field):
    frames = _with_header(_frames(command), lambda h: h.pop(field))
    assert _code(frames) == "bad-header"


@pytest.mark.parametrize("command,field,value", [
    ("BATCH", "seq", "1"), ("BATCH", "seq", True), ("BATCH", "seq", -1), ("BATCH", "op", "conv2d"),
    ("BATCH", "params", []), ("BATCH", "lease_ms", 0), ("WELCOME", "credit", 0),
    ("HELLO", "node_key", "ab" * 31), ("HELLO", "node_key", "AB" * 32),
    ("HELLO", "capabilities", {"ops": ["matmul"], "threads": 0, "credit": 2}),
    ("WELCOME", "lease", {"min_ms": 2000, "multiple": 4.0}),
    ("RESULT", "compute_seconds", None), ("STATIC", "name", "bad name!"), ("REJECT", "code", 5),
])
def test_wrongly_typed_header_fields_are_caught(command, field, value):
    frames = _with_header(_frames(command), lambda h: h.__setitem__(field, value))
    assert _code(frames) == "bad-header"
    header = {**EXAMPLES[command][0], field: value}
    with pytest.raises(ProtocolError) as info:  # the sender catches it too
        encode(command, header, EXAMPLES[command][1], EXAMPLES[command][2])
    assert info.value.code == "bad-header"


def test_missing_arrays_list_is_a_bad_header():
    assert _code(_with_header(_frames("HEARTBEAT"), lambda h: h.pop("arrays"))) == "bad-header"


def test_dtype_not_allowed():
    frames = _with_header(_frames("BATCH"), lambda h: h["arrays"][0].__setitem__("dtype", "object"))
    assert _code(frames) == "bad-array"
    frames = _with_header(_frames("BATCH"), lambda h: h["arrays"][0].__setitem__("dtype", ">f4"))
    assert _code(frames) == "bad-array"
    for bad in (np.array(["x"]), np.zeros(3, np.float16), np.zeros(2, complex), np.array([None])):
        with pytest.raises(ProtocolError) as info:
            encode("RESULT", {"run_id": "r", "batch_id": "b", "seq": 0, "compute_seconds": 0},
                   {"c": bad}, NODE)
        assert info.value.code == "bad-array"


@pytest.mark.parametrize("shape", [[3, 3], [2, 3, 1], [6], [2, -3], [2, 3.0], "23", [1, 1, 1, 1, 6]])
def test_shape_and_payload_size_mismatch(shape):
    frames = _with_header(_frames("BATCH"), lambda h: h["arrays"][0].__setitem__("shape", shape))
    if shape in ([2, 3, 1], [6]):  # same byte count, different shape: valid, reshaped
        assert decode(frames).arrays["a"].shape == tuple(shape)
    else:
        assert _code(frames) == "bad-array"


def test_truncated_payload_and_bad_array_entries():
    frames = _frames("BATCH")
    assert _code([*frames[:3], bytes(frames[3])[:-1], *frames[4:]]) == "bad-array"
    assert _code(_with_header(frames, lambda h: h["arrays"][1].__setitem__("name", "a"))) == "bad-array"
    assert _code(_with_header(frames, lambda h: h["arrays"][0].pop("dtype"))) == "bad-array"
    assert _code(_with_header(frames, lambda h: h["arrays"][0].__setitem__("extra", 1))) == "bad-array"


def test_array_count_outside_what_the_command_carries():
    hb = _frames("HEARTBEAT")
    with_array = _with_header(hb, lambda h: h.__setitem__("arrays", [
        {"name": "z", "dtype": "uint8", "shape": [1]}]))
    assert _code([*with_array[:3], b"\x00", with_array[3]]) == "bad-array"
    with pytest.raises(ProtocolError) as info:
        encode("BATCH", EXAMPLES["BATCH"][0], {}, COORD)
    assert info.value.code == "bad-array"


def test_oversize_message_and_header():
    frames = _frames("BATCH")
    assert _code(frames, Limits(max_message_bytes=100)) == "too-large"
    assert _code(frames, Limits(max_header_bytes=50)) == "too-large"
    padded = _with_header(_frames("HEARTBEAT"), lambda h: h.__setitem__("pad", "x" * 70_000))
    assert _code(padded) == "too-large"


def test_signature_frame_of_the_wrong_length():
    frames = _frames("BATCH")
    assert _code([*frames[:-1], bytes(frames[-1])[:63]]) == "bad-signature"


def _verify_code(frames, key: bytes) -> str:
    message = decode(frames)
    with pytest.raises(ProtocolError) as info:
        verify(message, key)
    return info.value.code


def test_forged_signature_by_another_key():
    header, arrays, _ = EXAMPLES["BATCH"]
    forged = encode("BATCH", header, arrays, Identity.generate())
    assert _verify_code(forged, COORD.public_bytes) == "bad-signature"


def test_tampered_header_cannot_replay_a_batch_into_another_run_or_step():
    frames = _frames("BATCH")
    for field, value in (("run_id", "run-2"), ("seq", 2), ("step", 4), ("batch_id", "b-18")):
        tampered = _with_header(frames, lambda h: h.__setitem__(field, value))
        tampered[2] = json.dumps(json.loads(tampered[2]), sort_keys=True, separators=(",", ":")).encode()
        assert _verify_code(tampered, COORD.public_bytes) == "bad-signature"
    # Re-serialising the same header differently also breaks it: the exact bytes are signed.
    spaced = [*frames[:2], json.dumps(json.loads(frames[2])).encode(), *frames[3:]]
    assert _verify_code(spaced, COORD.public_bytes) == "bad-signature"


def test_tampered_payload():
    frames = _frames("BATCH")
    payload = bytearray(frames[3])
    payload[0] ^= 1
    assert _verify_code([*frames[:3], bytes(payload), *frames[4:]], COORD.public_bytes) == "bad-signature"
    square = {"a": _array("float32", (3, 3)), "b": _array("float32", (3, 3))}
    frames = encode("BATCH", EXAMPLES["BATCH"][0], square, COORD)
    swapped = [*frames[:3], frames[4], frames[3], frames[5]]  # same sizes: only the order changed
    np.testing.assert_array_equal(decode(swapped).arrays["a"], square["b"])
    assert _verify_code(swapped, COORD.public_bytes) == "bad-signature"


def test_signature_binds_the_command():
    header = {"node_id": "n1", "credit": 3, "outstanding": 0, "reason": "shutdown"}
    frames = encode("HEARTBEAT", header, None, NODE)
    relabelled = [frames[0], b"BYE", *frames[2:]]
    assert decode(relabelled).header["reason"] == "shutdown"  # well-formed as a BYE ...
    assert _verify_code(relabelled, NODE.public_bytes) == "bad-signature"  # ... but not signed as one


def test_hello_is_self_signed_and_a_borrowed_key_is_caught():
    assert verify_self_signed(decode(_frames("HELLO"))) == NODE.public_bytes
    header, _, _ = EXAMPLES["HELLO"]
    impostor = encode("HELLO", header, None, Identity.generate())  # claims NODE's key
    with pytest.raises(ProtocolError) as info:
        verify_self_signed(decode(impostor))
    assert info.value.code == "bad-signature"


def test_a_bad_batch_error_keeps_the_header_for_the_reject_reply():
    frames = _frames("BATCH")
    with pytest.raises(ProtocolError) as info:
        decode([*frames[:3], bytes(frames[3])[:-4], *frames[4:]])
    assert info.value.header["batch_id"] == "b-17" and info.value.header["seq"] == 1


def test_signed_bytes_are_unambiguous():
    # Moving bytes between the command and header fields must change what is signed.
    assert signed_bytes(b"AB", b"C", []) != signed_bytes(b"A", b"BC", [])
    assert signed_bytes(b"A", b"{}", [b"\x00" * 32]) != signed_bytes(b"A", b"{}", [])


def test_unsigned_encode_is_refused_and_unsigned_frames_do_not_decode():
    with pytest.raises(ValueError):
        encode("HEARTBEAT", EXAMPLES["HEARTBEAT"][0])
    frames = encode_unsigned("HEARTBEAT", EXAMPLES["HEARTBEAT"][0])
    assert _code(frames[:2]) == "bad-frame-count"
    assert _code(frames) == "bad-frame-count"  # 3 frames: no signature


def test_importing_the_protocol_does_not_import_textual():
    code = ("import sys, enshuffle.protocol as p, enshuffle.protocol.messages, enshuffle.protocol.keys; "
            "p.encode; p.TrustStore; print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the spec and the code agree -----------------------------------------------------------------

DOC = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_the_documented_signature_test_vector_matches_the_code():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    ident = Identity.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    frames = encode("RESULT", {"run_id": "r1", "batch_id": "b1", "seq": 7, "compute_seconds": 0.5},
                    {"c": np.array([[1.0, 2.0]], np.float32)}, ident)
    assert ident.public_hex in DOC and ident.fingerprint in DOC
    assert bytes(frames[2]).decode() in DOC and bytes(frames[3]).hex() in DOC
    assert bytes(frames[-1]).hex() in DOC


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_and_field_is_in_the_spec_table(command):
    row = next(line for line in DOC.splitlines() if line.startswith(f"| {command} | `"))
    for field in COMMANDS[command].fields:
        assert f"`{field}`" in row, f"{command}.{field} missing from docs/protocol.md"


def test_a_huge_dimension_beside_a_zero_is_refused_not_a_crash():
    """A zero dimension makes the size check pass for any other dimension: those are bounded too,
    and anything numpy itself cannot shape is a ProtocolError, never a ValueError."""
    import json as _json

    for shape in ([0, 10 ** 30], [0, 2 ** 30, 2 ** 30, 2 ** 30]):
        header = {"run_id": "r", "batch_id": "b", "seq": 1, "compute_seconds": 0.1,
                  "arrays": [{"name": "c", "dtype": "float32", "shape": shape}]}
        frames = [b"ENS1", b"RESULT", _json.dumps(header).encode(), b"", bytes(64)]
        with pytest.raises(ProtocolError) as info:
            decode(frames)
        assert info.value.code == "bad-array"
