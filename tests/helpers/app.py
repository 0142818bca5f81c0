"""An in-process server for end-to-end tests (`tests/test_server.py`, `tests/test_gpu_server.py`)
and the checks both make of what a client received."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import opuslib
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.admission import LoadEstimate
from server.app import create_app
from server.config import load_config
from server.state import STATE, ServerState
from streaming_tts.engine import Engine
from tests.helpers.ws_client import ProtocolClient, Utterance, audio_duration_ms

# Small limits so each limit can be reached cheaply; generous ones elsewhere.
BASE = {"limits.contexts_per_socket": 3, "limits.max_text_chars": 200}
# Admission by measured load depends on how busy this (shared, 2-core) machine is; the tests
# here are about the protocol, so capacity is reported as not yet measured (max_streams rules).
UNMEASURED = LoadEstimate(active_streams=0, demand_audio_s_per_s=0.0, capacity_audio_s_per_s=None)


@dataclass
class Running:
    server: TestServer

    @property
    def state(self) -> ServerState:
        return self.server.app[STATE]

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))


@contextlib.asynccontextmanager
async def running(
    engine: Engine | None, overrides: dict[str, Any] | None = None, *, ready: bool = True,
    config_path: Path | None = None, ready_timeout: float = 120.0, **kwargs: Any,
) -> AsyncIterator[Running]:
    cfg = load_config(config_path, {**BASE, **(overrides or {})})
    kwargs.setdefault("load_source", lambda: UNMEASURED)
    # The tests' client shares the server's event loop and can keep it busy for a second (the
    # fuzzing, several streams decoded at once): admission on the loop's busy time is tested
    # on its own (pass loop_busy_source=None to measure it for real).
    kwargs.setdefault("loop_busy_source", lambda: None)
    kwargs.setdefault("encoder_source", lambda: None)   # likewise the encoder threads'
    kwargs.setdefault("warm_up", False)
    if engine is not None:
        kwargs["engine"] = engine
    app = create_app(cfg, **kwargs)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        if ready:
            # Warm-up (where a test asks for it) takes seconds, more on a busy host.
            await wait_for(lambda: app[STATE].model.ready, what="the model to load",
                           timeout=ready_timeout)
        yield Running(server)
    finally:
        await server.close()


@dataclass
class Split:
    """A server split over processes (server/split.py), in this process: the back end's app
    (no HTTP site) and front ends, each with its own test server."""

    back: web.Application
    fronts: list[Running]

    @property
    def back_state(self) -> ServerState:
        return self.back[STATE]


@contextlib.asynccontextmanager
async def running_split(
    engine: Engine, overrides: dict[str, Any] | None = None, *, front_ends: int = 2,
    on_back_end_lost: Callable[[], None] | None = None,
) -> AsyncIterator[Split]:
    """The back end serving `engine` and `front_ends` front ends linked to it on a Unix socket;
    the same test settings as `running` (capacity unmeasured, loop and encoder readings off)."""
    cfg = load_config(None, {**BASE, **(overrides or {})})
    quiet: dict[str, Any] = {"loop_busy_source": lambda: None, "encoder_source": lambda: None}
    with tempfile.TemporaryDirectory() as workdir:
        path = str(Path(workdir) / "back-end.sock")
        back = create_app(cfg, engine=engine, warm_up=False, load_source=lambda: UNMEASURED,
                          serve_front_ends=path, **quiet)
        runner = web.AppRunner(back)
        await runner.setup()
        servers: list[TestServer] = []
        try:
            for i in range(front_ends):
                app = create_app(cfg, front_end_of=path, front_end_name=f"fe{i}",
                                 on_back_end_lost=on_back_end_lost, **quiet)
                servers.append(TestServer(app, host="127.0.0.1"))
                await servers[-1].start_server()
            await wait_for(lambda: all(s.app[STATE].model.ready for s in servers),
                           what="the front ends to be ready", timeout=60)
            yield Split(back, [Running(s) for s in servers])
        finally:
            for server in servers:
                await server.close()
            await runner.cleanup()


async def wait_for(cond: Callable[[], bool], *, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)
    assert cond(), what


async def connect(http: aiohttp.ClientSession, r: Running, query: str = "",
                  **kwargs: Any) -> ProtocolClient:
    return await ProtocolClient.connect(http, r.url("/v1/stream") + query, **kwargs)


async def clean(r: Running) -> None:
    """Nothing of closed sockets is left: no sessions, no streams, no admission slots."""
    s = r.state
    await wait_for(lambda: not s.sessions and s.admission.active_streams == 0
                   and s.model.scheduler is not None and s.model.scheduler.stream_count == 0,
                   what="server back to idle")


def check_timeline(u: Utterance, *, sample_rate: int) -> float:
    """seq 0,1,2..; each pts = previous pts + previous duration; returns the total in ms."""
    assert [a["seq"] for a in u.audio] == list(range(len(u.audio)))
    pts = 0.0
    for msg in u.audio:
        assert msg["pts_ms"] == pytest.approx(pts, abs=0.002)
        pts += audio_duration_ms(msg, sample_rate=sample_rate)
    return pts


def check_phrases_before_audio(u: Utterance, *, sample_rate: int) -> None:
    """A phrase is announced before any of its audio is sent."""
    sent_ms, audio_i, phrase_i = 0.0, 0, 0
    for kind in u.order:
        if kind == "audio":
            sent_ms += audio_duration_ms(u.audio[audio_i], sample_rate=sample_rate)
            audio_i += 1
        elif kind == "phrase":
            assert sent_ms <= u.phrases[phrase_i]["start_ms"] + 0.01, u.order
            phrase_i += 1


def check_opus_decodes(u: Utterance) -> None:
    """Every packet of every `audio` message decodes to one 20 ms frame (48 kHz)."""
    decoder = opuslib.Decoder(48000, 1)
    for msg in u.audio:
        assert isinstance(msg["data"], list) and msg["data"]
        for packet in msg["data"]:
            assert len(decoder.decode(packet, 960)) == 960 * 2  # one 20 ms frame of s16
