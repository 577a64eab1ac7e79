"""The coordinator's live state as plain Python objects, for presenters (CLI lines, the TUI).

The training loop and the network loop write here under `lock`; a presenter takes a
`snapshot()` (a deep copy) on its own timer and renders it. Nothing here imports textual and
nothing here posts events: at 1,000 batch events per second a UI must pull, not be pushed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from enshuffle.live import LiveState, PauseStop

TENSORS = ("images", "w1", "w2", "activations", "gradients")


@dataclass
class NodeRow:
    """One node as the operator sees it."""

    node_id: str
    name: str
    fingerprint: str
    address: str = ""
    # connected | working | waiting | paused | standby | lost (left mid-run) | done (run finished) | left (coordinator stopped)
    state: str = "connected"
    batches_done: int = 0
    outstanding: int = 0
    rate: float = 0.0  # batches per second, recent
    last_seen: float = 0.0  # time.time()
    reissued: int = 0
    refused: int = 0
    exposure: dict[str, float] = field(default_factory=dict)  # tensor -> share of elements seen (0..1)
    reason: str = ""  # why it is waiting / paused / standby / lost, in words


@dataclass
class EpochRow:
    epoch: int
    cost: float
    train_accuracy: float
    test_accuracy: float
    seconds: float


@dataclass
class VersionRow:
    version_id: str
    parent_id: str | None
    epoch: int
    step: int
    test_accuracy: float | None
    created: float  # time.time()
    verified: bool | None = None  # None: not checked yet
    metadata: dict = field(default_factory=dict)


@dataclass
class CoordinatorState(LiveState):
    run_id: str = ""
    preset: str = ""
    bind: str = ""
    fingerprint: str = ""
    join_commands: list[str] = field(default_factory=list)  # `enshuffle node ...` lines for volunteers
    run_dir: str | None = None
    started_at: float = field(default_factory=time.time)
    epochs_total: int = 0
    steps_per_epoch: int = 0
    epoch: int = 0  # epochs completed
    step: int = 0  # steps completed in the current epoch
    step_seconds: float = 0.0  # recent mean time of one training step (for the ETA; 0 = unknown)
    status: str = "starting"  # human sentence: "waiting for 2 nodes", "training", "paused", "finished"
    paused: bool = False
    finished: bool = False
    exposure_bound: float = 1.0  # the share each node should stay under for images and w1
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    epochs: list[EpochRow] = field(default_factory=list)
    versions: list[VersionRow] = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=500))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class CoordinatorControl(PauseStop):
    """What a presenter may ask of a running coordinator. Thread-safe; the loop polls it.

    `request_stop` is graceful: the loop finishes the current step, writes a model version and
    tells nodes BYE."""

    def pause(self) -> None:
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()
