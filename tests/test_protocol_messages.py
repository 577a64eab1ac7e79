"""ENS2 codec and handshake: round trips, sealing, replay, and every malformed message caught with
the right code. The attacker here holds recordings, other keys and a hex editor."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq

from enshuffle.protocol.handshake import NodeHandshake, check_hello, derive_channel, make_challenge
from enshuffle.protocol.keys import Identity
from enshuffle.protocol.messages import (
    ALLOWED_DTYPES,
    COMMANDS,
    HANDSHAKE_COMMANDS,
    KIND_SEALED,
    KIND_SIGNED,
    PROTOCOL_VERSION,
    TAG,
    Channel,
    Limits,
    ProtocolError,
    decode,
    encode,
    inner_parts,
    verify,
    verify_self_signed,
)

REPO = Path(__file__).resolve().parents[1]
COORD = Identity.generate()
NODE = Identity.generate()
RNG = np.random.default_rng(7)
HEX = "ab" * 32


def _array(dtype: str, shape=(3, 4)) -> np.ndarray:
    if dtype.startswith("float"):
        return RNG.standard_normal(shape).astype(dtype)
    return RNG.integers(0, 200, size=shape).astype(dtype)


# One valid header per command, with the key each is signed by (None: unsigned or sealed) and its arrays.
def _examples() -> dict[str, tuple[dict, dict, Identity | None]]:
    return {
        "HI": ({"protocol": PROTOCOL_VERSION, "nonce": "a1b2"}, {}, None),
        "CHALLENGE": (
            {
                "protocol": PROTOCOL_VERSION,
                "coordinator_key": COORD.public_hex,
                "run_id": "run-1",
                "challenge": HEX,
                "nonce": "a1b2",
                "kx": HEX,
            },
            {},
            COORD,
        ),
        "HELLO": (
            {
                "protocol": PROTOCOL_VERSION,
                "node_key": NODE.public_hex,
                "name": "lab-pc",
                "nonce": "a1b2",
                "challenge": HEX,
                "coordinator_key": COORD.public_hex,
                "run_id": "run-1",
                "kx": HEX,
                "capabilities": {"ops": ["matmul", "resident"], "threads": 2, "credit": 4},
            },
            {},
            NODE,
        ),
        "WELCOME": (
            {
                "run_id": "run-1",
                "coordinator_key": COORD.public_hex,
                "node_key": NODE.public_hex,
                "nonce": "a1b2",
                "challenge": HEX,
                "node_id": "n1",
                "credit": 4,
                "heartbeat_ms": 1000,
                "lease": {"min_ms": 2000, "multiple": 4.0, "initial_ms": 30000},
            },
            {},
            COORD,
        ),
        "REFUSE": (
            {
                "coordinator_key": COORD.public_hex,
                "nonce": "a1b2",
                "code": "version-mismatch",
                "text": "this coordinator speaks protocol 2",
            },
            {},
            COORD,
        ),
        "DECLINE": ({"nonce": "a1b2", "code": "untrusted-key", "text": "pinned another key"}, {}, None),
        "STATIC": ({"run_id": "run-1", "name": "x/0", "seq": 0}, {"x/0": _array("float64", (5, 7))}, None),
        "BATCH": (
            {
                "run_id": "run-1",
                "batch_id": "b-17",
                "seq": 1,
                "step": 3,
                "op": "matmul",
                "params": {"transpose_a": False, "a_static": None},
                "lease_ms": 2000,
            },
            {"a": _array("float32", (2, 3)), "b": _array("float32", (3, 5))},
            None,
        ),
        "RESULT": (
            {"run_id": "run-1", "batch_id": "b-17", "seq": 1, "compute_seconds": 0.004},
            {"c": _array("float32", (2, 5))},
            None,
        ),
        "REJECT": (
            {
                "run_id": "run-1",
                "batch_id": "b-17",
                "seq": 1,
                "code": "unknown-static",
                "text": "no static operand 'x/3'",
            },
            {},
            None,
        ),
        "HEARTBEAT": ({"node_id": "n1", "credit": 3, "outstanding": 1}, {}, None),
        "BYE": ({"node_id": "n1", "reason": "shutdown"}, {}, None),
    }


EXAMPLES = _examples()


def pair() -> tuple[Channel, Channel]:
    """Two ends of one session (coordinator, node), from a real handshake."""
    hs = NodeHandshake(NODE, "n", {"ops": ["matmul"], "threads": 1, "credit": 2})
    challenge_frames, pending = make_challenge(COORD, "run-1", decode(hs.hi()))
    challenge = decode(challenge_frames)
    hs.check_challenge(challenge)
    hello = decode(hs.hello(challenge))
    key, coordinator = check_hello(pending, hello, COORD, "run-1")
    assert key == NODE.public_bytes
    welcome = decode(
        encode("WELCOME", {**EXAMPLES["WELCOME"][0], "challenge": pending.challenge, "nonce": hs.nonce}, signer=COORD)
    )
    return coordinator, hs.welcome(welcome)


def _frames(command: str, **changes) -> list:
    header, arrays, signer = EXAMPLES[command]
    if command in HANDSHAKE_COMMANDS:
        return encode(command, {**header, **changes}, arrays, signer)
    return Channel(bytes(32), bytes(32)).seal(command, {**header, **changes}, arrays)


def _code(frames, limits: Limits = Limits()) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits=limits)
    return info.value.code


def test_the_command_table_is_what_the_examples_cover():
    assert set(EXAMPLES) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_command_round_trips(command):
    header, arrays, signer = EXAMPLES[command]
    if command in HANDSHAKE_COMMANDS:
        message = decode(encode(command, header, arrays, signer))
        if signer is not None:
            verify(message, signer.public_bytes)
            other = NODE if signer is COORD else COORD
            with pytest.raises(ProtocolError) as info:
                verify(message, other.public_bytes)
            assert info.value.code == "bad-signature"
    else:
        coordinator, node = pair()
        sender, receiver = (
            (node, coordinator) if COMMANDS[command].direction == "node->coordinator" else (coordinator, node)
        )
        message = receiver.open(sender.seal(command, header, arrays))
    assert message.command == command
    assert message.header == header
    assert list(message.arrays) == list(arrays)
    for name, array in arrays.items():
        assert message.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(message.arrays[name], array)


@pytest.mark.parametrize("dtype", ALLOWED_DTYPES)
def test_arrays_of_every_allowed_dtype_and_shape_round_trip(dtype):
    arrays = {
        "scalar": _array(dtype, ()),
        "empty": _array(dtype, (0, 3)),
        "vector": _array(dtype, (7,)),
        "block": _array(dtype, (2, 3, 4, 5)),
    }
    header = {"run_id": "r", "batch_id": "b", "seq": 0, "compute_seconds": 0}
    coordinator, node = pair()
    message = coordinator.open(node.seal("RESULT", header, arrays))
    for name, array in arrays.items():
        assert message.arrays[name].shape == array.shape
        assert message.arrays[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(message.arrays[name], array)


def test_a_large_sealed_message_round_trips_and_is_one_frame():
    """Above Channel.STREAM_THRESHOLD the parts are encrypted one after another, not joined."""
    coordinator, node = pair()
    big = _array("float64", (600, 500))
    frames = node.seal(
        "RESULT", {"run_id": "r", "batch_id": "b", "seq": 1, "compute_seconds": 0.1}, {"c": big, "d": big[:3].copy()}
    )
    assert len(frames) == 1 and bytes(frames[0][:5]) == TAG + KIND_SEALED
    assert big.tobytes() not in bytes(frames[0])  # encrypted, not just framed
    message = coordinator.open(frames)
    np.testing.assert_array_equal(message.arrays["c"], big)
    assert not message.arrays["c"].flags.writeable


def test_an_opened_message_keeps_a_buffer_of_its_own():
    """What a receiver keeps of an opened message (a fetched resident state is kept as the
    checkpoint) is not shared with, or overwritten by, the messages opened after it."""
    coordinator, node = pair()
    header = {"run_id": "r", "batch_id": "b", "seq": 1, "compute_seconds": 0.1}
    first = _array("float64", (300, 200))
    kept = coordinator.open(node.seal("RESULT", header, {"c": first})).arrays["c"]
    later = [coordinator.open(node.seal("RESULT", header, {"c": -first})).arrays["c"] for _ in range(3)]
    np.testing.assert_array_equal(kept, first)
    assert not any(np.shares_memory(kept, other) for other in later)
    assert not kept.flags.writeable


def test_inner_layout_matches_the_spec():
    parts = inner_parts("BATCH", EXAMPLES["BATCH"][0], EXAMPLES["BATCH"][1])
    prefix = bytes(parts[0])
    assert prefix[0] == len(b"BATCH") and prefix[1:6] == b"BATCH"
    (length,) = struct.unpack(">I", prefix[6:10])
    header = json.loads(prefix[10 : 10 + length])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    # canonical JSON, then spaces up to the first payload's 64-byte boundary of inner
    assert prefix[10 : 10 + length] == canonical + b" " * (length - len(canonical))
    assert len(prefix) % 64 == 0 and length - len(canonical) < 64
    assert header["arrays"] == [
        {"name": "a", "dtype": "float32", "shape": [2, 3]},
        {"name": "b", "dtype": "float32", "shape": [3, 5]},
    ]
    assert len(prefix) == 10 + length and len(parts) == 3
    frame = bytes(encode("REFUSE", EXAMPLES["REFUSE"][0], signer=COORD)[0])
    assert (
        frame[:5] == TAG + KIND_SIGNED
        and len(frame) == 5 + len(bytes(inner_parts("REFUSE", EXAMPLES["REFUSE"][0])[0])) + 64
    )


def test_non_contiguous_and_big_endian_arrays_are_sent_correctly():
    base = _array("float64", (6, 8))
    arrays = {"t": base.T, "be": base.astype(">f8"), "strided": base[::2, ::3]}
    coordinator, node = pair()
    message = coordinator.open(
        node.seal("RESULT", {"run_id": "r", "batch_id": "b", "seq": 0, "compute_seconds": 0.1}, arrays)
    )
    for name, array in arrays.items():
        np.testing.assert_array_equal(message.arrays[name], array)
    assert message.arrays["be"].dtype == np.dtype("<f8")


def test_round_trip_over_real_zeromq_sockets():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.linger = 0
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        coordinator, node = pair()
        big = _array("float32", (600, 500))
        header = {"run_id": "run-1", "batch_id": "b-1", "seq": 5, "compute_seconds": 0.25}
        dealer.send_multipart(node.seal("RESULT", header, {"c": big}), copy=False)
        assert router.poll(5000), "no message arrived within 5 s"
        identity, *frames = router.recv_multipart(copy=False)
        message = coordinator.open(frames)
        assert message.header == header
        np.testing.assert_array_equal(message.arrays["c"], big)
    finally:
        router.close()
        dealer.close()
        ctx.term()


# --- sealing: what an eavesdropper, a replayer and a forger get ---------------------------------


def test_a_replayed_or_reordered_sealed_message_is_refused():
    coordinator, node = pair()
    first = node.seal("HEARTBEAT", EXAMPLES["HEARTBEAT"][0])
    second = node.seal("HEARTBEAT", EXAMPLES["HEARTBEAT"][0])
    coordinator.open(second)
    for frames in (second, first):  # a replay, and an older message delivered late
        with pytest.raises(ProtocolError) as info:
            coordinator.open(frames)
        assert info.value.code == "bad-seal"


def test_a_flipped_bit_anywhere_fails_authentication():
    coordinator, node = pair()
    frames = node.seal("RESULT", EXAMPLES["RESULT"][0], EXAMPLES["RESULT"][1])
    raw = bytes(frames[0])
    for position in (5, 12, 14, len(raw) // 2, len(raw) - 1):  # counter, ciphertext, tag
        tampered = bytearray(raw)
        tampered[position] ^= 0x01
        with pytest.raises(ProtocolError) as info:
            coordinator.open([bytes(tampered)])
        assert info.value.code == "bad-seal", position
    assert coordinator.open(frames).command == "RESULT"  # the genuine one still opens


def test_each_direction_and_session_has_its_own_key():
    coordinator, node = pair()
    other_coordinator, other_node = pair()
    frames = node.seal("HEARTBEAT", EXAMPLES["HEARTBEAT"][0])
    for wrong in (node, other_coordinator):  # its own direction reflected back; another session
        with pytest.raises(ProtocolError) as info:
            wrong.open(frames)
        assert info.value.code == "bad-seal"


def test_a_recorded_hello_is_worthless_in_another_handshake():
    hs = NodeHandshake(NODE, "n", {"ops": ["matmul"], "threads": 1, "credit": 2})
    challenge_frames, pending = make_challenge(COORD, "run-1", decode(hs.hi()))
    challenge = decode(challenge_frames)
    hs.check_challenge(challenge)
    recorded = decode(hs.hello(challenge))
    check_hello(pending, recorded, COORD, "run-1")  # genuine, the first time
    # The attacker replays it on a new connection (new challenge), to the same or another coordinator.
    for coordinator, run in ((COORD, "run-1"), (COORD, "run-2"), (Identity.generate(), "run-1")):
        _, new_pending = make_challenge(coordinator, run, decode(hs.hi()))
        with pytest.raises(ProtocolError) as info:
            check_hello(new_pending, recorded, coordinator, run)
        assert info.value.code == "bad-hello"


def test_a_hello_edited_to_answer_the_new_challenge_fails_its_signature():
    hs = NodeHandshake(NODE, "n", {"ops": ["matmul"], "threads": 1, "credit": 2})
    _, pending = make_challenge(COORD, "run-1", decode(hs.hi()))
    challenge = decode(make_challenge(COORD, "run-1", decode(hs.hi()))[0])
    raw = bytes(hs.hello(challenge)[0])
    edited = raw.replace(challenge.header["challenge"].encode(), pending.challenge.encode())  # the attacker...
    assert edited != raw
    hello = decode([edited])
    with pytest.raises(ProtocolError) as info:  # ...but the signature covers the bytes sent
        check_hello(pending, hello, COORD, "run-1")
    assert info.value.code == "bad-signature"


def test_session_keys_need_the_ephemeral_private_key():
    """An eavesdropper has CHALLENGE and HELLO (both public) but neither X25519 private key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    hs = NodeHandshake(NODE, "n", {"ops": ["matmul"], "threads": 1, "credit": 2})
    challenge_frames, pending = make_challenge(COORD, "run-1", decode(hs.hi()))
    challenge = decode(challenge_frames)
    hs.check_challenge(challenge)
    hello = decode(hs.hello(challenge))
    _, coordinator = check_hello(pending, hello, COORD, "run-1")
    guess = derive_channel("node", X25519PrivateKey.generate(), challenge.header["kx"], challenge.inner, hello.inner)
    frames = coordinator.seal("BATCH", EXAMPLES["BATCH"][0], EXAMPLES["BATCH"][1])
    with pytest.raises(ProtocolError):
        guess.open(frames)


