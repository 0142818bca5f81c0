"""The server split over processes (server/split.py, server/supervisor.py): front ends that
serve the sockets, one back end that owns the model.

In process first (the back end's app and two front ends on one event loop, linked over a real
Unix socket): streams through either front end decode and line up, the protocol's contract
holds for drawn scripts, `max_streams` counts every front end's streams, a front end that goes
leaves nothing in the back end, and a back end that goes fails the streams and turns the front
ends unhealthy. Then `run_server.py --front-ends 2` as real processes: it serves, /metrics adds
up its processes, a stopped (stuck) front end is killed and replaced, and SIGTERM stops all of it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from benchmarks.first_audio import wait_ready
from benchmarks.host_path import _children
import server.split
import server.supervisor
from server.split import LINK, RemoteScheduler
from streaming_tts.engine import Engine, SynthesisParams
from streaming_tts.stream import StreamOptions
from tests.helpers.app import (Running, Split, check_opus_decodes, check_phrases_before_audio,
                               check_timeline, clean, connect, running_split, wait_for)
from tests.helpers.ws_client import ProtocolClient
from tests.test_server import SCRIPTS, draw, play_scripts, refused_before_upgrade

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
SHORT = "Hello there! How are you today?"
LONG = ("This sentence is long enough to keep the voice busy for several seconds, so that "
        "there is plenty of audio still to come. And then another one follows it.")


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def remote(front: Running) -> RemoteScheduler:
    scheduler = front.state.model.scheduler
    assert isinstance(scheduler, RemoteScheduler)
    return scheduler


async def speaking(http: aiohttp.ClientSession, front: Running) -> ProtocolClient:
    """A socket to `front` with a long stream "x" that has started to speak."""
    client = await connect(http, front)
    await client.send({"type": "start", "ctx": "x"})
    await client.send({"type": "text", "ctx": "x", "text": LONG})
    await client.recv_until(lambda m: m["type"] == "audio")
    return client


async def back_end_idle(split: Split) -> None:
    """Nothing of any stream is left in the back end, nor in the front ends."""
    for front in split.fronts:
        await clean(front)
    scheduler = split.back_state.model.scheduler
    assert scheduler is not None
    await wait_for(lambda: scheduler.stream_count == 0, what="the back end's scheduler idle")


async def test_streams_through_two_front_ends_decode_and_line_up(
    engine: Engine, http: aiohttp.ClientSession,
) -> None:
    async with running_split(engine) as split:
        clients = [await connect(http, front) for front in split.fronts]
        heard = await asyncio.gather(*(c.speak(["Hello the", "re! How are", " you today?"])
                                       for c in clients))
        for u in heard:
            assert u.ready is not None and not u.errors and u.done is not None
            assert "".join(p["space_before"] + p["text"] for p in u.phrases) == SHORT
            check_phrases_before_audio(u, sample_rate=48000)
            total_ms = check_timeline(u, sample_rate=48000)
            assert abs(total_ms - u.done["usage"]["audio_ms"]) <= 60
            assert u.done["usage"]["compute_ms"] > 0 and u.done["usage"]["chars"] == len(SHORT)
            assert u.words, "word timings come through the link too"
            check_opus_decodes(u)
        for c in clients:
            await c.close()
        await back_end_idle(split)


async def test_any_script_keeps_the_contract_through_front_ends(
    engine: Engine, http: aiohttp.ClientSession,
) -> None:
    async with running_split(engine) as split:
        scripts, sockets = draw(SCRIPTS, 24), 4
        async with asyncio.TaskGroup() as group:
            plays = [group.create_task(play_scripts(split.fronts[i % 2], http, scripts[i::sockets]))
                     for i in range(sockets)]
        await back_end_idle(split)
        assert sum(p.result() for p in plays), "no script heard a stream to its end"


async def test_max_streams_counts_the_streams_of_every_front_end(
    engine: Engine, http: aiohttp.ClientSession,
) -> None:
    async with running_split(engine, {"admission.max_streams": 2}) as split:
        a, b = split.fronts
        first, second = await connect(http, a), await connect(http, b)
        for client in (first, second):
            await client.send({"type": "start", "ctx": "x"})
            await client.send({"type": "text", "ctx": "x", "text": LONG})
            assert (await client.recv())["type"] == "ready"
        # Once the back end has told front end `a` of `b`'s stream, `a` is full too. (Not
        # `elsewhere() == 1` alone: before the back end has read `a`'s own stream, a status
        # gives that by its estimate for streams not yet seen, and the next one takes it back.)
        await wait_for(lambda: (remote(a).status.live, remote(a).status.mine) == (2, 1)
                       and remote(a).elsewhere() == 1, what="a status naming b's stream")
        assert a.state.admission.server_streams == 2
        async with http.get(a.url("/v1/status")) as resp:
            assert (await resp.json())["active_streams"] == 2
        await first.send({"type": "start", "ctx": "y"})
        refused = await first.recv_until(lambda m: m["type"] == "error" and m.get("ctx") == "y")
        assert refused[-1]["code"] == "overloaded" and "limit of 2" in refused[-1]["message"]
        async with http.get(a.url("/v1/stream")) as resp:   # before the upgrade: 503
            assert resp.status == 503
        await second.close()    # b's stream goes: a may start one again
        await wait_for(lambda: remote(a).elsewhere() == 0, what="b's stream gone")
        await first.send({"type": "start", "ctx": "z"})
        assert (await first.recv_until(lambda m: m.get("ctx") == "z"))[-1]["type"] == "ready"
        await first.close()
        await back_end_idle(split)


async def test_front_ends_admitting_at_once_do_not_overfill_the_server(
    engine: Engine, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with running_split(engine, {"admission.max_streams": 4}) as split:
        # No status between the starts: both front ends see the same room (4). The back end
        # answers each `open` in the order they reach it: four in, two refused.
        monkeypatch.setattr(server.split, "STATUS_INTERVAL_S", 60.0)
        await asyncio.sleep(0.1)   # the last status before the pause has come
        clients = [await connect(http, front) for front in split.fronts for _ in range(3)]
        for client in clients:
            await client.send({"type": "start", "ctx": "x"})
        answers = [await client.recv() for client in clients]
        assert sorted(a["type"] for a in answers) == ["error"] * 2 + ["ready"] * 4, answers
        assert all("limit of 4" in a["message"] and a["retry_after_s"] >= 1
                   for a in answers if a["type"] == "error")
        assert sum(f.state.admission.active_streams for f in split.fronts) == 4
        scheduler = split.back_state.model.scheduler
        assert scheduler is not None
        await wait_for(lambda: scheduler.stream_count == 4, what="four streams in the back end")
        for client in clients:
            await client.close()
        await back_end_idle(split)


async def test_one_socket_gets_all_its_contexts_where_the_server_has_room(
    engine: Engine, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Front ends once counted each stream opened since the back end's last status once per
    # front end (the others might have opened as many): one socket opening its 8 contexts
    # back to back got 5-8 `ready` at a real load of 25%. The back end now decides each open.
    async with running_split(engine, {"admission.max_streams": 8,
                                      "limits.contexts_per_socket": 16}) as split:
        monkeypatch.setattr(server.split, "STATUS_INTERVAL_S", 60.0)
        await asyncio.sleep(0.1)
        client = await connect(http, split.fronts[0])
        for i in range(9):
            await client.send({"type": "start", "ctx": f"c{i}"})
        answers = [await client.recv() for _ in range(9)]
        assert [a["type"] for a in answers] == ["ready"] * 8 + ["error"], answers
        assert answers[-1]["code"] == "overloaded" and "limit of 8" in answers[-1]["message"]
        assert split.fronts[0].state.admission.active_streams == 8
        await client.close()
        await back_end_idle(split)


async def test_a_start_the_back_end_does_not_answer_is_refused_and_leaves_nothing(
    engine: Engine, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.session
    async with running_split(engine) as split:
        monkeypatch.setattr(server.session, "BACK_END_ANSWER_S", 0.2)
        original = RemoteScheduler.on_event   # the back end's "admitted" is lost on the way
        monkeypatch.setattr(RemoteScheduler, "on_event",
                            lambda remote, msg: None if msg[0] == "admitted"
                            else original(remote, msg))
        client = await connect(http, split.fronts[0])
        await client.send({"type": "start", "ctx": "x"})
        await client.send({"type": "text", "ctx": "x", "text": SHORT})   # waits its turn
        refused, late = await client.recv(), await client.recv()
        assert refused["type"] == "error" and refused["code"] == "overloaded"
        assert "did not answer" in refused["message"]
        assert late["code"] == "bad_request"           # its text: no live ctx
        monkeypatch.setattr(RemoteScheduler, "on_event", original)
        await client.send({"type": "start", "ctx": "y"})   # the socket is still usable
        assert (await client.recv())["type"] == "ready"
        await client.close()
        await back_end_idle(split)
        assert split.fronts[0].state.admission.active_streams == 0


async def test_a_start_awaiting_the_back_end_at_a_shutdown_is_refused_not_failed(
    engine: Engine, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # It was never `ready`: `overloaded` (a start refused), where it got `internal`.
    async with running_split(engine) as split:
        original = RemoteScheduler.on_event   # the back end's "admitted" has not come yet
        monkeypatch.setattr(RemoteScheduler, "on_event",
                            lambda remote, msg: None if msg[0] == "admitted"
                            else original(remote, msg))
        client = await connect(http, split.fronts[0])
        await client.send({"type": "start", "ctx": "x"})
        [session] = split.fronts[0].state.sessions
        await wait_for(lambda: session._answer is not None, what="the start awaiting its answer")
        await session.shutdown()
        refused = await client.recv()
        assert (refused["type"], refused["code"], refused["ctx"]) == ("error", "overloaded", "x")
        assert refused["retry_after_s"] >= 1
        monkeypatch.setattr(RemoteScheduler, "on_event", original)
        await back_end_idle(split)


async def test_limits_per_client_hold_across_front_ends(
    engine: Engine, http: aiohttp.ClientSession,
) -> None:
    overrides = {"limits.sockets_per_client": 2, "limits.contexts_per_client": 1,
                 "server.api_keys": ["k-one", "k-two"]}
    async with running_split(engine, overrides) as split:
        a, b = split.fronts
        one = [await connect(http, a, "?token=k-one")]
        await one[0].send({"type": "start", "ctx": "x"})
        await one[0].send({"type": "text", "ctx": "x", "text": LONG})
        assert (await one[0].recv())["type"] == "ready"
        # b hears of k-one's socket and context in a's, and counts them as if its own.
        await wait_for(lambda: b.state.clients.held(KEY_ONE) == (1, 1), what="b told of k-one")
        one.append(await connect(http, b, "?token=k-one"))
        await one[1].send({"type": "start", "ctx": "y"})
        error = await one[1].recv()
        assert error["code"] == "too_many_contexts" and error["ctx"] == "y"
        assert error["message"] == "at most 1 live contexts per API key"
        await wait_for(lambda: a.state.clients.held(KEY_ONE) == (1, 2), what="a told of b's")
        for front in (a, b):   # a third socket of k-one is refused by either front end
            body = await refused_before_upgrade(http, front, "?token=k-one")
            assert body["message"] == "at most 2 open connections per API key; close one first"
        two = await connect(http, b, "?token=k-two")   # another key is not affected
        await two.send({"type": "start", "ctx": "z"})
        assert (await two.recv())["type"] == "ready"
        # A's socket closed (with its stream) gives k-one its places back in b.
        await one[0].close()
        await wait_for(lambda: b.state.clients.held(KEY_ONE) == (0, 1), what="a's socket gone")
        await one[1].send({"type": "start", "ctx": "y"})
        assert (await one[1].recv())["type"] == "ready"
        for client in (one[1], two):
            await client.close()
        await back_end_idle(split)
        assert not split.back[LINK].client_totals   # nothing of a client is left counted
        for front in split.fronts:
            counts = front.state.clients
            await wait_for(lambda c=counts: not c.elsewhere, what="the others' counts gone")
            assert not counts.contexts and not counts.sockets


KEY_ONE = "key " + hashlib.sha256(b"k-one").hexdigest()[:16]   # server/http.py client_of


async def test_a_stream_cancelled_just_before_its_front_end_died_has_its_usage_logged(
    engine: Engine, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    # The back end forgets a stream as the cancel comes (the front end's session logs the
    # usage that `cancelled` brings); with the front end dead before the step ended, no log
    # line anywhere carried what the stream had used. (An outside review of the split.)
    caplog.set_level(logging.INFO)
    async with running_split(engine) as split:
        front = split.fronts[0]
        client = await speaking(http, front)
        [sid] = list(remote(front)._sinks)
        for conn in split.back[LINK].connections:
            def dies_after_a_cancel(msg: list, conn=conn, read=conn.link._on_message) -> None:
                read(msg)
                if msg[0] == "cancel":          # the front end's process dies right after it
                    conn.link._transport.abort()
            conn.link._on_message = dies_after_a_cancel
        await client.send({"type": "cancel", "ctx": "x"})
        back = split.back_state.model.scheduler
        assert back is not None
        await wait_for(lambda: back.stream_count == 0, what="the stream gone in the back end")
        line = await usage_line(caplog, sid)
        assert line.startswith(f"usage of stream {sid}, cancelled (its front end ")


async def usage_line(caplog: pytest.LogCaptureFixture, sid: str) -> str:
    """The one log line with stream `sid`'s usage, once it is there."""
    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if sid in r.getMessage() and "chars=" in r.getMessage()]

    await wait_for(lambda: bool(lines()), what="its usage in the log")
    [line] = lines()
    return line


