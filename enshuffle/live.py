"""Live state shared between a back-end thread and its presenters (log lines, the TUIs).

A state dataclass mixes in `LiveState` (a `lock` and a `log` field): the back-end writes under
the lock, a presenter copies it with `snapshot()` on its own timer. A control mixes in
`PauseStop`: thread-safe flags the back-end polls at safe points.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from dataclasses import fields


class LiveState:
    lock: threading.Lock
    log: deque[str]  # declared by the dataclass

    def add_log(self, line: str) -> None:
        with self.lock:
            self.log.append(f"{time.strftime('%H:%M:%S')} {line}")

    def snapshot(self):
        """A deep copy taken under the lock (with a fresh lock of its own), safe to read anywhere."""
        with self.lock:
            values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "lock"}
        return type(self)(**values)


class PauseStop:
    def __init__(self) -> None:
        self._pause = threading.Event()
        self._stop = threading.Event()

    def toggle_pause(self) -> bool:
        """Flip pause; returns True when now paused."""
        if self._pause.is_set():
            self._pause.clear()
            return False
        self._pause.set()
        return True

    @property
    def paused(self) -> bool:
        return self._pause.is_set()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()
