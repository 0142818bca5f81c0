"""Where a stream's first audio spends its time: one stream at a time, stage by stage.

Starts `run_server.py` in a child process with timestamps at points of the path (the acoustic
model starts and ends, the step with the first chunk's decode ends, the encoder threads finish
its audio), then plays N listeners one after the other, each sending --words words at once (or
at --wps words per second) and `end`, and reports per run, and as medians, 95th percentiles
(nearest rank) and maxima:

    text_to_model   the client's first send -> the acoustic model starts (socket, splitter,
                    phonemes; with --wps, the wait for the first phrase's words)
    acoustic        text encoder, durations and the head of the flow
    first_decode    the first chunk's decode (the rest of that step)
    encode          that step's end -> its first audio encoded (hand-over, resampling, Opus)
    deliver         -> the first `audio` received (outbox, socket, the client's read)
    ttfa            the client's first send -> the first `audio` received
    first_word      ttfa + where the first word starts in that audio (its `words` start_ms:
                    the model's durations, moved to its sound where that opens sooner)
    first_sound     ttfa + where that audio first has sound (a 5 ms window above -50 dBFS,
                    the Opus decoded here, less the codec's delay): when a listener that plays
                    from the first audio hears something. By the durations alone the first
                    word started 4-5 frames after its first sound (the "Th" of "The")

The child and this process read the same clock (`time.monotonic`, system-wide on Linux). The
stamps are taken by wrapping a few methods; they cost microseconds each.

    python benchmarks/first_audio.py --runs 12 --json
    python benchmarks/first_audio.py --runs 12 --wps 15      # text at an LLM's pace
    python benchmarks/first_audio.py --runs 12 -- --config configs/gpu.toml --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import functools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.load import send_text  # noqa: E402
from benchmarks.texts import PARAGRAPH  # noqa: E402

STAGES = ("text_to_model", "acoustic", "first_decode", "encode", "deliver", "ttfa",
          "first_word", "first_sound")
SOUND_DBFS = -50.0     # a 5 ms window louder than this has sound
OPUS_RATE = 48000      # the protocol's default format: Opus at 48 kHz
READY_TIMEOUT_S = 300.0


# ------------------------------------------------------------------ the server side (child)


def _stamp(events: list[tuple[float, str]], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, appending (time, name + "+") before and (time, name + "-") after each call."""
    if asyncio.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            events.append((time.monotonic(), name + "+"))
            try:
                return await fn(*args, **kwargs)
            finally:
                events.append((time.monotonic(), name + "-"))
        return wrapped_async

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        events.append((time.monotonic(), name + "+"))
        try:
            return fn(*args, **kwargs)
        finally:
            events.append((time.monotonic(), name + "-"))
    return wrapped


def instrument(events: list[tuple[float, str]]) -> None:
    """Wrap the points of the first audio's path (list.append is atomic under the GIL, so
    the model, text and encoder threads may all stamp)."""
    from server.encoders import EncoderPool
    from streaming_tts.engine import Engine
    from streaming_tts.scheduler import Scheduler
    for cls, name, label in ((Scheduler, "_execute", "step"), (Engine, "acoustic", "acoustic"),
                             (EncoderPool, "run", "encode")):
        setattr(cls, name, _stamp(events, label, getattr(cls, name)))


def serve(events_path: str, server_args: list[str]) -> int:
    """(child) run_server.main with the stamps; they are written out when it exits."""
    import run_server
    from server.config import add_config_arguments, load_config, overrides_from_args

    # What run_server sets before PyTorch loads, before `instrument` loads it.
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args, _ = parser.parse_known_args(server_args)
    run_server._openmp_spin(load_config(args.config, overrides_from_args(args)))
    events: list[tuple[float, str]] = []
    instrument(events)

    def dump() -> None:
        with open(events_path, "w") as f:
            json.dump(events, f)
    atexit.register(dump)
    return run_server.main(server_args)


# ------------------------------------------------------------------ the client side


