"""CUDA graphs of the decoder: one per (chunk size, batch size), replayed instead of launched.

On a GPU a decode step of a few chunks is bound by kernel launches, not arithmetic: the
generator is a few hundred small kernels (convolutions, masks, activations), each launched from
Python. A CUDA graph records that sequence once for fixed shapes and replays it with one launch.
The scheduler's decode shapes are fixed already (chunks are padded to the chunk schedule's
sizes), so the only other dimension is the batch: it is padded up to the next of a few batch
sizes (`batch_buckets`, never more than half again), the padding rows masked out entirely.

A graph reads its inputs from, and writes its output to, the same buffers on every replay
(`_Static`). Filling them is three copies; the phrase-edge masks are computed inside the graph
from [B] tensors of valid frames (Generator.forward with tensor bounds), so nothing in the
recorded sequence depends on a host value. All graphs share one memory pool: they replay one at
a time on one thread (the model thread), and each output is copied off the GPU before the next
replay. Graphs that disagree with the eager decoder when checked at capture (`verify`) are
dropped, and their shapes decode eagerly, as do shapes never captured.

Capture itself needs CUDA; `DecoderGraphs(recorder=...)` takes another recorder so the
bookkeeping here (padding, buffers, lookup, verification) runs on CPU in the tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

# (z [B, C, W], lo [B], hi [B], keep (start, end), speakers [B] | None) -> audio [B, samples]
DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], torch.Tensor | None],
                    torch.Tensor]


class Replayable(Protocol):
    """What a recorder returns (a torch.cuda.CUDAGraph): replay() reruns the recorded work
    into the same output."""

    def replay(self) -> None: ...


# A recorder takes the work (a function of the static buffers only) and returns the recording
# and the output tensor every replay writes.
Recorder = Callable[[Callable[[], torch.Tensor]], tuple[Replayable, torch.Tensor]]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes to capture: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... and max_batch itself, so a batch
    is padded by at most half (for 64: 13 sizes instead of 64)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {max_batch}
    p = 1
    while p < max_batch:
        sizes.add(p)
        if p >= 2 and p * 3 // 2 < max_batch:
            sizes.add(p * 3 // 2)
        p *= 2
    return tuple(sorted(sizes))


class CudaGraphRecorder:
    """Records work into a torch.cuda.CUDAGraph; every graph of one recorder shares its pool."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, work: Callable[[], torch.Tensor]) -> tuple[Replayable, torch.Tensor]:
        # A few eager runs first, on the capture stream: cuDNN picks its algorithms and the
        # caching allocator sees the sizes before anything is recorded.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for _ in range(2):
                work()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (NVML monitors, the event loop) may touch CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream,
                              capture_error_mode="thread_local"):
            out = work()
        return graph, out


@dataclass
class _Static:
    """One recorded shape: the buffers its replays read and write."""

    z: torch.Tensor                 # [batch, C, width] windows of latent frames
    bounds: torch.Tensor            # [2, batch] valid frames [lo, hi) of each window
    speakers: torch.Tensor | None   # [batch] speaker ids (multi-speaker voices)
    graph: Replayable | None = None
    out: torch.Tensor | None = None  # [batch, size * hop], written by every replay

    @property
    def batch(self) -> int:
        return self.z.shape[0]


