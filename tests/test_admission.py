"""Admission control with injected GPU, load and event-loop readings: a new stream is refused,
with a reason and a retry hint, exactly when VRAM, compute load, the event loop or the stream
limit would be exceeded."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from server.admission import (
    MIB,
    _above,
    Admission,
    AdmissionController,
    EncoderLoad,
    LoadEstimate,
    RefusalReason,
)
from server.config import AdmissionConfig

IDLE = LoadEstimate(active_streams=0, demand_audio_s_per_s=0.0, capacity_audio_s_per_s=None)


@dataclass(frozen=True)
class FakeGpu:
    vram_free_bytes: int
    vram_total_bytes: int = 80_000 * MIB
    vram_used_bytes: int = 0


class Readings:
    """Mutable stand-ins for NVML and the scheduler's throughput meter."""

    def __init__(self) -> None:
        self.gpu: FakeGpu | None = None
        self.load = IDLE
        self.loop_busy: float | None = None
        self.encoders: EncoderLoad | None = None

    def read_gpu(self) -> FakeGpu | None:
        return self.gpu

    def read_load(self) -> LoadEstimate:
        return self.load

    def read_loop_busy(self) -> float | None:
        return self.loop_busy

    def read_encoders(self) -> EncoderLoad | None:
        return self.encoders


def make(
    readings: Readings, *, gpu: bool = True, max_streams: int = 100, max_load: float = 0.85,
    startup_extra: float = 0.0, retry_jitter_s: int = 0, max_encode_busy: float = 0.85,
) -> AdmissionController:
    config = AdmissionConfig(max_streams=max_streams, max_load=max_load, vram_reserve_mb=512,
                             retry_after_s=3, retry_jitter_s=retry_jitter_s,
                             startup_extra=startup_extra, max_encode_busy=max_encode_busy)
    return AdmissionController(config, load_source=readings.read_load,
                               gpu_reader=readings.read_gpu if gpu else None,
                               loop_busy_reader=readings.read_loop_busy,
                               encoder_reader=readings.read_encoders)


# --------------------------------------------------------------------------- event loop


def test_a_busy_event_loop_refuses_new_streams_until_it_calms_down() -> None:
    r = Readings()
    ctl = make(r)                                     # max_loop_busy: the default, 0.85
    assert ctl.admit().ok                             # no reading yet: not checked
    r.loop_busy = 0.85
    assert ctl.admit().ok                             # at the limit is still within it
    r.loop_busy = 0.9
    decision = ctl.admit()
    assert (decision.ok, decision.reason, decision.retry_after_s) == (False, RefusalReason.EVENT_LOOP, 3)
    assert "event loop busy 90%, limit 85%" in decision.message
    assert ctl.active_streams == 2
    r.loop_busy = 0.3
    assert ctl.admit().ok


def test_busy_encoder_threads_refuse_new_streams_until_they_catch_up() -> None:
    r = Readings()
    ctl = make(r)                                     # max_encode_busy: the default, 0.85
    assert ctl.admit().ok                             # no reading yet: not checked
    r.encoders = EncoderLoad(busy=0.85, held_per_audio_s=None, workers=2)
    assert ctl.admit().ok                             # at the limit is still within it
    r.encoders = EncoderLoad(busy=0.97, held_per_audio_s=None, workers=2)
    decision = ctl.admit()
    assert (decision.ok, decision.reason, decision.retry_after_s) == (False, RefusalReason.ENCODERS, 3)
    assert "audio encoders busy 97%, limit 85%" in decision.message
    r.loop_busy = 0.9                                 # both: the cheaper check names it
    assert ctl.admit().reason is RefusalReason.EVENT_LOOP
    r.encoders, r.loop_busy = EncoderLoad(busy=0.2, held_per_audio_s=None, workers=2), None
    assert ctl.admit().ok and ctl.active_streams == 3


