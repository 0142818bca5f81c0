"""Run the streaming TTS server: `python run_server.py [--config FILE] [--port N] ...`.

The server listens at once and loads the voice in the background; /healthz turns 200 and the
log says "serving on ..." once it is warmed up. SIGTERM, SIGINT (Ctrl-C) or SIGHUP shut it down
gracefully: no new streams, and the live ones get `server.drain_s` to finish; then (or at a
second signal) those still live get an `error` (internal, "server shutting down") and their
sockets close with 1001.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import logging.handlers
import os
import queue
import re
import sys
import time
from collections.abc import Callable
from typing import Any, Final, TextIO

import uvloop
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_runner import GracefulExit

from server.app import EarlySignals, ShutdownSignals, create_app
from server.config import (
    ConfigError,
    ServerConfig,
    add_config_arguments,
    load_config,
    overrides_from_args,
)
from server.fds import FD_RESERVE, raise_open_file_limit, socket_cap
from server.supervisor import clean_up_after, serve_split
from streaming_tts.voices import UnknownVoiceError

log = logging.getLogger("run_server")

LOG_FORMAT: Final = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Time for in-flight HTTP requests after the sockets have been closed at shutdown.
SHUTDOWN_TIMEOUT_S: Final = 10.0
# Log lines waiting for the writer thread at most (then lines are dropped, never waited for).
LOG_QUEUE_LINES: Final = 10_000
LOG_STOP_WAIT_S: Final = 5.0
# Unparsable HTTP requests logged at most, per window (one client can send thousands a second).
BAD_REQUEST_LINES: Final = 20
BAD_REQUEST_WINDOW_S: Final = 10.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Streaming text-to-speech server (WebSocket).")
    add_config_arguments(parser)
    # How a back end (--front-ends N) starts its front ends (server/supervisor.py).
    parser.add_argument("--front-end-of", dest="front_end_of", help=argparse.SUPPRESS)
    parser.add_argument("--front-end-name", dest="front_end_name", default="fe",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, overrides_from_args(args))
    except ConfigError as exc:
        parser.error(str(exc))
    tag = f"[{args.front_end_name}] " if args.front_end_of else ""
    writer = setup_logging(cfg.server.log_level, tag=tag)
    # Before anything is made that a signal's default action would leave behind.
    early = EarlySignals(front_end=bool(args.front_end_of))
    try:
        if args.front_end_of:
            return _run(cfg, early, front_end=(args.front_end_of, args.front_end_name))
        return _run(cfg, early, argv=sys.argv[1:] if argv is None else argv)
    finally:
        early.restore()
        if writer is not None:
            writer.stop()   # writes out what is queued


def _openmp_spin(cfg: ServerConfig) -> None:
    """engine.omp_spin_count into the environment, where libgomp reads it as PyTorch loads
    (the model thread imports it later; front ends never do). The environment's own wins."""
    spin = cfg.engine.omp_spin_count
    if spin < 0 or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return
    if "torch" in sys.modules:   # too late for libgomp to read it
        log.warning("engine.omp_spin_count: PyTorch is loaded already; not applied")
        return
    os.environ["GOMP_SPINCOUNT"] = str(spin)


def _run(cfg: ServerConfig, early: EarlySignals | None = None, *,
         argv: list[str] | None = None,
         front_end: tuple[str, str] | None = None) -> int:
    log.debug("effective config: %s", cfg.as_dict())
    before, after = raise_open_file_limit()
    raised = f" (raised from {before})" if after != before else ""
    log.info("open-file limit %d%s: up to %d WebSockets", after, raised,
             socket_cap(cfg.limits.max_sockets, after))
    if cfg.limits.max_sockets > after - FD_RESERVE:
        log.warning("limits.max_sockets %d leaves fewer than %d of the %d open files for "
                    "anything else: connections past the limit are dropped unanswered",
                    cfg.limits.max_sockets, FD_RESERVE, after)
    _openmp_spin(cfg)
    # A front end runs no model (and must not touch the GPU: server/split.py).
    if front_end is None and (problem := device_problem(cfg.engine.device)) is not None:
        log.error("%s", problem)
        return 2
    try:
        if front_end is not None:
            serve(cfg, early, front_end=front_end)
        elif cfg.server.front_ends > 0:
            return serve_split(cfg, argv or [], early=early)
        else:
            serve(cfg, early)
    except (UnknownVoiceError, FileNotFoundError) as exc:   # a voice id or file that is not there
        log.error("%s", exc)
        return 2
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot serve on %s:%d: %s", cfg.server.host, cfg.server.port, exc)
        return 1
    return 0


