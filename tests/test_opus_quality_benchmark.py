"""The Opus quality benchmark's round trip: its scores are only as good as the alignment of the
decoded audio with its reference."""

import numpy as np
import pytest

from benchmarks.opus_quality import OUT_RATE, round_trip

RATE = 22050


def speechlike(seconds: float = 1.5) -> np.ndarray:
    """A voiced buzz (harmonics of a pitch gliding from 100 Hz up) under a syllable envelope.
    The glide matters: a steady pitch would correlate with itself one period away."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(100 + 80 * t) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 * (1 - np.cos(2 * np.pi * 3 * t))
    return (0.2 * voiced * envelope).astype(np.float32)


def lag_of(decoded: np.ndarray, reference: np.ndarray, span: int = 200) -> int:
    """The shift (samples) that best lines `decoded` up with `reference`."""
    n = len(reference) - 2 * span
    scores = [float(np.dot(decoded[span + d: span + d + n], reference[span: span + n]))
              for d in range(-span, span + 1)]
    return int(np.argmax(scores)) - span


def test_the_decoded_stream_is_aligned_with_its_reference_and_as_long() -> None:
    speech = speechlike()
    reference, decoded, cpu = round_trip(speech, RATE, complexity=10, bitrate=64000, chunk=1000)
    assert len(reference) == len(decoded) == pytest.approx(len(speech) * OUT_RATE / RATE, abs=2)
    assert cpu > 0
    # The encoder's lookahead (312 samples) is dropped: what lag is left is Opus's own phase
    # (it does not keep the waveform; measured 1-6 samples, 0.1 ms, over bitrates).
    assert abs(lag_of(decoded, reference)) <= 8
    assert np.corrcoef(decoded, reference)[0, 1] > 0.8   # and it is the same sound


def test_pesq_scores_the_codec_below_the_clean_reference() -> None:
    pytest.importorskip("pesq", reason="optional: the benchmark's PESQ (pip install pesq)")
    from benchmarks.opus_quality import pesq_wb

    speech = speechlike(3.0)
    reference, decoded, _ = round_trip(speech, RATE, complexity=5, bitrate=16000, chunk=1000)
    clean = pesq_wb(reference, reference)
    assert clean > 4.5 and pesq_wb(reference, decoded) < clean
