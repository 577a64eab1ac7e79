"""The reference text stays true to itself: every section of docs/protocol.md that code, tests or
docs cite exists, and the product (code, README, docs) describes features, not its development
history (that is CHANGELOG.md's)."""

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
            wrong += [f"{path.relative_to(REPO)}:{n}: section {s}" for s in CITE.findall(line)
                      if s not in sections]
    assert not wrong, "cited sections that docs/protocol.md does not have:\n" + "\n".join(wrong)


def test_the_product_names_no_issue_of_this_project():
    found = []
    for path in _sources("enshuffle/**/*.py", "README.md", "docs/*.md"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ISSUE.search(line) and not any(name in line for name in UPSTREAM):
                found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "development history belongs in CHANGELOG.md:\n" + "\n".join(found)
