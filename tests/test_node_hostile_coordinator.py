"""A hostile coordinator (or an impostor at the node's --connect address) against a real
`enshuffle node` process: a raw ROUTER on 127.0.0.1 in the test, saying whatever it likes. The
volunteer's machine must come out of it with its memory bounded and the node still running."""

from __future__ import annotations

from pathlib import Path

import zmq

from wire_util import spawn_node, wait_until

MIB = 1 << 20


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def hostile_router() -> tuple[zmq.Context, zmq.Socket, str]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    return ctx, sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def next_hi(sock: zmq.Socket, timeout: float = 30) -> bytes:
    """The routing id of the next connection that says something (a node's HI)."""
    frames = wait_until(lambda: sock.poll(100) and sock.recv_multipart(), timeout, "a HI")
    return frames[0]


def test_a_frame_bigger_than_max_memory_is_refused_by_libzmq_before_any_challenge(tmp_path):
    ctx, sock, endpoint = hostile_router()
    node = spawn_node(tmp_path / "node", endpoint, None, "victim", tmp_path, "--max-memory", "64M", "--keep-running")
    try:
        big = bytes(200 * MIB)  # one frame, far above what a 64 MiB node could ever accept
        for _ in range(2):
            routing_id = next_hi(sock)
            sock.send_multipart([routing_id, big], copy=False)
        next_hi(sock)  # it came back: still running, and the frames did not stop it
        assert node.alive(), node.describe()
        peak = peak_rss_mib(node.pid)
    finally:
        node.stop()
        sock.close(0)
        ctx.term()
    # A node process is about 60-90 MiB; holding one of those frames alone would add 200.
    assert peak < 200, f"the node's peak RSS was {peak:.0f} MiB"


def test_an_impostors_challenge_for_another_protocol_does_not_end_a_pinned_keep_running_node(tmp_path):
    from enshuffle.protocol.keys import Identity
    from enshuffle.protocol.messages import decode, encode

    ctx, sock, endpoint = hostile_router()
    pinned = Identity.generate()  # the coordinator the node trusts; the impostor holds another key
    impostor = Identity.generate()
    node = spawn_node(tmp_path / "node", endpoint, pinned.fingerprint, "victim", tmp_path, "--keep-running")
    try:
        answered = 0
        while answered < 2:
            frames = wait_until(lambda: sock.poll(100) and sock.recv_multipart(), 30, "a HI")
            hi = decode(frames[1:])
            if hi.command != "HI":
                assert hi.command == "DECLINE", hi.command  # it refused the impostor's key
                continue
            answered += 1
            sock.send_multipart(
                [
                    frames[0],
                    *encode(
                        "CHALLENGE",
                        {
                            "protocol": 3,
                            "coordinator_key": impostor.public_hex,
                            "run_id": "r",
                            "challenge": "0" * 64,
                            "nonce": hi.header["nonce"],
                            "kx": "0" * 64,
                        },
                        signer=impostor,
                    ),
                ]
            )
        # It came back for a second HI after the first CHALLENGE: the pin was checked first, and
        # under --keep-running even a key mismatch only makes it back off.
        assert node.alive(), node.describe()
        assert "--coordinator-key pins" in node.err() and "trying again later" in node.err(), node.err()
        assert "version-mismatch" not in node.err(), node.err()
    finally:
        node.stop()
        sock.close(0)
        ctx.term()


class FakeCoordinator:
    """A coordinator the node accepts (its key is pinned) that then sends whatever a test likes:
    the real handshake (enshuffle.protocol.handshake) on a raw ROUTER, then sealed messages."""

    def __init__(self):
        from enshuffle.protocol.keys import Identity

        self.identity = Identity.generate()
        self.ctx, self.sock, self.endpoint = hostile_router()
        self.run_id = "hostile-run"
        self.channel = None
        self.routing_id = b""

    def session(self, timeout: float = 30) -> None:
        from enshuffle.protocol.handshake import check_hello, make_challenge
        from enshuffle.protocol.messages import decode, encode

        pending = None
        while self.channel is None:
            frames = wait_until(lambda: self.sock.poll(100) and self.sock.recv_multipart(), timeout, "the node")
            if frames[1][4:5] == b"E":
                continue  # a sealed message of an earlier session
            msg = decode(frames[1:])
            if msg.command == "HI":
                out, pending = make_challenge(self.identity, self.run_id, msg)
                self.sock.send_multipart([frames[0], *out])
            elif msg.command == "HELLO" and pending is not None:
                key, self.channel = check_hello(pending, msg, self.identity, self.run_id)
                self.routing_id = frames[0]
                self.sock.send_multipart(
                    [
                        frames[0],
                        *encode(
                            "WELCOME",
                            {
                                "run_id": self.run_id,
                                "coordinator_key": self.identity.public_hex,
                                "node_key": key.hex(),
                                "nonce": msg.header["nonce"],
                                "challenge": pending.challenge,
                                "node_id": "n1",
                                "credit": 2,
                                "heartbeat_ms": 1000,
                                "lease": {"min_ms": 2000, "multiple": 4.0, "initial_ms": 30000},
                            },
                            signer=self.identity,
                        ),
                    ]
                )

    def send(self, command: str, header: dict, arrays: dict | None = None) -> None:
        self.sock.send_multipart([self.routing_id, *self.channel.seal(command, header, arrays)])

    def drain(self) -> list:
        """Sealed messages from the node that have arrived, opened."""
        out = []
        while self.sock.poll(0):
            frames = self.sock.recv_multipart()
            if frames[0] == self.routing_id and frames[1][4:5] == b"E":
                out.append(self.channel.open(frames[1:]))
        return out

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


