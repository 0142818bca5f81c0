"""Load benchmark: N concurrent streams against a running server, as real listeners.

Each stream sends a paragraph word by word at --wps words per second (0: all at once), then
`end`, and plays what comes back in a simulated real-time player that starts once it holds
--start-buffer-ms of audio. Reports, over admitted streams: TTFA (first text sent -> first audio
received) p50/p95/max (and every stream's, `ttfa_ms_all`, to pool small runs) and the server's
own TTFA (`usage.ttfa_ms`, text arrival to first audio sent) p50, messages late for that player
(arrived after their play time), player underruns, timeline gaps (pts not contiguous),
refusals, aggregate compute RTF and encoding CPU per audio second (`encode_rtf`) from `done`
usage, and event-loop lag p99 from the server's /metrics.

    python benchmarks/load.py --url ws://127.0.0.1:8000/v1/stream --streams 12 --wps 15 --json

Sustained load: --arrival-rate R starts the --streams at random (Poisson) times, R per second on
average, as independent users would arrive; with each stream lasting W seconds the server holds
about R x W at once. `live_max` reports the most admitted streams live at one time.

    python benchmarks/load.py --streams 60 --arrival-rate 0.6 --json

Clients that retry: --retries K makes a refused stream wait as the server says (Retry-After,
`retry_after_s`) and try again, up to K times; `admitted_after_retry` and
`admission_wait_ms_max` (arrival to admission) report what that cost them. TTFA still counts
from the first text, sent once admitted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.texts import SENTENCES  # noqa: E402


@dataclass
class StreamReport:
    refused: bool = False
    error: str | None = None
    ttfa_ms: float | None = None
    late: int = 0
    underruns: int = 0
    gaps: int = 0
    audio_ms: float = 0.0
    compute_ms: float = 0.0
    encode_ms: float = 0.0                # the server's CPU time encoding it (`usage.encode_ms`)
    server_ttfa_ms: float | None = None   # the server's own TTFA (`usage.ttfa_ms`): model side only
    late_at_ms: list = field(default_factory=list)
    attempts: int = 1                     # starts tried (refusals retried with --retries)
    wait_ms: float = 0.0                  # arrival -> admitted, retries included
    admitted_at: float = 0.0              # time.monotonic() when admitted


@dataclass
class Player:
    """Real-time playback model: starts after start_buffer_ms, plays at wall-clock speed."""

    start_buffer_ms: float
    started_at: float | None = None      # wall time at which timeline 0 plays
    stall_ms: float = 0.0                # total time the player waited with nothing to play
    late: int = 0
    underruns: int = 0
    late_at_ms: list = field(default_factory=list)   # timeline positions that came late

    def receive(self, pts_ms: float, dur_ms: float, now: float) -> None:
        if self.started_at is None:
            if pts_ms + dur_ms >= self.start_buffer_ms:
                self.started_at = now
        elif now > self.started_at + (pts_ms + self.stall_ms) / 1000.0:
            # Needed earlier than it came: the player ran dry, stalls until now.
            self.late += 1
            self.underruns += 1
            self.late_at_ms.append(round(pts_ms))
            self.stall_ms += (now - self.started_at) * 1000.0 - (pts_ms + self.stall_ms)


def _duration_ms(msg: dict, fmt: str, rate: int) -> float:
    if fmt == "opus":
        return 20.0 * len(msg["data"])
    return len(msg["data"]) / 2 / rate * 1000.0


@dataclass
class Live:
    """Admitted streams between `ready` and their end, and the most at one time."""

    now: int = 0
    most: int = 0

    def enter(self) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def leave(self) -> None:
        self.now -= 1


def start_times(n: int, *, stagger_ms: float, arrival_rate: float, seed: int) -> list[float]:
    """Seconds after the run's start at which each stream starts: evenly `stagger_ms` apart, or
    at Poisson arrivals of `arrival_rate` per second (the first at 0)."""
    if arrival_rate <= 0:
        return [i * stagger_ms / 1000.0 for i in range(n)]
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(arrival_rate)
    return out


async def _open(session: aiohttp.ClientSession, url: str, args, ctx: str,
                rep: StreamReport) -> tuple[aiohttp.ClientWebSocketResponse | None, float | None]:
    """Connect and start `ctx`: the socket, or None and the server's retry hint when refused
    (`rep` then says refused or why it failed)."""
    rep.refused, rep.error = False, None
    try:
        ws = await session.ws_connect(url, max_msg_size=0)
    except aiohttp.WSServerHandshakeError as exc:
        rep.refused = exc.status == 503
        rep.error = None if rep.refused else f"handshake {exc.status}"
        hint = (exc.headers or {}).get("Retry-After")
        return None, float(hint) if hint else None
    await ws.send_bytes(msgpack.packb({"type": "start", "ctx": ctx, "format": args.format,
                                       "sample_rate": 48000}))
    ready = msgpack.unpackb((await ws.receive()).data)
    if ready.get("type") == "ready":
        return ws, None
    rep.refused = ready.get("code") == "overloaded"
    rep.error = None if rep.refused else str(ready)
    await ws.close()
    return None, ready.get("retry_after_s")


async def run_stream(session: aiohttp.ClientSession, url: str, args, idx: int,
                     live: Live | None = None) -> StreamReport:
    rep = StreamReport()
    fmt, rate, ctx = args.format, 48000, f"c{idx}"
    arrived = time.monotonic()
    ws, hint = await _open(session, url, args, ctx, rep)
    # A refused client that retries as told (Retry-After / retry_after_s), up to --retries times.
    while ws is None and rep.refused and rep.attempts <= args.retries:
        await asyncio.sleep(hint if hint else 1.0)
        rep.attempts += 1
        ws, hint = await _open(session, url, args, ctx, rep)
    if ws is None:
        return rep
    rep.admitted_at = time.monotonic()
    rep.wait_ms = (rep.admitted_at - arrived) * 1000.0
    player = Player(args.start_buffer_ms)
    if live is not None:
        live.enter()
    t_first_text = time.monotonic()
    sender = asyncio.create_task(send_text(ws, ctx, stream_words(args, idx), args.wps))
    next_pts = 0.0
    ended = False
    try:
        async for raw in ws:
            if raw.type != aiohttp.WSMsgType.BINARY:
                break
            msg = msgpack.unpackb(raw.data)
            now = time.monotonic()
            if msg["type"] == "audio":
                if rep.ttfa_ms is None:
                    rep.ttfa_ms = (now - t_first_text) * 1000.0
                dur = _duration_ms(msg, fmt, rate)
                if abs(msg["pts_ms"] - next_pts) > 1.0:
                    rep.gaps += 1
                next_pts = msg["pts_ms"] + dur
                player.receive(msg["pts_ms"], dur, now)
            elif msg["type"] == "done":
                rep.audio_ms = msg["usage"]["audio_ms"]
                rep.compute_ms = msg["usage"]["compute_ms"]
                rep.encode_ms = msg["usage"].get("encode_ms") or 0.0
                rep.server_ttfa_ms = msg["usage"].get("ttfa_ms")
                ended = True
                break
            elif msg["type"] == "error":
                rep.error = f"{msg['code']}: {msg['message']}"
                rep.refused = msg["code"] == "overloaded"
                ended = True
                break
        if not ended:   # a stream is heard to its `done` (or an error), or it failed
            rep.error = f"socket closed before done ({ws.close_code})"
    finally:
        sender.cancel()
        if live is not None:
            live.leave()
        await ws.close()
    rep.late, rep.underruns, rep.late_at_ms = player.late, player.underruns, player.late_at_ms[:5]
    return rep


def stream_words(args, idx: int) -> list[str]:
    """The words stream `idx` speaks: the benchmark paragraph's first --words words, or with
    --texts rotate, the paragraph from its (idx mod count)-th sentence on, wrapping around, so
    streams that start together do not reach their phrase boundaries together."""
    first = idx % len(SENTENCES) if args.texts == "rotate" else 0
    words = " ".join(SENTENCES[first:] + SENTENCES[:first]).split(" ")
    while len(words) < args.words:
        words += words
    return words[: args.words]


async def send_text(ws, ctx: str, words: list[str], wps: float) -> None:
    """`words` as `text` at `wps` words per second (0: all at once), then `end`."""
    if wps <= 0:
        await ws.send_bytes(msgpack.packb({"type": "text", "ctx": ctx, "text": " ".join(words)}))
    else:
        for w in words:
            await ws.send_bytes(msgpack.packb({"type": "text", "ctx": ctx, "text": w + " "}))
            await asyncio.sleep(1.0 / wps)
    await ws.send_bytes(msgpack.packb({"type": "end", "ctx": ctx}))


async def metric_quantile(session: aiohttp.ClientSession, base: str, name: str, q: float) -> float | None:
    """Quantile of a Prometheus histogram from /metrics (bucket upper bound)."""
    async with session.get(base + "/metrics") as r:
        text = await r.text()
    buckets = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le
    return None


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def http_base(ws_url: str) -> str:
    """The server's HTTP root for a stream URL: ws://host:port/v1/stream -> http://host:port."""
    return ws_url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/v1/", 1)[0]


