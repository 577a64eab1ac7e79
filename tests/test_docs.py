"""The reference text stays true to the tree: every section of docs/protocol.md that code, tests
or docs cite exists, the README's Layout names every module and script, and the product (code,
README, docs) describes features, not its development history (that is CHANGELOG.md's)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", re.M)
CITE = re.compile(r"(?:protocol\.md,? section|spec(?: section)?|ENS2 section) (\d+(?:\.\d+)?)\b")
ISSUE = re.compile(r"\bissue [0-9]+", re.I)
UPSTREAM = ("libzmq", "pyzmq", "cpython", "numpy/", "textual/")  # their bug numbers may be cited


def _sources(*patterns: str) -> list[Path]:
    return sorted(p for pattern in patterns for p in REPO.glob(pattern) if "__pycache__" not in p.parts)


def test_every_cited_protocol_section_exists():
    sections = set(HEADING.findall((REPO / "docs" / "protocol.md").read_text(encoding="utf-8")))
    assert {"1", "6", "6.1", "15"} <= sections, sections
    wrong = []
    for path in _sources("enshuffle/**/*.py", "tests/*.py", "scripts/*", "README.md", "docs/*.md"):
        if path.is_dir():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            wrong += [f"{path.relative_to(REPO)}:{n}: section {s}" for s in CITE.findall(line) if s not in sections]
    assert not wrong, "cited sections that docs/protocol.md does not have:\n" + "\n".join(wrong)


def test_the_product_names_no_issue_of_this_project():
    found = []
    for path in _sources("enshuffle/**/*.py", "README.md", "docs/*.md"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ISSUE.search(line) and not any(name in line for name in UPSTREAM):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "development history belongs in CHANGELOG.md:\n" + "\n".join(found)


def test_the_readme_layout_names_every_module_and_script():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    layout = layout.split("\n## ")[0]
    files = [p for p in _sources("enshuffle/**/*.py") if p.name != "__init__.py"]
    files += [p for p in (REPO / "scripts").iterdir() if p.is_file()]
    named = set(re.findall(r"`(?:[\w./-]*/)?([\w.-]+)`", layout))  # `name` or `path/to/name`
    missing = sorted(str(p.relative_to(REPO)) for p in files if p.name not in named)
    assert not missing, "README's Layout section does not name: " + ", ".join(missing)
