"""TextEncoder: phoneme ids -> hidden states and the prior's mean / log-std per phoneme.

A transformer with relative-position multi-head attention (window of +-w positions shared by
all heads), a convolutional FFN and post-layer norms, as in VITS. Masks make a padded batch
compute exactly what each item computes alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .commons import ChannelLayerNorm, same_conv, sequence_mask
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

    def _offsets(self, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For each (i, j): index of offset j-i in the window, and whether it lies inside."""
        rel = torch.arange(t, device=device)[None, :] - torch.arange(t, device=device)[:, None]
        inside = rel.abs() <= self.window
        return (rel.clamp(-self.window, self.window) + self.window), inside

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, C, T = x.shape
        q = self.conv_q(x).view(B, self.heads, self.k_channels, T).transpose(2, 3)  # [B, H, T, K]
        k = self.conv_k(x).view(B, self.heads, self.k_channels, T).transpose(2, 3)
        v = self.conv_v(x).view(B, self.heads, self.k_channels, T).transpose(2, 3)
        q = q / math.sqrt(self.k_channels)
        idx, inside = self._offsets(T, x.device)
        rel_logits = torch.matmul(q, self.emb_rel_k[0].transpose(0, 1))            # [B, H, T, 2w+1]
        local = rel_logits.gather(-1, idx.expand(B, self.heads, T, T)) * inside    # [B, H, T, T]
        scores = torch.matmul(q, k.transpose(-2, -1)) + local
        scores = scores.masked_fill(attn_mask == 0, -1e4)
        p = F.softmax(scores, dim=-1)
        out = torch.matmul(p, v)
        # Relative values: weight of offset r for row i is p[i, i + r].
        p_pad = F.pad(p, (self.window, self.window))                                # [B, H, T, T+2w]
        cols = (torch.arange(T, device=x.device)[:, None]
                + torch.arange(2 * self.window + 1, device=x.device)[None, :])     # [T, 2w+1]
        rel_w = p_pad.gather(-1, cols.expand(B, self.heads, T, cols.shape[1]))
        out = out + torch.matmul(rel_w, self.emb_rel_v[0])
        return self.conv_o(out.transpose(2, 3).reshape(B, C, T))


class FFN(nn.Module):
    """Two same-padded convolutions with ReLU, masked before each."""

    def __init__(self, channels: int, filters: int, kernel: int):
        super().__init__()
        self.conv_1 = same_conv(channels, filters, kernel)
        self.conv_2 = same_conv(filters, channels, kernel)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv_1(x * mask))
        return self.conv_2(x * mask) * mask


class Encoder(nn.Module):
    """Post-norm transformer stack."""

    def __init__(self, hp: VitsHParams):
        super().__init__()
        n = hp.enc_layers
        self.attn_layers = nn.ModuleList(
            RelativeAttention(hp.hidden, hp.enc_heads, hp.enc_window) for _ in range(n))
        self.norm_layers_1 = nn.ModuleList(ChannelLayerNorm(hp.hidden) for _ in range(n))
        self.ffn_layers = nn.ModuleList(FFN(hp.hidden, hp.enc_ffn, hp.enc_ffn_kernel) for _ in range(n))
        self.norm_layers_2 = nn.ModuleList(ChannelLayerNorm(hp.hidden) for _ in range(n))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn_mask = mask.unsqueeze(2) * mask.unsqueeze(-1)   # [B, 1, T, T]
        x = x * mask
        for attn, n1, ffn, n2 in zip(self.attn_layers, self.norm_layers_1,
                                     self.ffn_layers, self.norm_layers_2):
            x = n1(x + attn(x, attn_mask))
            x = n2(x + ffn(x, mask))
        return x * mask


class TextEncoder(nn.Module):
    """ids [B, T] -> hidden x, prior mean m, log-std logs (each [B, C, T]) and mask [B, 1, T]."""

    def __init__(self, hp: VitsHParams):
        super().__init__()
        self.hidden = hp.hidden
        self.emb = nn.Embedding(hp.n_vocab, hp.hidden)
        self.encoder = Encoder(hp)
        self.proj = nn.Conv1d(hp.hidden, 2 * hp.inter, 1)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor):
        x = self.emb(ids).transpose(1, 2) * math.sqrt(self.hidden)      # [B, C, T]
        mask = sequence_mask(lengths, ids.shape[1]).unsqueeze(1).to(x.dtype)
        x = self.encoder(x * mask, mask)
        m, logs = torch.chunk(self.proj(x) * mask, 2, dim=1)
        return x, m, logs, mask
