"""One context's output path (`ContextStream`): the scheduler's audio, encoded in the encoder
threads and queued as `audio` messages.

A listener with (almost) nothing to play gets a short head of a chunk first, so its audio does not
wait for the whole chunk's encoding; the audio itself, its timeline and its order are the same.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgpack
import numpy as np
import pytest

from server.context_stream import URGENT_HEAD_MS, ContextStream, StreamSpec
from server.encoders import EncoderPool
from server.metrics import Metrics
from streaming_tts.audio.encode import float_to_s16le, make_encoder

pytestmark = pytest.mark.asyncio

VOICE_RATE = 22050


class RecordingOutbox:
    """What ContextStream needs of an Outbox: `put` and `purge`."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def put(self, data: bytes, *, stream_id: str | None = None, ctx: str | None = None) -> None:
        self.messages.append(msgpack.unpackb(data))

    def purge(self, stream_id: str) -> int:
        return 0

    def audio(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == "audio"]


def tone(ms: float, start: int = 0) -> np.ndarray:
    n = round(VOICE_RATE * ms / 1000.0)
    t = np.arange(start, start + n) / VOICE_RATE
    return (0.3 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)


async def open_stream(fmt: str, rate: int, lookahead_ms: float | None = 1500.0):
    outbox, ends = RecordingOutbox(), []
    spec = StreamSpec(ctx="c", stream_id="s", format=fmt, sample_rate=rate, words=False,
                      lookahead_ms=lookahead_ms)
    pool = EncoderPool(1)
    stream = ContextStream(spec, encoder=make_encoder(fmt, in_rate=VOICE_RATE, out_rate=rate),
                           outbox=outbox, pool=pool, metrics=Metrics(),  # type: ignore[arg-type]
                           on_end=lambda _s, end: ends.append(end))
    stream.start()
    return stream, outbox, ends, pool


async def settle(outbox: RecordingOutbox, count: int) -> None:
    async with asyncio.timeout(10):
        while len(outbox.audio()) < count:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)   # and nothing more follows


def ms_of(msg: dict[str, Any], fmt: str, rate: int) -> float:
    return len(msg["data"]) * 20.0 if fmt == "opus" else len(msg["data"]) / 2 * 1000.0 / rate


async def test_first_audio_goes_out_as_a_short_head_then_the_rest_whole_after() -> None:
    stream, outbox, ends, pool = await open_stream("pcm_s16le", VOICE_RATE)
    first, second = tone(300), tone(300, start=round(VOICE_RATE * 0.3))
    stream.on_audio(first, 0.0)
    await settle(outbox, 2)
    sizes = [ms_of(m, "pcm_s16le", VOICE_RATE) for m in outbox.audio()]
    assert sizes == [pytest.approx(URGENT_HEAD_MS), pytest.approx(300 - URGENT_HEAD_MS)]
    # The listener now holds ~300 ms: the next chunk is not split.
    stream.on_audio(second, 300.0)
    await settle(outbox, 3)
    assert ms_of(outbox.audio()[2], "pcm_s16le", VOICE_RATE) == pytest.approx(300)
    stream.on_done({})
    async with asyncio.timeout(10):
        while not ends:
            await asyncio.sleep(0.005)
    assert ends[0].outcome == "done"
    # The same samples, in order, on a gap-free timeline.
    audio = outbox.audio()
    assert b"".join(m["data"] for m in audio) == float_to_s16le(np.concatenate((first, second)))
    assert [m["seq"] for m in audio] == list(range(len(audio)))
    pts = 0.0
    for m in audio:
        assert m["pts_ms"] == pytest.approx(pts, abs=0.01)
        pts += ms_of(m, "pcm_s16le", VOICE_RATE)
    pool.shutdown()


async def test_a_listener_that_ran_dry_gets_a_short_head_again() -> None:
    stream, outbox, _, pool = await open_stream("pcm_s16le", VOICE_RATE, lookahead_ms=None)
    stream.on_audio(tone(300), 0.0)
    await settle(outbox, 2)
    await asyncio.sleep(0.8)    # the 300 ms have played out: the listener has been dry 0.5 s
    stream.on_audio(tone(300), 300.0)
    await settle(outbox, 4)
    sizes = [ms_of(m, "pcm_s16le", VOICE_RATE) for m in outbox.audio()]
    assert sizes[2:] == [pytest.approx(URGENT_HEAD_MS), pytest.approx(300 - URGENT_HEAD_MS)]
    # Its player resumed with that audio and holds ~300 ms again: the next chunk goes whole
    # (a clock kept from the first message would count the dry spell as still owed).
    stream.on_audio(tone(300), 600.0)
    await settle(outbox, 5)
    assert ms_of(outbox.audio()[4], "pcm_s16le", VOICE_RATE) == pytest.approx(300)
    stream.detach()
    pool.shutdown()


