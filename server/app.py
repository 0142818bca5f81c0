"""The aiohttp application: shared state, background tasks and routes.

`create_app` builds everything cheap at once (config, metrics, admission, the voice list) and
leaves the slow part to background tasks owned by cleanup contexts:
  * model: load the voice and engine and warm up in a worker thread (/healthz is 503 until
    then), measure the per-stream VRAM on CUDA, then run the scheduler (the one coroutine that
    owns the engine) until the app stops;
  * loop lag: a 50 ms sleep probe feeding the event-loop lag metrics;
  * GPU: NVML readings every `metrics.sample_interval_s`, when a GPU is there.
On shutdown every live socket gets its streams failed with `error` (internal) and close 1001.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from server import http, proxies
from server.admission import AdmissionController, EncoderLoad, LoadEstimate
from server.config import ServerConfig
from server.encoders import EncoderPool
from server.fds import open_file_limit, socket_cap
from server.metrics import Metrics
from server.monitors import sample_gpu, watch_loop_lag
from server.proxies import parse_networks
from server.split import LINK, RemoteScheduler, link_server_ctx, run_front_end_link
from server.state import STATE, ModelSlot, ServerState
from streaming_tts.gpu import GpuMonitor
from streaming_tts.voices import VoiceRegistry

if TYPE_CHECKING:
    from server.model import EngineLoader
    from streaming_tts.engine import Engine

log = logging.getLogger(__name__)

# How long shutdown waits for all sockets to take their `error` and close.
SHUTDOWN_TIMEOUT_S: Final = 5.0
# How often a drain looks whether the live streams have finished.
_DRAIN_POLL_S: Final = 0.1
# A front end signalled (SIGTERM, SIGINT, SIGHUP) waits this long for its back end's word: where
# that comes, the whole server is stopping (systemd signals every process of a service) and it
# drains listening, its new connections answered 503 + Retry-After; where it does not, it was
# signalled alone and stops listening, the port's new connections going to the other front ends.
ALONE_AFTER_S: Final = 0.25
# Admission's view of load before the scheduler exists (nothing measured, nothing running).
_NO_LOAD: Final = LoadEstimate(active_streams=0, demand_audio_s_per_s=0.0,
                               capacity_audio_s_per_s=None)

LoadSource = Callable[[], Any]  # returns an admission.LoadEstimate-like object


def create_app(
    cfg: ServerConfig,
    *,
    engine: Engine | None = None,
    engine_loader: EngineLoader | None = None,
    warm_up: bool = True,
    gpu: GpuMonitor | None = None,
    load_source: LoadSource | None = None,
    loop_busy_source: Callable[[], float | None] | None = None,
    encoder_source: Callable[[], EncoderLoad | None] | None = None,
    on_ready: Callable[[], None] | None = None,
    web_client_dir: Path = http.WEB_CLIENT_DIR,
    front_end_of: str | None = None,
    front_end_name: str = "",
    on_back_end_lost: Callable[[], None] | None = None,
    serve_front_ends: str | None = None,
    on_front_end_retiring: Callable[[str], None] | None = None,
    on_front_end_stuck: Callable[[str, float], None] | None = None,
) -> web.Application:
    """The server app for `cfg`.

    Injection points (tests, tools): `engine` serves this engine instead of loading the voice
    file, and `engine_loader` builds one in the loading thread (e.g. a slow or failing one);
    `warm_up=False` skips the warm-up of an engine that is already warm; `gpu` replaces the
    NVML monitor (e.g. `GpuMonitor.fake(...)`); `load_source` replaces the scheduler's measured
    load in admission, `loop_busy_source` the event loop's measured busy fraction and
    `encoder_source` the encoder threads' load;
    `on_ready` runs once the server has turned healthy.

    Several processes (server/split.py): with `front_end_of` (the back end's Unix socket) this
    app is a front end, whose scheduler is the back end's (`on_back_end_lost` runs if that
    goes); with `serve_front_ends` (a socket path) it is the back end and serves its scheduler
    to the front ends there (`on_front_end_retiring`: one, by name, stops listening;
    `on_front_end_stuck`: one has sent nothing for server.front_end_silent_s, and that long).
    """
    voices = VoiceRegistry(cfg.engine.voices_dir)
    model = ModelSlot(voice=voices.resolve(cfg.engine.voice))
    if engine is not None:
        engine_loader = _given(engine)
    metrics = Metrics()
    # The GPU the engine computes on (by its CUDA UUID); none for a CPU engine. A front end
    # reads the back end's.
    monitor = (gpu if gpu is not None or front_end_of is not None
               else GpuMonitor.for_device(cfg.engine.device))
    available = monitor if monitor is not None and monitor.available else None
    if cfg.metering.price_per_kwh > 0 and available is None and front_end_of is None:
        log.warning("metering.price_per_kwh is set, but this server has no GPU power reading "
                    "(%s): usage.energy_j stays null and usage.cost prices compute time at "
                    "metering.price_per_gpu_hour only%s", "a CPU engine"
                    if cfg.engine.device == "cpu" else "NVML unavailable",
                    "" if cfg.metering.price_per_gpu_hour > 0 else " (0: cost is null)")
    admission = AdmissionController(
        cfg.admission,
        load_source=load_source or (lambda: _scheduler_load(model)),
        # The sampler's latest reading, not a fresh one: admission runs on the event loop.
        gpu_reader=((lambda: state.gpu_sample)
                    if available is not None or front_end_of is not None else None),
        loop_busy_reader=loop_busy_source or (lambda: state.loop_busy),
        encoder_reader=encoder_source or (lambda: state.encoders),
        elsewhere_reader=((lambda: _elsewhere(model)) if front_end_of is not None
                          else (lambda: _front_end_streams(app)) if serve_front_ends is not None
                          else None),
        on_refused=lambda reason: metrics.streams_refused.labels(reason=reason.value).inc(),
    )
    state = ServerState(cfg=cfg, metrics=metrics, admission=admission, voices=voices,
                        model=model, gpu=available, on_ready=on_ready,
                        max_sockets=socket_cap(cfg.limits.max_sockets, open_file_limit()))
    trusted = parse_networks(cfg.server.trusted_proxies)
    app = web.Application(middlewares=[proxies.middleware(trusted)] if trusted else [])
    app[STATE] = state
    app.cleanup_ctx.append(_audio_pool)
    app.cleanup_ctx.append(_background("loop-lag", _loop_lag))
    if available is not None:
        app.cleanup_ctx.append(_background("gpu-sampler", _gpu_sampler))
    if front_end_of is not None:
        app.cleanup_ctx.append(_background("model", lambda a: run_front_end_link(
            a, front_end_of, front_end_name, on_back_end_lost)))
    else:
        app.cleanup_ctx.append(_background("model",
                                           lambda a: _model(a, engine_loader, warm_up=warm_up)))
    if serve_front_ends is not None:
        app.cleanup_ctx.append(link_server_ctx(serve_front_ends, on_front_end_retiring,
                                               on_front_end_stuck))
    app.on_shutdown.append(_close_sessions)
    if gpu is None and monitor is not None:  # we opened NVML, we close it
        app.on_cleanup.append(lambda _app: _close_monitor(monitor))
    http.add_routes(app, web_client_dir=web_client_dir)
    return app


def _given(engine: Engine) -> EngineLoader:
    def loader(_voice: Any, _cfg: ServerConfig) -> Engine:
        return engine
    return loader


def _scheduler_load(model: ModelSlot) -> Any:
    return _NO_LOAD if model.scheduler is None else model.scheduler.load()


def _elsewhere(model: ModelSlot) -> int:
    """A front end: the streams the other front ends hold (server/split.py)."""
    remote = model.scheduler
    return remote.elsewhere() if isinstance(remote, RemoteScheduler) else 0


def _front_end_streams(app: web.Application) -> int:
    """A back end: the streams its front ends hold, which its admission decides on."""
    link = app.get(LINK)
    return 0 if link is None else link.live()


async def _close_monitor(monitor: GpuMonitor) -> None:
    monitor.close()


# ---------------------------------------------------------------------------- cleanup contexts

TaskBody = Callable[[web.Application], Coroutine[Any, Any, None]]


def _background(name: str, body: TaskBody) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that runs `body` as a task for the app's lifetime: create, yield,
    cancel, await."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(body(app), name=name)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return ctx


async def _audio_pool(app: web.Application) -> AsyncIterator[None]:
    """The threads that resample and encode audio for every stream."""
    state = app[STATE]
    cfg = state.cfg
    pool = EncoderPool(cfg.audio.workers_per_process(cfg.server.front_ends), metrics=state.metrics)
    state.audio_pool = pool
    yield
    pool.shutdown()


async def _loop_lag(app: web.Application) -> None:
    state = app[STATE]

    def gauges() -> None:
        state.metrics.sample_process()
        state.metrics.open_sockets.set(len(state.sessions))
        state.metrics.loop_tasks.set(len(asyncio.all_tasks()))
        scheduler = state.model.scheduler
        # A front end's scheduler is the back end's, which sets these (server/split.py).
        if scheduler is not None and not isinstance(scheduler, RemoteScheduler):
            state.metrics.queue_depth.set(scheduler.queue_depth)
            load = scheduler.load()
            state.metrics.capacity_load.set(load.utilisation)
            state.metrics.capacity.set(load.capacity_audio_s_per_s)
            state.metrics.streams_starting.set(load.starting_streams)
        if state.audio_pool is not None:
            state.encoders = state.audio_pool.sample()
            state.metrics.encode_busy_ratio.set(state.encoders.busy)

    def busy(fraction: float) -> None:
        state.loop_busy = fraction

    await watch_loop_lag(state.metrics, window_s=state.cfg.metrics.sample_interval_s,
                         on_window=gauges, on_busy=busy)


async def _gpu_sampler(app: web.Application) -> None:
    state = app[STATE]
    assert state.gpu is not None
    try:
        await sample_gpu(state, state.gpu)
    except asyncio.CancelledError:
        raise
    except Exception:  # monitoring must never take the server down
        log.exception("GPU sampler stopped")


async def _model(app: web.Application, loader: EngineLoader | None, *, warm_up: bool) -> None:
    """The model's task in one process or the back end: load, warm up, run the scheduler."""
    # Imported here, not above: torch and the model belong to this process alone, and a front
    # end (server/split.py) never imports them (~200 MB less in each).
    from server.model import load_engine, run_model

    await run_model(app[STATE], loader or load_engine, warm_up=warm_up)


