"""The coordinator console: the operator's live view of a training run.

Owns only presentation. The back-end keeps a `CoordinatorState` up to date under its lock; this
app pulls `source()` (a snapshot copy) on a timer at `refresh_hz` and applies it to the widgets
inside one `batch_update()`, so a thousand batch events per second cost the UI nothing but one
copy per tick. Tables are keyed by node id / version id and change cell by cell.

Keys: p pauses or resumes training, v verifies the model chain (in a worker thread, so the UI
never blocks), ? shows help, q quits.

Quitting is graceful (the shared logic is `base.SnapshotApp`'s). The first q calls
`control.request_stop()`: the coordinator finishes the current step, writes a model version and
says BYE to its nodes, while the console stays up and shows "stopping". The app exits by itself
once a snapshot says `finished`, or at once when the back-end is gone (`source()` raises). A
second q leaves at once without waiting; the back-end still stops on its own. When the run is
already finished, q leaves at once. `app.return_value` says which: "finished", "backend-gone" or
"left-early".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, Log, Sparkline, Static, TabbedContent, TabPane
from textual.worker import Worker, WorkerState

from ..coordinator.state import FORM_LETTERS, TENSORS, CoordinatorControl, CoordinatorState, NodeRow, VersionRow
from .format import (
    BOUNDED_TENSORS,
    fmt_accuracy,
    fmt_age,
    fmt_clock,
    fmt_duration,
    fmt_rate,
    fmt_share,
    over_bound,
    progress_fraction,
    share_bar,
    short_fp,
    short_id,
    text_bar,
    verification_marks,
)
from .base import HELP_BINDING, INTERRUPT_BINDING, QUIT_BINDING, SnapshotApp, terminal_fd, terminal_gone  # noqa: F401  (re-exported for run.py)
from .widgets import LogFeed, TableSync

NODE_COLUMNS = [
    ("name", "node", 16),
    ("state", "state", 8),
    ("done", "done", 7),
    ("out", "out", 3),
    ("rate", "rate", 7),
    ("seen", "seen", 6),
    ("reissued", "reiss", 5),
    ("refused", "refus", 5),
    ("images", "images", 6),
    ("w1", "w1", 6),
    ("w2", "w2", 6),
    ("fp", "fp", 9),
    ("address", "address", 21),
    ("why", "why", 60),
]
NODE_NUMERIC = {"done", "out", "rate", "seen", "reissued", "refused", "images", "w1", "w2"}
# Which columns fit, by terminal width: every one fits whole (no fingerprint cut mid-group, no
# address cut mid-number); what does not fit is in the node's detail (Enter).
NODE_TIERS = [
    (156, [c[0] for c in NODE_COLUMNS]),  # everything, "why" takes the rest of the width
    (112, ["name", "state", "done", "out", "rate", "seen", "reissued", "refused", "images", "w1", "w2", "fp"]),
    (0, ["name", "state", "done", "rate", "images", "w1", "fp"]),
]


def node_columns(width: int) -> list[tuple[str, str, int]]:
    """The nodes table's columns for a terminal `width` wide (see NODE_TIERS)."""
    keys = next(keys for minimum, keys in NODE_TIERS if width >= minimum)
    columns = [c for c in NODE_COLUMNS if c[0] in keys]
    if "why" in keys:
        used = sum(w + 2 for k, _, w in columns if k != "why")
        columns = [(k, label, max(20, width - 6 - used) if k == "why" else w) for k, label, w in columns]
    return columns


TENSOR_LABELS = {"activations": "activ."}
TENSOR_SHORT = {"images": "img"}  # for the OVER flag, which must fit its column
EXPOSURE_NAME_WIDTH = 12
EXPOSURE_FLAG_WIDTH = 11

CHAIN_COLUMNS = [
    ("version", "version", 8),
    ("parent", "parent", 8),
    ("epoch", "epoch", 5),
    ("step", "step", 5),
    ("test", "test acc", 8),
    ("time", "time", 8),
    ("verified", "verified", 9),
]
CHAIN_NUMERIC = {"epoch", "step", "test"}