def test_encoders_refuse_the_stream_that_would_overload_them_before_they_are_busy() -> None:
    # A burst arrives within one sample interval: the threads are not busy yet, but what a
    # second of audio has taken them says how many streams they can carry. 10 ms of a thread
    # per audio second on 2 threads: 170 streams make 85%.
    r = Readings()
    ctl = make(r, max_streams=1000)
    r.encoders = EncoderLoad(busy=0.1, held_per_audio_s=0.01, workers=2)
    admitted = 0
    while (decision := ctl.admit()).ok:
        admitted += 1
    assert admitted == 170
    assert decision.reason is RefusalReason.ENCODERS
    assert "busy 10%, 86% projected with one more stream, limit 85%" in decision.message
    ctl.release()                                     # one ends: room for one
    assert ctl.admit().ok and not ctl.admit().ok
    assert EncoderLoad(busy=0.0, held_per_audio_s=None, workers=2).projected(5) is None
    # Streams still building their runway need it encoded at once: they count startup_extra
    # more. None registered with the scheduler yet, so all of them are starting: 1.5 x 10 ms.
    starting = Readings()
    starting.encoders = EncoderLoad(busy=0.0, held_per_audio_s=0.01, workers=1)
    ctl = make(starting, max_streams=1000, startup_extra=0.5)
    admitted = 0
    while ctl.admit().ok:
        admitted += 1
    assert admitted == 56                             # 57 x 1.5 x 1% = 85.5% > 85%
    # 1.0 turns the check off, projections beyond 100% included.
    r.encoders = EncoderLoad(busy=1.0, held_per_audio_s=1.0, workers=1)
    assert make(r, max_streams=1000, max_encode_busy=1.0).admit().ok


# --------------------------------------------------------------------------- VRAM


def test_vram_admits_when_free_minus_reserve_covers_the_stream_cost() -> None:
    r = Readings()
    ctl = make(r)
    ctl.set_stream_vram_cost(100 * MIB)
    r.gpu = FakeGpu(vram_free_bytes=(512 + 100) * MIB)  # exactly enough
    assert ctl.admit().ok


def test_vram_refuses_when_free_minus_reserve_is_below_the_stream_cost() -> None:
    r = Readings()
    ctl = make(r)
    ctl.set_stream_vram_cost(100 * MIB)
    r.gpu = FakeGpu(vram_free_bytes=(512 + 100) * MIB - 1)
    decision = ctl.admit()
    assert decision == Admission(ok=False, reason=RefusalReason.VRAM, retry_after_s=3,
                                 message=decision.message)
    assert "GPU memory" in decision.message and "100 MiB needed" in decision.message
    assert ctl.active_streams == 0
    r.gpu = FakeGpu(vram_free_bytes=8000 * MIB)  # memory came back: admitted again
    assert ctl.admit().ok


def test_vram_charges_streams_admitted_since_the_reading() -> None:
    # Readings come from the GPU sampler about once a second, and a new stream allocates only
    # at its first step: a burst between two readings must not all see the same free memory.
    r = Readings()
    ctl = make(r)
    ctl.set_stream_vram_cost(100 * MIB)
    r.gpu = FakeGpu(vram_free_bytes=(512 + 250) * MIB)     # room for two
    assert ctl.admit().ok and ctl.admit().ok
    decision = ctl.admit()
    assert decision.reason is RefusalReason.VRAM
    assert "2 stream(s) admitted since the last reading" in decision.message
    # The next reading shows what they took; judged from there on.
    r.gpu = FakeGpu(vram_free_bytes=(512 + 150) * MIB)
    assert ctl.admit().ok
    assert ctl.admit().reason is RefusalReason.VRAM
    # Streams that end are credited by the next reading, not before.
    ctl.release()
    ctl.release()
    assert ctl.admit().reason is RefusalReason.VRAM
    r.gpu = FakeGpu(vram_free_bytes=(512 + 350) * MIB)
    assert ctl.admit().ok and ctl.admit().ok and ctl.admit().ok
    assert ctl.admit().reason is RefusalReason.VRAM


