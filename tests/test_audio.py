"""Audio path: streaming resampling equals one-shot, Opus packets decode back to the input."""

from __future__ import annotations

import numpy as np
import opuslib
import pytest
import soxr

from streaming_tts.audio import (
    OPUS_RATES,
    OpusStreamEncoder,
    PcmStreamEncoder,
    StreamResampler,
    float_to_s16le,
    make_encoder,
)

VOICE_RATE = 22050


def sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(
        np.float32
    )


def odd_pieces(x: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """Split into random sizes 1..3000, the way model chunks arrive (never frame-aligned)."""
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(rng.integers(1, 3000, size=len(x)))
    cuts = cuts[cuts < len(x)]
    return np.split(x, cuts)


def decode_opus(packets: list[bytes], rate: int) -> np.ndarray:
    decoder = opuslib.Decoder(rate, 1)
    frame = rate // 50
    return np.concatenate(
        [np.frombuffer(decoder.decode_float(p, frame), np.float32) for p in packets]
    )


def encode_all(enc, pieces: list[np.ndarray]) -> list[bytes]:
    packets: list[bytes] = []
    for piece in pieces:
        packets += enc.encode(piece)
    return packets + enc.finish()


# --- resampler ------------------------------------------------------------------------------


@pytest.mark.parametrize("out_rate", [8000, 16000, 24000, 44100, 48000])
def test_streaming_resample_matches_one_shot(out_rate: int) -> None:
    x = np.random.default_rng(1).standard_normal(VOICE_RATE + 1001).astype(np.float32) * 0.3
    rs = StreamResampler(VOICE_RATE, out_rate)
    out = [rs.process(p) for p in odd_pieces(x)] + [rs.process(np.zeros(0, np.float32), last=True)]
    streamed = np.concatenate(out)
    one_shot = soxr.resample(x, VOICE_RATE, out_rate, quality="HQ")
    assert len(streamed) == len(one_shot) == round(len(x) * out_rate / VOICE_RATE)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)


def test_resampler_identity_passes_through_and_does_not_alias() -> None:
    rs = StreamResampler(VOICE_RATE, VOICE_RATE)
    x = sine(440, 0.1, VOICE_RATE)
    y = rs.process(x)
    assert rs.identity and np.array_equal(x, y)
    x[:] = 0  # caller reuses its buffer
    assert np.any(y != 0)


def test_resampler_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        StreamResampler(0, 48000)
    with pytest.raises(ValueError):
        StreamResampler(VOICE_RATE, 48000).process(np.zeros((2, 10), np.float32))
    rs = StreamResampler(VOICE_RATE, 48000)
    rs.process(np.zeros(10, np.float32), last=True)
    with pytest.raises(RuntimeError):
        rs.process(np.zeros(10, np.float32))


# --- opus -----------------------------------------------------------------------------------


def test_opus_two_seconds_of_sine_decodes_back() -> None:
    enc = OpusStreamEncoder(in_rate=VOICE_RATE, out_rate=48000)
    packets = encode_all(enc, [sine(440, 2.0, VOICE_RATE)])
    assert abs(len(packets) - 100) <= 1
    assert enc.frames_out == len(packets)
    assert enc.duration_ms_out == 20 * len(packets)
    decoded = decode_opus(packets, 48000)
    assert len(decoded) == 960 * len(packets)
    assert best_sine_correlation(decoded, 440, 48000, enc.lookahead) > 0.98
    assert dominant_frequency(decoded, 48000) == pytest.approx(440, abs=2)


def best_sine_correlation(y: np.ndarray, freq: float, rate: int, delay: int) -> float:
    """Correlation with the reference sine, searched within one period around the codec delay
    (SILK may shift phase slightly, so the exact lookahead is not always the best lag)."""
    ref = np.sin(2 * np.pi * freq * np.arange(len(y)) / rate)
    lo, hi = rate // 10, len(y) - rate // 10 - 2 * delay  # skip codec start-up and the tail
    period = int(rate / freq) + 1
    return max(
        float(np.corrcoef(y[lag + lo : lag + hi], ref[lo:hi])[0, 1])
        for lag in range(max(0, delay - period), delay + period)
    )


def dominant_frequency(y: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spectrum)) * rate / len(y)


def test_opus_odd_pieces_give_same_packet_count_and_timeline() -> None:
    x = sine(440, 2.0, VOICE_RATE)
    whole = encode_all(OpusStreamEncoder(in_rate=VOICE_RATE, out_rate=48000), [x])
    enc = OpusStreamEncoder(in_rate=VOICE_RATE, out_rate=48000)
    pts: list[float] = []
    packets: list[bytes] = []
    for piece in odd_pieces(x, seed=7):
        start = enc.duration_ms_out  # pts of the first packet this call returns
        new = enc.encode(piece)
        pts += [start + 20 * i for i in range(len(new))]
        packets += new
    start = enc.duration_ms_out
    tail = enc.finish()
    pts += [start + 20 * i for i in range(len(tail))]
    packets += tail
    assert len(packets) == len(whole)
    assert pts == [20.0 * i for i in range(len(packets))]  # gap-free, contiguous


