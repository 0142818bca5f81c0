"""One WebSocket session: frames in -> contexts (streams) -> the scheduler; messages out.

A session runs two tasks: the read loop (decode each frame, dispatch it; nothing in it awaits
a send) and the outbox writer (the only sender on this socket). Each live context is a
`ContextStream` with its own encoder task. Whatever ends the session - the client leaving,
idle, a slow consumer, server shutdown - every live stream is closed in the scheduler, its
admission slot released and its tasks cancelled, so nothing of a closed socket survives.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Final, NoReturn

from aiohttp import WSCloseCode, WSMsgType, web

from server.admission import RefusalReason
from server.context_stream import ContextStream, StreamEnd, StreamSpec
from server.deadline import Deadline
from server.outbox import LagProbe, Outbox, SlowConsumer
from server.protocol import (
    OPUS_FRAME_MS,
    CancelMsg,
    ClientMsg,
    EndMsg,
    ErrorCode,
    FlushMsg,
    ProtocolError,
    StartMsg,
    TextMsg,
    check_sample_rate,
    decode_client_frame,
    encode_cancelled,
    encode_ready,
    text_frame_error,
)
from server.state import ServerState
from streaming_tts.audio import make_encoder
from streaming_tts.params import SynthesisParams
from streaming_tts.stream import StreamOptions
from streaming_tts.voices import VoiceInfo

if TYPE_CHECKING:   # or a RemoteScheduler, in a front end (which never imports torch)
    from streaming_tts.scheduler import Scheduler

log = logging.getLogger(__name__)

# A close handshake with a client that does not answer must not hold the session for long.
CLOSE_TIMEOUT_S: Final = 2.0
# At shutdown, how long the `error` messages may take to reach the clients before the close.
SHUTDOWN_DRAIN_S: Final = 1.0
# Smallest receive timeout while waiting for the idle deadline (avoid a busy loop).
_MIN_WAIT_S: Final = 0.05
# Frames handled before the read loop lets other tasks run. aiohttp hands over frames already
# received without suspending, so a client that sent 20,000 small frames at once had them all
# handled in one go (~0.4 s of a stalled loop for every stream); 64 take about 1-2 ms.
_FRAMES_PER_SLICE: Final = 64
# A ping found overdue may have its pong waiting unread: after a stall of this event loop
# (or of the host), the pong of a client that kept up sits in the socket's buffer. Before it
# is judged a slow consumer, the session reads what has come, waiting this long for it, up to
# this many frames (a client that sends and never answers is still closed).
_OVERDUE_WAIT_S: Final = 0.1
_OVERDUE_FRAMES: Final = 256

# A front end waits this long for its back end's answer to a stream it opens (the back end
# answers from its event loop, in about a millisecond; a stuck one is found by its status).
BACK_END_ANSWER_S: Final = 2.0
# The longest `cancelled` waits for the scheduler to drop the stream and report its usage
# (one step, tens of milliseconds, as a rule); then it goes out with usage null.
CANCEL_ANSWER_S: Final = 2.0

CloseRequest = tuple[int, str]  # WebSocket close code, reason
_REASONS: Final = frozenset(r.value for r in RefusalReason)


class Session:
    """Serves one accepted WebSocket until it closes; see the module docstring."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request, state: ServerState,
                 *, client: str) -> None:
        self._ws = ws
        self.client = client   # whose contexts count against limits.contexts_per_client
        self._request = request
        self._state = state
        self._limits = state.cfg.limits
        self.peer = request.remote or "?"
        self._outbox = Outbox(ws.send_bytes, max_messages=self._limits.send_queue_messages,
                              max_lag_s=self._limits.max_send_lag_s, control=self._send_control)
        self._lag = LagProbe()
        self._starts = TokenBucket(rate=self._limits.starts_per_s,
                                   burst=max(1.0, 2 * self._limits.starts_per_s),
                                   now=asyncio.get_running_loop().time())
        self._streams: dict[str, ContextStream] = {}  # live contexts by ctx
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled stream tasks to await
        self._last_activity = asyncio.get_running_loop().time()
        self._closing = False
        self._finished = asyncio.Event()
        # A stream opened in a front end, awaiting its back end's answer (_back_end_answer).
        self._answer: tuple[ContextStream, VoiceInfo, asyncio.Future[list | None]] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the socket until it is closed, then leave nothing behind."""
        writer = asyncio.create_task(self._outbox.run(), name=f"ws-writer {self.peer}")
        reader = asyncio.create_task(self._read_loop(), name=f"ws-reader {self.peer}")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                await self._writer_stopped(writer)
            else:
                await self._reader_stopped(reader, writer)
        finally:
            reader.cancel()
            writer.cancel()
            self._drop_streams("socket closed")
            await asyncio.gather(reader, writer, *self._stopping, return_exceptions=True)
            self._stopping.clear()
            self._finished.set()

    async def shutdown(self, why: str = "server shutting down") -> None:
        """Server shutdown: live streams get `error` (internal, `why`), then close 1001."""
        if not self._closing:
            self._closing = True
            live = list(self._streams.values())
            # A front end's stream awaiting its back end's word was never `ready`: refused,
            # as a `start` now would be, not failed.
            pending = self._answer[0] if self._answer is not None else None
            self._drop_streams(why)
            for stream in live:
                if stream is not pending:
                    self._send_error(ProtocolError(ErrorCode.INTERNAL, why, stream.spec.ctx))
                    continue
                try:
                    self._refuse(stream.spec.ctx, RefusalReason.SHUTTING_DOWN,
                                 "server is shutting down")
                except ProtocolError as err:
                    self._send_error(err)
            await self._outbox.drained(SHUTDOWN_DRAIN_S)
            await self._close(WSCloseCode.GOING_AWAY, "server shutting down")
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._finished.wait()
        except TimeoutError:
            log.warning("socket %s did not finish closing", self.peer)

    async def _reader_stopped(self, reader: asyncio.Task[CloseRequest | None],
                              writer: asyncio.Task[None]) -> None:
        exc = reader.exception()
        if isinstance(exc, SlowConsumer):   # the lag probe: stop sending, then close
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            await self._slow_consumer(exc)
            return
        if exc is not None:  # a bug in dispatch: close this socket, keep the server up
            log.error("socket %s failed", self.peer, exc_info=exc)
            self._drop_streams("server error")
            await self._close(WSCloseCode.INTERNAL_ERROR, "internal error")
            return
        close = reader.result()
        if close is not None:
            await self._outbox.drained(self._limits.max_send_lag_s)
            await self._close(*close)

    async def _writer_stopped(self, writer: asyncio.Task[None]) -> None:
        exc = writer.exception()
        if isinstance(exc, SlowConsumer):
            await self._slow_consumer(exc)
        elif exc is not None:  # the connection broke under a send: the reader sees it too
            log.debug("socket %s: send failed: %r", self.peer, exc)

    async def _slow_consumer(self, exc: SlowConsumer) -> None:
        log.info("socket %s: slow consumer (%s); closing", self.peer, exc)
        self._drop_streams("slow consumer")
        await self._close(WSCloseCode.POLICY_VIOLATION, "slow consumer")

    async def _send_control(self, kind: str, payload: bytes) -> None:
        """The outbox's ping and pong frames."""
        if kind == "ping":
            await self._ws.ping(payload)
        else:
            await self._ws.pong(payload)

    async def _close(self, code: int, reason: str) -> None:
        self._closing = True
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self._ws.close(code=code, message=reason.encode())
        except TimeoutError:
            transport = self._request.transport
            if transport is not None:  # the client does not answer: drop the connection
                transport.abort()
        log.debug("socket %s closed by the server: %d %s", self.peer, code, reason)

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> CloseRequest | None:
        """Frames until the client goes away (None) or the session should close (code, why);
        raises SlowConsumer when the lag probe finds the client too far behind."""
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop)   # one timer for many reads (aiohttp's own is one per read)
        try:
            return await self._read_frames(loop, deadline)
        finally:
            deadline.close()

    async def _read_frames(self, loop: asyncio.AbstractEventLoop,
                           deadline: Deadline) -> CloseRequest | None:
        handled = overdue = 0
        while True:
            handled += 1
            if handled % _FRAMES_PER_SLICE == 0:
                await asyncio.sleep(0)
            now = loop.time()
            overdue = overdue + 1 if self._probe_lag(now) else 0
            if overdue > _OVERDUE_FRAMES:
                self._overdue_ping(now)
            try:
                async with deadline.at(
                        now + (_OVERDUE_WAIT_S if overdue else self._receive_timeout(now))):
                    msg = await self._ws.receive()
            except TimeoutError:
                if overdue:   # nothing has come: the pong is not waiting unread
                    self._overdue_ping(loop.time())
                if self._is_idle():
                    log.info("socket %s idle for %g s; closing", self.peer,
                             self._limits.idle_timeout_s)
                    return WSCloseCode.OK, "idle"
                continue
            if msg.type is WSMsgType.BINARY:
                self._on_frame(msg.data)
                if self._answer is not None:
                    await self._back_end_answer()
            elif msg.type is WSMsgType.TEXT:
                self._send_error(text_frame_error())
            elif msg.type is WSMsgType.PING:   # control frames: neither activity nor messages
                self._outbox.put_control("pong", msg.data)
            elif msg.type is WSMsgType.PONG:
                if (lag := self._lag.answered(msg.data, loop.time())) is not None:
                    self._state.metrics.client_lag_seconds.observe(lag)
            else:  # CLOSE, CLOSING, CLOSED, ERROR (aiohttp has answered the close already)
                if msg.type is WSMsgType.ERROR:   # e.g. no pong to the heartbeat: say so
                    log.info("socket %s: connection lost (%s)", self.peer, msg.data)
                return None

    def _probe_lag(self, now: float) -> bool:
        """While a stream is live, ping the client each second behind its audio; one ping
        unanswered for `max_send_lag_s` means it reads that far behind: a slow consumer.
        Returns whether one is overdue (the read loop then reads what has come first)."""
        if self._lag.behind_s(now) >= self._limits.max_send_lag_s:
            return True
        if self._streams and self._lag.due(now) and not self._closing:
            self._outbox.put_control("ping", self._lag.next_ping(now))
        return False

    def _overdue_ping(self, now: float) -> NoReturn:
        behind = self._lag.behind_s(now)
        raise SlowConsumer(f"a ping sent behind its audio went unanswered for {behind:.1f} s")

    def _receive_timeout(self, now: float) -> float:
        """Until the idle deadline (no live stream) or the lag probe's next check."""
        idle = self._limits.idle_timeout_s
        # With a live stream the idle wait only wakes the loop now and then: never idle.
        wait = idle if self._streams else self._last_activity + idle - now
        if self._streams or self._lag.behind_s(now):
            wait = min(wait, self._lag.next_check(now, max_lag_s=self._limits.max_send_lag_s,
                                                  pinging=bool(self._streams)))
        return max(_MIN_WAIT_S, wait)

    def _is_idle(self) -> bool:
        quiet = asyncio.get_running_loop().time() - self._last_activity
        return not self._streams and quiet >= self._limits.idle_timeout_s

    def _on_frame(self, data: bytes) -> None:
        self._last_activity = asyncio.get_running_loop().time()
        try:
            self._dispatch(decode_client_frame(data, limits=self._limits))
        except ProtocolError as err:
            self._send_error(err)

    def _dispatch(self, msg: ClientMsg) -> None:
        match msg:
            case StartMsg():
                self._start(msg)
            case TextMsg():
                self._text(msg)
            case FlushMsg():
                self._scheduler().flush(self._writable(msg.ctx, "flush").spec.stream_id)
            case EndMsg():
                stream = self._writable(msg.ctx, "end")
                stream.ended = True
                self._scheduler().end(stream.spec.stream_id)
            case CancelMsg():
                self._cancel(msg.ctx)

    # ------------------------------------------------------------------ messages

    def _start(self, msg: StartMsg) -> None:
        try:
            spec, options, voice = self._validate_start(msg)
        except ProtocolError as err:
            # `overloaded` is logged where admission refused it (_admit), rate-limited.
            if err.code not in (ErrorCode.BAD_REQUEST, ErrorCode.OVERLOADED):
                log.debug("stream refused ctx=%r peer=%s: %s (%s)",
                          msg.ctx, self.peer, err.code.value, err.message)
            raise
        try:   # the slot is held: until the stream is registered, nothing else releases it
            scheduler = self._scheduler()
            stream = self._open_stream(spec, msg, voice)
        except BaseException:
            self._state.release(self.client)
            raise
        self._streams[msg.ctx] = stream
        answer = scheduler.open(spec.stream_id, options, stream)
        if answer is not None:   # a front end: `ready` once the back end has admitted it too
            self._answer = (stream, voice, answer)
            return
        self._ready(stream, voice)

    def _ready(self, stream: ContextStream, voice: VoiceInfo) -> None:
        spec = stream.spec
        self._outbox.put(encode_ready(
            ctx=spec.ctx, stream_id=spec.stream_id, voice=voice.id, format=spec.format,
            sample_rate=spec.sample_rate, frame_ms=OPUS_FRAME_MS), ctx=spec.ctx)
        self._state.metrics.streams_started.inc()
        stream.start()
        # The key's fingerprint (never the key) tells whose stream it was where keys are used.
        key = f" {self.client}" if self.client.startswith("key ") else ""
        log.info("stream %s opened ctx=%r peer=%s%s voice=%s format=%s/%d", spec.stream_id,
                 spec.ctx, self.peer, key, voice.id, spec.format.value, spec.sample_rate)

    async def _back_end_answer(self) -> None:
        """A front end (server/split.py): the back end's word on the stream just opened, which
        its admission decides with every front end's streams. Frames wait meanwhile, so the
        stream's `text` follows its `ready` (a round trip on the link: BENCHMARKS.md)."""
        assert self._answer is not None
        stream, voice, answer = self._answer
        sid, ctx = stream.spec.stream_id, stream.spec.ctx
        try:
            async with asyncio.timeout(BACK_END_ANSWER_S):
                refusal = await answer
        except TimeoutError:
            if (scheduler := self._state.model.scheduler) is not None:
                scheduler.close(sid)   # it may yet open it: then it closes it again
            refusal = [RefusalReason.NOT_READY.value, "server is not ready (its back end did "
                       f"not answer within {BACK_END_ANSWER_S:g} s)", None]
        finally:
            self._answer = None
        if self._streams.get(ctx) is not stream:   # closed meanwhile (shutdown)
            return
        if refusal is None:
            self._ready(stream, voice)
            return
        del self._streams[ctx]
        self._stop_stream(stream)
        self._state.release(self.client)
        reason, message, retry_after_s = refusal
        try:
            self._refuse(ctx, RefusalReason(reason) if reason in _REASONS
                         else RefusalReason.NOT_READY, message, retry_after_s)
        except ProtocolError as err:
            self._send_error(err)

    def _validate_start(self, msg: StartMsg) -> tuple[StreamSpec, StreamOptions, VoiceInfo]:
        """Every check of `start`, ending with the admission slot (held on success)."""
        if not self._starts.take(asyncio.get_running_loop().time()):
            self._refuse(msg.ctx, RefusalReason.START_RATE, "at most "
                         f"{self._limits.starts_per_s:g} streams started per second on one "
                         "socket", retry_after_s=1)
        if msg.ctx in self._streams:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "this ctx is already live", msg.ctx)
        voice = self._voice(msg)
        params = _params(voice, msg)
        check_sample_rate(msg, native_rate=voice.sample_rate)
        limit = self._limits.contexts_per_socket
        if len(self._streams) >= limit:
            raise ProtocolError(ErrorCode.TOO_MANY_CONTEXTS,
                                f"at most {limit} live contexts per socket", msg.ctx)
        per_client = self._limits.contexts_per_client
        if per_client and self._state.clients.held(self.client)[0] >= per_client:
            raise ProtocolError(ErrorCode.TOO_MANY_CONTEXTS, f"at most {per_client} live "
                                f"contexts per {self._state.client_kind}", msg.ctx)
        self._admit(msg.ctx)
        spec = StreamSpec(ctx=msg.ctx, stream_id=uuid.uuid4().hex, format=msg.format,
                          sample_rate=msg.sample_rate, words=msg.words,
                          lookahead_ms=self._state.cfg.scheduler.lookahead_ms)
        options = StreamOptions(params=params, max_buffer_delay_ms=msg.max_buffer_delay_ms,
                                words=msg.words, markdown=msg.markdown,
                                normalize=msg.normalize, read_code=msg.read_code,
                                catch_up=(msg.max_speed or msg.speed) / msg.speed)
        return spec, options, voice

    def _admit(self, ctx: str) -> None:
        """Hold an admission slot for `ctx`, or raise `overloaded` (with its log line)."""
        closing = (RefusalReason.SHUTTING_DOWN, "server is shutting down")
        if (why := closing if self._closing else self._state.unavailable()) is not None:
            self._refuse(ctx, *why)
        decision = self._state.admit(self.client)
        if not decision.ok:
            assert decision.reason is not None
            self._refuse(ctx, decision.reason, decision.message, decision.retry_after_s,
                         counted=True)

    def _refuse(self, ctx: str, reason: RefusalReason, message: str,
                retry_after_s: int | None = None, *, counted: bool = False) -> NoReturn:
        """Refuse a `start` with `overloaded`: counted by reason (unless admission already did,
        `counted`) and logged, rate-limited."""
        if not counted:
            self._state.admission.count_refusal(reason)
        self._state.refusal_log.refused(reason, "stream refused ctx=%r peer=%s: overloaded (%s)",
                                        ctx, self.peer, message)
        if retry_after_s is None:
            retry_after_s = self._state.admission.retry_hint()
        raise ProtocolError(ErrorCode.OVERLOADED, message, ctx, retry_after_s=retry_after_s)

    def _open_stream(self, spec: StreamSpec, msg: StartMsg, voice: VoiceInfo) -> ContextStream:
        try:
            encoder = make_encoder(spec.format.value, in_rate=voice.sample_rate,
                                   out_rate=spec.sample_rate, bitrate=msg.bitrate,
                                   complexity=self._state.cfg.audio.opus_complexity)
        except ValueError as exc:  # the decoder's checks should make this unreachable
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc), msg.ctx) from exc
        pool = self._state.audio_pool
        assert pool is not None, "the audio pool lives as long as the app"
        return ContextStream(spec, encoder=encoder, outbox=self._outbox, pool=pool,
                             metrics=self._state.metrics, on_end=self._stream_ended)

    def _voice(self, msg: StartMsg) -> VoiceInfo:
        """Only the voice the server loaded can speak (other installed voices are listed by
        /v1/voices with `loaded: false`)."""
        voice = self._state.model.voice
        if msg.voice is None or msg.voice == voice.id:
            return voice
        why = "is not loaded on this server" if msg.voice in self._state.voices else "is unknown"
        raise ProtocolError(ErrorCode.UNKNOWN_VOICE,
                            f"voice {msg.voice!r} {why}; available: {voice.id}", msg.ctx)

    def _text(self, msg: TextMsg) -> None:
        stream = self._writable(msg.ctx, "text")
        limit = self._limits.max_text_chars
        if stream.chars + len(msg.text) > limit:
            raise ProtocolError(ErrorCode.TEXT_TOO_LONG, f"this text would take the stream over "
                                f"its limit of {limit} characters", msg.ctx)
        stream.chars += len(msg.text)
        if msg.text:
            self._scheduler().text(stream.spec.stream_id, msg.text)
            stream.text_received()

    def _cancel(self, ctx: str) -> None:
        """Barge-in: stop the stream's output now and acknowledge; idempotent per ctx."""
        stream = self._streams.pop(ctx, None)
        if stream is None:
            self._outbox.put(encode_cancelled(ctx=ctx), ctx=ctx)
            return
        # `cancelled` holds its place (a `ready` for the same ctx may follow at once) until
        # the scheduler has dropped the stream between two steps and knows its final usage;
        # the socket's other contexts' messages go on past it meanwhile.
        sid = stream.spec.stream_id
        reply = self._outbox.reserve(
            encode_cancelled(ctx=ctx), ctx=ctx, wait_s=CANCEL_ANSWER_S,
            what=f"stream {sid} cancelled ctx={ctx!r}: its usage")
        self._stopping_task(stream.cancel(reply))   # it logs the cancel, with the usage
        self._scheduler().cancel(sid)
        self._state.release(self.client)
        self._last_activity = asyncio.get_running_loop().time()

    def _writable(self, ctx: str, kind: str) -> ContextStream:
        """The live stream `ctx` that may still take `text`/`flush`/`end`."""
        stream = self._streams.get(ctx)
        if stream is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"'{kind}' for a ctx that is not live (send 'start' first)", ctx)
        if stream.ended:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{kind}' after 'end'", ctx)
        return stream

    def _send_error(self, err: ProtocolError) -> None:
        self._state.count_error(err.code.value)
        self._outbox.put(err.to_frame(), ctx=err.ctx)

    # ------------------------------------------------------------------ stream endings

    def _stream_ended(self, stream: ContextStream, end: StreamEnd) -> None:
        """A stream finished on its own (done, failed): free its context and slot."""
        ctx, sid = stream.spec.ctx, stream.spec.stream_id
        if self._streams.get(ctx) is stream:
            del self._streams[ctx]
        if not end.scheduler_knows:
            self._scheduler().close(sid)
        self._state.release(self.client)
        self._last_activity = asyncio.get_running_loop().time()
        level = logging.INFO if end.outcome != "failed" else logging.WARNING
        log.log(level, "stream %s %s ctx=%r %s", sid, end.outcome, ctx, end.detail)

    def _drop_streams(self, reason: str) -> None:
        """Close every live stream at once (disconnect, shutdown): no output, slots freed."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self._stop_stream(stream)
            scheduler = self._state.model.scheduler
            if scheduler is not None:
                scheduler.close(stream.spec.stream_id)
            self._state.release(self.client)
            log.info("stream %s closed ctx=%r (%s)", stream.spec.stream_id, stream.spec.ctx,
                     reason)

    def _stop_stream(self, stream: ContextStream) -> None:
        self._stopping_task(stream.detach())

    def _stopping_task(self, task: asyncio.Task[None] | None) -> None:
        """A stopped stream's task, awaited before the session ends."""
        if task is not None:
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    def _scheduler(self) -> Scheduler:
        scheduler = self._state.model.scheduler
        if scheduler is None:  # only before warm-up, when `start` is refused anyway
            raise ProtocolError(ErrorCode.OVERLOADED, "server is not ready")
        return scheduler


def _params(voice: VoiceInfo, msg: StartMsg) -> SynthesisParams:
    """Per-request settings over the voice's defaults; speed is relative to the voice's pace."""
    cfg = voice.config
    return SynthesisParams(
        speaker=_speaker_id(voice, msg),
        noise_scale=cfg.noise_scale if msg.noise_scale is None else msg.noise_scale,
        length_scale=cfg.length_scale / msg.speed,
        noise_w=cfg.noise_w if msg.noise_w is None else msg.noise_w,
    )


def _speaker_id(voice: VoiceInfo, msg: StartMsg) -> int:
    speaker = msg.speaker
    cfg = voice.config
    if speaker is None:
        return 0
    if isinstance(speaker, str):
        if speaker in cfg.speaker_id_map:
            return cfg.speaker_id_map[speaker]
    elif speaker < max(1, cfg.num_speakers):
        return speaker
    raise ProtocolError(ErrorCode.UNKNOWN_VOICE,
                        f"voice {voice.id} has no speaker {speaker!r}", msg.ctx)


class TokenBucket:
    """`rate` events per second on average, `burst` at once: take() spends one if there is one."""

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self._rate, self._burst = rate, burst
        self._tokens, self._at = burst, now

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