HELP_TEXT = """\
enshuffle coordinator console

Keys
  p        pause / resume training (the current step finishes first)
  v        verify the model chain (as `enshuffle chain verify` does)
  a        re-admit the selected node if it is quarantined (its
           results were refused as wrong; SIGHUP re-admits all)
  q        stop: finish the current step, write a model version and
           say BYE to the nodes, then leave; q again leaves at once
  1 2 3 4  show Nodes, Exposure, Chain, Log (on a large terminal
           the log sits below the tabs)
  enter    on a node: its detail (batches, rate, refusals and
           exposure over time); escape closes it
  s        sort the nodes: joined, state, done, rate, refused,
           images, name (numbers largest first)
  /        filter: only nodes and log lines containing the text;
           enter keeps it, escape clears it
  ?        show / hide this help;  tab / shift+tab move the focus
  arrows   move in tables; in Chain, the selected version's
           metadata is shown next to the table

Nodes
  done / out   batches finished / outstanding (leased, not returned)
  rate         batches per second, recent
  seen         time since the node's last message
  reiss/refus  batches reissued after a missed deadline /
               results refused
  images w1 w2 share of each tensor's elements the node has seen
  fp           the node's key fingerprint (first two groups)
  state        working: computing a batch · waiting: connected, no
               batch now (why says why) · paused: its volunteer
               paused it · standby: every block is held by another
               node · lost: it left mid-run (why says how)

Exposure
  one bar per node and kind of information; ┃ marks the exposure
  bound for images and w1 (enforced: a block never moves to a node
  it would push over). The letter after a share is the form it
  arrived in: h values hidden (mixed with noise), p positions hidden
  (shuffled; values readable), c clear. labels, outputs, w2 and
  activations never leave the coordinator.

Chain
  verified: ✓ ok, ✗ FAILED, – not checked yet
"""


def node_cells(row: NodeRow, now: float, keys: list[str] | None = None) -> tuple[str, ...]:
    """One node as the texts of the nodes table, in NODE_COLUMNS order (or only `keys`)."""
    cells = _all_node_cells(row, now)
    if keys is None:
        return cells
    by_key = dict(zip((c[0] for c in NODE_COLUMNS), cells))
    return tuple(by_key[k] for k in keys)


def _all_node_cells(row: NodeRow, now: float) -> tuple[str, ...]:
    exp = row.exposure
    return (
        row.name or row.node_id,
        row.state,
        f"{row.batches_done:,}",
        str(row.outstanding),
        fmt_rate(row.rate),
        fmt_age(now, row.last_seen),
        str(row.reissued),
        str(row.refused),
        fmt_share(exp.get("images")),
        fmt_share(exp.get("w1")),
        fmt_share(exp.get("w2")),
        short_fp(row.fingerprint),
        row.address or "–",
        row.reason or "",
    )


