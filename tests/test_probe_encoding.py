"""Warm-up's cost probe has its audio encoded the way a live stream's is (`ProbeEncoding`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from server.config import load_config
from server.encoders import EncoderPool
from server.model import ProbeEncoding
from streaming_tts.voices import VoiceRegistry


class RecordingEncoder:
    """Records what it encodes, in which thread, and whether two threads ever used it at once."""

    in_rate = 1000

    def __init__(self, fail_at: int | None = None) -> None:
        self.chunks: list[int] = []
        self.threads: set[str] = set()
        self.overlapped = False
        self._busy = False
        self._fail_at = fail_at

    def encode(self, samples: np.ndarray) -> list[bytes]:
        if self._busy:
            self.overlapped = True
        self._busy = True
        try:
            if len(self.chunks) == self._fail_at:
                raise RuntimeError("encoder broke")
            time.sleep(0.002)  # long enough for a second thread to walk in, were it allowed
            self.threads.add(threading.current_thread().name)
            self.chunks.append(int(samples[0]))
            return []
        finally:
            self._busy = False


@pytest.fixture
def pool() -> Iterator[EncoderPool]:
    pool = EncoderPool(3)
    yield pool
    pool.shutdown()


def feed(probe: ProbeEncoding, copies: int, chunks: int) -> None:
    """What the probe does from the model thread: chunk k of every copy, then chunk k + 1."""
    for k in range(chunks):
        for copy in range(copies):
            probe.on_audio(copy, np.full(10, float(k), np.float32))


def own_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("cost-probe")]


async def test_each_copys_chunks_are_encoded_in_order_in_the_encoder_threads(pool) -> None:
    encoders: list[RecordingEncoder] = []

    def make() -> RecordingEncoder:
        encoders.append(RecordingEncoder())
        return encoders[-1]

    probe = ProbeEncoding(asyncio.get_running_loop(), pool, make)  # type: ignore[arg-type]
    model_thread = threading.Thread(target=feed, args=(probe, 4, 12))
    model_thread.start()
    await asyncio.to_thread(model_thread.join)
    await probe.close()
    assert len(encoders) == 4   # one encoder per copy, as one per stream
    for enc in encoders:
        assert enc.chunks == list(range(12)) and not enc.overlapped
        assert all(name.startswith("tts-audio") for name in enc.threads)
    assert not own_tasks()


async def test_a_real_opus_encoder_meters_its_cpu_time(pool) -> None:
    voice = VoiceRegistry().default()
    probe = ProbeEncoding.for_config(load_config(), voice, pool)
    rng = np.random.default_rng(0)
    for _ in range(5):   # 5 x 0.5 s of noise at the voice's rate
        probe.on_audio(0, rng.uniform(-0.5, 0.5, voice.sample_rate // 2).astype(np.float32))
    await probe.close()
    assert 0.0 < probe.encoded_s < 2.5


async def test_a_failing_encoder_stops_its_copy_only(pool, caplog) -> None:
    encoders = [RecordingEncoder(fail_at=3), RecordingEncoder()]
    probe = ProbeEncoding(asyncio.get_running_loop(), pool, iter(encoders).__next__)  # type: ignore[arg-type]
    feed(probe, 2, 8)
    await probe.close()
    assert encoders[0].chunks == [0, 1, 2] and encoders[1].chunks == list(range(8))
    assert "cost probe: encoding failed" in caplog.text
    assert not own_tasks()


async def test_cancelled_it_leaves_no_task_and_ignores_later_audio(pool) -> None:
    encoders: list[RecordingEncoder] = []
    probe = ProbeEncoding(asyncio.get_running_loop(), pool,
                          lambda: encoders.append(RecordingEncoder()) or encoders[-1])  # type: ignore[arg-type]
    feed(probe, 2, 3)
    await asyncio.sleep(0)     # the hand-overs reach the loop; tasks start
    assert len(own_tasks()) == 2
    await probe.cancel()
    assert not own_tasks()
    feed(probe, 3, 2)          # a probe left running by a cancelled start-up
    await asyncio.sleep(0.05)
    assert not own_tasks() and len(encoders) <= 2


async def test_the_cost_probe_benchmark_measures_both_ways_with_the_servers_code(tmp_path) -> None:
    # benchmarks/cost_probe.py: the real voice, warmed up as the server does (for batches of
    # up to 2 chunks only, to keep this short), one probe each way.
    import argparse

    from benchmarks.cost_probe import measure

    config = tmp_path / "small.toml"
    config.write_text("[scheduler]\nmax_batch_chunks = 2\nmax_batch_phrases = 2\n")
    report = await measure(argparse.Namespace(rounds=1, runs=1, config=str(config)))
    assert report["device"] == "cpu" and report["streams"] == 1 and report["encode_threads"] == 2
    for mode in ("alone", "encoded"):
        assert len(report[mode]) == 1 and 0.001 < report[f"{mode}_median"] < 5.0
