"""Recorded decodes (streaming_tts/cuda_graphs.py).

On CPU a recorder that reruns the work into a fixed output buffer stands in for CUDA's, so the
bookkeeping is checked everywhere: batch padding, the static buffers, phrase-edge masks computed
from tensors, falling back to eager decoding, and dropping recordings that disagree with the
eager decoder. The test marked cuda records real CUDA graphs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.config import ConfigError, EngineConfig as ServedEngineConfig
from streaming_tts.cuda_graphs import batch_buckets
from streaming_tts.engine import AcousticJob, DecodeJob, Engine, EngineConfig, SynthesisParams
from streaming_tts.models.loader import load_vits
from streaming_tts.voices import default_voice_path

from .test_engine import make_ids

MODEL = default_voice_path()
SCHEDULE = (16, 48, 96)


class Rerun:
    """A recording that reruns its work into the output buffer of the first run."""

    def __init__(self, work):
        self.work = work
        self.out = work()

    def replay(self) -> None:
        self.out.copy_(self.work())


def rerun_recorder(work):
    rec = Rerun(work)
    return rec, rec.out


class Stale(Rerun):
    """A broken recording: replays leave the output of the capture run (inputs never read)."""

    def replay(self) -> None:
        pass


def stale_recorder(work):
    rec = Stale(work)
    return rec, rec.out


@pytest.fixture(scope="module")
def model():
    return load_vits(MODEL)


def new_engine(model, device: str = "cpu", dtype: str = "float32", **kw) -> Engine:
    return Engine(model, sample_rate=22050,
                  config=EngineConfig(device=device, dtype=dtype, chunk_schedule=SCHEDULE, **kw))


@pytest.fixture(scope="module")
def phrases(model):
    eng = new_engine(model)
    return [eng.acoustic([AcousticJob(make_ids(n, seed=n), SynthesisParams(), seed=n)])[0]
            for n in (4, 25, 60)]


def jobs_for(engine: Engine, phrases, batch: int) -> list[DecodeJob]:
    """`batch` decode jobs over the phrases' chunk plans: first chunks (window reaching before
    the phrase), middle chunks, last chunks (short, padded, reaching past the end)."""
    ranges = [(r, a, b) for r in phrases for a, b in engine.chunk_plan(r.num_frames)]
    return [DecodeJob(r.z, a, b) for r, a, b in (ranges[i % len(ranges)] for i in range(batch))]


def test_batch_buckets_pad_by_at_most_half() -> None:
    assert batch_buckets(64) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert batch_buckets(1) == (1,)
    assert batch_buckets(5) == (1, 2, 3, 4, 5)
    assert batch_buckets(8) == (1, 2, 3, 4, 6, 8)
    sizes = batch_buckets(200)
    for n in range(1, 200):
        assert min(s for s in sizes if s >= n) <= max(n * 3 // 2, n + 1)
    with pytest.raises(ValueError):
        batch_buckets(0)


def test_tensor_bounds_decode_exactly_like_list_bounds(model) -> None:
    # The recorded decoder masks from [B] tensors; the eager one from lists (and skips the masks
    # for windows that are all phrase). Same audio, to the bit.
    ctx = model.dec.context_frames
    torch.manual_seed(0)
    z = torch.randn(3, model.hp.inter, 16 + 2 * ctx)
    lo, hi = [0, 5, 0], [z.shape[2], z.shape[2], 20]
    keep = (ctx, ctx + 16)
    with torch.inference_mode():
        ragged = model.decode(z, lo, hi, keep)
        assert torch.equal(ragged, model.decode(z, torch.tensor(lo), torch.tensor(hi), keep))
        full = [z.shape[2]] * 3
        assert torch.equal(model.decode(z, [0] * 3, full, keep),
                           model.decode(z, torch.zeros(3, dtype=torch.long), torch.tensor(full), keep))


def test_recorded_decodes_equal_eager_ones_at_every_batch_size(model, phrases) -> None:
    eager = new_engine(model)
    recorded = new_engine(model)
    graphs = recorded.capture_graphs(max_batch=6, recorder=rerun_recorder)
    assert graphs.shapes == [(s, b) for s in recorded.buckets for b in (1, 2, 3, 4, 6)]
    for batch in (1, 2, 5, 6, 7, 14):
        jobs = jobs_for(eager, phrases, batch)
        before = graphs.replays
        got, want = recorded.decode(jobs), eager.decode(jobs)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert np.abs(g - w).max() <= 1e-5
        # Jobs are batched by chunk size: a group of up to 6 replays its recording (5 padded
        # to 6), a larger group (a step's first chunks and continuing chunks together) replays
        # the largest recording in pieces, never falling back to the eager decoder.
        groups: dict[int, int] = {}
        for j in jobs:
            size = eager.bucket(j.end - j.start)
            groups[size] = groups.get(size, 0) + 1
        assert graphs.replays - before == sum(-(-n // 6) for n in groups.values())
    assert max(groups.values()) > 6             # some group needed pieces


def test_verification_drops_recordings_that_disagree_and_those_shapes_decode_eagerly(
        model, phrases, caplog) -> None:
    eager, broken = new_engine(model), new_engine(model)
    graphs = broken.capture_graphs(max_batch=2, recorder=stale_recorder)
    assert len(graphs) == 0                      # every stale recording was caught
    assert "differs from the eager decoder" in caplog.text
    jobs = jobs_for(eager, phrases, 2)
    before = graphs.replays
    for g, w in zip(broken.decode(jobs), eager.decode(jobs)):
        assert np.abs(g - w).max() <= 1e-6
    assert graphs.replays == before


def test_a_failed_recording_leaves_the_decoder_eager(model, phrases, caplog) -> None:
    recorded = []

    def failing(work):
        if recorded:
            raise RuntimeError("operation not permitted when stream is capturing")
        recorded.append(1)
        return rerun_recorder(work)

    eager, engine = new_engine(model), new_engine(model)
    assert engine.capture_graphs(max_batch=2, recorder=failing) is None
    assert engine.graphs is None
    assert "could not record the decoder as CUDA graphs" in caplog.text
    jobs = jobs_for(eager, phrases, 2)
    for g, w in zip(engine.decode(jobs), eager.decode(jobs)):
        assert np.abs(g - w).max() <= 1e-6


def test_cuda_graphs_need_a_cuda_device(model) -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        new_engine(model, cuda_graphs=True)
    with pytest.raises(ConfigError, match="engine.cuda_graphs"):
        ServedEngineConfig(device="cpu", cuda_graphs=True)
    assert ServedEngineConfig(device="cuda", dtype="float16", cuda_graphs=True).cuda_graphs


@pytest.mark.cuda
def test_cuda_graphs_replay_what_the_eager_decoder_computes() -> None:
    eager = new_engine(load_vits(MODEL), device="cuda", dtype="float16")
    recorded = new_engine(load_vits(MODEL), device="cuda", dtype="float16", cuda_graphs=True)
    recorded.warmup(max_batch=8)                 # records, verifies, then replays every shape
    graphs = recorded.graphs
    assert graphs is not None
    assert graphs.shapes == [(s, b) for s in recorded.buckets for b in batch_buckets(8)]
    on_gpu = [AcousticJob(make_ids(n, seed=n), SynthesisParams(), seed=n) for n in (4, 25, 60)]
    res = eager.acoustic(on_gpu)
    before = graphs.replays
    # Sizes interleaved, so every replay follows another shape's (one shared memory pool).
    for batch in (1, 3, 8, 5, 2, 8):
        jobs = jobs_for(eager, res, batch)
        for g, w in zip(recorded.decode(jobs), eager.decode(jobs)):
            assert np.abs(g - w).max() <= 2e-2
    assert graphs.replays > before
