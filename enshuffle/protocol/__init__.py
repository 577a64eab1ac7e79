"""enshuffle.protocol: the ENS2 wire format (messages), the handshake, and the key store (keys).

docs/protocol.md is the specification; `messages.COMMANDS` mirrors its command table.
Names are re-exported lazily so `import enshuffle.protocol` costs nothing until used; this
package never imports textual.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "keys": (
        "enshuffle_home",
        "KeyStoreError",
        "FingerprintMismatch",
        "Identity",
        "fingerprint",
        "short_fingerprint",
        "normalize_fingerprint",
        "load_or_create_identity",
        "verify_signature",
        "TrustStore",
    ),
    "messages": (
        "PROTOCOL_VERSION",
        "ProtocolError",
        "Message",
        "Limits",
        "COMMANDS",
        "OPS",
        "encode",
        "decode",
        "verify",
        "verify_self_signed",
        "Channel",
    ),
    "handshake": ("NodeHandshake", "make_challenge", "check_hello"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'enshuffle.protocol' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"enshuffle.protocol.{module}"), name)
    globals()[name] = value
    return value
