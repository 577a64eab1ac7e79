"""The node as a background service: the unit `--install-service` writes, started as systemd
would (its ExecStart and Environment, nothing else), stopped with SIGTERM; preferences and the
messages of a node that finds no coordinator."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from enshuffle.node.policy import Policy, PolicyError, in_window, parse_window
from wire_util import InProcessRun, default_preset, load_inputs, wait_until

REPO = Path(__file__).resolve().parents[1]


def enshuffle(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "enshuffle", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or dict(os.environ),
    )


def systemd_words(value: str) -> list[str]:
    """A unit setting's value split as systemd does (systemd.syntax(7)): words separated by
    spaces, double or single quotes around a word, C-style escapes, then `%%` -> `%` (specifiers)
    and `$$` -> `$` (ExecStart's variable expansion; a lone `$NAME` is left for the test to see)."""
    words, i = [], 0
    escapes = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", " ": " "}
    while i < len(value):
        if value[i] == " ":
            i += 1
            continue
        quote = value[i] if value[i] in "\"'" else None
        i += 1 if quote else 0
        word = []
        while i < len(value) and (value[i] != quote if quote else value[i] != " "):
            if value[i] == "\\":
                nxt = value[i + 1]
                if nxt == "x":
                    word.append(chr(int(value[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                word.append(escapes[nxt])
                i += 2
                continue
            word.append(value[i])
            i += 1
        i += 1 if quote else 0
        words.append("".join(word).replace("%%", "%").replace("$$", "$"))
    return words


def parse_unit(text: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """ExecStart as argv, the Environment= pairs, and the other keys, read as systemd reads them."""
    argv, env, keys = None, {}, {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key == "ExecStart":
            argv = systemd_words(value)
        elif key == "Environment":
            for pair in systemd_words(value):
                name, _, val = pair.partition("=")
                env[name] = val
        else:
            assert key not in keys, f"{key}= twice in the unit:\n{text}"
            keys[key] = value
    assert argv, text
    return argv, env, keys


def start_as_systemd(
    run: InProcessRun, argv: list[str], unit_env: dict, home: Path, preexec_fn: Callable[[], object] | None = None
) -> subprocess.Popen:
    """A unit's ExecStart `argv` started as systemd would: a minimal environment (PATH, HOME
    `home`) plus the unit's Environment= `unit_env`, in /, output piped; once `run` waits for
    nodes (a `preexec_fn` makes Popen fork() the whole process: not while the coordinator's
    thread is inside BLAS preparing statics, whose OpenBLAS fork handlers would wait on it for
    ever)."""
    service_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **unit_env}
    run.wait_waiting_for_nodes()
    return subprocess.Popen(
        argv,
        env=service_env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def test_the_installed_unit_runs_the_node_and_sigterm_stops_it_cleanly(core_data_dir, tmp_path):
    preset = default_preset(epochs=50)
    inputs = load_inputs(core_data_dir, preset, 300)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    home = tmp_path / "home"
    config = tmp_path / "config"
    try:
        env = dict(os.environ, ENSHUFFLE_HOME=str(home), XDG_CONFIG_HOME=str(config))
        done = enshuffle(
            "node",
            "--install-service",
            "--connect",
            run.endpoint,
            "--coordinator-key",
            run.identity.fingerprint,
            "--name",
            "svc",
            "--threads",
            "1",
            env=env,
        )
        assert done.returncode == 0, done.stderr
        unit = config / "systemd" / "user" / "enshuffle-node-svc.service"
        assert str(unit) in done.stdout and "journalctl --user -u enshuffle-node-svc.service" in done.stdout
        assert "systemctl --user stop enshuffle-node-svc.service" in done.stdout
        argv, unit_env, keys = parse_unit(unit.read_text())
        assert "--keep-running" in argv and "--install-service" not in argv
        assert unit_env["ENSHUFFLE_HOME"] == str(home.resolve()) and keys["Nice"] == "19"
        assert keys["KillSignal"] == "SIGTERM"
        proc = start_as_systemd(run, argv, unit_env, tmp_path, preexec_fn=lambda: os.nice(int(keys["Nice"])))
        try:
            wait_until(
                lambda: (
                    run.state.snapshot().nodes.get("svc") is not None
                    and run.state.snapshot().nodes["svc"].batches_done > 0
                ),
                60,
                "the service node to compute",
                on_timeout=lambda: run.describe() + (proc.kill() or "\n" + proc.communicate()[1][-3000:]),
            )
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert "stopping: BYE" in err and "totals:" in err.splitlines()[-1]
        assert err.splitlines()[0][:4].isdigit()  # timestamped lines
        wait_until(
            lambda: run.logged("svc") and run.logged("said BYE (shutdown)"), 20, "the coordinator to hear the BYE"
        )
    finally:
        run.close()


def test_threads_beyond_the_cores_are_refused():
    cores = len(os.sched_getaffinity(0))
    done = enshuffle("node", "--connect", "tcp://127.0.0.1:9", "--threads", str(cores + 1))
    assert done.returncode == 2 and f"1..{cores}" in done.stderr and "Traceback" not in done.stderr


def test_hours_window_and_max_cpu():
    assert parse_window("22:00-07:00") == (22 * 60, 7 * 60)
    assert in_window((22 * 60, 7 * 60), 23 * 60) and in_window((22 * 60, 7 * 60), 60)
    assert not in_window((22 * 60, 7 * 60), 12 * 60)
    assert in_window((9 * 60, 17 * 60), 9 * 60) and not in_window((9 * 60, 17 * 60), 17 * 60)
    for bad in ("22:00", "25:00-01:00", "10:00-10:00", "9-17"):
        with pytest.raises(PolicyError):
            parse_window(bad)
    assert Policy(max_cpu=25).rest_after(1.0) == pytest.approx(3.0)  # computes 1 s in every 4
    assert Policy(max_cpu=100).rest_after(5.0) == 0.0
    noon = time.mktime((2026, 1, 5, 12, 0, 0, 0, 0, -1))
    assert "outside the hours" in Policy.from_args(hours="22:00-07:00").outside_hours(noon)
    assert Policy.from_args(hours="09:00-17:00").outside_hours(noon) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_silence_is_told_apart_from_an_unresolvable_or_closed_address():
    from enshuffle.node.daemon import diagnose_silence

    assert "cannot resolve host" in diagnose_silence("tcp://no-such-host.invalid:5555")
    assert "nothing is listening" in diagnose_silence(f"tcp://127.0.0.1:{_free_port()}")
    with socket.socket() as listener:  # accepts connections, says nothing
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert "accepts connections but no coordinator answered" in diagnose_silence(f"tcp://127.0.0.1:{port}")


def test_without_keep_running_a_node_gives_up_with_the_reason(tmp_path):
    from enshuffle.node.daemon import EXIT_UNREACHABLE, NodeDaemon
    from enshuffle.protocol.keys import Identity, TrustStore

    lines: list[str] = []
    daemon = NodeDaemon(
        f"tcp://127.0.0.1:{_free_port()}",
        identity=Identity.generate(),
        trust=TrustStore(tmp_path),
        pinned=None,
        name="t",
        threads=1,
        log=lines.append,
        hello_timeout=0.2,
        give_up_after=0.0,
    )
    assert daemon.run() == EXIT_UNREACHABLE
    assert "giving up" in daemon.error and "nothing is listening" in daemon.error and "--keep-running" in daemon.error


def test_the_unit_keeps_every_option_and_each_name_gets_its_own(core_data_dir, tmp_path):
    """--invite, --max-memory and --nice 0 reach the service, a second --name does not overwrite
    the first unit, a refusal (exit 3/4) or a wrong value (2) is not restarted, and the service
    joins an invite-only coordinator with the invite it was installed with."""
    from enshuffle.coordinator.admission import Admission, create_invite

    coordinator_home = tmp_path / "coordinator-home"
    code = create_invite(coordinator_home, reusable=False)
    preset = default_preset(epochs=50)
    run = InProcessRun(
        preset,
        load_inputs(core_data_dir, preset, 300),
        shards=1,
        min_nodes=1,
        admission=Admission(home=coordinator_home),
    ).start()
    home, config = tmp_path / "home", tmp_path / "config"
    env = dict(os.environ, ENSHUFFLE_HOME=str(home), XDG_CONFIG_HOME=str(config))
    try:
        common = [
            "node",
            "--install-service",
            "--connect",
            run.endpoint,
            "--coordinator-key",
            run.identity.fingerprint,
            "--threads",
            "1",
            "--max-memory",
            "96M",
            "--nice",
            "0",
            "--max-cpu",
            "90",
            "--hours",
            "00:00-23:59",
        ]
        first = enshuffle(*common, "--name", "first", "--invite", code, env=env)
        assert first.returncode == 0, first.stderr
        second = enshuffle(*common, "--name", "second", env=env)
        assert second.returncode == 0, second.stderr
        units = config / "systemd" / "user"
        text = (units / "enshuffle-node-first.service").read_text()
        assert (units / "enshuffle-node-second.service").is_file()
        argv, unit_env, keys = parse_unit(text)
        assert argv[argv.index("--max-memory") + 1] == str(96 << 20)
        assert argv[argv.index("--name") + 1] == "first" and argv[argv.index("--max-cpu") + 1] == "90"
        assert argv[argv.index("--hours") + 1] == "00:00-23:59" and "--keep-running" in argv
        assert code not in " ".join(argv) and unit_env["ENSHUFFLE_INVITE"] == code  # not in `ps`
        assert keys["Nice"] == "0"
        assert {"2", "3", "4"} <= set(keys["RestartPreventExitStatus"].split())
        assert "network-online" not in text
        assert (units / "enshuffle-node-first.service").stat().st_mode & 0o077 == 0  # it holds the invite
        proc = start_as_systemd(run, argv, unit_env, tmp_path)
        try:
            wait_until(
                lambda: (
                    (
                        run.state.snapshot().nodes.get("first") is not None
                        and run.state.snapshot().nodes["first"].batches_done > 0
                    )
                    or proc.poll() is not None
                ),
                60,
                "the service node to compute",
                on_timeout=run.describe,
            )
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert run.logged("admitted by invite code")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0, err
    finally:
        run.close()


@pytest.mark.parametrize("option", ["--name", "--connect"])
def test_a_newline_cannot_inject_a_line_into_the_unit(tmp_path, option):
    config = tmp_path / "config"
    env = dict(os.environ, ENSHUFFLE_HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(config))
    evil = "\nExecStartPre=/bin/touch " + str(tmp_path / "pwned")
    values = {"--name": "svc", "--connect": "tcp://127.0.0.1:5555"}
    values[option] = (values[option] + evil) if option == "--name" else "tcp://127.0.0.1" + evil + ":5555"
    done = enshuffle("node", "--install-service", "--connect", values["--connect"], "--name", values["--name"], env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "control character" in done.stderr and "Traceback" not in done.stderr
    assert not (config / "systemd").exists() or not any((config / "systemd").rglob("*.service"))


def test_unit_values_are_quoted_by_systemds_rules(tmp_path):
    """A home and a recording directory with spaces, quotes, backslashes, `%` and `$` reach the
    service exactly (systemd would otherwise split them, expand %h or $USER, or eat a backslash)."""
    odd = tmp_path / 'my "odd" dir %h $USER \\x'
    home, record = odd / "home", odd / "rec"
    config = tmp_path / "config"
    env = dict(os.environ, ENSHUFFLE_HOME=str(home), XDG_CONFIG_HOME=str(config))
    done = enshuffle(
        "node",
        "--install-service",
        "--connect",
        "tcp://127.0.0.1:5555",
        "--name",
        "odd",
        "--record",
        str(record),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    text = (config / "systemd" / "user" / "enshuffle-node-odd.service").read_text()
    argv, unit_env, _ = parse_unit(text)
    assert unit_env["ENSHUFFLE_HOME"] == str(home.resolve())
    assert argv[argv.index("--record") + 1] == str(record)
    for line in text.splitlines():
        if line.startswith(("ExecStart=", "Environment=")):  # specifiers are expanded in both
            assert "%h" not in line.replace("%%", ""), line
        if line.startswith("ExecStart="):  # variables only in ExecStart
            assert "$USER" not in line.replace("$$", ""), line
