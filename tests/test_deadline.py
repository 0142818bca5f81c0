"""`server.deadline.Deadline`: asyncio.timeout's result for repeated waits, with one timer."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.deadline import Deadline


class CountingLoop:
    """The running loop, with the timers Deadline arms counted (and kept, to see them)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.handles: list[asyncio.TimerHandle] = []

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Any) -> asyncio.TimerHandle:
        handle = self.loop.call_at(when, callback)
        self.handles.append(handle)
        return handle

    def armed(self) -> int:
        return sum(not h.cancelled() and h.when() > self.loop.time() for h in self.handles)


async def test_a_wait_past_its_deadline_raises_timeout_and_the_task_runs_on() -> None:
    deadline = Deadline()
    with pytest.raises(TimeoutError):
        async with deadline.within(0.02):
            await asyncio.sleep(5)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0   # the cancel was taken back
    await asyncio.sleep(0.01)                              # and nothing else is cancelled
    async with deadline.within(1.0):                       # the next wait is a fresh one
        await asyncio.sleep(0)
    deadline.close()


async def test_many_quick_waits_arm_one_timer() -> None:
    loop = CountingLoop()
    deadline = Deadline(loop)   # type: ignore[arg-type]
    for _ in range(1000):   # as the socket's writer: each send done at once, 5 s allowed
        async with deadline.within(5.0):
            await asyncio.sleep(0)
    assert len(loop.handles) == 1 and loop.armed() == 1
    deadline.close()
    assert loop.armed() == 0


async def test_a_deadline_moved_later_is_not_cut_short_by_the_earlier_timer() -> None:
    loop = CountingLoop()
    deadline = Deadline(loop)   # type: ignore[arg-type]
    async with deadline.within(0.03):
        pass
    started = loop.time()
    async with deadline.within(0.3):   # the timer armed for +0.03 fires first, and re-arms
        await asyncio.sleep(0.12)
    assert loop.time() - started >= 0.1
    assert len(loop.handles) == 2
    with pytest.raises(TimeoutError):
        async with deadline.within(0.05):
            await asyncio.sleep(5)
    deadline.close()


async def test_an_earlier_deadline_than_the_armed_timer_arms_its_own() -> None:
    loop = CountingLoop()
    deadline = Deadline(loop)   # type: ignore[arg-type]
    async with deadline.within(60.0):
        pass
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadline.within(0.05):
            await asyncio.sleep(5)
    assert 0.04 <= loop.time() - started < 1.0
    assert loop.armed() == 0   # the 60 s timer was replaced, not left behind
    deadline.close()


async def test_a_timer_that_fires_between_waits_cancels_nothing() -> None:
    deadline = Deadline()
    async with deadline.within(0.01):
        pass
    await asyncio.sleep(0.1)   # the timer fires here, with no wait in progress
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    async with deadline.within(1.0):
        await asyncio.sleep(0.02)
    deadline.close()


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def waiter(deadline_s: float) -> None:
        deadline = Deadline()
        try:
            async with deadline.within(deadline_s):
                await asyncio.sleep(5)
        finally:
            deadline.close()

    task = asyncio.create_task(waiter(5.0))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_waits_cannot_be_nested() -> None:
    deadline = Deadline()
    with pytest.raises(RuntimeError, match="nested"):
        async with deadline.within(1.0):
            async with deadline.within(1.0):
                pass
    deadline.close()