@pytest.mark.parametrize("rate", OPUS_RATES)
def test_opus_every_protocol_rate_works(rate: int) -> None:
    enc = OpusStreamEncoder(in_rate=VOICE_RATE, out_rate=rate, bitrate=24000)
    packets = encode_all(enc, odd_pieces(sine(440, 1.0, VOICE_RATE)))
    assert abs(len(packets) - 50) <= 1
    decoded = decode_opus(packets, rate)
    assert len(decoded) == len(packets) * rate // 50
    assert dominant_frequency(decoded, rate) == pytest.approx(440, abs=3)


def test_opus_finish_pads_partial_frame_and_empty_stream_sends_nothing() -> None:
    exact = OpusStreamEncoder(in_rate=48000, out_rate=48000, flush_delay=False)
    assert exact.encode(np.full(900, 0.1, np.float32)) == []  # under one 960-sample frame
    assert len(exact.finish()) == 1 and exact.duration_ms_out == 20
    # With the codec delay flushed, the last 900 real samples need 900 + 312 -> two frames.
    flushed = OpusStreamEncoder(in_rate=48000, out_rate=48000)
    assert len(flushed.encode(np.full(900, 0.1, np.float32)) + flushed.finish()) == 2
    empty = OpusStreamEncoder(in_rate=VOICE_RATE, out_rate=48000)
    assert empty.finish() == [] and empty.duration_ms_out == 0


def test_opus_survives_nan_and_clipping() -> None:
    x = sine(440, 0.2, VOICE_RATE, amp=3.0)
    x[100:200] = np.nan
    packets = encode_all(OpusStreamEncoder(in_rate=VOICE_RATE, out_rate=48000), [x])
    assert np.all(np.isfinite(decode_opus(packets, 48000)))


@pytest.mark.parametrize(
    "kwargs",
    [{"out_rate": 44100}, {"out_rate": 22050}, {"bitrate": 100}, {"complexity": 11}],
)
def test_opus_invalid_settings_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        OpusStreamEncoder(in_rate=VOICE_RATE, **kwargs)


def test_encoder_refuses_use_after_finish() -> None:
    enc = OpusStreamEncoder(in_rate=VOICE_RATE, out_rate=48000)
    enc.finish()
    with pytest.raises(RuntimeError):
        enc.encode(np.zeros(10, np.float32))


# --- pcm ------------------------------------------------------------------------------------


def test_pcm_native_rate_exact_values() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 1 / 32767 * 0.6, np.nan], np.float32)
    enc = PcmStreamEncoder(in_rate=VOICE_RATE, out_rate=VOICE_RATE)
    data = enc.encode(x) + enc.finish()
    values = np.frombuffer(data, "<i2")
    assert values.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767, 1, 0]
    assert enc.samples_out == len(x)
    assert enc.duration_ms_out == pytest.approx(len(x) * 1000 / VOICE_RATE)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 48000])
def test_pcm_resampled_exact_length(rate: int) -> None:
    x = sine(440, 1.3, VOICE_RATE)
    enc = PcmStreamEncoder(in_rate=VOICE_RATE, out_rate=rate)
    data = b"".join(enc.encode(p) for p in odd_pieces(x)) + enc.finish()
    values = np.frombuffer(data, "<i2").astype(np.float32) / 32767
    expected = soxr.resample(x, VOICE_RATE, rate, quality="HQ")
    assert len(values) == len(expected) == round(len(x) * rate / VOICE_RATE)
    np.testing.assert_allclose(values, expected, atol=1.5 / 32767)
    assert enc.duration_ms_out == pytest.approx(1300, abs=1000 / rate)


def test_pcm_invalid_rate_raises() -> None:
    with pytest.raises(ValueError):
        PcmStreamEncoder(in_rate=VOICE_RATE, out_rate=44100)


def test_float_to_s16le_rounds_to_nearest() -> None:
    x = np.array([0.4 / 32767, 0.6 / 32767, -0.6 / 32767], np.float32)
    assert np.frombuffer(float_to_s16le(x), "<i2").tolist() == [0, 1, -1]


def test_make_encoder_picks_format() -> None:
    assert make_encoder("opus", in_rate=VOICE_RATE, out_rate=24000).frame_ms == 20
    assert make_encoder("pcm_s16le", in_rate=VOICE_RATE, out_rate=VOICE_RATE).frame_ms is None
    with pytest.raises(ValueError):
        make_encoder("mp3", in_rate=VOICE_RATE, out_rate=48000)
