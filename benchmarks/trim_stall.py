"""Heap-trim stall benchmark: does the model thread's `malloc_trim` stall the event loop?

`scheduler.heap_trim_interval_s` has the model thread give the C heap's free pages back to the
system. glibc holds each arena's lock while it trims it, so a thread that frees or allocates
in that arena meanwhile waits. This runs the real server in this process with trims every
`--interval-s`, feeds `--streams` streams at 15 words/s for `--rounds` rounds, and times the
event loop with a 2 ms sleeper: its late wake-ups that overlap a trim against all the others.

    python benchmarks/trim_stall.py --interval-s 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import msgpack
from aiohttp.test_utils import TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import streaming_tts.heap as heap  # noqa: E402
from benchmarks.texts import SENTENCES  # noqa: E402
from server.app import create_app  # noqa: E402
from server.config import load_config  # noqa: E402
from server.state import STATE  # noqa: E402

_TICK_S = 0.002


async def _stream(url: str, words: list[str]) -> None:
    pack = msgpack.Packer(use_bin_type=True).pack
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_bytes(pack({"type": "start"}))

        async def read() -> None:
            async for frame in ws:
                if frame.type is not aiohttp.WSMsgType.BINARY:
                    return
                if msgpack.unpackb(frame.data)["type"] in ("done", "error"):
                    return

        reader = asyncio.create_task(read())
        for word in words:
            await ws.send_bytes(pack({"type": "text", "text": word + " "}))
            await asyncio.sleep(1 / 15)
        await ws.send_bytes(pack({"type": "end"}))
        await reader


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else 0.0


async def run(args: argparse.Namespace) -> dict:
    trims: list[tuple[float, float]] = []
    real = heap.release_free_heap

    def timed() -> bool:
        start = time.monotonic()
        try:
            return real()
        finally:
            trims.append((start, time.monotonic()))

    heap.release_free_heap = timed
    app = create_app(load_config(None, {"scheduler.heap_trim_interval_s": args.interval_s}))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    while not app[STATE].model.ready:
        await asyncio.sleep(0.1)
    wakeups: list[tuple[float, float]] = []   # (slept at, how late)
    running = True

    async def sleeper() -> None:
        while running:
            start = time.monotonic()
            await asyncio.sleep(_TICK_S)
            wakeups.append((start, time.monotonic() - start - _TICK_S))

    ticker = asyncio.create_task(sleeper())
    began = time.monotonic()
    words = " ".join(SENTENCES).split()[: args.words]
    url = str(server.make_url("/v1/stream"))
    for _ in range(args.rounds):
        await asyncio.gather(*(_stream(url, words) for _ in range(args.streams)))
    running = False
    await ticker
    await server.close()
    heap.release_free_heap = real
    ran = [(a, b) for a, b in trims if a >= began]
    overlapping, other = [], []
    for at, late in wakeups:
        hit = any(a <= at + _TICK_S + late and at <= b for a, b in ran)
        (overlapping if hit else other).append(late * 1000)
    durations = [(b - a) * 1000 for a, b in ran]
    return {
        "interval_s": args.interval_s, "trims": len(ran),
        "trim_ms_median": round(statistics.median(durations), 1) if durations else None,
        "trim_ms_max": round(max(durations), 1) if durations else None,
        "lag_during_trims_ms": {"n": len(overlapping), "p90": round(_pct(overlapping, 0.9), 1),
                                "worst": [round(x, 1) for x in sorted(overlapping)[-5:]]},
        "lag_elsewhere_ms": {"n": len(other), "p99": round(_pct(other, 0.99), 1),
                             "p999": round(_pct(other, 0.999), 1),
                             "worst": [round(x, 1) for x in sorted(other)[-5:]]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-s", type=float, default=3.0)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--words", type=int, default=84)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(report) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))


if __name__ == "__main__":
    main()
