"""Redraw the README's screenshots from a real run on loopback, at 120x40.

    .venv/bin/python scripts/screenshots.py [--data DIR] [--limit N]

A real `CoordinatorRun` (ROUTER on 127.0.0.1, model chain in a temporary RUN_DIR) trains in a
thread with two nodes: one `enshuffle node` process and one `NodeDaemon` in this process whose
app is shown. Both apps run headless (Textual's test driver) and save an SVG once the run has
finished its second epoch: docs/screenshots/coordinator.svg and docs/screenshots/node.svg.
Nothing on screen is synthetic.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZE = (120, 40)


async def wait_for(pilot, predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: timed out waiting for {what}")
        await pilot.pause(0.1)


async def shoot(data: str | None, limit: int) -> None:
    from enshuffle.coordinator.training import load_inputs
    from enshuffle.coordinator.settings import RunConfig, Serving
    from enshuffle.coordinator.cluster import spawn_local_nodes, stop_local_nodes
    from enshuffle.coordinator.run import CoordinatorRun, verify_chain_message
    from enshuffle.model import get_preset
    from enshuffle.node.daemon import NodeDaemon
    from enshuffle.node.state import NodeControl, NodeState
    from enshuffle.protocol.keys import Identity, TrustStore
    from enshuffle.tui.coordinator_app import CoordinatorApp
    from enshuffle.tui.node_app import NodeApp

    out = REPO / "docs" / "screenshots"
    with tempfile.TemporaryDirectory(prefix="enshuffle-shots-") as tmp:
        tmp = Path(tmp)
        preset = get_preset("default", epochs=4)
        inputs = load_inputs(data, preset, limit)
        config = RunConfig(
            limit=limit, shards=2, serving=Serving(bind="tcp://127.0.0.1:*", min_nodes=2), run_dir=str(tmp / "run")
        )
        run = CoordinatorRun(config, preset, inputs, home=tmp / "coordinator", quiet=True)
        run.print_reports = False
        thread = threading.Thread(target=run.run, daemon=True)
        thread.start()
        endpoint = run.state.join_commands[0].split()[3]
        procs = spawn_local_nodes(endpoint, run.identity.fingerprint, 1, tmp / "nodes")
        state, control = NodeState(), NodeControl(threads=1)
        daemon = NodeDaemon(
            endpoint,
            identity=Identity.generate(),
            trust=TrustStore(tmp / "volunteer"),
            pinned=run.identity.fingerprint,
            name=socket.gethostname()[:16] or "volunteer",
            threads=1,
            state=state,
            control=control,
            log=lambda line: None,
        )
        node_thread = threading.Thread(target=daemon.run, daemon=True)
        node_thread.start()
        try:
            console = CoordinatorApp(
                run.state.snapshot, run.control, verify_chain=lambda: verify_chain_message(run.chain)
            )
            async with console.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: run.state.snapshot().epoch >= 2, 600, "two epochs")
                await wait_for(pilot, lambda: run.state.snapshot().step >= 5, 120, "a few steps more")
                await pilot.pause(0.5)
                console.save_screenshot(str(out / "coordinator.svg"))
            app = NodeApp(state.snapshot, control)
            async with app.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: state.snapshot().batches_done > 0, 60, "the node to compute")
                await pilot.pause(0.5)
                app.save_screenshot(str(out / "node.svg"))
        finally:
            run.control.request_stop()
            thread.join(60)
            daemon.stop()
            node_thread.join(10)
            stop_local_nodes(procs, timeout=5)
    print(f"wrote {out / 'coordinator.svg'} and {out / 'node.svg'} ({SIZE[0]}x{SIZE[1]}, real loopback run)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="MNIST-format IDX files (default: as for train)")
    parser.add_argument("--limit", type=int, default=6000, help="training images (default 6000)")
    options = parser.parse_args()
    asyncio.run(shoot(options.data, options.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
