"""The ENS2 handshake, both sides (docs/protocol.md section 6): HI, CHALLENGE, HELLO, WELCOME.

    node                                   coordinator
    HI {nonce}                   ->
                                 <-        CHALLENGE {coordinator_key, run_id, challenge, nonce, kx}   signed
    (checks the coordinator key: pin / trust store; on mismatch DECLINE and stop)
    HELLO {node_key, nonce, challenge, coordinator_key, run_id, kx, ...}  ->                     signed
                                 <-        WELCOME {node_key, nonce, challenge, node_id, ...}           signed
    first sealed message (HEARTBEAT) ->    the session counts from here

A HELLO signs the coordinator's fresh challenge, its key and its run id: it is worthless to
anyone else and at any other time. WELCOME signs the node's fresh nonce. The session keys come
from an X25519 exchange of two ephemeral keys, each signed by its side's Ed25519 identity (in
CHALLENGE and HELLO), through HKDF-SHA256 salted with the hash of both signed messages: only the
two holders of those identities can compute them, and they are new for every session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enshuffle.protocol.keys import Identity
from enshuffle.protocol.messages import (
    PROTOCOL_VERSION,
    Channel,
    Message,
    ProtocolError,
    encode,
    verify,
    verify_self_signed,
)

KDF_INFO = b"ENS2 session keys v1"
BAD_HELLO = "bad-hello"


def new_nonce() -> str:
    return secrets.token_hex(16)


DIGEST_PREFIX = "sha256:"


def frame_digest(frame) -> str:
    """What a REFUSE of an unverified HI or HELLO carries instead of the node's nonce: the hash of
    the exact bytes the coordinator received (signature included). Only the node that sent those
    bytes recognises it, so a refusal of bytes altered on the way is never taken as final."""
    return DIGEST_PREFIX + hashlib.sha256(bytes(frame)).hexdigest()[:32]


def _kx_public(private: X25519PrivateKey) -> str:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def derive_channel(
    role: str, private: X25519PrivateKey, peer_kx_hex: str, challenge_inner: bytes, hello_inner: bytes
) -> Channel:
    """The session's Channel for `role` ('coordinator' or 'node')."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(peer_kx_hex)))
    except ValueError as exc:  # a low-order point gives an all-zero secret: refused by cryptography
        raise ProtocolError(BAD_HELLO, f"unusable key-exchange key: {exc}") from None
    transcript = hashlib.sha256(challenge_inner + hello_inner).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=transcript, info=KDF_INFO).derive(shared)
    c2n, n2c = okm[:32], okm[32:]
    return Channel(c2n, n2c) if role == "coordinator" else Channel(n2c, c2n)


# --- invite codes (enshuffle.coordinator.admission keeps them) ----------------------------


def invite_id(code: str) -> str:
    return hashlib.sha256(code.encode("ascii")).hexdigest()[:16]


def invite_proof(code: str, challenge: str, node_key_hex: str) -> str:
    return hmac.new(code.encode("ascii"), (challenge + node_key_hex).encode("ascii"), hashlib.sha256).hexdigest()


def invite_field(code: str, challenge: str, node_key_hex: str) -> dict:
    """What a node puts in HELLO's `invite` for `code` (never the code itself)."""
    return {"id": invite_id(code), "proof": invite_proof(code, challenge, node_key_hex)}


# --- coordinator side ------------------------------------------------------------------------


@dataclass
class Pending:
    """What the coordinator keeps between CHALLENGE and HELLO for one routing id (small, bounded)."""

    challenge: str
    private: X25519PrivateKey = field(repr=False)
    challenge_inner: bytes = field(repr=False)
    nonce: str
    created: float = field(default_factory=time.monotonic)
    answered: bool = False  # a HELLO was handled (one per challenge)


def make_challenge(identity: Identity, run_id: str, hi: Message) -> tuple[list, Pending]:
    private = X25519PrivateKey.generate()
    challenge = secrets.token_hex(32)
    nonce = hi.header["nonce"][:128]
    frames = encode(
        "CHALLENGE",
        {
            "protocol": PROTOCOL_VERSION,
            "coordinator_key": identity.public_hex,
            "run_id": run_id,
            "challenge": challenge,
            "nonce": nonce,
            "kx": _kx_public(private),
        },
        signer=identity,
    )
    inner = bytes(frames[0])[5:-64]
    return frames, Pending(challenge, private, inner, nonce)


