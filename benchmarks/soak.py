"""Soak benchmark: streams come and go for a long time, as users do. Does anything leak?

Against a running server (`run_server.py`), --clients clients loop for --minutes. Each round a
client plays one scenario, in turn:

  complete   speak 10-40 words (at 15 words/s or all at once) and read to `done`
  cancel     speak, `cancel` 0.2-2 s in, then speak again on the same context; `cancelled`
             must carry the stream's usage (null only if `done` came first), with at least the
             audio received; the report gives cancel -> `cancelled` times, and cancel -> the
             first audio of the reply started after `cancelled` (a barge-in)
  close      speak, close the socket (close frame) 0.2-2 s in
  vanish     speak, drop the TCP connection 0.2-2 s in, without a close frame
  bad        malformed frames (a text frame, bytes that are not msgpack, an unknown type, a
             field of the wrong type): each must get `bad_request`, then speak to `done` on the
             same socket
  contexts   two contexts on one socket, interleaved, both to `done`
  stall      speak 40 words, read the first audio, then read nothing for --stall-s: the server
             must close the socket 1008 "slow consumer" (it is more than `max_send_lag_s`
             behind), though the TCP buffers would take minutes to fill at Opus bitrates

A refused client waits as long as the server says and tries again.

Every --sample-s it reads /metrics: the server's resident memory and open fds (the process
collector), its live event-loop tasks, open sockets and active streams, and its threads from
/proc/PID/status when --pid is given (a server on this machine). At the end the clients stop,
the server is given time to go idle, and the report gives: resident memory after --settle-s
and at the end, its least-squares slope over the samples after --settle-s (MB per hour), the
idle server before and after (tasks, fds, threads, sockets, streams), what each scenario did,
the model's step time (`tts_compute_seconds_total`) against the compute_ms billed by `done` and
`cancelled` (and the server's own split of it, `tts_ended_compute_seconds_total`), and every violation seen: a timeline gap, audio after `cancelled`, a `done` whose audio_ms
does not match the audio received, an unexpected error, a round that did not end within
MAX_ROUND_S (e.g. a client refused for that long by a server with room).

    python run_server.py --port 8150 &
    python benchmarks/soak.py --url ws://127.0.0.1:8150/v1/stream --pid $! --minutes 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.load import http_base, new_session, percentile  # noqa: E402
from benchmarks.texts import SENTENCES  # noqa: E402

SCENARIOS = ("complete", "cancel", "close", "vanish", "bad", "contexts", "stall")
WORDS = " ".join(SENTENCES).split(" ")
FRAME_MS = 20.0   # one Opus packet
MAX_ROUND_S = 120.0   # a round that takes longer is stuck: a violation
IDLE_KEYS = ("rss_mb", "fds", "tasks", "threads", "sockets", "streams")
GAUGES = {
    "rss_mb": "process_resident_memory_bytes",
    "fds": "process_open_fds",
    "tasks": "tts_event_loop_tasks",
    "sockets": "tts_open_sockets",
    "streams": "tts_active_streams",
    "compute_s": "tts_compute_seconds_total",
    # The server's own split of that time by where each ended stream's usage went.
    **{f"ended_{how}_s": f'tts_ended_compute_seconds_total{{reported="{how}"}}'
       for how in ("done", "cancelled", "log_only")},
}


class Violation(Exception):
    """The server broke the protocol's contract."""


