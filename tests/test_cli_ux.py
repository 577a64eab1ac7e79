"""The command line as a new user meets it: --version, bare `enshuffle`, --help with defaults,
addresses a volunteer can use, the port checked first, resume and extend, exit statuses."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import zmq

from enshuffle.cli import build_parser
from enshuffle.coordinator.addresses import volunteer_addresses
from enshuffle.protocol.keys import Identity
from wire_util import Proc, process_env, wait_until

REPO = Path(__file__).resolve().parents[1]


def enshuffle(
    *args: str, cache: Path | None = None, cwd: Path = REPO, home: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if cache is not None:
        env["ENSHUFFLE_CACHE"] = str(cache)
    if home is not None:
        env["ENSHUFFLE_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "enshuffle", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "error:" in lines[-1], proc.stderr
    return lines[-1]


def test_version_and_bare_command():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = enshuffle("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"enshuffle {version}"
    done = enshuffle()
    assert done.returncode == 0 and "Traceback" not in done.stderr
    for command in ("train", "bench", "coordinator", "node", "keys", "chain"):
        assert f"\n    {command}" in done.stdout
    assert "ENSHUFFLE_HOME" in done.stdout and "ENSHUFFLE_CACHE" in done.stdout and "130" in done.stdout


def _parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


def test_every_option_has_help_and_every_default_is_shown():
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        text = text[text.index("options:") :]  # the option list, not the usage line
        for action in parser._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help, f"enshuffle {' '.join(path)} {action.option_strings[0]} has no help"
            if action.default not in (None, False):
                # The default appears in the help text right after this option's own help.
                after = text[text.index("\n  " + action.option_strings[0]) + 3 :]
                assert "default" in after.split("\n  -")[0], (path, action.option_strings, after[:200])


def test_volunteer_addresses_are_usable():
    assert volunteer_addresses("tcp://[::ffff:127.0.0.1]:5631") == ["tcp://127.0.0.1:5631"]
    assert volunteer_addresses("tcp://[::ffff:0.0.0.0]:5631", local=["192.0.2.7", "fd00::2"]) == [
        "tcp://192.0.2.7:5631"
    ]  # an IPv4 wildcard is not reachable over IPv6
    assert volunteer_addresses("tcp://[::]:5631", local=["192.0.2.7", "fd00::2"]) == [
        "tcp://192.0.2.7:5631",
        "tcp://[fd00::2]:5631",
    ]
    assert volunteer_addresses("tcp://[::]:5631", local=[]) == ["tcp://THIS_HOST:5631"]
    assert volunteer_addresses("tcp://[::1]:7") == ["tcp://[::1]:7"]


def test_a_taken_port_is_told_before_the_data_loads_and_leaves_no_run_dir(tmp_path):
    ctx = zmq.Context()
    holder = ctx.socket(zmq.ROUTER)
    port = holder.bind_to_random_port("tcp://127.0.0.1")
    try:
        done = enshuffle("coordinator", "--bind", f"tcp://127.0.0.1:{port}", cwd=tmp_path, home=tmp_path / "home")
    finally:
        holder.close(0)
        ctx.term()
    line = one_line_error(done)
    assert str(port) in line and "--bind" in line
    assert "data:" not in done.stderr  # checked before loading anything
    assert not (tmp_path / "runs").exists()  # no empty runs/run-* left behind


def test_wildcard_coordinator_prints_a_command_a_volunteer_can_run(core_data_dir, core_cache, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = Proc(
        [
            "coordinator",
            "--bind",
            f"tcp://0.0.0.0:{port}",
            "--data",
            str(core_data_dir),
            "--limit",
            "300",
            "--out",
            str(tmp_path / "run"),
        ],
        process_env(tmp_path / "home", core_cache),
        tmp_path,
        "coord",
    )
    try:
        wait_until(
            lambda: "waiting for 1 node" in proc.err(), 60, "the coordinator to listen", on_timeout=proc.describe
        )
        proc.signal(signal.SIGTERM)
        rc = proc.wait(30)
    finally:
        proc.stop()
    err = proc.err()
    assert "::ffff" not in err and f"listening on tcp://0.0.0.0:{port}" in err
    commands = [line.strip() for line in err.splitlines() if line.strip().startswith("enshuffle node --connect")]
    assert commands and all("0.0.0.0" not in c and f":{port} --coordinator-key SHA256:" in c for c in commands)
    assert rc == 130  # stopped before the run finished


def test_save_weights_to_an_unwritable_place_is_refused_before_training(core_data_dir, core_cache):
    done = enshuffle(
        "train",
        "--nodes",
        "0",
        "--epochs",
        "1",
        "--limit",
        "300",
        "--data",
        str(core_data_dir),
        "--save-weights",
        "/proc/w.npz",
        cache=core_cache,
    )
    line = one_line_error(done)
    assert "/proc/w.npz" in line and done.stdout == ""  # no epoch ran


def test_train_resume_continues_and_a_larger_epochs_extends_a_finished_run(core_data_dir, core_cache, tmp_path):
    run_dir = tmp_path / "run"
    common = ["train", "--nodes", "1", "--limit", "300", "--data", str(core_data_dir), "--out", str(run_dir)]
    first = enshuffle(*common, "--epochs", "1", "--json", cache=core_cache, home=tmp_path / "h")
    assert first.returncode == 0, first.stderr
    assert [json.loads(x)["type"] for x in first.stdout.splitlines()] == ["epoch", "ledger"]
    assert f"enshuffle train --out {run_dir} --resume --epochs 6" in first.stderr  # the hint, on exit
    again = enshuffle(*common, "--epochs", "1", cache=core_cache, home=tmp_path / "h")
    assert "--resume" in one_line_error(again)
    done_already = enshuffle(*common, "--resume", cache=core_cache, home=tmp_path / "h")
    assert "--epochs" in one_line_error(done_already)
    extended = enshuffle(*common, "--resume", "--epochs", "2", "--json", cache=core_cache, home=tmp_path / "h")
    assert extended.returncode == 0, extended.stderr
    epochs = [json.loads(x) for x in extended.stdout.splitlines() if json.loads(x)["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [2]
    assert json.loads((run_dir / "run.json").read_text())["epochs"] == 2
    log = enshuffle("chain", "log", str(run_dir), "--json")
    versions = [json.loads(x) for x in log.stdout.splitlines()]
    assert [v["metadata"]["epoch"] for v in versions] == [2, 1]


def test_train_gives_up_with_a_reason_when_its_local_nodes_cannot_connect(core_data_dir, tmp_path, monkeypatch, capsys):
    # The local nodes pin another coordinator's key, so each refuses this one (exit 3).
    from enshuffle.cli import main
    from enshuffle.commands import train as train_command

    real = train_command.spawn_local_nodes
    stranger = Identity.generate().fingerprint
    monkeypatch.setattr(
        train_command,
        "spawn_local_nodes",
        lambda endpoint, fp, count, workdir, threads=1: real(endpoint, stranger, count, workdir, threads),
    )
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "--nodes", "1", "--epochs", "1", "--limit", "300", "--data", str(core_data_dir)])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "waiting for the 1 local node to connect" in err
    assert "local node 1 exited with status 3" in err and "--coordinator-key pins" in err  # the node's own words


def test_data_bundled_chooses_the_subset_shipped_in_the_package(core_cache):
    from enshuffle.dataset import load_bundled_subset

    done = enshuffle(
        "train", "--nodes", "0", "--epochs", "1", "--limit", "300", "--data", "bundled", "--json", cache=core_cache
    )
    assert done.returncode == 0, done.stderr
    assert f"data: {load_bundled_subset().describe()}" in done.stderr


def test_verifying_an_empty_chain_says_there_is_nothing_yet(tmp_path):
    from enshuffle.chain import Chain
    from enshuffle.coordinator.run import verify_chain_message

    (tmp_path / "run").mkdir()
    ok, message = verify_chain_message(Chain(tmp_path / "run"))
    assert ok and "no model version yet" in message and "0 versions" not in message


def test_a_malformed_invite_is_refused_before_connecting(tmp_path):
    with socket.socket() as s:  # a port nothing listens on: the node must not even try
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = enshuffle(
        "node",
        "--connect",
        f"tcp://127.0.0.1:{port}",
        "--invite",
        "0a1b2c-not-a-code",
        home=tmp_path / "home",
        timeout=30,
    )
    line = one_line_error(done)
    assert "not an invite code" in line and "32 hex digits" in line, line


def test_a_used_invite_is_refused_as_used_not_as_a_stranger(core_data_dir, tmp_path):
    from enshuffle.coordinator.admission import Admission, create_invite
    from wire_util import InProcessRun, default_preset, load_inputs, spawn_node

    coordinator_home = tmp_path / "coordinator-home"
    code = create_invite(coordinator_home, reusable=False)
    other = "0" * 32  # well formed, but this coordinator never made it
    stale = create_invite(coordinator_home, reusable=True, expires_in=3600)
    invites = json.loads((coordinator_home / "invites.json").read_text())
    for entry in invites["invites"].values():
        if entry["code"] == stale:
            entry["expires_at"] -= 7200  # as if made two hours ago with --expires 1h
    (coordinator_home / "invites.json").write_text(json.dumps(invites))
    preset = default_preset(epochs=200)
    run = InProcessRun(
        preset,
        load_inputs(core_data_dir, preset, 300),
        shards=1,
        min_nodes=1,
        admission=Admission(home=coordinator_home),
    ).start()
    procs = []
    try:
        first = spawn_node(tmp_path / "a", run.endpoint, run.identity.fingerprint, "first", tmp_path, "--invite", code)
        procs.append(first)
        wait_until(
            lambda: run.logged("admitted by invite code") or not first.alive(),
            60,
            "the first node to join",
            on_timeout=run.describe,
        )
        fp = run.identity.fingerprint
        second = spawn_node(tmp_path / "b", run.endpoint, fp, "second", tmp_path, "--invite", code)
        third = spawn_node(tmp_path / "c", run.endpoint, fp, "third", tmp_path, "--invite", other)
        fourth = spawn_node(tmp_path / "d", run.endpoint, fp, "fourth", tmp_path, "--invite", stale)
        procs += [second, third, fourth]
        assert second.wait(60) == 4 and third.wait(60) == 4 and fourth.wait(60) == 4, (
            second.describe() + third.describe() + fourth.describe()
        )
        assert "already used" in second.err(), second.err()
        assert "not one this coordinator made" in third.err(), third.err()
        assert "expired" in fourth.err(), fourth.err()
    finally:
        for proc in procs:
            proc.stop()
        run.close()


def test_group_commands_alone_list_their_actions_and_exit_0():
    for group, action in (("keys", "show"), ("chain", "verify")):
        done = enshuffle(group)
        assert done.returncode == 0 and action in done.stdout and "Traceback" not in done.stderr, done


def test_offload_all_is_not_offered_and_in_process_needs_nodes(tmp_path):
    helped = enshuffle("train", "--help")
    assert "{auto,matmul}" in helped.stdout and "all is refused" not in helped.stdout
    assert "auto,matmul,all" not in helped.stdout
    line = one_line_error(enshuffle("train", "--in-process", "--nodes", "0", home=tmp_path))
    assert "--nodes K >= 1" in line, line


def test_keys_forget_drops_a_trusted_coordinator(tmp_path):
    from enshuffle.protocol.keys import TrustStore

    address = "tcp://127.0.0.1:5555"
    key = Identity.generate()
    TrustStore(tmp_path).check(address, key.fingerprint)  # trusted on first use
    done = enshuffle("keys", "forget", address, home=tmp_path)
    assert done.returncode == 0 and key.fingerprint in done.stdout, done.stderr
    assert TrustStore(tmp_path).remembered(address) is None
    again = enshuffle("keys", "forget", address, home=tmp_path)
    assert again.returncode == 1 and "no coordinator key is remembered" in again.stderr


def test_invite_without_connect_prints_this_machines_address(tmp_path):
    done = enshuffle("invite", home=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = volunteer_addresses("tcp://0.0.0.0:5555")[0]
    assert f"--connect {expected} " in done.stdout, done.stdout


def test_an_unusable_out_is_refused_before_the_data_loads(core_data_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for command in (["coordinator", "--bind", f"tcp://127.0.0.1:{port}"], ["train", "--nodes", "1"]):
        done = enshuffle(*command, "--out", str(blocker / "run"), "--data", str(core_data_dir), home=tmp_path / "h")
        line = one_line_error(done)
        assert "--out" in line and "writable" in line, line
        assert "data:" not in done.stderr, done.stderr  # nothing was loaded first


def test_a_coordinator_stopped_before_its_first_version_leaves_no_run_directory(core_data_dir, core_cache, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    proc = Proc(
        [
            "coordinator",
            "--bind",
            f"tcp://127.0.0.1:{port}",
            "--out",
            str(run_dir),
            "--data",
            str(core_data_dir),
            "--limit",
            "300",
        ],
        process_env(tmp_path / "home", core_cache),
        tmp_path,
        "c",
    )
    try:
        wait_until(
            lambda: "waiting for 1 node" in proc.err() or not proc.alive(),
            60,
            "the coordinator to wait",
            on_timeout=proc.describe,
        )
        waiting = [line for line in proc.err().splitlines() if "waiting for 1 node" in line][0]
        assert waiting[:4].isdigit() and waiting[4] == "-", waiting  # headless log lines are timestamped
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 130, proc.describe()
    finally:
        proc.stop()
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    assert "removed" in proc.err()


def test_a_misspelled_host_is_told_at_once_not_retried_for_minutes(tmp_path):
    done = enshuffle("node", "--connect", "tcp://no-such-host.invalid:5555", home=tmp_path, timeout=60)
    assert done.returncode == 5 and "cannot resolve host" in done.stderr, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr


def test_invites_can_be_listed_and_revoked(tmp_path):
    made = enshuffle("invite", "--connect", "tcp://192.0.2.7:5555", "--expires", "24h", home=tmp_path)
    assert made.returncode == 0, made.stderr
    code = made.stdout.split("invite code:")[1].split()[0]
    listed = enshuffle("invite", "--list", home=tmp_path)
    assert listed.returncode == 0 and "one-time" in listed.stdout and "valid until" in listed.stdout, listed.stdout
    assert code not in listed.stdout  # ids, not the secret codes
    revoked = enshuffle("invite", "--revoke", code, home=tmp_path)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
    assert "no invite codes" in enshuffle("invite", "--list", home=tmp_path).stdout
    again = enshuffle("invite", "--revoke", code, home=tmp_path)
    assert again.returncode == 1 and "no invite" in again.stderr