def check_hello(pending: Pending, hello: Message, identity: Identity, run_id: str) -> tuple[bytes, Channel]:
    """Verify a HELLO against the challenge sent on the same routing id; the node key and Channel.

    Raises ProtocolError('bad-hello') naming what does not match (a replayed HELLO fails here:
    its challenge is another one)."""
    h = hello.header
    key = verify_self_signed(hello)  # first: every field below is then the node's own word
    if h["challenge"] != pending.challenge:
        raise ProtocolError(BAD_HELLO, "HELLO answers another challenge (a replayed or stale HELLO)")
    if h["coordinator_key"] != identity.public_hex:
        raise ProtocolError(BAD_HELLO, "HELLO is addressed to another coordinator key")
    if h["run_id"] != run_id:
        raise ProtocolError(BAD_HELLO, "HELLO is for another run")
    if h["nonce"] != pending.nonce:
        raise ProtocolError(BAD_HELLO, "HELLO nonce differs from its HI")
    return key, derive_channel("coordinator", pending.private, h["kx"], pending.challenge_inner, hello.inner)


# --- node side ------------------------------------------------------------------------------


class NodeHandshake:
    """The node's half: `hi()`, then `challenge(msg)` -> coordinator key, `hello()`, `welcome(msg)` -> Channel."""

    def __init__(
        self, identity: Identity, name: str, capabilities: dict, invite: str | None = None, replaces: str | None = None
    ) -> None:
        self.identity = identity
        self.name = name
        self.capabilities = capabilities
        self.invite = invite
        self.replaces = replaces  # the node id of this node's previous session, which it leaves
        self.nonce = new_nonce()
        self._private = X25519PrivateKey.generate()
        self.challenge_msg: Message | None = None
        self.coordinator_key: bytes | None = None
        self._hello_inner = b""
        self.sent_digests: set[str] = set()  # frame_digest of each HI and HELLO sent

    def hi(self) -> list:
        frames = encode("HI", {"protocol": PROTOCOL_VERSION, "nonce": self.nonce})
        self.sent_digests.add(frame_digest(frames[0]))
        return frames

    def check_challenge(self, msg: Message, version: bool = True) -> bytes:
        """Verify a CHALLENGE (signature by the key it carries, our nonce); the coordinator key.
        With version=False the protocol version is left to the caller, who checks the key first."""
        key = verify_self_signed(msg)
        if msg.header["nonce"] != self.nonce:
            raise ProtocolError(BAD_HELLO, "CHALLENGE for another HI (nonce differs)")
        if version and msg.header["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError("version-mismatch", f"coordinator speaks protocol {msg.header['protocol']}")
        return key

    def hello(self, msg: Message) -> list:
        """HELLO answering the (already checked and trusted) CHALLENGE `msg`."""
        self.challenge_msg = msg
        self.coordinator_key = bytes.fromhex(msg.header["coordinator_key"])
        header = {
            "protocol": PROTOCOL_VERSION,
            "node_key": self.identity.public_hex,
            "name": self.name,
            "nonce": self.nonce,
            "challenge": msg.header["challenge"],
            "coordinator_key": msg.header["coordinator_key"],
            "run_id": msg.header["run_id"],
            "kx": _kx_public(self._private),
            "capabilities": self.capabilities,
        }
        if self.invite:
            header["invite"] = invite_field(self.invite, msg.header["challenge"], self.identity.public_hex)
        if self.replaces:
            header["replaces"] = self.replaces
        frames = encode("HELLO", header, signer=self.identity)
        self._hello_inner = bytes(frames[0])[5:-64]
        self.sent_digests.add(frame_digest(frames[0]))
        return frames

    def welcome(self, msg: Message) -> Channel:
        """Verify WELCOME (same coordinator key, our key, nonce and challenge); the session Channel."""
        if self.challenge_msg is None or self.coordinator_key is None:
            raise ProtocolError(BAD_HELLO, "WELCOME before CHALLENGE")
        verify(msg, self.coordinator_key)
        h = msg.header
        if (
            h["node_key"] != self.identity.public_hex
            or h["nonce"] != self.nonce
            or h["challenge"] != self.challenge_msg.header["challenge"]
            or h["run_id"] != self.challenge_msg.header["run_id"]
        ):
            raise ProtocolError(BAD_HELLO, "a WELCOME for another HELLO (node key, nonce, challenge or run differ)")
        return derive_channel(
            "node", self._private, self.challenge_msg.header["kx"], self.challenge_msg.inner, self._hello_inner
        )
