"""Loading the served voice: engine, warm-up, per-stream VRAM and compute cost, and the scheduler
over it.

`prepare_model` blocks for seconds (weights, espeak, warm-up) and runs in the model thread (the
same thread the scheduler later runs every model call in; see `new_model_thread`) so the event
loop keeps answering /healthz meanwhile. `build_scheduler` runs on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import torch

from server.config import ServerConfig
from server.encoders import EncoderPool
from server.observer import MetricsObserver
from server.protocol import StartMsg
from streaming_tts import engine as tts_engine
from streaming_tts import heap
from streaming_tts.audio import StreamEncoder, make_encoder
from streaming_tts.engine import AcousticJob, DecodeJob, Engine, SynthesisParams
from streaming_tts.metering import Meter, Tariff
from streaming_tts.scheduler import (
    ProbeStopped, Scheduler, SchedulerConfig, SchedulerObserver, measure_stream_cost,
    new_model_thread,
)
from streaming_tts.text.phonemes import Phonemizer
from streaming_tts.text.splitter import (PhraseSplitter, SplitterConfig, function_words_for,
                                         read_on_word_for)
from streaming_tts.voices import VoiceInfo

if TYPE_CHECKING:
    from server.state import ModelSlot, ServerState

log = logging.getLogger(__name__)

# Builds the engine for a voice (blocking); tests inject small, slow or failing ones.
EngineLoader = Callable[[VoiceInfo, ServerConfig], Engine]

# Warm-up measures a stream's cost this many times and keeps the median: on a shared host one
# probe (~1 s on 2 cores) read 0.065-0.082 s per audio s in four starts within minutes.
COST_PROBE_RUNS: Final = 3

# Phoneme ids of a long phrase (~ the splitter's longest) for the VRAM measurement: pad, BOS,
# then alternating phoneme / pad ids, EOS. The ids exist in every Piper phoneme map.
_PROBE_IDS = [1, 0] + [20, 0, 35, 0, 50, 0, 62, 0] * 50 + [2]


@dataclass
class LoadedModel:
    engine: Engine
    phonemizer: Phonemizer
    stream_vram_bytes: int | None  # measured on CUDA only
    stream_cost: float | None = None  # compute s per audio s of one stream, measured at warm-up
    warmup_s: float = 0.0             # model-thread time warming up every kernel shape
    probe_s: float = 0.0              # ... and measuring a stream's cost (the probes)


def load_engine(voice: VoiceInfo, cfg: ServerConfig) -> Engine:
    """The default loader: the voice's Piper `.onnx` into our PyTorch VITS."""
    e = cfg.engine
    config = tts_engine.EngineConfig(
        device=e.device, dtype=e.dtype, chunk_schedule=e.chunk_schedule,
        bucket_step=e.bucket_step,
        threads=e.threads or None,  # 0 in the config means torch's default
        cuda_graphs=e.cuda_graphs,
    )
    return Engine.from_file(voice.onnx_path, sample_rate=voice.sample_rate, config=config)


class LoadStopped(Exception):
    """The server is stopping: loading or warming up ended early (nothing to report)."""


def prepare_model(
    voice: VoiceInfo, cfg: ServerConfig, *, loader: EngineLoader, warm_up: bool = True,
    on_audio: Callable[[int, np.ndarray], None] | None = None,
    stop: threading.Event | None = None,
) -> LoadedModel:
    """Load, warm up and measure (blocking: call in a worker thread). `on_audio` gets the
    cost probe's audio (see `measure_stream_cost` and `ProbeEncoding`). Once `stop` is set
    (the server is shutting down) it raises LoadStopped at the next stage (within the cost
    probe, at its next model call), so a shutdown during warm-up does not wait seconds for
    it: the process exits only once this thread has."""
    stop = stop or threading.Event()

    def check() -> None:
        if stop.is_set():
            raise LoadStopped

    t0 = time.perf_counter()
    engine = loader(voice, cfg)
    check()
    phonemizer = Phonemizer(voice.config)
    phonemizer.phonemize("Warm up.")  # the first call starts espeak-ng
    loaded_s = time.perf_counter() - t0
    # Every (chunk size, batch size) the scheduler can ask for, so no stream pays kernel setup.
    # On CPU a step's budget (target_step_ms of compute) holds only a few big chunks.
    max_frames = None if engine.device.type == "cuda" else 2 * max(engine.buckets)
    warm_s = (engine.warmup(max_batch=cfg.engine.max_batch, max_frames=max_frames,
                            stop=stop.is_set)
              if warm_up else 0.0)
    check()
    vram = None
    if engine.device.type == "cuda":
        t_vram = time.perf_counter()
        vram = measure_stream_vram(engine, batch=cfg.engine.max_batch)
        warm_s += time.perf_counter() - t_vram
    # Admission's capacity estimate until real streams have finished.
    cost, probes = None, []
    probe_t0 = time.perf_counter()
    if warm_up:
        try:
            streams = cfg.admission.cost_probe_streams
            for _ in range(COST_PROBE_RUNS):
                check()
                probes.append(measure_stream_cost(engine, phonemizer, streams=streams,
                                                  on_audio=on_audio, stop=stop.is_set))
            cost = statistics.median(probes)
        except LoadStopped:
            raise
        except ProbeStopped:   # stopped at its next model call, not at the end of a probe
            raise LoadStopped from None
        except Exception:  # e.g. a voice whose phonemizer cannot speak the English probe text
            log.warning("could not measure a stream's cost at warm-up; admission estimates "
                        "capacity from the first steps instead", exc_info=True)
    probe_s = time.perf_counter() - probe_t0
    heap.release_free_heap()   # what loading and warm-up freed (hundreds of MB on CPU)
    log.info("voice %s loaded in %.1f s, warmed up in %.1f s on %s%s", voice.id, loaded_s, warm_s,
             cfg.engine.device, "" if cost is None else
             f"; one stream costs {cost:.3f} s per audio s (in a batch of "
             f"{cfg.admission.cost_probe_streams}; probes {', '.join(f'{p:.3f}' for p in probes)})")
    return LoadedModel(engine=engine, phonemizer=phonemizer, stream_vram_bytes=vram, stream_cost=cost,
                       warmup_s=warm_s, probe_s=probe_s)


