"""Small building blocks shared by the VITS parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LRELU_SLOPE = 0.1  # HiFi-GAN's leaky ReLU slope inside the generator


def sequence_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """[B] lengths -> [B, T] bool mask."""
    if max_len is None:
        max_len = int(lengths.max())
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a [B, C, T] tensor (VITS names: gamma, beta)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), self.gamma, self.beta, self.eps)
        return x.transpose(1, 2)


def same_conv(cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1,
              bias: bool = True) -> nn.Conv1d:
    """A Conv1d that keeps the length (symmetric 'same' padding, odd kernels)."""
    return nn.Conv1d(cin, cout, kernel, dilation=dilation, groups=groups, bias=bias,
                     padding=(kernel - 1) * dilation // 2)
