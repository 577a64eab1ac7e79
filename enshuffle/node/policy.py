"""A volunteer's preferences for when and how hard the node computes (BOINC-style).

* `max_cpu`: a percentage; after a batch that took t seconds the node rests t * (100/p - 1)
  seconds before starting the next, so computing takes at most p% of its time (heartbeats
  keep flowing while it rests).
* `window`: a daily local-time window ("22:00-07:00" wraps past midnight); outside it the
  node is paused (credit 0, as the p key does), so the coordinator hands its share to others.

Process priority (`--nice`) is applied by `enshuffle node` itself, with os.nice, at start.
Nothing here imports numpy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


class PolicyError(ValueError):
    """A preference value that cannot be used; the message names it and the expected form."""


def _minutes(text: str) -> int:
    hours, sep, minutes = text.partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit() or len(minutes) != 2:
        raise PolicyError(f"expected HH:MM, got {text!r}")
    h, m = int(hours), int(minutes)
    if h > 23 or m > 59:
        raise PolicyError(f"expected a time 00:00..23:59, got {text!r}")
    return 60 * h + m


def parse_window(text: str) -> tuple[int, int]:
    """'22:00-07:00' -> (1320, 420), minutes after midnight; start == end is refused."""
    start, sep, end = text.partition("-")
    if not sep:
        raise PolicyError(f"expected a window HH:MM-HH:MM such as 22:00-07:00, got {text!r}")
    window = _minutes(start.strip()), _minutes(end.strip())
    if window[0] == window[1]:
        raise PolicyError(f"the window {text!r} is empty; leave --hours out to compute at any time")
    return window


def in_window(window: tuple[int, int], minute_of_day: int) -> bool:
    start, end = window
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end  # wraps past midnight


@dataclass
class Policy:
    max_cpu: int = 100
    window: tuple[int, int] | None = None
    window_text: str = ""

    @classmethod
    def from_args(cls, max_cpu: int = 100, hours: str | None = None) -> "Policy":
        return cls(max_cpu=max_cpu, window=parse_window(hours) if hours else None, window_text=hours or "")

    def rest_after(self, compute_seconds: float) -> float:
        """Seconds to rest after a batch that took `compute_seconds`."""
        if self.max_cpu >= 100:
            return 0.0
        return max(0.0, compute_seconds) * (100.0 / self.max_cpu - 1.0)

    def outside_hours(self, now: float | None = None) -> str | None:
        """Why the node must not compute now ('outside the hours 22:00-07:00'), or None."""
        if self.window is None:
            return None
        t = time.localtime(time.time() if now is None else now)
        if in_window(self.window, 60 * t.tm_hour + t.tm_min):
            return None
        return f"outside the hours {self.window_text} (--hours): contributing again at {self.window_text.split('-')[0]}"
