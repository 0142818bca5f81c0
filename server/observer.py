"""Scheduler measurements -> Prometheus metrics (a `SchedulerObserver`; event-loop calls only)."""

from __future__ import annotations

import logging

from server.metrics import Metrics

log = logging.getLogger(__name__)

# Weight of the newest step in the real-time-factor average: ~20 steps of memory, so the gauge
# follows load changes within seconds but one odd step does not swing it.
_RTF_SMOOTHING = 0.05


class MetricsObserver:
    """Feeds each scheduler step and listener run dry into `Metrics` (the time to first audio
    is measured where the audio is sent: server/context_stream.py)."""

    def __init__(self, metrics: Metrics, *, frame_ms: float) -> None:
        self._metrics = metrics
        self._frame_ms = frame_ms
        self._rtf: float | None = None

    def on_step(self, seconds: float, acoustic: int, decode: int, frames: int) -> None:
        m = self._metrics
        m.step_seconds.observe(seconds)
        m.compute_seconds.inc(seconds)
        if acoustic:
            m.observe_batch("acoustic", acoustic)
        if decode:
            m.observe_batch("decode", decode)
        if frames > 0:
            rtf = seconds / (frames * self._frame_ms / 1000.0)
            self._rtf = rtf if self._rtf is None else (
                self._rtf + _RTF_SMOOTHING * (rtf - self._rtf))
            m.real_time_factor.set(self._rtf)

    def on_overhead(self, kind: str, seconds: float) -> None:
        self._metrics.add_overhead(kind, seconds)

    def on_stream_ended(self, reported: str, usage: dict) -> None:
        self._metrics.stream_ended(reported, usage.get("compute_ms") or 0.0)

    def on_late(self, stream_id: str) -> None:
        pass   # every timer check while it is dry; counted once per time below

    def on_underrun(self, stream_id: str) -> None:
        # Not an error by itself (the client's own buffer may cover it): counted, so that an
        # operator sees listeners run dry; the TTFA histogram and real-time factor show why.
        self._metrics.listener_underruns.inc()
        log.debug("stream %s: listener ran dry before its next audio", stream_id)