def test_vram_charges_streams_opened_since_the_reading_without_a_slot() -> None:
    # A back end (server/split.py) holds no slots: the front ends do. It decides each stream
    # they open with `check` and charges it with `charge`, so streams opened between two GPU
    # readings are not all judged by the same free memory.
    r = Readings()
    config = AdmissionConfig(max_streams=100, vram_reserve_mb=512)
    ctl = AdmissionController(config, load_source=r.read_load, gpu_reader=r.read_gpu)
    ctl.set_stream_vram_cost(100 * MIB)
    r.gpu = FakeGpu(vram_free_bytes=(512 + 250) * MIB)     # room for two
    for _ in range(2):
        assert ctl.check(count=False).ok
        ctl.charge()
    decision = ctl.check(count=False)
    assert decision.reason is RefusalReason.VRAM and ctl.active_streams == 0
    assert "(50 MiB free beyond the reserve and 2 stream(s) admitted since the last reading" \
        in decision.message
    r.gpu = FakeGpu(vram_free_bytes=(512 + 250) * MIB)     # a new reading: they are in it
    assert ctl.check(count=False).ok


def test_vram_is_not_checked_before_the_cost_is_measured_or_without_a_reading() -> None:
    r = Readings()
    r.gpu = FakeGpu(vram_free_bytes=0)
    ctl = make(r)
    assert ctl.admit().ok  # warm-up has not measured the per-stream cost yet
    ctl.set_stream_vram_cost(100 * MIB)
    assert ctl.admit().reason is RefusalReason.VRAM
    r.gpu = None  # NVML returned nothing this time: do not refuse on missing data
    assert ctl.admit().ok


def test_cpu_server_without_gpu_reader_never_refuses_for_vram() -> None:
    ctl = make(Readings(), gpu=False)
    ctl.set_stream_vram_cost(10**12)
    assert ctl.admit().ok


def test_negative_vram_cost_is_a_bug() -> None:
    with pytest.raises(ValueError):
        make(Readings()).set_stream_vram_cost(-1)


# --------------------------------------------------------------------------- load


def test_load_admits_up_to_max_load_and_refuses_beyond() -> None:
    r = Readings()
    ctl = make(r, max_load=0.85)
    # 7.5 audio s/s demanded of a measured 10: one more real-time stream makes exactly 85 %.
    r.load = LoadEstimate(active_streams=8, demand_audio_s_per_s=7.5, capacity_audio_s_per_s=10)
    assert ctl.check().ok
    r.load = LoadEstimate(active_streams=8, demand_audio_s_per_s=7.6, capacity_audio_s_per_s=10)
    decision = ctl.check()
    assert (decision.ok, decision.reason, decision.retry_after_s) == (False, RefusalReason.LOAD, 3)
    assert "86%" in decision.message


def test_an_idle_server_admits_one_stream_whatever_its_cost_estimate_says() -> None:
    # A cost measured while the host stalled: not even one stream would fit. Refusing it would
    # be for good, since only finished streams correct the estimate.
    r = Readings()
    ctl = make(r, max_load=0.75)
    r.load = LoadEstimate(active_streams=0, demand_audio_s_per_s=0.0, capacity_audio_s_per_s=0.5)
    assert ctl.admit().ok
    assert ctl.admit().reason is RefusalReason.LOAD     # the second is judged as usual
    r.load = LoadEstimate(active_streams=1, demand_audio_s_per_s=1.0, capacity_audio_s_per_s=0.5)
    ctl.release()
    assert ctl.admit().reason is RefusalReason.LOAD     # the scheduler still has one: not idle


def test_load_is_not_checked_before_capacity_is_measured() -> None:
    r = Readings()
    ctl = make(r, max_load=0.5)
    r.load = LoadEstimate(active_streams=0, demand_audio_s_per_s=50, capacity_audio_s_per_s=None)
    assert ctl.check().ok
    assert r.load.utilisation is None