@dataclass
class StreamCheck:
    """One stream's audio as it arrives: the timeline must be contiguous, no audio may follow
    `cancelled`, and `done` must account for the audio received."""

    ctx: str
    received_ms: float = 0.0
    next_seq: int = 0
    cancelled: bool = False
    first_audio_at: float | None = None   # time.monotonic()

    def audio(self, msg: dict) -> None:
        if self.cancelled:
            raise Violation(f"{self.ctx}: audio after cancelled (seq {msg['seq']})")
        if msg["seq"] != self.next_seq:
            raise Violation(f"{self.ctx}: seq {msg['seq']}, expected {self.next_seq}")
        if abs(msg["pts_ms"] - self.received_ms) > 1.0:
            raise Violation(f"{self.ctx}: pts {msg['pts_ms']} ms after {self.received_ms} ms "
                            "received: a timeline gap")
        self.next_seq += 1
        self.received_ms += FRAME_MS * len(msg["data"])
        if self.first_audio_at is None:
            self.first_audio_at = time.monotonic()

    def on_cancelled(self, usage: dict | None, *, finished: bool) -> None:
        """`cancelled` carries the usage of the stream it stopped; none if `done` came first."""
        self.cancelled = True
        if finished != (usage is None):
            raise Violation(f"{self.ctx}: cancelled after {'done' if finished else 'audio'} "
                            f"with usage {usage}")
        # What was made counts, sent or dropped by the cancel (the last frame may be padded).
        if usage is not None and usage["audio_ms"] < self.received_ms - 2 * FRAME_MS:
            raise Violation(f"{self.ctx}: cancelled says {usage['audio_ms']} ms of audio, "
                            f"{self.received_ms} ms received")

    def done(self, usage: dict) -> float:
        # Opus pads the last frame and adds its codec delay (6.5 ms): up to two frames more.
        if not -1.0 <= self.received_ms - usage["audio_ms"] <= 2 * FRAME_MS:
            raise Violation(f"{self.ctx}: done says {usage['audio_ms']} ms of audio, "
                            f"{self.received_ms} ms received")
        return self.received_ms


@dataclass
class Tally:
    rounds: collections.Counter = field(default_factory=collections.Counter)
    refused: int = 0
    streams_done: int = 0
    audio_s: float = 0.0
    cancel_ms: list[float] = field(default_factory=list)   # cancel sent -> `cancelled` read
    # cancel sent -> the first audio of the reply started once `cancelled` came (a barge-in)
    barge_in_ms: list[float] = field(default_factory=list)
    billed_ms: float = 0.0   # compute_ms of every `done` and `cancelled` usage received
    violations: list[str] = field(default_factory=list)


