"""A live caption feed read aloud: how far behind the feed the listener hears each line.

Captions (or a transcript) arrive a line at a time at a speaker's pace; a listener should hear
each line as soon after it came as can be, and a feed faster than the voice should not leave
the listener further behind every minute (`start`'s `max_speed`, docs/protocol.md).

One stream: the fixed text (benchmarks/texts.py) cut into lines of 5-10 words, each sent when
a speaker at `--wps` words per second would have said it (a space after each line). A real-time
player starts at the first audio, plays the timeline in order and waits where the next audio
has not come. Each line's latency: from the moment it was sent to the moment the player plays
its first word (the `words` timings). Reported: the latency's median, maximum, the mean over
the last five lines, and its slope over the feed (seconds per second: 0 where the listener
keeps up, the feed's excess over the voice where it falls behind), the audio made and the
phrases it was cut into.

    .venv/bin/python run_server.py --port 8000 &
    .venv/bin/python benchmarks/captions.py --url ws://127.0.0.1:8000/v1/stream --wps 4 \
        --max-speed 1.5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack

if __package__ in (None, ""):   # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.texts import PARAGRAPH  # noqa: E402

SAMPLE_RATE = 24000   # pcm_s16le: each audio message's length is its duration


def caption_lines(words: list[str], seed: int, shortest: int = 5, longest: int = 10) -> list[str]:
    """`words` cut into lines of `shortest`..`longest` words (drawn with `seed`)."""
    rng = random.Random(seed)
    lines, i = [], 0
    while i < len(words):
        n = rng.randint(shortest, longest)
        lines.append(" ".join(words[i:i + n]))
        i += n
    return lines


def send_times(lines: list[str], wps: float) -> list[float]:
    """When each line is sent, from the feed's start: once the words before it were said."""
    times, said = [], 0
    for line in lines:
        times.append(said / wps)
        said += len(line.split())
    return times


@dataclass
class Playback:
    """A real-time player of one stream's audio: starts at the first audio, plays the timeline
    in order, and waits (the timeline paused) where the next audio has not arrived."""

    # (pts_ms, duration_ms, wall time its play starts), one per audio message, in order
    pieces: list[tuple[float, float, float]] = field(default_factory=list)

    def receive(self, pts_ms: float, duration_ms: float, now: float) -> None:
        if self.pieces:
            pts, dur, began = self.pieces[-1]
            now = max(now, began + dur / 1000.0)
        self.pieces.append((pts_ms, duration_ms, now))

    def played_at(self, pts_ms: float) -> float:
        """Wall time at which the timeline's `pts_ms` is heard."""
        for pts, dur, began in self.pieces:
            if pts <= pts_ms < pts + dur:
                return began + (pts_ms - pts) / 1000.0
        raise ValueError(f"no audio at {pts_ms} ms")

    @property
    def audio_s(self) -> float:
        return sum(dur for _, dur, _ in self.pieces) / 1000.0


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def line_latencies(lines: list[str], sent: list[float], word_starts_ms: list[float],
                   playback: Playback) -> list[float]:
    """Per line: seconds from its sending to its first word heard. `word_starts_ms` holds
    every word's start on the timeline, in order (the `words` items, one per written word)."""
    out, first = [], 0
    for line, at in zip(lines, sent):
        out.append(playback.played_at(word_starts_ms[first]) - at)
        first += len(line.split())
    return out


async def feed(url: str, lines: list[str], wps: float, start: dict[str, Any]) -> dict[str, Any]:
    """Send `lines` at `wps` over one stream; the messages received, each with its time."""
    sent = send_times(lines, wps)
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        async def send(msg: dict[str, Any]) -> None:
            await ws.send_bytes(msgpack.packb(msg, use_bin_type=True))

        await send({"type": "start", "ctx": "feed", "format": "pcm_s16le",
                    "sample_rate": SAMPLE_RATE, **start})
        got = msgpack.unpackb((await ws.receive()).data)
        if got["type"] != "ready":
            raise RuntimeError(f"stream refused: {got}")
        t0 = time.monotonic()

        async def feeder() -> None:
            for line, at in zip(lines, sent):
                await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
                await send({"type": "text", "ctx": "feed", "text": line + " "})
            await send({"type": "end", "ctx": "feed"})

        task = asyncio.create_task(feeder())
        received: list[tuple[float, dict[str, Any]]] = []
        try:
            while True:
                frame = await ws.receive()
                if frame.type != aiohttp.WSMsgType.BINARY:
                    raise RuntimeError(f"socket closed: {frame.type} {frame.data!r}")
                msg = msgpack.unpackb(frame.data)
                received.append((time.monotonic() - t0, msg))
                if msg["type"] == "error":
                    raise RuntimeError(f"error: {msg}")
                if msg["type"] == "done":
                    break
        finally:
            task.cancel()
    return {"sent": sent, "received": received}


def report(lines: list[str], sent: list[float], received: list[tuple[float, dict[str, Any]]],
           wps: float, max_speed: float | None) -> dict[str, Any]:
    playback = Playback()
    starts: list[float] = []
    phrases = 0
    for at, msg in received:
        if msg["type"] == "audio":
            playback.receive(msg["pts_ms"], len(msg["data"]) / 2 * 1000.0 / SAMPLE_RATE, at)
        elif msg["type"] == "words":
            starts += [start for _, start, _ in msg["items"]]
        elif msg["type"] == "phrase":
            phrases += 1
    words = sum(len(line.split()) for line in lines)
    if len(starts) != words:
        raise RuntimeError(f"{len(starts)} word timings for {words} words sent")
    lat = line_latencies(lines, sent, starts, playback)
    return {
        "wps": wps, "max_speed": max_speed, "lines": len(lines), "words": words,
        "feed_s": round(sent[-1] + len(lines[-1].split()) / wps, 2),
        "audio_s": round(playback.audio_s, 2),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_max_s": round(max(lat), 3),
        "latency_last5_s": round(statistics.fmean(lat[-5:]), 3),
        "slope_s_per_s": round(slope(sent, lat), 4),
        "phrases": phrases, "words_per_phrase": round(words / max(1, phrases), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    p.add_argument("--wps", type=float, default=2.7, help="the feed's pace, words per second")
    p.add_argument("--max-speed", type=float, help="start's max_speed (default: none)")
    p.add_argument("--speed", type=float, help="start's speed (default: the voice's)")
    p.add_argument("--max-buffer-delay-ms", type=float)
    p.add_argument("--lines", type=int, default=30, help="lines of the text to send (at most)")
    p.add_argument("--seed", type=int, default=1, help="draws the lines' lengths")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    lines = caption_lines(PARAGRAPH.split(), args.seed)[: args.lines]
    start = {key: value for key, value in (("max_speed", args.max_speed), ("speed", args.speed),
                                           ("max_buffer_delay_ms", args.max_buffer_delay_ms))
             if value is not None}
    got = asyncio.run(feed(args.url, lines, args.wps, start))
    out = report(lines, got["sent"], got["received"], args.wps, args.max_speed)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>18}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
