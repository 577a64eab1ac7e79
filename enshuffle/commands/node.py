"""`enshuffle node`: start the node daemon, headless (log lines on stderr) or under the node app.

Owns process-level concerns only: the BLAS thread environment and the CPU's flush-to-zero mode
(both must be set before numpy is first imported: OpenBLAS reads the one and its worker threads
copy the other when numpy loads, so nothing numpy-using is imported at module level here), the identity and
trust store from the enshuffle home, SIGINT/SIGTERM (installed here, in the main thread, never
in the library class), and choosing headless or TUI. Headless never imports textual.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time


def _apply_thread_env(threads: int | None) -> int:
    """Put --threads into the BLAS environment (before numpy loads); return the count in use.
    Idle BLAS workers are told to sleep rather than spin between batches (blas.idle_env)."""
    # Lazy, as every import below: a node's start loads only what its path needs, and numpy
    # only after its BLAS environment is set.
    from enshuffle.blas import default_threads, idle_env, thread_env

    os.environ.update(idle_env())
    if threads is None:
        value = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        return int(value) if value and value.isdigit() and int(value) > 0 else default_threads()
    os.environ.update(thread_env(threads))
    return threads


def _install_signal_handlers(daemon) -> None:
    """SIGINT/SIGTERM, and SIGHUP (the terminal closed) unless it is ignored (nohup) -> BYE
    `shutdown` and a prompt exit 0 (the coordinator reissues at once)."""

    def handler(signum, frame):  # runs in the main thread; stop() only sets an Event
        daemon.stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


def _headless_log(line: str) -> None:
    """Headless lines carry a timestamp, for a log read hours later (journalctl adds its own too).
    A terminal that has gone away (EIO) does not stop the node: it is stopping on SIGHUP anyway."""
    try:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} enshuffle node: {line}", file=sys.stderr, flush=True)
    except OSError:
        pass


def _unresolvable(address: str) -> str | None:
    """'cannot resolve host X (...)' when the host of tcp://HOST:PORT has no address, else None."""
    host, _, port = address[len("tcp://") :].rpartition(":")
    host = host.strip("[]")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve host {host!r} ({exc.strerror})"
    except (OSError, ValueError):
        return None
    return None


def is_invite_code(text: str) -> bool:
    """The shape of what `enshuffle invite` prints: 32 hex digits."""
    return len(text) == 32 and all(c in "0123456789abcdefABCDEF" for c in text)


def totals_line(state) -> str:
    """What this node did (from its NodeState), for the last line of a headless run and after
    the node app closes."""
    snap = state.snapshot()
    up = int(time.time() - snap.started_at)
    batches = f"{snap.batches_done} batch{'es' if snap.batches_done != 1 else ''}"
    return (
        f"totals: {batches} computed, {snap.bytes_in / 1e6:.1f} MB in, "
        f"{snap.bytes_out / 1e6:.1f} MB out, {snap.refusals} refused, up {up // 3600}:{up % 3600 // 60:02d}:"
        f"{up % 60:02d}"
    )


