"""Builds a VitsModel from a Piper `.onnx` file; every tensor must be accounted for."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .hparams import infer_hparams
from .onnx_weights import VoiceFormatError, read_onnx_voice
from .vits import VitsModel

log = logging.getLogger(__name__)


def load_vits(onnx_path: Path) -> VitsModel:
    """Read the weights, infer hyperparameters, and load them strictly (fp32, CPU, eval)."""
    if not Path(onnx_path).is_file():
        raise FileNotFoundError(f"voice model not found: {onnx_path}")
    graph = read_onnx_voice(Path(onnx_path))
    hp = infer_hparams(graph)
    model = VitsModel(hp)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(graph.tensors))
    if missing:
        raise VoiceFormatError(f"{Path(onnx_path).name}: missing tensor {missing[0]!r}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(graph.tensors) - set(expected))
    if unexpected:
        raise VoiceFormatError(f"{Path(onnx_path).name}: unexpected tensor {unexpected[0]!r}"
                               + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    state = {}
    for name, param in expected.items():
        array = graph.tensors[name]
        if tuple(array.shape) != tuple(param.shape):
            raise VoiceFormatError(f"{Path(onnx_path).name}: tensor {name!r} has shape "
                                   f"{list(array.shape)}, expected {list(param.shape)}")
        state[name] = torch.from_numpy(array)
    model.load_state_dict(state, strict=True)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s: %.2f M parameters, hop %d, decode context %d frames",
             Path(onnx_path).name, n_params / 1e6, hp.hop_length, model.dec.context_frames)
    return model
