"""Serving from several processes: one back end owns the model, front ends own the sockets.

One process's threads share one GIL, and the sockets, the protocol and Opus take most of it
(~1.6-2.2 ms of GIL per second of each stream's audio: BENCHMARKS.md, "Where the event loop's
time goes at 100 streams, and the GIL"), so one process cannot feed the streams a GPU can.
With `server.front_ends` N > 0 (`run_server.py --front-ends N`):

  * the **back end** (the process started) loads the voice, runs the scheduler, the engine and
    the GPU sampler, and serves the front ends on a Unix socket (`LinkServer`); it binds no
    public port;
  * **N front ends** (child processes, `run_server.py ... --front-end-of SOCKET`) share the
    public port (SO_REUSEPORT: the kernel spreads connections over them) and run everything of
    a socket: sessions, the protocol, limits, pacing, resampling and Opus. Their scheduler is a
    `RemoteScheduler`: the same commands, sent to the back end; the stream's events come back
    to its `ContextStream` as if the scheduler were in process.

The link is msgpack over one Unix socket per front end, in order. Front end -> back end:
`["hello", name]` once, then `["open", sid, options]`, `["text", sid, text]`,
`["flush", sid]`, `["end", sid]`, `["cancel", sid]`, `["close", sid]`, where limits are per
client `["clients", {client: [contexts, sockets]}]` for the clients whose counts changed,
`["retiring", name]` when it was signalled alone and stops listening (ShutdownSignals),
`["alive", name, read]` a few times a second (`alive_interval`), and `["leaving", name, read]`
last, as it stops on purpose (its link's drop is then no failure); `read` is the number of the
last `done`/`cancelled` it has handed on.
Back end -> front end: `["admitted", sid]` or `["refused", sid, reason, message, retry]`
for each `open` (see below), `["phrase", sid, ...]`, `["audio", sid, float32 bytes, pts_ms]`,
`["done", sid, usage, n]`, `["cancelled", sid, usage, n]` (numbered: the back end keeps each
until the front end says it has read that far, and logs the usage of those it never read if
the front end goes), `["error", sid, code, message]`, and
`["status", {...}]` every `STATUS_INTERVAL_S` (ready or failed, the scheduler's load, the GPU
reading, the per-stream VRAM cost, stream counts, and what changed of each client's contexts
and sockets in the other front ends). Writes made in one turn of the event loop leave in one
system call.

Admission is decided twice. A front end first checks what is its own (its event loop, its
encoders, the per-client limits, the start rate) and the back end's latest status (the load,
the GPU reading, how many streams the others hold, plus the streams it opened since), refusing
at once what is plainly over a limit, before the upgrade where it can. What passes is opened in
the back end, whose admission decides with every front end's streams as it has read them
(`LinkServer.refusal`): `["admitted", sid]` or `["refused", sid, reason, message, retry]`, and
the front end answers the client's `start` with `ready` or `overloaded`. The opens of all
front ends reach the back end's one event loop in some order, so no two are admitted into the
same room and a burst into one front end gets all the room there is (before, each front end
counted its streams since a status once per front end, and one socket's 8 contexts at a load
of 25% got 5-8 `ready`). The cost is one round trip on the link before `ready`, while that
socket's next frames wait (BENCHMARKS.md, "The back end admits"). The limits per client
(`limits.contexts_per_client`, `limits.sockets_per_client`): a front end counts its own
exactly and the others' as of the last status, so they hold for the whole server whichever
front end the kernel hands a client's connections to, give or take what one client opens on
two front ends within one status.

If the back end goes, each front end fails its live streams (`error`, internal), turns
unhealthy and exits; if a front end goes, the back end closes its streams (nothing of them is
kept) and the supervisor (server/supervisor.py) starts another. A front end that sends nothing
for `server.front_end_silent_s` (stopped, or its event loop blocked) still holds its share of
the port, whose connections nobody answers: the back end has it killed (`on_stuck`), and so
replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

import msgpack
import numpy as np
from aiohttp import web

from server.admission import LoadEstimate
from streaming_tts.gpu import GpuSample
from streaming_tts.metering import usage_summary
from streaming_tts.params import SynthesisParams
from streaming_tts.stream import PhraseEvent, StreamOptions, StreamSink

if TYPE_CHECKING:
    from server.state import ClientCounts

log = logging.getLogger(__name__)

# How often the back end tells each front end its state (load, GPU, readiness).
STATUS_INTERVAL_S: Final = 0.02
# A front end that has heard no status for this long takes its back end as stuck (stopped, or
# its event loop blocked): /healthz says 503 and new streams are refused until it answers again
# (its live streams wait for it). In one process, a stuck server's /healthz goes unanswered.
BACK_END_SILENT_S: Final = 2.0
# A front end waits this long for the back end's socket to exist and answer.
CONNECT_TIMEOUT_S: Final = 30.0
# A front end says it is alive at least this often (more often where server.front_end_silent_s
# is short: `alive_interval`).
ALIVE_INTERVAL_S: Final = 1.0
# Bytes a link may hold unsent before its writer pauses reading the other way: the back end's
# output per stream is bounded by the lookahead, so this is only reached by a stuck peer.
MAX_UNSENT_BYTES: Final = 64 << 20
# ... and past this many the link is dropped (the peer's streams closed as if it had gone):
# paused, the peer still gets the streams' audio it does not read, so a front end stopped for
# good (server.front_end_silent_s 0: never killed) grew the back end's memory without bound.
MAX_UNREAD_BYTES: Final = 4 * MAX_UNSENT_BYTES
_MSGPACK_LIMIT: Final = 64 << 20


# A stream closed here before the back end answered its `open`: nobody waits for the word.
_GONE: Final = ["closed", "the stream was closed", None]


# ---------------------------------------------------------------------------- the wire


def options_to_wire(options: StreamOptions) -> dict[str, Any]:
    return asdict(options)   # `params` too: asdict recurses


def options_from_wire(wire: dict[str, Any]) -> StreamOptions:
    fields = dict(wire)
    fields["params"] = SynthesisParams(**fields["params"])
    return StreamOptions(**fields)


def alive_interval(silent_s: float) -> float:
    """How often a front end says it is alive, where one silent for `silent_s` is killed."""
    return min(ALIVE_INTERVAL_S, silent_s / 4) if silent_s > 0 else ALIVE_INTERVAL_S


def load_to_wire(load: LoadEstimate) -> list[Any]:
    return [load.active_streams, load.demand_audio_s_per_s, load.capacity_audio_s_per_s,
            load.starting_streams]


class Link(asyncio.Protocol):
    """One end of a front end <-> back end socket: msgpack messages (lists) both ways.

    `send` never blocks: what is sent within one turn of the event loop is written together at
    the end of it. `on_message` gets each message in order; `on_lost` once, when the socket
    closes (None: closed by this side)."""

    def __init__(self, on_message: Callable[[list[Any]], None],
                 on_lost: Callable[[Exception | None], None]) -> None:
        self._on_message, self._on_lost = on_message, on_lost
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=_MSGPACK_LIMIT)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._transport: Any = None
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: Any) -> None:   # uvloop's is no asyncio.Transport
        self._transport = transport
        transport.set_write_buffer_limits(high=MAX_UNSENT_BYTES)

    def data_received(self, data: bytes) -> None:
        self._unpacker.feed(data)
        for msg in self._unpacker:
            if self.closed:
                return
            try:
                self._on_message(msg)
            except Exception:   # a bad message is the peer's bug: log it, keep the link
                log.exception("link: message %r failed", msg[:2] if isinstance(msg, list) else msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._pending.clear()
            self._on_lost(exc)

    def pause_writing(self) -> None:
        # The peer reads nothing for MAX_UNSENT_BYTES: stop reading from it too, so that it
        # cannot pile up more work here either; it resumes once the peer reads again.
        if self._transport is not None:
            log.warning("link: the other process has not read %d MiB; pausing its input",
                        MAX_UNSENT_BYTES >> 20)
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def send(self, msg: list[Any]) -> None:
        if self.closed or self._transport is None:
            return
        self._pending.append(self._packer.pack(msg))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self._transport is not None and not self.closed:
            self._transport.writelines(self._pending)
            if (unread := self._transport.get_write_buffer_size()) > MAX_UNREAD_BYTES:
                log.error("link: the other process has left %d MiB unread; dropping the link",
                          unread >> 20)
                self._transport.abort()   # connection_lost follows, as if it had gone
        self._pending = []

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._flush()
            self.closed = True
            self._transport.close()


# ---------------------------------------------------------------------------- back end


class _RemoteSink:
    """A stream's events, forwarded to the front end that serves it (back end, event loop)."""

    __slots__ = ("_conn", "_sid")

    def __init__(self, conn: _FrontEndConnection, sid: str) -> None:
        self._conn, self._sid = conn, sid

    def on_phrase(self, phrase: PhraseEvent) -> None:
        self._conn.link.send(["phrase", self._sid, phrase.id, phrase.text, phrase.start_ms,
                              phrase.end_ms, [list(w) for w in phrase.words],
                              phrase.space_before])

    def on_audio(self, samples: np.ndarray, pts_ms: float) -> None:
        data = np.ascontiguousarray(samples, dtype=np.float32).tobytes()
        self._conn.link.send(["audio", self._sid, data, pts_ms])

    def on_done(self, usage: dict) -> None:
        self._report("done", usage)

    def on_cancelled(self, usage: dict | None) -> None:
        self._report("cancelled", usage)

    def _report(self, kind: str, usage: dict | None) -> None:
        """`done` or `cancelled` with the stream's usage to its front end, whose session logs
        it. Each such report is numbered, and kept until the front end says it has read that
        far; one that goes (dies, is killed as stuck) before it has, or is gone already, has
        the usage of the reports it did not read logged here: the log is their only record."""
        self._conn.ended(self._sid)
        self._conn.report(kind, self._sid, usage)

    def on_error(self, code: str, message: str) -> None:
        self._conn.ended(self._sid)
        self._conn.link.send(["error", self._sid, code, message])


