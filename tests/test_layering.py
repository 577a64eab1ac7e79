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
for package in ("enshuffle.protocol", "enshuffle.chain", "enshuffle.coordinator", "enshuffle.node",
                "enshuffle.commands"):
    module = importlib.import_module(package)
    # every submodule too: a textual import hiding in one of them counts
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), package + "."):
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m == "textual" or m.startswith("textual."))))
"""


def test_backend_packages_do_not_import_textual():
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_the_probe_would_notice_textual():
    """The check above can fail: the same probe sees textual when the TUI is imported."""
    probe = PROBE.replace(
        '("enshuffle.protocol", "enshuffle.chain", "enshuffle.coordinator", "enshuffle.node",\n'
        '                "enshuffle.commands")',
        '("enshuffle.tui",)',
    )
    assert probe != PROBE
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "textual" in json.loads(result.stdout.strip().splitlines()[-1])


# Which enshuffle packages each layer may import (anywhere in a module, in a function too). No
# exceptions: only the command layer (and the CLI above it) opens a terminal app.
BELOW_COMMANDS = {
    "enshuffle.batch",
    "enshuffle.protocol",
    "enshuffle.errors",
    "enshuffle.kernels",
    "enshuffle.blas",
    "enshuffle.live",
    "enshuffle.model",
    "enshuffle.momentum",
    "enshuffle.dataset",
    "enshuffle.memory",
    "enshuffle.fpenv",
    "enshuffle.chain",
    "enshuffle.coordinator",
    "enshuffle.node",
}
LAYERS = {
    "enshuffle.batch": set(),
    "enshuffle.protocol": {"enshuffle.protocol", "enshuffle.errors", "enshuffle.batch"},
    "enshuffle.kernels": {"enshuffle.batch", "enshuffle.momentum"},
    "enshuffle.blas": set(),
    "enshuffle.fpenv": set(),
    "enshuffle.memory": set(),
    "enshuffle.errors": set(),
    "enshuffle.live": set(),
    "enshuffle.model": {"enshuffle.momentum"},
    "enshuffle.momentum": set(),
    "enshuffle.dataset": set(),
    "enshuffle.chain": {"enshuffle.chain", "enshuffle.protocol", "enshuffle.errors"},
    "enshuffle.node": {
        "enshuffle.node",
        "enshuffle.protocol",
        "enshuffle.errors",
        "enshuffle.batch",
        "enshuffle.kernels",
        "enshuffle.blas",
        "enshuffle.live",
        "enshuffle.model",
        "enshuffle.momentum",
        "enshuffle.memory",
        "enshuffle.fpenv",
    },
    "enshuffle.coordinator": {
        "enshuffle.coordinator",
        "enshuffle.protocol",
        "enshuffle.errors",
        "enshuffle.batch",
        "enshuffle.kernels",
        "enshuffle.blas",
        "enshuffle.live",
        "enshuffle.model",
        "enshuffle.momentum",
        "enshuffle.dataset",
        "enshuffle.memory",
        "enshuffle.fpenv",
        "enshuffle.chain",
    },
    "enshuffle.audit": BELOW_COMMANDS | {"enshuffle.audit"},
    "enshuffle.tui": BELOW_COMMANDS | {"enshuffle.tui"},
    # Every handler: it may import everything but the CLI that dispatches to it.
    "enshuffle.commands": BELOW_COMMANDS | {"enshuffle.audit", "enshuffle.tui", "enshuffle.commands"},
    "enshuffle.cli": BELOW_COMMANDS | {"enshuffle.audit", "enshuffle.tui", "enshuffle.commands", "enshuffle.cli"},
    "enshuffle.__main__": {"enshuffle.cli"},
}


def imported_modules(path: Path, module: str) -> set[str]:
    """Every enshuffle module `path` (the module `module`) imports, relative imports resolved."""
    import ast

    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name == "enshuffle" or not node.module:  # `from enshuffle import model`, `from .. import x`
                found.update(f"{name}.{alias.name}" for alias in node.names)
            else:
                found.add(name)
    return {name for name in found if name == "enshuffle" or name.startswith("enshuffle.")}


def _allowed(name: str, allowed: set[str]) -> bool:
    if name in ("enshuffle", "enshuffle.__version__"):  # the package itself (enshuffle/__init__.py)
        return True
    return any(name == a or name.startswith(a + ".") for a in allowed)


def layering_violations(root: Path) -> list[str]:
    """Every import a layer may not make, and every module that belongs to no layer (so a new
    package cannot escape the check by being absent from LAYERS)."""
    problems = []
    for path in sorted((root / "enshuffle").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if module == "enshuffle":
            continue
        layer = next((l for l in LAYERS if module == l or module.startswith(l + ".")), None)
        if layer is None:
            problems.append(f"{module} belongs to no layer")
            continue
        allowed = LAYERS[layer]
        for name in sorted(imported_modules(path, module)):
            if not _allowed(name, allowed):
                problems.append(f"{module} imports {name}")
    return problems


def test_lower_layers_never_import_higher_ones():
    """The coordinator and the node share kernels through enshuffle.kernels, never each other."""
    assert layering_violations(ROOT) == []


def test_the_layering_check_would_notice(tmp_path):
    """The check above can fail: a coordinator module importing the node's code is reported."""
    (tmp_path / "enshuffle" / "coordinator").mkdir(parents=True)
    (tmp_path / "enshuffle" / "coordinator" / "x.py").write_text(
        "def f():\n    from enshuffle.node.daemon import NodeDaemon\n    from ..node import state\n"
    )
    (tmp_path / "enshuffle" / "kernels.py").write_text("from enshuffle.coordinator import plan\n")
    assert layering_violations(tmp_path) == [
        "enshuffle.coordinator.x imports enshuffle.node",
        "enshuffle.coordinator.x imports enshuffle.node.daemon",
        "enshuffle.kernels imports enshuffle.coordinator",
    ]


