"""Per-stream usage metering: compute share, energy and cost, as reported in `done.usage`.

The scheduler owns one `Meter`. After every model step it calls `record_batch` with the step's
wall time, each stream's work units in the batch (e.g. frames decoded) and the GPU power; the
step's time and energy are split among the streams in proportion to their work, so the shares
of one step always add up to the whole step. Cost turns that into money the way self-hosted
GPU users think about it: electricity (kWh x tariff) plus hardware time (GPU hours x rate).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

J_PER_KWH = 3.6e6
MS_PER_HOUR = 3.6e6

StreamId = Hashable
Usage = dict[str, int | float | None]
# A usage's fields in log lines, in this order (those it has).
_SUMMARY_FIELDS = ("chars", "phrases", "audio_ms", "compute_ms", "encode_ms", "energy_j", "cost",
                   "ttfa_ms")


def usage_summary(usage: Mapping[str, object]) -> str:
    """A usage as a log line shows it: "chars=12, phrases=1, audio_ms=900, ..."."""
    return ", ".join(f"{k}={usage[k]}" for k in _SUMMARY_FIELDS if k in usage)


@dataclass(frozen=True)
class Tariff:
    """Prices used for `cost`; either may be None (unknown), both None means no cost."""

    price_per_kwh: float | None = None  # electricity, currency units per kWh
    price_per_gpu_hour: float | None = None  # hardware rent/amortisation per GPU hour
    currency: str = "USD"

    def __post_init__(self) -> None:
        for name in ("price_per_kwh", "price_per_gpu_hour"):
            price = getattr(self, name)
            if price is not None and not (math.isfinite(price) and price >= 0):
                raise ValueError(f"{name} must be a finite price >= 0, got {price}")


@dataclass
class StreamMeter:
    """Running usage counters of one stream."""

    chars: int = 0
    phrases: int = 0
    audio_ms: float = 0.0
    compute_ms: float = 0.0
    energy_j: float | None = None  # stays None until a batch with power data includes us
    ttfa_ms: float | None = None  # first text in -> first audio out of the scheduler (the
    # server sends the socket's own: first text received -> first audio sent)
    first_text_at: float | None = None  # clock seconds

    def add_text(self, chars: int, now: float) -> None:
        if self.first_text_at is None:
            self.first_text_at = now
        self.chars += chars

    def add_audio(self, audio_ms: float, now: float) -> None:
        if self.ttfa_ms is None and self.first_text_at is not None and audio_ms > 0:
            self.ttfa_ms = max(0.0, (now - self.first_text_at) * 1000.0)
        self.audio_ms += audio_ms

    def add_compute(self, seconds: float, energy_j: float | None) -> None:
        self.compute_ms += seconds * 1000.0
        if energy_j is not None:
            self.energy_j = (self.energy_j or 0.0) + energy_j

    def cost(self, tariff: Tariff | None) -> float | None:
        """Energy kWh x price_per_kwh + compute hours x price_per_gpu_hour, known parts only."""
        if tariff is None:
            return None
        parts: list[float] = []
        if tariff.price_per_kwh is not None and self.energy_j is not None:
            parts.append(self.energy_j / J_PER_KWH * tariff.price_per_kwh)
        if tariff.price_per_gpu_hour is not None:
            parts.append(self.compute_ms / MS_PER_HOUR * tariff.price_per_gpu_hour)
        return sum(parts) if parts else None

    def usage(self, tariff: Tariff | None) -> Usage:
        """The protocol's `done.usage` map, rounded for the wire."""
        return {
            "chars": self.chars,
            "phrases": self.phrases,
            "audio_ms": int(round(self.audio_ms)),
            "compute_ms": round(self.compute_ms, 1),
            "energy_j": None if self.energy_j is None else round(self.energy_j, 3),
            "cost": _significant(self.cost(tariff), 6),
            "ttfa_ms": None if self.ttfa_ms is None else round(self.ttfa_ms, 1),
        }


@dataclass
class MeterTotals:
    """Counters over all streams ever metered (for /metrics; never reset by `close`)."""

    batches: int = 0
    compute_s: float = 0.0
    energy_j: float | None = None