async def test_a_stream_done_while_its_front_end_read_nothing_has_its_usage_logged(
    engine: Engine, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    # A front end stopped (SIGSTOP), killed as stuck 10 s later: the `done` of each stream
    # that finished meanwhile was written to a socket nobody read, and no log line anywhere
    # carried its usage. (An outside soak of the split.)
    caplog.set_level(logging.INFO)
    async with running_split(engine) as split:
        front = split.fronts[0]
        client = await connect(http, front)
        u = await client.speak(SHORT, ctx="before")    # read and logged there: not again
        assert u.done is not None
        [conn] = [c for c in split.back[LINK].connections if c.name == "fe0"]
        await wait_for(lambda: not conn.unread, what="its `alive` saying it read that `done`")
        front_link = remote(front)._send.__self__
        await client.send({"type": "start", "ctx": "x"})
        await client.recv_until(lambda m: m["type"] == "ready")
        [sid] = list(remote(front)._sinks)
        front_link._transport.pause_reading()           # from now on it reads nothing
        await client.send({"type": "text", "ctx": "x", "text": SHORT})
        await client.send({"type": "end", "ctx": "x"})
        back = split.back_state.model.scheduler
        assert back is not None
        await wait_for(lambda: back.stream_count == 0, what="the stream done in the back end")
        await asyncio.sleep(0.3)                         # its `alive` says it read nothing new
        conn.link._transport.abort()                    # killed as stuck
        line = await usage_line(caplog, sid)
        assert line.startswith(f"usage of stream {sid}, done (its front end fe0 gone before ")
        assert sum("gone before it read it" in r.getMessage() for r in caplog.records) == 1


async def test_a_front_end_gone_leaves_nothing_in_the_back_end(
    engine: Engine, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="server.split")
    async with running_split(engine) as split:
        staying, leaving = split.fronts
        _client = await speaking(http, leaving)   # held open: its stream lives
        back = split.back_state.model.scheduler
        assert back is not None and back.stream_count == 1
        await leaving.server.close()    # its process ends: the link drops mid-stream
        await wait_for(lambda: back.stream_count == 0, what="its stream closed in the back end")
        # It stopped on purpose and said so: no warning (one that dies says nothing).
        [lost] = [r for r in caplog.records if "disconnected" in r.getMessage()]
        assert lost.levelno == logging.INFO
        other = await connect(http, staying)   # the other front end still speaks
        u = await other.speak(SHORT)
        assert u.done is not None and u.audio
        await other.close()
        await clean(staying)


async def test_when_the_back_end_goes_streams_fail_and_front_ends_turn_unhealthy(
    engine: Engine, http: aiohttp.ClientSession,
) -> None:
    lost: list[bool] = []
    async with running_split(engine, on_back_end_lost=lambda: lost.append(True)) as split:
        front = split.fronts[0]
        client = await speaking(http, front)
        await split.back.shutdown()
        await split.back.cleanup()      # the back end's process ends
        got = await client.recv_until(lambda m: m["type"] == "error")
        assert got[-1]["code"] == "internal" and got[-1]["ctx"] == "x"
        async with http.get(front.url("/healthz")) as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "failed"
        assert len(lost) == len(split.fronts)
        await client.send({"type": "start", "ctx": "y"})   # no new stream starts
        assert (await client.recv())["code"] == "overloaded"
        await client.close()
        await clean_front_end(front)


async def test_a_silent_back_end_turns_the_front_ends_unhealthy_until_it_answers(
    engine: Engine, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    # A back end stopped (SIGSTOP) or with its event loop blocked sends no status: /healthz
    # said 200 all along and new streams were admitted, to hear nothing. (And the log said
    # nothing of it either.)
    caplog.set_level(logging.INFO, logger="server.split")
    async with running_split(engine) as split:
        front = split.fronts[0]
        link = remote(front)
        link.on_status = lambda status: None            # type: ignore[method-assign]
        link.heard_at -= server.split.BACK_END_SILENT_S
        async with http.get(front.url("/healthz")) as resp:
            body = await resp.json()
        assert resp.status == 503 and body["status"] == "unresponsive", body
        assert "back end has not answered" in body["error"]
        async with http.get(front.url("/v1/status")) as resp:
            assert (await resp.json())["status"] == "unresponsive"
        error = await refused_before_upgrade(http, front)
        assert "back end has not answered" in error["message"]
        await wait_for(lambda: any("no status for" in m for m in caplog.messages),
                       what="the silence logged", timeout=3)
        del link.on_status                              # it answers again
        await wait_for(lambda: front.state.unavailable() is None, what="answering again")
        [told] = [m for m in caplog.messages if "no status for" in m]
        assert told.startswith("the back end has sent no status for ")
        assert any(m.startswith("the back end answers again after ") for m in caplog.messages)
        async with http.get(front.url("/healthz")) as resp:
            assert resp.status == 200
        async with http.get(front.url("/v1/status")) as resp:
            assert (await resp.json())["status"] == "ok"
        client = await connect(http, front)
        assert (await client.speak(SHORT)).done is not None
        await client.close()
        await clean_front_end(front)


async def test_a_silent_front_end_is_reported_once_and_a_held_up_back_end_blames_none(
    engine: Engine, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture,
) -> None:
    # A front end stopped (SIGSTOP) or with its event loop blocked keeps its share of the port:
    # the kernel went on handing it new connections that nobody answered, for as long as it
    # stayed so. The back end now hears nothing from it and has it killed (Supervisor.stuck);
    # front ends whose event loops turn say so several times a second.
    async with running_split(engine, {"server.front_end_silent_s": 1}) as split:
        link = split.back[LINK]
        stuck: list[tuple[str, float]] = []
        link.on_stuck = lambda name, silent_s: stuck.append((name, silent_s))
        mute = server.split.Link(lambda msg: None, lambda exc: None)   # hello, then nothing
        await asyncio.get_running_loop().create_unix_connection(lambda: mute, link.path)
        mute.send(["hello", "fe-mute"])
        await wait_for(lambda: bool(stuck), what="the mute front end reported", timeout=5)
        [(name, silent_s)] = stuck
        assert name == "fe-mute" and 1 <= silent_s < 1.5
        await asyncio.sleep(1.5)   # reported once; the front ends that turn, never
        assert len(stuck) == 1
        # This process held up for longer than a front end may be silent (its own event loop
        # blocked): the front ends' words wait unread meanwhile, and none is blamed for that.
        time.sleep(1.2)
        await asyncio.sleep(0.5)
        assert len(stuck) == 1
        assert any("event loop was held up" in r.getMessage() for r in caplog.records)
        mute.close()
        client = await connect(http, split.fronts[0])
        assert (await client.speak(SHORT)).done is not None
        await client.close()
        await back_end_idle(split)


async def test_a_link_whose_peer_reads_nothing_is_dropped_past_its_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Paused, a link still takes what its side sends (the streams' audio for a front end that
    # is stopped): with the front end never killed, the back end's memory grew without bound.
    monkeypatch.setattr(server.split, "MAX_UNREAD_BYTES", 4 << 20)
    lost: list[Exception | None] = []
    near, far = socket.socketpair(socket.AF_UNIX)
    loop = asyncio.get_running_loop()
    sender = server.split.Link(lambda msg: None, lost.append)
    await loop.create_unix_connection(lambda: sender, sock=near)
    reader, _ = await loop.create_unix_connection(
        lambda: server.split.Link(lambda msg: None, lambda exc: None), sock=far)
    reader.pause_reading()                     # the peer reads nothing from now on
    chunk = bytes(1 << 20)
    for _ in range(16):
        if sender.closed:
            break
        sender.send(["audio", "s", chunk, 0.0])
        await asyncio.sleep(0)
    await wait_for(lambda: bool(lost), what="the link dropped", timeout=5)
    assert sender.closed
    reader.close()


async def clean_front_end(front: Running) -> None:
    s = front.state
    await wait_for(lambda: not s.sessions and s.admission.active_streams == 0,
                   what="front end idle")


# ---------------------------------------------------------------- as real processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metric(text: str, name: str) -> float:
    [line] = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(line.split()[1])


async def test_run_server_with_two_front_ends_serves_restarts_and_stops(
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w+")
    config = tmp_path / "server.toml"
    config.write_text("[server]\nfront_end_silent_s = 2\n")
    signalled = False
    # --max-streams 8: four starts at once may all reach one front end, which counts each
    # stream it admits before the next status twice (server/split.py, admission).
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), "--front-ends", "2", "--port", str(port),
         "--max-streams", "8", "--config", str(config)], cwd=ROOT, stdin=subprocess.DEVNULL,
        stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_ready(base, proc)
        front_ends = _children(proc.pid)
        assert len(front_ends) == 2
        # Several sockets: the kernel spreads them over both front ends.
        clients = [await aiohttp_client(http, base) for _ in range(4)]
        # (On a host another process loads, admission may refuse some of the four at first.)
        heard = await asyncio.gather(*(c.speak_when_admitted(SHORT, ctx="x") for c in clients))
        assert all(u.done is not None and u.audio for u in heard)
        for c in clients:
            await c.close()
        async with http.get(base + "/metrics") as resp:
            text = await resp.text()
        assert metric(text, "tts_streams_started_total") == 4    # from both front ends
        assert metric(text, "tts_ttfa_seconds_count") == 4      # sent by the front ends
        assert metric(text, "tts_audio_seconds_total") > 4
        # Memory and open files: the three processes' together (each samples its own every
        # second; the back end's memory still moves by tens of MB in that time, its files not).
        assert metric(text, "process_resident_memory_bytes") > 0.8 * rss(proc.pid)
        assert metric(text, "process_open_fds") >= len(os.listdir(f"/proc/{proc.pid}/fd")) + 2 * 8
        for pid in front_ends:   # a front end runs no model: torch is not even loaded there
            assert "torch" not in Path(f"/proc/{pid}/maps").read_text()
            assert rss(pid) < 150e6
        # One front end stops (SIGSTOP; as good as an event loop blocked): the kernel would go
        # on handing it half the new connections, unanswered. It is killed and replaced.
        os.kill(front_ends[0], signal.SIGSTOP)
        deadline = time.monotonic() + 60
        while len(children := _children(proc.pid)) < 2 or front_ends[0] in children:
            assert time.monotonic() < deadline, "no front end started in its place"
            await asyncio.sleep(0.2)
        await wait_ready(base, proc)
        client = await aiohttp_client(http, base)
        assert (await client.speak(SHORT)).done is not None
        # Stopped as systemd stops a service, SIGTERM to all its processes at once: the front
        # ends still drain (the back end's own word is no second SIGTERM, and here it reaches
        # them before systemd's), so a live stream is heard to its end.
        await client.send({"type": "start", "ctx": "y"})
        await client.send({"type": "text", "ctx": "y", "text": LONG})
        await client.send({"type": "end", "ctx": "y"})
        await client.recv_until(lambda m: m["type"] == "audio")
        front_ends = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        signalled = True
        await asyncio.sleep(0.3)
        for pid in front_ends:   # the one without a stream has drained and gone already
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        last = await client.recv_until(lambda m: m["type"] in ("done", "error"))
        assert last[-1]["type"] == "done", last[-1]
        await client.close()
    finally:
        if not signalled:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.seek(0)
        out = log.read()
    assert code == 0, out
    assert "Traceback" not in out, out
    assert "front end fe1 has sent nothing for 2." in out, out
    assert "front end fe1 killed, stuck (exit -9); starting another" in out, out
    assert "server stopped" in out
    assert not _children(proc.pid)


async def test_a_front_end_signalled_alone_stops_listening_drains_and_is_replaced(
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    # SIGTERM to one front end alone (an operator recycling it) made it drain with its listener
    # open: for the drain, about half the new connections reached it and got 503; and the one
    # in its place started only once it had exited.
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), "--front-ends", "2", "--port", str(port),
         "--max-streams", "8"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log.open("w"),
        stderr=subprocess.STDOUT)
    try:
        await wait_ready(base, proc)
        # Streams until one front end holds one (each logs the streams it opens).
        clients: dict[str, ProtocolClient] = {}
        while not (held := re.search(r"\[(fe\d)\] server\.session: stream \w+ opened "
                                     r"ctx='(c\d+)'", log.read_text())):
            ctx = f"c{len(clients)}"
            clients[ctx] = client = await aiohttp_client(http, base)
            await client.send({"type": "start", "ctx": ctx})
            await client.send({"type": "text", "ctx": ctx, "text": LONG})
            await client.send({"type": "end", "ctx": ctx})
            await client.recv_until(lambda m: m["type"] == "audio")
        name, ctx = held.groups()
        retiring = int(re.search(rf"front end {name} started \(pid (\d+)\)",
                                 log.read_text()).group(1))
        os.kill(retiring, signal.SIGTERM)
        # Its replacement runs while it drains.
        await wait_for(lambda: len(_children(proc.pid)) == 3, what="a front end in its place")
        # Every new connection reaches a front end that serves: none is answered 503.
        answers = []
        for _ in range(20):
            async with http.get(base + "/healthz", headers={"Connection": "close"}) as resp:
                answers.append(resp.status)
            await asyncio.sleep(0.05)
        assert answers == [200] * 20, answers
        last = await clients[ctx].recv_until(lambda m: m["type"] in ("done", "error"))
        assert last[-1]["type"] == "done", last[-1]          # drained: heard to its end
        await wait_for(lambda: not alive(retiring), what="the retired front end's exit")
        fresh = await aiohttp_client(http, base)
        assert (await fresh.speak(SHORT)).done is not None
        for client in [*clients.values(), fresh]:
            await client.close()
        assert len(_children(proc.pid)) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    out = log.read_text()
    assert code == 0, out
    assert "Traceback" not in out, out
    assert f"[{name}] server.app: SIGTERM came to this front end alone" in out, out
    assert f"front end {name} stopped, having drained its streams (exit 0)" in out, out
    assert "exited on its own" not in out, out


async def test_a_back_end_killed_leaves_no_files_behind(
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    # SIGKILL (the OOM killer) gives the back end no chance to remove its directory (the
    # link's socket, the metrics files): its front ends, which exit when it goes, do. Their
    # live streams are told why (some were told "server shutting down": the front end's stop
    # closed their sockets before their error was sent).
    port = free_port()
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), "--front-ends", "2", "--port", str(port)],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_ready(f"http://127.0.0.1:{port}", proc)
        front_ends = _children(proc.pid)
        args = Path(f"/proc/{front_ends[0]}/cmdline").read_text().split("\0")
        workdir = Path(args[args.index("--front-end-of") + 1]).parent
        assert (workdir / "metrics").is_dir() and any((workdir / "metrics").iterdir())
        clients = [await aiohttp_client(http, f"http://127.0.0.1:{port}") for _ in range(2)]
        for i, client in enumerate(clients):
            await client.send({"type": "start", "ctx": f"c{i}"})
            await client.send({"type": "text", "ctx": f"c{i}", "text": LONG})
            await client.send({"type": "end", "ctx": f"c{i}"})
            await client.recv_until(lambda m: m["type"] == "audio")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    for client in clients:
        last = await client.recv_until(lambda m: m["type"] in ("done", "error"))
        assert (last[-1]["type"], last[-1]["message"]) == (
            "error", "the server's back end stopped"), last[-1]
        await client.close()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in front_ends):
        assert time.monotonic() < deadline, "the front ends outlived their back end"
        await asyncio.sleep(0.1)
    log.seek(0)
    out = log.read()
    assert not workdir.exists(), out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("after", ["open-file limit", "back end: loading voice"])