class Client:
    """One simulated user: a socket at a time, scenarios in turn."""

    def __init__(self, url: str, tally: Tally, rng: random.Random, stall_s: float,
                 scenarios: tuple[str, ...] = SCENARIOS) -> None:
        self.url, self.tally, self.rng, self.stall_s = url, tally, rng, stall_s
        self.scenarios = scenarios

    # ---- plumbing
    async def connect(self, session: aiohttp.ClientSession,
                      **options: bool) -> aiohttp.ClientWebSocketResponse:
        while True:
            try:
                return await session.ws_connect(self.url, max_msg_size=0, **options)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status != 503:
                    raise Violation(f"handshake refused with {exc.status}") from exc
                self.tally.refused += 1
                await asyncio.sleep(float((exc.headers or {}).get("Retry-After", 1)))

    @staticmethod
    async def send(ws, msg: dict) -> None:
        await ws.send_bytes(msgpack.packb(msg, use_bin_type=True))

    @staticmethod
    async def recv(ws, timeout: float | None = None) -> dict:
        # An absolute timeout: aiohttp's own restarts at every ping it answers (the server
        # pings each second while a stream is live).
        async with asyncio.timeout(timeout):
            while (frame := await ws.receive()).type is aiohttp.WSMsgType.PING:
                pass   # the stall scenario's socket answers no ping
        if frame.type != aiohttp.WSMsgType.BINARY:
            raise Violation(f"socket ended unexpectedly ({frame.type.name})")
        return msgpack.unpackb(frame.data)

    async def start(self, ws, ctx: str) -> StreamCheck:
        """`start` until admitted (a refusal is waited out as told)."""
        while True:
            await self.send(ws, {"type": "start", "ctx": ctx})
            reply = await self.recv(ws)
            if reply["type"] == "ready":
                return StreamCheck(ctx)
            if reply.get("code") != "overloaded":
                raise Violation(f"{ctx}: start answered {reply}")
            self.tally.refused += 1
            await asyncio.sleep(reply.get("retry_after_s", 1))

    def words(self) -> str:
        n = self.rng.randint(10, 40)
        first = self.rng.randrange(len(WORDS))
        return " ".join((WORDS[first:] + WORDS)[:n])

    async def feed(self, ws, ctx: str, text: str) -> None:
        if self.rng.random() < 0.5:
            await self.send(ws, {"type": "text", "ctx": ctx, "text": text})
        else:   # word by word at 15 words/s, like an LLM
            for word in text.split(" "):
                await self.send(ws, {"type": "text", "ctx": ctx, "text": word + " "})
                await asyncio.sleep(1 / 15)
        await self.send(ws, {"type": "end", "ctx": ctx})

    async def read_to_done(self, ws, checks: dict[str, StreamCheck],
                           until: float | None = None) -> None:
        """Read until every stream in `checks` is done (or, with `until`, that deadline)."""
        pending = set(checks)
        while pending:
            timeout = None if until is None else until - time.monotonic()
            if timeout is not None and timeout <= 0:
                return
            try:
                msg = await self.recv(ws, timeout)
            except TimeoutError:
                return
            check = checks.get(msg.get("ctx"))
            if check is None:
                raise Violation(f"message for an unknown context: {msg}")
            if msg["type"] == "audio":
                check.audio(msg)
            elif msg["type"] == "done":
                self.tally.audio_s += check.done(msg["usage"]) / 1000
                self.tally.billed_ms += msg["usage"]["compute_ms"]
                self.tally.streams_done += 1
                pending.discard(check.ctx)
            elif msg["type"] == "error":
                raise Violation(f"{check.ctx}: unexpected error {msg}")

    # ---- scenarios
    async def complete(self, ws) -> None:
        check = await self.start(ws, "s")
        sender = asyncio.create_task(self.feed(ws, "s", self.words()))
        await self.read_to_done(ws, {"s": check})
        await sender

    async def _midway(self, ws) -> StreamCheck:
        """Start a stream, read it for 0.2-2 s, and stop sending its text."""
        check = await self.start(ws, "s")
        sender = asyncio.create_task(self.feed(ws, "s", self.words()))
        await self.read_to_done(ws, {"s": check}, until=time.monotonic() + self.rng.uniform(0.2, 2))
        sender.cancel()
        return check

    async def cancel(self, ws) -> None:
        check = await self._midway(ws)
        sent_at = time.monotonic()
        await self.send(ws, {"type": "cancel", "ctx": "s"})
        finished = False
        while True:   # audio sent before the cancel may still arrive; none after `cancelled`
            msg = await self.recv(ws)
            if msg["type"] == "cancelled":
                self.tally.cancel_ms.append((time.monotonic() - sent_at) * 1000)
                break
            if msg["type"] == "audio":
                check.audio(msg)
            elif msg["type"] == "done":   # it had finished before the cancel arrived
                check.done(msg["usage"])
                self.tally.billed_ms += msg["usage"]["compute_ms"]
                finished = True
            elif msg["type"] not in ("phrase", "words"):
                raise Violation(f"before cancelled: {msg}")
        check.on_cancelled(msg.get("usage"), finished=finished)
        if msg.get("usage"):
            self.tally.billed_ms += msg["usage"]["compute_ms"]
        # The same context again: anything of the cancelled stream would show up here.
        again = await self.start(ws, "s")
        await self.feed(ws, "s", "Once more.")
        await self.read_to_done(ws, {"s": again})
        if again.first_audio_at is not None:
            self.tally.barge_in_ms.append((again.first_audio_at - sent_at) * 1000)

    async def close(self, ws) -> None:
        await self._midway(ws)
        await ws.close()

    async def bad(self, ws) -> None:
        await ws.send_str('{"type": "start"}')
        await self.expect_bad_request(ws, "a text frame")
        await ws.send_bytes(b"\xc1\xff\x00")
        await self.expect_bad_request(ws, "bytes that are not msgpack")
        await self.send(ws, {"type": "sing"})
        await self.expect_bad_request(ws, "an unknown type")
        await self.send(ws, {"type": "start", "ctx": "s", "speed": "fast"})
        await self.expect_bad_request(ws, "a field of the wrong type")
        await self.complete(ws)

    async def expect_bad_request(self, ws, what: str) -> None:
        reply = await self.recv(ws)
        if reply.get("type") != "error" or reply.get("code") != "bad_request":
            raise Violation(f"{what}: answered {reply}, not bad_request")

    async def contexts(self, ws) -> None:
        checks = {ctx: await self.start(ws, ctx) for ctx in ("a", "b")}
        senders = [asyncio.create_task(self.feed(ws, ctx, self.words())) for ctx in checks]
        await self.read_to_done(ws, checks)
        await asyncio.gather(*senders)

    async def stall(self, ws) -> None:
        check = await self.start(ws, "s")
        first = self.rng.randrange(len(WORDS))
        await self.send(ws, {"type": "text", "ctx": "s", "text": " ".join((WORDS[first:] + WORDS)[:40])})
        await self.send(ws, {"type": "end", "ctx": "s"})
        while (msg := await self.recv(ws))["type"] != "audio":
            pass
        check.audio(msg)
        await asyncio.sleep(self.stall_s)          # reads nothing, answers no ping
        async with asyncio.timeout(30):            # what was sent before the close, then it
            while (frame := await ws.receive()).type in (aiohttp.WSMsgType.BINARY,
                                                         aiohttp.WSMsgType.PING):
                msg = msgpack.unpackb(frame.data) if frame.type is aiohttp.WSMsgType.BINARY else {}
                if msg.get("type") == "audio":
                    check.audio(msg)
        got = (frame.type.name, frame.data, frame.extra)
        if got != ("CLOSE", 1008, "slow consumer"):
            raise Violation(f"after {self.stall_s:g} s unread: {got}, not a slow-consumer close")

    async def round(self, scenario: str) -> None:
        # Each round has its own session, so `vanish` can drop its connection by closing it.
        session = new_session()
        try:
            # The stalled client answers nothing when it reads again: by then the server has
            # given up on the close handshake and dropped the connection, and a pong or close
            # reply to what was buffered would fail to send.
            stalled = {"autoping": False, "autoclose": False} if scenario == "stall" else {}
            ws = await self.connect(session, **stalled)
            if scenario == "vanish":   # closing the session below drops the TCP connection
                await self._midway(ws)
            elif scenario == "stall":  # the server has closed it (the session drops it)
                await self.stall(ws)
            else:
                await getattr(self, scenario)(ws)
                await ws.close()
        finally:
            await session.close()
        self.tally.rounds[scenario] += 1

    async def run(self, first: int, stop: asyncio.Event, rounds: int | None) -> None:
        k = first
        while not stop.is_set() and (rounds is None or k - first < rounds):
            scenario = self.scenarios[k % len(self.scenarios)]
            k += 1
            try:
                await asyncio.wait_for(self.round(scenario), MAX_ROUND_S)
            except Violation as exc:
                self.tally.violations.append(f"{scenario}: {exc}")
            except TimeoutError:
                self.tally.violations.append(f"{scenario}: no end after {MAX_ROUND_S:.0f} s")
            except (aiohttp.ClientError, ConnectionError) as exc:
                self.tally.violations.append(f"{scenario}: connection failed: {exc!r}")


