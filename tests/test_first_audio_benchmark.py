"""`benchmarks/first_audio.py`: first audio taken apart stage by stage, against the real server.

Its stages must cover the whole wait a client sees, in order, or the figures it gives for where
first audio goes (BENCHMARKS.md) would be fiction."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from benchmarks.first_audio import first_sound_ms, STAGES, breakdown, nearest_rank
from benchmarks.load import send_text

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_stages_of_real_streams_add_up_to_the_wait_the_client_saw() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "first_audio.py"), "--runs", "2", "--words",
         "8", "--pause-s", "0.2", "--port", str(free_port()), "--json"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["runs"] == 2 and len(report["per_run_ms"]) == 2
    # Of two runs the 95th percentile by nearest rank is the slower one.
    assert report["p95_ms"] == report["max_ms"]
    for run in report["per_run_ms"]:
        assert all(run[k] >= 0 for k in STAGES), run
        parts = sum(run[k] for k in STAGES if k not in ("ttfa", "first_word", "first_sound"))
        assert parts == pytest.approx(run["ttfa"], abs=0.5)     # each stage is rounded to 0.1
        assert run["acoustic"] > 1 and run["first_decode"] > 1  # the model really ran
        # The voice's lead-in is cut to scheduler.lead_in_ms (20 ms: 2 frames, 23.2 ms) before
        # its first sound, give or take the 5 ms windows sound is found in and the rounding of
        # both figures to 0.1 ms (a CI run read 90.4 - 67.1). The first word starts where its
        # sound does, to a frame (11.6 ms) and the 5 ms windows; by the durations alone it
        # started 4-5 frames after its "Th" sounded.
        assert 0 <= run["first_sound"] - run["ttfa"] <= 23.2 + 5 + 0.15, run
        assert 0 <= run["first_word"] - run["ttfa"], run
        assert abs(run["first_word"] - run["first_sound"]) <= 11.61 + 5 + 0.15, run


def test_the_95th_percentile_is_a_measured_value_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 81)]          # 80 runs, as in BENCHMARKS.md
    assert nearest_rank(values, 0.95) == 76.0
    assert nearest_rank(values, 0.5) == 40.0
    assert nearest_rank([7.0], 0.95) == 7.0


def test_first_sound_is_found_in_the_decoded_opus_less_the_codecs_delay() -> None:
    opuslib = pytest.importorskip("opuslib")
    encoder = opuslib.Encoder(48000, 1, opuslib.APPLICATION_VOIP)
    t = np.arange(48000) / 48000
    audio = np.where(t >= 0.1, 0.1 * np.sin(2 * np.pi * 440 * t), 0.0)   # sound from 100 ms
    pcm = (audio * 32767).astype("<i2").tobytes()
    packets = [encoder.encode(pcm[i:i + 1920], 960) for i in range(0, len(pcm), 1920)]
    assert first_sound_ms(packets) == pytest.approx(100, abs=5)
    assert first_sound_ms(packets[:4]) is None          # 80 ms of silence: no sound


def test_a_run_is_cut_at_the_first_step_and_encoding_after_the_text() -> None:
    events = [(0.5, "acoustic+"), (0.6, "acoustic-"), (0.7, "step-"), (0.8, "encode-"),  # before
              (1.002, "acoustic+"), (1.050, "acoustic-"), (1.070, "step-"),
              (1.072, "encode+"), (1.075, "encode-"), (1.090, "acoustic+")]
    stages = breakdown(events, sent=1.0, first=1.080, first_word_ms=20.0, first_sound_ms=12.0)
    assert stages == pytest.approx({"text_to_model": 2.0, "acoustic": 48.0, "first_decode": 20.0,
                                    "encode": 5.0, "deliver": 5.0, "ttfa": 80.0,
                                    "first_word": 100.0, "first_sound": 92.0})
    with pytest.raises(RuntimeError, match="no model step"):
        breakdown(events[:4], sent=1.0, first=1.080, first_word_ms=20.0, first_sound_ms=12.0)


class RecordingSocket:
    def __init__(self) -> None:
        self.sent: list[tuple[float, dict]] = []

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append((time.monotonic(), msgpack.unpackb(data)))


async def test_text_at_a_pace_goes_word_by_word_then_end() -> None:
    ws = RecordingSocket()
    await send_text(ws, "a", "one two three four".split(), wps=20.0)
    assert [m.get("text") for _, m in ws.sent] == ["one ", "two ", "three ", "four ", None]
    assert ws.sent[-1][1]["type"] == "end"
    gaps = [b - a for (a, _), (b, _) in zip(ws.sent, ws.sent[1:-1])]
    assert all(g >= 0.045 for g in gaps), gaps       # 50 ms apart (asyncio may wake ~1 ms early)
    at_once = RecordingSocket()
    await send_text(at_once, "a", ["one", "two"], wps=0.0)
    assert [m for _, m in at_once.sent] == [{"type": "text", "ctx": "a", "text": "one two"},
                                            {"type": "end", "ctx": "a"}]