class _FrontEndConnection:
    """The back end's side of one front end: its live streams, closed in the scheduler if the
    front end goes."""

    def __init__(self, server: LinkServer, name: str) -> None:
        self.server, self.name = server, name
        self.streams: set[str] = set()
        self.clients: dict[str, tuple[int, int]] = {}   # (contexts, sockets) it holds per client
        self.leaving = False   # it said it stops on purpose
        self.heard_at = time.monotonic()   # its last message came then
        self.stuck = False   # reported silent (LinkServer.watch)
        # `done`/`cancelled` sent and not yet read there, by number: (kind, sid, usage).
        self.unread: dict[int, tuple[str, str, dict | None]] = {}
        self.reports = 0   # numbered so far
        self.link = Link(self._on_message, self._on_lost)

    def ended(self, sid: str) -> None:
        self.streams.discard(sid)

    def report(self, kind: str, sid: str, usage: dict | None) -> None:
        """Send a stream's last word with its usage, numbered (see _RemoteSink._report)."""
        if self.link.closed:
            _log_unread(self.name, kind, sid, usage)
            return
        self.reports += 1
        self.unread[self.reports] = (kind, sid, usage)
        self.link.send([kind, sid, usage, self.reports])

    def _read_up_to(self, number: Any) -> None:
        """The front end has read every report up to `number`."""
        if isinstance(number, int):
            for seen in [n for n in self.unread if n <= number]:
                del self.unread[seen]

    def _on_message(self, msg: list[Any]) -> None:
        self.heard_at = time.monotonic()
        scheduler = self.server.scheduler()
        kind, sid = msg[0], msg[1]
        if kind == "alive":
            if len(msg) > 2:
                self._read_up_to(msg[2])
            return
        if kind == "hello":
            self.name = str(sid)
            log.info("front end %s connected", self.name)
            self.server.send_status(self, clients=self.server.client_totals)
            return
        if kind == "clients":
            self._on_clients(sid)
            return
        if kind == "leaving":
            self.leaving = True
            if len(msg) > 2:
                self._read_up_to(msg[2])
            return
        if kind == "retiring":   # it drains its streams, listening no more: start another
            if self.server.on_retiring is not None:
                self.server.on_retiring(self.name)
            return
        if scheduler is None:   # not ready: front ends admit nothing then
            if kind == "open":
                self.link.send(["refused", sid, "not_ready", "server is not ready (its back "
                                "end's model is not loaded)", None])
            return
        match kind:
            case "open":
                if (refusal := self.server.refusal()) is not None:
                    self.link.send(["refused", sid, *refusal])
                    return
                options = options_from_wire(msg[2])
                self.streams.add(sid)
                scheduler.open(sid, options, _RemoteSink(self, sid))
                self.server.state.admission.charge()
                self.link.send(["admitted", sid])
            case "text":
                scheduler.text(sid, msg[2])
            case "flush":
                scheduler.flush(sid)
            case "end":
                scheduler.end(sid)
            case "cancel":
                self.streams.discard(sid)
                scheduler.cancel(sid)
            case "close":
                self.streams.discard(sid)
                scheduler.close(sid)
            case _:
                log.error("front end %s sent an unknown message %r", self.name, kind)

    def _on_clients(self, counts: dict[str, list[int]]) -> None:
        for client, (contexts, sockets) in counts.items():
            was = self.clients.pop(client, (0, 0))
            if contexts or sockets:
                self.clients[client] = (contexts, sockets)
            self.server.client_moved(client, contexts - was[0], sockets - was[1])

    def _on_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for client, (contexts, sockets) in self.clients.items():
            self.server.client_moved(client, -contexts, -sockets)
        self.clients.clear()
        scheduler = self.server.scheduler()
        if scheduler is not None:
            for sid in self.streams:
                scheduler.close(sid)
        level = (logging.INFO if self.leaving or self.server.stopping
                 or self.server.state.shutting_down else logging.WARNING)
        log.log(level, "front end %s disconnected%s; %d stream(s) of it closed", self.name,
                f" ({exc})" if exc else "", len(self.streams))
        self.streams.clear()
        unread, self.unread = self.unread, {}
        for kind, sid, usage in unread.values():
            _log_unread(self.name, kind, sid, usage)