async def test_a_shutdown_while_starting_stops_at_once_and_leaves_nothing(
    tmp_path: Path, after: str,
) -> None:
    # SIGTERM before the signal handlers were on the event loop killed the back end there,
    # leaving its directory behind; and one while it started its front ends reached none of
    # them, which served on until killed 35 s later.
    temp = tmp_path / "tmp"
    temp.mkdir()
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), "--front-ends", "2",
         "--port", str(free_port())], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + 60
        while after not in Path(log.name).read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "it never got there"
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = Path(log.name).read_text()
    assert code == 0, out
    assert "Traceback" not in out and "still running" not in out, out
    assert out.count("SIGTERM:") == 1, out          # one signal, not replayed as a second
    assert "server stopped" in out, out
    assert not list(temp.iterdir()), out


async def test_a_second_server_cannot_take_the_port_of_one_with_front_ends() -> None:
    # The front ends listen with SO_REUSEPORT, beside which another socket with it binds.
    from server.supervisor import reserve_port

    reserved = reserve_port("127.0.0.1", 0)
    port = reserved.getsockname()[1]
    with reserved, socket.socket() as listening:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listening.bind(("127.0.0.1", port))
        listening.listen()
        for host in ("127.0.0.1", "0.0.0.0"):
            with pytest.raises(OSError):
                reserve_port(host, port).close()
    reserve_port("127.0.0.1", port).close()         # free again


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie no init has reaped yet does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def rss(pid: int) -> float:
    """A process's resident memory in bytes."""
    [line] = [ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
              if ln.startswith("VmRSS:")]
    return float(line.split()[1]) * 1024


