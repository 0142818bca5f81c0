"""The soak benchmark's own checks: what it calls a broken contract, and its memory trend.
(It runs against the real server in tests/test_server.py.)"""

import pytest

from benchmarks.soak import FRAME_MS, StreamCheck, Violation, slope_per_hour


def audio(seq: int, pts_ms: float, packets: int = 2) -> dict:
    return {"type": "audio", "seq": seq, "pts_ms": pts_ms, "data": [b"x"] * packets}


def test_a_contiguous_stream_passes_and_counts_its_audio():
    check = StreamCheck("s")
    for k in range(5):
        check.audio(audio(k, k * 2 * FRAME_MS))
    assert check.done({"audio_ms": 5 * 2 * FRAME_MS - 13.5}) == 200.0   # the last frame padded


@pytest.mark.parametrize("msg, why", [
    (audio(1, 40.0), "seq 1, expected 2"),          # a message lost
    (audio(2, 60.0), "timeline gap"),               # pts jumps ahead
    (audio(2, 20.0), "timeline gap"),               # pts overlaps
])
def test_a_broken_timeline_is_a_violation(msg, why):
    check = StreamCheck("s")
    check.audio(audio(0, 0.0))
    check.audio(audio(1, 40.0))
    with pytest.raises(Violation, match=why):
        check.audio(msg)


def test_audio_after_cancelled_is_a_violation():
    check = StreamCheck("s")
    check.audio(audio(0, 0.0))
    check.cancelled = True
    with pytest.raises(Violation, match="after cancelled"):
        check.audio(audio(1, 40.0))


def test_cancelled_must_carry_the_usage_of_the_stream_it_stopped():
    check = StreamCheck("s")
    for k in range(4):
        check.audio(audio(k, k * 40.0))   # 160 ms received
    check.on_cancelled({"audio_ms": 400}, finished=False)   # more was made than sent: fine
    for usage, finished, why in [(None, False, "usage None"), ({"audio_ms": 0}, True, "after done"),
                                 ({"audio_ms": 100}, False, "says 100 ms")]:
        with pytest.raises(Violation, match=why):
            StreamCheck("s", received_ms=160.0).on_cancelled(usage, finished=finished)
    StreamCheck("s").on_cancelled(None, finished=True)


@pytest.mark.parametrize("audio_ms", [100.0, 200.0])   # more than 2 frames short / more than sent
def test_done_must_account_for_the_audio_received(audio_ms):
    check = StreamCheck("s")
    for k in range(4):
        check.audio(audio(k, k * 40.0))   # 160 ms received
    with pytest.raises(Violation, match="done says"):
        check.done({"audio_ms": audio_ms})


def test_the_memory_trend_is_a_least_squares_slope_per_hour():
    points = [(t, 500.0 + 0.01 * t + (1 if t % 20 else -1)) for t in range(0, 600, 10)]
    assert slope_per_hour(points) == pytest.approx(36.0, rel=0.05)       # 0.01 MB/s
    assert slope_per_hour([(0, 1.0), (10, 1.0), (20, 1.0)]) == 0.0
    assert slope_per_hour([(0, 1.0), (10, 2.0)]) is None                 # too few to tell