def _log_unread(front_end: str, kind: str, sid: str, usage: dict | None) -> None:
    """A stream's usage its front end did not read (it went first): the log's only record."""
    if usage and usage.get("chars"):
        log.info("usage of stream %s, %s (its front end %s gone before it read it): %s", sid,
                 kind, front_end, usage_summary(usage))


class LinkServer:
    """The back end's Unix socket for the front ends, and the status it sends them.

    `state` is the back end's ServerState (the model slot, the GPU reading, admission's
    per-stream VRAM cost, server.front_end_silent_s)."""

    def __init__(self, state: Any, path: str,
                 on_retiring: Callable[[str], None] | None = None,
                 on_stuck: Callable[[str, float], None] | None = None) -> None:
        self.state, self.path = state, path
        self.on_retiring = on_retiring   # a front end (by name) stops listening, to be replaced
        # A front end (by name) has sent nothing for that many seconds: to be killed.
        self.on_stuck = on_stuck
        self.silent_s = state.cfg.server.front_end_silent_s
        self._watched_at = time.monotonic()
        self.connections: set[_FrontEndConnection] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._count = 0
        # (contexts, sockets) per client over all front ends, and the clients whose counts
        # changed since the last status (limits.*_per_client; empty where those are off).
        self.client_totals: dict[str, tuple[int, int]] = {}
        self._clients_moved: set[str] = set()
        # The GPU reading by number, so that a front end keeps one object per reading (its
        # admission charges the streams it admitted since a reading against that reading).
        self._gpu_seen: tuple[Any, int] = (None, 0)

    def scheduler(self) -> Any:
        model = self.state.model
        return model.scheduler if model.ready else None

    async def start(self) -> None:
        def connection() -> Link:
            self._count += 1
            conn = _FrontEndConnection(self, f"#{self._count}")
            self.connections.add(conn)
            return conn.link
        self._server = await asyncio.get_running_loop().create_unix_server(connection, self.path)

    async def run_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.watch()
            moved, self._clients_moved = self._clients_moved, set()
            if self.connections:
                shared = self._shared_status()   # the load once a tick, whatever N
                for conn in list(self.connections):
                    self.send_status(conn, shared, clients=moved)

    def watch(self) -> None:
        """Report each front end that has sent nothing for `silent_s` (once). Where this
        process itself was held up for a good part of that (its own event loop blocked, or
        stopped), the front ends' words wait unread: each is given the time again."""
        if self.silent_s <= 0:
            return
        now = time.monotonic()
        held_up = now - self._watched_at > self.silent_s / 4
        if held_up:
            log.warning("the back end's event loop was held up %.1f s (blocked, or the process "
                        "stopped): its front ends' words waited unread, none is blamed",
                        now - self._watched_at)
        self._watched_at = now
        for conn in list(self.connections):
            if held_up:
                conn.heard_at = max(conn.heard_at, now)
            elif not conn.stuck and now - conn.heard_at >= self.silent_s:
                conn.stuck = True
                if self.on_stuck is not None:   # it logs what it does
                    self.on_stuck(conn.name, now - conn.heard_at)
                else:
                    log.error("front end %s has sent nothing for %.1f s (stopped, or its event "
                              "loop blocked)", conn.name, now - conn.heard_at)

    def live(self) -> int:
        """Streams the front ends hold (those this back end has opened and not yet closed)."""
        return sum(len(c.streams) for c in self.connections)

    def refusal(self) -> list[Any] | None:
        """Why the back end refuses a stream a front end opens, [reason, message, retry
        after s], or None: its admission, with every front end's streams as read here, decides
        (max_streams, the load ceiling, GPU memory; the front end has checked its own event
        loop, encoders and clients; the back end's own are checked too, so a front end may pass
        on an `event_loop` refusal about the back end). The opens of all front ends reach this
        one event loop in some order, so no two are admitted into the same room."""
        state = self.state
        if state.shutting_down:
            return ["shutting_down", "server is shutting down", None]
        decision = state.admission.check(count=False)
        if decision.ok:
            return None
        assert decision.reason is not None
        return [decision.reason.value, decision.message, decision.retry_after_s]

    def client_moved(self, client: str, contexts: int, sockets: int) -> None:
        """A front end holds `contexts` and `sockets` more (or fewer) of `client`'s."""
        was = self.client_totals.pop(client, (0, 0))
        now = (was[0] + contexts, was[1] + sockets)
        if now[0] > 0 or now[1] > 0:
            self.client_totals[client] = now
        self._clients_moved.add(client)

    def _shared_status(self) -> dict[str, Any]:
        """What every front end is told alike, read once a tick whatever the number of front
        ends: the scheduler's load looks at the streams (BENCHMARKS.md, "Several processes")."""
        model, state = self.state.model, self.state
        scheduler = self.scheduler()
        gpu = state.gpu_sample
        if gpu is not self._gpu_seen[0]:
            self._gpu_seen = (gpu, self._gpu_seen[1] + 1)
        return {
            "ready": model.ready,
            "failure": model.failure,
            "load": None if scheduler is None else load_to_wire(state.admission.load()),
            "live": self.live(),
            "vram_cost": state.admission.stream_vram_cost,
            "gpu": None if gpu is None else [self._gpu_seen[1], gpu.vram_used_bytes,
                                             gpu.vram_total_bytes, gpu.vram_free_bytes,
                                             gpu.util_percent, gpu.power_w, gpu.temperature_c],
        }

    def send_status(self, conn: _FrontEndConnection, shared: dict[str, Any] | None = None, *,
                    clients: Iterable[str] = ()) -> None:
        """`conn`'s status; `clients`: those whose counts in the other front ends it is told."""
        status = dict(shared or self._shared_status(), mine=len(conn.streams))
        if clients:
            status["clients"] = {client: self._elsewhere(conn, client) for client in clients}
        conn.link.send(["status", status])

    def _elsewhere(self, conn: _FrontEndConnection, client: str) -> tuple[int, int]:
        total, mine = self.client_totals.get(client, (0, 0)), conn.clients.get(client, (0, 0))
        return total[0] - mine[0], total[1] - mine[1]

    async def stop(self) -> None:
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.link.close()
        if self._server is not None:
            await self._server.wait_closed()


