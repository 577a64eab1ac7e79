"""Strangers (anyone who can reach the coordinator's port, with or without a key) against a
running coordinator on 127.0.0.1, beside a real `enshuffle node` process: they cost it bounded
work and never keep an honest node out."""

from __future__ import annotations

import zmq

from wire_util import InProcessRun, default_preset, load_inputs, spawn_node, wait_until

from enshuffle.protocol.handshake import NodeHandshake
from enshuffle.protocol.keys import Identity
from enshuffle.protocol.messages import OPS, decode, encode


def test_one_connection_saying_hi_then_decline_in_a_loop_does_not_keep_a_node_out(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(run.endpoint)
    stranger = Identity.generate()
    challenges = []

    def attack() -> None:
        # HI, and as soon as a CHALLENGE comes, DECLINE it (which frees it) and say HI again; HI
        # again every 2 ms anyway, so whenever the coordinator has a reply to spare, this takes it.
        hs = NodeHandshake(stranger, "x", {"ops": list(OPS), "threads": 1, "credit": 1})
        sock.send_multipart(hs.hi())
        if sock.poll(2, zmq.POLLIN):
            msg = decode(sock.recv_multipart())
            if msg.command == "CHALLENGE":
                challenges.append(msg)
                sock.send_multipart(
                    encode("DECLINE", {"nonce": msg.header["nonce"], "code": "untrusted-key", "text": "no"})
                )

    node = None
    try:
        for _ in range(50):
            attack()  # under way before the node comes
        node = spawn_node(tmp_path / "node", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
        wait_until(
            lambda: run.logged("node honest joined"),
            30,
            "the honest node to join under the attack",
            idle=attack,
            on_timeout=lambda: run.describe() + node.describe(),
        )
    finally:
        sock.close(0)
        ctx.term()
        run.close()
        if node is not None:
            node.stop()
    assert len(challenges) == 1, f"one connection got {len(challenges)} CHALLENGEs"


def test_plain_connections_that_say_nothing_are_closed_and_the_file_limit_is_raised(core_data_dir, tmp_path):
    import socket
    import subprocess
    import sys

    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    port = int(run.endpoint.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        for conn in idle:  # libzmq's greeting arrives, then (no greeting back) the close
            conn.settimeout(20)  # the libzmq default would keep them 30 s
            while conn.recv(4096):
                pass
    finally:
        for conn in idle:
            conn.close()
        run.close()
    # A coordinator started with a low soft limit raises it to the hard limit before it listens.
    code = (
        "import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard)); "
        "from enshuffle.coordinator.server import Listener; "
        "s = Listener('tcp://127.0.0.1:*'); "
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE)); s.close()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    soft, hard = map(int, out.stdout.split())
    assert soft == hard or hard < 0, (soft, hard)


def test_peer_text_cannot_forge_a_coordinator_log_line_or_reach_its_terminal(core_data_dir):
    from wire_util import ScriptedNode

    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=2).start()
    forged = "node alice joined as n9 (AAAA-AAAA), credit 2, admitted by allow-list"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(run.endpoint)
    named = ScriptedNode(run.endpoint, f"evil\n{forged}\x1b[2J\u202e", context=ctx)
    try:
        hs = NodeHandshake(Identity.generate(), "x", {"ops": list(OPS), "threads": 1, "credit": 1})
        sock.send_multipart(hs.hi())
        challenge = wait_until(lambda: sock.poll(100) and decode(sock.recv_multipart()), 10, "a CHALLENGE")
        sock.send_multipart(
            encode(
                "DECLINE",
                {"nonce": challenge.header["nonce"], "code": "x\x1b[1m", "text": f"no\n{forged}\x1b]0;owned\x07"},
            )
        )
        named.hello()
        named.sign_and_send("BYE", {"node_id": named.node_id, "reason": f"bye\n{forged}\x1b[31m"})
        wait_until(
            lambda: run.logged("refused our key") and run.logged("said BYE"),
            10,
            "both to be logged",
            on_timeout=run.describe,
        )
    finally:
        sock.close(0)
        named.close()
        ctx.term()
        run.close()
    lines = run.log_lines()
    assert not [line for line in lines if "\n" in line or "\x1b" in line or "\u202e" in line or "\x07" in line]
    assert not [line for line in lines if line.startswith("node alice")], lines
    assert run.logged("evil\\x0anode alice joined")  # shown, escaped, inside the line it belongs to


def test_one_address_opening_connection_after_connection_gets_its_own_budget_only(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    # small, so the flood below outruns it however slow this machine is
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1, address_replies_per_s=5.0).start()
    port = run.endpoint.rsplit(":", 1)[1]
    ctx = zmq.Context()
    flood = []
    node = None
    try:
        for _ in range(60):  # every one a fresh connection from 127.0.0.2
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.2:0;127.0.0.1:{port}")
            s.send_multipart(encode("HI", {"protocol": 2, "nonce": "x" * 16}))
            flood.append(s)
        wait_until(
            lambda: run.server.counters["challenges"] + run.server.counters["dropped"] >= 60,
            30,
            "the flood to be handled",
            on_timeout=run.describe,
        )
        challenged = run.server.counters["challenges"]
        assert challenged < 30, challenged  # 5 at once, then 5 a second
        # Another address still gets its CHALLENGE at once: a node from 127.0.0.1 joins.
        node = spawn_node(tmp_path / "node", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
        wait_until(
            lambda: run.logged("node honest joined"),
            30,
            "the honest node to join",
            on_timeout=lambda: run.describe() + node.describe(),
        )
    finally:
        for s in flood:
            s.close(0)
        ctx.term()
        run.close()
        if node is not None:
            node.stop()
