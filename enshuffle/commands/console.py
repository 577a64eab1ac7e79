"""The console runner: a coordinator run headless (log lines on stderr) or under its console.

textual is imported only when the console is asked for (`--tui`).
"""

from __future__ import annotations

import signal
import sys
import threading

from enshuffle.coordinator.report import eprint, report_ledger
from enshuffle.coordinator.run import CoordinatorRun, run_headless, verify_chain_message
from enshuffle.errors import UsageError


def run_console(run: CoordinatorRun, tui: bool = False) -> int:
    """Run `run` to its end: under the coordinator console with `tui`, else headless."""
    return run_with_tui(run) if tui else run_headless(run)


def run_with_tui(run: CoordinatorRun) -> int:
    """The console in the main thread, the run (which owns the socket) in a worker thread."""
    # textual only on the --tui path
    from enshuffle.tui.coordinator_app import CoordinatorApp, terminal_fd, terminal_gone

    status: dict = {}

    def work():
        try:
            status["rc"] = run.run()
        except Exception as exc:  # shown in the console's log, and printed once the console closes
            status["error"] = exc
            run.log(f"coordinator failed: {exc}")
            status["rc"] = 2 if isinstance(exc, UsageError) else 1
            with run.state.lock:
                run.state.finished = True

    run.quiet = True
    run.print_reports = False
    run.server._log = lambda line: None
    thread = threading.Thread(target=work, name="coordinator", daemon=True)
    thread.start()
    app = CoordinatorApp(
        source=run.state.snapshot, control=run.control, verify_chain=lambda: verify_chain_message(run.chain)
    )

    def on_sigterm(signum, frame):
        # As the first q: finish the step, write a version, say BYE; the console then leaves.
        # The handler runs on the main thread, which is the app's event loop thread.
        if not app.stopping:
            app.call_later(app.action_request_quit)

    def on_hangup(signum, frame):
        # The terminal closing sends SIGHUP too: then it is the graceful stop, not a reload.
        if terminal_gone(app_tty):
            app.call_later(app.lose_terminal)
        else:
            run.hangup()

    app_tty = terminal_fd()
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    previous_hup = signal.signal(signal.SIGHUP, on_hangup)
    try:
        app.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)
        run.control.request_stop()
        # A step finishes in well under this; if the run is stuck the daemon thread dies with us.
        thread.join(30)
    if "error" in status:
        print(f"enshuffle: error: {status['error']}", file=sys.stderr)
    elif thread.is_alive():
        print("enshuffle: the run did not finish its step within 30 s of quitting; leaving anyway", file=sys.stderr)
        return 1
    # The console is gone: leave what it showed that matters on the terminal.
    run.print_reports = True
    report_ledger(
        run.server.ledger,
        run.config.json,
        {"bytes_sent": run.server.bytes_sent, "bytes_received": run.server.bytes_received},
    )
    with run.state.lock:
        final = run.state.status
    for line in run.summary_lines(final):
        eprint(line)
    return status.get("rc", 0)
