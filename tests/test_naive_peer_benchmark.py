"""The peer `benchmarks/naive_peer.py` stands for: whole sentences, one at a time for everyone.
Its figures in BENCHMARKS.md are only a fair comparison if it really serves what the load
benchmark asks for, and really waits for each sentence as that kind of server does."""

import argparse
import asyncio

import msgpack
import numpy as np
import pytest
from aiohttp.test_utils import TestServer

pytest.importorskip("onnxruntime")

from benchmarks.load import new_session, run_stream  # noqa: E402
from benchmarks.naive_peer import NaivePeer, Synthesizer, make_app  # noqa: E402


@pytest.fixture(scope="module")
def synth() -> Synthesizer:
    return Synthesizer(None, threads=1)


async def test_the_peer_serves_the_load_benchmark_a_whole_stream(synth: Synthesizer) -> None:
    server = TestServer(make_app(NaivePeer(synth)))
    await server.start_server()
    try:
        args = argparse.Namespace(format="opus", retries=0, start_buffer_ms=60.0, texts="same",
                                  words=12, wps=0.0)
        async with new_session() as session:
            rep = await run_stream(session, str(server.make_url("/v1/stream")), args, 0)
    finally:
        await server.close()
    assert not rep.refused and rep.error is None
    assert rep.gaps == 0 and rep.ttfa_ms is not None
    assert 2000 < rep.audio_ms < 8000          # 12 words of the paragraph
    assert rep.compute_ms > 0 and rep.server_ttfa_ms is not None


async def test_audio_comes_only_once_a_sentence_has_ended(synth: Synthesizer) -> None:
    server = TestServer(make_app(NaivePeer(synth)))
    await server.start_server()
    try:
        async with new_session() as session:
            ws = await session.ws_connect(str(server.make_url("/v1/stream")))
            await ws.send_bytes(msgpack.packb({"type": "start", "ctx": "a", "format": "pcm_s16le",
                                               "sample_rate": synth.voice.sample_rate}))
            assert msgpack.unpackb((await ws.receive()).data)["type"] == "ready"
            await ws.send_bytes(msgpack.packb({"type": "text", "ctx": "a",
                                               "text": "The first sentence is not over"}))
            with pytest.raises(asyncio.TimeoutError):     # no audio for half a sentence
                await ws.receive(timeout=1.0)
            await ws.send_bytes(msgpack.packb({"type": "text", "ctx": "a", "text": " yet. And "}))
            first = msgpack.unpackb((await ws.receive(timeout=30)).data)
            assert first["type"] == "audio" and first["pts_ms"] == 0
            await ws.send_bytes(msgpack.packb({"type": "end", "ctx": "a"}))
            msgs = [first]
            while msgs[-1]["type"] != "done":
                msgs.append(msgpack.unpackb((await ws.receive(timeout=30)).data))
            await ws.close()
    finally:
        await server.close()
    audio = [m for m in msgs if m["type"] == "audio"]
    samples = sum(len(m["data"]) // 2 for m in audio)
    # The first sentence's audio comes whole, in one message (its durations are drawn at
    # random, so about as long as another synthesis of it); "And" follows.
    expected = synth.synthesize("The first sentence is not over yet.")[0].size
    assert 0.8 * expected < len(audio[0]["data"]) // 2 < 1.25 * expected
    assert samples > len(audio[0]["data"]) // 2
    assert msgs[-1]["usage"]["audio_ms"] == pytest.approx(samples / synth.voice.sample_rate * 1000)
    pcm = np.frombuffer(b"".join(m["data"] for m in audio), "<i2")
    assert np.abs(pcm).max() > 1000                   # speech, not silence