# --- malformed messages ------------------------------------------------------------------------


def test_wrong_frame_count_and_tag():
    frames = _frames("HI")
    assert _code([*frames, b"extra"]) == "bad-frame-count"
    assert _code([]) == "bad-frame-count"
    assert _code([b"ENS1HELLO"]) == "bad-version"
    assert _code([b"HTTP/1.1 GET"]) == "bad-tag"
    assert _code([TAG + b"Z" + bytes(20)]) == "bad-tag"


def test_sealed_messages_outside_a_session_and_handshakes_inside_one_are_refused():
    assert _code(_frames("BATCH")) == "wrong-kind"
    coordinator, node = pair()
    with pytest.raises(ProtocolError) as info:
        coordinator.open(_frames("HELLO"))
    assert info.value.code == "wrong-kind"
    with pytest.raises(ValueError):
        encode("BATCH", EXAMPLES["BATCH"][0], EXAMPLES["BATCH"][1], COORD)
    with pytest.raises(ValueError):
        node.seal("HELLO", EXAMPLES["HELLO"][0])


def _sealed_inner(inner: bytes) -> list:
    coordinator, node = pair()
    return coordinator, node.seal_parts([inner])


def _open_code(inner: bytes, limits: Limits = Limits()) -> str:
    coordinator, frames = _sealed_inner(inner)
    with pytest.raises(ProtocolError) as info:
        coordinator.open(frames, limits=limits)
    return info.value.code


