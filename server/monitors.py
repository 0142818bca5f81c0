"""Background sampling loops for /metrics and admission: event-loop lag and busy time, and the
GPU (NVML).

Both run as tasks owned by the app's cleanup contexts and run until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from server.metrics import Metrics
from server.state import ServerState
from streaming_tts.gpu import GpuMonitor

log = logging.getLogger(__name__)

# Probe period: short enough to catch a 10 ms stall, long enough to cost nothing.
LAG_PROBE_S = 0.05


async def watch_loop_lag(
    metrics: Metrics, *, window_s: float, on_window: Callable[[], None] | None = None,
    on_busy: Callable[[float], None] | None = None,
) -> None:
    """Sleep `LAG_PROBE_S` again and again; how late each wake-up comes is the loop's lag.

    Every `window_s` the worst lag of the window goes to the max gauge, the loop thread's busy
    fraction (its CPU time over the window's wall time; this coroutine runs on that thread) to
    the busy gauge and `on_busy`, and `on_window` runs (other cheap gauges ride on this clock
    instead of needing a task of their own).
    """
    loop = asyncio.get_running_loop()
    worst = 0.0
    window_end = loop.time() + window_s
    window_start, cpu_start = loop.time(), time.thread_time()
    while True:
        start = loop.time()
        await asyncio.sleep(LAG_PROBE_S)
        now = loop.time()
        lag = max(0.0, now - start - LAG_PROBE_S)
        metrics.loop_lag_seconds.observe(lag)
        worst = max(worst, lag)
        if now >= window_end:
            metrics.loop_lag_max_seconds.set(worst)
            cpu = time.thread_time()
            busy = min(1.0, (cpu - cpu_start) / max(now - window_start, 1e-9))
            metrics.loop_busy_ratio.set(busy)
            if on_busy is not None:
                on_busy(busy)
            if on_window is not None:
                on_window()
            worst = 0.0
            window_end = now + window_s
            window_start, cpu_start = now, cpu


async def sample_gpu(state: ServerState, monitor: GpuMonitor) -> None:
    """Every `metrics.sample_interval_s`: GPU gauges, energy counter, VRAM pressure warning.

    NVML calls take a driver round trip, so they run in a worker thread.
    """
    interval = state.cfg.metrics.sample_interval_s
    warn = state.cfg.metrics.vram_warn_fraction
    last_energy: float | None = None
    while True:
        sample = await asyncio.to_thread(monitor.sample)
        if sample is not None:
            state.gpu_sample = sample
            state.metrics.record_gpu_sample(sample, warn_fraction=warn)
        energy = await asyncio.to_thread(monitor.energy_j)
        if energy is not None:
            if last_energy is None:
                state.metrics.add_energy(0.0)    # the series appears with the first reading
            elif energy > last_energy:
                state.metrics.add_energy(energy - last_energy)
            last_energy = energy
        await asyncio.sleep(interval)