def exposure_bar_widths(available: int, tensors: tuple[str, ...] = TENSORS) -> dict[str, int]:
    """Bar width per tensor column for a table `available` cells wide (0: percentage only).

    Every tensor gets a bar when there is room. On a narrow terminal the bounded tensors keep
    bars that fit on screen next to the node name and flag, and the others become percentages
    further right (the table scrolls sideways with the node name pinned), so what the bound
    is about is never cut off.
    """
    fixed = (EXPOSURE_NAME_WIDTH + 2) + (EXPOSURE_FLAG_WIDTH + 2)
    per_column = 2 + 8  # cell padding and " 100.0%h" (the form letter too: one cell more than it seems)
    every = (available - fixed) // len(tensors) - per_column
    if every >= 8:
        return {t: min(every, 24) for t in tensors}
    bounded = [t for t in tensors if t in BOUNDED_TENSORS]
    room = available - fixed - (6 + 2)  # keep the first percentage column (w2) on screen too
    width = max(4, min(24, room // max(1, len(bounded)) - per_column))
    return {t: (width if t in BOUNDED_TENSORS else 0) for t in tensors}


def exposure_offscreen(available: int, widths: dict[str, int]) -> list[str]:
    """The exposure table's kinds whose columns start beyond `available` cells: off screen until
    the table is scrolled sideways, so the summary names them."""
    used = (EXPOSURE_NAME_WIDTH + 2) + (EXPOSURE_FLAG_WIDTH + 2)
    hidden = []
    for tensor, width in widths.items():
        used += (width + 8 if width else 7) + 2
        if used > available:
            hidden.append(tensor)
    return hidden


def exposure_kinds(state: CoordinatorState) -> tuple[str, ...]:
    """The exposure table's columns: the notebook network's kinds, then any other kind a node's
    ledger row has (a deeper network's w3, activations2, deltas2, ...), in the ledger's order."""
    extra: list[str] = []
    for row in state.nodes.values():
        extra.extend(k for k in row.exposure if k not in TENSORS and k not in extra)
    return TENSORS + tuple(extra)


def exposure_cells(row: NodeRow, bound: float, widths: dict[str, int]) -> tuple[str, ...]:
    """One node as the texts of the exposure table: name, flag, then one bar per tensor."""
    over = over_bound(row.exposure, bound)
    flag = ("OVER " + ",".join(TENSOR_SHORT.get(t, t) for t in over)) if over else "ok"
    cells = [row.name or row.node_id, flag]
    for tensor, width in widths.items():
        share = row.exposure.get(tensor, 0.0)
        pct = fmt_share(share) + FORM_LETTERS.get(row.forms.get(tensor, ""), " ")
        if width:
            mark = bound if tensor in BOUNDED_TENSORS else None
            cells.append(f"{share_bar(share, width, mark)} {pct:>6}")
        else:
            cells.append(pct)
    return tuple(cells)


def exposure_summary(state: CoordinatorState) -> str:
    """One line: the bound, the largest share of each bounded tensor and who holds it."""
    bound = state.exposure_bound
    raised = " raised by the operator (--max-exposure)" if state.bound_raised else ""
    parts = [f"bound {fmt_share(bound)}{raised} ({', '.join(BOUNDED_TENSORS)}; ┃ marks it; enforced)"]
    for tensor in BOUNDED_TENSORS:
        rows = [r for r in state.nodes.values() if tensor in r.exposure]
        if rows:
            top = max(rows, key=lambda r: r.exposure[tensor])
            parts.append(f"max {tensor} {fmt_share(top.exposure[tensor])} ({top.name or top.node_id})")
    over = sum(1 for r in state.nodes.values() if over_bound(r.exposure, bound))
    parts.append(f"{over} node{'s' if over != 1 else ''} OVER" if over else "none over")
    return " · ".join(parts) + "\nh values hidden · p positions hidden (values readable) · c clear"


SORT_ORDERS = [
    (None, "join order"),
    ("state", "state"),
    ("done", "batches done"),
    ("rate", "rate"),
    ("refused", "refusals"),
    ("images", "images seen"),
    ("name", "name"),
]
STATE_ORDER = {"working": 0, "waiting": 1, "standby": 2, "paused": 3, "connected": 4, "lost": 5, "left": 6, "done": 7}


def sort_key(column: str, row: NodeRow):
    """Numbers largest first; states in the order an operator cares about; names A-Z."""
    if column == "state":
        return (STATE_ORDER.get(row.state, 9), row.name)
    if column == "name":
        return (row.name.lower(),)
    value = {
        "done": row.batches_done,
        "rate": row.rate,
        "refused": row.refused,
        "images": row.exposure.get("images", 0.0),
    }[column]
    return (-value, row.name)


SPARK = "▁▂▃▄▅▆▇█"


def text_sparkline(values: list[float], width: int = 40) -> str:
    """A one-line chart in block characters, scaled to its own min..max (which the caller prints)."""
    values = values[-width:]
    if not values:
        return "–"
    low, high = min(values), max(values)
    span = high - low
    return "".join(SPARK[int((v - low) / span * (len(SPARK) - 1)) if span > 0 else 0] for v in values)


class NodeHistory:
    """Per node, samples of (time, batches done, rate, refused, images, w1) the console has seen,
    one every SAMPLE_S seconds at most, the last MAX_SAMPLES kept. Only the console keeps it."""

    SAMPLE_S = 5.0
    MAX_SAMPLES = 120

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple]] = {}

    def record(self, s: CoordinatorState, now: float) -> None:
        for row in s.nodes.values():
            kept = self.samples.setdefault(row.node_id, [])
            if kept and now - kept[-1][0] < self.SAMPLE_S:
                continue
            kept.append(
                (
                    now,
                    row.batches_done,
                    row.rate,
                    row.refused,
                    row.exposure.get("images", 0.0),
                    row.exposure.get("w1", 0.0),
                )
            )
            del kept[: -self.MAX_SAMPLES]

    def of(self, node_id: str) -> list[tuple]:
        return list(self.samples.get(node_id, []))


def node_detail(row: NodeRow, samples: list[tuple], now: float) -> str:
    """One node in full, for the detail view: identity, state and why, counts, history charts."""
    lines = [
        f"node         {row.name}  ({row.node_id})",
        f"fingerprint  {row.fingerprint or '–'}",
        f"address      {row.address or '–'}",
        f"state        {row.state}" + (f": {row.reason}" if row.reason else ""),
        (
            "last seen    just now"
            if fmt_age(now, row.last_seen) == "now"
            else f"last seen    {fmt_age(now, row.last_seen)} ago"
        )
        if row.last_seen
        else "last seen    never",
        f"batches      {row.batches_done:,} done, {row.outstanding} outstanding, {row.reissued} reissued, "
        f"{row.refused} results refused",
        f"rate         {fmt_rate(row.rate)}",
        "exposure     " + ", ".join(f"{t} {fmt_share(v)}" for t, v in row.exposure.items())
        if row.exposure
        else "exposure     nothing yet",
    ]
    if len(samples) >= 2:
        span = fmt_duration(samples[-1][0] - samples[0][0])
        lines.append("")
        lines.append(f"over the last {span} ({len(samples)} samples, one every {NodeHistory.SAMPLE_S:g} s):")
        for title, index, fmt in (
            ("batches done", 1, lambda v: f"{v:,.0f}"),
            ("rate", 2, fmt_rate),
            ("refused", 3, lambda v: f"{v:.0f}"),
            ("images seen", 4, fmt_share),
            ("w1 seen", 5, fmt_share),
        ):
            values = [sample[index] for sample in samples]
            lines.append(f"  {title:<13}{text_sparkline(values)}  {fmt(min(values))} .. {fmt(max(values))}")
    else:
        lines.append("")
        lines.append("history: a sample every 5 s while the console runs; none yet")
    lines.append("")
    lines.append("escape or enter closes this view")
    return "\n".join(lines)