def test_streams_admitted_but_unseen_by_the_scheduler_count_as_load() -> None:
    r = Readings()
    ctl = make(r, max_load=1.0)
    # The scheduler has not registered any of them yet; capacity for exactly four streams.
    r.load = LoadEstimate(active_streams=0, demand_audio_s_per_s=0, capacity_audio_s_per_s=4)
    assert [ctl.admit().ok for _ in range(5)] == [True, True, True, True, False]
    assert ctl.active_streams == 4


def test_streams_building_a_runway_count_more_than_real_time() -> None:
    r = Readings()
    ctl = make(r, max_load=1.0, startup_extra=0.5)
    # Capacity for exactly 6 real-time streams. 3 speak with a runway; with the new one at 1.5,
    # one more starting stream (1.5) would make 6.0: admitted. Two starting ones: 6.5, refused.
    r.load = LoadEstimate(active_streams=4, demand_audio_s_per_s=4, capacity_audio_s_per_s=6,
                          starting_streams=1)
    assert ctl.check().ok
    r.load = LoadEstimate(active_streams=4, demand_audio_s_per_s=4, capacity_audio_s_per_s=6,
                          starting_streams=2)
    decision = ctl.check()
    assert (decision.ok, decision.reason) == (False, RefusalReason.LOAD)
    assert "108%" in decision.message
    # Once everyone holds a runway, the same four streams leave room for one more.
    r.load = LoadEstimate(active_streams=4, demand_audio_s_per_s=4, capacity_audio_s_per_s=6)
    assert ctl.check().ok


def test_a_refusal_only_the_start_up_surcharge_caused_suggests_a_short_retry() -> None:
    r = Readings()
    ctl = make(r, max_load=1.0, startup_extra=0.5)
    # Capacity for 4 real-time streams; 3 live, one of them starting. One more fits at real
    # time (4 of 4) but not with the surcharge (4 + 2 x 0.5): refused, and room comes back as
    # soon as the starting ones hold a runway, so the hint is 1 s, not retry_after_s (3).
    r.load = LoadEstimate(active_streams=3, demand_audio_s_per_s=3, capacity_audio_s_per_s=4,
                          starting_streams=1)
    decision = ctl.check()
    assert (decision.ok, decision.reason, decision.retry_after_s) == (False, RefusalReason.LOAD, 1)
    # With 4 live, one more would not fit even at real time: only an ending stream makes room.
    r.load = LoadEstimate(active_streams=4, demand_audio_s_per_s=4, capacity_audio_s_per_s=4,
                          starting_streams=1)
    decision = ctl.check()
    assert (decision.ok, decision.reason, decision.retry_after_s) == (False, RefusalReason.LOAD, 3)


def test_retry_hints_are_spread_so_a_refused_burst_does_not_come_back_at_once() -> None:
    config = AdmissionConfig(max_streams=1, retry_after_s=3, retry_jitter_s=2)
    ctl = AdmissionController(config, load_source=lambda: IDLE, rng=random.Random(7))
    assert ctl.admit().ok
    hints = Counter(ctl.check().retry_after_s for _ in range(300))
    # Whole seconds from 3 to 5, each of them used (roughly a third each).
    assert set(hints) == {3, 4, 5} and min(hints.values()) > 60
    # Hints not tied to a decision (shutting down, still loading) are spread the same way.
    assert {ctl.retry_hint() for _ in range(100)} == {3, 4, 5}
    assert {ctl.retry_hint(frees_soon=True) for _ in range(100)} == {1, 2, 3}