def device_problem(device: str) -> str | None:
    """Why the configured torch device cannot run here (one line), or None."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        why = ("this PyTorch is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")
        return f"device {device!r}: {why} (torch {torch.__version__}); use --device cpu"
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        return f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
    return None


class _QueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread; never waits. If the queue is full (stderr has not
    been drained for LOG_QUEUE_LINES lines), a line is dropped and counted rather than
    stalling the event loop and every stream with it."""

    def __init__(self, q: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(q)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:   # say so in the log, as soon as there is room again
                self.queue.put_nowait(logging.makeLogRecord({
                    "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
                    "msg": f"{self.dropped} log line(s) dropped: stderr was not read"}))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _LogWriter(logging.handlers.QueueListener):
    """The thread that writes log lines. `stop()` takes its handler off the root logger and
    writes out what is queued, waiting at most LOG_STOP_WAIT_S for room in the queue (stderr
    may still not be read at exit)."""

    def __init__(self, q: queue.Queue[logging.LogRecord], handler: logging.Handler, *,
                 queued: _QueueHandler) -> None:
        super().__init__(q, handler)
        self._queued = queued

    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel, timeout=LOG_STOP_WAIT_S)

    def stop(self) -> None:
        logging.getLogger().removeHandler(self._queued)
        try:
            self.enqueue_sentinel()
        except queue.Full:
            return   # the thread is a daemon: what is still queued is lost with the process
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class _BadRequestFilter(logging.Filter):
    """aiohttp logs an HTTP request it cannot parse (a header line over 8 KiB, too many
    headers) at ERROR with a traceback quoting the client's bytes, a URL's `?token=` among
    them: any client could fill the log for free. It is the client's error, refused with 400:
    one INFO line naming the error, without its bytes, and at most `lines` of them per
    `window_s` (the next line logged says how many were left out)."""

    def __init__(self, lines: int = BAD_REQUEST_LINES, window_s: float = BAD_REQUEST_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._lines, self._window_s, self._clock = lines, window_s, clock
        self._window_start, self._logged, self._left_out = float("-inf"), 0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        now = self._clock()
        if now - self._window_start >= self._window_s:
            self._window_start, self._logged = now, 0
        if self._logged >= self._lines:
            self._left_out += 1
            return False
        self._logged += 1
        left_out = (f"; {self._left_out} more bad request(s) before it were not logged"
                    if self._left_out else "")
        self._left_out = 0
        record.msg, record.args = "%s: %s (%s), refused%s", (
            record.getMessage(), type(exc).__name__, exc.code, left_out)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


class _RedactTokens(logging.Filter):
    """The access log (on at DEBUG) quotes each request line and Referer, `?token=KEY`
    included: every query value is masked, whatever the name is spelled as (aiohttp takes
    `?tok%65n=KEY` for `token`, and a key sent under a wrong name is still a key)."""

    _TOKEN = re.compile(r"([?&][^=&\s\"]*=)[^&\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._TOKEN.sub(r"\1***", record.getMessage())
        record.args = None
        return True


def setup_logging(level: str, stream: TextIO | None = None, *,
                  force: bool = False, tag: str = "") -> _LogWriter | None:
    """Log lines are written by a thread of their own: a write to stderr blocks when whoever
    reads it (a terminal, a pipe to a log collector) falls behind, and the event loop logs
    each stream's lifecycle. Returns the writer; `stop()` it to write out what is queued.
    Like `logging.basicConfig`, this leaves a root logger that already has handlers (the
    process embeds the server, or a test captures its log) as it is, unless `force`; then
    it only sets the level, and returns None. `tag` starts each line (which process wrote it,
    where the server runs as several)."""
    root = logging.getLogger()
    root.setLevel(level)
    if level != "DEBUG":
        # One line per HTTP request (the browser polls /v1/status every 2 s) drowns the stream
        # lifecycle lines; keep the access log for debugging.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(_BadRequestFilter())
    access_log = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, _RedactTokens) for f in access_log.filters):
        access_log.addFilter(_RedactTokens())
    if root.handlers and not force:
        return None
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT.replace("%(name)s", tag + "%(name)s")))
    q: queue.Queue[logging.LogRecord] = queue.Queue(LOG_QUEUE_LINES)
    queued = _QueueHandler(q)
    root.handlers[:] = [queued]
    writer = _LogWriter(q, handler, queued=queued)
    writer.start()
    return writer