async def aiohttp_client(http: aiohttp.ClientSession, base: str) -> ProtocolClient:
    return await ProtocolClient.connect(http, base.replace("http", "ws") + "/v1/stream")




# ---------------------------------------------------------------- the front end's view


def status(**fields: object) -> dict[str, object]:
    base = {"ready": True, "failure": None, "mine": 0, "live": 0,
            "load": [0, 0.0, 20.0, 0], "gpu": None, "vram_cost": None}
    return {**base, **fields}


class Sink:
    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []
        self.ends: list[tuple[str, object]] = []

    def on_error(self, code: str, message: str) -> None:
        self.errors.append((code, message))

    def on_done(self, usage: dict) -> None:
        self.ends.append(("done", usage))

    def on_cancelled(self, usage: dict | None) -> None:
        self.ends.append(("cancelled", usage))


async def test_streams_opened_since_the_last_status_count_as_unseen_load() -> None:
    from server.split import options_from_wire, options_to_wire

    sent: list[list[object]] = []
    remote = RemoteScheduler(sent.append)
    options = StreamOptions(params=SynthesisParams(speaker=2, length_scale=0.8), words=False)
    assert options_from_wire(options_to_wire(options)) == options
    remote.on_status(status(mine=1, live=3, load=[3, 3.0, 20.0, 1]))
    for sid in ("a", "b", "c"):
        remote.open(sid, options, Sink())  # type: ignore[arg-type]
    # The back end holds one of ours (it had read one `open`), two of the others.
    assert remote.elsewhere() == 2
    load = remote.load()
    assert (load.active_streams, load.starting_streams, load.demand_audio_s_per_s) == (5, 3, 5.0)
    remote.close("c")
    assert remote.load().active_streams == 4 and sent[-1] == ["close", "c"]
    remote.on_status(status(mine=2, live=4, load=[4, 4.0, 20.0, 0]))
    assert remote.load().active_streams == 4 and remote.elsewhere() == 2
    # The back end's word on each open: a refused stream is no longer held here.
    answers = {sid: remote._answers[sid] for sid in ("a", "b")}
    remote.on_event(["admitted", "a"])
    remote.on_event(["refused", "b", "load", "server is at capacity", 2])
    assert answers["a"].result() is None
    assert answers["b"].result() == ["load", "server is at capacity", 2]
    remote.on_status(status(mine=1, live=3, load=[3, 3.0, 20.0, 0]))
    assert remote.load().active_streams == 3 and remote.unseen() == 0


