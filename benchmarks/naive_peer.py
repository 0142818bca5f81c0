"""The peer to beat, on this machine: a naive per-sentence server around the reference runtime.

What a self-hosted Piper deployment does when put behind a WebSocket (wyoming-piper's way):
text is buffered until a sentence ends, each whole sentence is synthesized by onnxruntime
(piper's own graph, all cores) under one global lock shared by every client, and its audio is
sent once it exists. It speaks the subset of `docs/protocol.md` that `benchmarks/load.py` uses
(`start` -> `ready`, `text`, `end`, then `audio` and `done` with `usage`), encodes Opus or PCM
with the project's own encoders (so encoding costs both servers the same), and has no
admission control: every client is served. Run it, then point `load.py` at it:

    python benchmarks/naive_peer.py --port 8400 &
    python benchmarks/load.py --url ws://127.0.0.1:8400/v1/stream --streams 6 --wps 15 --json

Phonemes come from the project's espeak-ng bridge (the same ids as piper-tts's for the voice's
test sentences, `shared/notes/facts.md`), read literally (no written-form normalization, as
piper). `usage.compute_ms` is the onnxruntime time of the stream's sentences; `usage.ttfa_ms`
is from the first text's arrival to the first audio sent.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import re
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
from aiohttp import WSMsgType, web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streaming_tts.audio.encode import OpusStreamEncoder, make_encoder  # noqa: E402
from streaming_tts.text.phonemes import Phonemizer  # noqa: E402
from streaming_tts.voices import VoiceRegistry  # noqa: E402

log = logging.getLogger("naive_peer")

# A sentence ends at a terminal run followed by whitespace (piper cuts at espeak's clause ends,
# which for this text are the same places).
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+")
PACKETS_PER_MESSAGE = 50   # 1 s of 20 ms Opus packets per `audio` message


class Synthesizer:
    """One onnxruntime session; `synthesize` is called under the server's global lock."""

    def __init__(self, voice_id: str | None, threads: int) -> None:
        import onnxruntime as ort
        registry = VoiceRegistry()
        self.voice = registry.resolve(voice_id) if voice_id else registry.default()
        self.phonemizer = Phonemizer(self.voice.config)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(self.voice.onnx_path), so,
                                            providers=["CPUExecutionProvider"])
        cfg = self.voice.config
        self.scales = np.array([cfg.noise_scale, cfg.length_scale, cfg.noise_w], np.float32)

    def synthesize(self, sentence: str) -> tuple[np.ndarray, float]:
        """(audio float32 at the voice rate, seconds of model time); empty for no phonemes."""
        try:
            ids = self.phonemizer.phonemize(sentence).ids
        except ValueError:
            return np.zeros(0, np.float32), 0.0
        t0 = time.perf_counter()
        audio = self.session.run(None, {
            "input": np.asarray([ids], np.int64),
            "input_lengths": np.asarray([len(ids)], np.int64),
            "scales": self.scales,
        })[0]
        return np.asarray(audio, np.float32).reshape(-1), time.perf_counter() - t0


class Stream:
    def __init__(self, ws: web.WebSocketResponse, ctx: str, encoder) -> None:
        self.ws, self.ctx, self.encoder = ws, ctx, encoder
        self.buffer = ""
        self.sentences: asyncio.Queue[str | None] = asyncio.Queue()
        self.first_text_at: float | None = None
        self.ttfa_ms: float | None = None
        self.compute_s = self.encode_s = 0.0
        self.pts_ms = 0.0
        self.chars = 0

    def add_text(self, text: str) -> None:
        if self.first_text_at is None:
            self.first_text_at = time.monotonic()
        self.chars += len(text)
        self.buffer += text
        while (m := _SENTENCE_END.search(self.buffer)) is not None:
            self.sentences.put_nowait(self.buffer[:m.end()].strip())
            self.buffer = self.buffer[m.end():]

    def end(self) -> None:
        if self.buffer.strip():
            self.sentences.put_nowait(self.buffer.strip())
        self.buffer = ""
        self.sentences.put_nowait(None)


