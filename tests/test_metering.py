"""Metering splits each step fairly and prices it; the GPU monitor works without a GPU."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

import streaming_tts.gpu as gpu_module
from streaming_tts.gpu import GpuMonitor, GpuSample
from streaming_tts.metering import Meter, StreamMeter, Tariff

USAGE_FIELDS = {"chars", "phrases", "audio_ms", "compute_ms", "energy_j", "cost", "ttfa_ms"}


def meter_with(*stream_ids: str, tariff: Tariff | None = None) -> Meter:
    meter = Meter(tariff)
    for sid in stream_ids:
        meter.open(sid)
    return meter


# --- splitting a step -----------------------------------------------------------------------


def test_step_time_and_energy_split_in_proportion_to_work() -> None:
    meter = meter_with("a", "b")
    meter.record_batch(0.2, {"a": 30, "b": 10}, power_w=300.0)  # 60 J in all
    a, b = meter.usage("a"), meter.usage("b")
    assert a["compute_ms"] == 150.0 and b["compute_ms"] == 50.0
    assert a["energy_j"] == 45.0 and b["energy_j"] == 15.0


@given(
    units=st.lists(st.one_of(st.just(0.0), st.floats(0.01, 1e4)), min_size=1, max_size=8),
    step=st.floats(1e-4, 5.0),
    power=st.floats(1.0, 1000.0),
)
def test_shares_of_one_step_add_up_to_the_whole_step(
    units: list[float], step: float, power: float
) -> None:
    ids = [f"s{i}" for i in range(len(units))]
    meter = meter_with(*ids)
    meter.record_batch(step, dict(zip(ids, units, strict=True)), power_w=power)
    streams = [meter.open(sid) for sid in ids]  # open is idempotent: returns the live meter
    assert sum(m.compute_ms for m in streams) == pytest.approx(step * 1000, rel=1e-9)
    assert sum(m.energy_j or 0.0 for m in streams) == pytest.approx(step * power, rel=1e-9)


def test_energy_is_none_without_power_data() -> None:
    meter = meter_with("a")
    meter.record_batch(0.1, {"a": 1}, power_w=None)
    usage = meter.usage("a")
    assert usage["energy_j"] is None and usage["compute_ms"] == 100.0


def test_stream_closed_mid_step_is_not_billed_and_not_resurrected() -> None:
    meter = meter_with("a", "b")
    meter.close("b")
    meter.record_batch(0.1, {"a": 1, "b": 1}, power_w=100.0)
    assert meter.usage("a")["compute_ms"] == 50.0  # still only its own share
    assert "b" not in meter and len(meter) == 1
    assert meter.totals().compute_s == pytest.approx(0.1)
    assert meter.totals().energy_j == pytest.approx(10.0)


def test_bad_step_numbers_raise_and_bad_power_is_ignored() -> None:
    meter = meter_with("a")
    with pytest.raises(ValueError):
        meter.record_batch(-1.0, {"a": 1}, None)
    with pytest.raises(ValueError):
        meter.record_batch(0.1, {"a": -1}, None)
    meter.record_batch(0.1, {"a": 1}, power_w=float("nan"))
    assert meter.usage("a")["energy_j"] is None


# --- cost -----------------------------------------------------------------------------------


def test_cost_is_none_without_tariff() -> None:
    meter = meter_with("a")
    meter.record_batch(1.0, {"a": 1}, power_w=200.0)
    assert meter.usage("a")["cost"] is None
    assert StreamMeter(compute_ms=1000.0).cost(Tariff()) is None  # tariff with no prices


def test_cost_arithmetic_with_both_prices() -> None:
    # 3600 s at 250 W = 0.25 kWh; 1 GPU hour.
    meter = meter_with("a", tariff=Tariff(price_per_kwh=0.40, price_per_gpu_hour=2.0))
    meter.record_batch(3600.0, {"a": 5}, power_w=250.0)
    assert meter.usage("a")["cost"] == pytest.approx(0.25 * 0.40 + 1.0 * 2.0)


def test_cost_uses_the_known_part_only() -> None:
    used = StreamMeter(compute_ms=1_800_000.0, energy_j=None)  # half an hour, no power data
    assert used.cost(Tariff(price_per_gpu_hour=3.0)) == pytest.approx(1.5)
    assert used.cost(Tariff(price_per_kwh=0.3)) is None  # energy part needs energy
    assert used.cost(Tariff(price_per_kwh=0.3, price_per_gpu_hour=3.0)) == pytest.approx(1.5)
    powered = StreamMeter(energy_j=7.2e6)  # 2 kWh
    assert powered.cost(Tariff(price_per_kwh=0.25)) == pytest.approx(0.5)


def test_tariff_rejects_negative_price() -> None:
    with pytest.raises(ValueError):
        Tariff(price_per_kwh=-0.1)


# --- counters and lifecycle -----------------------------------------------------------------


def test_usage_has_exactly_the_protocol_fields_and_counts() -> None:
    meter = meter_with("a", tariff=Tariff(price_per_gpu_hour=2.0))
    meter.add_text("a", 5, now=10.0)
    meter.add_text("a", 7, now=10.5)
    meter.add_phrase("a")
    meter.add_audio("a", 0.0, now=10.1)  # empty payload does not count as first audio
    meter.add_audio("a", 240.0, now=10.25)
    meter.add_audio("a", 260.4, now=10.9)
    meter.record_batch(0.0123456, {"a": 3}, power_w=None)
    usage = meter.usage("a")
    assert set(usage) == USAGE_FIELDS
    assert usage["chars"] == 12 and usage["phrases"] == 1 and usage["audio_ms"] == 500
    assert usage["ttfa_ms"] == 250.0  # first text -> first audio
    assert usage["compute_ms"] == 12.3 and usage["energy_j"] is None
    assert usage["cost"] == pytest.approx(0.0123456 / 3600 * 2.0, rel=1e-5)


def test_close_forgets_the_stream_and_returns_final_usage() -> None:
    meter = meter_with("a")
    meter.add_text("a", 3)
    final = meter.close("a")
    assert final is not None and final["chars"] == 3
    assert "a" not in meter and len(meter) == 0
    with pytest.raises(KeyError):
        meter.usage("a")
    meter.add_text("a", 3)  # late update after close: ignored, no leak
    assert len(meter) == 0 and meter.close("a") is None


# --- GPU monitor ----------------------------------------------------------------------------

GIB = 1 << 30


def reading(power_w: float | None, used_gib: int = 10) -> GpuSample:
    return GpuSample(
        vram_used_bytes=used_gib * GIB,
        vram_total_bytes=80 * GIB,
        vram_free_bytes=(80 - used_gib) * GIB,
        util_percent=50.0,
        power_w=power_w,
        temperature_c=60.0,
    )


def test_gpu_monitor_without_gpu_reports_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monitor = GpuMonitor(index=0)  # no NVIDIA driver on CI: must not raise
    try:
        if monitor.available:
            pytest.skip("a GPU is present on this machine")
        assert monitor.sample() is None and monitor.energy_j() is None
    finally:
        monitor.close()
    monitor.close()  # idempotent


def test_fake_gpu_monitor_returns_readings_then_repeats_last() -> None:
    monitor = GpuMonitor.fake([reading(100.0, used_gib=10), reading(100.0, used_gib=20)])
    assert monitor.available
    assert [monitor.sample().vram_used_bytes for _ in range(3)] == [10 * GIB, 20 * GIB, 20 * GIB]
    monitor.close()
    assert not monitor.available and monitor.sample() is None


def test_energy_integrates_power_over_time_without_energy_counter() -> None:
    times = iter([0.0, 1.0, 3.0])
    monitor = GpuMonitor.fake(
        [reading(100.0), reading(200.0), reading(200.0)], clock=lambda: next(times)
    )
    monitor.sample()  # t=0, 100 W
    monitor.sample()  # t=1, 200 W -> 150 J
    assert monitor.energy_j() == pytest.approx(150.0 + 400.0)  # t=3, 200 W -> +400 J


def test_energy_is_none_when_gpu_reports_no_power() -> None:
    monitor = GpuMonitor.fake(reading(None))
    assert monitor.sample().power_w is None and monitor.energy_j() is None


def test_reader_can_be_injected_directly() -> None:
    monitor = GpuMonitor(reader=lambda: reading(50.0, used_gib=1))
    assert monitor.sample().vram_free_bytes == 79 * GIB


class FakeNvml:
    """Stands in for pynvml: a GPU with an energy counter but no temperature sensor."""

    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.energy_mj = 5_000_000
        self.shutdowns = 0

    def nvmlInit(self) -> None: ...

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return b"Fake H100"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(used=30 * GIB, total=80 * GIB, free=50 * GIB)

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:
        return SimpleNamespace(gpu=77, memory=10)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 312_500  # mW

    def nvmlDeviceGetTemperature(self, handle: str, sensor: int) -> int:
        raise self.NVMLError("Not Supported")

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        return self.energy_mj


def test_nvml_path_reads_fields_and_energy_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setattr(gpu_module, "pynvml", nvml)
    with GpuMonitor(index=1) as monitor:
        assert monitor.available and monitor.name == "Fake H100"
        sample = monitor.sample()
        assert sample == GpuSample(30 * GIB, 80 * GIB, 50 * GIB, 77.0, 312.5, None)
        nvml.energy_mj += 1500
        assert monitor.energy_j() == pytest.approx(1.5)  # since the monitor started
    assert nvml.shutdowns == 1 and not monitor.available


class MigNvml(FakeNvml):
    """A host whose GPUs NVML finds by UUID: a whole GPU and a MIG slice of another."""

    def __init__(self) -> None:
        super().__init__()
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        if uuid in ("GPU-aaaa", "MIG-bbbb"):
            return uuid
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetName(self, handle: str) -> str:
        return f"device {handle}"


def test_the_monitor_reads_the_gpu_cuda_computes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML counts GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES: "cuda:1" is often not
    # NVML's GPU 1. The monitor finds the GPU by the UUID CUDA reports, a MIG slice included.
    nvml = MigNvml()
    monkeypatch.setattr(gpu_module, "pynvml", nvml)
    uuids = {"cuda:0": "aaaa", "cuda:1": "bbbb", "cuda:2": "cccc"}
    monkeypatch.setattr(gpu_module, "_cuda_uuid", lambda device: uuids[device])
    whole, mig = GpuMonitor.for_device("cuda:0"), GpuMonitor.for_device("cuda:1")
    assert whole.available and whole.name == "device GPU-aaaa"
    assert mig.available and mig.name == "device MIG-bbbb"
    lost = GpuMonitor.for_device("cuda:2")       # NVML does not know it: no readings, no crash
    assert not lost.available and lost.sample() is None and lost.energy_j() is None
    # A CPU engine has no GPU to monitor: NVML is not even opened.
    before = nvml.inits
    assert GpuMonitor.for_device("cpu") is None and nvml.inits == before
