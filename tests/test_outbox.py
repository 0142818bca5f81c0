"""A socket's outbox (`server.outbox.Outbox`) against a plain model of it, under any sequence of
messages, pings, pongs, purges (barge-in), reserved messages written later (a `cancelled`
awaiting its usage) and sends that complete one at a time (hypothesis).

The model: one FIFO; the writer takes the head, once it is written, or else the first item
that may pass every unwritten reservation before it (a control frame, or a message about a
context none of those is about), and holds it until its send completes; `purge` drops a stream's messages still in the FIFO (not the one being sent); a pong
joins the FIFO unless one is waiting there, which then carries the newest payload instead.
Whatever the sequence, the client receives exactly what the model says, in its order, and the
outbox reports itself drained once everything was sent. A reservation not written in time goes
out as its fallback (a test of its own below).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.outbox import Outbox, Reservation, SlowConsumer

OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from([None, "s1", "s2"]),
              st.sampled_from([None, "a", "b"])),
    st.tuples(st.sampled_from(["ping", "pong"])),
    st.tuples(st.just("purge"), st.sampled_from(["s1", "s2"])),
    st.tuples(st.just("send"), st.integers(1, 3)),
    st.tuples(st.just("reserve"), st.sampled_from(["a", "b"])),
    st.tuples(st.just("fill"), st.integers(0, 3)),
), max_size=40)


@dataclass
class _Item:
    kind: str          # "binary", "ping" or "pong"
    payload: bytes | None   # None: reserved, not written yet
    stream: str | None = None
    ctx: str | None = None


async def _settle() -> None:
    """Let the writer run until it waits (for a send to complete, or for messages)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _play(ops: list[tuple]) -> None:
    gate = asyncio.Semaphore(0)      # each release lets one send complete
    sent: list[tuple[str, bytes]] = []

    async def send(data: bytes) -> None:
        await gate.acquire()
        sent.append(("binary", data))

    async def control(kind: str, payload: bytes) -> None:
        await gate.acquire()
        sent.append((kind, payload))

    outbox = Outbox(send, max_messages=1000, max_lag_s=60.0, control=control)
    writer = asyncio.create_task(outbox.run())
    queue: list[_Item] = []          # the model's FIFO, after the item in flight
    in_flight: _Item | None = None
    expected: list[tuple[str, bytes]] = []
    numbers = itertools.count()
    reserved: list[tuple[Reservation, _Item]] = []   # not written yet, oldest first

    def take() -> None:              # the model's writer, when free, takes the first item
        nonlocal in_flight           # that may pass every unwritten reservation before it
        if in_flight is not None:
            return
        holding: set[str | None] = set()
        for i, item in enumerate(queue):
            if item.payload is None:
                holding.add(item.ctx)
            elif (not holding or item.kind != "binary"
                  or (item.ctx is not None and item.ctx not in holding)):
                in_flight = queue.pop(i)
                return

    try:
        for op in ops:
            if op[0] == "put":
                item = _Item("binary", f"m{next(numbers)}".encode(), op[1], ctx=op[2])
                outbox.put(item.payload, stream_id=item.stream, ctx=item.ctx)
                queue.append(item)
            elif op[0] in ("ping", "pong"):
                payload = f"{op[0]}{next(numbers)}".encode()
                outbox.put_control(op[0], payload)
                waiting = next((i for i in queue if i.kind == "pong"), None)
                if op[0] == "pong" and waiting is not None:
                    waiting.payload = payload
                else:
                    queue.append(_Item(op[0], payload))
            elif op[0] == "reserve":
                item = _Item("binary", None, ctx=op[1])
                reserved.append((outbox.reserve(b"fallback", ctx=op[1], wait_s=60.0), item))
                queue.append(item)
            elif op[0] == "fill":
                if reserved:
                    reservation, item = reserved.pop(op[1] % len(reserved))
                    item.payload = f"r{next(numbers)}".encode()
                    reservation.fill(item.payload)
                    reservation.fill(b"a second fill is ignored")
            elif op[0] == "purge":
                kept = [i for i in queue if i.stream != op[1]]
                assert outbox.purge(op[1]) == len(queue) - len(kept)
                queue = kept
            else:
                for _ in range(op[1]):
                    take()
                    if in_flight is not None:
                        expected.append((in_flight.kind, in_flight.payload))
                        in_flight = None
                        gate.release()
                        await _settle()
            take()
            await _settle()
            assert sent == expected
        for reservation, item in reserved:
            item.payload = f"r{next(numbers)}".encode()
            reservation.fill(item.payload)
        for item in ([in_flight] if in_flight else []) + queue:
            expected.append((item.kind, item.payload))
            gate.release()
        assert await outbox.drained(2.0)
        assert sent == expected
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_the_outbox_sends_what_a_fifo_with_purges_and_merged_pongs_would(ops: list[tuple]) -> None:
    asyncio.run(_play(ops))