async def test_a_cancelled_stream_waits_for_its_usage_from_the_back_end() -> None:
    sent: list[list[object]] = []
    remote = RemoteScheduler(sent.append)
    remote.on_status(status())
    sinks = {sid: Sink() for sid in ("a", "b", "c", "d")}
    for sid, sink in sinks.items():
        remote.open(sid, StreamOptions(params=SynthesisParams()), sink)  # type: ignore[arg-type]
        remote.on_event(["admitted", sid])
        remote.cancel(sid)
    assert sent[-1] == ["cancel", "d"] and remote.stream_count == 0   # no longer counted here
    usage = {"chars": 5, "compute_ms": 3.0}
    remote.on_event(["audio", "a", b"\0\0\0\0", 0.0])   # made before the cancel: not passed on
    remote.on_event(["cancelled", "a", usage])
    remote.on_event(["done", "b", usage])        # it finished before the cancel reached it
    remote.on_event(["error", "c", "internal", "boom"])
    remote.fail_all("gone")                      # d's answer never comes
    assert sinks["a"].ends == [("cancelled", usage)] and sinks["b"].ends == [("done", usage)]
    assert sinks["c"].errors == [("internal", "boom")] and sinks["d"].ends == [("cancelled", None)]
    assert not remote._cancelling
    remote.on_event(["cancelled", "a", usage])   # once only
    assert sinks["a"].ends == [("cancelled", usage)]
    # Cancelled before the back end answered its `open`, which it then refused: nothing kept.
    remote.open("e", StreamOptions(params=SynthesisParams()), Sink())  # type: ignore[arg-type]
    remote.cancel("e")
    remote.on_event(["refused", "e", "load", "busy", 1])
    assert not remote._cancelling and remote.stream_count == 0