def _inner(command: bytes, header: bytes, payload: bytes = b"") -> bytes:
    return bytes([len(command)]) + command + struct.pack(">I", len(header)) + header + payload


def test_unknown_command_and_bad_headers():
    assert _open_code(_inner(b"STEAL", b"{}")) == "unknown-command"
    for raw in (b"[]", b"{not json", b'{"a":1,"a":2}', b'{"x":NaN}', b"\xff\xfe"):
        assert _open_code(_inner(b"HEARTBEAT", raw)) == "bad-header"
    assert _open_code(_inner(b"HEARTBEAT", b'{"arrays":[],"node_id":"n"}')) == "bad-header"  # lacks fields
    assert _open_code(_inner(b"HEARTBEAT", b'{"node_id":"n","credit":1,"outstanding":0}')) == "bad-header"  # no arrays
    assert _open_code(b"\x09HEARTBEAT\x00\x00\xff\xff") == "bad-header"  # ends inside the header


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_every_missing_header_field_is_caught(command):
    header = EXAMPLES[command][0]
    for field in COMMANDS[command].fields:
        changed = {k: v for k, v in header.items() if k != field}
        with pytest.raises(ProtocolError) as info:
            inner_parts(command, changed)
        assert info.value.code == "bad-header"


@pytest.mark.parametrize(
    "command,field,value",
    [
        ("HELLO", "protocol", "2"),
        ("HELLO", "node_key", "XYZ"),
        ("BATCH", "seq", -1),
        ("BATCH", "seq", True),
        ("BATCH", "op", "rm -rf"),
        ("RESULT", "compute_seconds", float("nan")),
        ("WELCOME", "credit", 0),
        ("HEARTBEAT", "credit", 2**60),
        ("STATIC", "name", "no spaces!"),
        ("CHALLENGE", "kx", "00"),
    ],
)
def test_wrongly_typed_header_fields_are_caught(command, field, value):
    with pytest.raises(ProtocolError) as info:
        inner_parts(command, {**EXAMPLES[command][0], field: value}, EXAMPLES[command][1])
    assert info.value.code == "bad-header"


