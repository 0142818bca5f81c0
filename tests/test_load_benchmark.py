"""The load benchmark's own arithmetic: when a real-time player counts audio as late, and when
streams start. Its figures are only as good as these."""

import argparse
import contextlib
import statistics
import time
from collections.abc import AsyncIterator

import msgpack
import pytest

from benchmarks.load import Player, new_session, percentile, run_stream, start_times, stream_words
from benchmarks.texts import SENTENCES


def test_a_player_fed_ahead_of_time_is_never_late():
    player = Player(start_buffer_ms=60.0)
    for k in range(50):                      # 20 ms frames, each sent 10 ms before it plays
        player.receive(20.0 * k, 20.0, now=0.02 * k - 0.01 if k > 3 else 0.0)
    assert player.late == 0 and player.started_at == 0.0


def test_a_player_counts_audio_that_comes_after_its_play_time_and_stalls_once():
    player = Player(start_buffer_ms=60.0)
    player.receive(0.0, 60.0, now=10.0)      # starts at 10.0 holding 60 ms
    player.receive(60.0, 20.0, now=10.05)    # due at 10.06: on time
    player.receive(80.0, 20.0, now=10.3)     # due at 10.08: 220 ms late, the player stalls
    player.receive(100.0, 20.0, now=10.31)   # after the stall, due at 10.32: on time
    assert player.late == 1 and player.late_at_ms == [80]
    assert player.stall_ms == pytest.approx(220.0)


def test_streams_start_evenly_or_at_random_arrivals():
    assert start_times(3, stagger_ms=250.0, arrival_rate=0.0, seed=1) == [0.0, 0.25, 0.5]
    times = start_times(2000, stagger_ms=0.0, arrival_rate=0.5, seed=7)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(2.0, rel=0.1)          # 0.5 per second
    assert statistics.pstdev(gaps) == pytest.approx(2.0, rel=0.15)       # exponential gaps
    assert times == start_times(2000, stagger_ms=0.0, arrival_rate=0.5, seed=7)


def test_streams_speak_the_same_words_or_each_start_at_its_own_sentence():
    same = argparse.Namespace(texts="same", words=12)
    assert stream_words(same, 0) == stream_words(same, 5) == " ".join(SENTENCES).split(" ")[:12]
    rotate = argparse.Namespace(texts="rotate", words=400)
    first, second = stream_words(rotate, 0), stream_words(rotate, 1)
    assert len(first) == 400 and first[: len(SENTENCES[0].split())] == SENTENCES[0].split()
    assert second[: len(SENTENCES[1].split())] == SENTENCES[1].split()
    # The words wrap around: stream 16 starts at the second sentence again, every word kept.
    assert stream_words(rotate, len(SENTENCES) + 1) == second
    assert sorted(first[:205]) == sorted(" ".join(SENTENCES).split(" "))


def test_percentile_takes_the_nearest_rank():
    assert percentile([], 0.95) is None
    assert percentile([5.0, 1.0, 3.0], 0.5) == 3.0
    assert percentile(list(range(1, 13)), 0.95) == 11


async def test_the_client_session_does_not_cap_concurrent_streams():
    # aiohttp's default connector holds at most 100 connections; a WebSocket keeps its one for
    # the whole stream, so streams beyond 100 would wait for earlier ones to end.
    async with new_session() as session:
        assert session.connector is not None and session.connector.limit == 0


async def test_a_refused_stream_retries_after_the_servers_hint():
    # A stand-in server: the first handshake gets 503 with Retry-After, the second `start` gets
    # `overloaded` with retry_after_s, the third is served (20 ms of audio, then `done`).
    from aiohttp import web

    tries: list[float] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        if "full" in request.query:     # always full
            return web.json_response({"error": {"code": "overloaded"}}, status=503,
                                     headers={"Retry-After": "0.05"})
        tries.append(time.monotonic())
        if len(tries) == 1:
            return web.json_response({"error": {"code": "overloaded"}}, status=503,
                                     headers={"Retry-After": "0.05"})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for raw in ws:
            msg = msgpack.unpackb(raw.data)
            if msg["type"] == "start" and len(tries) == 2:
                await ws.send_bytes(msgpack.packb({"type": "error", "code": "overloaded",
                                                   "ctx": msg["ctx"], "retry_after_s": 0.05}))
            elif msg["type"] == "start":
                await ws.send_bytes(msgpack.packb({"type": "ready", "ctx": msg["ctx"]}))
            elif msg["type"] == "end":
                await ws.send_bytes(msgpack.packb({"type": "audio", "ctx": msg["ctx"], "pts_ms": 0.0,
                                                   "data": [b"x"]}))
                await ws.send_bytes(msgpack.packb({"type": "done", "ctx": msg["ctx"], "usage": {
                    "audio_ms": 20.0, "compute_ms": 1.0, "ttfa_ms": 1.0}}))
        return ws

    args = argparse.Namespace(format="opus", retries=2, start_buffer_ms=60.0, texts="same",
                              words=3, wps=0)
    async with stand_in(stream) as url, new_session() as session:
        rep = await run_stream(session, url, args, 0)
        gave_up = await run_stream(session, url + "?full=1",
                                   argparse.Namespace(**{**vars(args), "retries": 1}), 1)
    assert (rep.refused, rep.error, rep.attempts, rep.audio_ms) == (False, None, 3, 20.0)
    assert tries[1] - tries[0] >= 0.05 and tries[2] - tries[1] >= 0.05
    assert rep.wait_ms >= 100.0 and rep.ttfa_ms is not None
    # Still full after its one retry: refused in the end, no audio.
    assert (gave_up.refused, gave_up.error, gave_up.attempts, gave_up.ttfa_ms) == (True, None, 2, None)


async def test_a_stream_whose_socket_closes_before_done_is_an_error():
    # A server that fails mid-stream and closes the socket: the stream was admitted but never
    # heard to its end, which must not pass for a stream served (it did once: 6 "admitted", no
    # audio and no error, while the server failed every one of them).
    from aiohttp import WSCloseCode, web

    async def stream(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for raw in ws:
            msg = msgpack.unpackb(raw.data)
            if msg["type"] == "start":
                await ws.send_bytes(msgpack.packb({"type": "ready", "ctx": msg["ctx"]}))
                await ws.close(code=WSCloseCode.INTERNAL_ERROR)
        return ws

    args = argparse.Namespace(format="opus", retries=0, start_buffer_ms=60.0, texts="same",
                              words=3, wps=0)
    async with stand_in(stream) as url, new_session() as session:
        rep = await run_stream(session, url, args, 0)
    assert not rep.refused and rep.error == "socket closed before done (1011)"


@contextlib.asynccontextmanager
async def stand_in(handler) -> AsyncIterator[str]:
    """A stand-in server answering /v1/stream with `handler`; yields its WebSocket URL."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    app = web.Application()
    app.router.add_get("/v1/stream", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("/v1/stream")).replace("http", "ws", 1)
    finally:
        await server.close()