class ProbeEncoding:
    """Encodes warm-up's cost probe audio the way live streams' audio is encoded: one task per
    probe stream on the event loop hands its chunks, in order, to the encoder threads (what
    `ContextStream` does), in the format a `start` gets by default. Where the model and the
    encoders share CPU cores, a stream's cost then includes what encoding takes from the model,
    as the costs of finished streams do.

    `on_audio` is called from the model thread; everything else runs on the event loop. An
    encoding failure is logged and ends that probe stream's encoding, nothing else.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: EncoderPool,
                 make: Callable[[], StreamEncoder]) -> None:
        self._loop = loop
        self._pool = pool
        self._make = make
        self._queues: dict[int, asyncio.Queue[np.ndarray | None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.encoded_s = 0.0  # CPU time the encoder threads spent on the probe

    @classmethod
    def for_config(cls, cfg: ServerConfig, voice: VoiceInfo, pool: EncoderPool) -> ProbeEncoding:
        start, audio = StartMsg(), cfg.audio
        return cls(asyncio.get_running_loop(), pool, functools.partial(
            make_encoder, start.format.value, in_rate=voice.sample_rate,
            out_rate=start.sample_rate, bitrate=start.bitrate, complexity=audio.opus_complexity))

    def on_audio(self, copy: int, samples: np.ndarray) -> None:
        """A probe stream's next chunk (model thread)."""
        if not self._closed:
            self._loop.call_soon_threadsafe(self._put, copy, samples)

    def _put(self, copy: int, samples: np.ndarray) -> None:
        if self._closed:  # a probe left running by a cancelled start-up
            return
        queue = self._queues.get(copy)
        if queue is None:
            queue = self._queues[copy] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._pump(queue), name=f"cost-probe-{copy}"))
        queue.put_nowait(samples)

    async def _pump(self, queue: asyncio.Queue[np.ndarray | None]) -> None:
        try:
            encoder = self._make()
            while (samples := await queue.get()) is not None:
                _, cpu_s = await self._pool.run(encoder.encode, samples,
                                                audio_s=len(samples) / encoder.in_rate)
                self.encoded_s += cpu_s
        except Exception:
            log.warning("cost probe: encoding failed; the probe goes on without it", exc_info=True)

    async def close(self) -> None:
        """Wait for everything handed over so far to be encoded (call once the probe has
        returned), then end the tasks."""
        # Hand-overs are callbacks on the loop, run in the order registered: once this one
        # has run, so have all that were registered before close() was called.
        barrier = self._loop.create_future()
        self._loop.call_soon(barrier.set_result, None)
        await barrier
        for queue in self._queues.values():
            queue.put_nowait(None)
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.cancel()
        log.debug("cost probe: its audio took %.0f ms of encoder CPU", self.encoded_s * 1000.0)

    async def cancel(self) -> None:
        """Stop encoding (loading failed or the app stops): no task is left behind."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._queues.clear()


def measure_stream_vram(engine: Engine, *, batch: int) -> int:
    """GPU memory one stream adds: the peak of a full batch (acoustic + decode of a long
    phrase), divided by the batch size. Also warms up the largest batch shapes."""
    device = engine.device
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    jobs = [AcousticJob(ids=_PROBE_IDS, params=SynthesisParams(), seed=i) for i in range(batch)]
    results = engine.acoustic(jobs)
    biggest = max(engine.buckets)
    engine.decode([DecodeJob(z=r.z, start=0, end=min(biggest, r.num_frames)) for r in results])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    per_stream = -(-peak // batch)  # round up
    log.info("VRAM: batch of %d streams peaks at %.1f MiB, %.1f MiB per stream",
             batch, peak / 2**20, per_stream / 2**20)
    return int(per_stream)


def build_scheduler(
    loaded: LoadedModel, cfg: ServerConfig, *,
    observer: SchedulerObserver | None, power_reader: Callable[[], float | None],
    model_thread: concurrent.futures.ThreadPoolExecutor | None = None,
) -> Scheduler:
    """The scheduler that will own `loaded.engine` (construct on the event loop)."""
    s = cfg.scheduler
    config = SchedulerConfig(
        lookahead_ms=s.lookahead_ms, target_step_ms=s.target_step_ms,
        arriving_step_ms=s.arriving_step_ms, arriving_below_busy=s.arriving_below_busy,
        max_batch_phrases=s.max_batch_phrases, max_batch_chunks=s.max_batch_chunks,
        silence_fill_ms=s.silence_fill_ms, first_phrase_wait_ms=s.first_phrase_wait_ms,
        heap_trim_interval_s=s.heap_trim_interval_s, buffer_delay_hold_ms=s.buffer_delay_hold_ms,
        function_word_wait_ms=s.function_word_wait_ms, delay_min_words=s.delay_min_words,
        catch_up_after_ms=s.catch_up_after_ms, lead_in_ms=s.lead_in_ms,
        join_keep_ms=s.join_keep_ms, lead_in_search_ms=s.lead_in_search_ms,
        read_on_word=read_on_word_for(loaded.phonemizer.voice.language) if s.read_across else "",
        read_from=s.read_across,
        cost_half_life_s=cfg.admission.cost_half_life_s,
        recalibrate_idle_s=cfg.admission.recalibrate_idle_s,
        probe_streams=cfg.admission.cost_probe_streams,
    )
    return Scheduler(
        loaded.engine, phonemizer=loaded.phonemizer,
        splitter_factory=functools.partial(
            PhraseSplitter, SplitterConfig(
                eager_until_buffered_ms=s.eager_until_buffered_ms,
                first_phrase_max_words=s.first_phrase_max_words,
                function_words=function_words_for(loaded.phonemizer.voice.language))),
        meter=Meter(make_tariff(cfg)), config=config, observer=observer,
        power_reader=power_reader, model_thread=model_thread, initial_stream_cost=loaded.stream_cost,
    )


def make_tariff(cfg: ServerConfig) -> Tariff | None:
    """Both prices 0 means no tariff (`usage.cost` is null); a single 0 price is not charged."""
    m = cfg.metering
    if not m.has_tariff:
        return None
    return Tariff(
        price_per_kwh=m.price_per_kwh or None,
        price_per_gpu_hour=m.price_per_gpu_hour or None,
        currency=m.currency,
    )


# ---------------------------------------------------------------------------- the model's task


async def run_model(state: ServerState, loader: EngineLoader, *, warm_up: bool) -> None:
    """Load and warm up (in a thread), then run the scheduler until cancelled (the app stops).
    /healthz turns 200 once this has set the model slot's scheduler."""
    model = state.model
    # Load, warm up and later run the model in one thread (see new_model_thread).
    model_thread = new_model_thread()
    assert state.audio_pool is not None, "the audio pool's context comes first"
    probe = ProbeEncoding.for_config(state.cfg, model.voice, state.audio_pool)
    stop = threading.Event()
    try:
        loaded = await asyncio.get_running_loop().run_in_executor(
            model_thread, functools.partial(prepare_model, model.voice, state.cfg, loader=loader,
                                            warm_up=warm_up, on_audio=probe.on_audio, stop=stop))
        await probe.close()
    except asyncio.CancelledError:   # shutdown while loading: the thread stops at its next stage
        stop.set()
        model_thread.shutdown(wait=False, cancel_futures=True)
        await probe.cancel()
        raise
    except Exception as exc:
        model_thread.shutdown(wait=False)
        await probe.cancel()
        log.exception("loading voice %s failed; /healthz stays 503", model.voice.id)
        model.failure = f"loading failed: {exc!r}"
        return
    observer = MetricsObserver(state.metrics, frame_ms=loaded.engine.frame_ms)
    observer.on_overhead("warmup", loaded.warmup_s)
    observer.on_overhead("cost_probe", loaded.probe_s)
    scheduler = build_scheduler(loaded, state.cfg, observer=observer,
                                power_reader=state.power_w, model_thread=model_thread)
    if loaded.stream_vram_bytes is not None:
        state.admission.set_stream_vram_cost(loaded.stream_vram_bytes)
    model.engine, model.scheduler = loaded.engine, scheduler
    if state.on_ready is not None:
        state.on_ready()
    await _run_scheduler(model, scheduler)


async def _run_scheduler(model: ModelSlot, scheduler: Scheduler) -> None:
    try:
        await scheduler.run()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # Nothing can speak any more: report unhealthy so an orchestrator restarts us.
        log.critical("the scheduler stopped", exc_info=exc)
        model.failure = f"scheduler stopped: {exc!r}"
