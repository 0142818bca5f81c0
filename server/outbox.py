"""A socket's outgoing queue: every message to one client goes through it, in order.

Producers (the read loop, each stream's encoder task, shutdown) only append, never await, so no
coroutine ever waits for another peer's send. One writer task per socket (`Outbox.run`) sends
the queue out. A client that stops reading is detected two ways: more than `max_messages` wait in
the queue, or the oldest message has waited `max_lag_s` (including a send blocked on a full TCP
buffer). Either raises `SlowConsumer` from the writer, and the session drops that one socket.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


class SlowConsumer(Exception):
    """The client does not read fast enough; its socket must be closed."""


@dataclass(slots=True)
class _Item:
    data: bytes
    queued_at: float  # clock seconds, to measure how far behind the client is
    stream_id: str | None  # set for a stream's phrase/words/audio, so a cancel can drop them


class Outbox:
    """Bounded FIFO of encoded messages, drained by `run()` (one task per socket)."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        *,
        max_messages: int,
        max_lag_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._max_messages = max_messages
        self._max_lag_s = max_lag_s
        self._clock = clock
        self._items: collections.deque[_Item] = collections.deque()
        self._wake = asyncio.Event()  # set when items arrive or overflow is detected
        self._idle = asyncio.Event()  # set while nothing is queued or being sent
        self._idle.set()
        self._overflow = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: bytes, *, stream_id: str | None = None) -> None:
        """Queue one message (never blocks). Overflow is reported by the writer task."""
        if len(self._items) >= self._max_messages:
            # Keep nothing more: the writer raises SlowConsumer as soon as it wakes.
            self._overflow = True
        else:
            self._items.append(_Item(data, self._clock(), stream_id))
            self._idle.clear()
        self._wake.set()

    def purge(self, stream_id: str) -> int:
        """Drop a stream's messages not yet sent (barge-in: its audio must stop at once)."""
        kept = collections.deque(item for item in self._items if item.stream_id != stream_id)
        dropped = len(self._items) - len(kept)
        self._items = kept
        return dropped

    async def drained(self, timeout: float) -> bool:
        """Wait until everything queued has been sent; False when `timeout` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Send until cancelled; raises SlowConsumer when the client falls behind."""
        while True:
            if not self._items:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            if self._overflow:
                raise SlowConsumer(f"more than {self._max_messages} messages queued")
            if self._items:
                await self._send_one(self._items.popleft())

    async def _send_one(self, item: _Item) -> None:
        budget = self._max_lag_s - (self._clock() - item.queued_at)
        if budget <= 0:
            raise SlowConsumer(f"a message waited over {self._max_lag_s:g} s to be sent")
        try:
            # A client that does not read fills the TCP buffers, and then the send blocks.
            async with asyncio.timeout(budget):
                await self._send(item.data)
        except TimeoutError:
            raise SlowConsumer(f"a send stayed blocked for {budget:.1f} s") from None