def cmd_node(args) -> int:
    """Run a node until stopped; returns the daemon's exit status (see enshuffle.node.daemon)."""
    if getattr(args, "install_service", False):
        from enshuffle.commands.service import install_service  # lazy: only --install-service needs it

        return install_service(args)
    if getattr(args, "nice", 0):
        try:
            os.nice(args.nice)
        except OSError as exc:
            print(f"enshuffle node: cannot lower the priority by --nice {args.nice}: {exc.strerror}", file=sys.stderr)
    threads = _apply_thread_env(args.threads)
    from enshuffle.fpenv import flush_denormals  # lazy: see _apply_thread_env

    denormals = flush_denormals()  # this thread's mode, copied by every thread started from now on
    # numpy (through the daemon) is imported only now, after the environment is set.
    from enshuffle.node.daemon import EXIT_UNREACHABLE, GIVE_UP_S, MessageRecorder, NodeDaemon, check_address
    from enshuffle.node.policy import Policy
    from enshuffle.node.state import NodeControl, NodeState
    from enshuffle.protocol.keys import TrustStore, enshuffle_home, load_or_create_identity

    check_address(args.connect)  # a malformed address is a one-line error (exit 2) up front
    unresolved = _unresolvable(args.connect)
    if unresolved and not getattr(args, "keep_running", False):
        # A misspelled host does not become resolvable by retrying for 5 minutes.
        print(
            f"enshuffle node: error: {unresolved}; check the --connect address (--keep-running retries "
            f"for ever, e.g. while the network comes up)",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    from enshuffle.node.invite import resolve_invite  # no numpy: read before the BLAS is configured

    invite = resolve_invite(getattr(args, "invite", None))  # CODE, @FILE or ENSHUFFLE_INVITE
    if invite is not None and not is_invite_code(invite):
        print(
            f"enshuffle node: error: {invite[:40]!r} is not an invite code: `enshuffle invite` prints 32 hex "
            f"digits (--invite CODE or ENSHUFFLE_INVITE); check it was copied whole",
            file=sys.stderr,
        )
        return 2
    invite = invite.lower() if invite else None  # the codes are lower-case hex; a copy may not be
    home = enshuffle_home()
    # One key per --name: several node processes of one user on one machine are distinct nodes.
    identity = load_or_create_identity("node", home, name=args.name)
    trust = TrustStore(home)
    state = NodeState()
    control = NodeControl(threads=threads)
    recorder = None
    if getattr(args, "record", None):

        def record_log(line: str) -> None:
            state.add_log(line)
            if not args.tui:
                print(f"enshuffle node: {line}", file=sys.stderr, flush=True)

        recorder = MessageRecorder(args.record, args.record_max_bytes, log=record_log)
    daemon = NodeDaemon(
        args.connect,
        identity=identity,
        trust=trust,
        pinned=args.coordinator_key,
        name=args.name or socket.gethostname(),
        threads=threads,
        state=state,
        control=control,
        log=_headless_log if not args.tui else state_only,
        exit_on_finish=not getattr(args, "keep_running", False),
        recorder=recorder,
        invite=invite,
        max_memory=getattr(args, "max_memory", None),
        policy=Policy.from_args(getattr(args, "max_cpu", 100), getattr(args, "hours", None)),
        give_up_after=None if getattr(args, "keep_running", False) else GIVE_UP_S,
        denormals=denormals,
    )
    _install_signal_handlers(daemon)
    if not args.tui:
        status = daemon.run()
        _headless_log(totals_line(state))
        return status
    status = _run_with_tui(daemon, state, control)
    print(f"enshuffle node: {totals_line(state)}", file=sys.stderr)
    return status


def state_only(line: str) -> None:
    """Under the TUI the log lines go to NodeState.log only (stderr would corrupt the screen)."""


def _run_with_tui(daemon, state, control) -> int:
    """The node app in the main thread, the daemon in a background thread."""
    from enshuffle.tui.node_app import NodeApp, terminal_fd, terminal_gone  # textual is imported only on this path

    result: list[int] = []
    app = NodeApp(source=state.snapshot, control=control)
    tty = terminal_fd()

    def on_hangup(signum, frame):
        # The terminal closed: stop as on q, once, and leave; otherwise SIGHUP stops as SIGTERM does.
        if terminal_gone(tty):
            app.call_later(app.lose_terminal)
        else:
            daemon.stop()

    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, on_hangup)

    def work() -> None:
        status = daemon.run()
        result.append(status)
        if status == 0 and control.stop_requested:
            # Stopped by q or a signal: the app leaves too (after q it already has).
            try:
                app.call_from_thread(app.exit, "stopped")
            except RuntimeError:
                pass  # the app is no longer running
            return
        if status == 0:
            # The run finished: the volunteer's screen stays, saying so, until they press q.
            with state.lock:
                state.connection = "finished"
                state.reason = "q leaves"
            while not control.stop_requested:
                time.sleep(0.2)
            return
        # A fatal end keeps "refused" on screen until the volunteer quits; then the app
        # must see "stopped" to leave on the first q. Checking a flag 5 times a second is cheap.
        while not control.stop_requested:
            time.sleep(0.2)
        with state.lock:
            state.connection = "stopped"

    thread = threading.Thread(target=work, name="enshuffle-node", daemon=True)
    thread.start()
    app.run()
    control.request_stop()
    thread.join(timeout=3.0)
    if thread.is_alive():
        print("enshuffle node: the daemon did not stop within 3 s; leaving anyway", file=sys.stderr)
        return 1
    status = result[0] if result else 1
    for line in list(state.snapshot().log)[-3:]:
        print(f"enshuffle node: {line}", file=sys.stderr)
    if status != 0 and daemon.error:
        print(f"enshuffle node: error: {daemon.error}", file=sys.stderr)
    return status
