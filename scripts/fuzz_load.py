#!/usr/bin/env python3
"""Fuzz and load benchmark for ENS2 (a benchmark, not a test: nothing here asserts a time).

What it does, against a real `enshuffle coordinator` process on 127.0.0.1:

1. Idle load: the coordinator waits for nodes; its CPU is measured over a window with no node,
   then with IDLE admitted nodes connected (paused: credit 0, heartbeating every second, served
   by one thread of this script). Reported: CPU per 1,000 idle nodes, in % of one core.
2. Training under attack: two honest `enshuffle node` processes train the default preset
   (float64) while the idle nodes stay connected and hostile senders fire MESSAGES messages:
   random bytes, bit-flipped handshakes, recorded HELLOs, sealed garbage, multi-frame junk, deep
   JSON, absurd lengths and dimensions, fresh-connection HI floods, and an admitted malicious
   participant that seals garbage, RESULTs for other batches, NaN and huge dims.
3. Reports: crashes (the coordinator's exit status and any traceback), its RSS before, peak and
   after, messages sent and rate, and the largest difference between the run's final weights
   (exported from its chain) and an undisturbed centralized run's (`enshuffle train --nodes 0`).

    .venv/bin/python scripts/fuzz_load.py [--messages 100000] [--idle 1000] [--epochs 2] [--limit 6000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from enshuffle.protocol.handshake import NodeHandshake  # noqa: E402
from enshuffle.protocol.keys import Identity, load_or_create_identity  # noqa: E402
from enshuffle.protocol.messages import Channel, decode, encode, inner_parts  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid: int) -> tuple[float, int, int]:
    """(CPU seconds, RSS bytes, peak RSS bytes) of a process; zeros once it has exited."""
    try:
        return _proc_stat(pid)
    except (OSError, KeyError, IndexError, ValueError):
        return 0.0, 0, 0


def _proc_stat(pid: int) -> tuple[float, int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text()
    kb = {
        line.split(":")[0]: int(line.split()[1]) for line in status.splitlines() if line.startswith(("VmRSS", "VmHWM"))
    }
    return cpu, kb["VmRSS"] * 1024, kb["VmHWM"] * 1024


# --- idle nodes ------------------------------------------------------------------------------


class IdleNodes:
    """`count` admitted nodes on their own DEALERs in one thread: handshake, then a paused
    HEARTBEAT (credit 0) every second. Handshakes are retried when the coordinator's reply
    budget drops them."""

    def __init__(self, endpoint: str, identities: list[Identity]):
        self.endpoint = endpoint
        self.identities = identities
        self.ctx = zmq.Context()
        self.stop = threading.Event()
        self.joined = 0
        self.recorded_hellos: list[list] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        poller = zmq.Poller()
        nodes = {}
        for ident in self.identities:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            hs = NodeHandshake(ident, "idle", {"ops": ["matmul", "resident"], "threads": 1, "credit": 1})
            nodes[sock] = {"hs": hs, "state": "hi", "sent": 0.0, "channel": None, "node_id": None}
            poller.register(sock, zmq.POLLIN)
        while not self.stop.is_set():
            now = time.monotonic()
            for sock, n in nodes.items():
                if n["state"] == "hi" and now - n["sent"] > 2.0:
                    n["hs"] = NodeHandshake(n["hs"].identity, "idle", n["hs"].capabilities)
                    sock.send_multipart(n["hs"].hi())
                    n["sent"] = now
                elif n["state"] == "in" and now - n["sent"] > 1.0:
                    sock.send_multipart(
                        n["channel"].seal("HEARTBEAT", {"node_id": n["node_id"], "credit": 0, "outstanding": 0})
                    )
                    n["sent"] = now
            for sock, _ in poller.poll(100):
                n = nodes[sock]
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        if n["channel"] is not None:
                            n["channel"].open(frames)  # heartbeats, BYE at the end
                            continue
                        msg = decode(frames)
                        if msg.command == "CHALLENGE":
                            n["hs"].check_challenge(msg)
                            hello = n["hs"].hello(msg)
                            if len(self.recorded_hellos) < 50:
                                self.recorded_hellos.append(hello)
                            sock.send_multipart(hello)
                        elif msg.command == "WELCOME":
                            n["channel"] = n["hs"].welcome(msg)
                            n["node_id"] = msg.header["node_id"]
                            n["state"] = "in"
                            n["sent"] = 0.0
                            self.joined += 1
                        elif msg.command == "REFUSE":
                            n["state"], n["sent"] = "hi", time.monotonic()
                    except Exception:  # noqa: BLE001 - a benchmark peer: keep going
                        pass
        for sock in nodes:
            sock.close(0)
        self.ctx.term()


# --- hostile senders ---------------------------------------------------------------------------


def hostile_messages(rng: random.Random, recorded: list[list], count: int):
    """Yield (label, frames) hostile messages."""
    attacker = Identity.generate()
    templates = [
        encode("HI", {"protocol": 2, "nonce": "ab" * 16})[0],
        encode(
            "HELLO",
            {
                "protocol": 2,
                "node_key": attacker.public_hex,
                "name": "x",
                "nonce": "n",
                "challenge": "0" * 64,
                "coordinator_key": "0" * 64,
                "run_id": "r",
                "kx": "1" * 64,
                "capabilities": {"ops": [], "threads": 1, "credit": 1},
            },
            signer=attacker,
        )[0],
    ]
    junk_channel = Channel(os.urandom(32), os.urandom(32))
    for i in range(count):
        kind = i % 10
        if kind == 0:
            yield "random", [os.urandom(rng.randint(1, 2000))]
        elif kind == 1:
            frame = bytearray(rng.choice(templates))
            for _ in range(rng.randint(1, 4)):
                frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            yield "mutated", [bytes(frame)]
        elif kind == 2 and recorded:
            yield "replayed-hello", rng.choice(recorded)
        elif kind == 3:
            yield "sealed-garbage", junk_channel.seal_parts([os.urandom(rng.randint(10, 500))])
        elif kind == 4:
            yield "multi-frame", [b"ENS2U", os.urandom(100), os.urandom(100)]
        elif kind == 5:
            deep = b"[" * 50000
            yield "deep-json", [b"ENS2U" + bytes([2]) + b"HI" + len(deep).to_bytes(4, "big") + deep]
        elif kind == 6:
            header = json.dumps(
                {"arrays": [{"name": "c", "dtype": "float64", "shape": [10**9, 10**9]}], "protocol": 2, "nonce": "x"}
            ).encode()
            yield "huge-dims", [b"ENS2U" + bytes([2]) + b"HI" + len(header).to_bytes(4, "big") + header]
        elif kind == 7:
            yield "huge-length", [b"ENS2S" + bytes([5]) + b"HELLO" + (2**32 - 1).to_bytes(4, "big") + b"{}" + bytes(64)]
        elif kind == 8:
            yield "wrong-kind", [b"ENS2E" + b"\x00" * 8 + os.urandom(64)]
        else:
            yield "hi", [templates[0]]


def fire(endpoint: str, total: int, recorded: list[list], seed: int, sent: list[int]) -> None:
    rng = random.Random(seed)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100000)
    sock.connect(endpoint)
    n = 0
    for label, frames in hostile_messages(rng, recorded, total):
        if n % 2000 == 1999:  # a fresh connection now and then: a new routing id, a new CHALLENGE
            sock.close(120_000)
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100000)
            sock.connect(endpoint)
        sock.send_multipart(frames)
        n += 1
        while sock.poll(0, zmq.POLLIN):
            sock.recv_multipart()
    sent[0] += n
    sock.close(120_000)  # wait (up to 2 min) until every message has been handed to the coordinator
    ctx.term()


def malicious_participant(endpoint: str, ident: Identity, stop: threading.Event, sent: list[int]) -> None:
    """Admitted, then hostile inside its session until it is evicted."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    hs = NodeHandshake(ident, "malicious", {"ops": ["matmul", "resident"], "threads": 1, "credit": 2})
    sock.send_multipart(hs.hi())
    channel = node_id = None
    deadline = time.monotonic() + 30
    while channel is None and time.monotonic() < deadline:
        if sock.poll(200, zmq.POLLIN):
            msg = decode(sock.recv_multipart())
            if msg.command == "CHALLENGE":
                hs.check_challenge(msg)
                sock.send_multipart(hs.hello(msg))
            elif msg.command == "WELCOME":
                channel, node_id = hs.welcome(msg), msg.header["node_id"]
            elif msg.command == "REFUSE":
                sock.send_multipart(hs.hi())
    if channel is None:
        return
    sock.send_multipart(channel.seal("HEARTBEAT", {"node_id": node_id, "credit": 2, "outstanding": 0}))
    rng = random.Random(7)
    while not stop.is_set():
        choice = rng.randrange(4)
        if choice == 0:
            frames = channel.seal(
                "RESULT",
                {
                    "run_id": "x",
                    "batch_id": f"{rng.randrange(100)}.{rng.randrange(999)}",
                    "seq": rng.randrange(10**6),
                    "compute_seconds": 0.0,
                },
                {"c": np.full((4, 4), np.nan)},
            )
        elif choice == 1:
            prefix = inner_parts(
                "RESULT", {"run_id": "x", "batch_id": "b", "seq": 1, "compute_seconds": 0.0}, {"c": np.zeros(1)}
            )[0]
            frames = channel.seal_parts([prefix.replace(b"[1]", b"[1000000000]")])
        elif choice == 2:
            frames = channel.seal_parts([os.urandom(rng.randint(5, 300))])
        else:
            frames = channel.seal("HEARTBEAT", {"node_id": node_id, "credit": 2, "outstanding": 0})
        try:
            sock.send_multipart(frames, zmq.NOBLOCK)
            sent[0] += 1
        except zmq.Again:
            pass
        while sock.poll(0, zmq.POLLIN):
            sock.recv_multipart()
        time.sleep(0.01)
    sock.close(0)
    ctx.term()