async def test_opus_first_message_is_short_and_a_short_chunk_is_not_split() -> None:
    stream, outbox, _, pool = await open_stream("opus", 48000)
    chunk = tone(280)   # a first chunk of 24 frames, ~279 ms
    stream.on_audio(chunk, 0.0)
    await settle(outbox, 2)
    first, rest = outbox.audio()
    # soxr holds back 26-33 ms, Opus takes whole 20 ms frames: 60 ms of the 100 ms head.
    assert 3 <= len(first["data"]) <= URGENT_HEAD_MS // 20
    assert rest["pts_ms"] == len(first["data"]) * 20.0
    # The very packets of the chunk encoded in one piece (the encoder's state carries over).
    assert first["data"] + rest["data"] == make_encoder("opus", in_rate=VOICE_RATE,
                                                        out_rate=48000).encode(chunk)
    stream.detach()
    pool.shutdown()
    # Under twice the head, a first chunk goes whole.
    stream, outbox, _, pool = await open_stream("pcm_s16le", VOICE_RATE)
    stream.on_audio(tone(1.5 * URGENT_HEAD_MS), 0.0)
    await settle(outbox, 1)
    assert len(outbox.audio()) == 1
    stream.detach()
    pool.shutdown()



class Reply:
    """What ContextStream needs of an outbox Reservation: `fill`."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def fill(self, data: bytes) -> None:
        self.messages.append(msgpack.unpackb(data))


SCHEDULER_USAGE = {"chars": 40, "phrases": 2, "audio_ms": 1300, "compute_ms": 81.5,
                   "energy_j": None, "cost": None, "ttfa_ms": 30.0}


async def test_a_cancel_is_answered_when_the_scheduler_reports_the_usage() -> None:
    stream, outbox, ends, pool = await open_stream("opus", 48000)
    stream.text_received()
    stream.on_audio(tone(300), 0.0)
    await settle(outbox, 1)
    reply = Reply()
    task = stream.cancel(reply)
    if task is not None:
        await asyncio.gather(task, return_exceptions=True)
    assert reply.messages == []   # the scheduler has not dropped the stream yet
    stream.on_audio(tone(300), 300.0)   # what its last step made: not sent
    stream.on_cancelled(dict(SCHEDULER_USAGE))
    stream.on_cancelled(dict(SCHEDULER_USAGE))   # a second answer changes nothing
    [msg] = reply.messages
    assert msg["type"] == "cancelled" and msg["ctx"] == "c"
    usage = msg["usage"]
    assert {k: usage[k] for k in ("chars", "phrases", "audio_ms", "compute_ms")} == {
        "chars": 40, "phrases": 2, "audio_ms": 1300, "compute_ms": 81.5}
    assert usage["encode_ms"] > 0            # this socket's own figures, as `done` has them
    assert usage["ttfa_ms"] is not None and usage["ttfa_ms"] != 30.0
    assert [m["type"] for m in outbox.messages] == ["audio", "audio"] and not ends
    pool.shutdown()


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_stream_the_scheduler_finished_around_the_cancel_answers_with_dones_usage(
        when: str) -> None:
    stream, outbox, ends, pool = await open_stream("pcm_s16le", VOICE_RATE)
    reply = Reply()
    if when == "before":   # `done` is queued for the pump, not sent yet
        stream.on_done(dict(SCHEDULER_USAGE))
        stream.cancel(reply)
    else:                  # the scheduler finished it before it read the cancel
        stream.cancel(reply)
        stream.on_done(dict(SCHEDULER_USAGE))
    await asyncio.sleep(0.05)
    [msg] = reply.messages
    assert msg["type"] == "cancelled" and msg["usage"]["compute_ms"] == 81.5
    assert outbox.messages == [] and not ends   # no `done`: the client cancelled
    pool.shutdown()


async def test_a_stream_that_failed_around_the_cancel_answers_with_usage_null() -> None:
    stream, outbox, ends, pool = await open_stream("pcm_s16le", VOICE_RATE)
    reply = Reply()
    stream.cancel(reply)
    stream.on_error("internal", "the model failed")
    assert reply.messages == [{"type": "cancelled", "ctx": "c", "usage": None}]
    assert outbox.messages == []
    pool.shutdown()