LINK: web.AppKey[LinkServer] = web.AppKey("link", LinkServer)   # the back end's


def link_server_ctx(path: str, on_retiring: Callable[[str], None] | None = None,
                    on_stuck: Callable[[str, float], None] | None = None,
                    ) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context serving the front ends on `path` for the back end's lifetime."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        from server.state import STATE

        server = LinkServer(app[STATE], path, on_retiring, on_stuck)
        app[LINK] = server
        await server.start()
        task = asyncio.create_task(server.run_status(), name="link-status")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop()
    return ctx


# ---------------------------------------------------------------------------- front end


@dataclass
class BackEndStatus:
    """What a front end last heard from the back end."""

    ready: bool = False
    failure: str | None = None
    load: LoadEstimate | None = None
    mine: int = 0           # this front end's streams the back end holds
    live: int = 0           # every front end's
    gpu: GpuSample | None = None
    gpu_seq: int = 0
    vram_cost: int | None = None


class RemoteScheduler:
    """The back end's scheduler, as a front end's sessions use it (streaming_tts.scheduler's
    `open`, `text`, `flush`, `end`, `cancel`, `close`, `load()`, `stream_count`); the back
    end's queue depth and capacity gauges are its own (/metrics adds the processes up)."""

    def __init__(self, link_send: Callable[[list[Any]], None]) -> None:
        self._send = link_send
        self._sinks: dict[str, StreamSink] = {}
        # Streams cancelled here whose `cancelled` (with their usage) the back end still owes;
        # they no longer count as this front end's.
        self._cancelling: dict[str, StreamSink] = {}
        # The back end's word on each stream opened and not yet answered: None (admitted) or
        # the refusal, [reason, message, retry after s].
        self._answers: dict[str, asyncio.Future[list[Any] | None]] = {}
        self.status = BackEndStatus()
        self.heard_at = time.monotonic()   # the last status came then
        self.reports_read = 0   # the back end's numbered `done`/`cancelled` handed on so far
        self.silence_told = False   # a silent back end was logged (check_silence)

    # ---- commands ----
    def open(self, sid: str, options: StreamOptions,
             sink: StreamSink) -> asyncio.Future[list[Any] | None]:
        """Open a stream in the back end; the future is its answer (see `_answers`). Until it
        comes the stream counts here as unseen (it holds the room it asked for)."""
        self._sinks[sid] = sink
        self._send(["open", sid, options_to_wire(options)])
        answer = self._answers[sid] = asyncio.get_running_loop().create_future()
        return answer

    def text(self, sid: str, text: str) -> None:
        self._send(["text", sid, text])

    def flush(self, sid: str) -> None:
        self._send(["flush", sid])

    def end(self, sid: str) -> None:
        self._send(["end", sid])

    def cancel(self, sid: str) -> None:
        if (sink := self._sinks.pop(sid, None)) is not None:
            self._cancelling[sid] = sink   # the session waits for its usage
        self._answer(sid, _GONE)
        self._send(["cancel", sid])

    def close(self, sid: str) -> None:
        self._sinks.pop(sid, None)
        self._cancelling.pop(sid, None)
        self._answer(sid, _GONE)
        self._send(["close", sid])

    def _answer(self, sid: str, answer: list[Any] | None) -> None:
        future = self._answers.pop(sid, None)
        if future is not None and not future.done():
            future.set_result(answer)

    # ---- what admission and the gauges read ----
    @property
    def stream_count(self) -> int:
        return len(self._sinks)

    def unseen(self) -> int:
        """Streams opened here that the back end had not read when it wrote its last status (on
        one ordered socket, what it answered for has come back before the status)."""
        return max(0, len(self._sinks) - self.status.mine)

    def elsewhere(self) -> int:
        """Streams the other front ends hold, as of the back end's last status."""
        return max(0, self.status.live - self.status.mine)

    def load(self, extra_streams: int = 0) -> LoadEstimate:
        """The back end's load as last reported, with the streams this front end opened since
        as starting streams (as the scheduler counts those not yet registered)."""
        load = self.status.load
        unseen = self.unseen() + extra_streams
        if load is None:   # the back end's model has stopped: nothing measured to go by
            return LoadEstimate(active_streams=unseen, demand_audio_s_per_s=float(unseen),
                                capacity_audio_s_per_s=None, starting_streams=unseen)
        return LoadEstimate(active_streams=load.active_streams + unseen,
                            demand_audio_s_per_s=load.demand_audio_s_per_s + unseen,
                            capacity_audio_s_per_s=load.capacity_audio_s_per_s,
                            starting_streams=load.starting_streams + unseen)

    # ---- the back end's messages ----
    def silent_s(self) -> float:
        """Seconds since the back end's last status."""
        return time.monotonic() - self.heard_at

    def check_silence(self) -> None:
        """Log once that the back end has sent no status for BACK_END_SILENT_S (this front
        end's /healthz is 503 and it refuses new streams meanwhile: ModelSlot.unanswered)."""
        if not self.silence_told and (silent := self.silent_s()) >= BACK_END_SILENT_S:
            self.silence_told = True
            log.warning("the back end has sent no status for %.1f s: refusing new streams "
                        "until it does", silent)

    def on_status(self, status: dict[str, Any]) -> None:
        if self.silence_told:
            self.silence_told = False
            log.info("the back end answers again after %.1f s", self.silent_s())
        self.heard_at = time.monotonic()
        load, gpu, last = status["load"], status["gpu"], self.status
        sample, seq = last.gpu, last.gpu_seq
        if gpu is None:
            sample = None
        elif gpu[0] != seq:
            seq, sample = gpu[0], GpuSample(*gpu[1:])
        self.status = BackEndStatus(
            ready=status["ready"], failure=status["failure"],
            mine=status["mine"], live=status["live"],
            load=None if load is None else LoadEstimate(*load), gpu=sample, gpu_seq=seq,
            vram_cost=status["vram_cost"])

    def on_event(self, msg: list[Any]) -> None:
        kind, sid = msg[0], msg[1]
        if kind == "admitted":
            self._answer(sid, None)
            return
        if kind == "refused":
            self._sinks.pop(sid, None)
            self._cancelling.pop(sid, None)
            self._answer(sid, msg[2:5])
            return
        if kind in ("done", "cancelled") and len(msg) > 3:
            self.reports_read = msg[3]
        if kind in ("done", "cancelled", "error"):   # the stream's last word
            sink = self._sinks.pop(sid, None) or self._cancelling.pop(sid, None)
        else:   # cancelled or closed here since: nothing more of it goes out
            sink = self._sinks.get(sid)
        if sink is None:
            return
        match kind:
            case "audio":
                sink.on_audio(np.frombuffer(msg[2], dtype=np.float32), msg[3])
            case "phrase":
                sink.on_phrase(PhraseEvent(id=msg[2], text=msg[3], start_ms=msg[4],
                                           end_ms=msg[5], words=[tuple(w) for w in msg[6]],
                                           space_before=msg[7]))
            case "done":   # (to a stream cancelled here since, its `cancelled` with usage)
                sink.on_done(msg[2])
            case "cancelled":
                sink.on_cancelled(msg[2])
            case "error":
                sink.on_error(msg[2], msg[3])
            case _:
                log.error("the back end sent an unknown message %r", kind)

    def fail_all(self, message: str) -> None:
        """The back end is gone: every live stream ends with `error` (internal)."""
        sinks, self._sinks = self._sinks, {}
        cancelling, self._cancelling = self._cancelling, {}
        for sink in cancelling.values():   # their usage is lost with the back end
            sink.on_cancelled(None)
        for sid in list(self._answers):   # not yet `ready`: refused (the session says so)
            sinks.pop(sid, None)
            self._answer(sid, ["not_ready", message, None])
        for sink in sinks.values():
            sink.on_error("internal", message)


