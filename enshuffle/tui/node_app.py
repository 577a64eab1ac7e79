"""The node app: what a volunteer sees while their machine computes batches.

Owns only presentation. The node daemon keeps a `NodeState` current; this app pulls `source()`
(a snapshot copy) on a timer and applies it inside `batch_update()`.

Keys: p pauses or resumes contributing, + / - change the number of compute threads, ? help,
q quits. Quitting is the coordinator console's (both are `base.SnapshotApp`s): the first q calls
`control.request_stop()`
(the daemon says BYE so its batches are reissued at once) and the app leaves when a snapshot
says the connection is "stopped", or at once when the back-end is gone (`source()` raises);
a second q leaves without waiting. `app.return_value` is "stopped", "backend-gone" or
"left-early".
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Log, Static

from ..blas import default_threads
from ..coordinator.state import TENSORS
from ..node.state import NodeControl, NodeState
from .format import fmt_bytes, fmt_clock, fmt_rate, fmt_share, share_bar, short_fp
from .base import HELP_BINDING, INTERRUPT_BINDING, QUIT_BINDING, SnapshotApp, terminal_fd, terminal_gone  # noqa: F401  (re-exported for node commands)
from .widgets import LogFeed


def max_threads() -> int:
    """More BLAS threads than CPUs only make them fight: + stops at the CPU count."""
    return default_threads()


TRUST_WORDS = {
    "pinned": "pinned (matches the fingerprint you gave)",
    "trusted-on-first-use": "trusted on first use (check it with the operator)",
    "known": "known (seen before and unchanged)",
    "": "not yet known (no WELCOME yet)",
}

CONNECTION_MARKS = {
    "working": "● working",
    "connected": "● connected",
    "idle": "○ waiting",
    "connecting": "… connecting",
    "reconnecting": "… reconnecting",
    "starting": "… starting",
    "refused": "✗ REFUSED",
    "stopped": "■ stopped",
    "finished": "■ run finished",
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

Exposure: what this machine really sees
  images   its block of pixels of every image, mixed with secret
           per-image noise (h: no pixel value, position or image
           can be read from it)
  w1       the first layer's rows for that block, secretly mixed
           (h: no weight can be read)
  deltas   each step's dz1, shuffled and scaled by powers of two
           (p: values readable, units and samples unnamed)
  samples  which of its rows a step uses (p: linkable across
           steps, not matchable to images)
  w2.., activations..  a deeper network's hidden layers: its
           block of units, mixed with noise, and the matching
           weight rows, mixed (h); deltas2.. as deltas (p)
  labels, outputs, the last layer: never sent to any node.
  The coordinator never lets a node hold more than its bound of
  images and weights (one block unless the operator raised it).
"""


def connection_text(s: NodeState) -> str:
    """The connection state in words, with the reason when the node is not working (said once:
    "✗ REFUSED: not-allowed", not "✗ REFUSED: refused: not-allowed"; a paused node is "paused")."""
    reason = s.reason
    if s.connection in ("working", "connected", "idle") and (
        reason.startswith("paused") or reason.startswith("outside the hours")
    ):
        return f"‖ paused: {reason.removeprefix('paused ')}" if reason.startswith("paused") else f"‖ paused: {reason}"
    mark = CONNECTION_MARKS.get(s.connection, s.connection)
    word = mark.split(" ", 1)[-1].lower()  # "waiting", "reconnecting", "refused"
    for said in {word, s.connection}:
        if reason.lower().startswith(said + ": "):
            reason = reason[len(said) + 2 :]
        elif reason.lower().startswith(said + " "):  # "reconnecting in 4 s": one sentence
            return f"{mark} {reason[len(said) + 1 :]}"
    return f"{mark}: {reason}" if reason else mark


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
        f"computed     {s.batches_done:,} batch{'es' if s.batches_done != 1 else ''}  at {fmt_rate(s.rate)}\n"
        f"traffic      in {fmt_bytes(s.bytes_in)}  out {fmt_bytes(s.bytes_out)}\n"
        f"refusals     {s.refusals}\n"
        f"threads      {threads}{'' if threads == s.threads else f' (now {s.threads}, applying)'}"
        f"   {contributing_text(s, paused)}"
    )