async def test_a_cancel_through_a_front_end_is_answered_with_the_usage_before_a_new_start(
    engine: Engine, http: aiohttp.ClientSession,
) -> None:
    async with running_split(engine) as split:
        client = await speaking(http, split.fronts[0])
        await client.send({"type": "cancel", "ctx": "x"})
        await client.send({"type": "start", "ctx": "x"})
        replies = await client.recv_until(lambda m: m["type"] in ("ready", "error"))
        ends = [m for m in replies if m["type"] in ("cancelled", "ready", "error")]
        assert [m["type"] for m in ends] == ["cancelled", "ready"], ends
        usage = ends[0]["usage"]
        assert usage["chars"] == len(LONG) and usage["compute_ms"] > 0 and usage["ttfa_ms"] > 0
        await client.send({"type": "cancel", "ctx": "x"})
        await client.recv_until(lambda m: m["type"] == "cancelled")
        await client.close()
        await back_end_idle(split)
        assert not remote(split.fronts[0])._cancelling


async def test_a_gpu_reading_is_one_object_until_the_back_end_reads_again() -> None:
    # Admission charges the streams it admitted since a reading against that reading (by
    # identity): a status every 20 ms must not make each one look new.
    remote = RemoteScheduler(lambda msg: None)
    reading = [1, 100, 1000, 900, 50.0, 200.0, 60.0]
    remote.on_status(status(gpu=reading))
    first = remote.status.gpu
    remote.on_status(status(gpu=reading))
    assert remote.status.gpu is first and first is not None and first.vram_free_bytes == 900
    remote.on_status(status(gpu=[2, *reading[1:]]))
    assert remote.status.gpu is not first