# ---- the server's gauges

async def sample(session: aiohttp.ClientSession, base: str, pid: int | None) -> dict:
    async with session.get(base + "/metrics") as resp:
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    out: dict = {"t": time.monotonic()}
    for key, name in GAUGES.items():
        out[key] = float(values[name]) if name in values else None
    if out["rss_mb"] is not None:
        out["rss_mb"] = round(out["rss_mb"] / 2**20, 1)
    out["threads"] = _threads(pid) if pid else None
    return out


def _delta_ms(before: dict, after: dict, key: str) -> float | None:
    if before.get(key) is None or after.get(key) is None:
        return None
    return round((after[key] - before[key]) * 1000, 1)


def _threads(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / var * 3600


async def wait_idle(session, base: str, pid: int | None, timeout: float) -> dict:
    """The server's gauges once it has no socket and no stream left (or at `timeout`). A task
    count of 0 is a server that has not sampled its gauges yet (its sampler is a task)."""
    deadline = time.monotonic() + timeout
    while True:
        s = await sample(session, base, pid)
        idle = s["sockets"] == 0 and s["streams"] == 0 and s["tasks"] != 0
        if idle or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.5)


async def main_async(args) -> dict:
    base = http_base(args.url)
    tally, samples = Tally(), []
    async with aiohttp.ClientSession() as http:
        before = await wait_idle(http, base, args.pid, timeout=30)
        stop = asyncio.Event()
        rng = random.Random(args.seed)
        clients = [Client(args.url, tally, random.Random(rng.random()), args.stall_s,
                          args.scenarios)
                   for _ in range(args.clients)]
        step = max(1, len(args.scenarios) // max(1, args.clients))
        t0 = time.monotonic()
        tasks = [asyncio.create_task(c.run(i * step, stop, args.rounds))
                 for i, c in enumerate(clients)]
        end = t0 + args.minutes * 60
        while not all(t.done() for t in tasks):
            samples.append(await sample(http, base, args.pid))
            if args.verbose:
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)
            if args.rounds is None and time.monotonic() >= end:
                stop.set()
            await asyncio.wait(tasks, timeout=args.sample_s)
        wall = time.monotonic() - t0
        await wait_idle(http, base, args.pid, timeout=30)
        await asyncio.sleep(2.5)   # the server samples its task and socket gauges every second
        after = await sample(http, base, args.pid)
    settled = [s for s in samples if s["t"] - t0 >= args.settle_s and s["rss_mb"] is not None]
    rss = [(s["t"] - t0, s["rss_mb"]) for s in settled]
    slope = slope_per_hour(rss)
    tasks_seen = [s["tasks"] for s in samples if s["tasks"] is not None]
    return {
        "minutes": round(wall / 60, 2), "clients": args.clients, "rounds": dict(tally.rounds),
        "streams_done": tally.streams_done, "audio_s": round(tally.audio_s, 1),
        "refused": tally.refused, "violations": len(tally.violations),
        "cancel_ms_p50": percentile(tally.cancel_ms, 0.5),
        "cancel_ms_p95": percentile(tally.cancel_ms, 0.95),
        "cancel_ms_max": round(max(tally.cancel_ms), 1) if tally.cancel_ms else None,
        "barge_in_ms_p50": percentile(tally.barge_in_ms, 0.5),
        "barge_in_ms_p95": percentile(tally.barge_in_ms, 0.95),
        # The model's step time against what `done` and `cancelled` billed: equal, to their
        # rounding, when every stream ends in one of them (streams closed, dropped or stalled
        # are billed in the server's log only).
        "compute_ms_metrics": _delta_ms(before, after, "compute_s"),
        "compute_ms_billed": round(tally.billed_ms, 1),
        # ... and as the server counts it (`tts_ended_compute_seconds_total`): what it reported
        # in `done` and `cancelled`, and what went to its log only.
        "compute_ms_ended": {how: _delta_ms(before, after, f"ended_{how}_s")
                             for how in ("done", "cancelled", "log_only")},
        "violation_examples": tally.violations[:10],
        "rss_mb_settled": rss[0][1] if rss else None, "rss_mb_end": after["rss_mb"],
        "rss_mb_max": max((v for _, v in rss), default=None),
        "rss_mb_per_hour": None if slope is None else round(slope, 1),
        "tasks_p50_busy": percentile(tasks_seen, 0.5),
        "idle_before": {k: before[k] for k in IDLE_KEYS},
        "idle_after": {k: after[k] for k in IDLE_KEYS},
    }


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"scenarios are {', '.join(SCENARIOS)}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    ap.add_argument("--pid", type=int, help="the server's process id, for its thread count")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, help="each client plays this many rounds, then stops "
                    "(instead of --minutes)")
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--settle-s", type=float, default=120.0,
                    help="memory before this is warm-up (allocator, caches), not a trend")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stall-s", type=float, default=9.0,
                    help="how long the stall scenario reads nothing (above the server's "
                    "limits.max_send_lag_s, 5, plus its 1 s ping interval)")
    ap.add_argument("--scenarios", type=_scenarios, default=SCENARIOS,
                    help="comma-separated, played in turn (default: all of them)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="every sample on stderr")
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 1 if report["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