FORGED = "node alice joined as n9 (AAAA-AAAA), credit 2, admitted by allow-list"


def test_a_coordinators_waiting_text_is_escaped_and_rate_limited_in_the_node_log(tmp_path):
    fake = FakeCoordinator()
    node = spawn_node(tmp_path / "node", fake.endpoint, fake.identity.fingerprint, "victim", tmp_path)
    try:
        fake.session()
        for i in range(300):  # a new text every time, each with a line break and terminal escapes
            fake.send(
                "HEARTBEAT",
                {"node_id": "n1", "credit": 2, "outstanding": 0, "waiting": f"{i}\n{FORGED}\x1b[2J\x1b]0;owned\x07"},
            )
        # It answers a heartbeat of its own once it has read them all (at most one a second).
        fake.send("HEARTBEAT", {"node_id": "n1", "credit": 2, "outstanding": 0})
        wait_until(
            lambda: "coordinator: 0" in node.err() and any(m.command == "HEARTBEAT" for m in fake.drain()),
            30,
            "the node to read the heartbeats",
            on_timeout=node.describe,
        )
        fake.send("BYE", {"node_id": "n1", "reason": f"shutdown\n{FORGED}\x1b[31m"})
        wait_until(lambda: "said BYE" in node.err(), 30, "the BYE to be logged", on_timeout=node.describe)
        err = node.err()
    finally:
        node.stop()
        fake.close()
    lines = err.splitlines()
    assert "\x1b" not in err and "\x07" not in err, [line for line in lines if "\x1b" in line][:3]
    assert not [line for line in lines if line.split("enshuffle node: ")[-1].startswith("node alice")], lines[-5:]
    waiting_lines = [line for line in lines if "enshuffle node: coordinator: " in line]
    assert 1 <= len(waiting_lines) <= 3, len(waiting_lines)


def test_statics_count_against_max_memory_and_exposure_names_are_bounded(tmp_path):
    import numpy as np

    fake = FakeCoordinator()
    node = spawn_node(
        tmp_path / "node", fake.endpoint, fake.identity.fingerprint, "victim", tmp_path, "--max-memory", "64M"
    )
    count = 200
    try:
        fake.session()
        block = np.ones((MIB // 8,))  # 1 MiB each: 200 MiB in all, against a 64 MiB node
        for i in range(count):
            fake.send(
                "STATIC",
                {
                    "run_id": fake.run_id,
                    "name": f"s{i}",
                    "seq": i + 1,
                    "exposure": {f"t{i}.{j}": 0.5 for j in range(50)},
                },
                {"x": block},
            )
        rejects = []

        def rejected() -> int:
            rejects.extend(m for m in fake.drain() if m.command == "REJECT")
            return len(rejects)

        wait_until(
            lambda: rejected() >= count - 64,
            60,
            "the statics beyond --max-memory to be refused",
            on_timeout=node.describe,
        )
        assert all(m.header["code"] == "too-large" for m in rejects), {m.header["code"] for m in rejects}
        assert node.alive(), node.describe()
        peak = peak_rss_mib(node.pid)
    finally:
        node.stop()
        fake.close()
    assert peak < 200, f"the node's peak RSS was {peak:.0f} MiB"


def test_exposure_table_takes_a_bounded_number_of_names(tmp_path):
    from enshuffle.node.daemon import MAX_EXPOSURE_TENSORS, NodeDaemon
    from enshuffle.protocol.keys import Identity, TrustStore

    daemon = NodeDaemon(
        "tcp://127.0.0.1:1", identity=Identity.generate(), trust=TrustStore(tmp_path), pinned=None, name="n", threads=1
    )
    daemon._note_exposure({"images": 0.5})
    for i in range(100):
        daemon._note_exposure({f"junk{i}.{j}": 0.1 for j in range(100)})
    daemon._note_exposure({"images": 0.75})  # a known name is still updated
    assert len(daemon.state.exposure) == MAX_EXPOSURE_TENSORS
    assert daemon.state.exposure["images"] == 0.75