def new_session() -> aiohttp.ClientSession:
    """One client session for every stream, without aiohttp's default cap of 100 connections
    (each WebSocket holds one for its whole life: the cap would queue streams 101 and on)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def main_async(args) -> dict:
    base = http_base(args.url)
    async with new_session() as session:
        t0 = time.monotonic()
        tasks, live = [], Live()
        for i, at in enumerate(start_times(args.streams, stagger_ms=args.stagger_ms,
                                           arrival_rate=args.arrival_rate, seed=args.seed)):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            tasks.append(asyncio.create_task(run_stream(session, args.url, args, i, live)))
        reports = await asyncio.gather(*tasks)
        wall = time.monotonic() - t0
        lag = await metric_quantile(session, base, "tts_event_loop_lag_seconds", 0.99)
    ok = [r for r in reports if not r.refused and r.error is None]
    ttfa = [r.ttfa_ms for r in ok if r.ttfa_ms is not None]
    audio = sum(r.audio_ms for r in ok)
    return {
        "streams": args.streams, "wps": args.wps, "words": args.words, "texts": args.texts, "format": args.format,
        "admitted": len(ok), "refused": sum(r.refused for r in reports),
        "admitted_after_retry": sum(1 for r in ok if r.attempts > 1),
        "admission_wait_ms_max": round(max((r.wait_ms for r in ok), default=0.0)),
        "errors": [r.error for r in reports if r.error and not r.refused][:5],
        "ttfa_ms_p50": percentile(ttfa, 0.5), "ttfa_ms_p95": percentile(ttfa, 0.95),
        "ttfa_ms_max": max(ttfa) if ttfa else None,
        # Every admitted stream's, in arrival order: runs too small for a p95 of their own
        # (7 admitted: the p95 is the maximum) can be pooled.
        "ttfa_ms_all": [round(r.ttfa_ms, 1) for r in ok if r.ttfa_ms is not None],
        "server_ttfa_ms_p50": percentile([r.server_ttfa_ms for r in ok if r.server_ttfa_ms is not None], 0.5),
        "arrival_rate": args.arrival_rate, "live_max": live.most,
        "late_messages": sum(r.late for r in ok), "underruns": sum(r.underruns for r in ok),
        "streams_with_late": sum(1 for r in ok if r.late),
        "late_at_ms": [r.late_at_ms for r in ok if r.late_at_ms][:6],
        # When the streams with late messages were admitted (ms after the first arrival), and
        # how many of them only after a retry: a burst's own streams, or the ones that came back?
        "late_admitted_at_ms": [round((r.admitted_at - t0) * 1000) for r in ok if r.late_at_ms][:6],
        "late_streams_after_retry": sum(1 for r in ok if r.late and r.attempts > 1),
        "timeline_gaps": sum(r.gaps for r in ok), "audio_s": round(audio / 1000, 2),
        "compute_rtf": round(sum(r.compute_ms for r in ok) / audio, 4) if audio else None,
        "encode_rtf": round(sum(r.encode_ms for r in ok) / audio, 4) if audio else None,
        "wall_s": round(wall, 2), "loop_lag_p99_ms": None if lag is None else lag * 1000,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--wps", type=float, default=15.0, help="words per second; 0 = all at once")
    ap.add_argument("--words", type=int, default=60, help="words of the benchmark paragraph per stream")
    ap.add_argument("--texts", choices=("same", "rotate"), default="same",
                    help="same: every stream speaks the same words, so streams that start together "
                         "stay in step (the worst case); rotate: stream i starts at sentence i")
    ap.add_argument("--format", default="opus", choices=["opus", "pcm_s16le"])
    ap.add_argument("--start-buffer-ms", type=float, default=60.0)
    ap.add_argument("--stagger-ms", type=float, default=0.0, help="delay between stream starts")
    ap.add_argument("--arrival-rate", type=float, default=0.0,
                    help="streams per second arriving at random (Poisson) times; 0 = --stagger-ms")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random arrival times")
    ap.add_argument("--retries", type=int, default=0,
                    help="a refused stream tries again after the server's Retry-After, this many "
                         "times (0: a refusal is final)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
