"""The encoder threads' pool meters CPU per task and the fraction of its threads' time in use."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.encoders import EncoderPool
from server.metrics import Metrics


def spin(seconds: float) -> str:
    """Burn CPU for `seconds` of this thread's CPU time."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass
    return threading.current_thread().name


async def test_a_task_runs_in_an_encoder_thread_and_reports_its_cpu_time() -> None:
    metrics = Metrics()
    pool = EncoderPool(2, metrics=metrics)
    try:
        name, cpu_s = await pool.run(spin, 0.05)
        assert name.startswith("tts-audio") and 0.05 <= cpu_s < 0.2
        _, idle_cpu_s = await pool.run(time.sleep, 0.05)   # waiting is not CPU
        assert idle_cpu_s < 0.02
        assert metrics.encode_seconds._value.get() == pytest.approx(cpu_s + idle_cpu_s)
    finally:
        pool.shutdown()


async def test_busy_is_the_fraction_of_the_threads_time_held_since_the_last_sample() -> None:
    pool = EncoderPool(2)
    try:
        pool.sample()                                  # start a window
        # Both threads held for the whole window (sleeping counts: a thread waiting for a
        # core or the GIL is held all the same).
        t0 = time.monotonic()
        await asyncio.gather(pool.run(time.sleep, 0.2), pool.run(time.sleep, 0.2))
        window = time.monotonic() - t0
        assert pool.sample().busy == pytest.approx(min(1.0, 0.4 / (2 * window)), abs=0.1)
        assert pool.sample().busy == pytest.approx(0.0, abs=0.01)   # nothing since
        # One thread of two, for about half the window.
        await pool.run(time.sleep, 0.1)
        await asyncio.sleep(0.1)
        assert pool.sample().busy == pytest.approx(0.25, abs=0.08)
        # A backlog (four tasks queued on two threads) reads as full, never above.
        await asyncio.gather(*(pool.run(time.sleep, 0.1) for _ in range(4)))
        assert 0.9 <= pool.sample().busy <= 1.0
    finally:
        pool.shutdown()


async def test_thread_time_per_audio_second_is_learnt_from_samples_with_enough_audio() -> None:
    pool = EncoderPool(2)
    try:
        assert pool.sample().held_per_audio_s is None          # nothing encoded yet
        await pool.run(time.sleep, 0.05, audio_s=0.5)          # too little audio to judge
        assert pool.sample().held_per_audio_s is None
        for _ in range(2):                                     # 20 ms held per second of audio
            await pool.run(time.sleep, 0.02, audio_s=1.0)
        first = pool.sample()
        assert first.held_per_audio_s == pytest.approx(0.02, rel=0.5) and first.workers == 2
        assert first.projected(100) == pytest.approx(100 * first.held_per_audio_s / 2)
        assert pool.sample().held_per_audio_s == first.held_per_audio_s   # kept while idle
        await pool.run(time.sleep, 0.12, audio_s=2.0)          # 60 ms per second now
        assert first.held_per_audio_s < pool.sample().held_per_audio_s < 0.06   # smoothed
    finally:
        pool.shutdown()


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="workers must be >= 1"):
        EncoderPool(0)
