"""The refused-streams log: one line each up to a limit per window, then one summary line."""

from __future__ import annotations

import logging

import pytest

from server import refusal_log
from server.refusal_log import RefusalLog

LOGGER = "tests.refusals"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[tuple[float, object]] = []

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, fn) -> None:
        self.timers.append((self.now + delay, fn))

    def advance(self, seconds: float) -> None:
        """Move time on, running the timers that fall due, as the event loop would."""
        self.now += seconds
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, fn in sorted(due, key=lambda t: t[0]):
            fn()


def make(limit: int) -> tuple[RefusalLog, Clock]:
    clock = Clock()
    log = RefusalLog(logging.getLogger(LOGGER), limit, clock=clock, call_later=clock.call_later)
    return log, clock


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_under_the_limit_every_refusal_has_its_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log, clock = make(limit=3)
    for i in range(3):
        log.refused("load", "stream refused peer=%s", f"p{i}")
    clock.advance(60)
    assert lines(caplog) == [f"stream refused peer=p{i}" for i in range(3)]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    assert clock.timers == []


def test_a_flood_is_summed_up_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log, clock = make(limit=2)
    for i in range(7):
        log.refused("max_streams" if i % 3 else "load", "refused %d", i)
        clock.advance(0.5)
    # Within the window: the first two in full, the rest held back.
    assert lines(caplog) == ["refused 0", "refused 1"]
    clock.advance(refusal_log.WINDOW_S)
    summary = lines(caplog)[2:]
    assert len(summary) == 1
    assert summary[0].startswith("5 more stream(s) refused in 10 s")
    assert "max_streams 3, load 2" in summary[0]
    assert "admission.refusal_log_lines = 2" in summary[0]
    # A new window logs in full again, and a quiet one logs nothing more.
    log.refused("load", "refused %d", 7)
    clock.advance(3 * refusal_log.WINDOW_S)
    assert lines(caplog)[3:] == ["refused 7"]


def test_the_summary_comes_even_if_the_refusals_stop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log, clock = make(limit=0)   # summaries only
    log.refused("vram", "refused")
    log.refused("vram", "refused")
    assert lines(caplog) == []
    assert len(clock.timers) == 1, "one timer per window, however many are held back"
    clock.advance(refusal_log.WINDOW_S)
    assert len(lines(caplog)) == 1 and lines(caplog)[0].startswith("2 more stream(s)")


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="limit"):
        RefusalLog(logging.getLogger(LOGGER), -1)
