#!/usr/bin/env python3
"""Print enshuffle's structure: each package (or top-level module), its lines, and which others
it imports. The facts behind the map that opens docs/design.md; run it to regenerate them.

Usage: scripts/structure.py [--modules]

A unit is `enshuffle.X`: a subpackage (protocol, coordinator, ...) or a top-level module (model,
kernels, ...). An import counts wherever it is written, at the top or inside a function (as
tests/test_layering.py counts them), and so does a handler string "enshuffle.x.y:function" (the
CLI imports those with importlib); `name*` marks a unit imported only that way, lazily. Units are
listed bottom first: each after everything it imports at module level.
Only the standard library is used (ast), so it runs without the virtual environment.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "enshuffle"
HANDLER = re.compile(r"(enshuffle(?:\.\w+)+):\w+")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def unit_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def imports(path: Path, module: str) -> dict[str, bool]:
    """{enshuffle module imported: whether any import of it is at module level}."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    top_level = {id(node) for node in tree.body}
    for stmt in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at module level count as top level
        if isinstance(stmt, (ast.If, ast.Try)):
            top_level.update(id(child) for child in ast.walk(stmt))
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            handler = HANDLER.fullmatch(node.value)
            names = [handler.group(1)] if handler else []
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name == PACKAGE or not node.module:  # `from enshuffle import model`, `from . import x`
                names = [f"{name}.{alias.name}" for alias in node.names]
            else:
                names = [name]
        for name in names:
            if name.startswith(PACKAGE + ".") and (name in MODULES or unit_of(name) in MODULES):
                found[name] = found.get(name, False) or id(node) in top_level
    return found


MODULES = {module_name(p) for p in (ROOT / PACKAGE).rglob("*.py")}  # `from enshuffle import __version__` is none


def collect() -> tuple[dict[str, int], dict[str, int], dict[str, dict[str, bool]], dict[str, dict[str, bool]]]:
    """Lines per unit and per module, and the imports between units and between modules."""
    unit_lines: dict[str, int] = defaultdict(int)
    module_lines: dict[str, int] = {}
    unit_imports: dict[str, dict[str, bool]] = defaultdict(dict)
    module_imports: dict[str, dict[str, bool]] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        module = module_name(path)
        if module == PACKAGE:
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        unit = unit_of(module)
        unit_lines[unit] += lines
        module_lines[module] = lines
        found = imports(path, module)
        module_imports[module] = found
        for name, eager in found.items():
            target = unit_of(name)
            if target != unit:
                unit_imports[unit][target] = unit_imports[unit].get(target, False) or eager
    return dict(unit_lines), module_lines, dict(unit_imports), module_imports


def bottom_first(units: list[str], edges: dict[str, dict[str, bool]]) -> list[str]:
    """Each unit after every unit it imports at module level (ties by name); should those imports
    ever form a cycle, the unit with the fewest unlisted ones goes next."""
    order: list[str] = []
    remaining = sorted(units)
    while remaining:

        def unmet(unit: str) -> int:
            return sum(1 for t, eager in edges.get(unit, {}).items() if eager and t != unit and t not in order)

        chosen = min(remaining, key=lambda unit: (unmet(unit), unit))
        order.append(chosen)
        remaining.remove(chosen)
    return order


def short(name: str) -> str:
    return name.removeprefix(PACKAGE + ".")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", action="store_true", help="also list every module's lines and imports")
    args = parser.parse_args()
    unit_lines, module_lines, unit_imports, module_imports = collect()
    total = sum(unit_lines.values())
    print(f"{'unit':<14} {'lines':>6} {'share':>6}  imports (* only lazily: in functions, handler strings)")
    for unit in bottom_first(list(unit_lines), unit_imports):
        targets = unit_imports.get(unit, {})
        listed = ", ".join(short(t) + ("" if targets[t] else "*") for t in sorted(targets)) or "-"
        print(f"{short(unit):<14} {unit_lines[unit]:>6} {100 * unit_lines[unit] / total:>5.0f}%  {listed}")
    print(f"{'total':<14} {total:>6}")
    if args.modules:
        print()
        for module in sorted(module_lines):
            found = module_imports[module]
            listed = ", ".join(short(t) + ("" if found[t] else "*") for t in sorted(found)) or "-"
            print(f"{short(module):<28} {module_lines[module]:>5}  {listed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
