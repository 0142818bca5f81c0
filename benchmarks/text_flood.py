"""Text-flood benchmark: how long the server's event loop stalls when a client sends a lot of
text at once, against a running server.

The phrase splitter and the scheduler's bookkeeping of each `text` frame run on the event loop
that every stream shares, so their cost per frame must not grow with the text already received.
Each scenario opens one stream, sends its frames, and reads the server's worst event-loop lag
(`tts_event_loop_lag_max_seconds`, the worst wake-up delay of each 1 s window) from /metrics
every 0.25 s until `--watch-s` seconds after the last frame went, then cancels the stream:

- `unbroken`: one frame of 100,000 characters without whitespace or punctuation (base64, a
  pasted URL);
- `cjk`: one frame of 100,000 CJK characters without punctuation;
- `prose`: one frame of 100,000 characters of ordinary sentences;
- `small-frames`: 40,000 characters of short sentences in 2-character frames (an LLM's answer
  flushed token by token, far faster than speech);
- `space-frames`: 100,000 frames of one space each (text the splitter cannot cut yet; the
  other runs that stay undecided, openers or dots after a sentence, need a listener with
  audio buffered to be reached live, and are measured by count in tests/test_splitter.py);
- `container-frames`: ten 1 MiB frames, each a `cancel` (for another ctx) carrying a million
  empty arrays in a field the server ignores, within the frame size limit. Decoded whole, one
  took the loop 0.5-1.3 s; the server now reads no further than that array's header, which
  claims more than the 64 entries a map or array may hold, and answers `bad_request` (it also
  refuses a frame of more than 16 maps and arrays in all before decoding the rest:
  `server/protocol.py`), so this checks that those limits hold.

    python benchmarks/text_flood.py --url ws://127.0.0.1:8000/v1/stream --json

Reports per scenario the worst loop lag seen (ms); the total of the loop's wake-up delays over
the scenario (`loop_lag_sum_s`, the rise of `tts_event_loop_lag_seconds_sum`: a flood can
stall the loop many times without one long stall); how long the stream's `cancel` took to be
answered once the frames were sent and watched (`cancel_s`: it waits behind the frames still
being handled); and before the first scenario the idle baseline over the same watch time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import sys
import time
from pathlib import Path

import aiohttp
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.texts import SENTENCES  # noqa: E402

_LAG_MAX = re.compile(r"^tts_event_loop_lag_max_seconds (\S+)$", re.M)
_LAG_SUM = re.compile(r"^tts_event_loop_lag_seconds_sum (\S+)$", re.M)


async def _metric(http: aiohttp.ClientSession, metrics_url: str, pattern: re.Pattern[str]) -> float:
    """One sample from the server's /metrics (NaN if absent)."""
    async with http.get(metrics_url) as resp:
        m = pattern.search(await resp.text())
    return float(m.group(1)) if m is not None else float("nan")


# A frame within the default 1 MiB limit: {"type": "cancel", "ctx": "other", "x": [[], [], ...]}.
_EMPTY_ARRAYS = (1 << 20) - 64
CONTAINER_FRAME = (b"\x83" + msgpack.packb("type") + msgpack.packb("cancel") + msgpack.packb("ctx")
                   + msgpack.packb("other") + msgpack.packb("x") + b"\xdd"
                   + _EMPTY_ARRAYS.to_bytes(4, "big") + b"\x90" * _EMPTY_ARRAYS)

Frame = str | bytes   # text for the stream, or a whole frame as sent


