"""A socket's outgoing queue: every message to one client goes through it, in order.

Producers (the read loop, each stream's encoder task, shutdown) only append, never await, so no
coroutine ever waits for another peer's send. One writer task per socket (`Outbox.run`) sends
the queue out, WebSocket pings and pongs included. A client that stops reading is detected
three ways: more than `max_messages` wait in the queue, or the oldest message has waited
`max_lag_s` (including a send blocked on a full TCP buffer); either raises `SlowConsumer` from
the writer. And, as the kernel's buffers hide a stopped reader for minutes at Opus bitrates, a
`LagProbe` times pings sent behind the audio: the read loop raises `SlowConsumer` when one goes
unanswered for `max_lag_s`. The session drops that one socket.

A message can hold its place before it is written (`reserve`): `cancelled` waits there for the
scheduler's final usage of the stream while what is queued behind it for the same context (a
new stream's `ready` on that ctx) keeps its order. The messages of other contexts, and pings
and pongs, go on past it meanwhile (the protocol orders messages within a context only).
The writer waits for it at most `wait_s`, then sends the fallback it was given, so a reservation
can delay the socket's other messages but never stall them.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .deadline import Deadline

log = logging.getLogger(__name__)


class SlowConsumer(Exception):
    """The client does not read fast enough; its socket must be closed."""


@dataclass(slots=True)
class _Item:
    data: bytes | None  # None: reserved, not written yet (`Reservation`)
    queued_at: float  # clock seconds, to measure how far behind the client is
    stream_id: str | None  # set for a stream's phrase/words/audio, so a cancel can drop them
    ctx: str | None = None  # the context it is about (None: none, or not known)
    control: str | None = None  # "ping" or "pong": a control frame with `data` as its payload
    fallback: bytes = b""  # a reserved message: sent instead if not filled by `until`
    until: float = 0.0  # (clock seconds)
    what: str = ""  # a reserved message, as the warning about its fallback names it


class Reservation:
    """A message's place in an `Outbox`, written later by `fill` (once; later fills and a
    fill after the writer gave up on it are ignored)."""

    __slots__ = ("_outbox", "_item")

    def __init__(self, outbox: Outbox, item: _Item) -> None:
        self._outbox, self._item = outbox, item

    def fill(self, data: bytes) -> None:
        if self._item.data is None:
            self._item.data = data
            self._outbox._wake.set()


class Outbox:
    """Bounded FIFO of encoded messages, drained by `run()` (one task per socket)."""

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        *,
        max_messages: int,
        max_lag_s: float,
        control: Callable[[str, bytes], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._send = send
        self._control = control
        self._max_messages = max_messages
        self._max_lag_s = max_lag_s
        self._clock = clock
        self._items: collections.deque[_Item] = collections.deque()
        self._wake = asyncio.Event()  # set when items arrive or overflow is detected
        self._idle = asyncio.Event()  # set while nothing is queued or being sent
        self._idle.set()
        self._overflow = False
        self._pong: _Item | None = None  # a pong queued and not sent yet

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: bytes, *, stream_id: str | None = None, ctx: str | None = None) -> None:
        """Queue one message (never blocks). Overflow is reported by the writer task. `ctx`:
        the context it is about, for the messages that may pass a reservation."""
        if len(self._items) >= self._max_messages:
            # Keep nothing more: the writer raises SlowConsumer as soon as it wakes.
            self._overflow = True
            self._wake.set()
        else:
            self._append(_Item(data, self._clock(), stream_id, ctx=ctx))

    def reserve(self, fallback: bytes, *, ctx: str, wait_s: float,
                what: str = "a reserved message") -> Reservation:
        """Hold the place of a message about `ctx` now and write it later
        (`Reservation.fill`); the writer waits for it at most `wait_s` and then sends
        `fallback` instead. Until then the messages put with another `ctx`, and control
        frames, are sent past it; the others (that ctx's, and those about none) wait behind it.
        Counts against `max_messages` like any message (a full queue is a slow consumer)."""
        now = self._clock()
        item = _Item(None, now, None, ctx=ctx, fallback=fallback, until=now + wait_s, what=what)
        if len(self._items) >= self._max_messages:
            self._overflow = True
            self._wake.set()
        else:
            self._append(item)
        return Reservation(self, item)

    def put_control(self, kind: str, payload: bytes) -> None:
        """Queue a ping or pong: sent in turn, behind what is queued (never blocks).

        At most one pong waits: a ping that comes while one does updates its payload, as RFC
        6455 5.5.3 allows (a pong for the most recent ping only). The message limit cannot
        count pongs, since pings need answers whatever is queued; unmerged, a client sending
        pings and reading nothing would grow the queue without bound until the lag check
        closed it."""
        if self._control is None:
            raise RuntimeError("this outbox sends no control frames")
        if kind == "pong" and self._pong is not None:
            self._pong.data = payload
            return
        item = _Item(payload, self._clock(), None, control=kind)
        if kind == "pong":
            self._pong = item
        self._append(item)

    def _append(self, item: _Item) -> None:
        self._items.append(item)
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
        deadline = Deadline()   # one timer for many sends: most complete at once
        try:
            while True:
                if not self._items:
                    self._idle.set()
                    self._wake.clear()
                    await self._wake.wait()
                if self._overflow:
                    raise SlowConsumer(f"more than {self._max_messages} messages queued")
                if not self._items:   # purged since it woke
                    continue
                item = self._next()
                if item is None:   # an unwritten reservation holds everything queued
                    await self._await_reserved(self._items[0])
                    continue   # an overflow may have come meanwhile
                if item is self._pong:
                    self._pong = None
                await self._send_one(item, deadline)
        finally:
            deadline.close()

    def _next(self) -> _Item | None:
        """Take the next message to send: the head, or while unwritten reservations lead the
        queue, the first message that may pass all of those before it (None: none may)."""
        head = self._items[0]
        if head.data is not None:
            return self._items.popleft()
        holding: set[str | None] = set()   # the contexts of the reservations before it
        for i, item in enumerate(self._items):
            if item.data is None:
                holding.add(item.ctx)
            elif item.control is not None or (item.ctx is not None
                                              and item.ctx not in holding):
                del self._items[i]
                return item
        return None

    async def _await_reserved(self, item: _Item) -> None:
        """Wait until the reserved head `item` is filled, or past its time: then it carries
        its fallback. Wakes for other puts too (the caller checks overflow in between)."""
        left = item.until - self._clock()
        if left > 0:
            self._wake.clear()
            try:
                async with asyncio.timeout(left):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if item.data is None and self._clock() < item.until:
                return   # woken by something else: look again
        if item.data is None:
            item.data = item.fallback
            log.warning("%s was not written in time; it goes out as it was reserved",
                        item.what)

    async def _send_one(self, item: _Item, deadline: Deadline) -> None:
        budget = self._max_lag_s - (self._clock() - item.queued_at)
        if budget <= 0:
            raise SlowConsumer(f"a message waited over {self._max_lag_s:g} s to be sent")
        try:
            # A client that does not read fills the TCP buffers, and then the send blocks.
            async with deadline.within(budget):
                if item.control is None:
                    assert item.data is not None, "a reserved item is sent once filled"
                    await self._send(item.data)
                else:
                    assert self._control is not None
                    await self._control(item.control, item.data)
        except TimeoutError:
            raise SlowConsumer(f"a send stayed blocked for {budget:.1f} s") from None


# How often a socket with a live stream is pinged to time how far behind its client reads.
LAG_PROBE_INTERVAL_S = 1.0
_PROBE_BYTES = 8


class LagProbe:
    """How far behind a client reads, timed with WebSocket pings queued behind its audio.

    A ping's pong comes back only once the client has read everything sent before the ping
    (clients answer pings as they read them: browsers in their network stack), so the age of
    the oldest unanswered ping is how far behind the client is. Its payload is a sequence
    number; pongs that carry another payload (aiohttp's heartbeat) are not this probe's.
    Plain bookkeeping: the session sends the pings (`next_ping`) and feeds the pongs.
    """

    def __init__(self, *, interval_s: float = LAG_PROBE_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._sent: collections.deque[tuple[int, float]] = collections.deque()
        self._seq = 0
        self._last_sent = float("-inf")

    def due(self, now: float) -> bool:
        return now - self._last_sent >= self._interval_s

    def next_ping(self, now: float) -> bytes:
        """The payload of a new ping sent now."""
        self._seq += 1
        self._sent.append((self._seq, now))
        self._last_sent = now
        return self._seq.to_bytes(_PROBE_BYTES, "big")

    def answered(self, payload: bytes, now: float) -> float | None:
        """A pong came: the lag it measured (seconds), or None if it was not this probe's."""
        if len(payload) != _PROBE_BYTES:
            return None
        seq = int.from_bytes(payload, "big")
        sent_at = None
        while self._sent and self._sent[0][0] <= seq:
            _, sent_at = self._sent.popleft()   # earlier pings are answered by this one too
        return None if sent_at is None else now - sent_at

    def behind_s(self, now: float) -> float:
        """How long the oldest ping has waited for its pong (0: none outstanding)."""
        return now - self._sent[0][1] if self._sent else 0.0

    def next_check(self, now: float, *, max_lag_s: float, pinging: bool = True) -> float:
        """Seconds until the next ping is due (if `pinging`) or the oldest would be overdue."""
        wait = self._last_sent + self._interval_s - now if pinging else float("inf")
        if self._sent:
            wait = min(wait, self._sent[0][1] + max_lag_s - now)
        return wait
