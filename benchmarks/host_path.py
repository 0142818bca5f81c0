"""Host-path benchmark: what the server's CPU spends per stream besides the model.

On a GPU the model is cheap per stream and the host's own work decides how many streams one
server process can feed: WebSocket frames, phrase splitting, phonemizing (espeak-ng),
scheduling, resampling and Opus encoding. This benchmark runs the real server with every part
real except the model calls: `ReplayEngine` answers them at once with speech the real voice made
at start-up (so the encoders see real speech), phrase lengths from a fixed frames-per-phoneme
rate. It then drives the server with `benchmarks/load.py` and reads each server thread's CPU
time from /proc before and after each run.

    python benchmarks/host_path.py --streams 12 50 100 --json
    python benchmarks/host_path.py --scheduler-only --streams 1000 --stagger-ms 10 --config configs/gpu.toml
    python benchmarks/host_path.py --encoders

Reports per run: the load figures (admitted, late messages, TTFA), the server's CPU time per
second of audio delivered by thread (event loop, model thread, text thread, audio encoders,
others), and how many real-time streams one core of each kind would carry at that rate.
`--scheduler-only` drives the scheduler in this process instead (no sockets, no encoding: the
event loop's share is the scheduler, the splitter and the feeding of words); `--encoders` times
one stream's resampling and Opus by output rate and complexity. Nothing here measures the
model's own speed: that is `benchmarks/engine.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from streaming_tts.engine import AcousticJob, AcousticResult, DecodeJob, Engine, SynthesisParams  # noqa: E402

# Frames of speech per phoneme id (ids alternate phonemes and pads): 2.2 on average, the default
# voice's rate (the load benchmark's paragraph: 218 s of audio for 12 streams, as the real voice).
FRAMES_PER_ID = (3, 2, 2, 2, 2)
RECORDING_TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs into the woods "
                  "to find a quiet place where nobody will ever bother it again.")


class ReplayEngine(Engine):
    """The real engine's shapes and chunk plan, with model calls answered instantly from a
    recording of real speech. For measuring the host path only: it is no speech synthesizer."""

    def __init__(self, real: Engine, recording: np.ndarray, latent_channels: int) -> None:
        self.__dict__.update(real.__dict__)
        self._recording = recording.astype(np.float32)
        self._latent_channels = latent_channels
        self._zeros = torch.zeros(latent_channels, 4096, dtype=self.dtype)   # latents are views of it

    def _acoustic(self, jobs, head_only):
        out = []
        for job in jobs:
            durations = np.resize(np.array(FRAMES_PER_ID, dtype=np.int64), len(job.ids))
            n = int(durations.sum())
            out.append(AcousticResult(z=self._latent(n), durations=durations, num_frames=n,
                                      speaker=job.params.speaker))
        return out

    def _latent(self, n: int) -> torch.Tensor:
        if n > self._zeros.shape[1]:
            return torch.zeros(self._latent_channels, n, dtype=self.dtype)
        return self._zeros[:, :n]   # no fill per call: that would wake torch's CPU thread pool

    def finish_flow(self, res: AcousticResult) -> AcousticResult:
        return res

    def _decode_group(self, jobs: list[DecodeJob], size: int) -> np.ndarray:
        n = size * self.hop_length
        return np.stack([np.take(self._recording, np.arange(n) + job.start * self.hop_length, mode="wrap")
                         for job in jobs])

    def decode_whole(self, z, speaker: int = 0) -> np.ndarray:
        return self._decode_group([DecodeJob(z=z, start=0, end=z.shape[1])], z.shape[1])[0]


# A GPU profile's engine settings, made to run here (configs/gpu.toml records CUDA graphs).
ON_CPU = {"engine.device": "cpu", "engine.dtype": "float32", "engine.cuda_graphs": False}


def replay_loader(voice, cfg):
    """The server's engine loader for the benchmark: load the real voice, record one passage of
    its speech, then serve the replay."""
    from server.model import load_engine
    from streaming_tts.text.phonemes import Phonemizer

    real = load_engine(voice, cfg)
    ids = Phonemizer(voice.config).phonemize(RECORDING_TEXT).ids
    latent = real.acoustic([AcousticJob(ids=ids, params=SynthesisParams(), seed=0)])[0].z
    return ReplayEngine(real, real.decode_whole(latent), latent.shape[0])


# -- the server process --------------------------------------------------------------------

def serve(args: argparse.Namespace) -> None:
    import uvloop
    from aiohttp import web

    from server.app import create_app
    from server.config import load_config

    port, profile = args.port, args.profile
    cfg = load_config(Path(args.config) if args.config else None, {
        "server.port": port, "admission.max_streams": args.max_streams, "admission.max_load": 1.0,
        "admission.max_loop_busy": args.max_loop_busy, "admission.max_encode_busy": args.max_encode_busy,
        "audio.encode_threads": args.encode_threads, "audio.opus_complexity": args.opus_complexity,
        "server.front_ends": 0 if args.front_end_of else args.front_ends})
    if cfg.server.front_ends:   # the back end; its front ends are this script again
        from server.supervisor import serve_split

        argv = [a for a in sys.argv[1:] if a != "--profile" and a != args.profile]
        with _profiled(profile):   # the back end's event loop
            code = serve_split(cfg, [], engine_loader=replay_loader,
                               front_end=[sys.executable, __file__, *argv])
        raise SystemExit(code)
    split = ({} if not args.front_end_of else
             {"front_end_of": args.front_end_of, "front_end_name": args.front_end_name})
    app = create_app(cfg, engine_loader=replay_loader, **split)

    async def threads(_request):
        return web.json_response({str(t.native_id): t.name for t in threading.enumerate()})

    app.router.add_get("/bench/threads", threads)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    with _profiled(profile):
        web.run_app(app, host="127.0.0.1", port=port, loop=loop, print=None,
                    reuse_port=True if args.front_end_of else None)


@contextlib.contextmanager
def _profiled(path: str | None) -> Iterator[None]:
    """cProfile this thread (the event loop's) into `path`, if given."""
    if path is None:
        yield
        return
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        prof.dump_stats(path)


# -- the driver ----------------------------------------------------------------------------

def _cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of `pid`, by thread id.

    Read from `schedstat` (nanoseconds on a CPU) where the kernel has it: `stat` counts in
    clock ticks (10 ms), too coarse for a short run, where a thread's few milliseconds read 0."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _group(tid: str, pid: int, names: dict[str, str]) -> str:
    if tid == str(pid):
        return "event_loop"
    name = names.get(tid, "")
    if name.startswith("tts-model"):
        return "model_thread"
    if name.startswith("tts-audio"):
        return "audio_encode"
    if name.startswith("tts-text"):
        return "text_thread"
    return "other"   # OpenMP workers, libuv, the loading thread


def _cpu_groups(before: dict[str, float], after: dict[str, float], pid: int,
                names: dict[str, str]) -> dict[str, float]:
    """CPU seconds each group of threads spent between two `_cpu_by_thread` readings."""
    groups: dict[str, float] = {}
    for tid, cpu in after.items():
        g = _group(tid, pid, names)
        groups[g] = groups.get(g, 0.0) + cpu - before.get(tid, 0.0)
    return groups


def _children(pid: int) -> list[int]:
    """The processes `pid` started (a split server's front ends)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _process_groups(before: dict[int, dict[str, float]], after: dict[int, dict[str, float]],
                    back_end: int) -> dict[str, float]:
    """A split server's CPU seconds: each process's event-loop thread and its other threads
    (its threads share one GIL; the front ends' thread names are not asked for)."""
    groups: dict[str, float] = {}
    for n, pid in enumerate(sorted(after, key=lambda p: (p != back_end, p))):
        name = "back_end" if pid == back_end else f"front_end_{n}"
        for tid, cpu in after[pid].items():
            g = f"{name}_{'event_loop' if tid == str(pid) else 'threads'}"
            groups[g] = groups.get(g, 0.0) + cpu - before[pid].get(tid, 0.0)
    return groups


def _per_audio_second(groups: dict[str, float], audio_s: float) -> dict:
    per = {g: round(1000 * s / audio_s, 2) for g, s in sorted(groups.items())}
    return {"cpu_ms_per_audio_s": per, "cpu_ms_per_audio_s_total": round(sum(per.values()), 2),
            "streams_per_core": {g: round(1000 / v) if v > 0 else None for g, v in per.items()}}


def run_scheduler_only(args) -> list[dict]:
    """The scheduler alone, in this process: no sockets, no encoding. Streams feed it words at
    --wps and drop their audio; what is measured is the event loop's thread (scheduler, splitter
    and the feeding) and the model thread (phonemizing, batching; the model itself replays)."""
    import functools

    from server.config import load_config
    from server.model import LoadedModel, build_scheduler
    from streaming_tts.scheduler import new_model_thread
    from streaming_tts.stream import StreamOptions
    from streaming_tts.voices import VoiceRegistry
    from benchmarks.texts import PARAGRAPH

    # The replay runs on the CPU whatever the profile says (its model calls do no arithmetic).
    cfg = load_config(Path(args.config) if args.config else None, ON_CPU)
    voice = VoiceRegistry(cfg.engine.voices_dir).resolve(cfg.engine.voice)
    words = PARAGRAPH.split()[:args.words]

    class Listener:   # a stream's sink: keeps when its first audio came and its usage
        def __init__(self) -> None:
            self.done, self.first, self.audio_ms = asyncio.Event(), None, 0.0

        def on_audio(self, samples, pts_ms) -> None:
            self.first = self.first or time.monotonic()

        def on_done(self, usage) -> None:
            self.audio_ms = usage["audio_ms"]
            self.done.set()

        def on_phrase(self, phrase) -> None:
            pass

        def on_cancelled(self, usage: dict | None) -> None:
            self.done.set()

        def on_error(self, code, message) -> None:
            raise RuntimeError(f"{code}: {message}")

    class Observer:
        late = underruns = 0

        def on_step(self, *_): pass
        def on_late(self, _sid): Observer.late += 1
        def on_underrun(self, _sid): Observer.underruns += 1
        def on_overhead(self, *_): pass
        def on_stream_ended(self, *_): pass

    async def one_run(n: int) -> dict:
        pool = new_model_thread()   # the scheduler owns it and shuts it down when it stops
        loop = asyncio.get_running_loop()
        engine, phonemizer = await loop.run_in_executor(
            pool, functools.partial(_replay_and_phonemizer, voice, cfg))
        sched = build_scheduler(LoadedModel(engine, phonemizer, None), cfg, observer=Observer(),
                                power_reader=lambda: None, model_thread=pool)
        task = asyncio.create_task(sched.run())

        async def stream(i: int) -> tuple[float, float]:
            await asyncio.sleep(i * args.stagger_ms / 1000)
            t0, sid, listener = time.monotonic(), f"s{i}", Listener()
            sched.open(sid, StreamOptions(params=SynthesisParams()), listener)
            for k, word in enumerate(words):
                sched.text(sid, word + " ")
                await asyncio.sleep(max(0.0, t0 + (k + 1) / args.wps - time.monotonic()))
            sched.end(sid)
            await listener.done.wait()
            return 1000 * (listener.first - t0), listener.audio_ms

        Observer.late = Observer.underruns = 0
        before = _cpu_by_thread(os.getpid())
        out = await asyncio.gather(*[stream(i) for i in range(n)])
        after = _cpu_by_thread(os.getpid())
        # Named before the scheduler stops: its threads end with it.
        names = {str(t.native_id): t.name for t in threading.enumerate()}
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        groups = _cpu_groups(before, after, os.getpid(), names)
        ttfa = sorted(t for t, _ in out)
        audio_s = sum(a for _, a in out) / 1000
        return {"streams": n, "late_steps": Observer.late, "underruns": Observer.underruns,
                "ttfa_ms_p50": round(ttfa[len(ttfa) // 2]),
                "ttfa_ms_p95": round(ttfa[int(round(0.95 * (len(ttfa) - 1)))]), "ttfa_ms_max": round(ttfa[-1]),
                "audio_s": round(audio_s, 1), "steps": sched.steps, **_per_audio_second(groups, audio_s)}

    async def main() -> list[dict]:
        results = []
        for n in args.streams:
            results.append(await one_run(n))
            print(json.dumps(results[-1]) if args.json else json.dumps(results[-1], indent=2), flush=True)
        return results

    prof = cProfile.Profile() if args.profile else None   # the event loop's thread only
    if prof is not None:
        prof.enable()
    try:
        return asyncio.run(main())
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.profile)


def run_encoder_cost(args) -> list[dict]:
    """CPU time of one stream's resampling and Opus encoding, per second of the voice's speech,
    by output rate and Opus complexity (best of 5, fed in 128-frame chunks as the server does)."""
    from server.config import load_config
    from streaming_tts.audio.encode import OpusStreamEncoder
    from streaming_tts.audio.resample import StreamResampler
    from streaming_tts.voices import VoiceRegistry

    cfg = load_config(Path(args.config) if args.config else None, ON_CPU)
    voice = VoiceRegistry(cfg.engine.voices_dir).resolve(cfg.engine.voice)
    engine = replay_loader(voice, cfg)
    speech = engine._recording
    seconds = len(speech) / voice.sample_rate
    chunks = np.array_split(speech, max(1, len(speech) // (128 * engine.hop_length)))

    def cost(make) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time()
            make()
            best = min(best, time.thread_time() - t0)
        return round(1000 * best / seconds, 2)

    def opus(rate: int, complexity: int) -> None:
        enc = OpusStreamEncoder(in_rate=voice.sample_rate, out_rate=rate, complexity=complexity)
        for c in chunks:
            enc.encode(c)
        enc.finish()

    results = []
    for rate in (48000, 24000, 16000):
        row = {"out_rate": rate, "resample_ms_per_audio_s": cost(
            lambda: [StreamResampler(voice.sample_rate, rate).process(c) for c in chunks])}
        for complexity in (0, 2, 5, 8, 10):
            row[f"opus_c{complexity}_ms_per_audio_s"] = cost(lambda: opus(rate, complexity))
        results.append(row)
        print(json.dumps(row) if args.json else json.dumps(row, indent=2), flush=True)
    # Threads: libopus and soxr release the GIL, so streams encode in parallel.
    import concurrent.futures
    cores = len(os.sched_getaffinity(0))
    row = {"cores": cores}
    for threads in sorted({1, cores}):
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: opus(48000, 5), range(threads)))          # start the threads
            t0 = time.perf_counter()
            list(pool.map(lambda _: opus(48000, 5), range(4 * cores)))
            row[f"audio_s_per_s_{threads}_threads"] = round(4 * cores * seconds / (time.perf_counter() - t0))
    results.append(row)
    print(json.dumps(row) if args.json else json.dumps(row, indent=2), flush=True)
    return results


def _replay_and_phonemizer(voice, cfg):
    from streaming_tts.text.phonemes import Phonemizer
    return replay_loader(voice, cfg), Phonemizer(voice.config)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read()


def _refused_by_reason(base: str) -> dict[str, int]:
    """tts_streams_refused_total by reason, from the server's /metrics."""
    return refused_counts(_get(base + "/metrics").decode())


def refused_counts(exposition: str) -> dict[str, int]:
    """tts_streams_refused_total by reason, from a /metrics text."""
    counts = {}
    for line in exposition.splitlines():
        if line.startswith("tts_streams_refused_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('reason="')[1].split('"')[0]] = int(float(value))
    return counts


def run(args) -> list[dict]:
    base = f"http://127.0.0.1:{args.port}"
    # Room for every stream of the largest run: through N front ends, starts that fall unevenly
    # within one status are admitted a share (1/N) of the room at a time (server/split.py).
    max_streams = max(args.streams) * max(1, args.front_ends)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--port", str(args.port),
         "--max-streams", str(max_streams), "--encode-threads", str(args.encode_threads),
         "--front-ends", str(args.front_ends)]
        + (["--config", args.config] if args.config else [])
        + (["--profile", args.profile] if args.profile else [])
        + ["--max-loop-busy", str(args.max_loop_busy), "--max-encode-busy", str(args.max_encode_busy)]
        + ([] if args.opus_complexity is None else ["--opus-complexity", str(args.opus_complexity)]),
        stdout=subprocess.DEVNULL, stderr=open(args.server_log, "w"))
    try:
        for _ in range(240):
            try:
                if _get(base + "/healthz"):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise SystemExit(f"server did not turn healthy; see {args.server_log}")
        results = []
        for n in args.streams:
            refused_before = _refused_by_reason(base)
            procs = [server.pid, *_children(server.pid)]
            before = {pid: _cpu_by_thread(pid) for pid in procs}
            t0 = time.monotonic()
            load = subprocess.run(
                [sys.executable, str(ROOT / "benchmarks" / "load.py"),
                 "--url", f"ws://127.0.0.1:{args.port}/v1/stream",
                 "--json", "--streams", str(n), "--wps", str(args.wps), "--words", str(args.words),
                 "--stagger-ms", str(args.stagger_ms), "--format", args.format],
                capture_output=True, text=True, check=True)
            wall = time.monotonic() - t0
            after = {pid: _cpu_by_thread(pid) for pid in procs}
            names = json.loads(_get(base + "/bench/threads")) if not args.front_ends else {}
            report = json.loads(load.stdout.strip().splitlines()[-1])
            if args.verbose:
                for tid, cpu in sorted(after[server.pid].items()):
                    print(tid, names.get(tid), round(cpu - before[server.pid].get(tid, 0.0), 2),
                          file=sys.stderr)
            if args.front_ends:
                groups = _process_groups(before, after, server.pid)
            else:
                groups = _cpu_groups(before[server.pid], after[server.pid], server.pid, names)
            results.append({
                "streams": n, "admitted": report["admitted"], "refused": report["refused"],
                "refused_by": {k: v - refused_before.get(k, 0)
                               for k, v in _refused_by_reason(base).items() if v > refused_before.get(k, 0)},
                "late_messages": report["late_messages"], "timeline_gaps": report["timeline_gaps"],
                "ttfa_ms_p50": report["ttfa_ms_p50"], "ttfa_ms_p95": report["ttfa_ms_p95"],
                "live_max": report["live_max"], "audio_s": report["audio_s"], "wall_s": round(wall, 1),
                "loop_lag_p99_ms": report["loop_lag_p99_ms"],
                **_per_audio_second(groups, report["audio_s"] or float("nan")),
            })
            print(json.dumps(results[-1]) if args.json else json.dumps(results[-1], indent=2), flush=True)
            time.sleep(2)
        return results
    finally:
        server.send_signal(signal.SIGINT)   # a clean stop, so a --profile gets written
        server.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--wps", type=float, default=15.0)
    ap.add_argument("--words", type=int, default=60)
    ap.add_argument("--stagger-ms", type=float, default=20.0)
    ap.add_argument("--port", type=int, default=8140)
    ap.add_argument("--encode-threads", type=int, default=2)
    ap.add_argument("--max-loop-busy", type=float, default=1.0,
                    help="the server's admission.max_loop_busy (default 1.0: never refuse for it)")
    ap.add_argument("--max-encode-busy", type=float, default=1.0,
                    help="the server's admission.max_encode_busy (default 1.0: never refuse for it)")
    ap.add_argument("--opus-complexity", type=int, help="the server's audio.opus_complexity")
    ap.add_argument("--config", help="server config file (default: configs/default.toml)")
    ap.add_argument("--server-log", default="/tmp/host_path_server.log")
    ap.add_argument("--max-streams", type=int, default=1000, help=argparse.SUPPRESS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--format", default="opus", choices=["opus", "pcm_s16le"],
                    help="what the streams ask for (pcm_s16le: resampling without Opus)")
    ap.add_argument("--front-ends", type=int, default=0,
                    help="serve from N front-end processes around a back end (server/split.py)")
    ap.add_argument("--front-end-of", help=argparse.SUPPRESS)
    ap.add_argument("--front-end-name", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="CPU seconds of every server thread")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the event loop's thread into FILE")
    ap.add_argument("--scheduler-only", action="store_true",
                    help="drive the scheduler in this process: no server, sockets or encoding")
    ap.add_argument("--encoders", action="store_true",
                    help="CPU per audio second of resampling and Opus, by rate and complexity")
    args = ap.parse_args()
    if args.serve:
        serve(args)
        return 0
    if args.encoders:
        run_encoder_cost(args)
    elif args.scheduler_only:
        run_scheduler_only(args)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
