"""A socket's outbox (`server.outbox.Outbox`) against a plain model of it, under any sequence of
messages, pings, pongs, purges (barge-in) and sends that complete one at a time (hypothesis).

The model: one FIFO; the writer takes the head and holds it until its send completes; `purge`
drops a stream's messages still in the FIFO (not the one being sent); a pong joins the FIFO
unless one is waiting there, which then carries the newest payload instead. Whatever the
sequence, the client receives exactly what the model says, in its order, and the outbox
reports itself drained once everything was sent.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.outbox import Outbox

OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from([None, "s1", "s2"])),
    st.tuples(st.sampled_from(["ping", "pong"])),
    st.tuples(st.just("purge"), st.sampled_from(["s1", "s2"])),
    st.tuples(st.just("send"), st.integers(1, 3)),
), max_size=40)


@dataclass
class _Item:
    kind: str          # "binary", "ping" or "pong"
    payload: bytes
    stream: str | None = None


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

    def take() -> None:              # the model's writer takes the head when it is free
        nonlocal in_flight
        if in_flight is None and queue:
            in_flight = queue.pop(0)

    try:
        for op in ops:
            if op[0] == "put":
                item = _Item("binary", f"m{next(numbers)}".encode(), op[1])
                outbox.put(item.payload, stream_id=item.stream)
                queue.append(item)
            elif op[0] in ("ping", "pong"):
                payload = f"{op[0]}{next(numbers)}".encode()
                outbox.put_control(op[0], payload)
                waiting = next((i for i in queue if i.kind == "pong"), None)
                if op[0] == "pong" and waiting is not None:
                    waiting.payload = payload
                else:
                    queue.append(_Item(op[0], payload))
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