@contextlib.asynccontextmanager
async def writing() -> AsyncIterator[tuple[Outbox, list[bytes],
                                         Callable[[], asyncio.Task[None]]]]:
    """An outbox whose sends are recorded (control frames by their kind), and a function that
    starts its writer; the writer is stopped on the way out."""
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)

    async def control(kind: str, payload: bytes) -> None:
        sent.append(kind.encode())

    outbox = Outbox(send, max_messages=10, max_lag_s=5.0, control=control)
    writers: list[asyncio.Task[None]] = []

    def run() -> asyncio.Task[None]:
        writers.append(asyncio.create_task(outbox.run()))
        return writers[-1]

    try:
        yield outbox, sent, run
    finally:
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_reservation_not_written_in_time_goes_out_as_its_fallback_and_holds_its_place(
) -> None:
    async with writing() as (outbox, sent, run):
        outbox.put(b"audio", stream_id="s", ctx="a")
        late = outbox.reserve(b"cancelled, usage unknown", ctx="a", wait_s=0.2)
        outbox.put(b"ready", ctx="a")   # behind it: waits for it
        run()
        t0 = time.monotonic()
        await asyncio.sleep(0.05)
        assert sent == [b"audio"] and not outbox._idle.is_set()
        assert await outbox.drained(2.0)
        assert sent == [b"audio", b"cancelled, usage unknown", b"ready"]
        assert 0.15 < time.monotonic() - t0 < 1.0
        late.fill(b"too late")   # ignored: the fallback went out
        outbox.put(b"next")
        assert await outbox.drained(1.0) and sent[-1] == b"next" and b"too late" not in sent


@pytest.mark.asyncio
async def test_a_full_queue_still_overflows_behind_an_unwritten_reservation() -> None:
    async def send(data: bytes) -> None:
        pass

    outbox = Outbox(send, max_messages=3, max_lag_s=5.0)
    outbox.reserve(b"fallback", ctx="a", wait_s=30.0)
    writer = asyncio.create_task(outbox.run())
    await asyncio.sleep(0.01)
    for n in range(4):
        outbox.put(b"audio %d" % n)
    with pytest.raises(SlowConsumer, match="messages queued"):
        await asyncio.wait_for(writer, 1.0)


@pytest.mark.asyncio
async def test_other_contexts_messages_pass_a_waiting_reservation_and_nothing_else_does(
) -> None:
    async with writing() as (outbox, sent, run):
        reply = outbox.reserve(b"cancelled a, usage unknown", ctx="a", wait_s=5.0)
        outbox.put(b"ready a2", ctx="a")                        # a new stream on the cancelled ctx
        outbox.put(b"audio b", stream_id="b", ctx="b")          # the socket's other context
        outbox.put(b"ready c", ctx="c")                         # a new one
        outbox.put(b"error without ctx")
        outbox.put(b"audio a2", stream_id="a2", ctx="a")
        outbox.put_control("ping", b"1")
        run()
        await asyncio.sleep(0.05)
        assert sent == [b"audio b", b"ready c", b"ping"]
        reply.fill(b"cancelled a")
        assert await outbox.drained(1.0)
        assert sent == [b"audio b", b"ready c", b"ping", b"cancelled a", b"ready a2",
                        b"error without ctx", b"audio a2"]


@pytest.mark.asyncio
async def test_a_queue_purged_empty_before_the_writer_wakes_is_no_error() -> None:
    async with writing() as (outbox, sent, run):
        writer = run()
        await asyncio.sleep(0.01)                 # the writer waits for messages
        outbox.put(b"audio", stream_id="s", ctx="a")
        outbox.purge("s")                         # a cancel, before the writer ran
        await asyncio.sleep(0.01)
        assert not writer.done()
        outbox.put(b"next", ctx="b")
        assert await outbox.drained(1.0) and sent == [b"next"]