def serve(cfg: ServerConfig, early: EarlySignals | None = None, *,
          front_end: tuple[str, str] | None = None) -> None:
    """Run until SIGTERM, SIGINT or SIGHUP (draining first: ShutdownSignals), on uvloop.
    `front_end` (the back end's socket, this process's name): serve the sockets for a back end
    (server/split.py), sharing the port with the other front ends."""
    # The address as bound (with --port 0, the port the system chose: `listening`).
    url = [f"http://{cfg.server.host}:{cfg.server.port}"]
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    split: dict[str, Any] = {}
    lost: list[bool] = []   # the back end went away (the link dropped)

    def back_end_lost() -> None:
        lost.append(True)
        loop.call_soon(_exit)
    if front_end is not None:
        split = {"front_end_of": front_end[0], "front_end_name": front_end[1],
                 "on_back_end_lost": back_end_lost}
    app = create_app(cfg, on_ready=lambda: log.info("serving on %s", url[0]), **split)
    listener: list[web.BaseSite] = []

    def stop_listening() -> None:
        """A front end signalled alone (ShutdownSignals): the kernel hands the port's new
        connections to the other front ends once this one's socket is closed."""
        for site in listener:
            loop.create_task(site.stop())
        listener.clear()
    signals = ShutdownSignals(app, cfg.server.drain_s, stop=lambda: loop.call_soon(_exit),
                              front_end=front_end is not None,
                              stop_listening=stop_listening)

    async def install(_app: web.Application) -> None:
        signals.install(loop, early)
    # First of the start-up: under uvloop a signal that comes while the loop runs reaches a
    # handler installed after it too, and EarlySignals would have caught it already.
    app.on_startup.insert(0, install)

    def listening(site: web.TCPSite) -> None:
        listener.append(site)
        url[0] = site.name   # with --port 0, the port the system chose
        if front_end is not None:
            log.info("listening on %s; waiting for the back end", url[0])
        else:
            log.info("listening on %s; loading voice %s on %s", url[0], cfg.engine.voice,
                     cfg.engine.device)

    back_end_pid = os.getppid()
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           # aiohttp's bound on receiving a request's head, as on an idle
                           # keep-alive
                           keepalive_timeout=cfg.server.request_timeout_s)
    _run_app(loop, runner, listening, host=cfg.server.host, port=cfg.server.port,
             reuse_port=True if front_end is not None else None)
    if front_end is not None and lost:
        clean_up_after(back_end_pid, front_end[0])
    log.info("server stopped")


def _run_app(loop: asyncio.AbstractEventLoop, runner: web.AppRunner,
             listening: Callable[[web.TCPSite], None], **site: Any) -> None:
    """aiohttp's `web.run_app` on `loop` (until GracefulExit: `_exit`), handing `listening` the
    site once it listens, so that it can be stopped alone (run_app keeps it to itself)."""
    async def run() -> None:
        await runner.setup()   # the app's start-up: the voice starts loading
        try:
            tcp = web.TCPSite(runner, **site)
            await tcp.start()   # OSError: the port is taken
            listening(tcp)
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()   # stops listening, shuts the app down (the sockets' close)

    main = loop.create_task(run())
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            for task in left:
                if not task.cancelled() and task.exception() is not None:
                    loop.call_exception_handler({"message": "a task failed at shutdown",
                                                 "exception": task.exception(), "task": task})
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def _exit() -> None:
    raise GracefulExit()   # from a loop callback it ends _run_app, which then cleans up


if __name__ == "__main__":
    sys.exit(main())