def test_array_entries_sizes_and_counts():
    entry = lambda **e: {"name": "c", "dtype": "float32", "shape": [1, 2], **e}  # noqa: E731
    base = {"run_id": "r", "batch_id": "b", "seq": 1, "compute_seconds": 0.1}

    def code(entries, payload: bytes) -> str:
        return _open_code(_inner(b"RESULT", json.dumps({**base, "arrays": entries}).encode(), payload))

    assert code([entry(dtype="object")], bytes(8)) == "bad-array"
    assert code([entry(dtype="float16")], bytes(4)) == "bad-array"
    assert code([entry(dtype=["float32"])], bytes(8)) == "bad-array"  # not a name at all
    assert code([entry(shape=[1, True])], bytes(4)) == "bad-array"
    assert code([entry()], bytes(7)) == "bad-array"  # too short
    assert code([entry()], bytes(9)) == "bad-array"  # trailing bytes
    assert code([entry(), entry()], bytes(16)) == "bad-array"  # repeated name
    assert code([entry(shape=[1, 1, 1, 1, 1])], bytes(4)) == "bad-array"
    assert code([entry(extra=1)], bytes(8)) == "bad-array"
    assert code([], b"") == "bad-array"  # a RESULT carries 1..8 arrays
    # A zero dimension makes the size check pass for any other: those are bounded too.
    assert code([entry(shape=[0, 10**30])], b"") == "bad-array"


