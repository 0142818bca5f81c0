"""Warm-up's cost probe, alone and with its audio encoded as the server encodes it.

Admission divides by the cost of one stream measured at warm-up until streams have finished
(`streaming_tts.scheduler.measure_stream_cost`). Live streams share the CPU with their Opus
encoders, so the server runs the probe with its audio encoded meanwhile (`server.model.
ProbeEncoding`, in an `EncoderPool` of `audio.encode_threads`). This loads the voice the way the
server does (in one model thread, warmed up) and runs the probe `--runs` times each way,
alternating, for `--rounds` rounds:

    python benchmarks/cost_probe.py --rounds 3 --runs 3 --json

Reports every probe's cost (compute seconds per audio second) by mode, and their medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.config import load_config  # noqa: E402
from server.encoders import EncoderPool  # noqa: E402
from server.model import ProbeEncoding, load_engine, prepare_model  # noqa: E402
from streaming_tts.scheduler import measure_stream_cost, new_model_thread  # noqa: E402
from streaming_tts.voices import VoiceRegistry  # noqa: E402


async def measure(args: argparse.Namespace) -> dict:
    cfg = load_config(Path(args.config) if args.config else None)
    voice = VoiceRegistry(cfg.engine.voices_dir).resolve(cfg.engine.voice)
    loop = asyncio.get_running_loop()
    model_thread = new_model_thread()
    pool = EncoderPool(cfg.audio.encode_workers)
    try:
        loaded = await loop.run_in_executor(
            model_thread, lambda: prepare_model(voice, cfg, loader=load_engine, warm_up=True))
        streams = cfg.admission.cost_probe_streams
        costs: dict[str, list[float]] = {"alone": [], "encoded": []}
        for _ in range(args.rounds):
            for mode in costs:
                for _ in range(args.runs):
                    probe = ProbeEncoding.for_config(cfg, voice, pool) if mode == "encoded" else None
                    cost = await loop.run_in_executor(model_thread, lambda: measure_stream_cost(
                        loaded.engine, loaded.phonemizer, streams,
                        on_audio=probe.on_audio if probe else None))
                    if probe is not None:
                        await probe.close()
                    costs[mode].append(round(cost, 4))
        return {"device": cfg.engine.device, "streams": streams, "warm_up_cost": loaded.stream_cost,
                "encode_threads": pool.workers, **costs,
                **{f"{mode}_median": statistics.median(v) for mode, v in costs.items()}}
    finally:
        pool.shutdown()
        model_thread.shutdown(wait=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="probes per mode per round")
    ap.add_argument("--config", help="server config file (default: configs/default.toml)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = asyncio.run(measure(args))
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