async def run_front_end_link(app: web.Application, path: str, name: str,
                             on_lost: Callable[[], None] | None = None) -> None:
    """A front end's model task: connect to the back end at `path`, serve its scheduler to
    the sessions once it is ready, until the app stops. If the back end goes, every live stream
    gets `error`, /healthz turns 503 and `on_lost` runs (run_server stops the process)."""
    from server.state import STATE

    state = app[STATE]
    model = state.model
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[Exception | None] = loop.create_future()
    remote: RemoteScheduler | None = None

    def on_message(msg: list[Any]) -> None:
        assert remote is not None
        if msg[0] != "status":
            remote.on_event(msg)
            return
        remote.on_status(msg[1])
        if (clients := msg[1].get("clients")) is not None:
            for client, (contexts, sockets) in clients.items():
                if contexts > 0 or sockets > 0:
                    state.clients.elsewhere[client] = (contexts, sockets)
                else:
                    state.clients.elsewhere.pop(client, None)
        status = remote.status
        state.gpu_sample = status.gpu
        if status.failure is not None and model.failure is None:
            model.failure = f"back end: {status.failure}"
            remote.fail_all("the server's model stopped")
        if status.ready and model.scheduler is None and model.failure is None:
            if status.vram_cost is not None:
                state.admission.set_stream_vram_cost(status.vram_cost)
            model.scheduler = remote   # type: ignore[assignment]
            if state.on_ready is not None:
                state.on_ready()

    def lost_link(exc: Exception | None) -> None:
        if not lost.done():
            lost.set_result(exc)

    link = Link(on_message, lost_link)
    remote = RemoteScheduler(link.send)
    deadline = loop.time() + CONNECT_TIMEOUT_S
    while True:
        try:
            await loop.create_unix_connection(lambda: link, path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() > deadline:
                model.failure = f"no back end at {path}"
                log.error("front end %s: no back end at %s after %.0f s", name, path,
                          CONNECT_TIMEOUT_S)
                if on_lost is not None:
                    on_lost()
                return
            await asyncio.sleep(0.05)
    link.send(["hello", name])
    state.retire = lambda: link.send(["retiring", name])
    limits = state.cfg.limits
    if limits.contexts_per_client or limits.sockets_per_client:
        _report_clients(state.clients, link.send)
    alive = asyncio.create_task(
        _say_alive(link, name, alive_interval(state.cfg.server.front_end_silent_s), remote),
        name="link-alive")
    try:
        exc = await lost
    except asyncio.CancelledError:   # this front end stops
        link.send(["leaving", name, remote.reports_read])
        link.close()
        raise
    finally:
        alive.cancel()
        state.clients.on_change = None
    why = f" ({exc})" if exc else ""
    log.error("front end %s: the back end went away%s; failing %d live stream(s)", name, why,
              remote.stream_count)
    # Also what the streams not yet failed are told as this front end stops (a stream's
    # error waits for its pump; the stop, from `on_lost`, may close its socket first).
    model.failure = state.stopping_because = "the server's back end stopped"
    remote.fail_all(model.failure)
    if on_lost is not None:
        on_lost()


async def _say_alive(link: Link, name: str, interval_s: float, remote: RemoteScheduler) -> None:
    """Tell the back end, every `interval_s`, that this front end's event loop turns (one
    that stops doing so is killed: LinkServer.watch), and how far it has read the back end's
    numbered reports (their usage is then logged here, by the sessions)."""
    while not link.closed:
        link.send(["alive", name, remote.reports_read])
        remote.check_silence()
        await asyncio.sleep(interval_s)


def _report_clients(clients: ClientCounts, send: Callable[[list[Any]], None]) -> None:
    """Tell the back end this front end's count of each client's contexts and sockets (all of
    them now, then those that change, once per turn of the event loop)."""
    changed: set[str] = set()

    def flush() -> None:
        send(["clients", {client: clients.mine(client) for client in changed}])
        changed.clear()

    def on_change(client: str) -> None:
        if not changed:
            asyncio.get_running_loop().call_soon(flush)
        changed.add(client)

    clients.on_change = on_change
    for client in {*clients.contexts, *clients.sockets}:
        on_change(client)
