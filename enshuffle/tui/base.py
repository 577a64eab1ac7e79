"""What the coordinator console and the node app share: a Textual app on a snapshot timer.

`SnapshotApp` owns the loop both apps run. The back-end keeps a state object current under its
lock; the app pulls `source()` (a snapshot copy) on a timer at `refresh_hz` and hands it to the
subclass's `_apply(snap)`, which updates its widgets inside one `batch_update()`. When `source()`
raises, the back-end is gone or broken: the app keeps the last view and says why
(`backend_error`).

Layout: a terminal at least WIDE_MIN_WIDTH x WIDE_MIN_HEIGHT gets the CSS class "wide" on the main
screen; `_on_wide_changed(wide)` is the hook for anything CSS cannot switch.

Quitting is graceful. The first q calls `control.request_stop()` and the app stays up, showing
that it is stopping; it leaves by itself once a snapshot is done (`_is_done(snap)`, return value
`DONE_RESULT`), or at once when the back-end is gone ("backend-gone"). A second q leaves at once
("left-early"); the back-end still stops on its own. When the snapshot is already done, q leaves
at once. `app.return_value` says which.

A terminal that goes away (the window closed, tmux killed, ssh dropped) is the first q too: the
app notices on its timer (or on SIGHUP, through `lose_terminal`), points the standard streams at
a quiet pipe and /dev/null, so nothing spins reading a dead terminal or fails writing to it, asks
the back-end to stop and leaves once it has ("terminal-lost").

Subclasses set BINDINGS (with QUIT_BINDING and HELP_BINDING where they belong in the footer:
Textual merges inherited bindings ahead of a subclass's own, which would reorder the footer),
HELP_TEXT and DONE_RESULT, and implement `_setup_widgets`, `_apply`, `_is_done` and
`_status_text`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from textual.app import App
from textual.binding import Binding
from textual.events import Resize
from textual.widgets import Static

from .widgets import HelpScreen

# Below either size an app folds its panes into the narrow layout.
WIDE_MIN_WIDTH = 120
WIDE_MIN_HEIGHT = 36

QUIT_BINDING = Binding("q", "request_quit", "quit")
# Ctrl-C (and Textual's own ctrl+q) must be the same graceful stop as q, not Textual's
# "press ctrl+q to quit" or an abrupt exit; priority, so no focused widget swallows them.
INTERRUPT_BINDING = Binding("ctrl+c,ctrl+q", "request_quit", "quit", show=False, priority=True)
HELP_BINDING = Binding("question_mark", "toggle_help", "help")


def terminal_fd() -> int | None:
    """The file descriptor of this process's terminal (stdin), or None when it has none."""
    try:
        fd = sys.__stdin__.fileno()  # type: ignore[union-attr]  # None is caught below
    except (AttributeError, OSError, ValueError):
        return None
    return fd if os.isatty(fd) else None


def terminal_gone(fd: int | None) -> bool:
    """True when `fd` was a terminal and is one no more (hung up: isatty's ioctl fails with EIO)."""
    return fd is not None and not os.isatty(fd)


_quiet_pipe: tuple[int, int] | None = None


def detach_from_terminal() -> None:
    """Point fds 0-2 away from a dead terminal: stdin at a pipe nobody writes (select waits, as on
    a terminal with no keys pressed, instead of reporting end-of-file thousands of times a second;
    non-blocking, so a reader caught between select and read fails instead of waiting for ever),
    stdout and stderr at /dev/null (a write to a hung-up terminal fails with EIO)."""
    global _quiet_pipe
    if _quiet_pipe is None:
        _quiet_pipe = os.pipe()  # both ends stay open for the life of the process
        os.set_blocking(_quiet_pipe[0], False)
    os.dup2(_quiet_pipe[0], 0)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


