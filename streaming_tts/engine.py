"""Engine: the two batched stages the scheduler drives, on one device, for one voice.

`acoustic` turns phoneme ids into a phrase latent (noise drawn once per phrase, from the job's
seed); `decode` turns any frame range of a latent into audio, with enough context around it that
stitched chunks equal a whole-phrase decode. Chunks are padded up to a few fixed sizes (the
chunk schedule) so that batches across streams share shapes.

Calls block; the scheduler runs them in its one worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

# oneDNN builds (JIT-compiles) a kernel per input shape, ~50-150 ms each for the generator on
# CPU. Shapes here are bucketed, but (chunk size x batch size) still needs more than oneDNN's
# default cache of 1024 kernels; read when the first kernel is built, so set before any runs.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

import torch  # noqa: E402

from .cuda_graphs import DecoderGraphs, Recorder, batch_buckets
from .models.loader import load_vits
from .models.vits import VitsModel
from .params import SynthesisParams

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WHOLE_PAD_FRAMES = 32   # whole-phrase decodes are padded to a multiple of this (shape reuse)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): only there a bf16
    decoder is faster than float32 (on 2 AVX512-BF16 cores it took the RTF from 0.048 to 0.029)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# A phrase's last chunk shorter than this joins the chunk before it (see Engine.chunk_plan).
TAIL_MERGE_FRAMES = 32


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"                          # "cpu" or "cuda" / "cuda:N"
    dtype: str = "float32"                       # decoder precision; float16 needs CUDA
    chunk_schedule: tuple[int, ...] = (16, 48, 96)  # frames per decode chunk: first, next, ..., last repeats
    bucket_step: int = 0                         # also pad chunks to multiples of this (0: schedule sizes only)
    threads: int | None = None                   # torch CPU threads (None: torch's default)
    cuda_graphs: bool = False                    # replay recorded decodes (cuda only; see cuda_graphs.py)


@dataclass
class AcousticJob:
    ids: Sequence[int]
    params: SynthesisParams
    seed: int | None = None                      # None: a fresh random seed
    head_only: bool = False                      # run the flow only as far as the first chunk needs


@dataclass
class AcousticResult:
    z: torch.Tensor                              # [C, T] latent on the engine's device
    durations: np.ndarray                        # [len(ids)] frames per id
    num_frames: int                              # T
    z_prior: torch.Tensor | None = None          # set when z is only final up to first_chunk_end
    speaker: int = 0

    @property
    def complete(self) -> bool:
        return self.z_prior is None


@dataclass
class DecodeJob:
    z: torch.Tensor                              # a phrase latent from AcousticResult
    start: int                                   # first frame to output
    end: int                                     # one past the last frame
    speaker: int = 0
    phrase_frames: int | None = None             # the phrase's length when z is only a head


class Engine:
    """One loaded voice on one device; stateless between calls."""

    def __init__(self, model: VitsModel, *, sample_rate: int, config: EngineConfig = EngineConfig()):
        self.config = config
        self.device = torch.device(config.device)
        if config.dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {config.dtype!r}; choose one of {sorted(_DTYPES)}")
        self.dtype = _DTYPES[config.dtype]
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError(f"dtype {config.dtype} needs a CUDA device (got {config.device})")
        if config.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device (got {config.device})")
        if self.dtype == torch.bfloat16 and self.device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("bfloat16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated "
                        "and slower than float32")
        if config.threads and self.device.type == "cpu":
            torch.set_num_threads(config.threads)
        if not config.chunk_schedule or min(config.chunk_schedule) < 1:
            raise ValueError("chunk_schedule needs at least one positive frame count")
        if self.device.type == "cuda":
            # cuDNN runs float32 convolutions as TF32 (10-bit mantissa) by default on Ampere and
            # later: the fp32 text encoder, durations and flow would then round phoneme
            # durations differently from the CPU (a frame gained or lost in 4 of 41 phrases,
            # emulated) and a float32 decoder would fall to ~36 dB against it. The fp16
            # decoder is unaffected; float32 means float32 here. (New API only: mixing it with
            # `allow_tf32` makes torch raise.)
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            # The calling thread (the server's model thread) works on this GPU: otherwise
            # its current device stays GPU 0, where CUDA-graph capture synchronises, and a
            # "cuda:1" engine would open a second context on GPU 0.
            torch.cuda.set_device(self.device)
        self.model = model.to(self.device).eval()
        # Text encoder, durations and flow stay fp32 (cheap, and durations are sensitive to
        # rounding); the generator, where the compute is, runs in the configured precision.
        self.model.dec.to(self.dtype)
        self.sample_rate = sample_rate
        self.hop_length = model.hp.hop_length
        self.context_frames = model.dec.context_frames
        if config.bucket_step < 0:
            raise ValueError("bucket_step must be >= 0")
        # Decode shapes: the schedule's sizes, plus every multiple of bucket_step below the
        # largest, so a phrase's last (short) chunk is not padded up to a full scheduled size.
        sizes = set(config.chunk_schedule)
        if config.bucket_step:
            sizes.update(range(config.bucket_step, max(sizes), config.bucket_step))
        self.buckets = tuple(sorted(sizes))
        self.graphs: DecoderGraphs | None = None     # recorded decodes, once captured
        self._warm_batch: int | None = None          # largest batch warmed up (see decode)

    def capture_graphs(self, max_batch: int, recorder: Recorder | None = None) -> DecoderGraphs | None:
        """Record the decode of every chunk bucket at batch sizes up to max_batch (see
        cuda_graphs.py) and check each against the eager decoder; decode uses them from then on.
        If recording fails, a warning, and decoding stays eager (None). `recorder` replaces
        CUDA's (tests on CPU)."""
        graphs = DecoderGraphs(self.model.decode, channels=self.model.hp.inter,
                               context_frames=self.context_frames, device=self.device,
                               dtype=self.dtype, multi_speaker=self.model.emb_g is not None,
                               recorder=recorder)
        try:
            took = graphs.capture(self.buckets, batch_buckets(max_batch))
        except Exception:   # e.g. a kernel that cannot be captured on this GPU or driver
            log.warning("could not record the decoder as CUDA graphs; it runs eagerly",
                        exc_info=True)
            return None
        # Recordings replay the eager kernels: a graph off by more than rounding is broken.
        graphs.verify(tolerance=1e-3 if self.dtype == torch.float32 else 2e-2)
        self.graphs = graphs
        log.info("recorded %d decoder graphs (%d chunk sizes x batches up to %d) in %.1f s",
                 len(graphs), len(self.buckets), max_batch, took)
        return graphs

    @classmethod
    def from_file(cls, onnx_path: Path, *, sample_rate: int, config: EngineConfig = EngineConfig()):
        return cls(load_vits(onnx_path), sample_rate=sample_rate, config=config)

    @property
    def frame_ms(self) -> float:
        return 1000.0 * self.hop_length / self.sample_rate

    def chunk_plan(self, num_frames: int, first: int = 0) -> list[tuple[int, int]]:
        """Frame ranges to decode for a phrase: small first chunk, larger ones after.

        `first` starts further along the schedule (a listener with audio buffered can wait for
        a bigger first chunk, and bigger chunks cost less per frame: less context per frame).
        """
        sched = self.config.chunk_schedule
        plan, start, i = [], 0, min(max(first, 0), len(sched) - 1)
        while start < num_frames:
            end = min(num_frames, start + sched[min(i, len(sched) - 1)])
            # A short rest of the phrase joins this chunk rather than cost a decode of its own:
            # each call pays a fixed cost and its context, so a 10-frame tail took 21.5 ms alone
            # and adds ~11 ms to a 64-frame chunk (2 CPU cores). Not the schedule's first
            # chunk: a head-only flow holds just its window, and first audio waits on it.
            if i > 0 and 0 < num_frames - end < TAIL_MERGE_FRAMES \
                    and num_frames - start <= self.buckets[-1]:
                end = num_frames
            plan.append((start, end))
            start, i = end, i + 1
        return plan

    @property
    def head_frames(self) -> int:
        """Frames of z the first chunk of a phrase reads: the chunk plus its right context."""
        return self.config.chunk_schedule[0] + self.context_frames

    def acoustic(self, jobs: Sequence[AcousticJob]) -> list[AcousticResult]:
        """Phrase latents; head_only jobs get z final only for the first chunk (see finish_flow)."""
        out: list[AcousticResult | None] = [None] * len(jobs)
        for head in (True, False):
            idx = [i for i, j in enumerate(jobs) if j.head_only == head]
            for i, res in zip(idx, self._acoustic([jobs[i] for i in idx], head)):
                out[i] = res
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def finish_flow(self, res: AcousticResult) -> AcousticResult:
        """Complete a head-only result: the flow over the whole phrase."""
        if res.complete:
            return res
        spk = torch.tensor([res.speaker], device=self.device) if self.model.emb_g is not None else None
        z = self.model.finish_flow(res.z_prior, res.num_frames, speakers=spk).to(self.dtype)
        return AcousticResult(z=z, durations=res.durations, num_frames=res.num_frames, speaker=res.speaker)

    @torch.inference_mode()
    def _acoustic(self, jobs: Sequence[AcousticJob], head_only: bool) -> list[AcousticResult]:
        if not jobs:
            return []
        lengths = [len(j.ids) for j in jobs]
        if min(lengths) < 1:
            raise ValueError("an acoustic job has no phoneme ids")
        ids = torch.zeros(len(jobs), max(lengths), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, :lengths[b]] = torch.as_tensor(list(job.ids), dtype=torch.long)
        scales = torch.tensor([[j.params.noise_scale, j.params.length_scale, j.params.noise_w]
                               for j in jobs], dtype=torch.float32)
        gens = [self._generator(j.seed) for j in jobs]
        out = self.model.acoustic(ids.to(self.device), torch.tensor(lengths, device=self.device),
                                  scales.to(self.device), speakers=self._speakers(jobs),
                                  generators=gens, head_frames=self.head_frames if head_only else None)
        frames = out.frames.tolist()
        durations = out.durations.cpu().numpy()
        z = out.z.to(self.dtype)
        results = []
        for b, job in enumerate(jobs):
            n = frames[b]
            partial = out.z_prior is not None and n > z.shape[2]
            results.append(AcousticResult(
                z=z[b, :, :min(n, z.shape[2])].clone(), durations=durations[b, :lengths[b]],
                num_frames=n, z_prior=out.z_prior[b, :, :n].clone() if partial else None,
                speaker=job.params.speaker))
        return results

    @torch.inference_mode()
    def decode(self, jobs: Sequence[DecodeJob]) -> list[np.ndarray]:
        """Audio for each job's frame range, float32 mono, (end - start) * hop samples."""
        results: list[np.ndarray | None] = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            head_only = job.phrase_frames is not None and job.z.shape[1] < job.phrase_frames
            if head_only and job.end + self.context_frames > self.head_frames:
                raise ValueError(f"decode range [{job.start}, {job.end}) needs the whole flow (finish_flow)")
            if not 0 <= job.start < job.end <= job.z.shape[1]:
                raise ValueError(f"bad decode range [{job.start}, {job.end}) of {job.z.shape[1]} frames")
            groups.setdefault(self.bucket(job.end - job.start), []).append(i)
        rows = self.rows_per_decode
        for size, group in groups.items():
            # One call decodes at most the batch warmed up (or recorded as a graph): a step's
            # new phrases' first chunks and its continuing chunks can share a size and add up
            # to more, which would decode eagerly and allocate past the VRAM measured.
            step = rows or len(group)
            for lo in range(0, len(group), step):
                idx = group[lo:lo + step]
                audio = self._decode_group([jobs[i] for i in idx], size)
                for k, i in enumerate(idx):
                    n = (jobs[i].end - jobs[i].start) * self.hop_length
                    results[i] = audio[k, :n]
        return results  # type: ignore[return-value]

    @property
    def rows_per_decode(self) -> int | None:
        """Most windows of one size decoded in one call: the largest batch recorded as a CUDA
        graph, else the largest warmed up; None (no limit) before warm-up."""
        if self.graphs is not None and self.graphs.max_batch:
            return self.graphs.max_batch
        return self._warm_batch

    def _decode_group(self, jobs: list[DecodeJob], size: int) -> np.ndarray:
        """Decode same-size windows [start - ctx, start + size + ctx) in one batch."""
        ctx = self.context_frames
        width = size + 2 * ctx
        C = jobs[0].z.shape[0]
        window = torch.zeros(len(jobs), C, width, device=self.device, dtype=self.dtype)
        lo, hi = [], []
        for b, job in enumerate(jobs):
            w0 = job.start - ctx                      # phrase frame at window index 0
            # A head-only z is final only up to head_frames, which covers this window.
            a, e = max(0, w0), min(job.z.shape[1], w0 + width)
            window[b, :, a - w0:e - w0] = job.z[:, a:e]
            lo.append(a - w0)
            # Frames past `end` inside the window are real context; past the phrase they are not.
            hi.append(e - w0)
        speakers = self._speakers(jobs)
        if self.graphs is not None:
            audio = self.graphs.run(window, lo, hi, speakers, size)
            if audio is not None:
                return audio.float().cpu().numpy()
        audio = self.model.decode(window, lo, hi, (ctx, ctx + size), speakers=speakers)
        return audio.float().cpu().numpy()

    def synthesize(self, ids: Sequence[int], params: SynthesisParams = SynthesisParams(),
                   seed: int | None = None) -> np.ndarray:
        """Whole phrase in one go (no chunking): float32 mono audio."""
        res = self.acoustic([AcousticJob(ids=ids, params=params, seed=seed)])[0]
        return self.decode_whole(res.z, speaker=params.speaker)

    @torch.inference_mode()
    def decode_whole(self, z: torch.Tensor, speaker: int = 0) -> np.ndarray:
        """A whole latent in one pass; padded (exactly, by the masks) to reuse kernel shapes."""
        T = z.shape[1]
        padded = -(-T // _WHOLE_PAD_FRAMES) * _WHOLE_PAD_FRAMES
        zp = torch.zeros(1, z.shape[0], padded, device=self.device, dtype=self.dtype)
        zp[0, :, :T] = z
        spk = torch.tensor([speaker], device=self.device) if self.model.emb_g is not None else None
        audio = self.model.decode(zp, [0], [T], (0, padded), speakers=spk)[0]
        return audio[:T * self.hop_length].float().cpu().numpy()

    def warmup(self, max_batch: int = 1, max_frames: int | None = None,
               stop: Callable[[], bool] | None = None) -> float:
        """Build the kernels of every chunk size at every batch size up to max_batch, so no
        stream pays for a first use later; returns seconds taken. From then on a decode call
        holds at most max_batch windows of a size (more are decoded in pieces). With
        `max_frames`, batches of more frames than that are skipped (on CPU the scheduler's step
        budget keeps batches of big chunks small, and warming them would cost many seconds). With `cuda_graphs`,
        the decodes are recorded first, and the loop below replays each recording. `stop`
        is asked between chunk sizes: when it says so, the warm-up ends early (shutdown)."""
        t0 = time.perf_counter()
        self._warm_batch = max_batch
        if self.config.cuda_graphs and self.graphs is None:
            self.capture_graphs(max_batch)
        ids = [1, 0] + [20, 0, 35, 0, 50, 0, 62, 0] * 6 + [2]
        res = self.acoustic([AcousticJob(ids=ids, params=SynthesisParams(), seed=0)])[0]
        head = self.acoustic([AcousticJob(ids=ids, params=SynthesisParams(), seed=0, head_only=True)])[0]
        self.finish_flow(head)
        # Every bucket at its own size (a real phrase may be shorter than the largest bucket).
        z = res.z[:, :1].expand(-1, max(self.buckets)).contiguous()
        for size in self.buckets:
            if stop is not None and stop():
                break
            for batch in range(1, max_batch + 1):
                if batch > 1 and max_frames is not None and batch * size > max_frames:
                    break
                self.decode([DecodeJob(z=z, start=0, end=size)] * batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def schedule_index_for(self, frames_buffered: float) -> int:
        """Where a phrase's chunk plan may start for a listener with this much audio buffered:
        the largest scheduled chunk that is no longer than the buffer (the growth rule of the
        schedule itself: each chunk at most as long as what the listener already holds)."""
        k = 0
        for i, size in enumerate(self.config.chunk_schedule):
            if size > frames_buffered:
                break
            k = i
        return k

    def bucket(self, n: int) -> int:
        """The padded chunk size a range of n frames is decoded at."""
        for size in self.buckets:
            if n <= size:
                return size
        return n

    def _speakers(self, jobs: Sequence) -> torch.Tensor | None:
        if self.model.emb_g is None:
            return None
        spk = [j.params.speaker if isinstance(j, AcousticJob) else j.speaker for j in jobs]
        return torch.tensor(spk, device=self.device)

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else secrets.randbits(63))
        return gen
