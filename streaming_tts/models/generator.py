"""Generator (HiFi-GAN): latent frames z [B, C, T] -> waveform [B, T * hop].

Built for streaming. `forward` decodes a window of frames and returns only the frames
[keep_start, keep_end); each item carries the range [lo, hi) of window frames that hold real
phrase data. Every convolution's input is zeroed outside that range, which reproduces exactly
the zero padding a lone, whole-phrase decode sees at the phrase edges, so padded batches and
chunks stitched together equal the whole-phrase decode. After each upsampling stage the
activation is cropped to what the remaining layers need (their receptive field, computed from
the layers), so a chunk's context costs mostly in the cheap low-resolution stages.

Activations run as [B, C, 1, T] in channels-last memory: oneDNN's 2-D kernels in that layout are
3-7x faster on CPU than its 1-D ones for these shapes (measured), and cuDNN likes it for fp16.
Parameters stay Conv1d-shaped so they load straight from the voice file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .commons import LRELU_SLOPE, conv, conv_transpose, masked, same_conv
from .hparams import VitsHParams


class ResBlock1(nn.Module):
    """HiFi-GAN V1 block: (dilated conv, conv) pairs, residual ("high" voices)."""

    def __init__(self, ch: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(same_conv(ch, ch, kernel, d) for d in dilations)
        self.convs2 = nn.ModuleList(same_conv(ch, ch, kernel, 1) for _ in dilations)
        self.halo = sum((kernel - 1) * d // 2 + (kernel - 1) // 2 for d in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                first_input: torch.Tensor) -> torch.Tensor:
        """first_input = masked leaky_relu(x), shared by the parallel blocks of a stage."""
        xt = first_input
        for i, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            if i:
                xt = masked(F.leaky_relu(x, LRELU_SLOPE), mask)
            xt = masked(F.leaky_relu(conv(xt, c1), LRELU_SLOPE, inplace=True), mask)
            y = conv(xt, c2)
            x = y.add_(x)            # fresh conv output: add the residual in place
        return x


class ResBlock2(nn.Module):
    """HiFi-GAN V2/V3 block: one dilated conv per step, residual ("medium"/"low" voices)."""

    def __init__(self, ch: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(same_conv(ch, ch, kernel, d) for d in dilations)
        self.halo = sum((kernel - 1) * d // 2 for d in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                first_input: torch.Tensor) -> torch.Tensor:
        """first_input = masked leaky_relu(x), shared by the parallel blocks of a stage."""
        xt = first_input
        for i, c in enumerate(self.convs):
            if i:
                xt = masked(F.leaky_relu(x, LRELU_SLOPE), mask)
            x = conv(xt, c).add_(x)  # fresh conv output: add the residual in place
        return x


@dataclass(frozen=True)
class Halo:
    """Samples needed left/right of a frame-aligned region, at one stage's resolution."""

    left: int
    right: int


