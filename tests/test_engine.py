"""The PyTorch VITS engine against the reference runtime, and its streaming guarantees."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from streaming_tts.engine import (TAIL_MERGE_FRAMES, AcousticJob, DecodeJob, Engine, EngineConfig,
                                  SynthesisParams)
from streaming_tts.models.loader import load_vits
from streaming_tts.models.onnx_weights import VoiceFormatError
from streaming_tts.models.text_encoder import _band_to_square, _square_to_band
from streaming_tts.models.vits import VitsModel
from streaming_tts.voices import default_voice_path

MODEL = default_voice_path()   # the voice package's, or $STREAMING_TTS_DEFAULT_VOICE
SILENT = SynthesisParams(noise_scale=0.0, noise_w=0.0)


def make_ids(n_phonemes: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    ids = [1, 0]
    for p in rng.integers(14, 150, n_phonemes):
        ids += [int(p), 0]
    return ids + [2]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_file(MODEL, sample_rate=22050, config=EngineConfig())


def snr_db(ref: np.ndarray, out: np.ndarray) -> float:
    err = out - ref
    return float(10 * np.log10(np.sum(ref ** 2) / max(np.sum(err ** 2), 1e-30)))


@pytest.mark.parametrize("n_phonemes", [5, 40, 90])
def test_matches_onnxruntime_reference(engine: Engine, n_phonemes: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    ids = make_ids(n_phonemes, seed=n_phonemes)
    sess = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"input": np.array([ids], dtype=np.int64),
                          "input_lengths": np.array([len(ids)], dtype=np.int64),
                          "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32)})[0].reshape(-1)
    out = engine.synthesize(ids, SILENT)
    assert len(out) == len(ref)
    assert snr_db(ref, out) >= 40.0


def test_length_scale_stretches_audio(engine: Engine) -> None:
    ids = make_ids(30, seed=1)
    normal = engine.synthesize(ids, SILENT)
    slow = engine.synthesize(ids, SynthesisParams(noise_scale=0.0, noise_w=0.0, length_scale=1.5))
    # ceil() of short pad durations keeps the ratio a little under the scale.
    assert 1.25 < len(slow) / len(normal) < 1.6


@pytest.mark.parametrize("schedule", [(16, 48, 96), (1, 2, 3), (7,), (500,), (5, 64)])
@pytest.mark.parametrize("n_phonemes", [2, 25, 70])
def test_chunked_decode_equals_whole(engine: Engine, schedule, n_phonemes: int) -> None:
    res = engine.acoustic([AcousticJob(make_ids(n_phonemes, seed=7), SynthesisParams(), seed=11)])[0]
    whole = engine.decode_whole(res.z)
    eng = Engine(engine.model, sample_rate=22050, config=EngineConfig(chunk_schedule=schedule))
    plan = eng.chunk_plan(res.num_frames)
    assert plan[0][0] == 0 and plan[-1][1] == res.num_frames
    chunks = eng.decode([DecodeJob(res.z, a, b) for a, b in plan])
    stitched = np.concatenate(chunks)
    assert len(stitched) == res.num_frames * eng.hop_length
    assert np.abs(stitched - whole).max() <= 1e-4


@pytest.mark.parametrize("first", [0, 1, 2, 7])
@pytest.mark.parametrize("bucket_step", [0, 8, 24])
def test_plans_starting_later_and_finer_buckets_still_equal_whole(engine: Engine, first: int,
                                                                  bucket_step: int) -> None:
    res = engine.acoustic([AcousticJob(make_ids(40, seed=8), SynthesisParams(), seed=3)])[0]
    whole = engine.decode_whole(res.z)
    eng = Engine(engine.model, sample_rate=22050,
                 config=EngineConfig(chunk_schedule=(12, 24, 48), bucket_step=bucket_step))
    plan = eng.chunk_plan(res.num_frames, first=first)
    sizes = [b - a for a, b in plan]
    # The plan starts at schedule[first] (clamped to the last size), and grows from there.
    assert sizes[0] == min(res.num_frames, (12, 24, 48)[min(first, 2)])
    assert plan[-1][1] == res.num_frames
    stitched = np.concatenate(eng.decode([DecodeJob(res.z, a, b) for a, b in plan]))
    assert np.abs(stitched - whole).max() <= 1e-4


def test_buckets_and_schedule_positions(engine: Engine) -> None:
    def make(step: int) -> Engine:
        return Engine(engine.model, sample_rate=22050,
                      config=EngineConfig(chunk_schedule=(24, 48, 96), bucket_step=step))
    coarse, fine = make(0), make(24)
    assert coarse.buckets == (24, 48, 96) and fine.buckets == (24, 48, 72, 96)
    # A 50-frame tail pads to 96 with schedule sizes only, to 72 with a 24-frame step.
    assert coarse.bucket(50) == 96 and fine.bucket(50) == 72
    # The largest scheduled chunk no longer than the listener's buffer.
    assert [fine.schedule_index_for(f) for f in (0, 23, 24, 47, 48, 95, 96, 500)] == [0, 0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="bucket_step"):
        make(-1)


def test_a_short_rest_of_a_phrase_joins_the_chunk_before_it(engine: Engine) -> None:
    eng = Engine(engine.model, sample_rate=22050,
                 config=EngineConfig(chunk_schedule=(24, 64, 128, 256), bucket_step=32))
    assert TAIL_MERGE_FRAMES == 32
    # 10 frames left after the second chunk: one decode of 74 frames, not 64 and then 10.
    assert eng.chunk_plan(98) == [(0, 24), (24, 98)]
    assert eng.chunk_plan(128) == [(0, 24), (24, 88), (88, 128)]   # 40 left: a chunk of its own
    # The first chunk of the schedule stays as it is (a head-only flow holds only its window).
    assert eng.chunk_plan(30) == [(0, 24), (24, 30)]
    # A plan that starts further along merges from its first chunk on.
    assert eng.chunk_plan(80, first=1) == [(0, 80)]
    assert eng.chunk_plan(98, first=1) == [(0, 64), (64, 98)]
    # Never past the largest decode shape warmed up (a new kernel shape costs its first call).
    assert eng.chunk_plan(24 + 64 + 128 + 256 + 20)[-2:] == [(216, 472), (472, 492)]
    # The audio is the same either way.
    res = engine.acoustic([AcousticJob(make_ids(20, seed=5), SynthesisParams(), seed=2)])[0]
    plan = eng.chunk_plan(res.num_frames, first=1)
    stitched = np.concatenate(eng.decode([DecodeJob(res.z, a, b) for a, b in plan]))
    assert np.abs(stitched - engine.decode_whole(res.z)).max() <= 1e-4


def test_padded_batch_equals_items_alone(engine: Engine) -> None:
    jobs = [AcousticJob(make_ids(n, seed=n), SILENT) for n in (3, 50, 20)]
    batched = engine.acoustic(jobs)
    for job, res in zip(jobs, batched):
        alone = engine.acoustic([job])[0]
        assert alone.num_frames == res.num_frames
        np.testing.assert_array_equal(alone.durations, res.durations)
        assert torch.allclose(alone.z, res.z, atol=1e-4)
    # Decode chunks of different phrases and positions in one batch.
    dec_jobs = [DecodeJob(r.z, max(0, r.num_frames - 30), r.num_frames) for r in batched]
    dec_jobs += [DecodeJob(batched[1].z, 10, 26)]
    together = engine.decode(dec_jobs)
    for job, audio in zip(dec_jobs, together):
        alone = engine.decode([job])[0]
        assert np.abs(alone - audio).max() <= 1e-4


def test_noise_is_drawn_once_per_phrase_from_its_seed(engine: Engine) -> None:
    ids = make_ids(30, seed=3)
    a = engine.acoustic([AcousticJob(ids, SynthesisParams(), seed=5)])[0]
    b = engine.acoustic([AcousticJob(make_ids(10, seed=1), SynthesisParams(), seed=9),
                         AcousticJob(ids, SynthesisParams(), seed=5)])[1]
    c = engine.acoustic([AcousticJob(ids, SynthesisParams(), seed=6)])[0]
    # Same seed, same phrase: the same speech whatever else shares the batch.
    assert a.num_frames == b.num_frames and np.array_equal(a.durations, b.durations)
    assert torch.allclose(a.z, b.z, atol=1e-3)
    assert a.num_frames != c.num_frames or not torch.allclose(a.z, c.z, atol=1e-3)


def test_deterministic_without_noise(engine: Engine) -> None:
    ids = make_ids(20, seed=2)
    assert np.array_equal(engine.synthesize(ids, SILENT), engine.synthesize(ids, SILENT))


def test_durations_sum_to_frames(engine: Engine) -> None:
    ids = make_ids(20, seed=4)
    res = engine.acoustic([AcousticJob(ids, SynthesisParams(), seed=1)])[0]
    assert res.durations.shape == (len(ids),)
    assert int(res.durations.sum()) == res.num_frames
    assert res.z.shape == (192, res.num_frames)


def test_context_covers_measured_receptive_field(engine: Engine) -> None:
    """Perturb one latent frame: audio changes only within the computed context."""
    res = engine.acoustic([AcousticJob(make_ids(60, seed=8), SILENT)])[0]
    z2 = res.z.clone()
    mid = res.num_frames // 2
    z2[:, mid] += 1.0
    diff = np.abs(engine.decode_whole(z2) - engine.decode_whole(res.z)).reshape(-1, engine.hop_length)
    changed = np.nonzero(diff.max(axis=1) > 1e-6)[0]
    reach = max(mid - changed.min(), changed.max() - mid)
    assert reach <= engine.context_frames
    assert reach >= engine.context_frames - 2, "computed context is far wider than the real field"


@pytest.mark.parametrize("T", [1, 3, 4, 5, 9, 10, 37])
def test_relative_position_shifts_equal_index_gathers(T: int) -> None:
    # The attention's strided shifts against the plain formulation, for sequences shorter
    # and longer than the window.
    w = 4
    band, square = torch.randn(2, 3, T, 2 * w + 1), torch.randn(2, 3, T, T)
    offset = torch.arange(T)[None, :] - torch.arange(T)[:, None]              # key - query
    by_key = band.gather(-1, (offset.clamp(-w, w) + w).expand(2, 3, T, T)) * (offset.abs() <= w)
    assert torch.equal(_band_to_square(band, w), by_key)
    cols = torch.arange(T)[:, None] + torch.arange(2 * w + 1)[None, :]
    by_offset = F.pad(square, (w, w)).gather(-1, cols.expand(2, 3, T, 2 * w + 1))
    assert torch.equal(_square_to_band(square, w), by_offset)


def _save_modified(tmp_path, edit) -> str:
    model = onnx.load(str(MODEL))
    edit(model.graph)
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    return str(path)


def test_missing_tensor_is_named(tmp_path) -> None:
    def drop(graph):
        victim = next(i for i in graph.initializer if i.name == "dec.conv_post.weight")
        graph.initializer.remove(victim)
    with pytest.raises(VoiceFormatError, match="dec.conv_post.weight"):
        load_vits(_save_modified(tmp_path, drop))


def test_misshapen_tensor_is_named(tmp_path) -> None:
    def reshape(graph):
        init = next(i for i in graph.initializer if i.name == "enc_p.proj.bias")
        arr = onnx.numpy_helper.to_array(init)[:100].copy()
        init.CopyFrom(onnx.numpy_helper.from_array(arr, "enc_p.proj.bias"))
    with pytest.raises(VoiceFormatError, match="enc_p.proj.bias"):
        load_vits(_save_modified(tmp_path, reshape))


def test_anonymous_conv_weight_is_named_by_its_layer(tmp_path) -> None:
    def shrink(graph):
        conv = next(n for n in graph.node if n.name == "/flow/flows.2/enc/in_layers.1/Conv")
        init = next(i for i in graph.initializer if i.name == conv.input[1])
        arr = onnx.numpy_helper.to_array(init)[:, :, :3].copy()
        init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    with pytest.raises(VoiceFormatError, match=r"flow\.flows\.2\.enc\.in_layers\.1\.weight"):
        load_vits(_save_modified(tmp_path, shrink))


def test_missing_file_is_clear(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        load_vits(tmp_path / "nope.onnx")


def test_bfloat16_decoder_on_cpu_stays_close_to_float32(engine: Engine) -> None:
    # A bf16 decoder is an option for CPUs with native bf16 (AVX512-BF16, AMX); float16 stays
    # CUDA-only. Elsewhere bf16 is emulated (slow but correct), so this runs on any CPU.
    bf16 = Engine(load_vits(MODEL), sample_rate=22050, config=EngineConfig(dtype="bfloat16"))
    ids = make_ids(30, seed=6)
    ref = engine.synthesize(ids, SILENT)
    out = bf16.synthesize(ids, SILENT)
    assert len(out) == len(ref) and out.dtype == np.float32
    assert snr_db(ref, out) >= 30.0              # measured: ~40 dB over the benchmark sentences
    res = bf16.acoustic([AcousticJob(ids, SynthesisParams(), seed=1)])[0]
    whole = bf16.decode_whole(res.z)
    chunks = np.concatenate(bf16.decode([DecodeJob(res.z, a, b) for a, b in bf16.chunk_plan(res.num_frames)]))
    assert np.abs(chunks - whole).max() <= 8e-2
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        Engine(load_vits(MODEL), sample_rate=22050, config=EngineConfig(dtype="float16"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 3e-2), ("bfloat16", 8e-2)])
def test_cuda_matches_cpu(engine: Engine, dtype: str, tol: float) -> None:
    gpu = Engine(load_vits(MODEL), sample_rate=22050, config=EngineConfig(device="cuda", dtype=dtype))
    ids = make_ids(40, seed=5)
    cpu_audio = engine.synthesize(ids, SILENT)
    gpu_audio = gpu.synthesize(ids, SILENT)
    assert len(gpu_audio) == len(cpu_audio)
    assert snr_db(cpu_audio, gpu_audio) >= (40.0 if dtype == "float32" else 15.0)
    res = gpu.acoustic([AcousticJob(ids, SynthesisParams(), seed=1)])[0]
    whole = gpu.decode_whole(res.z)
    chunks = np.concatenate(gpu.decode([DecodeJob(res.z, a, b) for a, b in gpu.chunk_plan(res.num_frames)]))
    assert np.abs(chunks - whole).max() <= tol


@pytest.mark.parametrize("n_phonemes", [8, 40, 90])
def test_head_only_flow_gives_the_same_first_chunk_and_then_the_same_phrase(engine: Engine, n_phonemes: int) -> None:
    ids = make_ids(n_phonemes, seed=n_phonemes)
    full = engine.acoustic([AcousticJob(ids, SynthesisParams(), seed=3)])[0]
    head = engine.acoustic([AcousticJob(ids, SynthesisParams(), seed=3, head_only=True)])[0]
    assert head.num_frames == full.num_frames
    plan = engine.chunk_plan(full.num_frames)
    a, b = plan[0]
    first = engine.decode([DecodeJob(head.z, a, b, phrase_frames=head.num_frames)])[0]
    assert np.abs(first - engine.decode([DecodeJob(full.z, a, b)])[0]).max() <= 1e-4
    done = engine.finish_flow(head)
    assert done.complete and torch.allclose(done.z, full.z, atol=1e-4)
    rest = engine.decode([DecodeJob(done.z, s, e) for s, e in plan[1:]]) if len(plan) > 1 else []
    stitched = np.concatenate([first, *rest])
    assert np.abs(stitched - engine.decode_whole(full.z)).max() <= 1e-4
    if not head.complete and len(plan) > 1:
        with pytest.raises(ValueError, match="finish_flow"):
            engine.decode([DecodeJob(head.z, *plan[1], phrase_frames=head.num_frames)])


@pytest.mark.parametrize("sizes", [(8, 40, 90), (40, 90)])
def test_head_only_batch_gives_each_phrase_what_it_gets_alone(engine: Engine, sizes) -> None:
    # With a phrase that ends inside the flow's window (8 phonemes: between the head and the
    # window) the batch runs the whole window; without one, only the exact head frames.
    jobs = [AcousticJob(make_ids(n, seed=n), SynthesisParams(), seed=4, head_only=True) for n in sizes]
    for job, res in zip(jobs, engine.acoustic(jobs)):
        alone = engine.acoustic([job])[0]
        assert (res.num_frames, res.complete) == (alone.num_frames, alone.complete)
        a, b = engine.chunk_plan(res.num_frames)[0]
        first, first_alone = engine.decode([DecodeJob(r.z, a, b, phrase_frames=r.num_frames)
                                            for r in (res, alone)])
        assert np.abs(first - first_alone).max() <= 1e-4
        assert torch.allclose(engine.finish_flow(res).z, engine.finish_flow(alone).z, atol=1e-4)


def multi_speaker_model() -> VitsModel:
    """The default voice's weights in a 4-speaker model (speaker table and conditioning
    layers random): the shapes and dtypes of a multi-speaker Piper voice."""
    base = load_vits(MODEL)
    torch.manual_seed(0)
    model = VitsModel(dataclasses.replace(base.hp, n_speakers=4, gin=64))
    own = model.state_dict()
    model.load_state_dict({k: v for k, v in base.state_dict().items()
                           if k in own and own[k].shape == v.shape}, strict=False)
    return model.eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_multi_speaker_voice_decodes_in_every_precision(dtype: str) -> None:
    # The speaker table stays fp32 while the decoder may run in a half type (bf16 here, fp16
    # on a GPU): its conditioning input must follow the decoder's precision.
    ref = Engine(multi_speaker_model(), sample_rate=22050,
                 config=EngineConfig(chunk_schedule=(16, 48)))
    eng = Engine(multi_speaker_model(), sample_rate=22050,
                 config=EngineConfig(dtype=dtype, chunk_schedule=(16, 48)))
    ids = make_ids(20, seed=3)
    audio = {}
    for speaker in (1, 2):
        params = SynthesisParams(noise_scale=0.0, noise_w=0.0, speaker=speaker)
        res = ref.acoustic([AcousticJob(ids, params, seed=0)])[0]
        n = min(res.num_frames, 48)
        [want] = ref.decode([DecodeJob(res.z, 0, n, speaker=speaker)])
        [got] = eng.decode([DecodeJob(res.z, 0, n, speaker=speaker)])
        assert got.shape == want.shape and np.isfinite(got).all()
        assert snr_db(want, got) > 20.0
        audio[speaker] = got
    assert not np.allclose(audio[1], audio[2], atol=1e-3)   # the speaker is heard


def test_a_decode_call_holds_at_most_the_batch_warmed_up() -> None:
    # A step's new phrases' first chunks and its continuing chunks can share a size and add up
    # to more than the warmed (and VRAM-measured) batch: they are decoded in pieces.
    eng = Engine.from_file(MODEL, sample_rate=22050, config=EngineConfig(chunk_schedule=(16, 48)))
    res = eng.acoustic([AcousticJob(make_ids(30, seed=5), SILENT, seed=0)])[0]
    jobs = [DecodeJob(res.z, a, a + 16) for a in range(0, 80, 16)]   # 5 windows of one size
    whole = eng.decode(jobs)
    eng.warmup(max_batch=2, max_frames=48)
    rows: list[int] = []
    decode = eng.model.decode
    eng.model.decode = lambda z, *a, **kw: rows.append(z.shape[0]) or decode(z, *a, **kw)
    pieces = eng.decode(jobs)
    assert rows == [2, 2, 1]
    for a, b in zip(whole, pieces):
        np.testing.assert_allclose(a, b, atol=1e-5)
