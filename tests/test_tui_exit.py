"""`enshuffle train --tui` in a real pseudo-terminal: Ctrl-C is the graceful stop, and once the
console has closed the final figures, the chain's path and the command to continue are left on
the terminal, with exit status 130 (interrupted)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _console_env(tmp_path: Path, core_cache: Path) -> dict:
    return dict(
        os.environ, TERM="xterm-256color", ENSHUFFLE_HOME=str(tmp_path / "home"), ENSHUFFLE_CACHE=str(core_cache)
    )


def _train_console_argv(core_data_dir: Path, run_dir: Path) -> list[str]:
    """A two-node training console long enough (500 epochs) to be stopped while it runs."""
    return [
        sys.executable,
        "-m",
        "enshuffle",
        "train",
        "--tui",
        "--nodes",
        "2",
        "--epochs",
        "500",
        "--limit",
        "600",
        "--data",
        str(core_data_dir),
        "--out",
        str(run_dir),
        "--offload",
        "matmul",
    ]


def _spawn_in_pty(
    argv: list[str], env: dict, controlling: bool, rows: int = 24, cols: int = 80
) -> tuple[subprocess.Popen, int]:
    """`argv` on the slave side of a new pseudo-terminal of `rows` x `cols` (its controlling
    terminal when `controlling`, as a shell's job is); returns the process and the master side."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def take_terminal() -> None:  # after setsid (start_new_session), in the child
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        preexec_fn=take_terminal if controlling else None,
    )
    os.close(slave)
    return proc, master


def test_ctrl_c_in_the_console_stops_gracefully_and_leaves_the_figures(core_data_dir, core_cache, tmp_path):
    run_dir = tmp_path / "run"
    env = _console_env(tmp_path, core_cache)
    proc, master = _spawn_in_pty(_train_console_argv(core_data_dir, run_dir), env, controlling=False, rows=40, cols=120)
    output = bytearray()

    def read_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the other side closed
                    return
                if not chunk:
                    return
                output.extend(chunk)

    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "chain" / "HEAD").exists():
            assert time.monotonic() < deadline and proc.poll() is None, output[-2000:].decode(errors="replace")
            read_for(0.2)
        os.write(master, b"\x03")  # Ctrl-C, as a key in the console's raw terminal
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the console did not stop after Ctrl-C"
            read_for(0.2)
        read_for(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = output.decode(errors="replace")
    tail = text[text.rfind("Exposure ledger") :] if "Exposure ledger" in text else text[-3000:]
    assert proc.returncode == 130, tail
    assert "Exposure ledger" in text and "local-1" in tail, tail
    assert f"model chain: {run_dir}" in tail and f"enshuffle train --out {run_dir} --resume" in tail, tail
    assert "Press ctrl+q" not in text and "Traceback" not in text


def _drain(master: int, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                if not os.read(master, 65536):
                    return
            except OSError:
                return


import pytest  # noqa: E402


@pytest.mark.parametrize("controlling", [True, False], ids=["hangup-and-sighup", "eof-only"])
def test_a_console_whose_terminal_closes_stops_gracefully(core_data_dir, core_cache, tmp_path, controlling):
    """Closing the terminal (tmux kill-session, an ssh drop) is the graceful stop: the step
    finishes, a version is written, the nodes are told BYE, and the process exits 130."""
    run_dir = tmp_path / "run"
    env = _console_env(tmp_path, core_cache)
    proc, master = _spawn_in_pty(_train_console_argv(core_data_dir, run_dir), env, controlling)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "chain" / "HEAD").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not write a first version"
            _drain(master, 0.2)
        os.close(master)  # the terminal goes away
        master = -1
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the console kept running after its terminal closed") from None
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, rc  # stopped before the run finished, gracefully (a signal's death is negative)
    verify = subprocess.run(
        [sys.executable, "-m", "enshuffle", "chain", "verify", str(run_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_the_node_app_whose_terminal_closes_says_bye(core_data_dir, tmp_path):
    from wire_util import InProcessRun, default_preset, load_inputs, wait_until

    preset = default_preset(epochs=500)
    run = InProcessRun(preset, load_inputs(core_data_dir, preset, 300), shards=1, min_nodes=1).start()
    env = dict(os.environ, TERM="xterm-256color", ENSHUFFLE_HOME=str(tmp_path / "home"))
    run.wait_waiting_for_nodes()  # the spawn below forks this process (its preexec_fn)
    proc, master = _spawn_in_pty(
        [
            sys.executable,
            "-m",
            "enshuffle",
            "node",
            "--tui",
            "--connect",
            run.endpoint,
            "--coordinator-key",
            run.identity.fingerprint,
            "--name",
            "ttynode",
            "--threads",
            "1",
        ],
        env,
        controlling=True,
    )
    try:

        def computing() -> bool:
            _drain(master, 0.05)
            node = run.state.snapshot().nodes.get("ttynode")
            return node is not None and node.batches_done > 0

        wait_until(computing, 60, "the node to compute", on_timeout=run.describe)
        os.close(master)
        master = -1
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the node app kept running after its terminal closed") from None
        assert rc == 0, rc  # the daemon's status after its BYE (a signal's death is negative, a hang times out)
        wait_until(lambda: run.logged("node ttynode (n1) left"), 20, "the coordinator to see the node leave")
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run.close()
