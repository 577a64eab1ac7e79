"""Attacks on the coordinator and its nodes, each tried against ENS2 with real sockets, keys and processes.

Each test plays the attacker and measures what it gets: a replayed HELLO, a stranger's key, a node
that joins and vanishes, two processes sharing a key, floods of HELLOs from fresh keys, malformed
handshakes hoping for signed answers, a gzip bomb, and files left readable by others. The node-side
limits (oversized results, credit overrun, data before WELCOME) are in tests/test_node_daemon.py.
"""

from __future__ import annotations

import gzip
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from enshuffle.coordinator.admission import Admission
from enshuffle.coordinator.server import HANDSHAKE_REPLIES_PER_S, MAX_ATTEMPTS
from enshuffle.protocol.keys import Identity, load_or_create_identity
from enshuffle.protocol.messages import PROTOCOL_VERSION, decode, encode
from wire_util import (
    REPO,
    InProcessRun,
    ScriptedNode,
    assert_same_weights,
    coordinator_fingerprint,
    default_preset,
    enshuffle_cli,
    free_port,
    load_inputs,
    process_env,
    reference_weights,
    spawn_coordinator,
    spawn_node,
    wait_until,
)


def recv_all(sock: zmq.Socket, wait_ms: int = 0) -> list:
    """Every message waiting on `sock` (after at most `wait_ms` for the first)."""
    got = []
    if not sock.poll(wait_ms, zmq.POLLIN):
        return got
    while True:
        try:
            got.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            return got


# --- replay and hijack ------------------------------------------------------------------------