async def _close_sessions(app: web.Application) -> None:
    """on_shutdown: no new streams; live ones get `error` (internal) and close 1001."""
    state = app[STATE]
    state.shutting_down = True
    sessions = list(state.sessions)
    if sessions:
        log.info("shutting down: closing %d socket(s)", len(sessions))
    try:
        async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
            await asyncio.gather(*(s.shutdown(state.stopping_because) for s in sessions),
                                 return_exceptions=True)
    except TimeoutError:
        log.warning("shutdown: sockets still open after %.0f s", SHUTDOWN_TIMEOUT_S)


# ---------------------------------------------------------------------------- draining


async def drain(app: web.Application, timeout_s: float) -> int:
    """Stop taking streams and let the live ones finish: new sockets get 503 + Retry-After, a
    `start` gets `overloaded` ("server is shutting down"), /healthz turns 503 so a load balancer
    sends new users elsewhere; returns once no stream is live or after `timeout_s`, with the
    number still live (shutdown then fails them with `error`)."""
    state = app[STATE]
    state.shutting_down = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    live = state.admission.active_streams
    if live:
        log.info("draining: %d live stream(s); waiting up to %g s for them to finish", live,
                 timeout_s)
    while state.admission.active_streams and loop.time() < deadline:
        await asyncio.sleep(_DRAIN_POLL_S)
    left = state.admission.active_streams
    if left:
        log.warning("drain: %d stream(s) still live after %g s; closing them", left, timeout_s)
    elif live:
        log.info("drained: every live stream finished")
    return left