def contributing_text(s: NodeState, paused: bool) -> str:
    """Whether this machine's CPU is being given now, and what changes it."""
    if s.connection in ("finished", "stopped", "refused"):
        return "not contributing (" + ("the run has finished" if s.connection == "finished" else s.connection) + ")"
    if paused:
        return "PAUSED (p resumes)"
    if s.reason.startswith("outside the hours"):
        return "paused by --hours"
    return "contributing (p pauses)"


# What a node really holds of each kind (the coordinator's disguise "share"; docs/design.md).
NODE_FORMS = {
    "images": "h",  # its pixel block, secretly mixed with per-image noise: no pixel value, position or image
    "w1": "h",  # w1 rows of its block, secretly mixed: no weight value
    "deltas": "p",  # each step's dz1, shuffled and scaled: values readable, units and samples unnamed
    "samples": "p",  # which of its rows a step uses: linkable across steps, not matchable to images
}


def node_form(tensor: str) -> str:
    """The form letter of what this node holds of `tensor`, for a network of any depth: a deeper
    network's weights (w2, w3, ...) and activations arrive mixed (h), its deltas shuffled (p)."""
    if tensor in NODE_FORMS:
        return NODE_FORMS[tensor]
    if tensor.startswith(("w", "activations")):
        return "h"
    if tensor.startswith("deltas"):
        return "p"
    return " "


def exposure_text(s: NodeState, width: int) -> str:
    """One bar per kind of information: how much of it this machine has seen, and in what form."""
    bar = max(6, width - 24)
    lines = []
    for tensor in TENSORS:
        share = s.exposure.get(tensor, 0.0)
        form = node_form(tensor) if share else " "
        lines.append(f"{tensor:<12}{share_bar(share, bar)} {fmt_share(share):>6} {form}")
    extra = [t for t in s.exposure if t not in TENSORS]
    for tensor in extra:
        share = s.exposure[tensor]
        lines.append(
            f"{tensor[:11]:<12}{share_bar(share, bar)} {fmt_share(share):>6} {node_form(tensor) if share else ' '}"
        )
    return "\n".join(lines)


class NodeApp(SnapshotApp):
    """The node app. See the module docstring for the keys and how quitting works."""

    TITLE = "enshuffle node"
    # Wide: panels side by side in boxes. Narrow: stacked without borders to save rows.
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
        QUIT_BINDING,
        INTERRUPT_BINDING,
        HELP_BINDING,
    ]
    HELP_TEXT = HELP_TEXT
    DONE_RESULT = "stopped"

    def __init__(
        self,
        source: Callable[[], NodeState],
        control: NodeControl,
        refresh_hz: float = 4.0,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__(source, control, refresh_hz, clock)
        self.snap: NodeState | None
        self.control: NodeControl

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

    def _setup_widgets(self) -> None:
        self.log_feed = LogFeed(self.main_screen.query_one("#log-view", Log))
        self.main_screen.query_one("#log-view", Log).border_title = "log"

    def _is_done(self, s: NodeState) -> bool:
        return s.connection in ("stopped", "finished")

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

    def action_toggle_pause(self) -> None:
        self.control.toggle_pause()
        self._refresh_now()

    def action_more_threads(self) -> None:
        self.control.set_threads(min(max_threads(), self.control.threads + 1))
        self._refresh_now()

    def action_fewer_threads(self) -> None:
        self.control.set_threads(self.control.threads - 1)
        self._refresh_now()

    def _leave_done(self) -> None:
        # Unlike the console, the node app also tells the control: whoever waits on
        # `control.stop_requested` (the daemon thread) learns the volunteer has left.
        self.control.request_stop()
        super()._leave_done()

    def _show_stopping(self) -> None:
        self._refresh_now()
