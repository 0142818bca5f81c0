"""VITS hyperparameters inferred from a voice's tensor shapes and layer attributes.

Nothing here is specific to one voice: medium (8,8,4 / 256 / resblock 2), high
(8,8,2,2 / 512 / resblock 1), low, single- and multi-speaker voices all come out of the shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .onnx_weights import OnnxVoiceGraph, VoiceFormatError


@dataclass(frozen=True)
class VitsHParams:
    n_vocab: int                 # phoneme id table size
    hidden: int                  # text encoder channels (192 in Piper voices)
    inter: int                   # latent channels of z (192)
    enc_layers: int              # transformer layers in the text encoder (6)
    enc_heads: int               # attention heads (2)
    enc_window: int              # relative attention window (4)
    enc_ffn: int                 # FFN channels (768)
    enc_ffn_kernel: int          # FFN conv kernel (3)
    dp_filter: int               # duration predictor channels
    dp_kernel: int               # DDSConv kernel (3)
    dp_layers: int               # DDSConv layers (3)
    dp_flow_ids: tuple[int, ...]  # indices of ConvFlows used in reverse (3, 5, 7)
    dp_bins: int                 # spline bins (10)
    dp_tail_bound: float         # spline tail bound (5.0)
    flow_ids: tuple[int, ...]    # residual coupling layer indices (0, 2, 4, 6)
    flow_wn_layers: int          # WaveNet layers per coupling (4)
    flow_kernel: int             # WaveNet kernel (5)
    flow_dilation_rate: int      # WaveNet dilation growth (1)
    dec_initial: int             # generator channels after conv_pre (256 medium, 512 high)
    dec_pre_kernel: int          # conv_pre kernel (7)
    dec_ups: tuple[tuple[int, int, int], ...]       # (kernel, stride, padding) per upsample
    dec_resblock: str            # "1" (V1, high) or "2" (medium)
    dec_kernels: tuple[int, ...]                    # resblock kernels (3, 5, 7)
    dec_dilations: tuple[tuple[int, ...], ...]      # per resblock kernel, one per conv (pair)
    dec_post_kernel: int         # conv_post kernel (7)
    n_speakers: int              # 1 for single-speaker voices
    gin: int                     # speaker embedding channels (0 without speakers)

    @property
    def hop_length(self) -> int:
        hop = 1
        for _, stride, _ in self.dec_ups:
            hop *= stride
        return hop


def _count(tensors: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in tensors if (m := rx.match(k))})


def _shape(g: OnnxVoiceGraph, name: str) -> tuple[int, ...]:
    if name not in g.tensors:
        raise VoiceFormatError(f"missing tensor {name!r}")
    return tuple(g.tensors[name].shape)


def _attr(g: OnnxVoiceGraph, module: str, key: str) -> list[int]:
    attrs = g.layer_attrs.get(module)
    if attrs is None or key not in attrs:
        raise VoiceFormatError(f"missing layer attribute {key!r} of {module!r}")
    return list(attrs[key])  # type: ignore[arg-type]


def _generator_hparams(g: OnnxVoiceGraph) -> dict:
    t = g.tensors
    ups_ids = _count(t, r"dec\.ups\.(\d+)\.weight")
    ups = tuple((_shape(g, f"dec.ups.{i}.weight")[2], _attr(g, f"dec.ups.{i}", "strides")[0],
                 _attr(g, f"dec.ups.{i}", "pads")[0]) for i in ups_ids)
    n_blocks = len(_count(t, r"dec\.resblocks\.(\d+)\."))
    n_kernels = n_blocks // max(len(ups), 1)
    kind = "1" if any(k.startswith("dec.resblocks.0.convs1.") for k in t) else "2"
    conv_names = ["convs1"] if kind == "1" else ["convs"]
    kernels, dilations = [], []
    for j in range(n_kernels):
        convs = _count(t, rf"dec\.resblocks\.{j}\.{conv_names[0]}\.(\d+)\.weight")
        kernels.append(_shape(g, f"dec.resblocks.{j}.{conv_names[0]}.0.weight")[2])
        dilations.append(tuple(_attr(g, f"dec.resblocks.{j}.{conv_names[0]}.{c}", "dilations")[0]
                               for c in convs))
    return dict(dec_initial=_shape(g, "dec.conv_pre.weight")[0],
                dec_pre_kernel=_shape(g, "dec.conv_pre.weight")[2], dec_ups=ups,
                dec_resblock=kind, dec_kernels=tuple(kernels), dec_dilations=tuple(dilations),
                dec_post_kernel=_shape(g, "dec.conv_post.weight")[2])


def infer_hparams(g: OnnxVoiceGraph) -> VitsHParams:
    """Read every hyperparameter from shapes and Conv attributes; fail naming what is missing."""
    t = g.tensors
    n_vocab, hidden = _shape(g, "enc_p.emb.weight")
    _, rel_len, k_channels = _shape(g, "enc_p.encoder.attn_layers.0.emb_rel_k")
    ffn_out, _, ffn_kernel = _shape(g, "enc_p.encoder.ffn_layers.0.conv_1.weight")
    dp_flows = tuple(_count(t, r"dp\.flows\.(\d+)\.pre\.weight"))
    if not dp_flows:
        raise VoiceFormatError("missing tensor 'dp.flows.N.pre.weight' (stochastic duration predictor)")
    dp_proj = _shape(g, f"dp.flows.{dp_flows[0]}.proj.weight")[0]
    flow_ids = tuple(_count(t, r"flow\.flows\.(\d+)\.pre\.weight"))
    wn_layers = len(_count(t, rf"flow\.flows\.{flow_ids[0]}\.enc\.in_layers\.(\d+)\.weight"))
    wn_dil = [_attr(g, f"flow.flows.{flow_ids[0]}.enc.in_layers.{i}", "dilations")[0]
              for i in range(wn_layers)]
    n_speakers, gin = _shape(g, "emb_g.weight") if "emb_g.weight" in t else (1, 0)
    return VitsHParams(
        n_vocab=n_vocab, hidden=hidden, inter=_shape(g, "enc_p.proj.weight")[0] // 2,
        enc_layers=len(_count(t, r"enc_p\.encoder\.attn_layers\.(\d+)\.conv_q\.weight")),
        enc_heads=hidden // k_channels, enc_window=(rel_len - 1) // 2, enc_ffn=ffn_out,
        enc_ffn_kernel=ffn_kernel, dp_filter=_shape(g, "dp.pre.weight")[0],
        dp_kernel=_shape(g, "dp.convs.convs_sep.0.weight")[2],
        dp_layers=len(_count(t, r"dp\.convs\.convs_sep\.(\d+)\.weight")),
        dp_flow_ids=dp_flows, dp_bins=(dp_proj + 1) // 3,
        dp_tail_bound=g.scalars.get("dp.tail_bound", 5.0), flow_ids=flow_ids,
        flow_wn_layers=wn_layers, flow_kernel=_shape(g, f"flow.flows.{flow_ids[0]}.enc.in_layers.0.weight")[2],
        flow_dilation_rate=wn_dil[1] if len(wn_dil) > 1 else 1,
        n_speakers=n_speakers, gin=gin, **_generator_hparams(g))
