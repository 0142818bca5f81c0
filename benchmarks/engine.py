"""Engine benchmark: our PyTorch VITS against onnxruntime, in one run, same ids and threads.

Prints one JSON line with --json. Figures:
- rtf_torch_cpu / rtf_onnxruntime_cpu: compute seconds per second of audio, whole phrases,
  batch 1, the two runtimes interleaved repetition by repetition (median of repetitions).
- chunked_overhead: streaming decode (the server's chunk schedule, batch 1) over whole-phrase
  decode, - 1: for a listener's first phrase (smallest chunks first) and, as
  chunked_overhead_buffered, for a phrase whose listener has audio buffered.
- batched: audio seconds made per wall second at batch 1/4/8/16 (acoustic + chunked decode).
- first_audio_batch_ms: the floor under first audio for N streams starting together, N = 1/4/12:
  model time to make N first phrases (the load benchmark's first three words) and decode their
  first chunks, all in one batch (best of --reps), with the flow over the whole phrase or only
  its head (see the engine), and first chunks of the schedule's first and second sizes.
- on CUDA (--device cuda): throughput at batch 1..256 in fp32, fp16, and fp16 with CUDA graphs;
  one decode step's time at batch 1..64, fp16 eager against CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.texts import PARAGRAPH, SENTENCES  # noqa: E402
from server.config import EngineConfig as ServedEngineConfig  # noqa: E402
from streaming_tts.engine import (AcousticJob, DecodeJob, Engine, EngineConfig, SynthesisParams,  # noqa: E402
                                  cpu_has_native_bf16)
from streaming_tts.text.phonemes import Phonemizer  # noqa: E402
from streaming_tts.voices import VoiceRegistry  # noqa: E402


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_whole(engine: Engine, ort_session, id_lists, params, reps: int) -> dict:
    """Median RTF of each runtime over `reps` interleaved passes over all sentences."""
    scales = np.array([params.noise_scale, params.length_scale, params.noise_w], dtype=np.float32)
    ort_rtf, torch_rtf = [], []
    for _ in range(reps):
        if ort_session is not None:
            t, n = 0.0, 0
            for ids in id_lists:
                feed = {"input": np.array([ids], dtype=np.int64),
                        "input_lengths": np.array([len(ids)], dtype=np.int64), "scales": scales}
                t0 = time.perf_counter()
                n += ort_session.run(None, feed)[0].size
                t += time.perf_counter() - t0
            ort_rtf.append(t / (n / engine.sample_rate))
        t, n = 0.0, 0
        for ids in id_lists:
            t0 = time.perf_counter()
            n += engine.synthesize(ids, params, seed=1).size
            t += time.perf_counter() - t0
        torch_rtf.append(t / (n / engine.sample_rate))
    return {"rtf_torch_cpu": statistics.median(torch_rtf),
            "rtf_onnxruntime_cpu": statistics.median(ort_rtf) if ort_rtf else None}


def bench_chunked(engine: Engine, id_lists, params, reps: int) -> dict:
    """Streaming decode time over whole-phrase decode, minus 1 (median over repetitions).

    `chunked_overhead`: the plan of a listener's first phrase (the schedule from its smallest
    chunk); `chunked_overhead_buffered`: the plan of a phrase whose listener already has audio
    buffered (it starts at the largest scheduled chunk)."""
    results = engine.acoustic([AcousticJob(ids, params, seed=1) for ids in id_lists])
    last = len(engine.config.chunk_schedule) - 1
    ratios: dict[str, list[float]] = {"chunked_overhead": [], "chunked_overhead_buffered": []}
    plans = {"chunked_overhead": 0, "chunked_overhead_buffered": last}
    for _ in range(reps):
        # Interleaved phrase by phrase, so a slow second of a shared machine hits both sides.
        whole, chunked = 0.0, dict.fromkeys(plans, 0.0)
        for r in results:
            whole += _timed(lambda: engine.decode_whole(r.z))
            for key, first in plans.items():
                chunked[key] += sum(_timed(lambda: engine.decode([DecodeJob(r.z, a, b)]))
                                    for a, b in engine.chunk_plan(r.num_frames, first))
        for key in plans:
            ratios[key].append(chunked[key] / whole - 1.0)
    return {k: statistics.median(v) for k, v in ratios.items()}


def bench_batched(engine: Engine, id_lists, params, batch: int) -> float:
    """Audio seconds per wall second for `batch` phrases made together, chunk by chunk."""
    ids = [id_lists[i % len(id_lists)] for i in range(batch)]
    t0 = time.perf_counter()
    results = engine.acoustic([AcousticJob(x, params, seed=i) for i, x in enumerate(ids)])
    plans = [engine.chunk_plan(r.num_frames) for r in results]
    for step in range(max(len(p) for p in plans)):
        jobs = [DecodeJob(r.z, *p[step]) for r, p in zip(results, plans) if step < len(p)]
        engine.decode(jobs)
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    wall = time.perf_counter() - t0
    audio_s = sum(r.num_frames for r in results) * engine.hop_length / engine.sample_rate
    return audio_s / wall


def bench_first_audio(engine: Engine, ids, params, batch: int, reps: int) -> dict:
    """Milliseconds of model time until `batch` first phrases all have their first chunk."""
    out = {}
    for head_only in (False, True):
        for first in (0, 1):
            if head_only and first:
                continue          # head-only flow covers the first scheduled chunk only
            def run():
                res = engine.acoustic([AcousticJob(ids, params, seed=i, head_only=head_only)
                                       for i in range(batch)])
                engine.decode([DecodeJob(r.z, *engine.chunk_plan(r.num_frames, first)[0],
                                         phrase_frames=r.num_frames) for r in res])
            run()
            size = engine.config.chunk_schedule[first]
            key = f"{'head_only' if head_only else 'whole_flow'}_first_{size}"
            out[key] = round(1000 * min(_timed(run) for _ in range(reps)), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--voice", default=None, help="voice id or .onnx path (default voice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="CPU decoder precision (bfloat16: for CPUs with native bf16)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,4,8,16")
    ap.add_argument("--no-ort", action="store_true", help="skip onnxruntime")
    ap.add_argument("--cuda-only", action="store_true",
                    help="with --device cuda: only the CUDA figures (no CPU engine)")
    ap.add_argument("--first-audio-batches", default="1,4,12")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    voice = VoiceRegistry().resolve(args.voice) if args.voice else VoiceRegistry().default()
    phonemizer = Phonemizer(voice.config)
    id_lists = [phonemizer.phonemize(s).ids for s in SENTENCES]
    params = SynthesisParams(noise_scale=voice.config.noise_scale, length_scale=voice.config.length_scale,
                             noise_w=voice.config.noise_w)
    out: dict = {"machine": platform.node(), "cpu_threads": args.threads, "voice": voice.id,
                 "device": args.device, "sentences": len(SENTENCES), "torch": torch.__version__}
    if args.cuda_only:
        if not args.device.startswith("cuda"):
            ap.error("--cuda-only needs --device cuda")
        out.update(bench_cuda(voice, id_lists, params))
        print(json.dumps(out) if args.json else json.dumps(out, indent=2))
        return 0
    # The server's CPU defaults (configs/default.toml): chunk schedule and padding step.
    served = ServedEngineConfig()
    cpu = Engine.from_file(voice.onnx_path, sample_rate=voice.sample_rate,
                           config=EngineConfig(device="cpu", threads=args.threads, dtype=args.dtype,
                                               chunk_schedule=served.chunk_schedule,
                                               bucket_step=served.bucket_step))
    out["cpu_dtype"] = args.dtype
    if args.dtype != "float32":
        out["cpu_native_bf16"] = cpu_has_native_bf16()
        out["snr_vs_float32_db"] = snr_vs_float32(voice, cpu, id_lists)
    cpu.warmup()
    ort_session = None
    if not args.no_ort:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        ort_session = ort.InferenceSession(str(voice.onnx_path), so, providers=["CPUExecutionProvider"])
        out["onnxruntime"] = ort.__version__
    out.update(bench_whole(cpu, ort_session, id_lists, params, args.reps))
    if out.get("rtf_onnxruntime_cpu"):
        out["torch_over_onnxruntime"] = out["rtf_torch_cpu"] / out["rtf_onnxruntime_cpu"]
    out["chunk_schedule"] = list(cpu.config.chunk_schedule)
    out.update(bench_chunked(cpu, id_lists, params, args.reps))
    out["batched_audio_s_per_s_cpu"] = {b: bench_batched(cpu, id_lists, params, int(b))
                                        for b in args.batches.split(",")}
    first_ids = phonemizer.phonemize(" ".join(PARAGRAPH.split()[:3])).ids
    out["first_audio_batch_ms"] = {b: bench_first_audio(cpu, first_ids, params, int(b), args.reps)
                                   for b in args.first_audio_batches.split(",")}
    if args.device.startswith("cuda"):
        out.update(bench_cuda(voice, id_lists, params))
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


def snr_vs_float32(voice, engine: Engine, id_lists) -> float:
    """SNR (dB) of this engine's audio against a float32 engine's, noise off, all sentences."""
    ref_engine = Engine.from_file(voice.onnx_path, sample_rate=voice.sample_rate)
    silent = SynthesisParams(noise_scale=0.0, noise_w=0.0)
    ref = np.concatenate([ref_engine.synthesize(ids, silent) for ids in id_lists])
    out = np.concatenate([engine.synthesize(ids, silent) for ids in id_lists])
    return float(10 * np.log10(np.sum(ref ** 2) / np.sum((ref - out) ** 2)))


def bench_cuda(voice, id_lists, params) -> dict:
    """Throughput by batch size in float32 and float16, and float16 with the decoder replayed
    as CUDA graphs (the GPU profile); the time of one decode step, eager against graphs."""
    res = {}
    variants = {"float32": ("float32", False), "float16": ("float16", False),
                "float16_graphs": ("float16", True)}
    for name, (dtype, graphs) in variants.items():
        eng = Engine.from_file(voice.onnx_path, sample_rate=voice.sample_rate,
                               config=EngineConfig(device="cuda", dtype=dtype, chunk_schedule=(16, 64, 128),
                                                   cuda_graphs=graphs))
        t0 = time.perf_counter()
        eng.warmup(max_batch=64)
        res[f"warmup_s_cuda_{name}"] = round(time.perf_counter() - t0, 2)
        res[f"batched_audio_s_per_s_cuda_{name}"] = {
            b: round(bench_batched(eng, id_lists, params, b), 2) for b in (1, 8, 32, 64, 128, 256)}
        if dtype == "float16":
            res[f"decode_step_ms_cuda_{name}"] = bench_decode_steps(eng, (1, 8, 32, 64))
            if eng.graphs is not None:
                res["cuda_graphs_recorded"] = len(eng.graphs)
    return res


def bench_decode_steps(engine: Engine, batches, reps: int = 30) -> dict:
    """Median ms of one decode step of B chunks of the schedule's first and last sizes (the
    call the scheduler makes each step), host to host."""
    z = engine.acoustic([AcousticJob([1, 0] + [20, 0, 35, 0] * 40 + [2], SynthesisParams(), seed=0)])[0].z
    z = z[:, :1].expand(-1, max(engine.config.chunk_schedule)).contiguous()
    out = {}
    for size in (engine.config.chunk_schedule[0], engine.config.chunk_schedule[-1]):
        for b in batches:
            jobs = [DecodeJob(z, 0, size)] * b
            engine.decode(jobs)
            out[f"{size}x{b}"] = round(1000 * statistics.median(
                _timed(lambda: engine.decode(jobs)) for _ in range(reps)), 3)
    return out


if __name__ == "__main__":
    sys.exit(main())
