"""Pure text formatting for the TUIs: durations, ages, byte counts, text bars, ETA, log deltas.

Everything here is a small pure function of plain values so it can be tested without Textual,
and so both apps render numbers the same way. Bars are plain characters (not colour) so the
screens stay readable on a monochrome terminal or in a screenshot.
"""

from __future__ import annotations

from collections.abc import Sequence

# The tensors the console draws the exposure bound on. The coordinator bounds more than these:
# every kind a node serves one block of (the images, each layer's weights, each hidden layer's
# activations; enshuffle.coordinator.scheduling.bounded_kinds), each against its own limit. The
# console is told one limit, CoordinatorState.exposure_bound (the images'), which w1 shares: both
# are split over the same pixel blocks. The other kinds are shown without a mark.
BOUNDED_TENSORS = ("images", "w1")

FULL = "█"
EMPTY = "░"
BOUND_MARK = "┃"


def fmt_duration(seconds: float | None) -> str:
    """12.3 -> '12s', 125 -> '2m05s', 3725 -> '1h02m'; None or negative -> '–'."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def fmt_clock(seconds: float) -> str:
    """Elapsed time as H:MM:SS (hours grow past 99 if they must)."""
    s = max(0, int(seconds))
    return f"{s // 3600}:{(s % 3600) // 60:02d}:{s % 60:02d}"


def fmt_age(now: float, then: float) -> str:
    """How long ago `then` was, compactly: 'now', '4s', '2m05s'; 'never' for a zero timestamp."""
    if not then:
        return "never"
    age = now - then
    if age < 1:
        return "now"
    return fmt_duration(age)


def fmt_bytes(n: int | float) -> str:
    """Binary units, three significant digits: 1536 -> '1.50 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_rate(per_second: float) -> str:
    return f"{per_second:.1f}/s" if per_second < 100 else f"{per_second:.0f}/s"


def fmt_share(share: float | None) -> str:
    """A share 0..1 as a percentage; '–' when the tensor was never seen."""
    if share is None:
        return "–"
    return f"{100 * share:.1f}%"


def fmt_accuracy(acc: float | None) -> str:
    return "–" if acc is None else f"{acc:.4f}"


def short_id(value: str | None, n: int = 8) -> str:
    """Fingerprints and version ids are long hex strings; operators compare the first few."""
    if not value:
        return "–"
    return value[:n]


def short_fp(value: str | None, groups: int = 2) -> str:
    """A key fingerprint shortened for display: its first `groups` dash-separated groups
    ("SHA256:KZDV-VJ2U-..." -> "KZDV-VJ2U"), or 4*groups characters of a bare hex id."""
    if not value:
        return "–"
    body = value.split(":", 1)[-1]
    if "-" in body:
        return "-".join(body.split("-")[:groups])
    return body[: 4 * groups]


def text_bar(fraction: float, width: int) -> str:
    """A progress bar of `width` characters, full blocks for the done part."""
    width = max(1, width)
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width))
    return FULL * filled + EMPTY * (width - filled)


def share_bar(share: float, width: int, bound: float | None = None) -> str:
    """A bar for an exposure share with the bound marked by '┃' at its position.

    The mark stays visible whether the bar has reached it or not, so an operator sees the
    distance to the bound without colour. A share over the bound is flagged by the caller in
    words ("OVER"), never only by the bar.
    """
    bar = list(text_bar(share, width))
    if bound is not None and 0.0 < bound < 1.0:
        pos = min(width - 1, int(round(bound * width)))
        bar[pos] = BOUND_MARK
    return "".join(bar)


def over_bound(exposure: dict[str, float], bound: float) -> list[str]:
    """The bounded tensors whose share is above the bound, in BOUNDED_TENSORS order."""
    return [t for t in BOUNDED_TENSORS if exposure.get(t, 0.0) > bound]


def progress_fraction(epoch: int, step: int, epochs_total: int, steps_per_epoch: int) -> float:
    """Share of the whole run done, counting steps inside the current epoch."""
    if epochs_total <= 0:
        return 0.0
    within = step / steps_per_epoch if steps_per_epoch > 0 else 0.0
    return min(1.0, (epoch + within) / epochs_total)


def eta_seconds(
    elapsed: float,
    epoch: int,
    step: int,
    epochs_total: int,
    steps_per_epoch: int,
    epoch_seconds: Sequence[float] = (),
) -> float | None:
    """Seconds left in the run, or None when there is nothing to base a guess on.

    Prefers the mean duration of finished epochs (it excludes time spent waiting for nodes
    before training started); falls back to extrapolating the elapsed time.
    """
    done = progress_fraction(epoch, step, epochs_total, steps_per_epoch)
    if done >= 1.0:
        return 0.0
    if epochs_total <= 0:
        return None
    remaining_epochs = epochs_total * (1.0 - done)
    if epoch_seconds:
        return remaining_epochs * (sum(epoch_seconds) / len(epoch_seconds))
    if done <= 0.0:
        return None
    return elapsed * (1.0 - done) / done


def new_log_lines(previous: Sequence[str], current: Sequence[str]) -> list[str]:
    """The lines of `current` that were not in `previous`.

    The back-end keeps its log in a bounded deque, so between two snapshots old lines fall off
    the front and new ones arrive at the back: current == previous[d:] + added. Find the
    smallest drop d for which that holds (the most overlap); if none does, the log moved on
    by more than its length and every current line is new.
    """
    prev = list(previous)
    cur = list(current)
    if not prev:
        return cur
    if len(cur) >= len(prev) and cur[: len(prev)] == prev:
        return cur[len(prev) :]  # fast path: nothing dropped
    for drop in range(1, len(prev)):
        kept = len(prev) - drop
        if kept <= len(cur) and prev[drop] == cur[0] and prev[drop:] == cur[:kept]:
            return cur[kept:]
    return cur


def verification_marks(version_ids: Sequence[str], ok: bool, message: str) -> dict[str, bool]:
    """Which versions a chain check vouches for, given the ids checked (oldest first).

    A passing check marks every version checked. A failing check that names a version (full id
    or its first 8+ characters) marks the versions before it verified and it and everything
    after it failed: a broken link invalidates all later versions. A failing check that names
    none marks all of them failed, since it is unknown where the chain broke.
    """
    ids = list(version_ids)
    if ok:
        return {v: True for v in ids}
    text = message.lower()
    first_bad = next(
        (i for i, v in enumerate(ids) if v and (v.lower() in text or v[:8].lower() in text)),
        None,
    )
    if first_bad is None:
        return {v: False for v in ids}
    return {v: i < first_bad for i, v in enumerate(ids)}
