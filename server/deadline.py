"""A timeout for one task's repeated waits that keeps one timer armed between them.

`asyncio.timeout()` builds a context object and arms a loop timer on every entry, and cancels
the timer on every exit: about 6-7 µs a wait on uvloop. The socket's writer enters one per
message sent and its reader one per message read, so at thousands of messages a second that
was a measurable part of the event loop (BENCHMARKS.md, "A first phrase on its way; waits
without a timer each").

`Deadline` gives the same result (the wait is cancelled at its deadline and `TimeoutError`
raised from the `async with`) with one timer for many waits. A wait whose deadline is no earlier
than the timer already armed arms nothing; a timer that fires early (the deadline moved later
since) arms itself again for the current deadline, and one that fires with no wait in progress
is dropped. A socket's writer, whose sends almost always complete at once with a deadline
seconds away, thus arms about one timer per `max_send_lag_s` instead of one per message.

One `Deadline` serves one task: the one running its first `async with`. `close()` drops its
timer (the owner calls it when it stops, so no timer outlives the socket).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

# uvloop's timers are whole milliseconds and may run a fraction of one early: a timer within
# this of the deadline counts as on time (asyncio itself runs timers within its clock
# resolution).
_EARLY_S = 0.001


class Deadline:
    """`async with deadline.within(seconds):` or `deadline.at(when)` (the loop's clock), like
    `asyncio.timeout`, for one task's waits one after another (never nested)."""

    __slots__ = ("_loop", "_task", "_when", "_handle", "_active", "_expired", "_cancelling")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._when = 0.0                 # the deadline of the wait in progress (or the last)
        self._handle: asyncio.TimerHandle | None = None   # the armed timer
        self._active = False             # a wait is in progress
        self._expired = False            # this wait's task was cancelled by the timer
        self._cancelling = 0             # the task's cancel requests when the wait began

    def within(self, seconds: float) -> Deadline:
        """The next wait ends at the latest `seconds` from now."""
        self._when = self._loop.time() + seconds
        return self

    def at(self, when: float) -> Deadline:
        """The next wait ends at the latest at `when`, on the loop's clock."""
        self._when = when
        return self

    async def __aenter__(self) -> Deadline:
        if self._active:
            raise RuntimeError("Deadline waits cannot be nested")
        task = self._task
        if task is None:
            task = self._task = asyncio.current_task()
            if task is None:
                raise RuntimeError("Deadline must be used inside a task")
        self._cancelling = task.cancelling()
        self._active = True
        if self._handle is None or self._handle.when() > self._when:
            self._arm(self._when)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self._active = False
        if self._expired:
            self._expired = False
            assert self._task is not None
            # As asyncio.timeout: a cancel that came from elsewhere as well is not swallowed.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def close(self) -> None:
        """Drop the armed timer, if any (the owner has stopped waiting for good)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self._active:
            return   # no wait in progress: the next one arms a timer of its own
        if self._loop.time() + _EARLY_S < self._when:
            self._arm(self._when)   # the deadline moved later since the timer was armed
            return
        assert self._task is not None
        self._expired = True
        self._task.cancel()