class Generator(nn.Module):
    """conv_pre -> [leaky, upsample, mean of resblocks] x N -> leaky -> conv_post -> tanh."""

    def __init__(self, hp: VitsHParams):
        super().__init__()
        ch = hp.dec_initial
        self.conv_pre = same_conv(hp.inter, ch, hp.dec_pre_kernel)
        self.cond = nn.Conv1d(hp.gin, ch, 1) if hp.gin else None
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        block = ResBlock1 if hp.dec_resblock == "1" else ResBlock2
        self.strides = []
        for i, (k, s, p) in enumerate(hp.dec_ups):
            if k - s != 2 * p:
                raise ValueError(f"dec.ups.{i}: kernel {k}, stride {s}, padding {p} does not "
                                 "upsample exactly by the stride")
            self.ups.append(nn.ConvTranspose1d(ch >> i, ch >> (i + 1), k, s, padding=p))
            self.strides.append(s)
            for kernel, dil in zip(hp.dec_kernels, hp.dec_dilations):
                self.resblocks.append(block(ch >> (i + 1), kernel, dil))
        self.num_kernels = len(hp.dec_kernels)
        self.conv_post = same_conv(ch >> len(hp.dec_ups), 1, hp.dec_post_kernel, bias=False)
        # Weights kept in the memory order of channels-last 2-D kernels (the [O, I, k] weight
        # laid out as (O, k, I), so that its [O, I, 1, k] view is channels-last): otherwise
        # each call converts every weight before convolving (up to 2 MB each; a first chunk
        # of 24 frames, 2 threads: 24.2 -> 22.0 ms, median of 100 interleaved, same output).
        # Loading copies into these tensors and .to() keeps their layout.
        for layer in self.modules():
            if isinstance(layer, (nn.Conv1d, nn.ConvTranspose1d)):
                layer.weight = nn.Parameter(layer.weight.detach().unsqueeze(2)
                                            .contiguous(memory_format=torch.channels_last).squeeze(2))
        self.hop = hp.hop_length
        self.halos = self._compute_halos()
        self.context_frames = max(self.halos[0].left, self.halos[0].right)

    def _compute_halos(self) -> list[Halo]:
        """Halo at z (index 0) and at the input of each upsampler (1..N) and of conv_post (N+1).

        Walks back from the output: a same-padded conv widens the need by its half-width, a
        transposed conv maps an output interval to the inputs that touch it.
        """
        post = (self.conv_post.kernel_size[0] - 1) // 2
        halos = [Halo(post, post)]
        for i in reversed(range(len(self.ups))):
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            h = halos[0].left + max(b.halo for b in blocks), halos[0].right + max(b.halo for b in blocks)
            up = self.ups[i]
            k, s, p = up.kernel_size[0], up.stride[0], up.padding[0]
            halos.insert(0, Halo((h[0] + k - 1 - p) // s, (h[1] + p - 1) // s + 1))
        pre = (self.conv_pre.kernel_size[0] - 1) // 2
        halos.insert(0, Halo(halos[0].left + pre, halos[0].right + pre))
        return halos

    def forward(self, z: torch.Tensor, lo: list[int] | torch.Tensor, hi: list[int] | torch.Tensor,
                keep: tuple[int, int], g: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, C, T] window; lo/hi valid frames per item; keep (start, end) frames to return.

        lo/hi given as [B] tensors on z's device: every stage is masked, whatever they hold, and
        nothing reads them on the host, so the whole call is one fixed sequence of kernels for a
        given shape (what a CUDA graph records; see cuda_graphs.py). As lists, windows that are
        all phrase skip the masks."""
        B, C, T = z.shape
        if isinstance(lo, torch.Tensor):
            bounds = (lo.view(B, 1), hi.view(B, 1))
        elif any(v > 0 for v in lo) or any(v < T for v in hi):
            bounds = (torch.tensor(lo, device=z.device).view(B, 1),
                      torch.tensor(hi, device=z.device).view(B, 1))
        else:
            bounds = None
        x = z.unsqueeze(2).contiguous(memory_format=torch.channels_last)          # [B, C, 1, T]
        x, off = self._crop(x, 0, 1, keep, self.halos[0])
        mask = self._mask(bounds, 1, off, x.shape[3], x)
        x = conv(masked(x, mask), self.conv_pre)
        if self.cond is not None and g is not None:
            x = x + self.cond(g).unsqueeze(2)
        u = 1
        for i, up in enumerate(self.ups):
            x, off = self._crop(x, off, u, keep, self.halos[i + 1])
            mask = self._mask(bounds, u, off, x.shape[3], x)
            x = conv_transpose(masked(F.leaky_relu(x, LRELU_SLOPE), mask), up)
            u *= self.strides[i]
            off *= self.strides[i]
            mask = self._mask(bounds, u, off, x.shape[3], x)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            first = masked(F.leaky_relu(x, LRELU_SLOPE), mask)
            xs = blocks[0](x, mask, first)
            for block in blocks[1:]:
                xs.add_(block(x, mask, first))
            x = xs.mul_(1.0 / self.num_kernels)
        x, off = self._crop(x, off, u, keep, self.halos[-1])
        mask = self._mask(bounds, u, off, x.shape[3], x)
        x = torch.tanh(conv(masked(F.leaky_relu(x), mask), self.conv_post))
        start = keep[0] * u - off
        return x[:, 0, 0, start:start + (keep[1] - keep[0]) * u]

    @staticmethod
    def _crop(x: torch.Tensor, off: int, u: int, keep: tuple[int, int], halo: Halo):
        """Keep only [keep0*u - left, keep1*u + right) of a tensor starting at sample `off`."""
        start = max(keep[0] * u - halo.left, off)
        end = min(keep[1] * u + halo.right, off + x.shape[3])
        if start == off and end == off + x.shape[3]:
            return x, off
        return x[..., start - off:end - off], start

    @staticmethod
    def _mask(bounds: tuple[torch.Tensor, torch.Tensor] | None, u: int, off: int, length: int,
              like: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, 1, L] 1 inside each item's [lo, hi) frames (at u samples per frame), else 0."""
        if bounds is None:
            return None
        pos = torch.arange(off, off + length, device=like.device)[None, :]          # [1, L]
        lo, hi = bounds
        return ((pos >= lo * u) & (pos < hi * u)).to(like.dtype)[:, None, None, :]
