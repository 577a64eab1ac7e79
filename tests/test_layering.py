"""The back-end never pays for the TUI: importing it must not load textual (as Harlequin enforces)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import importlib, json, pkgutil, sys
loaded = {}
for package in ("enshuffle.protocol", "enshuffle.coordinator", "enshuffle.node"):
    module = importlib.import_module(package)
    # every submodule too: a textual import hiding in one of them counts
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m == "textual" or m.startswith("textual."))))
"""


def test_backend_packages_do_not_import_textual():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_probe_would_notice_textual():
    """The check above can fail: the same probe sees textual when the TUI is imported."""
    probe = PROBE.replace('("enshuffle.protocol", "enshuffle.coordinator", "enshuffle.node")', '("enshuffle.tui",)')
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "textual" in json.loads(result.stdout.strip().splitlines()[-1])
