"""Key-press-to-screen-update latency of the coordinator console under load (a benchmark, not a test).

Runs CoordinatorApp headless (App.run_test) against SyntheticCoordinator (100 nodes, 1,000 batch
events per second by default), presses keys many times (moving the nodes table cursor, toggling
the help screen) and measures, for each press, the time from sending the key to the first
compositor refresh of the screen that shows its effect. That refresh is the frame a terminal
would receive; the headless driver only skips writing it out.

    .venv/bin/python scripts/tui_latency_bench.py [--presses 200] [--nodes 100] [--events 1000]

Prints the median and p90 in ms (goal: median under 100 ms) and how long one snapshot refresh
takes, since that is what a key press may have to wait behind.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from textual import events
from textual.screen import Screen
from textual.widgets import DataTable

from enshuffle.tui.coordinator_app import CoordinatorApp
from enshuffle.tui.synthetic import SyntheticCoordinator
from enshuffle.tui.widgets import HelpScreen


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run(presses: int, nodes: int, events_per_second: float, size: tuple[int, int]) -> None:
    fake = SyntheticCoordinator(nodes=nodes, events_per_second=events_per_second).start()
    app = CoordinatorApp(fake.source, fake.control, verify_chain=fake.verify_chain)

    refresh_ms: list[float] = []
    apply = app._apply

    def timed_apply(snap):  # how long one snapshot takes to apply: what a key may wait behind
        t = time.perf_counter()
        apply(snap)
        refresh_ms.append(1000 * (time.perf_counter() - t))

    app._apply = timed_apply

    # The effect of the pending key press, and the event set at the first frame showing it.
    pending: dict = {}
    original_refresh = Screen._compositor_refresh

    def hooked_refresh(screen: Screen) -> None:
        original_refresh(screen)
        if pending and screen is app.screen and pending["shown"]():
            pending["at"] = time.perf_counter()
            pending["done"].set()

    Screen._compositor_refresh = hooked_refresh  # benchmark-only instrumentation
    latencies: list[float] = []
    by_key: dict[str, list[float]] = {"down": [], "question_mark": []}
    rng = random.Random(1)
    try:
        async with app.run_test(size=size) as pilot:
            table = app.query_one("#nodes-table", DataTable)
            table.focus()
            await asyncio.sleep(1.0)  # let the synthetic run warm up and the timer tick a few times
            started = time.perf_counter()
            before = sum(r.batches_done for r in fake.state.nodes.values())
            for i in range(presses):
                if i % 4 in (0, 1):
                    key, char = "down", None
                    target = min(table.row_count - 1, table.cursor_row + 1)
                    if target == table.cursor_row:
                        table.move_cursor(row=0)
                        await pilot.pause()
                        target = 1
                    shown = lambda target=target: table.cursor_row == target  # noqa: E731  (as in the branch below)
                else:
                    opening = not isinstance(app.screen, HelpScreen)
                    key, char = "question_mark", "?"
                    shown = (
                        (lambda: isinstance(app.screen, HelpScreen))
                        if opening
                        else (lambda: not isinstance(app.screen, HelpScreen))
                    )
                pending.clear()
                pending.update(shown=shown, done=asyncio.Event())
                sent = time.perf_counter()
                app._driver.send_message(events.Key(key, char))
                await asyncio.wait_for(pending["done"].wait(), timeout=10)
                latencies.append(1000 * (pending["at"] - sent))
                by_key[key].append(latencies[-1])
                pending.clear()
                # Random gaps put presses at every phase of the 4 Hz refresh.
                await asyncio.sleep(rng.uniform(0.02, 0.12))
            processed = sum(r.batches_done for r in fake.state.nodes.values()) - before
            achieved = processed / (time.perf_counter() - started)
    finally:
        Screen._compositor_refresh = original_refresh
        fake.stop()

    print(
        f"coordinator console {size[0]}x{size[1]}, {nodes} nodes, {events_per_second:.0f} batch events/s asked, "
        f"{achieved:.0f}/s delivered by the synthetic back-end ({processed:,} events while measuring)"
    )
    if achieved < 0.9 * events_per_second:
        print("WARNING: the synthetic back-end fell behind; the load was lighter than asked")
    print(
        f"key press -> screen update over {len(latencies)} presses: "
        f"median {statistics.median(latencies):.1f} ms, p90 {percentile(latencies, 0.9):.1f} ms, "
        f"max {max(latencies):.1f} ms"
    )
    for key, values in by_key.items():
        label = "cursor down (nodes table)" if key == "down" else "? (help screen open/close)"
        print(f"  {label}: median {statistics.median(values):.1f} ms, p90 {percentile(values, 0.9):.1f} ms")
    print(
        f"snapshot refresh (apply) over {len(refresh_ms)} ticks: "
        f"median {statistics.median(refresh_ms):.1f} ms, p90 {percentile(refresh_ms, 0.9):.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--events", type=float, default=1000.0, help="batch events per second")
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--height", type=int, default=48)
    args = parser.parse_args()
    asyncio.run(run(args.presses, args.nodes, args.events, (args.width, args.height)))


if __name__ == "__main__":
    main()