class NaivePeer:
    def __init__(self, synth: Synthesizer) -> None:
        self.synth = synth
        self.lock = asyncio.Lock()   # one sentence at a time, for every client
        self.model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ort")
        self.encode_threads = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="enc")

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=1 << 20)
        await ws.prepare(request)
        stream: Stream | None = None
        worker: asyncio.Task | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    break
                m = msgpack.unpackb(msg.data)
                kind = m.get("type")
                if kind == "start" and stream is None:
                    fmt = m.get("format", "opus")
                    rate = int(m.get("sample_rate", 48000))
                    encoder = make_encoder(fmt, in_rate=self.synth.voice.sample_rate, out_rate=rate)
                    stream = Stream(ws, m.get("ctx", "default"), encoder)
                    worker = asyncio.create_task(self.speak(stream))
                    await self.send(ws, {"type": "ready", "ctx": stream.ctx})
                elif kind == "text" and stream is not None:
                    stream.add_text(m.get("text", ""))
                elif kind == "end" and stream is not None:
                    stream.end()
            if worker is not None:
                await worker
        finally:
            if worker is not None and not worker.done():
                worker.cancel()
        return ws

    async def speak(self, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        while (sentence := await stream.sentences.get()) is not None:
            async with self.lock:
                audio, seconds = await loop.run_in_executor(self.model_thread,
                                                            self.synth.synthesize, sentence)
            stream.compute_s += seconds
            await self.emit(stream, audio, final=False)
        await self.emit(stream, np.zeros(0, np.float32), final=True)
        await self.send(stream.ws, {"type": "done", "ctx": stream.ctx, "usage": {
            "chars": stream.chars, "audio_ms": stream.pts_ms,
            "compute_ms": stream.compute_s * 1000.0, "encode_ms": stream.encode_s * 1000.0,
            "ttfa_ms": stream.ttfa_ms}})
        await stream.ws.close()

    async def emit(self, stream: Stream, audio: np.ndarray, *, final: bool) -> None:
        loop = asyncio.get_running_loop()

        def encode():
            t0 = time.thread_time()
            out = stream.encoder.finish() if final else stream.encoder.encode(audio)
            return out, time.thread_time() - t0

        payload, cpu = await loop.run_in_executor(self.encode_threads, encode)
        stream.encode_s += cpu
        if isinstance(stream.encoder, OpusStreamEncoder):
            chunks = [payload[i:i + PACKETS_PER_MESSAGE]
                      for i in range(0, len(payload), PACKETS_PER_MESSAGE)]
            durations = [20.0 * len(c) for c in chunks]
        else:
            chunks = [payload] if payload else []
            durations = [len(payload) / 2 / stream.encoder.out_rate * 1000.0]
        for data, dur in zip(chunks, durations):
            if stream.ttfa_ms is None and stream.first_text_at is not None:
                stream.ttfa_ms = (time.monotonic() - stream.first_text_at) * 1000.0
            await self.send(stream.ws, {"type": "audio", "ctx": stream.ctx, "pts_ms": stream.pts_ms,
                                        "data": data})
            stream.pts_ms += dur

    @staticmethod
    async def send(ws: web.WebSocketResponse, msg: dict) -> None:
        if not ws.closed:
            await ws.send_bytes(msgpack.packb(msg))


def make_app(peer: NaivePeer) -> web.Application:
    app = web.Application()
    app.router.add_get("/v1/stream", peer.handle)
    app.router.add_get("/healthz", _healthz)
    return app


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8400)
    ap.add_argument("--voice", default=None, help="voice id or .onnx path (default voice)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    peer = NaivePeer(Synthesizer(args.voice, args.threads))
    peer.synth.synthesize("Warm up.")
    web.run_app(make_app(peer), host=args.host, port=args.port,
                print=lambda _s: log.info("ready on %d", args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
