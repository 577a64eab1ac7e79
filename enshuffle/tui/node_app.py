"""The node app: what a volunteer sees while their machine computes batches.

Owns only presentation. The node daemon keeps a `NodeState` current; this app pulls `source()`
(a snapshot copy) on a timer and applies it inside `batch_update()`.

Keys: p pauses or resumes contributing, + / - change the number of compute threads, ? help,
q quits. Quitting mirrors the coordinator console: the first q calls `control.request_stop()`
(the daemon says BYE so its batches are reissued at once) and the app leaves when a snapshot
says the connection is "stopped", or at once when the back-end is gone (`source()` raises);
a second q leaves without waiting. `app.return_value` is "stopped", "backend-gone" or
"left-early".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.events import Resize
from textual.widgets import Footer, Log, Static

from ..coordinator.state import TENSORS
from ..node.state import NodeControl, NodeState
from .format import fmt_bytes, fmt_clock, fmt_rate, fmt_share, share_bar, short_fp
from .widgets import HelpScreen, LogFeed

WIDE_MIN_WIDTH = 120
WIDE_MIN_HEIGHT = 36
MAX_THREADS = 256

TRUST_WORDS = {
    "pinned": "pinned (matches the fingerprint you gave)",
    "trusted-on-first-use": "trusted on first use (check it with the operator)",
    "known": "known (seen before and unchanged)",
    "": "not yet known (no WELCOME yet)",
}

CONNECTION_MARKS = {
    "working": "● working",
    "connected": "● connected",
    "idle": "○ idle",
    "connecting": "… connecting",
    "reconnecting": "… reconnecting",
    "starting": "… starting",
    "refused": "✗ REFUSED",
    "stopped": "■ stopped",
}

HELP_TEXT = """\
enshuffle node

Keys
  p      pause / resume contributing (the batch in hand finishes)
  + / -  one more / one fewer compute thread
  q      stop: say BYE to the coordinator so our batches are
         reissued, then leave; q again leaves at once
  ?      show / hide this help

Coordinator
  its fingerprint, and whether it is pinned (you gave it) or
  trusted on first use (compare it with the one the operator
  publishes).

Exposure
  the share of each of the model's tensors this machine has seen
  so far. The coordinator keeps every node under its bound for
  images and w1.