class NodeDetailScreen(ModalScreen[None]):
    """Enter on a node in the nodes table: its detail over the console."""

    DEFAULT_CSS = """
    NodeDetailScreen { align: center middle; }
    NodeDetailScreen > VerticalScroll {
        width: 100; max-width: 100%; height: auto; max-height: 100%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [Binding("escape,enter,q", "close", "close")]

    def __init__(self, text: str):
        super().__init__()
        self.detail_text = text

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(self.detail_text, id="node-detail", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)


def chart_value(data: list[float]) -> str:
    """What stands beside a sparkline, which has no axis: the last value, and (from two points
    on) the range it is drawn over, to the same precision ("0.8395 [0.8301–0.8412]")."""
    if not data:
        return "–"

    def num(v: float) -> str:
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.4g}"

    if len(data) == 1:
        return num(data[0])
    return f"{num(data[-1])} [{num(min(data))}–{num(max(data))}]"


def join_text(s: CoordinatorState) -> str:
    """How a volunteer joins, and who may: above the nodes table, in full while it is empty."""
    if not s.join_commands and s.join_notes:  # no volunteers: `enshuffle train`'s own local nodes
        text = "\n".join(s.join_notes) if not s.nodes else (s.admission or s.join_notes[0])
        return ("No node has connected yet: " + text) if not s.nodes else text
    commands = s.join_commands or ["enshuffle node --connect ADDRESS --coordinator-key " + (s.fingerprint or "FP")]
    if not s.nodes:
        lines = [
            "No node has connected yet. On each volunteer machine run:",
            *(f"  {c}" for c in commands),
            *(f"  ({note})" for note in s.join_notes),
        ]
        if s.admission:
            lines.append(s.admission)
        return "\n".join(lines)
    return "join: " + commands[0] + (f"\n{s.admission}" if s.admission else "")


def _meta_value(value) -> str:
    """A metadata value for people: floats rounded, small dicts as k=v, lists counted."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_meta_value(v)}" for k, v in value.items()) or "–"
    if isinstance(value, list):
        return f"{len(value)} entries"
    return str(value)


def verified_text(verified: bool | None) -> str:
    return {True: "✓ ok", False: "✗ FAILED", None: "–"}[verified]


def chain_cells(v: VersionRow, verified: bool | None) -> tuple[str, ...]:
    return (
        short_id(v.version_id),
        short_id(v.parent_id) if v.parent_id else "genesis",
        str(v.epoch),
        str(v.step),
        fmt_accuracy(v.test_accuracy),
        time.strftime("%H:%M:%S", time.localtime(v.created)),
        verified_text(verified),
    )


def version_detail(v: VersionRow, verified: bool | None) -> str:
    """The selected model version in full, for the chain view's side panel."""
    lines = [
        f"version  {v.version_id}",
        f"parent   {v.parent_id or '(genesis: first version)'}",
        f"epoch {v.epoch} · step {v.step} · test accuracy {fmt_accuracy(v.test_accuracy)}",
        f"created  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v.created))}",
        f"verified {verified_text(verified)}",
    ]
    if v.metadata:
        lines.append("metadata")
        for key, value in v.metadata.items():
            if key == "created" and isinstance(value, (int, float)):
                continue  # shown above as a date
            if key == "exposure" and isinstance(value, dict):
                lines.append("  exposure")
                lines += [f"    {node}: {_meta_value(shares)}" for node, shares in value.items()]
                continue
            lines.append(f"  {key}: {_meta_value(value)}")
    return "\n".join(lines)