class _TerminalFile:
    """The driver's output file, which shrugs off a terminal that has gone away: Textual's writer
    thread dies on the first EIO, and the app's next 30 writes then block its event loop for ever."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, text: str) -> int:
        try:
            return self._file.write(text)
        except (OSError, ValueError):
            return 0

    def flush(self) -> None:
        try:
            self._file.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def sturdy_driver_class(driver_class):
    """`driver_class` (Textual's LinuxDriver) with its output through `_TerminalFile`."""
    if getattr(driver_class, "_sturdy", False) or not hasattr(driver_class, "run_input_thread"):
        return driver_class

    class SturdyDriver(driver_class):
        _sturdy = True

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._file = _TerminalFile(self._file)  # type: ignore[has-type]  # textual's own attribute
            self._tty = terminal_fd()

        def _terminal_lost(self) -> bool:
            return terminal_gone(self._tty)

        def _sigcont_application(self, *args) -> None:
            # A hangup comes with SIGCONT: resuming would start a second input thread on a
            # terminal that is gone (and keep the process alive after the app has left).
            if self._terminal_lost():
                lose = getattr(self._app, "lose_terminal", None)
                if lose is not None:
                    self._app.call_later(lose)
                return
            super()._sigcont_application(*args)

        def run_input_thread(self) -> None:
            try:
                super().run_input_thread()
            except OSError:
                if not self._terminal_lost():
                    raise  # a real failure: Textual's wrapper shows it

    return SturdyDriver


class SnapshotApp(App):
    """A Textual app that shows snapshots pulled from `source()`; see the module docstring."""

    HELP_TEXT = ""
    DONE_RESULT = "finished"  # app.return_value when it leaves because a snapshot is done

    def __init__(
        self,
        source: Callable[[], Any],
        control: Any,
        refresh_hz: float = 4.0,
        clock: Callable[[], float] = time.time,
    ):
        super().__init__()
        self.source = source
        self.control = control
        self.refresh_hz = refresh_hz
        self.clock = clock
        self.snap: Any = None
        self.stopping = False  # q was pressed once
        self.backend_error: str | None = None  # why source() last failed
        self.wide: bool | None = None
        self._texts: dict[str, str] = {}  # widget id -> last text, to skip unchanged updates
        self._mounted = False
        self.terminal_lost = False
        self._tty = terminal_fd()

    def get_driver_class(self):
        return sturdy_driver_class(super().get_driver_class())

    # ----- hooks for subclasses -----

    def _setup_widgets(self) -> None:
        """Called once on mount, with `self.main_screen` set, before the first layout."""

    def _apply(self, snap: Any) -> None:
        """Show `snap` in the widgets (inside one `batch_update()`)."""
        raise NotImplementedError

    def _is_done(self, snap: Any) -> bool:
        """True when the back-end behind `snap` has finished, so a stopping app may leave."""
        raise NotImplementedError

    def _status_text(self, snap: Any) -> str:
        raise NotImplementedError

    def _on_wide_changed(self, wide: bool) -> None:
        """The layout switched between wide and narrow (the screen's CSS class is already set)."""

    def _leave_done(self) -> None:
        """q on a done snapshot: leave at once."""
        self.exit(self.DONE_RESULT)

    def _show_stopping(self) -> None:
        """The first q was pressed: show that the app is stopping."""
        self._refresh_status()

    # ----- layout -----

    def on_mount(self) -> None:
        # Widgets are looked up on the main screen, not `self.screen`: the help overlay may be
        # the active screen while the timer refreshes the one underneath.
        self.main_screen = self.screen
        self._setup_widgets()
        self._adapt_layout(self.size.width, self.size.height)
        self._mounted = True
        self.pull_snapshot()
        self.set_interval(1.0 / self.refresh_hz, self.pull_snapshot, name="refresh")

    def on_resize(self, event: Resize) -> None:
        if not self._mounted or not self.is_running:  # on_mount lays out for the first size
            return
        self._adapt_layout(event.size.width, event.size.height)
        self._refresh_now()

    def _adapt_layout(self, width: int, height: int) -> None:
        wide = width >= WIDE_MIN_WIDTH and height >= WIDE_MIN_HEIGHT
        if wide != self.wide:
            self.wide = wide
            self.main_screen.set_class(wide, "wide")
            self._on_wide_changed(wide)

    # ----- refresh -----

    def pull_snapshot(self) -> None:
        """Timer callback: take a snapshot from the back-end and show it."""
        if not self.is_running:  # shutting down: the widgets are being removed before the timer
            return
        if not self.terminal_lost and terminal_gone(self._tty):
            self.lose_terminal()
        try:
            snap = self.source()
        except Exception as exc:  # the back-end is gone or broken: show why, keep the last view
            self.backend_error = f"{type(exc).__name__}: {exc}"
            if self.stopping:
                self.exit("backend-gone")
                return
            self._refresh_now()
            return
        self.backend_error = None
        self.snap = snap
        self._apply(snap)
        if self.stopping and self._is_done(snap):
            self.exit("terminal-lost" if self.terminal_lost else self.DONE_RESULT)

    def _refresh_now(self) -> None:
        """Show the last snapshot again (after a key or a resize changed what it looks like)."""
        if self.snap is not None and self.is_running:
            self._apply(self.snap)

    def _refresh_status(self) -> None:
        if self.snap is not None:
            self._set_text("status", self._status_text(self.snap))

    def _set_text(self, widget_id: str, text: str) -> None:
        if self._texts.get(widget_id) != text:
            self._texts[widget_id] = text
            self.main_screen.query_one(f"#{widget_id}", Static).update(text)

    # ----- actions -----

    def action_toggle_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.screen.dismiss(None)
        else:
            # Installed once and reused: composing it anew on every ? costs a visible moment.
            if not self.is_screen_installed("help"):
                self.install_screen(HelpScreen(self.HELP_TEXT), name="help")
            self.push_screen("help")

    def lose_terminal(self) -> None:
        """The terminal is gone: stop as on q, and leave once the back-end has stopped."""
        if self.terminal_lost:
            return
        self.terminal_lost = True
        detach_from_terminal()
        self.control.request_stop()
        self.stopping = True
        if self.backend_error is not None or (self.snap is not None and self._is_done(self.snap)):
            self.exit("terminal-lost")

    def check_terminal(self) -> bool:
        """SIGHUP's question: is the terminal gone? If so, stop as `lose_terminal` does."""
        if terminal_gone(self._tty):
            self.lose_terminal()
            return True
        return False

    def action_request_quit(self) -> None:
        if self.snap is not None and self._is_done(self.snap):
            self._leave_done()
        elif self.backend_error is not None:
            self.control.request_stop()
            self.exit("backend-gone")
        elif self.stopping:
            self.exit("left-early")
        else:
            self.control.request_stop()
            self.stopping = True
            self._show_stopping()