"""


def connection_text(s: NodeState) -> str:
    """The connection state in words, with the reason when the node is not working."""
    mark = CONNECTION_MARKS.get(s.connection, s.connection)
    return f"{mark}: {s.reason}" if s.reason else mark


def coordinator_text(s: NodeState) -> str:
    return (
        f"coordinator  {s.connect or '–'}\n"
        f"fingerprint  {short_fp(s.coordinator_fingerprint, 8)}\n"
        f"trust        {TRUST_WORDS.get(s.trust, s.trust)}\n"
        f"this node    {s.name or '–'}  fingerprint {short_fp(s.own_fingerprint, 4)}"
    )


def work_text(s: NodeState, threads: int, paused: bool) -> str:
    return (
        f"batch        {s.current_op or '– (none in hand)'}\n"
        f"computed     {s.batches_done:,} batches  at {fmt_rate(s.rate)}\n"
        f"traffic      in {fmt_bytes(s.bytes_in)}  out {fmt_bytes(s.bytes_out)}\n"
        f"refusals     {s.refusals}\n"
        f"threads      {threads}{'' if threads == s.threads else f' (now {s.threads}, applying)'}"
        f"   {'PAUSED (p resumes)' if paused else 'contributing (p pauses)'}"
    )


def exposure_text(s: NodeState, width: int) -> str:
    """One bar per tensor: how much of it this machine has seen."""
    bar = max(6, width - 22)
    lines = []
    for tensor in TENSORS:
        share = s.exposure.get(tensor, 0.0)
        lines.append(f"{tensor:<12}{share_bar(share, bar)} {fmt_share(share):>6}")
    extra = [t for t in s.exposure if t not in TENSORS]
    for tensor in extra:
        share = s.exposure[tensor]
        lines.append(f"{tensor[:11]:<12}{share_bar(share, bar)} {fmt_share(share):>6}")
    return "\n".join(lines)


class NodeApp(App):
    """The node app. See the module docstring for the keys and how quitting works."""

    TITLE = "enshuffle node"
    CSS = """
    #header { height: auto; background: $boost; padding: 0 1; }
    #status { height: auto; padding: 0 1; text-style: bold; }
    #panels { height: auto; layout: vertical; }
    .panel { height: auto; padding: 0 1; }
    .panel-title { text-style: bold; }
    Screen.wide #panels { layout: horizontal; }
    Screen.wide .panel { width: 1fr; border: round $panel; }
    #log-view { height: 1fr; min-height: 3; border-top: solid $panel; }
    Screen.wide #log-view { border: round $panel; border-top: round $panel; }
    """
    BINDINGS = [
        Binding("p", "toggle_pause", "pause/resume"),
        Binding("plus,equals_sign", "more_threads", "more threads"),
        Binding("minus", "fewer_threads", "fewer threads"),
        Binding("q", "request_quit", "quit"),
        Binding("question_mark", "toggle_help", "help"),
    ]

    def __init__(
        self,
        source: Callable[[], NodeState],
        control: NodeControl,
        refresh_hz: float = 4.0,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__()
        self.source = source
        self.control = control
        self.refresh_hz = refresh_hz
        self.clock = clock
        self.snap: NodeState | None = None
        self.stopping = False
        self.backend_error: str | None = None
        self.wide: bool | None = None
        self._texts: dict[str, str] = {}
        self._mounted = False

    def compose(self) -> ComposeResult:
        yield Static(id="header", markup=False)
        yield Static(id="status", markup=False)
        with Horizontal(id="panels"):
            with Vertical(id="left", classes="panel"):
                yield Static(id="coordinator", markup=False)
                yield Static(id="work", markup=False)
            with Vertical(id="right", classes="panel"):
                yield Static("what this machine has seen (share of each tensor)", classes="panel-title")
                yield Static(id="exposure", markup=False)
        yield Log(id="log-view", max_lines=1000)
        yield Footer()

    def on_mount(self) -> None:
        # Widgets are looked up on the main screen, not `self.screen`: the help overlay may be
        # the active screen while the timer refreshes the one underneath.
        self.main_screen = self.screen
        self.log_feed = LogFeed(self.main_screen.query_one("#log-view", Log))
        self.main_screen.query_one("#log-view", Log).border_title = "log"
        self._adapt_layout(self.size.width, self.size.height)
        self._mounted = True
        self.pull_snapshot()
        self.set_interval(1.0 / self.refresh_hz, self.pull_snapshot, name="refresh")

    def on_resize(self, event: Resize) -> None:
        if not self._mounted:  # on_mount lays out for the first size
            return
        self._adapt_layout(event.size.width, event.size.height)
        if self.snap is not None:
            self._apply(self.snap)

    def _adapt_layout(self, width: int, height: int) -> None:
        """Wide: panels side by side in boxes. Narrow: stacked without borders to save rows."""
        wide = width >= WIDE_MIN_WIDTH and height >= WIDE_MIN_HEIGHT
        if wide != self.wide:
            self.wide = wide
            self.main_screen.set_class(wide, "wide")

    def pull_snapshot(self) -> None:
        if not self.is_running:  # shutting down: the widgets are being removed before the timer
            return
        try:
            snap = self.source()
        except Exception as exc:
            self.backend_error = f"{type(exc).__name__}: {exc}"
            if self.stopping:
                self.exit("backend-gone")
                return
            if self.snap is not None:
                self._apply(self.snap)
            return
        self.backend_error = None
        self.snap = snap
        self._apply(snap)
        if self.stopping and snap.connection == "stopped":
            self.exit("stopped")

    def _set_text(self, widget_id: str, text: str) -> None:
        if self._texts.get(widget_id) != text:
            self._texts[widget_id] = text
            self.main_screen.query_one(f"#{widget_id}", Static).update(text)

    def _apply(self, s: NodeState) -> None:
        now = self.clock()
        panel_width = self.size.width // 2 - 4 if self.wide else self.size.width - 2
        with self.batch_update():
            self._set_text(
                "header",
                f"enshuffle node {s.name or '–'} │ run {s.run_id or '–'} │ up {fmt_clock(now - s.started_at)}",
            )
            self._set_text("status", self._status_text(s))
            self._set_text("coordinator", coordinator_text(s))
            self._set_text("work", work_text(s, self.control.threads, self.control.paused))
            self._set_text("exposure", exposure_text(s, panel_width))
            self.log_feed.apply(s.log)

    def _status_text(self, s: NodeState) -> str:
        parts = [f"connection: {connection_text(s)}"]
        if self.backend_error:
            parts.append(f"node daemon not answering ({self.backend_error}); q leaves at once")
        elif self.stopping and s.connection != "stopped":
            parts.append("STOPPING: saying BYE to the coordinator (q again leaves now)")
        return " · ".join(parts)

    def _refresh_now(self) -> None:
        if self.snap is not None:
            self._apply(self.snap)

    def action_toggle_pause(self) -> None:
        self.control.toggle_pause()
        self._refresh_now()

    def action_more_threads(self) -> None:
        self.control.set_threads(min(MAX_THREADS, self.control.threads + 1))
        self._refresh_now()

    def action_fewer_threads(self) -> None:
        self.control.set_threads(self.control.threads - 1)
        self._refresh_now()

    def action_toggle_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss(None)
        else:
            # Installed once and reused: composing it anew on every ? costs a visible moment.
            if not self.is_screen_installed("help"):
                self.install_screen(HelpScreen(HELP_TEXT), name="help")
            self.push_screen("help")

    def action_request_quit(self) -> None:
        if self.snap is not None and self.snap.connection == "stopped":
            self.control.request_stop()
            self.exit("stopped")
        elif self.backend_error is not None:
            self.control.request_stop()
            self.exit("backend-gone")
        elif self.stopping:
            self.exit("left-early")
        else:
            self.control.request_stop()
            self.stopping = True
            self._refresh_now()