class CoordinatorApp(SnapshotApp):
    """The coordinator console. See the module docstring for the keys and how quitting works."""

    TITLE = "enshuffle coordinator"
    CSS = """
    #header { height: auto; background: $boost; padding: 0 1; }
    #status { height: auto; padding: 0 1; }
    #top { height: 3; }
    Screen.wide #top { height: 6; }
    #progress { width: 1fr; padding: 0 1; }
    #charts { width: 1fr; padding: 0 1 0 0; }
    .chart-row { height: 1fr; }
    .chart-label { width: 6; }
    .chart-value { width: 22; text-align: right; }
    .chart-row Sparkline { width: 1fr; height: 100%; }
    #tabs { height: 1fr; }
    #exposure-summary, #verify-result { height: auto; padding: 0 1; }
    #join, #nodes-info { height: auto; padding: 0 1; color: $text-muted; }
    #search { display: none; height: 3; }
    #search.shown { display: block; }
    #chain-body { layout: vertical; }
    #chain-table { height: 1fr; }
    #detail-scroll { height: 7; border-top: solid $panel; }
    Screen.wide #chain-body { layout: horizontal; }
    Screen.wide #chain-table { width: 1fr; height: 100%; }
    Screen.wide #detail-scroll { width: 1fr; height: 100%; border-top: none; border-left: solid $panel; }
    #version-detail { padding: 0 1; }
    #side-log { display: none; height: 10; border: round $panel; }
    Screen.wide #side-log { display: block; height: 1fr; min-height: 8; }
    Screen.wide #tabs { height: 2fr; }
    """
    BINDINGS = [
        Binding("p", "toggle_pause", "pause/resume"),
        Binding("v", "verify_chain", "verify chain"),
        Binding("a", "readmit", "re-admit node", show=False),
        QUIT_BINDING,
        INTERRUPT_BINDING,
        HELP_BINDING,
        Binding("s", "cycle_sort", "sort"),
        Binding("slash", "search", "filter"),
        Binding("1", "show_view('nodes')", "nodes", show=False),
        Binding("2", "show_view('exposure')", "exposure", show=False),
        Binding("3", "show_view('chain')", "chain", show=False),
        Binding("4", "show_view('log')", "log", show=False),
    ]
    HELP_TEXT = HELP_TEXT
    DONE_RESULT = "finished"

    def __init__(
        self,
        source: Callable[[], CoordinatorState],
        control: CoordinatorControl,
        verify_chain: Callable[[], tuple[bool, str]] | None = None,
        refresh_hz: float = 4.0,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(source, control, refresh_hz, clock)
        self.snap: CoordinatorState | None
        self.control: CoordinatorControl
        self.verify_chain = verify_chain
        self.verifying = False
        self.verify_message = "press v to verify the model chain"
        self.verify_marks: dict[str, bool] = {}  # version id -> result of the last check
        self.selected_version: str | None = None
        self.bar_widths: dict[str, int] = {}
        # The exposure table's kinds: the notebook network's, then a deeper network's per-layer
        # kinds (w3, activations2, deltas2, ...) as the ledger reports them.
        self.tensors: tuple[str, ...] = TENSORS
        self._table_width = 0
        self.exposure_sync: TableSync | None = None
        self.sort_index = 0  # into SORT_ORDERS
        self.filter_text = ""
        self.history = NodeHistory()

    # ----- layout -----

    def compose(self) -> ComposeResult:
        yield Static(id="header", markup=False)
        yield Static(id="status", markup=False)
        with Horizontal(id="top"):
            yield Static(id="progress", markup=False)
            with Vertical(id="charts"):
                for key, label in (("cost", "cost"), ("train", "train"), ("test", "test")):
                    with Horizontal(classes="chart-row"):
                        yield Static(label, classes="chart-label")
                        yield Sparkline([], id=f"spark-{key}")
                        yield Static("–", id=f"value-{key}", classes="chart-value", markup=False)
        with TabbedContent(id="tabs", initial="nodes"):
            with TabPane("Nodes", id="nodes"):
                yield Static(id="join", markup=False)
                yield Static(id="nodes-info", markup=False)
                yield DataTable(id="nodes-table", cursor_type="row", fixed_columns=1, zebra_stripes=True)
            with TabPane("Exposure", id="exposure"):
                yield Static(id="exposure-summary", markup=False)
                yield DataTable(id="exposure-table", cursor_type="row", fixed_columns=1)
            with TabPane("Chain", id="chain"):
                yield Static(id="verify-result", markup=False)
                with Vertical(id="chain-body"):
                    yield DataTable(id="chain-table", cursor_type="row")
                    with VerticalScroll(id="detail-scroll"):
                        yield Static("select a version to see its metadata", id="version-detail", markup=False)
            with TabPane("Log", id="log"):
                yield Log(id="log-view", max_lines=1000)
        yield Log(id="side-log", max_lines=1000)
        yield Input(placeholder="filter nodes and log lines (enter keeps, escape clears)", id="search")
        yield Footer()

    def _setup_widgets(self) -> None:
        self.node_keys: list[str] = []
        self._rebuild_nodes_table(self.size.width)
        self.chain_sync = TableSync(self.main_screen.query_one("#chain-table", DataTable), CHAIN_COLUMNS, CHAIN_NUMERIC)
        self.log_feed = LogFeed(
            self.main_screen.query_one("#log-view", Log), self.main_screen.query_one("#side-log", Log)
        )
        self.main_screen.query_one("#side-log", Log).border_title = "warnings and refusals"

    def _on_wide_changed(self, wide: bool) -> None:
        """Wide: log below the tabs, chain table beside its detail (CSS). Narrow: log in a tab."""
        tabs = self.main_screen.query_one("#tabs", TabbedContent)
        if wide:
            if tabs.active == "log":
                tabs.active = "nodes"
            tabs.hide_tab("log")
        else:
            tabs.show_tab("log")

    def _adapt_layout(self, width: int, height: int) -> None:
        super()._adapt_layout(width, height)
        self._rebuild_nodes_table(width)
        self._table_width = width
        widths = exposure_bar_widths(width - 4, self.tensors)
        if widths != self.bar_widths or self.exposure_sync is None:
            self.bar_widths = widths
            self._rebuild_exposure_table()

    def _rebuild_nodes_table(self, width: int) -> None:
        """The nodes table's columns follow the terminal width (NODE_TIERS); a change rebuilds it."""
        columns = node_columns(width)
        keys = [c[0] for c in columns]
        if keys == self.node_keys and "why" not in keys:
            return
        table = self.main_screen.query_one("#nodes-table", DataTable)
        table.clear(columns=True)
        self.node_keys = keys
        self.nodes_sync = TableSync(table, columns, NODE_NUMERIC)

    def _rebuild_exposure_table(self) -> None:
        """Column widths follow the terminal, so a resize rebuilds this table (not live data)."""
        table = self.main_screen.query_one("#exposure-table", DataTable)
        table.clear(columns=True)
        columns = [("name", "node", EXPOSURE_NAME_WIDTH), ("flag", "flag", EXPOSURE_FLAG_WIDTH)]
        for tensor, width in self.bar_widths.items():
            columns.append((tensor, TENSOR_LABELS.get(tensor, tensor), width + 8 if width else 7))
        self.exposure_sync = TableSync(table, columns, {t for t, w in self.bar_widths.items() if not w})

    # ----- refresh -----

    def _is_done(self, s: CoordinatorState) -> bool:
        return s.finished

    def _apply(self, s: CoordinatorState) -> None:
        now = self.clock()
        with self.batch_update():
            self._set_text("header", self._header_text(s, now))
            self._set_text("status", self._status_text(s))
            self._set_text("progress", self._progress_text(s, now))
            self._apply_charts(s)
            self.history.record(s, now)
            self._apply_nodes(s, now)
            self._set_text("join", join_text(s))
            tensors = exposure_kinds(s)
            if tensors != self.tensors and self._table_width:
                self.tensors = tensors
                self.bar_widths = exposure_bar_widths(self._table_width - 4, tensors)
                self._rebuild_exposure_table()
            if self.exposure_sync is not None:
                bound = s.exposure_bound
                self.exposure_sync.apply(
                    {key: exposure_cells(row, bound, self.bar_widths) for key, row in s.nodes.items()}
                )
            summary = exposure_summary(s)
            hidden = exposure_offscreen(self._table_width - 4, self.bar_widths) if self._table_width else []
            if hidden:
                summary += (
                    f"\n→ {len(hidden)} more column{'s' if len(hidden) != 1 else ''} to the right "
                    f"({', '.join(hidden)}): scroll the table sideways"
                )
            self._set_text("exposure-summary", summary)
            self._apply_chain(s)
            self.log_feed.apply([line for line in s.log if self._matches(line)])

    def _matches(self, text: str) -> bool:
        return not self.filter_text or self.filter_text.lower() in text.lower()

    def _apply_nodes(self, s: CoordinatorState, now: float) -> None:
        rows = {
            key: node_cells(row, now, self.node_keys)
            for key, row in s.nodes.items()
            if self._matches(" ".join((row.name, row.state, row.address, row.reason, row.fingerprint)))
        }
        column, label = SORT_ORDERS[self.sort_index]
        if column is not None:
            rows = dict(sorted(rows.items(), key=lambda kv: sort_key(column, s.nodes[kv[0]])))
        kept = [k for k in self.nodes_sync.rendered if k in rows]
        if kept != [k for k in rows if k in self.nodes_sync.rendered]:
            # Row order is fixed once added: a new order means adding the rows again.
            table = self.main_screen.query_one("#nodes-table", DataTable)
            cursor = table.cursor_row
            for key in list(self.nodes_sync.rendered):
                table.remove_row(key)
            self.nodes_sync.rendered.clear()
            self.nodes_sync.apply(rows)
            table.move_cursor(row=min(cursor, max(0, table.row_count - 1)))
        self.nodes_sync.apply(rows)  # a no-op after a rebuild
        shown = f"{len(rows)} of {len(s.nodes)} nodes match {self.filter_text!r}" if self.filter_text else ""
        info = " · ".join(x for x in (f"sorted by {label}", shown, "enter: detail · s: sort · /: filter") if x)
        self._set_text("nodes-info", info)

    def _header_text(self, s: CoordinatorState, now: float) -> str:
        # Two short lines rather than one that wraps at 80 columns; the fingerprint in full,
        # since volunteers compare every group of it.
        elapsed = fmt_clock(now - s.started_at)
        first = f"coordinator {s.run_id or '–'} │ {s.preset or '–'} │ {s.bind or '–'} │ elapsed {elapsed}"
        if len(first) > self.size.width - 2:  # the label goes before "elapsed" is wrapped away
            first = first.removeprefix("coordinator ")
        return f"{first}\nfingerprint {s.fingerprint or '–'}"

    def _status_text(self, s: CoordinatorState) -> str:
        working = sum(1 for r in s.nodes.values() if r.state == "working")
        parts = [f"status: {s.status}"]
        if self.control.paused and "paused" not in s.status:
            parts.append("PAUSED (p resumes)")
        parts.append(f"nodes {working} working / {len(s.nodes)}")
        if self.backend_error:
            parts.append(f"back-end not answering ({self.backend_error}); q leaves at once")
        elif self.stopping and not s.finished:
            parts.append("STOPPING: finishing the current step, then writing a model version (q again leaves now)")
        elif s.finished:
            parts.append("run finished (q leaves)")
        return " · ".join(parts)

    def _progress_text(self, s: CoordinatorState, now: float) -> str:
        width = max(8, min(40, self.size.width // 2 - 24))
        epoch_fraction = s.epoch / s.epochs_total if s.epochs_total else 0.0
        step = s.step
        if s.epochs_total and s.epoch >= s.epochs_total:
            step = s.steps_per_epoch  # the last epoch is complete, not "step 0 of the next"
        step_fraction = step / s.steps_per_epoch if s.steps_per_epoch else 0.0
        done = progress_fraction(s.epoch, s.step, s.epochs_total, s.steps_per_epoch)
        # From the time steps took, not the wall clock: a pause or a wait for nodes does not
        # make it grow, and it appears after the first steps instead of jumping at the start.
        eta = None
        if s.step_seconds > 0 and s.epochs_total:
            remaining_steps = (s.epochs_total - s.epoch) * s.steps_per_epoch - s.step
            eta = max(0, remaining_steps) * s.step_seconds
        if done >= 1.0:
            eta = 0.0
        eta_text = fmt_duration(eta) if eta is not None else "after the first steps"
        if s.paused or "paused" in s.status or "waiting" in s.status:
            eta_text += " (held)"
        return (
            f"epoch {s.epoch:>3}/{s.epochs_total:<3} {text_bar(epoch_fraction, width)} {100 * epoch_fraction:3.0f}%\n"
            f"step {step:>4}/{s.steps_per_epoch:<4}{text_bar(step_fraction, width)} {100 * step_fraction:3.0f}%\n"
            f"run {100 * done:5.1f}% done · ETA {eta_text}"
        )

    def _apply_charts(self, s: CoordinatorState) -> None:
        series = {
            "cost": [e.cost for e in s.epochs],
            "train": [e.train_accuracy for e in s.epochs],
            "test": [e.test_accuracy for e in s.epochs],
        }
        for key, data in series.items():
            spark = self.main_screen.query_one(f"#spark-{key}", Sparkline)
            # One point is no line: a sparkline of it would fill its width with one bar.
            drawn = data if len(data) >= 2 else []
            if list(spark.data or []) != drawn:
                spark.data = drawn  # Sparkline only redraws on reassignment
            self._set_text(f"value-{key}", chart_value(data))

    def _apply_chain(self, s: CoordinatorState) -> None:
        marks = self.verify_marks
        rows = {}
        for v in s.versions:
            rows[v.version_id] = chain_cells(v, marks.get(v.version_id, v.verified))
        self.chain_sync.apply(rows)
        self._set_text("verify-result", self.verify_message)
        self._show_version_detail(s)

    def _show_version_detail(self, s: CoordinatorState) -> None:
        if self.selected_version is None:
            return
        for v in s.versions:
            if v.version_id == self.selected_version:
                verified = self.verify_marks.get(v.version_id, v.verified)
                self._set_text("version-detail", version_detail(v, verified))
                return

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a node: its detail over the console (escape or enter closes it)."""
        if event.data_table.id == "nodes-table" and event.row_key is not None and self.snap is not None:
            row = self.snap.nodes.get(str(event.row_key.value))
            if row is not None:
                self.push_screen(NodeDetailScreen(node_detail(row, self.history.of(row.node_id), self.clock())))

    def action_cycle_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORT_ORDERS)
        self.notify(f"nodes sorted by {SORT_ORDERS[self.sort_index][1]}", timeout=2)
        self._refresh_now()

    def action_search(self) -> None:
        search = self.main_screen.query_one("#search", Input)
        search.add_class("shown")
        search.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "search":
            self._set_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "search":
            self._set_filter(event.value)
            if not event.value:
                event.input.remove_class("shown")
            self.main_screen.query_one("#nodes-table", DataTable).focus()

    def on_key(self, event) -> None:
        search = self.main_screen.query_one("#search", Input)
        if event.key == "escape" and search.has_focus:
            search.value = ""
            search.remove_class("shown")
            self._set_filter("")
            self.main_screen.query_one("#nodes-table", DataTable).focus()
            event.stop()

    def _set_filter(self, text: str) -> None:
        if text == self.filter_text:
            return
        self.filter_text = text
        # The log is rebuilt from the snapshot's lines that match; later lines are filtered as they come.
        self.log_feed.reset()
        self._refresh_now()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # A highlight posted while the app shuts down can arrive after its widgets are gone.
        if event.data_table.id == "chain-table" and event.row_key is not None and self.is_running:
            self.selected_version = event.row_key.value
            if self.snap is not None:
                self._show_version_detail(self.snap)

    # ----- actions -----

    def action_show_view(self, view: str) -> None:
        tabs = self.main_screen.query_one("#tabs", TabbedContent)
        if view == "log" and self.wide:
            self.main_screen.query_one("#side-log", Log).focus()
            return
        tabs.active = view
        focus = {"nodes": "#nodes-table", "exposure": "#exposure-table", "chain": "#chain-table", "log": "#log-view"}
        self.main_screen.query_one(focus[view]).focus()

    def action_toggle_pause(self) -> None:
        paused = self.control.toggle_pause()
        self.notify("training paused after the current step" if paused else "training resumed", timeout=3)
        self._refresh_status()

    def action_readmit(self) -> None:
        """Lift the quarantine of the node selected in the Nodes table."""
        table = self.main_screen.query_one("#nodes-table", DataTable)
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # an empty table has no cell under the cursor
            key = None
        row = self.snap.nodes.get(key) if self.snap is not None and key is not None else None
        if row is None or row.state != "quarantined":
            self.notify("select a quarantined node in the Nodes table to re-admit it", timeout=4)
            return
        self.control.readmit(row.name)
        self.notify(f"re-admitting {row.name}: it may connect again", timeout=4)

    def action_verify_chain(self) -> None:
        if self.verify_chain is None:
            self.verify_message = "chain verification is not available in this session"
        elif self.verifying:
            self.notify("the chain check is already running", timeout=3)
            return
        else:
            ids = [v.version_id for v in (self.snap.versions if self.snap else [])]
            self.verifying = True
            self.verify_message = f"verifying the chain ({len(ids)} versions)…"
            check = self.verify_chain

            def run() -> tuple[list[str], bool, str]:
                ok, message = check()
                return ids, ok, message

            self.run_worker(run, name="verify chain", group="verify", thread=True, exit_on_error=False)
        self._set_text("verify-result", self.verify_message)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The one place worker results and errors land (workers never touch widgets)."""
        worker = event.worker
        if worker.name != "verify chain" or event.state not in (WorkerState.SUCCESS, WorkerState.ERROR):
            return
        self.verifying = False
        if event.state == WorkerState.SUCCESS:
            assert worker.result is not None
            ids, ok, message = worker.result
        else:
            ids, ok = [v.version_id for v in (self.snap.versions if self.snap else [])], False
            message = f"the check itself failed: {type(worker.error).__name__}: {worker.error}"
        self.verify_marks.update(verification_marks(ids, ok, message))
        self.verify_message = f"{'✓ chain verified' if ok else '✗ chain verification FAILED'}: {message}"
        self.notify(self.verify_message, severity="information" if ok else "error", timeout=6)
        self._refresh_now()
