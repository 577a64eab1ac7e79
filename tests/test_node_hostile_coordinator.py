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
    node = spawn_node(tmp_path / "node", endpoint, None, "victim", tmp_path, "--max-memory", "64M",
                      "--keep-running")
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
            sock.send_multipart([frames[0], *encode("CHALLENGE", {
                "protocol": 3, "coordinator_key": impostor.public_hex, "run_id": "r", "challenge": "0" * 64,
                "nonce": hi.header["nonce"], "kx": "0" * 64}, signer=impostor)])
        # It came back for a second HI after the first CHALLENGE: the pin was checked first, and
        # under --keep-running even a key mismatch only makes it back off.
        assert node.alive(), node.describe()
        assert "--coordinator-key pins" in node.err() and "trying again later" in node.err(), node.err()
        assert "version-mismatch" not in node.err(), node.err()
    finally:
        node.stop()
        sock.close(0)
        ctx.term()