class DecoderGraphs:
    """Recorded decodes for every (chunk size, batch size) asked for; see the module doc."""

    def __init__(self, decode: DecodeFn, *, channels: int, context_frames: int,
                 device: torch.device, dtype: torch.dtype, multi_speaker: bool,
                 recorder: Recorder | None = None):
        self._decode = decode
        self.channels = channels
        self.context_frames = context_frames
        self.device = device
        self.dtype = dtype
        self.multi_speaker = multi_speaker
        self._recorder = recorder
        self._graphs: dict[tuple[int, int], _Static] = {}   # (chunk size, batch size) -> recording
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def max_batch(self) -> int:
        """The largest batch recorded (0 before capture)."""
        return max((b for _, b in self._graphs), default=0)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Captured (chunk size, batch size) pairs."""
        return sorted(self._graphs)

    @torch.inference_mode()
    def capture(self, sizes: Sequence[int], batches: Sequence[int]) -> float:
        """Record the decode of every chunk size at every batch size; returns seconds taken."""
        t0 = time.perf_counter()
        recorder = self._recorder or CudaGraphRecorder(self.device)
        ctx = self.context_frames
        for size in sizes:
            for batch in batches:
                st = _Static(
                    z=torch.zeros(batch, self.channels, size + 2 * ctx, device=self.device,
                                  dtype=self.dtype),
                    bounds=torch.zeros(2, batch, dtype=torch.long, device=self.device),
                    speakers=(torch.zeros(batch, dtype=torch.long, device=self.device)
                              if self.multi_speaker else None))
                keep = (ctx, ctx + size)
                st.graph, st.out = recorder(
                    lambda st=st, keep=keep: self._decode(st.z, st.bounds[0], st.bounds[1], keep,
                                                          st.speakers))
                self._graphs[(size, batch)] = st
        return time.perf_counter() - t0

    def graph_for(self, size: int, batch: int) -> _Static | None:
        """The recording that decodes `batch` windows of `size` frames (padded), if any."""
        fits = [b for s, b in self._graphs if s == size and b >= batch]
        return self._graphs[(size, min(fits))] if fits else None

    @torch.inference_mode()
    def run(self, window: torch.Tensor, lo: Sequence[int], hi: Sequence[int],
            speakers: torch.Tensor | None, size: int) -> torch.Tensor | None:
        """Audio [B, size * hop] of B windows [B, C, size + 2 * context], by replaying the
        recording of the next batch size up; None when no recording fits (decode eagerly).
        The result is the recording's own buffer: copy it before the next replay."""
        st = self.graph_for(size, window.shape[0])
        return None if st is None else self._replay(st, window, lo, hi, speakers)

    def _replay(self, st: _Static, window: torch.Tensor, lo: Sequence[int], hi: Sequence[int],
                speakers: torch.Tensor | None) -> torch.Tensor:
        n = window.shape[0]
        st.z[:n].copy_(window)
        if n < st.batch:
            st.z[n:].zero_()          # padding rows: no phrase frames, masked out entirely
        pad = [0] * (st.batch - n)
        st.bounds.copy_(torch.tensor([list(lo) + pad, list(hi) + pad], dtype=torch.long))
        if st.speakers is not None:
            st.speakers.zero_()
            if speakers is not None:
                st.speakers[:n].copy_(speakers)
        st.graph.replay()
        self.replays += 1
        return st.out[:n]

    @torch.inference_mode()
    def verify(self, tolerance: float, seed: int = 0) -> list[tuple[int, int]]:
        """Replay each recording on made-up windows (random latents, ragged phrase edges, a
        short batch) and compare with the eager decoder; drop those off by more than
        `tolerance` (largest sample difference). Returns the dropped shapes."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ctx = self.context_frames
        dropped = []
        for (size, batch), st in list(self._graphs.items()):
            n = max(1, batch - 1)             # a padding row in use where there can be one
            width = size + 2 * ctx
            window = torch.randn(n, self.channels, width, generator=gen).to(self.device, self.dtype)
            lo = [int(v) for v in torch.randint(0, ctx + 1, (n,), generator=gen)]
            hi = [int(v) for v in torch.randint(ctx + 1, width + 1, (n,), generator=gen)]
            spk = torch.zeros(n, dtype=torch.long, device=self.device) if self.multi_speaker else None
            got = self._replay(st, window, lo, hi, spk).float().cpu()
            want = self._decode(window, torch.tensor(lo, device=self.device),
                                torch.tensor(hi, device=self.device), (ctx, ctx + size), spk)
            err = float((got - want.float().cpu()).abs().max())
            if not err <= tolerance:              # also catches NaN
                log.warning("CUDA graph for %d chunks of %d frames differs from the eager decoder "
                            "by %.3g (> %.3g): dropped, that shape decodes eagerly",
                            batch, size, err, tolerance)
                del self._graphs[(size, batch)]
                dropped.append((size, batch))
        return dropped