def test_the_layering_check_notices_a_console_or_a_handler_below_the_commands(tmp_path):
    """No exception list: a coordinator or node module opening a terminal app, or importing a
    command handler, is reported, as is a handler importing the CLI and a module in no layer."""
    for package in ("coordinator", "node", "commands", "tui"):
        (tmp_path / "enshuffle" / package).mkdir(parents=True)
    (tmp_path / "enshuffle" / "coordinator" / "run.py").write_text(
        "def f():\n    from enshuffle.tui.coordinator_app import CoordinatorApp\n"
    )
    (tmp_path / "enshuffle" / "node" / "x.py").write_text(
        "from enshuffle.commands.node import cmd_node\nfrom ..tui import node_app\n"
    )
    (tmp_path / "enshuffle" / "tui" / "x.py").write_text("from enshuffle.commands import console\n")
    (tmp_path / "enshuffle" / "commands" / "x.py").write_text(
        "from enshuffle.tui import node_app\nfrom enshuffle.cli import main\n"
    )
    (tmp_path / "enshuffle" / "newpackage.py").write_text("")
    assert layering_violations(tmp_path) == [
        "enshuffle.commands.x imports enshuffle.cli",
        "enshuffle.coordinator.run imports enshuffle.tui.coordinator_app",
        "enshuffle.newpackage belongs to no layer",
        "enshuffle.node.x imports enshuffle.commands.node",
        "enshuffle.node.x imports enshuffle.tui",
        "enshuffle.tui.x imports enshuffle.commands",
    ]


def lazy_imports_without_reason(root: Path) -> list[str]:
    """Imports inside functions with no comment saying why: on the line, or just above the group
    of imports it belongs to. An import belongs at the top of its module unless it keeps the
    headless node's start fast (or textual off the headless paths)."""
    import ast

    problems = []
    for path in sorted((root / "enshuffle").rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines), str(path))):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                if "#" in lines[node.lineno - 1]:
                    continue
                above = node.lineno - 2
                while above >= 0 and lines[above].strip().startswith(("from ", "import ")):
                    above -= 1
                if above >= 0 and lines[above].strip().startswith("#"):
                    continue
                problems.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return problems


def test_imports_inside_functions_say_why():
    assert lazy_imports_without_reason(ROOT) == []


def test_the_lazy_import_check_would_notice(tmp_path):
    (tmp_path / "enshuffle").mkdir()
    (tmp_path / "enshuffle" / "x.py").write_text(
        "def f():\n    import json\n\n\ndef g():\n    # textual only on this path\n    import os\n    import sys\n"
    )
    assert lazy_imports_without_reason(tmp_path) == ["enshuffle/x.py:2: import json"]


def test_the_headless_node_starts_without_numpy_or_coordinator_code():
    """What `enshuffle node` loads before it sets the BLAS environment: the CLI and its own
    command module, not numpy (whose BLAS reads the environment once), not the coordinator."""
    probe = (
        "import sys; import enshuffle.cli, enshuffle.commands.node; "
        "print(sorted(m for m in sys.modules if m == 'numpy' or m.startswith('enshuffle.coordinator')"
        " or m == 'textual'))"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
