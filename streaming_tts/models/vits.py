"""VitsModel: the two stages a streaming scheduler needs, each batched with real lengths.

acoustic: phoneme ids -> latent z (after the flow), frame counts, per-phoneme durations.
decode:   a window of z -> waveform for the frames asked for (see generator.py).
Noise is drawn here, once per phrase and per item, so results do not depend on batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .commons import masked, sequence_mask
from .duration import StochasticDurationPredictor
from .flow import ResidualCouplingBlock
from .generator import Generator
from .hparams import VitsHParams
from .text_encoder import TextEncoder


@dataclass
class AcousticBatch:
    z: torch.Tensor          # [B, C, Ty] latent (fewer frames with z_prior), zero past each item
    frames: torch.Tensor     # [B] frame counts (long)
    durations: torch.Tensor  # [B, Tx] frames per phoneme id (long), zero on padding
    z_prior: torch.Tensor | None = None  # [B, C, Ty] prior sample, when z is only a head
    z_valid: int | None = None           # frames of z that are final (None: all)


class VitsModel(nn.Module):
    """Piper's VITS (SynthesizerTrn) for inference; parameter names match Piper's exports."""

    def __init__(self, hp: VitsHParams):
        super().__init__()
        self.hp = hp
        self.enc_p = TextEncoder(hp)
        self.dp = StochasticDurationPredictor(hp)
        self.flow = ResidualCouplingBlock(hp)
        self.dec = Generator(hp)
        self.emb_g = nn.Embedding(hp.n_speakers, hp.gin) if hp.gin else None

    def speaker_embedding(self, speakers: torch.Tensor | None) -> torch.Tensor | None:
        if self.emb_g is None or speakers is None:
            return None
        return self.emb_g(speakers).unsqueeze(-1)                          # [B, gin, 1]

    def acoustic(self, ids: torch.Tensor, lengths: torch.Tensor, scales: torch.Tensor,
                 speakers: torch.Tensor | None = None,
                 generators: list[torch.Generator | None] | None = None,
                 head_frames: int | None = None) -> AcousticBatch:
        """ids [B, Tx] long, lengths [B], scales [B, 3] = (noise_scale, length_scale, noise_w).

        With head_frames, the flow runs only over the window that the first head_frames of z
        depend on; z is final for `z_valid` frames and `finish_flow` completes it later. The
        first audio of a phrase then waits for a fraction of the flow.
        """
        B, Tx = ids.shape
        g = self.speaker_embedding(speakers)
        x, m, logs, x_mask = self.enc_p(ids, lengths)                     # time-major
        noise_scale, length_scale, noise_w = (scales[:, i, None, None] for i in range(3))
        dp_noise = _per_item_noise(lengths.tolist(), 2, Tx, generators, x).transpose(1, 2) * noise_w
        logw = self.dp(x, x_mask, dp_noise, g=g)
        w_ceil = torch.ceil(masked(torch.exp(logw), x_mask) * length_scale)[..., 0]  # [B, Tx]
        frames = torch.clamp_min(w_ceil.sum(1), 1).long()
        counts = frames.tolist()            # read once: on a GPU each read waits for it
        Ty, shortest = max(counts), min(counts)
        y_mask = None                       # None: no phrase is padded (every batch of one)
        if shortest < Ty:
            y_mask = sequence_mask(frames, Ty).unsqueeze(1).to(x.dtype)
        # Expand each phoneme's prior over its frames (the monotonic path as an index), into
        # the channel-major layout of the flow.
        cum = torch.cumsum(w_ceil, dim=1)
        idx = torch.searchsorted(cum, torch.arange(Ty, device=x.device, dtype=cum.dtype)
                                 .expand(B, Ty).contiguous(), right=True).clamp_max(Tx - 1)
        idx = idx[:, None, :].expand(B, m.shape[2], Ty)
        m_y, logs_y = m.transpose(1, 2).gather(2, idx), logs.transpose(1, 2).gather(2, idx)
        z_noise = _per_item_noise(counts, m.shape[2], Ty, generators, x)
        z_p = masked(m_y + z_noise * torch.exp(logs_y) * noise_scale, y_mask)
        window = Ty if head_frames is None else head_frames + self.flow.halo
        if window >= Ty:
            z = masked(self.flow(z_p, y_mask, g=g), y_mask)
            return AcousticBatch(z=z, frames=frames, durations=w_ceil.long())
        if shortest > window:
            # Every phrase continues past the window (so none is padded inside it): the flow
            # computes only the head_frames that do not depend on what lies beyond.
            z = self.flow(z_p[:, :, :window], None, g=g, open_end=True)
        else:
            # A phrase that ends inside the window comes out whole (its mask is its end); for
            # the others, the flow sees zero padding past the window instead of the phrase:
            # their last `halo` frames are wrong, the first head_frames exact.
            w_mask = y_mask[:, :, :window]
            z = self.flow(z_p[:, :, :window], w_mask, g=g) * w_mask
        return AcousticBatch(z=z, frames=frames, durations=w_ceil.long(), z_prior=z_p,
                             z_valid=head_frames)

    def finish_flow(self, z_prior: torch.Tensor, frames: int,
                    speakers: torch.Tensor | None = None) -> torch.Tensor:
        """The whole latent of one phrase from its prior sample [C, T]."""
        return self.flow(z_prior[None, :, :frames], None, g=self.speaker_embedding(speakers))[0]

    def decode(self, z: torch.Tensor, lo: list[int], hi: list[int], keep: tuple[int, int],
               speakers: torch.Tensor | None = None) -> torch.Tensor:
        # The speaker table stays fp32 (the flow and durations read it too); the decoder may
        # run in a half type (Engine), so its conditioning is cast to the decoder's precision.
        g = self.speaker_embedding(speakers)
        if g is not None:
            g = g.to(self.dec.conv_pre.weight.dtype)
        return self.dec(z, lo, hi, keep, g=g)


def _per_item_noise(lengths: list[int], channels: int, T: int,
                    generators: list[torch.Generator | None] | None,
                    like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise [B, C, T], each item drawn alone over its own length."""
    out = torch.zeros(len(lengths), channels, T, device=like.device, dtype=like.dtype)
    for b, n in enumerate(lengths):
        gen = generators[b] if generators else None
        out[b, :, :n] = torch.randn(channels, n, generator=gen, device=like.device, dtype=like.dtype)
    return out
