"""An on-path attacker on loopback: a TCP relay that speaks just enough ZMTP 3 to see messages.

`Relay(target)` listens on 127.0.0.1; a node given `relay.endpoint` as its --connect talks to
`target` through it. Both directions are parsed into ZMTP frames after the 64-byte greeting:
commands (READY, PING, ...) pass unchanged; each message (its frames' bodies) goes through the
direction's hook, which returns the messages to send on instead (none: dropped; the same one
twice: a replay; an edited one: a rewrite). The relay never holds a key: whatever it sends that
is not a byte-exact copy of what it received fails authentication.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable

Hook = Callable[[list[bytes]], list[list[bytes]]]

GREETING = 64
MORE, LONG, COMMAND = 0x01, 0x02, 0x04


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return bytes(out)


def _frame(flags: int, body: bytes) -> bytes:
    if len(body) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def encode_message(frames: list[bytes]) -> bytes:
    return b"".join(_frame(MORE if i < len(frames) - 1 else 0, f) for i, f in enumerate(frames))


class Relay:
    def __init__(self, target_port: int, to_server: Hook | None = None, to_client: Hook | None = None):
        self.target_port = target_port
        self.to_server = to_server or (lambda msg: [msg])
        self.to_client = to_client or (lambda msg: [msg])
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.connections = 0
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay-accept").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += 1
            self._socks += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, self.to_server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.to_client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, hook: Hook) -> None:
        try:
            passed = 0  # the greeting goes in steps, each side waiting for the other's: forward as it comes
            while passed < GREETING:
                chunk = src.recv(GREETING - passed)
                if not chunk:
                    raise ConnectionError("closed")
                dst.sendall(chunk)
                passed += len(chunk)
            frames: list[bytes] = []
            while True:
                flags = _recv_exact(src, 1)[0]
                size = struct.unpack(">Q", _recv_exact(src, 8))[0] if flags & LONG else _recv_exact(src, 1)[0]
                body = _recv_exact(src, size)
                if flags & COMMAND:
                    dst.sendall(_frame(flags & ~LONG, body))
                    continue
                frames.append(body)
                if flags & MORE:
                    continue
                message, frames = frames, []
                for out in hook(message):
                    dst.sendall(encode_message(out))
        except (ConnectionError, OSError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
