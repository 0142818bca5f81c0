"""Admission control: refuse a new stream rather than let every stream fall behind.

A stream is refused when any of these holds (checked cheapest first):
  1. `max_streams` live streams already exist;
  2. free GPU memory minus `vram_reserve_mb` is below the per-stream VRAM cost measured at
     warm-up (only with a GPU reader and a measured cost);
  3. the projected load, (demand of live streams + one more real-time stream, plus
     `startup_extra` for each stream still building its runway, the new one included) /
     measured capacity, exceeds `max_load` (only once capacity has been measured, and never
     for the only stream: an idle server always tries one);
  4. the event loop's thread was busy (CPU time over wall time, last sample interval) beyond
     `max_loop_busy`: the host's own work, not the model's, is at its limit (with a reading);
  5. the encoder threads (resampling, Opus) would be held beyond `max_encode_busy` of their
     time: as measured over the last sample interval, or as projected for the live streams
     plus the new one from the thread time a second of audio has recently taken (so a burst
     is refused before it arrives in the measurement). Past it they fall behind and every
     stream stutters, whatever the GPU has left (with a reading).

A refusal carries a retry hint in whole seconds (HTTP's Retry-After has no fractions):
`retry_after_s`, or 1 s when only the start-up surcharge refused it (runways are built within a
second or two, so room comes back soon), plus a random 0..`retry_jitter_s`, so that clients
refused in the same burst do not all come back in the same instant and meet the surcharge again.

Pure logic: no aiohttp, no NVML, no scheduler import. Readings come in through callables so tests
inject them and the app wires `streaming_tts.gpu`, the scheduler's throughput meter and the
event-loop monitor.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, NamedTuple, Protocol

from server.config import AdmissionConfig

log = logging.getLogger(__name__)

MIB: Final = 1 << 20
# A stream that is speaking needs one second of audio per second of wall time to stay real-time.
REALTIME_DEMAND: Final = 1.0
# Retry hint when only streams still building their runway caused a refusal: they have built
# it a second or two later (a burst of 10 on 2 cores: within ~2 s; BENCHMARKS.md).
STARTING_RETRY_S: Final = 1


class GpuSampleLike(Protocol):
    """What admission reads from a GPU sample (streaming_tts.gpu.GpuSample has these)."""

    @property
    def vram_free_bytes(self) -> int: ...

    @property
    def vram_total_bytes(self) -> int: ...

    @property
    def vram_used_bytes(self) -> int: ...


@dataclass(frozen=True)
class LoadEstimate:
    """The scheduler's view of compute load, in audio seconds per wall-clock second.

    `demand_audio_s_per_s` is what the live streams need to stay real-time (about 1.0 per stream
    that is speaking; a stream waiting for text may count less). `capacity_audio_s_per_s` is the
    measured throughput at the current batch sizes (audio seconds produced per second of model
    time); None until the scheduler has measured it (warm-up usually does).
    `starting_streams` of the active ones have not yet built a runway of audio ahead of their
    listener: until they have, they need more than real time.
    """

    active_streams: int
    demand_audio_s_per_s: float
    capacity_audio_s_per_s: float | None
    starting_streams: int = 0

    @property
    def utilisation(self) -> float | None:
        """Demand as a fraction of capacity; None when capacity is unknown."""
        cap = self.capacity_audio_s_per_s
        if cap is None or cap <= 0:
            return None
        return self.demand_audio_s_per_s / cap


@dataclass(frozen=True)
class EncoderLoad:
    """The encoder threads as last sampled (server.encoders.EncoderPool.sample)."""

    busy: float                      # fraction of their time held in the last interval
    held_per_audio_s: float | None   # thread seconds per second of audio, recently; None: unknown
    workers: int

    def projected(self, streams: float) -> float | None:
        """The fraction of their time `streams` real-time streams would hold."""
        rate = self.held_per_audio_s
        return None if rate is None else streams * REALTIME_DEMAND * rate / self.workers


class RefusalReason(StrEnum):
    """Why a stream was refused; also the `reason` label of the refused-streams metric."""

    MAX_STREAMS = "max_streams"
    VRAM = "vram"
    LOAD = "load"
    EVENT_LOOP = "event_loop"
    ENCODERS = "encoders"
    SOCKETS = "sockets"  # limits.max_sockets: refused before the upgrade (server/http.py)
    NOT_READY = "not_ready"  # the voice is still loading
    SHUTTING_DOWN = "shutting_down"  # draining or stopping
    START_RATE = "start_rate"  # limits.starts_per_s: one socket starting streams in a loop


@dataclass(frozen=True)
class Admission:
    """The decision for one new stream. `message` is safe to show to the client."""

    ok: bool
    reason: RefusalReason | None = None
    retry_after_s: int | None = None
    message: str = ""


ADMITTED: Final = Admission(ok=True)


class _Refusal(NamedTuple):
    reason: RefusalReason
    message: str  # for the client
    frees_soon: bool = False  # only streams still starting refused it: room comes back soon


class AdmissionController:
    """Decides whether a new stream may start and counts the streams it admitted.

    `check()` only decides (the HTTP handler's 503 before the WebSocket upgrade); `admit()`
    decides and, on success, holds a slot until `release()` (one per live context). Holding slots
    here, rather than trusting the scheduler's count, keeps a burst of `start`s from slipping past
    the limits before the scheduler has seen any of them.
    """

    def __init__(
        self,
        cfg: AdmissionConfig,
        *,
        load_source: Callable[[], LoadEstimate],
        gpu_reader: Callable[[], GpuSampleLike | None] | None = None,
        loop_busy_reader: Callable[[], float | None] | None = None,
        encoder_reader: Callable[[], EncoderLoad | None] | None = None,
        elsewhere_reader: Callable[[], int] | None = None,
        on_refused: Callable[[RefusalReason], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._cfg = cfg
        self._load_source = load_source
        self._gpu_reader = gpu_reader
        self._loop_busy_reader = loop_busy_reader
        self._encoder_reader = encoder_reader
        self._elsewhere_reader = elsewhere_reader
        self._on_refused = on_refused
        self._rng = rng or random.Random()
        self._stream_vram_cost: int | None = None
        # The GPU reading last judged, and the admissions counted when it was first seen:
        # streams admitted since are not in its free memory yet (see _vram_refusal).
        self._vram_sample: GpuSampleLike | None = None
        self._admitted_at_sample = 0
        self._active = 0
        self._admitted_total = 0
        self._refused: Counter[RefusalReason] = Counter()

    @property
    def active_streams(self) -> int:
        """Streams admitted here and live."""
        return self._active

    @property
    def server_streams(self) -> int:
        """Live streams of the whole server: those admitted here and, where several front-end
        processes share a back end (server/split.py), those the others hold."""
        return self._active + (self._elsewhere_reader() if self._elsewhere_reader else 0)

    def load(self) -> LoadEstimate:
        """The load as admission reads it (the scheduler's, or what a test injected)."""
        return self._load_source()

    @property
    def admitted_total(self) -> int:
        return self._admitted_total

    @property
    def stream_vram_cost(self) -> int | None:
        return self._stream_vram_cost

    def set_stream_vram_cost(self, cost_bytes: int) -> None:
        """Per-stream VRAM cost measured at warm-up; until set, VRAM is not checked."""
        if cost_bytes < 0:
            raise ValueError(f"stream VRAM cost must be >= 0, got {cost_bytes}")
        self._stream_vram_cost = cost_bytes
        log.info("admission: per-stream VRAM cost %.1f MiB", cost_bytes / MIB)

    def refused_counts(self) -> dict[RefusalReason, int]:
        """Refusals so far, by reason (every reason present, zeros included)."""
        return {reason: self._refused[reason] for reason in RefusalReason}

    def count_refusal(self, reason: RefusalReason) -> None:
        """Count one refusal (also those decided elsewhere: open sockets, server/http.py)."""
        self._refused[reason] += 1
        if self._on_refused is not None:
            self._on_refused(reason)

    def check(self, *, count: bool = True) -> Admission:
        """Would one more stream be admitted now? Holds no slot; a refusal is counted unless
        not `count` (a question, not a stream: server/http.py's plain GET)."""
        refusal = self._max_streams_refusal() or self._vram_refusal()
        if refusal is None:
            load = self._load_source()   # read once: the load and encoder checks both use it
            refusal = (self._load_refusal(load) or self._loop_refusal()
                       or self._encoder_refusal(load))
        if refusal is None:
            return ADMITTED
        reason = refusal.reason
        if count:
            self.count_refusal(reason)
        log.debug("admission refused: %s (%s)", reason, refusal.message)
        return Admission(ok=False, reason=reason, retry_after_s=self.retry_hint(refusal.frees_soon),
                         message=refusal.message)

    def retry_hint(self, frees_soon: bool = False) -> int:
        """Seconds a refused client should wait: `retry_after_s` (1 s when room `frees_soon`)
        plus a random 0..`retry_jitter_s`, spreading the clients of one burst over time."""
        base = self._cfg.retry_after_s
        if frees_soon:
            base = min(STARTING_RETRY_S, base)
        return base + self._rng.randint(0, self._cfg.retry_jitter_s)

    def admit(self) -> Admission:
        """Decide for one new stream; on success it holds a slot until `release()`."""
        decision = self.check()
        if decision.ok:
            self._active += 1
            self._admitted_total += 1
        return decision

    def charge(self) -> None:
        """A stream admitted without a slot here (a back end opening a stream a front end
        admitted: server/split.py) is charged against the GPU reading all the same."""
        self._admitted_total += 1

    def release(self) -> None:
        """A stream admitted by `admit()` ended (done, cancelled, error or disconnect)."""
        if self._active == 0:
            # A double release is a bug in the caller; clamping keeps admission usable.
            log.error("admission: release() without a matching admit()")
            return
        self._active -= 1

    def _max_streams_refusal(self) -> _Refusal | None:
        limit = self._cfg.max_streams
        if self.server_streams < limit:
            return None
        return _Refusal(RefusalReason.MAX_STREAMS,
                        f"server is at its limit of {limit} concurrent streams")

    def _vram_refusal(self) -> _Refusal | None:
        cost = self._stream_vram_cost
        if self._gpu_reader is None or not cost:
            return None
        # The GPU sampler's latest reading (NVML is a driver round trip: not on the event loop,
        # where this runs). Streams admitted since that reading have not shown in it, and a new
        # stream allocates only at its first step anyway, so each one admitted since is charged
        # its cost here; otherwise a burst between two readings would all see the same memory.
        # Streams that end are credited by the next reading (if the allocator gives it back).
        sample = self._gpu_reader()
        if sample is None:
            # No reading (NVML hiccup): refusing on missing data would turn a monitoring
            # glitch into an outage; max_streams and load still apply.
            return None
        if sample is not self._vram_sample:
            self._vram_sample, self._admitted_at_sample = sample, self._admitted_total
        since = self._admitted_total - self._admitted_at_sample
        headroom = sample.vram_free_bytes - self._cfg.vram_reserve_mb * MIB - since * cost
        if headroom >= cost:
            return None
        pending = f" and {since} stream(s) admitted since the last reading" if since else ""
        return _Refusal(RefusalReason.VRAM, (
            f"not enough GPU memory for another stream ({max(headroom, 0) / MIB:.0f} MiB free "
            f"beyond the reserve{pending}, {cost / MIB:.0f} MiB needed)"))

    def _starting(self, load: LoadEstimate) -> tuple[int, int]:
        """(streams admitted here but not yet registered with the scheduler, streams still
        building a runway): the first carry no demand in the scheduler's estimate, so they count
        as real-time streams, plus the one asking now. Those, and the streams still building a
        runway, carry the start-up surcharge: streams that start together all need their first
        phrases and a runway at once (and, behind the model, that runway encoded)."""
        unseen = max(0, self.server_streams - load.active_streams)
        return unseen, load.starting_streams + unseen + 1

    def _load_refusal(self, load: LoadEstimate) -> _Refusal | None:
        capacity = load.capacity_audio_s_per_s
        if capacity is None or capacity <= 0:
            return None  # not measured yet: max_streams alone bounds the start-up phase
        if self.server_streams == 0 and load.active_streams == 0:
            # Nobody to slow down. And only finished streams correct the estimate: a cost
            # measured while the host stalled (warm-up's probe read 1.9 s per audio s once,
            # 20x the usual) would otherwise refuse every stream, for good.
            return None
        unseen, starting = self._starting(load)
        steady = (load.demand_audio_s_per_s + (unseen + 1) * REALTIME_DEMAND) / capacity
        projected = steady + starting * self._cfg.startup_extra / capacity
        if projected <= self._cfg.max_load:
            return None
        return _Refusal(RefusalReason.LOAD, (
            f"server is at capacity (projected load {_above(projected, self._cfg.max_load)}, "
            f"limit {self._cfg.max_load:.0%})"), frees_soon=steady <= self._cfg.max_load)

    def _loop_refusal(self) -> _Refusal | None:
        busy = self._loop_busy_reader() if self._loop_busy_reader is not None else None
        limit = self._cfg.max_loop_busy
        if busy is None or busy <= limit:
            return None
        return _Refusal(RefusalReason.EVENT_LOOP,
                        f"server is at capacity (event loop busy {_above(busy, limit)}, "
                        f"limit {limit:.0%})")

    def _encoder_refusal(self, load: LoadEstimate) -> _Refusal | None:
        encoders = self._encoder_reader() if self._encoder_reader is not None else None
        limit = self._cfg.max_encode_busy
        if encoders is None or limit >= 1.0:   # 1.0: never (a projection can pass 100%)
            return None
        _, starting = self._starting(load)
        projected = encoders.projected(self._active + 1 + starting * self._cfg.startup_extra)
        if encoders.busy <= limit and (projected is None or projected <= limit):
            return None
        shown = ("" if projected is None
                 else f", {_above(projected, limit)} projected with one more stream")
        return _Refusal(RefusalReason.ENCODERS, (
            f"server is at capacity (audio encoders busy {_above(encoders.busy, limit)}{shown}, "
            f"limit {limit:.0%})"))


def _above(value: float, limit: float) -> str:
    """`value` as a percentage with the digits that tell it from `limit` ("75.3%" against a
    limit of 75%, never "75%, limit 75%")."""
    for digits in range(4):
        shown = f"{value:.{digits}%}"
        if shown != f"{limit:.{digits}%}":
            return shown
    return shown
