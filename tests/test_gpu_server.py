"""The server end to end on a CUDA GPU: the GPU profile (`configs/gpu.toml`: half precision,
CUDA graphs, NVML) loaded, warmed up and measured for real, streams batched on the GPU, metered
with the GPU's own energy counter, and a stream refused because VRAM really ran short.

Every test here is marked `cuda` and skipped where `torch.cuda.is_available()` is False (see
`tests/conftest.py`); `scripts/device_check.sh` runs them on the device machine. The same checks
against a CPU server with injected GPU readings live in `tests/test_server.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import torch
from prometheus_client.parser import text_string_to_metric_families

from server.admission import MIB
from tests.helpers.app import (Running, check_opus_decodes, check_phrases_before_audio,
                               check_timeline, clean, connect, running, wait_for)
from tests.helpers.ws_client import ProtocolClient, Utterance

pytestmark = [pytest.mark.cuda, pytest.mark.asyncio(loop_scope="module")]

GPU_PROFILE = Path(__file__).resolve().parents[1] / "configs" / "gpu.toml"
STREAMS = 8
TEXT = ("This sentence is long enough to keep the voice busy for several seconds, so that "
        "there is plenty of audio still to come. And then another one follows it.")
# The GPU profile with batches of at most STREAMS (warm-up, the VRAM measurement and the CUDA
# graphs at batch sizes up to 64 would take most of the device tool's time), a tariff, and
# GPU readings every 0.1 s so that the tests see memory change quickly.
OVERRIDES = {
    "engine.max_batch": STREAMS, "scheduler.max_batch_phrases": STREAMS,
    "scheduler.max_batch_chunks": STREAMS, "admission.cost_probe_streams": STREAMS,
    "admission.vram_reserve_mb": 512, "metrics.sample_interval_s": 0.1,
    "metering.price_per_kwh": 0.30, "metering.price_per_gpu_hour": 2.00,
}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gpu_srv() -> AsyncIterator[Running]:
    async with running(None, OVERRIDES, config_path=GPU_PROFILE, warm_up=True,
                       ready_timeout=300) as r:
        await wait_for(lambda: r.state.gpu_sample is not None, what="a first NVML reading")
        yield r


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _metrics(r: Running, http: aiohttp.ClientSession) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    async with http.get(r.url("/metrics")) as resp:
        text = await resp.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _fresh_reading(r: Running) -> None:
    """Wait for a GPU reading taken after now: the second new one (the first may have been
    under way already)."""
    for _ in range(2):
        seen = r.state.gpu_sample
        await wait_for(lambda: r.state.gpu_sample is not seen, what="a new GPU reading")


async def _hold_until_short(r: Running, held: list[torch.Tensor], *, short_of: int) -> None:
    """Allocate GPU memory (kept in `held`, in 2 MiB pages) until the sampler's NVML reading
    shows less than `short_of` bytes free: each time enough to leave a quarter of a stream's
    cost below it. NVML and CUDA may count free memory a little differently, hence the loop,
    bounded by CUDA's own figure."""
    engine = r.state.model.engine
    assert engine is not None
    for _ in range(4):
        await _fresh_reading(r)
        free = r.state.gpu_sample.vram_free_bytes
        if free < short_of:
            return
        cuda_free, _ = torch.cuda.mem_get_info(engine.device)
        want = free - short_of + (r.state.admission.stream_vram_cost or 0) // 4 + 2 * MIB
        take = min(-(-want // (2 * MIB)) * (2 * MIB), cuda_free - 64 * MIB)
        assert take > 0, f"NVML says {free} bytes free, CUDA {cuda_free}: cannot take {want}"
        held.append(torch.empty(take, dtype=torch.uint8, device=engine.device))
        torch.cuda.synchronize(engine.device)
    raise AssertionError(f"the NVML reading stayed at {r.state.gpu_sample.vram_free_bytes} bytes"
                         f" free or more, above {short_of}")


async def test_the_gpu_profile_loads_warms_up_and_reports_the_gpu(
    gpu_srv: Running, http: aiohttp.ClientSession,
) -> None:
    engine = gpu_srv.state.model.engine
    assert engine is not None and engine.device.type == "cuda"
    assert engine.dtype == torch.float16
    cost = gpu_srv.state.admission.stream_vram_cost
    assert cost is not None and 0 < cost < 2 << 30, cost   # measured at warm-up, per stream
    free_b, total_b = torch.cuda.mem_get_info(engine.device)
    async with http.get(gpu_srv.url("/v1/status")) as resp:
        status = await resp.json()
    # NVML's figures for the card CUDA computes on (not another GPU of the host).
    assert status["vram_total_bytes"] == pytest.approx(total_b, rel=0.05)
    assert 0 < status["vram_used_bytes"] < status["vram_total_bytes"]
    assert status["gpu_power_w"] is not None and status["gpu_power_w"] > 0
    samples = await _metrics(gpu_srv, http)
    pressure = samples[("tts_gpu_vram_pressure_ratio", ())]
    assert 0 < pressure < 1 and pressure == pytest.approx(1 - free_b / total_b, abs=0.05)
    assert samples[("tts_gpu_power_watts", ())] > 0
    assert 0 < samples[("tts_gpu_temperature_celsius", ())] < 120


async def test_concurrent_streams_batch_on_the_gpu_decode_and_are_metered(
    gpu_srv: Running, http: aiohttp.ClientSession,
) -> None:
    before = await _metrics(gpu_srv, http)
    clients = [await connect(http, gpu_srv) for _ in range(STREAMS)]

    async def speak(client: ProtocolClient) -> Utterance:
        return await client.speak(TEXT, timeout=120)

    utterances = await asyncio.gather(*(speak(c) for c in clients))
    for u in utterances:
        assert u.errors == [] and u.cancelled is None and u.done is not None, u.errors
        check_phrases_before_audio(u, sample_rate=48000)
        total_ms = check_timeline(u, sample_rate=48000)
        phrases_ms = sum(p["end_ms"] - p["start_ms"] for p in u.phrases)
        assert abs(total_ms - phrases_ms) <= 60
        check_opus_decodes(u)
        usage = u.done["usage"]
        assert usage["chars"] == len(TEXT) and usage["audio_ms"] > 3000
        assert 0 < usage["compute_ms"] < usage["audio_ms"]
        # The GPU's energy, its share to this stream, and a price for it.
        assert usage["energy_j"] is not None and usage["energy_j"] > 0
        assert usage["cost"] is not None and usage["cost"] > 0
    for c in clients:
        await c.close()
    await clean(gpu_srv)
    after = await _metrics(gpu_srv, http)
    # Streams shared model calls: some decode step carried more than one chunk.
    key_count = ("tts_batch_size_count", (("stage", "decode"),))
    key_ones = ("tts_batch_size_bucket", (("le", "1.0"), ("stage", "decode")))
    calls = after[key_count] - before.get(key_count, 0.0)
    singles = after[key_ones] - before.get(key_ones, 0.0)
    assert calls > 0 and singles < calls, (calls, singles)
    assert after[("tts_energy_joules_total", ())] > before.get(("tts_energy_joules_total", ()), 0)


async def test_a_stream_is_refused_while_vram_really_runs_short(
    gpu_srv: Running, http: aiohttp.ClientSession,
) -> None:
    state = gpu_srv.state
    cost = state.admission.stream_vram_cost
    assert cost and state.gpu_sample is not None
    refused_key = ("tts_streams_refused_total", (("reason", "vram"),))
    refused_before = (await _metrics(gpu_srv, http)).get(refused_key, 0.0)
    reserve = state.cfg.admission.vram_reserve_mb * MIB
    held: list[torch.Tensor] = []
    try:
        await _hold_until_short(gpu_srv, held, short_of=reserve + cost)
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await connect(http, gpu_srv)
        assert info.value.status == 503
        assert info.value.headers is not None and int(info.value.headers["Retry-After"]) >= 1
        samples = await _metrics(gpu_srv, http)
        assert samples[refused_key] == refused_before + 1
    finally:
        held.clear()
        torch.cuda.empty_cache()
    await _fresh_reading(gpu_srv)
    assert state.gpu_sample.vram_free_bytes - reserve >= cost
    client = await connect(http, gpu_srv)   # memory came back: admitted again
    u = await client.speak("Memory is free again.")
    assert u.errors == [] and u.done is not None
    await client.close()
    await clean(gpu_srv)
