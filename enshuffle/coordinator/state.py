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

# Every kind of information the ledger tracks (enshuffle.coordinator.ledger), bounded ones first.
TENSORS = ("images", "w1", "deltas", "samples", "labels", "outputs", "w2", "activations")
FORM_LETTERS = {"values hidden": "h", "positions hidden": "p", "clear": "c"}


@dataclass
class NodeRow:
    """One node as the operator sees it."""

    node_id: str
    name: str
    fingerprint: str
    address: str = ""
    # connected | working | waiting | paused | standby | lost (left mid-run) | quarantined (lied)
    # | done (run finished) | left (coordinator stopped)
    state: str = "connected"
    batches_done: int = 0
    outstanding: int = 0
    rate: float = 0.0  # batches per second, recent
    last_seen: float = 0.0  # time.time()
    reissued: int = 0
    refused: int = 0
    exposure: dict[str, float] = field(default_factory=dict)  # tensor -> share of elements seen (0..1)
    forms: dict[str, str] = field(default_factory=dict)  # tensor -> weakest form received (ledger.FORMS)
    quarantine: str = ""  # why the node's key is quarantined (its last wrong result), "" if it is not
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
    join_notes: list[str] = field(default_factory=list)  # what to know about those lines (loopback, CODE)
    admission: str = ""  # who may join: "who may join: invite codes ..." ("" when not said)
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
    exposure_bound: float = 1.0  # the share each node may hold of the images' pixels and of w1 (enforced)
    bound_raised: bool = False  # the operator allowed more than one block per node (--max-exposure)
    nodes: dict[str, NodeRow] = field(default_factory=dict)
    epochs: list[EpochRow] = field(default_factory=list)
    versions: list[VersionRow] = field(default_factory=list)
    log: deque = field(default_factory=lambda: deque(maxlen=500))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class CoordinatorControl(PauseStop):
    """What a presenter may ask of a running coordinator. Thread-safe; the loop polls it.

    `request_stop` is graceful: the loop finishes the current step, writes a model version and
    tells nodes BYE."""

    def __init__(self) -> None:
        super().__init__()
        self._readmit_lock = threading.Lock()
        self._readmits: list[str | None] = []

    def readmit(self, which: str | None = None) -> None:
        """Ask the server to lift the quarantine of the node labelled or fingerprinted `which`
        (None: every quarantined node). Safe from any thread and from a signal handler's thread."""
        with self._readmit_lock:
            self._readmits.append(which)

    def take_readmits(self) -> list[str | None]:
        with self._readmit_lock:
            taken, self._readmits = self._readmits, []
        return taken

    def pause(self) -> None:
        self._pause.set()

    def resume(self) -> None:
        self._pause.clear()