async def test_when_the_back_end_goes_every_stream_gets_an_error_once() -> None:
    remote = RemoteScheduler(lambda msg: None)
    remote.on_status(status())
    sinks = [Sink(), Sink()]
    for i, sink in enumerate(sinks):
        options = StreamOptions(params=SynthesisParams())
        remote.open(f"s{i}", options, sink)  # type: ignore[arg-type]
        remote.on_event(["admitted", f"s{i}"])
    waiting = Sink()   # opened, the back end's answer still to come: refused, no error
    answer = remote.open("s2", StreamOptions(params=SynthesisParams()), waiting)  # type: ignore[arg-type]
    remote.fail_all("gone")
    remote.on_event(["error", "s0", "internal", "late"])   # nothing more reaches a stream
    assert [s.errors for s in sinks] == [[("internal", "gone")]] * 2
    assert answer.result() == ["not_ready", "gone", None] and not waiting.errors
    assert remote.stream_count == 0
    remote.on_status(status(ready=False, load=None))
    assert remote.load().capacity_audio_s_per_s is None


def one_front_end(code: str) -> server.supervisor.Supervisor:
    """A supervisor of one front end whose process runs `code` (python -c)."""
    from server.config import load_config

    return server.supervisor.Supervisor(load_config(None, {"server.front_ends": 1}),
                                        [sys.executable, "-c", code], "/nonexistent.sock", 1,
                                        metrics_dir=None)