def first_sound_ms(packets: list[bytes]) -> float | None:
    """Where the stream's decoded Opus first has sound, in ms of its timeline; None if never."""
    import opuslib
    decoder = opuslib.Decoder(OPUS_RATE, 1)
    pcm = np.frombuffer(b"".join(decoder.decode(bytes(p), OPUS_RATE // 50) for p in packets),
                        dtype="<i2").astype(np.float64) / 32768.0
    delay = opuslib.Encoder(OPUS_RATE, 1, opuslib.APPLICATION_VOIP).lookahead
    window = OPUS_RATE // 200
    n = len(pcm) // window
    rms = np.sqrt(np.mean(pcm[: n * window].reshape(n, window) ** 2, axis=1))
    loud = np.flatnonzero(rms > 10 ** (SOUND_DBFS / 20))
    if not len(loud):
        return None
    return max(0.0, (loud[0] * window - delay) * 1000.0 / OPUS_RATE)


async def _one_stream(session: aiohttp.ClientSession, url: str, words: list[str],
                      wps: float) -> tuple[float, float, float, float]:
    """(first send time, first audio time, the first word's start and the first sound in the
    stream in ms) of one stream that sends `words` at `wps` words per second (0: at once)."""
    async with session.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_bytes(msgpack.packb({"type": "start", "ctx": "a"}))
        ready = msgpack.unpackb((await ws.receive(timeout=30)).data)
        if ready.get("type") != "ready":
            raise RuntimeError(f"not admitted: {ready}")
        sent = time.monotonic()
        sender = asyncio.create_task(send_text(ws, "a", words, wps))
        first, first_word, packets = None, None, []
        try:
            while True:
                raw = await ws.receive(timeout=60)
                if raw.type != aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"the socket closed: {raw.type}")
                msg = msgpack.unpackb(raw.data)
                if msg["type"] == "audio":
                    if first is None:
                        first = time.monotonic()
                    if len(packets) < 50:   # the first second
                        data = msg["data"]
                        packets += data if isinstance(data, list) else [data]
                elif msg["type"] == "words" and first_word is None and msg["items"]:
                    first_word = msg["items"][0][1]
                elif msg["type"] == "error":
                    raise RuntimeError(f"error: {msg}")
                elif msg["type"] == "done":
                    break
            await sender
        finally:
            sender.cancel()
        sound = first_sound_ms(packets)
        if first is None or first_word is None or sound is None:
            raise RuntimeError("`done` without any audio, word or sound")
        return sent, first, first_word, sound


async def play(url: str, runs: int, words: int, wps: float,
               pause_s: float) -> list[tuple[float, float, float]]:
    spoken = PARAGRAPH.split()[:words]
    async with aiohttp.ClientSession() as session:
        out = []
        for _ in range(runs):
            out.append(await _one_stream(session, url, spoken, wps))
            await asyncio.sleep(pause_s)
        return out


async def wait_ready(base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                async with session.get(base + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


# ------------------------------------------------------------------ analysis


def _first(events: list[tuple[float, str]], name: str, after: float, before: float) -> float | None:
    return next((t for t, n in events if n == name and after <= t <= before), None)


def breakdown(events: list[tuple[float, str]], sent: float, first: float,
              first_word_ms: float, first_sound_ms: float) -> dict[str, float]:
    """One run's stages in ms (see the module docstring)."""
    a0 = _first(events, "acoustic+", sent, first)
    a1 = _first(events, "acoustic-", sent, first)
    s1 = _first(events, "step-", sent, first)
    e1 = None if s1 is None else _first(events, "encode-", s1, first)
    if a0 is None or a1 is None or s1 is None or e1 is None:
        raise RuntimeError("no model step and encoding between the text and the first audio")
    ms = 1000.0
    return {"text_to_model": (a0 - sent) * ms, "acoustic": (a1 - a0) * ms,
            "first_decode": (s1 - a1) * ms, "encode": (e1 - s1) * ms,
            "deliver": (first - e1) * ms, "ttfa": (first - sent) * ms,
            "first_word": (first - sent) * ms + first_word_ms,
            "first_sound": (first - sent) * ms + first_sound_ms}


def nearest_rank(values: list[float], q: float) -> float:
    """The q-quantile of `values` by nearest rank: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    return {"runs": len(rows),
            "median_ms": {k: round(statistics.median(r[k] for r in rows), 1) for k in STAGES},
            "p95_ms": {k: round(nearest_rank([r[k] for r in rows], 0.95), 1) for k in STAGES},
            "max_ms": {k: round(max(r[k] for r in rows), 1) for k in STAGES},
            "per_run_ms": [{k: round(r[k], 1) for k in STAGES} for r in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to run_server.py.")
    p.add_argument("--runs", type=int, default=12)
    p.add_argument("--words", type=int, default=30, help="words each stream sends")
    p.add_argument("--wps", type=float, default=0.0, help="words per second; 0 = all at once")
    p.add_argument("--pause-s", type=float, default=1.0, help="idle time between streams")
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve", metavar="EVENTS_FILE", help=argparse.SUPPRESS)  # the child
    args, rest = p.parse_known_args(argv)
    server_args = [a for a in rest if a != "--"]
    if args.serve:
        return serve(args.serve, ["--port", str(args.port), *server_args])
    if args.runs < 1:
        p.error("--runs must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        events_path = os.path.join(tmp, "events.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", events_path,
               "--port", str(args.port), "--log-level", "WARNING", *server_args]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        try:
            asyncio.run(wait_ready(f"http://127.0.0.1:{args.port}", proc))
            times = asyncio.run(play(f"ws://127.0.0.1:{args.port}/v1/stream", args.runs,
                                     args.words, args.wps, args.pause_s))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        with open(events_path) as f:
            events = [(t, n) for t, n in json.load(f)]
    report = summarize([breakdown(events, *run) for run in times])
    if args.json:
        print(json.dumps(report))
    else:
        print("stage             median     p95     max (ms)")
        for k in STAGES:
            print(f"{k:16s} {report['median_ms'][k]:7.1f} {report['p95_ms'][k]:7.1f} "
                  f"{report['max_ms'][k]:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