# --- the run -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--window", type=float, default=10.0, help="seconds of each idle CPU measurement")
    parser.add_argument("--idle-only", action="store_true", help="only the idle-node CPU measurement")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="enshuffle-fuzz-"))
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, ENSHUFFLE_HOME=str(tmp / "coordinator"), PYTHONUNBUFFERED="1")
    py = sys.executable
    # A public --seed: the run and the centralized reference then start from the same weights and
    # sample order (without it each run draws them from its own secret).
    train = [
        "--preset",
        "default",
        "--dtype",
        "float64",
        "--epochs",
        str(args.epochs),
        "--limit",
        str(args.limit),
        "--seed",
        "402",
    ]

    idle_ids = [Identity.generate() for _ in range(args.idle)]
    honest = [load_or_create_identity("node", tmp / f"h{i}", name=f"honest-{i}") for i in (1, 2)]
    evil = Identity.generate()
    allow = tmp / "allowed"
    allow.write_text("".join(f"{i.fingerprint}\n" for i in (*idle_ids, *honest, evil)))
    run_dir = tmp / "run"
    coord = subprocess.Popen(
        [
            py,
            "-m",
            "enshuffle",
            "coordinator",
            "--bind",
            endpoint,
            "--min-nodes",
            "2",
            "--allow",
            str(allow),
            "--out",
            str(run_dir),
            *train,
        ],
        cwd=REPO,
        env=env,
        stdout=open(tmp / "coordinator.out", "wb"),
        stderr=open(tmp / "coordinator.err", "wb"),
    )
    time.sleep(3.0)  # start-up (data loading); only a benchmark waits like this
    cpu0, rss0, _ = proc_stat(coord.pid)
    time.sleep(args.window)
    cpu1, rss_idle0, _ = proc_stat(coord.pid)
    base = (cpu1 - cpu0) / args.window

    idle = IdleNodes(endpoint, idle_ids)
    idle.thread.start()
    t = time.monotonic()
    while idle.joined < args.idle and time.monotonic() - t < 120:
        time.sleep(0.5)
    joined_after = time.monotonic() - t
    cpu2, rss_idle1, _ = proc_stat(coord.pid)
    time.sleep(args.window)
    cpu3, rss_idle2, _ = proc_stat(coord.pid)
    with_idle = (cpu3 - cpu2) / args.window
    per_1000 = (with_idle - base) * 1000 / max(1, idle.joined)
    print(f"idle nodes joined:            {idle.joined} of {args.idle} in {joined_after:.1f} s")
    print(f"coordinator CPU, no nodes:    {100 * base:.1f}% of a core")
    print(
        f"coordinator CPU, idle nodes:  {100 * with_idle:.1f}% of a core "
        f"-> {100 * per_1000:.1f}% of a core per 1,000 idle nodes (budget 5%)"
    )
    print(f"coordinator RSS: start {rss0 / 2**20:.0f} MiB, with idle nodes {rss_idle2 / 2**20:.0f} MiB")
    if args.idle_only:
        idle.stop.set()
        coord.terminate()
        coord.wait(30)
        return 0

    # Training under attack.
    stop = threading.Event()
    sent = [0]
    evil_sent = [0]
    evil_thread = threading.Thread(target=malicious_participant, args=(endpoint, evil, stop, evil_sent), daemon=True)
    evil_thread.start()
    nodes = [
        subprocess.Popen(
            [py, "-m", "enshuffle", "node", "--connect", endpoint, "--name", f"honest-{i}", "--threads", "1"],
            cwd=REPO,
            env=dict(os.environ, ENSHUFFLE_HOME=str(tmp / f"h{i}")),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"node{i}.err", "wb"),
        )
        for i in (1, 2)
    ]
    started = time.monotonic()
    per_sender = args.messages // args.senders
    senders = [
        threading.Thread(target=fire, args=(endpoint, per_sender, idle.recorded_hellos, s, sent), daemon=True)
        for s in range(args.senders)
    ]
    for s in senders:
        s.start()
    peak = rss_end = 0
    while any(s.is_alive() for s in senders) or coord.poll() is None:
        if coord.poll() is None:
            _, rss, hwm = proc_stat(coord.pid)
            if rss:
                peak, rss_end = max(peak, hwm), rss
        time.sleep(0.5)
        if time.monotonic() - started > 1800:
            break
    fired = time.monotonic() - started
    stop.set()
    idle.stop.set()
    rc = coord.wait(60)
    for n in nodes:
        n.wait(30)
    err = (tmp / "coordinator.err").read_text(errors="replace")
    crashes = int(rc != 0) + err.count("Traceback")
    print(
        f"hostile messages sent:        {sent[0]:,} (+{evil_sent[0]:,} from the admitted malicious node) "
        f"in {fired:.0f} s, {sent[0] / fired:,.0f}/s"
    )
    print(f"crashes:                      {crashes} (coordinator exit status {rc})")
    print(
        f"coordinator RSS: peak {peak / 2**20:.0f} MiB over the whole run (idle nodes, attack and training; "
        f"compare `--messages 0 --idle 0`), {rss_end / 2**20:.0f} MiB at the end"
    )
    print(f"malicious node evicted:       {'evicted after' in err}")
    counted = [line for line in err.splitlines() if line.startswith("messages: ")]
    print(f"coordinator's own count:      {counted[-1] if counted else '(no count logged)'}")

    exported = tmp / "final.npz"
    subprocess.run(
        [py, "-m", "enshuffle", "chain", "export", str(run_dir), "--npz", str(exported)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    ref = tmp / "ref.npz"
    subprocess.run(
        [py, "-m", "enshuffle", "train", "--nodes", "0", *train, "--save-weights", str(ref)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    with np.load(exported) as a, np.load(ref) as b:
        diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in ("w1", "b1", "w2", "b2"))
        scale = max(float(np.max(np.abs(b[k]))) for k in ("w1", "b1", "w2", "b2"))
    print(
        f"final weights vs undisturbed: max abs difference {diff:.2e} (weights up to {scale:.2f}): "
        f"{'equal to rounding' if diff < 1e-9 * max(1.0, scale) else 'DIFFERENT'}"
    )
    print(f"(files in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