async def test_a_front_end_being_started_at_a_shutdown_gets_the_word(monkeypatch) -> None:
    # The supervisor waited only for the front ends it knew: one still being started (its
    # process there, the start not yet returned) was cancelled into an orphan that nobody told.
    from server import supervisor

    started: list[asyncio.subprocess.Process] = []
    spawn = supervisor.Supervisor._spawn

    async def slow_spawn(self: supervisor.Supervisor, index: int) -> asyncio.subprocess.Process:
        proc = await spawn(self, index)
        started.append(proc)
        await asyncio.sleep(0.5)          # the process runs; its start has not returned yet
        return proc

    monkeypatch.setattr(supervisor.Supervisor, "_spawn", slow_spawn)
    sup = one_front_end("import time; time.sleep(60)")
    sup.start()
    await wait_for(lambda: started, what="the front end's process started")
    sup.pass_on(now=False)
    await sup.stop(timeout_s=30)
    [proc] = started
    assert proc.returncode == -supervisor.ShutdownSignals.PASSED_ON["drain"]   # told, not killed


async def test_front_ends_that_keep_dying_at_start_stop_the_server(monkeypatch) -> None:
    # A front end that exits at once (a broken install, the port held by another program) is
    # started again; three such exits in a row and the supervisor gives up, rather than loop.
    from server import supervisor

    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.01)
    sup = one_front_end("import sys; sys.exit(3)")
    sup.start()
    await asyncio.wait_for(sup.failed.wait(), timeout=30)
    assert sup._quick_exits == supervisor.QUICK_EXITS_MAX
    await sup.stop(timeout_s=5)


async def test_a_front_end_that_cannot_be_started_is_tried_again(monkeypatch) -> None:
    # The system refused a process (out of file descriptors, of processes): the slot's keeper
    # died with the error and the server served on with one front end fewer, for good.
    from server import supervisor

    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.01)
    started: list[asyncio.subprocess.Process] = []
    spawn = supervisor.Supervisor._spawn

    async def refused_once(self: supervisor.Supervisor, name: str) -> asyncio.subprocess.Process:
        if name == "fe1":
            raise OSError(errno.EMFILE, "Too many open files")
        started.append(proc := await spawn(self, name))
        return proc

    monkeypatch.setattr(supervisor.Supervisor, "_spawn", refused_once)
    sup = one_front_end("import time; time.sleep(60)")
    sup.start()
    await wait_for(lambda: started, what="another front end started in its slot")
    assert not sup.failed.is_set()
    await sup.stop(timeout_s=5)


async def test_front_ends_that_can_never_be_started_stop_the_server(monkeypatch) -> None:
    from server import supervisor

    async def refused(self: supervisor.Supervisor, name: str) -> asyncio.subprocess.Process:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.01)
    monkeypatch.setattr(supervisor.Supervisor, "_spawn", refused)
    sup = one_front_end("pass")
    sup.start()
    await asyncio.wait_for(sup.failed.wait(), timeout=30)
    assert sup._quick_exits == supervisor.QUICK_EXITS_MAX
    await sup.stop(timeout_s=5)


async def test_a_front_end_killed_from_outside_is_said_to_be(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # An operator's SIGKILL (or the OOM killer's) read "exited on its own (exit -9)".
    from server import supervisor

    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.01)
    caplog.set_level(logging.INFO, logger="server.supervisor")
    sup = one_front_end("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    sup.start()
    await asyncio.wait_for(sup.failed.wait(), timeout=30)
    await sup.stop(timeout_s=5)
    assert "front end fe1 ended by SIGKILL (exit -9); starting another" in caplog.messages


async def test_a_front_end_stopped_by_its_own_signal_is_started_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One with nothing to drain exits 0 before it could tell its back end it retires: it was
    # started again only after RESTART_DELAY_S, the delay meant for one that failed.
    from server import supervisor

    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 3600.0)
    started: list[str] = []
    spawn = supervisor.Supervisor._spawn

    async def counted(self: supervisor.Supervisor, name: str) -> asyncio.subprocess.Process:
        started.append(name)
        return await spawn(self, name)

    monkeypatch.setattr(supervisor.Supervisor, "_spawn", counted)
    sup = one_front_end("import time; time.sleep(0.2)")
    sup.start()
    await wait_for(lambda: len(started) >= 2, what="a second front end, without the delay")
    assert started[:2] == ["fe1", "fe2"]     # each process started gets a name of its own
    await sup.stop(timeout_s=5)
