"""Audio output path: resample the voice's audio, then encode it for the wire."""

from .encode import (
    FORMAT_OPUS,
    FORMAT_PCM,
    OPUS_FRAME_MS,
    OPUS_RATES,
    OpusStreamEncoder,
    Payload,
    PcmStreamEncoder,
    StreamEncoder,
    float_to_s16le,
    make_encoder,
)
from .resample import StreamResampler

__all__ = [
    "FORMAT_OPUS",
    "FORMAT_PCM",
    "OPUS_FRAME_MS",
    "OPUS_RATES",
    "OpusStreamEncoder",
    "Payload",
    "PcmStreamEncoder",
    "StreamEncoder",
    "StreamResampler",
    "float_to_s16le",
    "make_encoder",
]
