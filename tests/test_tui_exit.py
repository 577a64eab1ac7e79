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


def test_ctrl_c_in_the_console_stops_gracefully_and_leaves_the_figures(core_data_dir, core_cache, tmp_path):
    run_dir = tmp_path / "run"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = dict(os.environ, TERM="xterm-256color", ENSHUFFLE_HOME=str(tmp_path / "home"),
               ENSHUFFLE_CACHE=str(core_cache))
    proc = subprocess.Popen([sys.executable, "-m", "enshuffle", "train", "--tui", "--nodes", "2", "--epochs", "500",
                             "--limit", "600", "--data", str(core_data_dir), "--out", str(run_dir),
                             "--offload", "matmul"],
                            cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
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
    tail = text[text.rfind("Exposure ledger"):] if "Exposure ledger" in text else text[-3000:]
    assert proc.returncode == 130, tail
    assert "Exposure ledger" in text and "local-1" in tail, tail
    assert f"model chain: {run_dir}" in tail and f"enshuffle train --out {run_dir} --resume" in tail, tail
    assert "Press ctrl+q" not in text and "Traceback" not in text
