"""The node as a background service: the unit `--install-service` writes, started as systemd
would (its ExecStart and Environment, nothing else), stopped with SIGTERM; preferences and the
messages of a node that finds no coordinator."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enshuffle.node.policy import Policy, PolicyError, in_window, parse_window
from wire_util import InProcessRun, default_preset, load_inputs, wait_until

REPO = Path(__file__).resolve().parents[1]


def enshuffle(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "enshuffle", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or dict(os.environ))


def parse_unit(text: str) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """ExecStart as argv, the Environment= pairs, and the other [Service] keys."""
    argv, env, keys = None, {}, {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key == "ExecStart":
            argv = shlex.split(value)
        elif key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
        else:
            keys[key] = value
    assert argv, text
    return argv, env, keys


def test_the_installed_unit_runs_the_node_and_sigterm_stops_it_cleanly(core_data_dir, tmp_path):
    preset = default_preset(epochs=50)
    inputs = load_inputs(core_data_dir, preset, 300)
    run = InProcessRun(preset, inputs, shards=1, min_nodes=1).start()
    home = tmp_path / "home"
    config = tmp_path / "config"
    try:
        env = dict(os.environ, ENSHUFFLE_HOME=str(home), XDG_CONFIG_HOME=str(config))
        done = enshuffle("node", "--install-service", "--connect", run.endpoint, "--coordinator-key",
                         run.identity.fingerprint, "--name", "svc", "--threads", "1", env=env)
        assert done.returncode == 0, done.stderr
        unit = config / "systemd" / "user" / "enshuffle-node.service"
        assert str(unit) in done.stdout and "journalctl --user -u enshuffle-node.service" in done.stdout
        assert "systemctl --user stop enshuffle-node.service" in done.stdout
        argv, unit_env, keys = parse_unit(unit.read_text())
        assert "--keep-running" in argv and "--install-service" not in argv
        assert unit_env["ENSHUFFLE_HOME"] == str(home.resolve()) and keys["Nice"] == "19"
        assert keys["KillSignal"] == "SIGTERM"
        # As systemd starts it: that argv, a minimal environment plus the unit's Environment=.
        service_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **unit_env}
        # preexec_fn makes Popen fork() the whole process: not while the coordinator's thread is
        # inside BLAS preparing statics (OpenBLAS's fork handlers would wait on it for ever).
        wait_until(lambda: run.state.snapshot().status.startswith("waiting for nodes"), 30,
                   "the coordinator to wait for nodes", on_timeout=run.describe)
        proc = subprocess.Popen(argv, env=service_env, cwd="/", stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.nice(int(keys["Nice"])))
        try:
            wait_until(lambda: run.state.snapshot().nodes.get("svc") is not None and
                       run.state.snapshot().nodes["svc"].batches_done > 0, 60, "the service node to compute",
                       on_timeout=lambda: run.describe() + (proc.kill() or "\n" + proc.communicate()[1][-3000:]))
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
        wait_until(lambda: run.logged("svc") and run.logged("said BYE (shutdown)"), 20,
                   "the coordinator to hear the BYE")
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
    daemon = NodeDaemon(f"tcp://127.0.0.1:{_free_port()}", identity=Identity.generate(),
                        trust=TrustStore(tmp_path), pinned=None, name="t", threads=1, log=lines.append,
                        hello_timeout=0.2, give_up_after=0.0)
    assert daemon.run() == EXIT_UNREACHABLE
    assert "giving up" in daemon.error and "nothing is listening" in daemon.error and "--keep-running" in daemon.error
