"""Text-flood benchmark: how long the server's event loop stalls when a client sends a lot of
text at once, against a running server.

The phrase splitter and the scheduler's bookkeeping of each `text` frame run on the event loop
that every stream shares, so their cost per frame must not grow with the text already received.
Each scenario opens one stream, sends its text, then reads the server's worst event-loop lag
(`tts_event_loop_lag_max_seconds`, the worst wake-up delay of each 1 s window) from /metrics
every 0.25 s for `--watch-s` seconds, and cancels the stream:

- `unbroken`: one frame of 100,000 characters without whitespace or punctuation (base64, a
  pasted URL);
- `cjk`: one frame of 100,000 CJK characters without punctuation;
- `prose`: one frame of 100,000 characters of ordinary sentences;
- `small-frames`: 40,000 characters of short sentences in 2-character frames (an LLM's answer
  flushed token by token, far faster than speech).

    python benchmarks/text_flood.py --url ws://127.0.0.1:8000/v1/stream --json

Reports per scenario the worst loop lag seen (ms), and before the first scenario the idle
baseline over the same watch time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path

import aiohttp
import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.texts import SENTENCES  # noqa: E402

_LAG_MAX = re.compile(r"^tts_event_loop_lag_max_seconds (\S+)$", re.M)


def _scenarios() -> dict[str, list[str]]:
    prose = " ".join(SENTENCES)
    prose = (prose + " ") * (100_000 // (len(prose) + 1) + 1)
    small = "Hi there. " * 4_000
    return {
        "unbroken": ["QUJDRA" * 16_666],
        "cjk": ["漢字" * 50_000],
        "prose": [prose[:100_000]],
        "small-frames": [small[i:i + 2] for i in range(0, len(small), 2)],
    }


async def _worst_lag_ms(http: aiohttp.ClientSession, metrics_url: str, watch_s: float) -> float:
    worst = 0.0
    end = time.monotonic() + watch_s
    while time.monotonic() < end:
        async with http.get(metrics_url) as resp:
            m = _LAG_MAX.search(await resp.text())
        if m is not None:
            worst = max(worst, float(m.group(1)) * 1000)
        await asyncio.sleep(0.25)
    return worst


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> str | None:
    """Read (and drop) what the server sends until the stream is over; its last type."""
    async for frame in ws:
        if frame.type is not aiohttp.WSMsgType.BINARY:
            return None
        kind = msgpack.unpackb(frame.data)["type"]
        if kind in ("cancelled", "done", "error"):
            return kind
    return None


async def run_scenario(http: aiohttp.ClientSession, url: str, metrics_url: str,
                       frames: list[str], watch_s: float) -> dict:
    pack = msgpack.Packer(use_bin_type=True).pack
    async with http.ws_connect(url) as ws:
        await ws.send_bytes(pack({"type": "start"}))
        ready = msgpack.unpackb((await ws.receive()).data)
        if ready["type"] != "ready":
            raise RuntimeError(f"stream refused: {ready}")
        reader = asyncio.create_task(_drain(ws))
        watcher = asyncio.create_task(_worst_lag_ms(http, metrics_url, watch_s))
        t0 = time.monotonic()
        for text in frames:
            await ws.send_bytes(pack({"type": "text", "text": text}))
        sent_s = time.monotonic() - t0
        worst = await watcher
        await ws.send_bytes(pack({"type": "cancel"}))
        last = await asyncio.wait_for(reader, 30)
    return {"frames": len(frames), "chars": sum(map(len, frames)), "send_s": round(sent_s, 2),
            "loop_lag_max_ms": round(worst, 1), "ended_with": last}


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