def test_a_recorded_hello_replayed_on_a_new_connection_gets_no_session_and_no_data(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start(hold_at=1)
    honest = ScriptedNode(run.endpoint, "honest")
    ctx = zmq.Context()
    attacker = ctx.socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    try:
        honest.hello()
        honest.serve_until(run.held, 60, "step 0", on_timeout=run.describe)
        recorded = honest.hello_frames
        nonce = decode(recorded).header["nonce"]
        attacker.connect(run.endpoint)
        for _ in range(8):  # the 8 attempts, each on the same connection's one challenge or a new one
            attacker.send_multipart(encode("HI", {"protocol": PROTOCOL_VERSION, "nonce": nonce}))
            challenge = wait_until(lambda: recv_all(attacker, 50), 10, "a CHALLENGE", idle=lambda: honest.pump(20))
            assert decode(challenge[0]).command == "CHALLENGE"
            attacker.send_multipart(recorded)
            answers = wait_until(
                lambda: recv_all(attacker, 50), 10, "an answer to the replayed HELLO", idle=lambda: honest.pump(20)
            )
            commands = [decode(m).command for m in answers]
            assert commands == ["REFUSE"] and decode(answers[0]).header["code"] == "bad-hello", commands
            attacker.close(0)
            attacker = ctx.socket(zmq.DEALER)
            attacker.setsockopt(zmq.LINGER, 0)
            attacker.connect(run.endpoint)
        # The genuine node kept its session all along and the attacker was never a member.
        snap = run.state.snapshot()
        assert list(snap.nodes) == ["honest"] and snap.nodes["honest"].state != "gone", run.describe()
        assert run.server.counters["handshakes"] == 1
        run.hold_at(-1)
        honest.serve_until(run.done.is_set, 60, "training to finish", on_timeout=run.describe)
        assert_same_weights(run.finish(), expected)
        assert set(run.server.ledger.shares()) == {"honest"}
    finally:
        run.close()
        attacker.close(0)
        ctx.term()
        honest.close()


# --- admission ------------------------------------------------------------------------------


def test_a_stranger_gets_one_signed_not_allowed_and_nothing_else(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    member = Identity.generate()
    allow = tmp_path / "allowed"
    allow.write_text(f"# lab machines\n{member.fingerprint}\n")
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1, admission=Admission(allow_file=allow)).start()
    stranger = ScriptedNode(run.endpoint, "stranger")
    try:
        with pytest.raises(AssertionError, match="refused: not-allowed"):
            stranger.hello()
        wait_until(
            lambda: run.logged("refused node 'stranger'"), 10, "the refusal to be logged", on_timeout=run.describe
        )
        assert recv_all(stranger.sock, 200) == []  # one REFUSE, and nothing after it
        assert run.state.snapshot().nodes == {} and run.server.sessions == {}
        member_node = ScriptedNode(run.endpoint, "member", identity=member)
        member_node.hello()
        member_node.serve_until(run.done.is_set, 60, "training with the admitted node", on_timeout=run.describe)
        run.finish()
        member_node.close()
    finally:
        run.close()
        stranger.close()


def test_allow_file_sighup_and_invite_codes_with_real_processes(core_data_dir, core_cache, tmp_path):
    """`enshuffle coordinator --allow FILE`: an unlisted node is refused for good (exit 4) and told
    what to do; after the operator adds its key and sends SIGHUP it joins. A second node joins with
    an invite code from `enshuffle invite`, which is then used up."""
    port = free_port()
    home = tmp_path / "coordinator"
    fp = coordinator_fingerprint(home)
    allow = tmp_path / "allowed"
    allow.write_text("# nobody yet\n")
    endpoint = f"tcp://127.0.0.1:{port}"
    coordinator = spawn_coordinator(
        home,
        port,
        core_cache,
        tmp_path,
        "coordinator",
        "--min-nodes",
        "2",
        "--allow",
        str(allow),
        "--preset",
        "seed",
        "--epochs",
        "1",
        "--limit",
        "500",
        "--data",
        str(core_data_dir),
        "--out",
        str(tmp_path / "run"),
    )
    procs = [coordinator]
    try:
        first = spawn_node(tmp_path / "n1", endpoint, fp, "first", tmp_path, proc_name="first-refused")
        procs.append(first)
        assert first.wait(30) == 4, first.describe()
        assert "not-allowed" in first.err() and "--allow" in first.err(), first.err()
        key = load_or_create_identity("node", tmp_path / "n1", name="first").fingerprint
        allow.write_text(f"{key}  # first\n")
        coordinator.signal(signal.SIGHUP)
        wait_until(
            lambda: "1 key allowed" in coordinator.err(), 15, "the allow-list re-read", on_timeout=coordinator.describe
        )
        again = spawn_node(tmp_path / "n1", endpoint, fp, "first", tmp_path, proc_name="first-again")
        procs.append(again)
        out = enshuffle_cli("invite", "--connect", endpoint, home=home)
        assert out.returncode == 0, out.stderr
        code = out.stdout.split("invite code:")[1].split()[0]
        assert f"ENSHUFFLE_INVITE={code} enshuffle node" in out.stdout and fp in out.stdout
        code_file = tmp_path / "invite-code"
        code_file.write_text(code + "\n")
        invited = spawn_node(tmp_path / "n2", endpoint, fp, "second", tmp_path, "--invite", f"@{code_file}")
        procs.append(invited)
        # Not on its command line, which every local user can read.
        assert code not in Path(f"/proc/{invited.pid}/cmdline").read_text(errors="replace")
        assert coordinator.wait(120) == 0, coordinator.describe() + again.describe() + invited.describe()
        assert again.wait(15) == 0 and invited.wait(15) == 0
        err = coordinator.err()
        assert "admitted by allow-list" in err and "admitted by invite code" in err, err
        # The one-time code is used up; the key it admitted is remembered, so that node may come back.
        from enshuffle.coordinator.admission import INVITED_FILE, load_invites

        assert all(entry["code"] != code for entry in load_invites(home).values())
        invited_key = load_or_create_identity("node", tmp_path / "n2", name="second").fingerprint
        assert invited_key in (home / INVITED_FILE).read_text()
        assert stat.S_IMODE((home / "invites.json").stat().st_mode) == 0o600
    finally:
        for proc in procs:
            proc.stop()


# --- a node that joins first and leaves -------------------------------------------------------


def test_nodes_that_take_work_and_vanish_never_abort_the_run(core_data_dir, tmp_path):
    """The issue's attack: join, receive a batch, close the sockets. Done MAX_ATTEMPTS + 2 times
    to the same batch, it used to abort the run ("failed 5 times, last because its node left")."""
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1, heartbeat_ms=200).start()
    honest = None
    try:
        first_batch = None
        for i in range(MAX_ATTEMPTS + 2):
            leaver = ScriptedNode(run.endpoint, f"leaver-{i}")
            leaver.hello()
            leaver.hold_next(1000)
            leaver.serve_until(lambda: leaver.held, 30, "a batch for the leaver", on_timeout=run.describe)
            batch_id = leaver.held[0].header["batch_id"]
            first_batch = first_batch or batch_id
            assert batch_id == first_batch  # the same batch, again and again
            leaver.close()  # vanishes: no BYE
            wait_until(lambda: not run.server.sessions, 10, "the leaver's session to end", on_timeout=run.describe)
            assert run.error is None, run.error
        honest = spawn_node(tmp_path / "honest", run.endpoint, run.identity.fingerprint, "honest", tmp_path)
        assert_same_weights(run.finish(120), expected)
    finally:
        run.close()
        if honest is not None:
            honest.stop()


