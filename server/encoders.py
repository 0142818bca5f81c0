"""The encoder threads: resampling and Opus for every stream, off the event loop, metered.

One `EncoderPool` per app (created and shut down by its cleanup context). Each stream hands its
audio over one chunk at a time (`ContextStream`), so a stream's encoder is never used by two
threads at once. The pool counts what the threads spend: CPU time per task, for `done.usage.
encode_ms` and `tts_encode_seconds_total`, and the wall time its threads were held, against the
seconds of audio they were given. `sample` turns those into an `EncoderLoad` for admission:
Opus is most of a GPU host's own work (~7.5 ms of a core per audio second at complexity 5,
BENCHMARKS.md "The host path"), so with enough streams the threads fall behind before the GPU
does, and then every stream stutters.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Any, TypeVar

from server.admission import EncoderLoad
from server.metrics import Metrics

T = TypeVar("T")

THREAD_PREFIX = "tts-audio"
# A sample's seconds-per-audio-second reading counts only if it saw this much audio encoded.
MIN_SAMPLE_AUDIO_S = 1.0


class EncoderPool:
    """A fixed set of encoder threads that meters their use. Call from the event loop."""

    def __init__(self, workers: int, *, metrics: Metrics | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._metrics = metrics
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                           thread_name_prefix=THREAD_PREFIX)
        self._held_s = 0.0           # wall seconds the threads spent in tasks, since the start
        self._audio_s = 0.0          # seconds of audio handed in, since the start
        self._sampled = (time.monotonic(), 0.0, 0.0)   # (when, _held_s, _audio_s) last sample
        self._held_per_audio_s: float | None = None

    async def run(self, fn: Callable[..., T], *args: Any, audio_s: float = 0.0) -> tuple[T, float]:
        """fn(*args) in an encoder thread; its result and the CPU seconds it took. `audio_s`:
        the seconds of audio this task encodes."""
        result, cpu_s, wall_s = await asyncio.get_running_loop().run_in_executor(
            self._pool, _timed, fn, *args)
        self._held_s += wall_s
        self._audio_s += audio_s
        if self._metrics is not None:
            self._metrics.encode_seconds.inc(cpu_s)
        return result, cpu_s

    def sample(self) -> EncoderLoad:
        """The threads' load since the last sample: the fraction of their time held (tasks
        count when they end; they take milliseconds, samples are a second apart) and thread
        seconds per second of audio, smoothed over the samples that encoded at least
        `MIN_SAMPLE_AUDIO_S` (it stays at the last such reading in between)."""
        now = time.monotonic()
        at, held_then, audio_then = self._sampled
        self._sampled = (now, self._held_s, self._audio_s)
        held, audio = self._held_s - held_then, self._audio_s - audio_then
        if audio >= MIN_SAMPLE_AUDIO_S:
            rate, last = held / audio, self._held_per_audio_s
            self._held_per_audio_s = rate if last is None else 0.5 * (last + rate)
        busy = min(1.0, held / max((now - at) * self.workers, 1e-9))
        return EncoderLoad(busy=busy, held_per_audio_s=self._held_per_audio_s,
                           workers=self.workers)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """fn(*args), the CPU seconds this thread spent in it and the wall seconds it took (which
    also count the time the thread waited for a core or the GIL: it was occupied all along)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    result = fn(*args)
    return result, time.thread_time() - c0, time.perf_counter() - t0