def _scenarios() -> dict[str, list[Frame]]:
    prose = " ".join(SENTENCES)
    prose = (prose + " ") * (100_000 // (len(prose) + 1) + 1)
    small = "Hi there. " * 4_000
    return {
        "unbroken": ["QUJDRA" * 16_666],
        "cjk": ["漢字" * 50_000],
        "prose": [prose[:100_000]],
        "small-frames": [small[i:i + 2] for i in range(0, len(small), 2)],
        "space-frames": [" "] * 100_000,
        "container-frames": [CONTAINER_FRAME] * 10,
    }


async def _worst_lag_ms(http: aiohttp.ClientSession, metrics_url: str, watch_s: float,
                        sent: asyncio.Event | None = None) -> float:
    """The worst lag read until `watch_s` after `sent` is set (after now, without one)."""
    worst, end = 0.0, None
    while end is None or time.monotonic() < end:
        lag = await _metric(http, metrics_url, _LAG_MAX)
        if not math.isnan(lag):
            worst = max(worst, lag * 1000)
        if end is None and (sent is None or sent.is_set()):
            end = time.monotonic() + watch_s
        await asyncio.sleep(0.25)
    return worst


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> str | None:
    """Read (and drop) what the server sends until the stream is over; its last type.
    Replies to other frames (`container-frames`: errors without a ctx, or for another) are
    skipped."""
    async for frame in ws:
        if frame.type is not aiohttp.WSMsgType.BINARY:
            return None
        msg = msgpack.unpackb(frame.data)
        if msg.get("ctx") != "default":   # another ctx, or a frame-level error (no ctx)
            continue
        if msg["type"] in ("cancelled", "done", "error"):
            return msg["type"]
    return None


async def _connect(http: aiohttp.ClientSession, url: str,
                   tries: int = 40) -> aiohttp.ClientWebSocketResponse:
    """Connect, waiting out refusals (a server still busy with the previous scenario's flood
    refuses with 503 and Retry-After)."""
    for _ in range(tries - 1):
        try:
            return await http.ws_connect(url)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status != 503:
                raise
            await asyncio.sleep(float((exc.headers or {}).get("Retry-After", 2)))
    return await http.ws_connect(url)


async def run_scenario(http: aiohttp.ClientSession, url: str, metrics_url: str,
                       frames: list[Frame], watch_s: float) -> dict:
    pack = msgpack.Packer(use_bin_type=True).pack
    lag_before = await _metric(http, metrics_url, _LAG_SUM)
    async with await _connect(http, url) as ws:
        await ws.send_bytes(pack({"type": "start"}))
        ready = msgpack.unpackb((await ws.receive()).data)
        if ready["type"] != "ready":
            raise RuntimeError(f"stream refused: {ready}")
        reader = asyncio.create_task(_drain(ws))
        sent = asyncio.Event()
        watcher = asyncio.create_task(_worst_lag_ms(http, metrics_url, watch_s, sent))
        t0 = time.monotonic()
        try:
            for k, frame in enumerate(frames):
                await ws.send_bytes(frame if isinstance(frame, bytes)
                                    else pack({"type": "text", "text": frame}))
                if k % 1000 == 999:
                    await asyncio.sleep(0)   # let the reader and the watcher run
        except aiohttp.ClientConnectionResetError:
            pass                             # the server closed the socket: reported below
        sent_s = time.monotonic() - t0
        sent.set()
        worst = await watcher
        t_cancel = time.monotonic()
        if not ws.closed:
            await ws.send_bytes(pack({"type": "cancel"}))
        last = await asyncio.wait_for(reader, 120)
        cancel_s = time.monotonic() - t_cancel
        if last is None:
            last = f"socket closed by the server ({ws.close_code})"
    lag_sum = await _metric(http, metrics_url, _LAG_SUM) - lag_before
    chars = sum(len(f) for f in frames if isinstance(f, str))
    return {"frames": len(frames), "chars": chars, "send_s": round(sent_s, 2),
            "loop_lag_max_ms": round(worst, 1), "loop_lag_sum_s": round(lag_sum, 2),
            "cancel_s": round(cancel_s, 2), "ended_with": last}


async def main_async(args: argparse.Namespace) -> dict:
    metrics_url = re.sub(r"^ws", "http", args.url).rsplit("/v1/", 1)[0] + "/metrics"
    report: dict = {}
    async with aiohttp.ClientSession() as http:
        report["idle_loop_lag_max_ms"] = round(await _worst_lag_ms(http, metrics_url, args.watch_s), 1)
        for name, frames in _scenarios().items():
            if args.only and name not in args.only:
                continue
            report[name] = await run_scenario(http, args.url, metrics_url, frames, args.watch_s)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    parser.add_argument("--watch-s", type=float, default=4.0)
    parser.add_argument("--only", nargs="*", help="scenarios to run (default: all)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")


if __name__ == "__main__":
    main()