# --- two processes with one key ------------------------------------------------------------------


def test_same_key_twins_are_refused_clearly_and_names_give_distinct_keys(core_data_dir, tmp_path):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2).start(hold_at=0)
    home = tmp_path / "shared-home"  # one machine, one user, one ENSHUFFLE_HOME
    fp = run.identity.fingerprint
    a = spawn_node(home, run.endpoint, fp, "same", tmp_path, proc_name="twin-a")
    procs = [a]
    try:
        wait_until(
            lambda: run.state.snapshot().nodes.get("same"), 30, "the first twin to join", on_timeout=run.describe
        )
        b = spawn_node(home, run.endpoint, fp, "same", tmp_path, proc_name="twin-b")
        procs.append(b)
        wait_until(lambda: "duplicate-key" in b.err(), 30, "the second twin to be told", on_timeout=b.describe)
        assert "--name" in b.err() and "already connected" in b.err()
        wait_until(
            lambda: run.logged("refused a second node with the key of same"),
            10,
            "the operator to be told",
            on_timeout=run.describe,
        )
        assert "dropped HEARTBEAT" not in "\n".join(run.log_lines())  # no flapping
        assert run.server.counters["handshakes"] >= 2 and len(run.server.sessions) == 1
        b.stop()
        # Another --name in the same home is another key: it joins beside the first.
        c = spawn_node(home, run.endpoint, fp, "other", tmp_path, proc_name="named-c")
        procs.append(c)
        wait_until(lambda: len(run.server.sessions) == 2, 30, "both named nodes to join", on_timeout=run.describe)
        keys = {s.key for s in run.server.sessions.values()}
        assert len(keys) == 2
        run.finish(120)
    finally:
        run.close()
        for proc in procs:
            proc.stop()


# --- state that never shrinks, and amplification --------------------------------------------------


def test_thousands_of_handshakes_from_fresh_keys_leave_no_state_behind(core_data_dir):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    # Waits for two nodes; each fresh key leaves before the next comes, so none ever receives data.
    # all from 127.0.0.1: only the global budget
    run = InProcessRun(preset, inputs, shards=2, min_nodes=2, address_replies_per_s=HANDSHAKE_REPLIES_PER_S).start()
    ctx = zmq.Context()
    server = run.server
    try:
        count = 300
        for i in range(count):
            node = ScriptedNode(run.endpoint, f"n{i}", context=ctx)
            try:
                node.hello()
            except AssertionError:  # over the handshake budget: try again (a real node backs off)
                node.close()
                node = ScriptedNode(run.endpoint, f"n{i}", context=ctx)
                node.hello(timeout=15)
            node.sign_and_send("BYE", {"node_id": node.node_id, "reason": "shutdown"})
            node.close()
        wait_until(
            lambda: not server.sessions and not server.joining, 30, "every session to end", on_timeout=run.describe
        )
        # Nothing was sent to any of them, so nothing about them is kept.
        assert server.counters["handshakes"] >= count
        assert server.labels == {} and run.state.snapshot().nodes == {}, (len(server.labels),)
        assert len(server.pending) <= 1 and len(server._warnings) <= 3
    finally:
        run.close()
        ctx.term()


