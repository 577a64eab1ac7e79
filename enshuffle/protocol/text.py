"""Text a peer chose (node names, REFUSE/DECLINE/REJECT text, BYE reasons, a coordinator's
`waiting` line) made safe to log or print: control and format characters (newlines, terminal
escapes, bidi overrides) are shown escaped, so a peer can neither forge a log line nor drive the
operator's terminal, and the text is cut to a length."""

from __future__ import annotations

import unicodedata


def printable(value, limit: int = 200) -> str:
    """`value` as one line of inert text: every character of Unicode category C* (controls,
    format characters, surrogates, unassigned) replaced by its escape, at most `limit` characters."""
    text = value if isinstance(value, str) else str(value)
    out = []
    size = 0
    for ch in text:
        if unicodedata.category(ch)[0] == "C":
            code = ord(ch)
            piece = f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            piece = ch
        if size + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)
