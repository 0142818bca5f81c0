"""The server's shared state, stored on the aiohttp app under one typed key.

Everything here lives on the event loop. The model slot starts empty and is filled by the
background loading task (server/app.py); until then the server answers /healthz with 503 and
refuses streams as `overloaded`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from aiohttp import web

from server.admission import Admission, AdmissionController, EncoderLoad, RefusalReason
from server.config import ServerConfig
from server.encoders import EncoderPool
from server.metrics import Metrics
from server.refusal_log import RefusalLog
from server.split import BACK_END_SILENT_S, RemoteScheduler
from streaming_tts.gpu import GpuMonitor, GpuSample
from streaming_tts.voices import VoiceInfo, VoiceRegistry

if TYPE_CHECKING:   # the back end's alone: a front end never imports torch
    from streaming_tts.engine import Engine
    from streaming_tts.scheduler import Scheduler

log = logging.getLogger(__name__)


class Closable(Protocol):
    """What shutdown needs from a live socket session (server/session.py)."""

    async def shutdown(self) -> None: ...


@dataclass
class ModelSlot:
    """The voice being served and, once warmed up, the scheduler that owns its engine."""

    voice: VoiceInfo
    engine: Engine | None = None
    scheduler: Scheduler | None = None
    failure: str | None = None  # why loading (or the scheduler) stopped; the server stays 503

    @property
    def ready(self) -> bool:
        return self.scheduler is not None and self.failure is None

    def unanswered(self) -> str | None:
        """Why the model, ready, does not answer now: a front end's back end has sent no
        status for BACK_END_SILENT_S (server/split.py). None in one process, where a stuck
        server answers nothing at all."""
        remote = self.scheduler
        silent = remote.silent_s() if isinstance(remote, RemoteScheduler) else 0.0
        if silent >= BACK_END_SILENT_S:
            return f"its back end has not answered for {silent:.0f} s"
        return None


class ClientCounts:
    """Live contexts and open WebSockets per client (`limits.contexts_per_client`,
    `limits.sockets_per_client`): this process's own and, in a front end (server/split.py), the
    other front ends' as the back end last reported them, so that a limit holds for the whole
    server wherever the kernel sends a client's connections."""

    def __init__(self) -> None:
        self.contexts: Counter[str] = Counter()
        self.sockets: Counter[str] = Counter()
        # (contexts, sockets) of each client in the other front ends; the link's alone to write.
        self.elsewhere: dict[str, tuple[int, int]] = {}
        # Set by a front end's link where limits are per client: told of every change here.
        self.on_change: Callable[[str], None] | None = None

    def change(self, client: str, *, contexts: int = 0, sockets: int = 0) -> None:
        """`client` holds `contexts` and `sockets` more (or fewer) here; a client at zero
        leaves (a counter per client must not grow forever)."""
        for counter, delta in ((self.contexts, contexts), (self.sockets, sockets)):
            if delta:
                counter[client] += delta
                if counter[client] <= 0:
                    del counter[client]
        if self.on_change is not None:
            self.on_change(client)

    def held(self, client: str) -> tuple[int, int]:
        """(live contexts, open WebSockets) of `client` in the whole server."""
        other = self.elsewhere.get(client, (0, 0))
        return self.contexts[client] + other[0], self.sockets[client] + other[1]

    def mine(self, client: str) -> list[int]:
        """(live contexts, open WebSockets) of `client` in this process, for the link."""
        return [self.contexts[client], self.sockets[client]]


@dataclass
class ServerState:
    """Shared by the HTTP handlers, the sessions and the background tasks."""

    cfg: ServerConfig
    metrics: Metrics
    admission: AdmissionController
    voices: VoiceRegistry
    model: ModelSlot
    gpu: GpuMonitor | None = None  # None: no NVML (CPU), GPU fields report null
    gpu_sample: GpuSample | None = None  # the latest reading of the GPU sampler task
    loop_busy: float | None = None  # event-loop thread CPU / wall time, last sample interval
    encoders: EncoderLoad | None = None  # the encoder threads' load, last sample interval
    audio_pool: EncoderPool | None = None  # set by cleanup_ctx
    sessions: set[Closable] = field(default_factory=set)
    max_sockets: int = 0  # sessions held at most (server/fds.py); set by create_app
    shutting_down: bool = False
    # What live streams are told when the server stops (a front end: its back end went away).
    stopping_because: str = "server shutting down"
    on_ready: Callable[[], None] | None = None  # called once the model is warmed up
    # A front end: tells its back end it stops listening, to be replaced (ShutdownSignals).
    retire: Callable[[], None] | None = None
    refusal_log: RefusalLog = field(init=False)  # one line per refused stream, rate-limited
    clients: ClientCounts = field(default_factory=ClientCounts)  # limits.*_per_client

    def __post_init__(self) -> None:
        self.refusal_log = RefusalLog(logging.getLogger("server.admission"),
                                      self.cfg.admission.refusal_log_lines)

    @property
    def client_kind(self) -> str:
        """What a client is counted by (limits.*_per_client), for messages."""
        return "API key" if self.cfg.server.api_keys else "address"

    def session_opened(self, session: Closable, client: str) -> None:
        self.sessions.add(session)
        self.clients.change(client, sockets=1)

    def session_closed(self, session: Closable, client: str) -> None:
        self.sessions.discard(session)
        self.clients.change(client, sockets=-1)

    def unavailable(self) -> tuple[RefusalReason, str] | None:
        """Why no stream can start now whatever the load, with the message for the client:
        the server is draining or stopping, or its voice is still loading."""
        if self.shutting_down:
            return RefusalReason.SHUTTING_DOWN, "server is shutting down"
        if not self.model.ready:
            return RefusalReason.NOT_READY, "server is not ready (loading the voice)"
        if (why := self.model.unanswered()) is not None:
            return RefusalReason.NOT_READY, f"server is not ready ({why})"
        return None

    def admit(self, client: str) -> Admission:
        """Hold an admission slot for one new stream of `client` (release it with `release`)."""
        decision = self.admission.admit()
        if decision.ok:
            self.clients.change(client, contexts=1)
            self.metrics.active_streams.set(self.admission.active_streams)
        return decision

    def release(self, client: str) -> None:
        """One admitted stream of `client` ended (done, cancelled, failed or disconnected)."""
        self.admission.release()
        self.clients.change(client, contexts=-1)
        self.metrics.active_streams.set(self.admission.active_streams)

    def count_error(self, code: str) -> None:
        self.metrics.protocol_errors.labels(code=code).inc()

    def power_w(self) -> float | None:
        """GPU power from the sampler's latest reading: the scheduler meters energy with it
        after every step, so it must not call NVML on the event loop itself."""
        sample = self.gpu_sample
        return None if sample is None else sample.power_w


STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
