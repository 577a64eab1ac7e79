"""Synthetic back-ends for the TUIs: a fake coordinator run and a fake node that write plain state.

They exist for the latency benchmark, the tests and demos: no network and no training, only a
background thread that mutates a `CoordinatorState` / `NodeState` at a chosen event rate the
way the real back-ends do (under the state's lock, never touching Textual). `advance()` is the
deterministic core (seeded RNG, explicit clock), the thread only paces it.

Demo: `python -m enshuffle.tui.synthetic coordinator [--nodes 100] [--events 1000]` or
`python -m enshuffle.tui.synthetic node`.
"""

from __future__ import annotations

import argparse
import math
import random
import threading
import time

from ..coordinator.state import TENSORS, CoordinatorControl, CoordinatorState, EpochRow, NodeRow, VersionRow
from ..node.state import NodeControl, NodeState
from .coordinator_app import CoordinatorApp
from .node_app import NodeApp


def _hex(rng: random.Random, n: int = 64) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(n))


def _stamp(now: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(now))


class _Pacer:
    """Runs `tick(now, dt)` about every `period` seconds on a daemon thread until stopped."""

    def __init__(self, tick, period: float = 0.01):
        self._tick = tick
        self._period = period
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        def loop() -> None:
            last = time.time()
            # Event.wait paces the loop and lets stop() end it at once.
            while not self._halt.wait(self._period):
                now = time.time()
                self._tick(now, now - last)
                last = now

        self._thread = threading.Thread(target=loop, name="synthetic-backend", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


class SyntheticCoordinator:
    """A fake run: `nodes` nodes finishing `events_per_second` batches per second in total."""

    def __init__(
        self,
        nodes: int = 100,
        events_per_second: float = 1000.0,
        seed: int = 0,
        epochs_total: int = 15,
        steps_per_epoch: int = 40,
        batches_per_step: int = 200,
        exposure_bound: float = 0.25,
        start: float | None = None,
    ):
        self.rng = random.Random(seed)
        self.events_per_second = events_per_second
        self.batches_per_step = batches_per_step
        started = time.time() if start is None else start
        self.state = CoordinatorState(
            run_id=f"run-{seed:04d}",
            preset="synthetic",
            bind="tcp://0.0.0.0:5555",
            fingerprint=_hex(self.rng),
            started_at=started,
            epochs_total=epochs_total,
            steps_per_epoch=steps_per_epoch,
            status="training",
            exposure_bound=exposure_bound,
        )
        self.control = CoordinatorControl()
        for i in range(nodes):
            node_id = f"n{i:03d}"
            self.state.nodes[node_id] = NodeRow(
                node_id=node_id,
                name=f"node-{i:03d}",
                fingerprint=_hex(self.rng),
                address=f"10.0.{i // 250}.{i % 250 + 1}:{40000 + i}",
                state="working",
                last_seen=started,
                exposure={t: 0.0 for t in TENSORS},
            )
        self._ids = list(self.state.nodes)
        # Hold our own reference: CoordinatorState.snapshot() sets `state.lock` to None while it
        # copies, so reading the attribute from this thread at that moment would find no lock.
        self._lock = self.state.lock
        # Each node's ceiling of exposure: most stay under the bound, one strays over it so the
        # exposure view has something to flag.
        self._ceiling = {k: exposure_bound * self.rng.uniform(0.5, 0.95) for k in self._ids}
        if self._ids:
            self._ceiling[self._ids[-1]] = min(1.0, exposure_bound * 1.3)
        self._events_in_step = 0
        self._carry = 0.0
        self._epoch_started = started
        self._stop_at: float | None = None
        self._pacer = _Pacer(self.tick)

    # -- the deterministic core --

    def advance(self, events: int, now: float, dt: float = 0.01) -> None:
        """Apply `events` batch completions at time `now` (dt: seconds since the last call)."""
        s = self.state
        rng = self.rng
        with self._lock:
            if self.control.stop_requested and not s.finished:
                if self._stop_at is None:
                    self._stop_at = now + 1.0  # "finish the current step", quickly
                    s.status = "stopping"
                    s.log.append(f"{_stamp(now)} stop requested: finishing the current step")
                elif now >= self._stop_at:
                    s.finished = True
                    s.status = "finished"
                    s.log.append(f"{_stamp(now)} stopped; model version written; nodes told BYE")
                events = 0
            elif self.control.paused:
                s.paused, s.status, events = True, "paused", 0
            elif not s.finished:
                s.paused, s.status = False, "training"
            counts: dict[str, int] = {}
            for _ in range(events if self._ids else 0):
                key = self._ids[rng.randrange(len(self._ids))]
                counts[key] = counts.get(key, 0) + 1
            for key, row in s.nodes.items():
                done = counts.get(key, 0)
                row.batches_done += done
                if done:
                    row.last_seen = now
                    row.outstanding = rng.randrange(0, 4)
                    ceiling = self._ceiling[key]
                    for tensor in ("images", "w1"):
                        share = row.exposure.get(tensor, 0.0)
                        row.exposure[tensor] = min(ceiling, share + done * ceiling * 0.002)
                    row.exposure["deltas"] = row.exposure["samples"] = 1.0
                    row.forms = {
                        "images": "values hidden",
                        "w1": "values hidden",
                        "deltas": "positions hidden",
                        "samples": "positions hidden",
                    }
                if dt > 0:  # a moving average over about two seconds, like a real rate meter
                    alpha = min(1.0, dt / 2.0)
                    row.rate = (1 - alpha) * row.rate + alpha * (done / dt)
            self._advance_steps(events, now, rng)
            if events and rng.random() < min(1.0, events / 400):
                key = self._ids[rng.randrange(len(self._ids))]
                row = s.nodes[key]
                if rng.random() < 0.7:
                    row.reissued += 1
                    s.log.append(f"{_stamp(now)} batch reissued: {row.name} missed its deadline")
                else:
                    row.refused += 1
                    s.log.append(f"{_stamp(now)} result refused from {row.name}: Freivalds check failed")

    def _advance_steps(self, events: int, now: float, rng: random.Random) -> None:
        s = self.state
        self._events_in_step += events
        while self._events_in_step >= self.batches_per_step and s.epoch < s.epochs_total:
            self._events_in_step -= self.batches_per_step
            s.step += 1
            if s.step >= s.steps_per_epoch:
                s.step = 0
                s.epoch += 1
                progress = 1 - math.exp(-s.epoch / 3)
                s.epochs.append(
                    EpochRow(
                        epoch=s.epoch,
                        cost=0.09 - 0.06 * progress + rng.uniform(-0.002, 0.002),
                        train_accuracy=0.55 + 0.33 * progress + rng.uniform(-0.005, 0.005),
                        test_accuracy=0.54 + 0.32 * progress + rng.uniform(-0.005, 0.005),
                        seconds=now - self._epoch_started,
                    )
                )
                self._epoch_started = now
                parent = s.versions[-1].version_id if s.versions else None
                s.versions.append(
                    VersionRow(
                        version_id=_hex(rng),
                        parent_id=parent,
                        epoch=s.epoch,
                        step=0,
                        test_accuracy=s.epochs[-1].test_accuracy,
                        created=now,
                        metadata={"preset": s.preset, "nodes": len(s.nodes), "cost": round(s.epochs[-1].cost, 5)},
                    )
                )
                if s.epoch >= s.epochs_total:
                    s.finished, s.status = True, "finished"

    def tick(self, now: float, dt: float) -> None:
        self._carry += self.events_per_second * dt
        events = int(self._carry)
        self._carry -= events
        self.advance(events, now, dt)

    # -- what the apps and the benchmark use --

    def source(self) -> CoordinatorState:
        return self.state.snapshot()

    def verify_chain(self) -> tuple[bool, str]:
        """Checks the parent links of the synthetic chain (the real check also verifies signatures)."""
        with self._lock:
            versions = list(self.state.versions)
        for before, after in zip(versions, versions[1:]):
            if after.parent_id != before.version_id:
                return False, f"version {after.version_id[:8]} does not link to {before.version_id[:8]}"
        return True, f"{len(versions)} versions, every parent link intact"

    def start(self) -> "SyntheticCoordinator":
        self._pacer.start()
        return self

    def stop(self) -> None:
        self._pacer.stop()

    def __enter__(self) -> "SyntheticCoordinator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SyntheticNode:
    """A fake node connected to a fake coordinator, computing `batches_per_second` per thread."""

    OPS = ("matmul (30000x196)·(196x128)", "matmul (128x30000)·(30000x196)", "matmul (10x30000)·(30000x128)")

    def __init__(self, batches_per_second: float = 20.0, seed: int = 0, threads: int = 2, start: float | None = None):
        self.rng = random.Random(seed)
        self.batches_per_second = batches_per_second
        started = time.time() if start is None else start
        self.state = NodeState(
            connect="tcp://coordinator.example:5555",
            name=f"node-{seed:03d}",
            own_fingerprint=_hex(self.rng),
            coordinator_fingerprint=_hex(self.rng),
            trust="trusted-on-first-use",
            run_id=f"run-{seed:04d}",
            connection="working",
            threads=threads,
            exposure={t: 0.0 for t in TENSORS},
            started_at=started,
        )
        self.control = NodeControl(threads=threads)
        self._lock = self.state.lock  # see SyntheticCoordinator: snapshot() swaps state.lock out
        self._carry = 0.0
        self._pacer = _Pacer(self.tick, period=0.05)

    def advance(self, batches: int, now: float, dt: float = 0.05) -> None:
        s = self.state
        rng = self.rng
        with self._lock:
            s.threads = self.control.threads
            if self.control.stop_requested:
                if s.connection != "stopped":
                    s.log.append(f"{_stamp(now)} BYE sent; stopped")
                s.connection, s.reason, s.current_op, batches = "stopped", "stopped by you", "", 0
            elif self.control.paused:
                s.paused, s.connection, s.reason, s.current_op, batches = True, "idle", "paused by you", "", 0
            else:
                s.paused = False
                s.connection, s.reason = "working", ""
                s.current_op = self.OPS[(s.batches_done // 7) % len(self.OPS)]
            s.batches_done += batches
            s.bytes_in += batches * rng.randrange(200_000, 400_000)
            s.bytes_out += batches * 128 * 4 * 100
            if dt > 0:
                alpha = min(1.0, dt / 2.0)
                s.rate = (1 - alpha) * s.rate + alpha * (batches / dt)
            for tensor in s.exposure:
                s.exposure[tensor] = min(0.2, s.exposure[tensor] + batches * 0.0005)
            if batches and rng.random() < 0.01:
                s.refusals += 1
                s.log.append(f"{_stamp(now)} refused a batch: signature did not verify")

    def tick(self, now: float, dt: float) -> None:
        self._carry += self.batches_per_second * max(1, self.control.threads) * dt
        batches = int(self._carry)
        self._carry -= batches
        self.advance(batches, now, dt)

    def source(self) -> NodeState:
        return self.state.snapshot()

    def start(self) -> "SyntheticNode":
        self._pacer.start()
        return self

    def stop(self) -> None:
        self._pacer.stop()

    def __enter__(self) -> "SyntheticNode":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enshuffle.tui.synthetic", description="demo the TUIs on fake data")
    parser.add_argument("app", choices=["coordinator", "node"])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--events", type=float, default=1000.0, help="batch events per second")
    args = parser.parse_args(argv)
    if args.app == "coordinator":
        with SyntheticCoordinator(nodes=args.nodes, events_per_second=args.events) as fake:
            result = CoordinatorApp(fake.source, fake.control, verify_chain=fake.verify_chain).run()
    else:
        with SyntheticNode() as fake:
            result = NodeApp(fake.source, fake.control).run()
    print(f"left the {args.app} app: {result}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
