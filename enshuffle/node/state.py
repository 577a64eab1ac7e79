"""The node's live state as plain Python objects, for presenters (log lines, the node TUI).

The node daemon writes here under `lock`; a presenter reads a `snapshot()` on a timer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from enshuffle.live import LiveState, PauseStop


@dataclass
class NodeState(LiveState):
    connect: str = ""
    name: str = ""
    own_fingerprint: str = ""
    coordinator_fingerprint: str = ""
    trust: str = ""  # pinned | trusted-on-first-use | known | "" before the first WELCOME
    run_id: str = ""
    # starting | connecting | connected | working | idle | reconnecting | refused | stopped
    connection: str = "starting"
    reason: str = ""  # why idle/refused: "waiting for work", "reconnecting in 4 s", "refused: fingerprint mismatch"
    current_op: str = ""  # e.g. "matmul (30000x392)·(392x128)"
    batches_done: int = 0
    rate: float = 0.0  # batches per second, recent
    bytes_in: int = 0
    bytes_out: int = 0
    refusals: int = 0
    threads: int = 1
    paused: bool = False
    exposure: dict[str, float] = field(default_factory=dict)  # tensor -> share of its elements on this machine
    started_at: float = field(default_factory=time.time)
    log: deque = field(default_factory=lambda: deque(maxlen=500))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class NodeControl(PauseStop):
    """What a presenter may ask of a running node. Thread-safe; the daemon polls it.

    `request_stop` quits: the daemon says BYE so its batches are reissued at once."""

    def __init__(self, threads: int = 1) -> None:
        super().__init__()
        self.threads = threads

    def set_threads(self, threads: int) -> None:
        self.threads = max(1, int(threads))
