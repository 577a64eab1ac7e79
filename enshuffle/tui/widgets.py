"""Widgets and helpers shared by the coordinator console and the node app.

`TableSync` keeps a DataTable in step with a keyed mapping of rows: rows are added and removed
only when keys appear or disappear, and a cell is rewritten with `update_cell` only when its text
changed, so a 4 Hz refresh of 100 nodes touches just the cells that moved. `LogFeed` appends the
new lines of a bounded back-end log to a `Log` widget. `HelpScreen` is the `?` overlay.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence, Set

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Log, Static

from .format import new_log_lines


class TableSync:
    """Applies {row key: cell texts} to a DataTable with keyed rows and per-cell updates.

    `right` names the column keys whose text is right-aligned (numbers).
    """

    def __init__(self, table: DataTable, columns: Sequence[tuple[str, str, int]], right: Set[str] = frozenset()):
        self.table = table
        self.column_keys = [key for key, _label, _width in columns]
        self.right = set(right)
        self.rendered: dict[str, tuple[str, ...]] = {}
        for key, label, width in columns:
            table.add_column(label, width=width, key=key)

    def _cell(self, column_key: str, text: str) -> Text:
        return Text(text, justify="right" if column_key in self.right else "left", no_wrap=True)

    def apply(self, rows: Mapping[str, Sequence[str]]) -> int:
        """Bring the table to `rows` (insertion order for new rows); returns cells written."""
        written = 0
        for gone in [k for k in self.rendered if k not in rows]:
            self.table.remove_row(gone)
            del self.rendered[gone]
        for key, cells in rows.items():
            cells = tuple(cells)
            old = self.rendered.get(key)
            if old is None:
                self.table.add_row(*(self._cell(c, t) for c, t in zip(self.column_keys, cells)), key=key)
                written += len(cells)
            elif old != cells:
                for column_key, before, after in zip(self.column_keys, old, cells):
                    if before != after:
                        self.table.update_cell(key, column_key, self._cell(column_key, after))
                        written += 1
            self.rendered[key] = cells
        return written


def wrap_line(line: str, width: int) -> list[str]:
    """`line` in rows of at most `width` characters, continuation rows indented by two, broken at
    spaces where it can be (a fingerprint or a path is broken only when it is wider than a row)."""
    if width < 8 or len(line) <= width:
        return [line]
    return textwrap.wrap(
        line, width=width, subsequent_indent="  ", break_long_words=True, break_on_hyphens=False, drop_whitespace=True
    ) or [line]


class LogFeed:
    """Feeds Log widgets from successive snapshots of a bounded back-end log, each line wrapped
    to the widget's width (a Log never wraps, and the end of a line is where the remedy is).
    When a widget's width changes, its lines are wrapped afresh."""

    def __init__(self, *logs: Log):
        self.logs = logs
        self.seen: list[str] = []
        self._widths: dict[int, int] = {}

    @staticmethod
    def _width(log: Log) -> int:
        return max(0, log.scrollable_content_region.width - 1)  # a column for the scrollbar to come

    def apply(self, lines: Sequence[str]) -> None:
        current = list(lines)
        added = new_log_lines(self.seen, current)
        self.seen = current
        for log in self.logs:
            width = self._width(log)
            if self._widths.get(id(log)) != width:
                self._widths[id(log)] = width
                log.clear()
                rows = current
            else:
                rows = added
            if rows:
                log.write_lines([row for line in rows for row in wrap_line(line, width)])

    def reset(self) -> None:
        """Start again from an empty log (the next `apply` writes every line)."""
        for log in self.logs:
            log.clear()
        self.seen = []


class HelpScreen(ModalScreen[None]):
    """Keys and a legend of the columns, over the current screen; `?` or escape closes it."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 76; max-width: 100%; height: auto; max-height: 100%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [
        Binding("question_mark,escape", "dismiss_help", "close help"),
    ]

    def __init__(self, text: str):
        super().__init__()
        self.help_text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self.help_text, id="help-text", markup=False)

    def action_dismiss_help(self) -> None:
        self.dismiss(None)
