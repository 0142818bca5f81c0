"""The back end of a server split over several processes, and the front ends it starts.

`run_server.py --front-ends N` runs `serve_split`: this process loads the voice and runs the
scheduler (server/split.py's back end, no public port), and starts N front-end processes
(`run_server.py` again, with the same arguments and `--front-end-of SOCKET`) that share the
public port. It keeps them running: a front end that exits on its own is started again (its
streams were closed in the scheduler when its link dropped), unless front ends keep dying
within seconds of their start, which stops the server; one signalled alone, which drains its
streams no longer listening (ShutdownSignals), is replaced at once; one that has said nothing
for server.front_end_silent_s (stopped, or its event loop blocked: LinkServer.watch) is killed,
and so replaced. Each process started gets a name of its own (fe1, fe2, ...; a replacement the
next number). At SIGTERM, SIGINT or SIGHUP it passes the signal on (each front end drains its
streams, as one process would) and stops once they have all exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import uvloop
from aiohttp import web

from server.app import SHUTDOWN_TIMEOUT_S, EarlySignals, ShutdownSignals, create_app
from server.config import ServerConfig
from server.metrics import use_multiprocess_metrics
from server.state import STATE

if TYPE_CHECKING:
    from server.model import EngineLoader

log = logging.getLogger(__name__)

RUN_SERVER: Final = Path(__file__).resolve().parent.parent / "run_server.py"
# A front end that exits within this many seconds of its start counts as failing to start.
QUICK_EXIT_S: Final = 10.0
# ... and after this many such exits in a row the server stops (a bad port, a broken install).
QUICK_EXITS_MAX: Final = 3
RESTART_DELAY_S: Final = 1.0
# The back end's private directory (the link's socket, the metrics files) is named thus.
WORKDIR_PREFIX: Final = "streaming-tts-"
LINK_NAME: Final = "back-end.sock"   # in it: the link's socket,
METRICS_NAME: Final = "metrics"      # and prometheus_client's multiprocess files
# A front end whose link dropped waits this long to see its back end dead before it removes
# what the back end left (clean_up_after).
ORPHAN_WAIT_S: Final = 2.0
# Beyond the drain, how long front ends get to close their sockets before they are killed.
FRONT_END_STOP_S: Final = SHUTDOWN_TIMEOUT_S + 10.0
# ... and how long killed ones get to be reaped.
FRONT_END_KILL_WAIT_S: Final = 5.0


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind `host:port` with SO_REUSEPORT (not listening) so that the front ends, which bind it
    the same way, can share it, and nothing else can take it meanwhile; with port 0 the system
    picks it. Raises OSError when the port is taken, by another server of ours too: a socket
    with SO_REUSEPORT binds beside the others of the same user that have it, so first a plain
    bind, which nothing listening there lets through."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # past TIME_WAIT
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Starts, restarts and stops the front-end processes (on the back end's event loop)."""

    def __init__(self, cfg: ServerConfig, command: list[str], link: str, port: int,
                 metrics_dir: str | None) -> None:
        self._cfg, self._command, self._link, self._port = cfg, command, link, port
        self._env = dict(os.environ)
        if metrics_dir is not None:
            self._env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        self._procs: dict[str, asyncio.subprocess.Process] = {}   # running, by name
        self._named = 0   # front ends started so far
        self._retiring: dict[str, asyncio.Event] = {}   # set: that one drains, not listening
        self._killed: set[str] = set()   # found stuck, and killed (stuck)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._passed: signal.Signals | None = None   # the last word passed on (pass_on)
        self._quick_exits = 0
        self.failed = asyncio.Event()   # front ends keep failing to start: stop the server

    def start(self) -> None:
        for i in range(1, self._cfg.server.front_ends + 1):
            self._tasks.append(asyncio.create_task(self._keep(i), name=f"front-end-{i}"))

    async def _spawn(self, name: str) -> asyncio.subprocess.Process:
        cmd = [*self._command, "--port", str(self._port), "--front-end-of", self._link,
               "--front-end-name", name]
        # A session of its own: Ctrl-C in a terminal reaches this process alone, which tells
        # the front ends (Supervisor.pass_on).
        return await asyncio.create_subprocess_exec(*cmd, env=self._env, start_new_session=True,
                                                    stdin=asyncio.subprocess.DEVNULL)

    async def _keep(self, index: int) -> None:
        """Keep the `index`th front end running (under one name after another)."""
        while not self._stopping:
            started = time.monotonic()
            self._named += 1
            name = f"fe{self._named}"
            retiring = self._retiring[name] = asyncio.Event()
            try:
                proc = await self._spawn(name)
            except OSError as exc:   # no process (EMFILE, EAGAIN, ENOMEM): this slot tries again
                del self._retiring[name]
                go_on = self._count_exit(quick=True)
                log.error("front end %s could not be started: %s%s", name, exc,
                          "; trying again" if go_on else "")
                if not go_on:
                    return
                await asyncio.sleep(RESTART_DELAY_S)
                continue
            self._procs[name] = proc
            log.info("front end %s started (pid %d)", name, proc.pid)
            if self._passed is not None:
                # Started while the word was passed on (a SIGTERM during the start-up): it
                # gets the word too, else the drain would wait for it to be killed.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(self._passed)
            exited = asyncio.ensure_future(proc.wait())
            replaced = asyncio.ensure_future(retiring.wait())
            await asyncio.wait([exited, replaced], return_when=asyncio.FIRST_COMPLETED)
            replaced.cancel()
            del self._retiring[name]
            if not exited.done():   # signalled alone: it drains; another listens meanwhile
                self._tasks.append(asyncio.create_task(self._retired(name, exited),
                                                       name=f"front-end-{name}-retiring"))
                continue
            code, killed = self._exited(name)
            if self._stopping:
                log.info("front end %s stopped (exit %s)", name, code)
                return
            # Exit 0: it drained and stopped at a signal of its own, sent to it alone (a
            # service manager's reaches the back end as well, which then stops them all).
            go_on = self._count_exit(quick=time.monotonic() - started < QUICK_EXIT_S)
            log.log(logging.INFO if code == 0 else logging.ERROR,
                    "front end %s %s (exit %s%s)%s", name, _how_it_ended(code, killed), code,
                    ": stopped by a signal of its own" if code == 0 else "",
                    "; starting another" if go_on else "")
            if not go_on:
                return
            if code != 0:   # one that failed waits a little; one stopped (drained) not
                await asyncio.sleep(RESTART_DELAY_S)

    def _count_exit(self, *, quick: bool) -> bool:
        """A front end failed to start or exited (`quick`: within QUICK_EXIT_S of its start):
        whether its slot starts another. QUICK_EXITS_MAX quick ones in a row and the server
        stops (`failed`) rather than start front ends in a loop."""
        self._quick_exits = self._quick_exits + 1 if quick else 0
        if self._quick_exits < QUICK_EXITS_MAX:
            return True
        log.critical("front ends failed to start or exited within %.0f s of their start %d "
                     "times in a row; stopping", QUICK_EXIT_S, self._quick_exits)
        self.failed.set()
        return False

    async def _retired(self, name: str, exited: asyncio.Future[int]) -> None:
        await exited
        code, killed = self._exited(name)
        log.log(logging.INFO if code == 0 else logging.ERROR, "front end %s %s (exit %s)", name,
                "killed, stuck as it drained its streams" if killed
                else "stopped, having drained its streams", code)

    def _exited(self, name: str) -> tuple[int | None, bool]:
        """Forget front end `name`, which has exited: its exit code, and whether it was
        killed as stuck."""
        killed = name in self._killed
        self._killed.discard(name)
        proc = self._procs.pop(name)
        _forget_metrics(proc.pid)
        return proc.returncode, killed

    def retiring(self, name: str) -> None:
        """Front end `name` was signalled alone: it drains its streams, no longer listening;
        another starts in its place now, not once it has exited (the link's `retiring`)."""
        if not self._stopping and (retiring := self._retiring.get(name)) is not None:
            log.info("front end %s drains its streams, no longer listening: starting another "
                     "in its place", name)
            retiring.set()

    def stuck(self, name: str, silent_s: float) -> None:
        """Front end `name` has sent nothing for `silent_s` (the link's `on_stuck`): kill it.
        The kernel goes on handing a stopped process its share of the new connections, and
        its streams' listeners have heard nothing for that long already; its keeper then
        starts another (the link's drop has closed its streams in the scheduler)."""
        proc = self._procs.get(name)
        if proc is None or proc.returncode is not None:
            return
        log.error("front end %s has sent nothing for %.1f s: killing it (pid %d)%s", name,
                  silent_s, proc.pid, "" if self._stopping else "; another starts in its place")
        self._killed.add(name)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    def pass_on(self, *, now: bool) -> None:
        """Tell the front ends to drain (`now`: to stop at once). Not by passing the signal
        itself on: where a service manager has signalled every process already, a second
        SIGTERM would stop a front end at once instead of draining it (ShutdownSignals)."""
        self._stopping = True
        sig = self._passed = ShutdownSignals.PASSED_ON["stop" if now else "drain"]
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self, timeout_s: float) -> None:
        """Wait for the front ends to exit (signalled already, or now), then kill what is left.
        Waits for the keepers, not the processes: one being started is not among those yet,
        and gets the word once it is (_keep); and for the retired ones, which a keeper may
        still be handing over."""
        if not self._stopping:
            self.pass_on(now=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending := {t for t in self._tasks if not t.done()}:
            if loop.time() >= deadline:
                live = [p for p in self._procs.values() if p.returncode is None]
                log.warning("%d front end(s) still running after %.0f s; killing them",
                            len(live), timeout_s)
                for proc in live:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                await asyncio.wait(pending, timeout=FRONT_END_KILL_WAIT_S)
                break
            await asyncio.wait(pending, timeout=deadline - loop.time())
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _forget_metrics(pid: int) -> None:
    """A dead front end's live gauges leave /metrics (prometheus_client multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def clean_up_after(back_end_pid: int, link: str) -> None:
    """A front end whose back end went away, exiting: if the back end is dead (killed, by
    SIGKILL or the OOM killer, it removed nothing), remove what it would have removed at its
    exit: the link's socket, the metrics files of the back end and of this process, and the back
    end's directory once empty (the last front end to exit empties it). Only in a directory the
    back end made (`serve_split`); blocks up to `ORPHAN_WAIT_S`."""
    workdir = Path(link).parent
    if not workdir.name.startswith(WORKDIR_PREFIX):
        return
    # A dying process closes its files (the link: how this process heard) before its children
    # pass to another parent: until then the back end cannot be told from one that lives on.
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while os.getppid() == back_end_pid:
        if time.monotonic() > deadline:
            return   # it lives: it removes its directory itself
        time.sleep(0.01)
    metrics = workdir / METRICS_NAME
    for pid in (back_end_pid, os.getpid()):
        for path in metrics.glob(f"*_{pid}.db"):
            path.unlink(missing_ok=True)
    Path(link).unlink(missing_ok=True)
    for folder in (metrics, workdir):
        with contextlib.suppress(OSError):   # not empty: other front ends have not exited yet
            folder.rmdir()


def serve_split(cfg: ServerConfig, argv: list[str], *, front_end: list[str] | None = None,
                engine_loader: EngineLoader | None = None,
                early: EarlySignals | None = None) -> int:
    """Run the back end and its front ends until a shutdown signal; the exit status.

    Each front end runs `run_server.py` with `argv` (this process's arguments) and
    `--port P --front-end-of SOCKET --front-end-name NAME`; `front_end` replaces the command
    before those (a benchmark's own server), `engine_loader` the back end's voice loading."""
    command = front_end or [sys.executable, str(RUN_SERVER), *argv]
    host, port = cfg.server.host, cfg.server.port
    reserved = reserve_port(host, port)   # OSError: taken (run_server reports it)
    port = reserved.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
    link = str(Path(workdir) / LINK_NAME)
    metrics_dir = str(Path(workdir) / METRICS_NAME)
    os.mkdir(metrics_dir)
    use_multiprocess_metrics(metrics_dir)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_back_end(cfg, command, link, port, metrics_dir,
                                                 engine_loader, early))
    finally:
        reserved.close()
        loop.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _back_end(cfg: ServerConfig, command: list[str], link: str, port: int,
                    metrics_dir: str, engine_loader: EngineLoader | None,
                    early: EarlySignals | None) -> int:
    supervisor = Supervisor(cfg, command, link, port, metrics_dir)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0
    apps: list[web.Application] = []   # the back end's app, once made

    def received(sig: signal.Signals) -> None:
        nonlocal signals
        signals += 1
        for app in apps:   # front ends leaving from now on is no failure (their link's drop)
            app[STATE].shutting_down = True
        now = signals > 1 or cfg.server.drain_s <= 0
        log.info("%s: %s the front ends", sig.name, "stopping" if now else "draining")
        supervisor.pass_on(now=now)
        stop.set()

    # First of all: under uvloop a signal that comes while the loop runs reaches a handler
    # installed after it too, and EarlySignals would have caught it already.
    for sig in ShutdownSignals.SIGNALS:
        loop.add_signal_handler(sig, received, sig)
    if early is not None:
        early.replay(loop, received)
    url = f"http://{cfg.server.host}:{port}"
    app = create_app(cfg, serve_front_ends=link, engine_loader=engine_loader,
                     on_front_end_retiring=supervisor.retiring,
                     on_front_end_stuck=supervisor.stuck,
                     on_ready=lambda: log.info("back end ready: %d front end(s) serving on %s",
                                               cfg.server.front_ends, url))
    apps.append(app)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()   # starts the model's loading, and the link's socket
    log.info("back end: loading voice %s on %s; %d front end(s) on %s", cfg.engine.voice,
             cfg.engine.device, cfg.server.front_ends, url)
    supervisor.start()
    failed = asyncio.create_task(supervisor.failed.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([failed, stopped], return_when=asyncio.FIRST_COMPLETED)
    failed.cancel()
    stopped.cancel()
    await supervisor.stop(cfg.server.drain_s + FRONT_END_STOP_S)
    await runner.cleanup()
    log.info("server stopped")
    return 1 if supervisor.failed.is_set() else 0


def _how_it_ended(code: int | None, killed: bool) -> str:
    """A front end's end, in words: killed here as stuck, by someone else's signal (an operator,
    the OOM killer), or on its own."""
    if killed:
        return "killed, stuck"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"ended by {signal.Signals(-code).name}"
    return "exited on its own"