def test_malformed_and_refused_handshakes_get_at_most_one_signed_answer(core_data_dir):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(
        preset,
        inputs,
        shards=1,
        min_nodes=1,
        admission=Admission(allow_file=None),  # admits nobody
        address_replies_per_s=HANDSHAKE_REPLIES_PER_S,
    ).start()  # the flood below tests the global budget
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(run.endpoint)
    counters = run.server.counters
    try:
        sent = 0
        for _ in range(300):  # garbage, old-version HIs, HELLOs without a challenge
            sock.send_multipart([os.urandom(40)])
            sock.send_multipart(encode("HI", {"protocol": 1, "nonce": os.urandom(8).hex()}))
            sock.send_multipart([b"ENS1", b"HELLO", b"{}", bytes(64)])
            sent += 3
        wait_until(
            lambda: counters["dropped"] + counters["refused"] >= sent - 1,
            30,
            "every message to be handled",
            on_timeout=run.describe,
        )
        answers = recv_all(sock, 200)
        assert len(answers) == 1, len(answers)  # one REFUSE version-mismatch, then silence
        assert decode(answers[0]).header["code"] == "version-mismatch"
        # A full, valid handshake by a key nobody admitted: one not-allowed, then silence too.
        stranger = ScriptedNode(run.endpoint, "stranger", context=ctx)
        with pytest.raises(AssertionError, match="not-allowed"):
            stranger.hello()
        stranger.send(stranger.hello_frames)
        assert recv_all(stranger.sock, 200) == []
        stranger.close()
        # Fresh connections each get a CHALLENGE, but the signing budget caps them in all.
        floods = [ctx.socket(zmq.DEALER) for _ in range(2 * HANDSHAKE_REPLIES_PER_S + 50)]
        before = counters["dropped"] + counters["challenges"]
        started = time.monotonic()
        for s in floods:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(run.endpoint)
            s.send_multipart(encode("HI", {"protocol": PROTOCOL_VERSION, "nonce": "x" * 16}))
        wait_until(
            lambda: counters["dropped"] + counters["challenges"] - before >= len(floods),
            30,
            "the flood to be handled",
            on_timeout=run.describe,
        )
        elapsed = time.monotonic() - started
        replies = sum(len(recv_all(s, 50)) for s in floods)
        assert 0 < replies <= HANDSHAKE_REPLIES_PER_S * (1 + elapsed) + 1, (replies, elapsed)
        assert replies < len(floods) or elapsed > 1.2, (replies, elapsed)
        for s in floods:
            s.close(0)
    finally:
        run.close()
        sock.close(0)
        ctx.term()


# --- files ----------------------------------------------------------------------------------------


def test_gzip_bomb_stops_at_the_size_its_header_declares(tmp_path):
    """1 MB of gzip inflating to ~1 GB behind a header that declares 60000 x 28 x 28 images: read
    under a 600 MB address-space limit, it must end in a one-line DataError, not a MemoryError."""
    header = struct.pack(">IIII", 0x803, 60000, 28, 28)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header)
        block = bytes(1 << 20)
        for _ in range(1024):
            fh.write(block)
    assert path.stat().st_size < 2 << 20
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (600 << 20, 600 << 20))\n"
        "from enshuffle.dataset import DataError, read_idx\n"
        "try:\n    read_idx(sys.argv[1])\nexcept DataError as exc:\n    print('DataError:', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "longer than its header says" in out.stdout, out.stdout
    assert "MemoryError" not in out.stderr


def test_a_header_declaring_absurd_sizes_is_refused_before_inflating(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">IIII", 0x803, 2**32 - 1, 2**16, 2**16) + bytes(100))
    from enshuffle.dataset import DataError, read_idx

    with pytest.raises(DataError, match="not a usable data file"):
        read_idx(path)


def test_run_directory_is_private(core_data_dir, core_cache, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "enshuffle",
            "train",
            "--nodes",
            "1",
            "--preset",
            "seed",
            "--epochs",
            "1",
            "--limit",
            "300",
            "--data",
            str(core_data_dir),
            "--out",
            str(run_dir),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=process_env(tmp_path / "home", core_cache),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    modes = {}
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            path = Path(root) / name
            modes[str(path.relative_to(run_dir))] = stat.S_IMODE(path.lstat().st_mode)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert any(name.endswith("run.json") for name in modes) and len(modes) > 3, modes
    for name, mode in modes.items():
        assert mode & 0o077 == 0, f"{name} has mode {mode:04o}"


def test_a_bad_allow_file_or_open_with_allow_is_a_one_line_error(tmp_path):
    allow = tmp_path / "allowed"
    allow.write_text("# ok\nSHA256:not-a-fingerprint\n")
    for extra, words in (
        (["--allow", str(allow)], ["line 2", "not a full key fingerprint"]),
        (["--allow", str(tmp_path / "missing")], ["cannot be read"]),
        (["--allow", str(allow), "--open"], ["choose one"]),
    ):
        out = enshuffle_cli(
            "coordinator", "--bind", f"tcp://127.0.0.1:{free_port()}", *extra, home=tmp_path / "h", timeout=60
        )
        assert out.returncode == 2, out.stderr
        assert all(w in out.stderr for w in words), out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_paused_nodes_do_not_count_toward_min_nodes(core_data_dir):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    paused = ScriptedNode(run.endpoint, "paused")
    paused.credit = 0
    try:
        paused.hello()
        paused.serve_until(
            lambda: run.server.sessions and all(s.want == 0 for s in run.server.sessions.values()),
            10,
            "the paused node to be a session",
            on_timeout=run.describe,
        )
        assert "waiting for nodes: 0 of 1" in run.state.snapshot().status, run.describe()
        paused.credit = 2
        paused.serve_until(run.done.is_set, 60, "training once it resumes", on_timeout=run.describe)
        run.finish()
    finally:
        run.close()
        paused.close()


def test_sessions_beyond_the_cap_are_told_busy_and_may_retry(core_data_dir):
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1, max_sessions=1).start(hold_at=0)
    first = ScriptedNode(run.endpoint, "first")
    second = ScriptedNode(run.endpoint, "second")
    try:
        first.hello()
        with pytest.raises(AssertionError, match="refused: busy"):
            second.hello()
        # The first counts as connected once its first sealed message is opened (ENS2 section 6).
        first.serve_until(
            lambda: len(run.server.sessions) == 1, 10, "the first node to be connected", on_timeout=run.describe
        )
        assert run.server.labels.keys() == {first.identity.public_bytes}
        first.serve_until(run.held, 30, "the run to start", on_timeout=run.describe)
        run.hold_at(-1)
        first.serve_until(run.done.is_set, 60, "training", on_timeout=run.describe)
        run.finish()
    finally:
        run.close()
        first.close()
        second.close()