def test_oversize_message_and_header():
    limits = Limits(max_message_bytes=1000, max_header_bytes=100)
    coordinator, node = pair()
    with pytest.raises(ProtocolError) as info:
        coordinator.open(node.seal("RESULT", EXAMPLES["RESULT"][0], {"c": np.zeros(300)}), limits=limits)
    assert info.value.code == "too-large"
    assert _open_code(_inner(b"HEARTBEAT", b"{" + b" " * 200 + b"}"), limits) == "too-large"
    assert _code(_frames("HI", nonce="x" * 9000)) == "too-large"  # handshakes are small


def test_signature_covers_kind_and_bytes():
    frames = _frames("REFUSE")
    raw = bytearray(frames[0])
    raw[-70] ^= 1  # inside the header text
    with pytest.raises(ProtocolError):
        verify_self_signed(decode([bytes(raw)]))
    impostor = encode("HELLO", EXAMPLES["HELLO"][0], signer=COORD)  # carries NODE's key, signed by COORD
    with pytest.raises(ProtocolError) as info:
        verify_self_signed(decode(impostor))
    assert info.value.code == "bad-signature"


def test_importing_the_protocol_does_not_import_textual():
    code = (
        "import sys, enshuffle.protocol as p, enshuffle.protocol.messages, enshuffle.protocol.keys, "
        "enshuffle.protocol.handshake; p.encode; p.TrustStore; print('textual' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the spec and the code agree -----------------------------------------------------------------

DOC = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")


def test_the_documented_test_vectors_match_the_code():
    """The signature vector and the key schedule / AEAD vector in docs/protocol.md."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    ident = Identity.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    frames = encode(
        "REFUSE", {"coordinator_key": ident.public_hex, "nonce": "a1b2", "code": "busy", "text": "full"}, signer=ident
    )
    assert ident.public_hex in DOC and ident.fingerprint in DOC
    assert bytes(frames[0]).hex() in DOC
    channel = Channel(bytes(range(32)), bytes(32))
    sealed = channel.seal("HEARTBEAT", {"node_id": "n1", "credit": 2, "outstanding": 0})
    assert bytes(sealed[0]).hex() in DOC


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_and_field_is_in_the_spec_table(command):
    row = next(line for line in DOC.splitlines() if line.startswith(f"| {command} | `"))
    for field in COMMANDS[command].fields:
        assert f"`{field}`" in row, f"{command}.{field} missing from docs/protocol.md"


def test_nonces_never_repeat_within_a_session():
    coordinator, node = pair()
    counters = {bytes(node.seal("HEARTBEAT", EXAMPLES["HEARTBEAT"][0])[0][5:13]) for _ in range(1000)}
    assert len(counters) == 1000  # (keys are fresh per session: test_each_direction_and_session_has_its_own_key)


def test_opened_arrays_are_aligned_and_unpadded_senders_still_work():
    """A sender pads its header so the payloads start at a 64-byte boundary of inner, and a
    receiver opens into a 64-byte aligned buffer: each array (after one whose size is a multiple
    of 64 bytes) starts aligned. A sender that does not pad (a node written from an older text of
    the spec) is read the same, its arrays merely unaligned."""
    coordinator, node = pair()
    header = {"run_id": "r", "batch_id": "b", "seq": 1, "compute_seconds": 0.1}
    first, second = _array("float32", (16, 32)), _array("float64", (7, 3))
    for seq in range(1, 4):
        message = coordinator.open(node.seal("RESULT", dict(header, seq=seq), {"c": first, "d": second}))
        assert message.arrays["c"].ctypes.data % 64 == 0 and message.arrays["d"].ctypes.data % 64 == 0
        np.testing.assert_array_equal(message.arrays["c"], first)
        np.testing.assert_array_equal(message.arrays["d"], second)
    for batch_id in ("b", "bb"):  # one of two lengths that differ by a byte is not a multiple of 64
        parts = inner_parts("RESULT", dict(header, seq=4, batch_id=batch_id), {"c": first})
        prefix = bytes(parts[0])
        start = 1 + len(b"RESULT")
        raw = prefix[start + 4 :].rstrip(b" ")
        unpadded = prefix[:start] + struct.pack(">I", len(raw)) + raw
        if len(unpadded) % 64:
            break
    assert len(unpadded) % 64 != 0
    message = coordinator.open(node.seal_parts([unpadded, *parts[1:]]))
    np.testing.assert_array_equal(message.arrays["c"], first)
    assert message.arrays["c"].ctypes.data % 64 != 0
