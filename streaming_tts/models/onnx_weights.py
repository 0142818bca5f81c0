"""Reads a Piper voice's `.onnx` file into named tensors and layer attributes.

Piper exports VITS with weight norm folded, so many convolution weights lose their names and
appear as anonymous `onnx::Conv_NNNN` initializers. The node that consumes a tensor still carries
the module path (`/dec/ups.0/ConvTranspose`), so every tensor is named by its consumer when its
own name is not a module path. Shape-only constants that the exporter folded are set aside.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

# Ops whose input 1/2 is the weight/bias of a layer, and the table op of an embedding.
_LAYER_OPS = {"Conv": ("weight", "bias"), "ConvTranspose": ("weight", "bias")}
_MODULE_ROOTS = ("enc_p.", "dp.", "flow.", "dec.", "emb_g.")
# Folded helper constants (shapes, scalars) are tiny; anything larger left unmapped is an error.
_MAX_CONSTANT_ELEMENTS = 64


class VoiceFormatError(ValueError):
    """The voice file does not hold the tensors our VITS expects; the message names the tensor."""


@dataclass
class OnnxVoiceGraph:
    """Named parameter tensors plus Conv/ConvTranspose attributes keyed by module path."""

    tensors: dict[str, np.ndarray]
    layer_attrs: dict[str, dict[str, object]] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


def _module_path(node_name: str) -> str:
    """'/dec/ups.0/ConvTranspose' -> 'dec.ups.0'."""
    parts = [p for p in node_name.split("/") if p]
    return ".".join(parts[:-1])


def _param_name(init_name: str, consumers: list[onnx.NodeProto]) -> str | None:
    """The module-path name of a parameter, or None for a folded graph constant."""
    if init_name.startswith(_MODULE_ROOTS):
        return init_name
    for node in consumers:
        if node.op_type in _LAYER_OPS:
            idx = list(node.input).index(init_name)
            if idx in (1, 2):
                return f"{_module_path(node.name)}.{_LAYER_OPS[node.op_type][idx - 1]}"
        if node.op_type == "Gather" and list(node.input)[0] == init_name and node.name:
            # An embedding table, e.g. the phoneme table exported under the name "sid".
            return f"{_module_path(node.name)}.weight"
        if node.op_type == "Mul" and init_name.endswith("/Exp_output_0"):
            # ElementwiseAffine in reverse multiplies by exp(-logs); the exporter folded it.
            return f"{_module_path(node.name)}.exp_neg_logs"
    return None


def read_onnx_voice(path: Path) -> OnnxVoiceGraph:
    """Load every parameter of a Piper ONNX file, named by module path."""
    model = onnx.load(str(path))
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    out = OnnxVoiceGraph(tensors={})
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        name = _param_name(init.name, consumers.get(init.name, []))
        if name is None:
            if array.size > _MAX_CONSTANT_ELEMENTS:
                raise VoiceFormatError(
                    f"{path.name}: tensor {init.name!r} {list(array.shape)} is not consumed by any "
                    "layer this VITS implementation knows")
            continue
        if name in out.tensors:
            raise VoiceFormatError(f"{path.name}: two tensors map to {name!r} (second: {init.name!r})")
        out.tensors[name] = np.array(array, dtype=np.float32, copy=True)

    for node in graph.node:
        if node.op_type in _LAYER_OPS:
            out.layer_attrs[_module_path(node.name)] = {
                a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LessOrEqual" and "/dp/flows." in node.name:
            # The spline's tail bound is a code constant in VITS; read it rather than assume it.
            bound = _initializer_scalar(graph, node.input[1])
            if bound is not None:
                out.scalars["dp.tail_bound"] = bound
    log.debug("read %d tensors from %s", len(out.tensors), path)
    return out


def _initializer_scalar(graph: onnx.GraphProto, name: str) -> float | None:
    for init in graph.initializer:
        if init.name == name:
            arr = numpy_helper.to_array(init)
            return float(arr.ravel()[0]) if arr.size == 1 else None
    return None


def write_half_precision_voice(src: Path, dst: Path) -> int:
    """Copy a Piper `.onnx` with its large float32 tensors stored as float16: half the size,
    for carrying a voice where space is short (the device machine's 64 MiB). `read_onnx_voice`
    reads them back as float32; the speech keeps its durations and stays 29 dB SNR from the
    float32 voice's (tests/test_voices.py). onnxruntime cannot run the copy. Returns its size."""
    model = onnx.load(str(src))
    for i, init in enumerate(model.graph.initializer):
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > _MAX_CONSTANT_ELEMENTS:
            half = numpy_helper.from_array(array.astype(np.float16), init.name)
            model.graph.initializer[i].CopyFrom(half)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst.stat().st_size