class Meter:
    """All live streams' meters. Streams must be `open`ed; updates for unknown ids (already
    closed: cancel/disconnect races) are ignored so nothing leaks. Thread-safe."""

    def __init__(
        self, tariff: Tariff | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.tariff = tariff
        self._clock = clock
        self._streams: dict[StreamId, StreamMeter] = {}
        self._totals = MeterTotals()
        self._lock = threading.Lock()

    def open(self, stream_id: StreamId) -> StreamMeter:
        """Start metering a stream (idempotent)."""
        with self._lock:
            return self._streams.setdefault(stream_id, StreamMeter())

    def close(self, stream_id: StreamId) -> Usage | None:
        """Forget a stream; returns its final usage (None if it was not open)."""
        with self._lock:
            meter = self._streams.pop(stream_id, None)
            return None if meter is None else meter.usage(self.tariff)

    def __contains__(self, stream_id: StreamId) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def usage(self, stream_id: StreamId) -> Usage:
        """`done.usage` of a live stream (KeyError when it is not open)."""
        with self._lock:
            return self._streams[stream_id].usage(self.tariff)

    def totals(self) -> MeterTotals:
        with self._lock:
            t = self._totals
            return MeterTotals(t.batches, t.compute_s, t.energy_j)

    def add_text(self, stream_id: StreamId, chars: int, now: float | None = None) -> None:
        """Text received; `now` (clock seconds) lets the receiver stamp arrival for TTFA."""
        self._update(stream_id, lambda m: m.add_text(chars, self._now(now)))

    def add_phrase(self, stream_id: StreamId, count: int = 1) -> None:
        self._update(stream_id, lambda m: setattr(m, "phrases", m.phrases + count))

    def add_audio(self, stream_id: StreamId, audio_ms: float, now: float | None = None) -> None:
        """Audio sent to the client; the first call with audio fixes TTFA."""
        self._update(stream_id, lambda m: m.add_audio(audio_ms, self._now(now)))

    def record_batch(
        self,
        step_seconds: float,
        shares: Mapping[StreamId, float],
        power_w: float | None,
    ) -> None:
        """Split one model step's wall time and energy among streams by their work units; a
        step that did no measured work for the streams in it (their decoding left out: they
        were cancelled meanwhile) is theirs in equal parts, so every step is someone's."""
        _check_batch(step_seconds, shares)
        if power_w is not None and not (math.isfinite(power_w) and power_w >= 0):
            logger.warning("ignoring invalid GPU power reading %r", power_w)  # sensor glitch
            power_w = None
        work = sum(shares.values())
        if work <= 0 and shares:
            shares = dict.fromkeys(shares, 1.0)
            work = float(len(shares))
        step_energy = None if power_w is None else power_w * step_seconds
        with self._lock:
            self._add_totals(step_seconds, step_energy)
            if work <= 0:
                return
            for stream_id, units in shares.items():
                meter = self._streams.get(stream_id)
                if meter is None or units == 0:
                    continue  # not metered (never opened, or closed already): no one's
                frac = units / work
                energy = None if step_energy is None else step_energy * frac
                meter.add_compute(step_seconds * frac, energy)

    def _add_totals(self, step_seconds: float, step_energy: float | None) -> None:
        t = self._totals
        t.batches += 1
        t.compute_s += step_seconds
        if step_energy is not None:
            t.energy_j = (t.energy_j or 0.0) + step_energy

    def _update(self, stream_id: StreamId, change: Callable[[StreamMeter], None]) -> None:
        with self._lock:
            meter = self._streams.get(stream_id)
            if meter is None:
                logger.debug("metering update for unknown stream %r ignored", stream_id)
                return
            change(meter)

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now


def _check_batch(step_seconds: float, shares: Mapping[StreamId, float]) -> None:
    """Bad step numbers are caller bugs: fail loudly rather than bill nonsense."""
    if not (math.isfinite(step_seconds) and step_seconds >= 0):
        raise ValueError(f"step_seconds must be finite and >= 0, got {step_seconds}")
    if any(not (math.isfinite(u) and u >= 0) for u in shares.values()):
        raise ValueError(f"work units must be finite and >= 0, got {dict(shares)}")


def _significant(value: float | None, digits: int) -> float | None:
    """Round to significant digits: costs per stream are tiny fractions of a cent."""
    return None if value is None else float(f"{value:.{digits}g}")