def test_a_burst_admits_fewer_than_the_same_streams_arriving_one_by_one() -> None:
    r = Readings()
    ctl = make(r, max_load=1.0, startup_extra=0.25)
    # A burst: every admitted stream is still unseen by the scheduler, so each one is starting.
    r.load = LoadEstimate(active_streams=0, demand_audio_s_per_s=0, capacity_audio_s_per_s=10)
    burst = sum(ctl.admit().ok for _ in range(12))
    assert burst == 8          # 8 x 1.25 = 10
    # The same capacity when the others already hold their runway: 10 in all.
    r2 = Readings()
    one_by_one = make(r2, max_load=1.0, startup_extra=0.25)
    admitted = 0
    for _ in range(12):
        r2.load = LoadEstimate(active_streams=admitted, demand_audio_s_per_s=admitted,
                               capacity_audio_s_per_s=10)
        admitted += one_by_one.admit().ok
    assert admitted == 9       # 9 + 1.25 = 10.25 > 10 for the tenth: it is starting


def test_utilisation_fraction() -> None:
    est = LoadEstimate(active_streams=3, demand_audio_s_per_s=3, capacity_audio_s_per_s=12)
    assert est.utilisation == 0.25


# --------------------------------------------------------------------------- max_streams


def test_max_streams_refuses_the_next_stream_until_one_is_released() -> None:
    ctl = make(Readings(), max_streams=2)
    assert ctl.admit().ok and ctl.admit().ok
    decision = ctl.admit()
    assert (decision.ok, decision.reason, decision.retry_after_s) == (
        False, RefusalReason.MAX_STREAMS, 3)
    assert "2 concurrent streams" in decision.message
    ctl.release()
    assert ctl.admit().ok
    assert ctl.admitted_total == 3


def test_check_holds_no_slot() -> None:
    ctl = make(Readings(), max_streams=1)
    assert ctl.check().ok and ctl.check().ok
    assert ctl.active_streams == 0


def test_release_without_admit_does_not_go_negative() -> None:
    ctl = make(Readings(), max_streams=1)
    ctl.release()
    assert ctl.active_streams == 0
    assert ctl.admit().ok and not ctl.admit().ok


# --------------------------------------------------------------------------- reporting


def test_admitted_streams_carry_no_retry_hint() -> None:
    decision = make(Readings()).admit()
    assert decision == Admission(ok=True, reason=None, retry_after_s=None)


def test_refusals_are_counted_by_reason_and_reported() -> None:
    r = Readings()
    seen: list[RefusalReason] = []
    config = AdmissionConfig(max_streams=1, retry_after_s=5, retry_jitter_s=0)
    ctl = AdmissionController(config, load_source=r.read_load, gpu_reader=r.read_gpu,
                              on_refused=seen.append)
    ctl.set_stream_vram_cost(MIB)
    r.gpu = FakeGpu(vram_free_bytes=0)
    assert ctl.admit().reason is RefusalReason.VRAM
    r.gpu = None
    assert ctl.admit().ok
    assert ctl.check().retry_after_s == 5
    assert ctl.refused_counts() == {RefusalReason.MAX_STREAMS: 1, RefusalReason.VRAM: 1,
                                    RefusalReason.LOAD: 0, RefusalReason.EVENT_LOOP: 0,
                                    RefusalReason.ENCODERS: 0, RefusalReason.SOCKETS: 0,
                                    RefusalReason.NOT_READY: 0, RefusalReason.SHUTTING_DOWN: 0,
                                    RefusalReason.START_RATE: 0}
    assert seen == [RefusalReason.VRAM, RefusalReason.MAX_STREAMS]
    ctl.count_refusal(RefusalReason.SOCKETS)      # decided before the upgrade (server/http.py)
    assert ctl.refused_counts()[RefusalReason.SOCKETS] == 1 and seen[-1] is RefusalReason.SOCKETS


def test_a_refusal_never_reads_as_at_its_limit() -> None:
    # "projected load 75%, limit 75%" read as a contradiction: the digits that tell them apart.
    assert _above(0.7531, 0.75) == "75.3%"
    assert _above(0.75004, 0.75) == "75.004%"
    assert _above(0.9, 0.85) == "90%"
