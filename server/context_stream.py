"""One live context of a socket: the scheduler's sink for its stream, turned into messages.

The scheduler calls the sink methods on the event loop and they only enqueue an event. One task
per stream (`_pump`) takes the events in the order the scheduler produced them, encodes audio in
the shared encoder threads (resampling and Opus are CPU work that must stay off the event
loop) and appends the messages to the socket's outbox. Keeping one ordered path per stream means
a phrase's `phrase` precedes its audio, the timeline has no gaps, and `done` follows the last
`audio` without any extra bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from server.encoders import EncoderPool
from server.metrics import Metrics
from server.outbox import Outbox, Reservation
from server.protocol import (
    OPUS_FRAME_MS,
    USAGE_FIELDS,
    AudioFormat,
    ErrorCode,
    encode_audio,
    encode_cancelled,
    encode_done,
    encode_error,
    encode_phrase,
    encode_words,
)
from streaming_tts.audio import Payload, StreamEncoder
from streaming_tts.metering import usage_summary
from streaming_tts.stream import PhraseEvent

log = logging.getLogger(__name__)

# pcm is cut into whole 20 ms frames like opus (the last message of a stream may be shorter), so
# `ready.frame_ms` means the same thing for both formats; it holds back at most 20 ms.
PCM_FRAME_MS: Final = OPUS_FRAME_MS
PCM_BYTES_PER_SAMPLE: Final = 2
# Audio is paced to one frame under `lookahead_ms` ahead: a client times it from the arrival
# of the first message, and a later message that travels faster than that one would otherwise
# look a fraction of a millisecond too early.
PACE_MARGIN_S: Final = OPUS_FRAME_MS / 1000.0
UNPACED_PIECE_FRAMES: Final = 1 << 30   # without a lookahead, a chunk goes out in one message
# A listener holding less than this (its first audio, or after running dry) gets the first
# URGENT_HEAD_MS of a chunk encoded and sent on its own, then the rest: beside the model's next
# step, encoding a whole first chunk (~280 ms of audio) took 9-11 ms on 2 CPU cores, a 100 ms
# head 3-6 ms, and the rest is out long before the head has played (BENCHMARKS.md).
URGENT_AHEAD_MS: Final = 100.0
URGENT_HEAD_MS: Final = 100.0


@dataclass(frozen=True)
class StreamSpec:
    """What `start` settled for one context."""

    ctx: str
    stream_id: str
    format: AudioFormat
    sample_rate: int  # of the audio sent (after resampling)
    words: bool
    lookahead_ms: float | None = None  # most audio the client holds ahead; None: no limit


@dataclass(frozen=True)
class StreamEnd:
    """How a stream ended; the session frees the context on it."""

    outcome: str  # "done" or "failed" (a cancel ends a stream in the session: `cancel`)
    detail: str = ""
    scheduler_knows: bool = True  # False: the failure is ours, tell the scheduler to close it


@dataclass(frozen=True)
class _Event:
    kind: str  # "phrase", "audio", "done", "error"
    value: Any = None


class ContextStream:
    """Sink (streaming_tts.stream.StreamSink) for one stream plus its encoder task."""

    def __init__(
        self,
        spec: StreamSpec,
        *,
        encoder: StreamEncoder,
        outbox: Outbox,
        pool: EncoderPool,
        metrics: Metrics,
        on_end: Callable[[ContextStream, StreamEnd], None],
    ) -> None:
        self.spec = spec
        self.chars = 0  # text accepted so far, for limits.max_text_chars
        self.ended = False  # the client sent `end`
        self._encoder = encoder
        self._outbox = outbox
        self._pool = pool
        self._metrics = metrics
        self._on_end = on_end
        self._events: asyncio.Queue[_Event] = asyncio.Queue()  # bounded by the lookahead
        self._task: asyncio.Task[None] | None = None
        self._detached = False
        # The client cancelled: the place of its `cancelled` in the outbox, written when the
        # scheduler has dropped the stream and knows its final usage (`on_cancelled`).
        self._cancel_reply: Reservation | None = None
        # The scheduler's last word on the stream, kept for a cancel that comes after it and
        # before the pump has sent it: it ended, with this usage (None: it failed).
        self._scheduler_ended = False
        self._final_usage: dict[str, Any] | None = None
        self._seq = 0
        self._sent_samples = 0  # the stream's timeline so far, in samples at sample_rate
        self._pcm_held = b""  # pcm bytes waiting to complete a 20 ms frame
        self._frame_samples = max(1, round(spec.sample_rate * PCM_FRAME_MS / 1000))
        self._encode_s = 0.0  # CPU time of the encoder thread spent on this stream
        # Sending ahead: at most lookahead_ms (protocol), in messages of at most half of it, so
        # the listener holds between half and all of it while the server is on time.
        lookahead = spec.lookahead_ms
        # How far ahead a message may take the listener (None: no limit; see PACE_MARGIN_S).
        self._ahead_s = (None if lookahead is None
                         else max(lookahead / 1000.0 - PACE_MARGIN_S, lookahead / 2000.0))
        self._piece_frames = (UNPACED_PIECE_FRAMES if lookahead is None
                              else max(1, int(lookahead / 2 // PCM_FRAME_MS)))
        self._started: float | None = None  # time.monotonic() of the first audio message
        self._text_at: float | None = None  # ... of the first text received
        self.ttfa_ms: float | None = None  # first text received -> first audio sent
        # The listener's playback as (when, samples sent by then): from the first audio
        # message, restarted whenever it has run dry (a player stalls, then resumes with the
        # next audio). Only for `_urgent_head`; the pacing keeps the protocol's clock.
        self._playing_from: tuple[float, int] | None = None

    def text_received(self) -> None:
        """The session passed the scheduler text for this stream (the clock of `ttfa_ms`)."""
        if self._text_at is None:
            self._text_at = time.monotonic()

    def start(self) -> None:
        self._task = asyncio.create_task(self._pump(), name=f"stream-{self.spec.stream_id}")

    def cancel(self, reply: Reservation) -> asyncio.Task[None] | None:
        """The client cancelled: stop now (`detach`), and write `cancelled` with the stream's
        usage into `reply` once the scheduler has dropped the stream (at once if the scheduler
        had finished it already). Returns the task to await, if any."""
        task = self.detach()
        if self._scheduler_ended:
            self._reply_cancelled(reply, self._final_usage)
        else:
            self._cancel_reply = reply
        return task

    def detach(self) -> asyncio.Task[None] | None:
        """Stop now (cancel, disconnect): nothing more is queued for this stream, and its
        messages still in the outbox are dropped. Returns the task to await, if any."""
        self._detached = True
        self._outbox.purge(self.spec.stream_id)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            return task
        return None

    # --- StreamSink: called by the scheduler on the event loop; never blocks, never raises ---

    def on_phrase(self, phrase: PhraseEvent) -> None:
        self._push(_Event("phrase", phrase))

    def on_audio(self, samples: np.ndarray, pts_ms: float) -> None:
        # pts_ms is on the voice-rate timeline; the wire pts comes from what was actually sent.
        self._push(_Event("audio", samples))

    # A stream cancelled by its client may still finish or fail in the scheduler before the
    # cancel reaches it: its `cancelled` then carries what `done` would have (or null).
    def on_done(self, usage: dict[str, Any]) -> None:
        self._scheduler_ended, self._final_usage = True, usage
        if not self._answer_cancel(usage):
            self._push(_Event("done", usage))

    def on_cancelled(self, usage: dict[str, Any] | None) -> None:
        """The scheduler dropped a stream the client cancelled (only the session cancels)."""
        self._answer_cancel(usage)

    def on_error(self, code: str, message: str) -> None:
        self._scheduler_ended = True
        if not self._answer_cancel(None):
            self._push(_Event("error", (code, message)))

    def _answer_cancel(self, usage: dict[str, Any] | None) -> bool:
        """Write the awaited `cancelled`, if the client cancelled; False if it did not."""
        if self._cancel_reply is None:
            return False
        reply, self._cancel_reply = self._cancel_reply, None
        self._reply_cancelled(reply, usage)
        return True

    def _push(self, event: _Event) -> None:
        if not self._detached:
            self._events.put_nowait(event)

    # --- the pump ---

    async def _pump(self) -> None:
        try:
            while not await self._handle(await self._events.get()):
                pass
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an encoder fault ends this stream, not the socket
            log.exception("stream %s ctx=%r: output failed", self.spec.stream_id, self.spec.ctx)
            self._put_error(ErrorCode.INTERNAL, f"audio encoding failed: {type(exc).__name__}")
            self._end(StreamEnd("failed", f"encoding: {exc!r}", scheduler_knows=False))

    async def _handle(self, event: _Event) -> bool:
        """Queue the messages for one event; True when the stream has ended."""
        if event.kind == "phrase":
            self._send_phrase(event.value)
        elif event.kind == "audio":
            samples = event.value
            if (head := self._urgent_head(len(samples))) > 0:
                await self._send_audio(await self._encode(self._encoder.encode, samples[:head]),
                                       final=False)
                samples = samples[head:]
            await self._send_audio(await self._encode(self._encoder.encode, samples), final=False)
        elif event.kind == "done":
            await self._send_audio(await self._encode(self._encoder.finish), final=True)
            usage = self._socket_usage(event.value)
            self._put(encode_done(ctx=self.spec.ctx, usage=_wire_usage(usage)))
            self._end(StreamEnd("done", usage_summary(usage)))
            return True
        elif event.kind == "error":
            code, message = event.value
            self._put_error(_error_code(code), message)
            self._end(StreamEnd("failed", f"{code}: {message}"))
            return True
        return False

    def _socket_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The scheduler's usage with this socket's own figures: the encoder threads' CPU
        time, and time to first audio as the protocol has it (the scheduler's ends as the
        model's audio leaves it; the protocol's, as the first `audio` message is sent,
        resampled and encoded)."""
        return {**usage, "encode_ms": round(self._encode_s * 1000.0, 1),
                "ttfa_ms": None if self.ttfa_ms is None else round(self.ttfa_ms, 1)}

    def _reply_cancelled(self, reply: Reservation, usage: dict[str, Any] | None) -> None:
        """The client's `cancel` answered; the stream's one log line for it, with its usage."""
        full = None if usage is None else self._socket_usage(usage)
        reply.fill(encode_cancelled(ctx=self.spec.ctx,
                                    usage=None if full is None else _wire_usage(full)))
        log.info("stream %s cancelled ctx=%r %s", self.spec.stream_id, self.spec.ctx,
                 "(usage unknown)" if full is None else usage_summary(full))

    async def _encode(self, fn: Callable[..., Payload], *args: Any) -> Payload:
        """Resample and encode in the encoder threads, metering the thread's CPU time."""
        audio_s = len(args[0]) / self._encoder.in_rate if args else 0.0
        payload, cpu_s = await self._pool.run(fn, *args, audio_s=audio_s)
        self._encode_s += cpu_s
        return payload

    def _urgent_head(self, n: int) -> int:
        """Input samples to encode and send ahead of the rest of an `n`-sample chunk: a head
        of URGENT_HEAD_MS when the listener holds under URGENT_AHEAD_MS (0: send it whole)."""
        if self._listener_ahead_s(time.monotonic()) * 1000.0 >= URGENT_AHEAD_MS:
            return 0
        head = round(self._encoder.in_rate * URGENT_HEAD_MS / 1000.0)
        return head if n >= 2 * head else 0

    def _listener_ahead_s(self, now: float) -> float:
        """Audio sent that the listener has not played yet (0 before the first message, and
        once it has run dry)."""
        if self._playing_from is None:
            return 0.0
        at, samples = self._playing_from
        ahead = (self._sent_samples - samples) / self.spec.sample_rate - (now - at)
        if ahead < 0.0:
            self._playing_from = (now, self._sent_samples)   # dry: it resumes with the next audio
            return 0.0
        return ahead

    def _send_phrase(self, phrase: PhraseEvent) -> None:
        ctx, sid = self.spec.ctx, self.spec.stream_id
        self._put(encode_phrase(ctx=ctx, phrase_id=phrase.id, text=phrase.text,
                                start_ms=phrase.start_ms, end_ms=phrase.end_ms,
                                space_before=phrase.space_before), stream_id=sid)
        if self.spec.words and phrase.words:
            self._put(encode_words(ctx=ctx, phrase_id=phrase.id, items=phrase.words),
                      stream_id=sid)

    async def _send_audio(self, payload: Payload, *, final: bool) -> None:
        """Send the audio in messages of at most `_piece_frames` 20 ms frames, each once the
        listener would hold no more than `lookahead_ms` with it (`_pace`)."""
        frame, n = self._frame_samples, self._piece_frames
        if isinstance(payload, list):  # opus: whole 20 ms packets
            pieces: list[Payload] = [payload[i:i + n] for i in range(0, len(payload), n)]
            sizes = [len(p) * frame for p in pieces]
        else:
            data = self._pcm_frames(payload, final=final)
            step = n * frame * PCM_BYTES_PER_SAMPLE
            pieces = [data[i:i + step] for i in range(0, len(data), step)]
            sizes = [len(p) // PCM_BYTES_PER_SAMPLE for p in pieces]
        for piece, samples in zip(pieces, sizes):
            if samples:  # opus holds back partial frames: maybe nothing to send yet
                await self._pace(samples)
                self._put_audio(piece, samples)

    async def _pace(self, samples: int) -> None:
        """Wait until a message of `samples` more would leave the listener at most
        `lookahead_ms` ahead. The listener's clock starts with the first audio message (it
        starts playing once that arrives, a little later, so it holds a little less)."""
        if self._ahead_s is None:
            return
        if self._started is None:
            self._started = time.monotonic()
        due = self._started + (self._sent_samples + samples) / self.spec.sample_rate - self._ahead_s
        while (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)   # again if it woke early (uvloop's timers are whole ms)

    def _put_audio(self, payload: Payload, samples: int) -> None:
        rate = self.spec.sample_rate
        if self._seq == 0 and self._text_at is not None:
            self.ttfa_ms = (time.monotonic() - self._text_at) * 1000.0
            self._metrics.ttfa_seconds.observe(self.ttfa_ms / 1000.0)
        if self._playing_from is None:
            self._playing_from = (time.monotonic(), self._sent_samples)
        pts_ms = self._sent_samples * 1000.0 / rate
        self._put(encode_audio(ctx=self.spec.ctx, seq=self._seq, pts_ms=pts_ms, data=payload),
                  stream_id=self.spec.stream_id)
        self._seq += 1
        self._sent_samples += samples
        self._metrics.audio_seconds.inc(samples / rate)

    def _pcm_frames(self, data: bytes, *, final: bool) -> bytes:
        """Whole 20 ms frames of the pcm so far; the rest waits (all of it goes at the end)."""
        data = self._pcm_held + data
        keep = 0 if final else len(data) % (self._frame_samples * PCM_BYTES_PER_SAMPLE)
        self._pcm_held = data[len(data) - keep:] if keep else b""
        return data[:len(data) - keep]

    def _put(self, data: bytes, *, stream_id: str | None = None) -> None:
        self._outbox.put(data, stream_id=stream_id, ctx=self.spec.ctx)

    def _put_error(self, code: ErrorCode, message: str) -> None:
        self._metrics.protocol_errors.labels(code=code.value).inc()
        self._put(encode_error(code=code, message=message, ctx=self.spec.ctx))

    def _end(self, end: StreamEnd) -> None:
        self._task = None  # ending from inside the pump: nothing left to cancel
        self._detached = True
        self._on_end(self, end)


def _error_code(code: str) -> ErrorCode:
    """The scheduler reports codes as strings; anything unknown is our fault: `internal`."""
    try:
        return ErrorCode(code)
    except ValueError:
        return ErrorCode.INTERNAL


def _wire_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """`done.usage` with exactly the protocol's fields (a metering gap becomes null, not a
    crash that would swallow the `done`)."""
    missing = [k for k in USAGE_FIELDS if k not in usage]
    if missing:
        log.warning("usage lacks %s; sending null", missing)
    return {k: usage.get(k) for k in USAGE_FIELDS}