class EarlySignals:
    """Shutdown signals that come before the event loop handles them: while the process starts
    (imports torch, makes the back end's directory, starts its front ends), SIGTERM's default
    action would kill it there and leave what it had made behind. Caught from the start and
    replayed once the loop's handlers are installed (ShutdownSignals.install). A second one
    meanwhile acts as the first would have, at once, except in a front end (`front_end`), whose
    own signals only ever drain (ShutdownSignals)."""

    def __init__(self, *, front_end: bool = False) -> None:
        self._front_end = front_end
        self.caught: list[signal.Signals] = []
        signals = ShutdownSignals.SIGNALS
        if front_end:
            signals += tuple(ShutdownSignals.PASSED_ON.values())
        self._before = {sig: signal.signal(sig, self._catch) for sig in signals}

    def _catch(self, signum: int, _frame: object) -> None:
        sig = signal.Signals(signum)
        if self.caught and not self._front_end:
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
        self.caught.append(sig)

    def replay(self, loop: asyncio.AbstractEventLoop,
               handler: Callable[[signal.Signals], None]) -> None:
        """Hand what was caught to `handler`, on `loop` (whose handlers now take the signals)."""
        for sig in self.caught:
            loop.call_soon(handler, sig)
        self.caught.clear()

    def restore(self) -> None:
        """Put back the handlers there were before (the process may go on: tests)."""
        for sig, before in self._before.items():
            signal.signal(sig, before)


