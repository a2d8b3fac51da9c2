"""mesh.ratelimit with an injected clock: N lines per key per window, then one summary line with
the exact number suppressed; keys bounded."""
from __future__ import annotations

import pytest

from mesh.ratelimit import OVERFLOW_KEY, Admission, LogRateLimiter, RateLimiter

pytestmark = pytest.mark.timeout(10)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ListLog:
    """Records (event, fields) of each warning, as a structlog logger would get them."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict]] = []

    def warning(self, event: str, **fields) -> None:
        self.lines.append((event, fields))


def test_first_n_hits_of_a_window_pass_the_rest_are_counted_and_reported_next_window():
    clock = FakeClock()
    limiter = RateLimiter(3, 10.0, clock=clock)
    assert [limiter.hit("bad_magic") for _ in range(5)] == [Admission(True, 0)] * 3 + [Admission(False, 0)] * 2
    clock.now += 9.999
    assert limiter.hit("bad_magic") == Admission(False, 0)  # same window
    clock.now += 0.001
    assert limiter.hit("bad_magic") == Admission(True, 3)   # new window: the last one suppressed 3
    assert limiter.hit("bad_magic") == Admission(True, 0)
    assert limiter.suppressed_total == 3


def test_keys_have_their_own_windows():
    clock = FakeClock()
    limiter = RateLimiter(1, 5.0, clock=clock)
    assert limiter.hit("a").allowed and limiter.hit("b").allowed
    assert not limiter.hit("a").allowed and not limiter.hit("b").allowed
    clock.now += 2
    assert not limiter.hit("a").allowed
    clock.now += 3
    assert limiter.hit("a") == Admission(True, 2)
    assert limiter.hit("b") == Admission(True, 1)


def test_flush_reports_only_windows_that_ended_with_hits_suppressed():
    clock = FakeClock()
    limiter = RateLimiter(1, 10.0, clock=clock)
    for key, hits in (("quiet", 1), ("noisy", 4)):
        for _ in range(hits):
            limiter.hit(key)
    assert limiter.flush() == {}            # windows still open
    clock.now += 10
    assert limiter.flush() == {"noisy": 3}
    assert limiter.flush() == {}            # reported once
    assert limiter.hit("noisy") == Admission(True, 0)


def test_keys_are_bounded_a_flood_of_new_keys_shares_one_overflow_window():
    clock = FakeClock()
    limiter = RateLimiter(2, 10.0, clock=clock, max_keys=4)
    allowed = sum(limiter.hit(f"peer-{i}").allowed for i in range(1000))
    assert allowed == 4 + 2                 # 4 keys of their own, then 2 lines for the overflow key
    assert len(limiter._windows) <= 5 and OVERFLOW_KEY in limiter._windows
    clock.now += 10                         # windows that ended without suppressing make room again
    limiter.flush()
    assert limiter.hit("fresh").allowed


@pytest.mark.parametrize("args,message", [
    ((0, 1.0), "per_interval must be an int >= 1 (got 0)"),
    ((1, 0.0), "interval_s must be > 0 (got 0.0)"),
])
def test_bad_settings_are_refused_with_the_rule_and_the_value(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RateLimiter(*args)


def test_log_rate_limiter_logs_n_lines_then_one_summary_line_with_the_number():
    clock, log = FakeClock(), ListLog()
    limited = LogRateLimiter(log, "bad_frame_dropped", per_interval=2, interval_s=10.0, clock=clock)
    logged = [limited.warning("bad_magic", reason="bad_magic", n=i) for i in range(1000)]
    assert logged[:2] == [True, True] and not any(logged[2:])
    assert [fields["n"] for _, fields in log.lines] == [0, 1]
    clock.now += 10
    assert limited.warning("bad_magic", reason="bad_magic", n=1000)
    assert log.lines[2] == ("log_lines_suppressed", {"suppressed_event": "bad_frame_dropped", "key": "bad_magic",
                                                     "suppressed": 998, "per_interval": 2, "interval_s": 10.0})
    assert log.lines[3] == ("bad_frame_dropped", {"reason": "bad_magic", "n": 1000})
    assert len(log.lines) == 4


def test_log_rate_limiter_flush_logs_the_summary_of_a_flood_that_stopped():
    clock, log = FakeClock(), ListLog()
    limited = LogRateLimiter(log, "bad_frame_dropped", per_interval=1, interval_s=10.0, clock=clock)
    for _ in range(50):
        limited.warning("truncated")
    clock.now += 10
    limited.flush()
    assert log.lines[-1][0] == "log_lines_suppressed" and log.lines[-1][1]["suppressed"] == 49