def test_invite_codes_expire_and_admit_a_bounded_number_of_keys(tmp_path, monkeypatch):
    import json

    from enshuffle.coordinator.admission import INVITES_FILE, REUSABLE_MAX_KEYS, Admission, create_invite
    from enshuffle.protocol.handshake import invite_field
    from enshuffle.node.daemon import resolve_invite

    home = tmp_path / "coordinator"
    code = create_invite(home, reusable=True)
    admission = Admission(home=home)
    challenge = "ab" * 32

    def join() -> tuple[bool, str]:
        key = Identity.generate()
        return admission.check(key.public_bytes, invite_field(code, challenge, key.public_hex), challenge)

    assert all(join()[0] for _ in range(REUSABLE_MAX_KEYS))
    admitted, why = join()  # one party minting keys from one reusable code: stopped at the limit
    assert not admitted and "admitted its 16 node keys" in why
    one_time = create_invite(home, reusable=False)
    doc = json.loads((home / INVITES_FILE).read_text())
    for entry in doc["invites"].values():
        entry["expires_at"] = 0  # long ago
    (home / INVITES_FILE).write_text(json.dumps(doc))
    key = Identity.generate()
    admitted, why = admission.check(key.public_bytes, invite_field(one_time, challenge, key.public_hex), challenge)
    assert not admitted and "expired" in why
    # The node takes the code from the environment or a file, not only from its command line.
    monkeypatch.setenv("ENSHUFFLE_INVITE", "from-env")
    assert resolve_invite(None) == "from-env"
    (tmp_path / "code").write_text("from-file\n")
    assert resolve_invite(f"@{tmp_path / 'code'}") == "from-file"


def test_keys_from_one_invite_code_count_as_one_node_for_the_exposure_bound(core_data_dir, tmp_path):
    """One party with a reusable code makes two keys: together they get one block, never both."""
    import numpy as np

    from enshuffle.coordinator.admission import create_invite

    home = tmp_path / "coordinator"
    code = create_invite(home, reusable=True)
    honest_home = tmp_path / "honest"
    honest_key = load_or_create_identity("node", honest_home, name="honest")
    preset = default_preset(epochs=1)
    inputs = load_inputs(core_data_dir, preset, 600)
    expected = reference_weights(preset, inputs)
    run = InProcessRun(
        preset, inputs, shards=2, min_nodes=3, admission=Admission(home=home, auto={honest_key.public_bytes})
    ).start()
    first = ScriptedNode(run.endpoint, "party-1")
    second = ScriptedNode(run.endpoint, "party-2")
    honest = None
    try:
        first.hello(invite=code)
        second.hello(invite=code)
        honest = spawn_node(honest_home, run.endpoint, run.identity.fingerprint, "honest", tmp_path)

        def serve() -> None:
            first.pump(10)
            second.pump(10)

        wait_until(run.done.is_set, 120, "training to finish", idle=serve, on_timeout=run.describe)
        weights = run.finish()
    finally:
        run.close()
        first.close()
        second.close()
        if honest is not None:
            honest.stop()
    ledger = run.server.ledger
    together = np.union1d(ledger.positions("party-1", "images"), ledger.positions("party-2", "images"))
    assert together.size <= inputs.images["train"].shape[1] // 2 + 1, together.size  # one block of pixels at most
    assert ledger.positions("honest", "images").size > 0
    assert_same_weights(weights, expected)
