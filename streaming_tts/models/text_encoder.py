"""TextEncoder: phoneme ids -> hidden states and the prior's mean / log-std per phoneme.

A transformer with relative-position multi-head attention (window of +-w positions shared by
all heads), a convolutional FFN and post-layer norms, as in VITS. Masks make a padded batch
compute exactly what each item computes alone; a batch without padding skips them.

It runs time-major ([B, T, C]): the 1x1 convolutions are plain GEMMs, the FFN's convolutions
one GEMM each (commons.conv_time_major), the layer norms need no transposes, and the relative
positions are shifted into place by strided views instead of gathers with index tensors. At a
first phrase's size most of the time went to such small operations around the GEMMs: a 3-word
phrase (39 ids, 2 threads, median of 200 interleaved) took 21.9 ms channel-major, 16.3 ms
time-major (batch 4: 53.4 and 40.2 ms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .commons import LayerNorm, conv_time_major, linear, masked, same_conv, time_mask
from .hparams import VitsHParams


class RelativeAttention(nn.Module):
    """Multi-head self-attention with learned relative-position keys and values."""

    def __init__(self, channels: int, heads: int, window: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.k_channels = channels // heads
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        self.emb_rel_k = nn.Parameter(torch.zeros(1, 2 * window + 1, self.k_channels))
        self.emb_rel_v = nn.Parameter(torch.zeros(1, 2 * window + 1, self.k_channels))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, C]; key_padding [B, 1, 1, T], True at padded positions (None: no padding).

        Padded queries are left unmasked: their rows are garbage that the caller's masks drop.
        """
        B, T, C = x.shape
        q = self._split(linear(x, self.conv_q)) / math.sqrt(self.k_channels)      # [B, H, T, K]
        k, v = self._split(linear(x, self.conv_k)), self._split(linear(x, self.conv_v))
        rel_logits = torch.matmul(q, self.emb_rel_k[0].transpose(0, 1))          # [B, H, T, 2w+1]
        scores = torch.matmul(q, k.transpose(-2, -1)) + _band_to_square(rel_logits, self.window)
        if key_padding is not None:
            scores = scores.masked_fill(key_padding, -1e4)
        p = F.softmax(scores, dim=-1)
        out = torch.matmul(p, v) + torch.matmul(_square_to_band(p, self.window), self.emb_rel_v[0])
        return linear(out.transpose(1, 2).reshape(B, T, C), self.conv_o)

    def _split(self, y: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, H, T, K], a view."""
        B, T, _ = y.shape
        return y.view(B, T, self.heads, self.k_channels).transpose(1, 2)


def _band_to_square(band: torch.Tensor, window: int) -> torch.Tensor:
    """[..., T, 2w+1] values by offset (column r: key i + r - w for query i) -> [..., T, T]
    by key, zero outside the band.

    Each row is padded with T zeros (length R = T + 2w + 1) and the result read back with a
    row stride of R - 1, which shifts row i right by i: one copy, no index tensors.
    """
    *lead, T, L = band.shape
    padded = F.pad(band, (0, T)).contiguous()
    R = T + L
    return padded.as_strided((*lead, T, T), (*padded.stride()[:-2], R - 1, 1),
                             padded.storage_offset() + window)


def _square_to_band(square: torch.Tensor, window: int) -> torch.Tensor:
    """The inverse: [..., T, T] by key -> [..., T, 2w+1] by offset (zero past the sequence).

    Rows padded with w zeros on both sides (length R = T + 2w) and read back with a row
    stride of R + 1, which shifts row i left by i.
    """
    *lead, T, _ = square.shape
    padded = F.pad(square, (window, window)).contiguous()
    R = T + 2 * window
    return padded.as_strided((*lead, T, 2 * window + 1), (*padded.stride()[:-2], R + 1, 1),
                             padded.storage_offset())


class FFN(nn.Module):
    """Two same-padded convolutions with ReLU, masked before each."""

    def __init__(self, channels: int, filters: int, kernel: int):
        super().__init__()
        self.conv_1 = same_conv(channels, filters, kernel)
        self.conv_2 = same_conv(filters, channels, kernel)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = torch.relu(conv_time_major(masked(x, mask), self.conv_1))
        return masked(conv_time_major(masked(x, mask), self.conv_2), mask)


class Encoder(nn.Module):
    """Post-norm transformer stack."""

    def __init__(self, hp: VitsHParams):
        super().__init__()
        n = hp.enc_layers
        self.attn_layers = nn.ModuleList(
            RelativeAttention(hp.hidden, hp.enc_heads, hp.enc_window) for _ in range(n))
        self.norm_layers_1 = nn.ModuleList(LayerNorm(hp.hidden) for _ in range(n))
        self.ffn_layers = nn.ModuleList(FFN(hp.hidden, hp.enc_ffn, hp.enc_ffn_kernel) for _ in range(n))
        self.norm_layers_2 = nn.ModuleList(LayerNorm(hp.hidden) for _ in range(n))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, C], mask [B, T, 1] (None: no padding)."""
        key_padding = None if mask is None else (mask == 0).view(x.shape[0], 1, 1, -1)
        x = masked(x, mask)
        for attn, n1, ffn, n2 in zip(self.attn_layers, self.norm_layers_1,
                                     self.ffn_layers, self.norm_layers_2):
            x = n1(x + attn(x, key_padding))
            x = n2(x + ffn(x, mask))
        return masked(x, mask)


class TextEncoder(nn.Module):
    """ids [B, T] -> hidden x, prior mean m, log-std logs (each [B, T, C], time-major) and
    mask [B, T, 1] (None when no item is padded)."""

    def __init__(self, hp: VitsHParams):
        super().__init__()
        self.hidden = hp.hidden
        self.emb = nn.Embedding(hp.n_vocab, hp.hidden)
        self.encoder = Encoder(hp)
        self.proj = nn.Conv1d(hp.hidden, 2 * hp.inter, 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        x = self.emb(ids) * math.sqrt(self.hidden)                      # [B, T, C]
        mask = time_mask(lengths, ids.shape[1], x.dtype)
        x = self.encoder(x, mask)
        m, logs = torch.chunk(masked(linear(x, self.proj), mask), 2, dim=-1)
        return x, m, logs, mask
