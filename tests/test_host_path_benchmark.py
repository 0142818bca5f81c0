"""The host-path benchmark's stand-in model and its CPU accounting: its figures (server CPU per
audio second, by thread) are only as good as these."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.host_path import FRAMES_PER_ID, ReplayEngine, _cpu_by_thread, _group, refused_counts
from server.metrics import Metrics
from streaming_tts.engine import AcousticJob, DecodeJob, Engine, EngineConfig, SynthesisParams


@pytest.fixture(scope="module")
def replay(default_voice) -> ReplayEngine:
    real = Engine.from_file(default_voice.onnx_path, sample_rate=default_voice.sample_rate,
                            config=EngineConfig(chunk_schedule=(16, 64, 128)))
    recording = np.sin(np.arange(5000, dtype=np.float32) / 7.0)
    return ReplayEngine(real, recording, latent_channels=192)


def test_replay_engine_keeps_the_real_engines_shapes_and_answers_with_the_recording(replay):
    ids = list(range(1, 42))
    [res] = replay.acoustic([AcousticJob(ids=ids, params=SynthesisParams(), head_only=True)])
    assert res.complete and res.num_frames == res.z.shape[1] == int(res.durations.sum())
    assert res.num_frames == pytest.approx(len(ids) * np.mean(FRAMES_PER_ID), abs=1)
    plan = replay.chunk_plan(res.num_frames)
    # The real engine's chunk schedule (a rest under TAIL_MERGE_FRAMES joins the last chunk).
    assert plan[0] == (0, 16) and plan[1][0] == 16 and plan[1][1] >= 80
    hop = replay.hop_length
    audio = replay.decode([DecodeJob(z=res.z, start=a, end=b) for a, b in plan])
    assert [len(x) for x in audio] == [(b - a) * hop for a, b in plan]
    # Real samples of the recording (wrapping round it), never silence or made-up noise.
    second = audio[1]
    expected = np.take(replay._recording, np.arange(len(second)) + 16 * hop, mode="wrap")
    np.testing.assert_array_equal(second, expected)


def test_cpu_time_is_read_per_thread_and_grouped_by_thread_name():
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    worker = threading.Thread(target=spin, name="tts-audio_0")
    worker.start()
    try:
        before = _cpu_by_thread(os.getpid())
        time.sleep(0.3)
        after = _cpu_by_thread(os.getpid())
    finally:
        stop.set()
        worker.join()
    tid = str(worker.native_id)
    assert after[tid] - before.get(tid, 0.0) > 0.05          # a busy thread shows its CPU time
    names = {tid: worker.name, "7": "tts-model_0", "8": "Thread-3", "9": "tts-text_0"}
    assert _group(tid, os.getpid(), names) == "audio_encode"
    assert _group(str(os.getpid()), os.getpid(), names) == "event_loop"
    assert _group("7", os.getpid(), names) == "model_thread"
    assert _group("8", os.getpid(), names) == "other"
    assert _group("9", os.getpid(), names) == "text_thread"


def test_refusals_are_read_by_reason_from_the_metrics_text():
    metrics = Metrics()
    metrics.streams_refused.labels(reason="encoders").inc(3)
    metrics.streams_refused.labels(reason="load").inc()
    counts = refused_counts(metrics.render().decode())
    assert counts["encoders"] == 3 and counts["load"] == 1 and counts["vram"] == 0


def test_the_scheduler_alone_runs_with_the_gpu_profile_on_a_cpu():
    # The documented `--scheduler-only --config configs/gpu.toml` run failed here once the
    # profile turned CUDA graphs on ("engine.cuda_graphs needs a cuda device").
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "benchmarks/host_path.py", "--scheduler-only", "--streams", "3",
         "--words", "8", "--stagger-ms", "10", "--config", "configs/gpu.toml", "--json"],
        cwd=root, capture_output=True, text=True, timeout=300, check=True)
    [report] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert report["streams"] == 3 and report["audio_s"] > 3 and report["late_steps"] == 0
    assert report["cpu_ms_per_audio_s"]["event_loop"] > 0
    assert report["cpu_ms_per_audio_s"].get("other", 0) == 0   # every thread known by name


def test_a_server_split_over_processes_is_measured_per_process(tmp_path):
    # `--front-ends 2`: the back end and its two front ends, each process's CPU on its own.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "benchmarks/host_path.py", "--front-ends", "2", "--streams", "4",
         "--words", "8", "--stagger-ms", "10", "--format", "pcm_s16le", "--port", str(port),
         "--server-log", str(tmp_path / "server.log"), "--json"],
        cwd=root, capture_output=True, text=True, timeout=300, check=True)
    [report] = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert report["admitted"] == 4 and report["audio_s"] > 4
    cpu = report["cpu_ms_per_audio_s"]
    assert set(cpu) == {"back_end_event_loop", "back_end_threads", "front_end_1_event_loop",
                        "front_end_1_threads", "front_end_2_event_loop", "front_end_2_threads"}
    assert cpu["back_end_event_loop"] > 0 and cpu["back_end_threads"] > 0
    assert cpu["front_end_1_event_loop"] + cpu["front_end_2_event_loop"] > 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()