class ShutdownSignals:
    """What SIGTERM, SIGINT and SIGHUP do: the first drains (`server.drain_s`) and then stops,
    a second one stops at once. `stop` ends the server (run_server raises GracefulExit).

    A front end (server/split.py; `front_end`) takes "stop now" from its back end alone, passed
    on as SIGUSR2 (SIGUSR1: drain): its own signals only drain, however many come. systemd, for
    one, signals every process of a service at once, and the back end passes its signal on: a
    front end must not take the two for a signal sent twice, in either order. A front end whose
    own signal is not followed by its back end's word (`ALONE_AFTER_S`) was signalled alone: it
    drains with its listener closed (`stop_listening`) and tells its back end, which starts
    another in its place (server/supervisor.py)."""

    SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    PASSED_ON: Final = {"drain": signal.SIGUSR1, "stop": signal.SIGUSR2}

    def __init__(self, app: web.Application, drain_s: float, stop: Callable[[], None], *,
                 front_end: bool = False, stop_listening: Callable[[], None] | None = None,
                 ) -> None:
        self._app, self._drain_s, self._stop = app, drain_s, stop
        self._front_end, self._stop_listening = front_end, stop_listening
        self._draining: asyncio.Task[None] | None = None
        self._alone: asyncio.TimerHandle | None = None   # a front end's own signal, unanswered

    def install(self, loop: asyncio.AbstractEventLoop, early: EarlySignals | None = None) -> None:
        """Handle the signals on `loop` from now on, and those `early` caught before."""
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self.received, sig)
        if self._front_end:
            loop.add_signal_handler(self.PASSED_ON["drain"], self.passed_on, False)
            loop.add_signal_handler(self.PASSED_ON["stop"], self.passed_on, True)
        if early is not None:
            early.replay(loop, self.handle)

    def handle(self, sig: signal.Signals) -> None:
        """What the signal `sig` means here (one caught before the loop's handlers)."""
        if sig in self.SIGNALS:
            self.received(sig)
        elif self._front_end:
            self.passed_on(sig == self.PASSED_ON["stop"])

    def received(self, sig: signal.Signals) -> None:
        if self._draining is None:
            self._shutdown(sig.name, now=False, again="" if self._front_end
                           else "; send it again to stop now")
            if self._front_end and self._draining is not None:
                self._alone = asyncio.get_running_loop().call_later(
                    ALONE_AFTER_S, self._signalled_alone, sig)
        elif self._front_end:
            log.info("%s: draining already (a front end stops at once when its back end says "
                     "so: signal the back end again)", sig.name)
        else:
            self._shutdown(sig.name, now=True)

    def passed_on(self, now: bool) -> None:
        """A front end: its back end's word (SIGUSR1: drain, SIGUSR2: stop now)."""
        if self._alone is not None:
            self._alone.cancel()   # the whole server stops
        if now or self._draining is None:   # a drain asked for twice is one drain
            self._shutdown("the back end", now=now)

    def _shutdown(self, who: str, *, now: bool, again: str = "") -> None:
        if not now and self._drain_s > 0:
            log.info("%s: no new streams; stopping once the live ones finish (at most %g s%s)",
                     who, self._drain_s, again)
            self._draining = asyncio.get_running_loop().create_task(self._drain_then_stop())
            return
        log.info("%s: stopping now", who)
        self._stop()

    def _signalled_alone(self, sig: signal.Signals) -> None:
        """A front end's own signal, and no word from its back end: this front end alone is to
        stop. It stops listening while it drains, so that new connections reach the other
        front ends, not its 503s, and tells the back end, which starts one in its place."""
        log.info("%s came to this front end alone (no word from the back end in %g s): no "
                 "longer listening; the other front ends take new connections", sig.name,
                 ALONE_AFTER_S)
        if self._stop_listening is not None:
            self._stop_listening()
        if (retire := self._app[STATE].retire) is not None:
            retire()

    async def _drain_then_stop(self) -> None:
        await drain(self._app, self._drain_s)
        self._stop()
