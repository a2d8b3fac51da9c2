"""Rate-limited logging: a flood of the same event (bad frames from a hostile or broken peer) must
not flood the log or cost the loop that logs it much CPU.

`RateLimiter` counts hits per key in fixed windows of `interval_s`: the first `per_interval` hits
of a window are allowed, the rest are suppressed and counted. The first hit of the next window
reports how many the previous one suppressed. `LogRateLimiter` logs with it: at most
`per_interval` lines per key per window, then one summary line (`log_lines_suppressed`, with
the number) when the key shows up again in a later window, or when `flush()` is called.

What happened is never lost: the caller keeps its own exact counter (e.g. the dispatcher's
`bad_frames`, published in the node record); the log only samples it.

Keys are bounded too (a peer chooses what it sends): at most `max_keys` windows are kept; when
full, windows that ended without suppressing anything are forgotten, and if none did, the new key
shares one overflow window (`OVERFLOW_KEY`). The clock is injectable for tests.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, NamedTuple

__all__ = ["Admission", "RateLimiter", "LogRateLimiter", "OVERFLOW_KEY", "DEFAULT_PER_INTERVAL",
           "DEFAULT_INTERVAL_S"]

OVERFLOW_KEY = "<other>"
#: What meshd and workers use for bad frames: 5 lines per reason per 10 s, then a summary line.
DEFAULT_PER_INTERVAL = 5
DEFAULT_INTERVAL_S = 10.0


class Admission(NamedTuple):
    allowed: bool     # log this one
    suppressed: int   # hits suppressed under this key in its previous window (report them now)


@dataclass
class _Window:
    start: float
    allowed: int = 0
    suppressed: int = 0


class RateLimiter:
    """`per_interval` hits per key per `interval_s` window; the rest suppressed and counted."""

    def __init__(self, per_interval: int, interval_s: float, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 64):
        if not (isinstance(per_interval, int) and per_interval >= 1):
            raise ValueError(f"per_interval must be an int >= 1 (got {per_interval!r})")
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 (got {interval_s!r})")
        if not (isinstance(max_keys, int) and max_keys >= 1):
            raise ValueError(f"max_keys must be an int >= 1 (got {max_keys!r})")
        self.per_interval = per_interval
        self.interval_s = interval_s
        self.clock = clock
        self.max_keys = max_keys
        self.suppressed_total = 0
        self._windows: dict[Hashable, _Window] = {}

    def hit(self, key: Hashable) -> Admission:
        now = self.clock()
        window = self._windows.get(key)
        if window is None:
            key = self._make_room(key, now)
            window = self._windows.setdefault(key, _Window(now))
        reported = 0
        if now - window.start >= self.interval_s:
            reported = window.suppressed
            window.start, window.allowed, window.suppressed = now, 0, 0
        if window.allowed < self.per_interval:
            window.allowed += 1
            return Admission(True, reported)
        window.suppressed += 1
        self.suppressed_total += 1
        return Admission(False, reported)

    def flush(self) -> dict[Hashable, int]:
        """{key: hits suppressed} for every window that has ended with hits suppressed; those
        windows are forgotten (for callers with a periodic tick: a flood that stopped)."""
        now = self.clock()
        ended = {k: w.suppressed for k, w in self._windows.items()
                 if w.suppressed and now - w.start >= self.interval_s}
        for key in ended:
            del self._windows[key]
        return ended

    def _make_room(self, key: Hashable, now: float) -> Hashable:
        if len(self._windows) < self.max_keys:
            return key
        for old in [k for k, w in self._windows.items() if not w.suppressed and now - w.start >= self.interval_s]:
            del self._windows[old]
        if len(self._windows) < self.max_keys:
            return key
        return OVERFLOW_KEY  # may take the table to max_keys + 1, never further


class LogRateLimiter:
    """Log `event` at most `per_interval` times per key per `interval_s`; then one summary line.

        bad_frames = LogRateLimiter(log, "bad_frame_dropped")
        bad_frames.warning(exc.reason, reason=exc.reason, error=str(exc))
    """

    def __init__(self, log: Any, event: str, *, per_interval: int = DEFAULT_PER_INTERVAL,
                 interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 64):
        self.log = log
        self.event = event
        self.limiter = RateLimiter(per_interval, interval_s, clock=clock, max_keys=max_keys)

    def warning(self, key: Hashable, **fields: Any) -> bool:
        """Log `event` with `fields` at warning level unless `key` used up its lines in this
        window; return whether it was logged."""
        admission = self.limiter.hit(key)
        if admission.suppressed:
            self._summary(key, admission.suppressed)
        if admission.allowed:
            self.log.warning(self.event, **fields)
        return admission.allowed

    def flush(self) -> None:
        """Log the summary of every ended window that suppressed lines."""
        for key, suppressed in self.limiter.flush().items():
            self._summary(key, suppressed)

    def _summary(self, key: Hashable, suppressed: int) -> None:
        self.log.warning("log_lines_suppressed", suppressed_event=self.event, key=str(key), suppressed=suppressed,
                         per_interval=self.limiter.per_interval, interval_s=self.limiter.interval_s)
