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


def time_mask(lengths: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """[B] lengths -> [B, T, 1] mask for time-major activations, or None when no item is padded.

    Multiplying by a mask of ones changes nothing, so an unpadded batch (every batch of one)
    skips the multiplies: at a few dozen phonemes each is a kernel launch for little work.
    """
    if int(lengths.min()) == max_len:
        return None
    return sequence_mask(lengths, max_len).unsqueeze(-1).to(dtype)


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x * mask; x itself when there is no mask (nothing padded)."""
    return x if mask is None else x * mask


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, with VITS' parameter names (gamma, beta)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.gamma, self.beta, self.eps)


def linear(x: torch.Tensor, layer: nn.Conv1d) -> torch.Tensor:
    """A 1x1 Conv1d applied to time-major [B, T, C] activations: one GEMM."""
    return F.linear(x, layer.weight[:, :, 0], layer.bias)


def conv_time_major(x: torch.Tensor, layer: nn.Conv1d) -> torch.Tensor:
    """A same-padded, undilated Conv1d applied to time-major [B, T, C] activations.

    One GEMM over the unfolded input ([B, T, C * k], in the (C, k) order of the weight, so the
    weight is used as stored): as fast as Conv1d on channel-major input for the text
    encoder's FFN (measured), so the time-major layout costs the convolutions nothing.
    """
    k = layer.kernel_size[0]
    B, T, _ = x.shape
    pad = (k - 1) // 2
    cols = F.pad(x, (0, 0, pad, pad)).unfold(1, k, 1).reshape(B, T, -1)      # [B, T, C * k]
    return F.linear(cols, layer.weight.reshape(layer.out_channels, -1), layer.bias)


def same_conv(cin: int, cout: int, kernel: int, dilation: int = 1, groups: int = 1,
              bias: bool = True) -> nn.Conv1d:
    """A Conv1d that keeps the length (symmetric 'same' padding, odd kernels)."""
    return nn.Conv1d(cin, cout, kernel, dilation=dilation, groups=groups, bias=bias,
                     padding=(kernel - 1) * dilation // 2)


# Channels-last 2-D convolution: for the generator's few-channel, long-sequence layers, oneDNN's
# 2-D kernels on [B, C, 1, T] channels-last tensors are 2-3x faster on CPU than its 1-D ones
# (measured; not so for the 192-channel flow), and cuDNN prefers that layout for fp16. Parameters stay Conv1d-shaped so they load from voice files.
def conv(x: torch.Tensor, layer: nn.Conv1d) -> torch.Tensor:
    """Apply a Conv1d to a [B, C, 1, T] channels-last activation."""
    return F.conv2d(x, layer.weight.unsqueeze(2), layer.bias, padding=(0, layer.padding[0]),
                    dilation=(1, layer.dilation[0]), groups=layer.groups)


def conv_transpose(x: torch.Tensor, layer: nn.ConvTranspose1d) -> torch.Tensor:
    return F.conv_transpose2d(x, layer.weight.unsqueeze(2), layer.bias, stride=(1, layer.stride[0]),
                              padding=(0, layer.padding[0]))


def depthwise_conv(x: torch.Tensor, layer: nn.Conv1d) -> torch.Tensor:
    """A same-padded depthwise (groups == channels) Conv1d on [B, T, C] as a sum of shifted
    products.

    PyTorch sends dilated depthwise 1-D convolutions to a slow generic path; with kernel 3 this
    is three multiply-adds per element.
    """
    k, d = layer.kernel_size[0], layer.dilation[0]
    pad = (k - 1) * d // 2
    T = x.shape[1]
    xp = F.pad(x, (0, 0, pad, pad))
    w = layer.weight[:, 0, :].t()                               # [k, C]
    out = torch.addcmul(layer.bias, xp[:, 0:T], w[0])
    for j in range(1, k):
        out.addcmul_(xp[:, j * d:j * d + T], w[j])
    return out
