"""One log line per refused stream, up to a limit per window; past it, one summary line.

A refused stream is a lifecycle event and gets its line like an opened one. But a flood of
refusals (a client retrying in a tight loop, a burst of thousands, an attack) would write as many
lines, each one synchronously on the event loop that every stream shares. So each window of
`WINDOW_S` logs its first `limit` refusals in full; the rest are counted by reason, and when the
window closes one line says how many were left out. `tts_streams_refused_total` on /metrics
counts every refusal either way.

Event loop only (like everything that refuses streams).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable

WINDOW_S = 10.0


class RefusalLog:
    def __init__(self, logger: logging.Logger, limit: int, *,
                 clock: Callable[[], float] = time.monotonic,
                 call_later: Callable[[float, Callable[[], None]], object] | None = None) -> None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self._log = logger
        self._limit = limit
        self._clock = clock
        self._call_later = call_later
        self._window_start = float("-inf")
        self._logged = 0
        self._left_out: collections.Counter[str] = collections.Counter()
        self._summary_due = False

    def refused(self, reason: str, msg: str, *args: object) -> None:
        """Log `msg % args` at INFO unless this window's limit is spent; `reason` is the short
        cause that the summary counts ("load", "max_streams", ...)."""
        now = self._clock()
        if now - self._window_start >= WINDOW_S:
            self.flush()
            self._window_start, self._logged = now, 0
        if self._logged < self._limit:
            self._logged += 1
            self._log.info(msg, *args)
            return
        self._left_out[reason] += 1
        if not self._summary_due:
            self._summary_due = True
            delay = max(0.0, self._window_start + WINDOW_S - now)
            schedule = self._call_later or asyncio.get_running_loop().call_later
            schedule(delay, self.flush)

    def flush(self) -> None:
        """Log the summary of the refusals left out so far (none: nothing)."""
        self._summary_due = False
        if not self._left_out:
            return
        total = sum(self._left_out.values())
        by_reason = ", ".join(f"{reason} {n}" for reason, n in self._left_out.most_common())
        self._log.info("%d more stream(s) refused in %.0f s, not logged one by one (%s); "
                       "the limit is admission.refusal_log_lines = %d per %.0f s",
                       total, WINDOW_S, by_reason, self._limit, WINDOW_S)
        self._left_out.clear()
