"""Streaming sample-rate conversion: voice rate -> output rate, one stream at a time."""

from __future__ import annotations

import logging

import numpy as np
import soxr

logger = logging.getLogger(__name__)

QUALITIES = ("HQ", "VHQ")


class StreamResampler:
    """Resample float32 mono audio chunk by chunk, gap-free across chunks.

    Wraps `soxr.ResampleStream`, so the concatenated output of any chunking equals a one-shot
    `soxr.resample` of the whole signal. soxr holds back a few samples for its filter until
    `last=True`; only then is the total length `round(n_in * out_rate / in_rate)`.
    When the rates are equal this is a pass-through (no filter, no delay).
    Not thread-safe: one stream, one caller at a time.
    """

    def __init__(self, in_rate: int, out_rate: int, *, quality: str = "HQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        if quality not in QUALITIES:
            raise ValueError(f"quality must be one of {QUALITIES}, got {quality!r}")
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._stream: soxr.ResampleStream | None = None
        if self.in_rate != self.out_rate:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype="float32", quality=quality
            )
        self._finished = False

    @property
    def identity(self) -> bool:
        """True when no resampling happens (equal rates)."""
        return self._stream is None

    @property
    def finished(self) -> bool:
        """True once `process(..., last=True)` was called."""
        return self._finished

    def process(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """Feed a chunk [N] float32 mono; return the output samples ready so far [M] float32."""
        if self._finished:
            raise RuntimeError("StreamResampler already finished (last=True was given)")
        x = _as_mono_f32(samples)
        self._finished = last
        if self._stream is None:
            return x.copy()  # the caller may reuse its buffer; never alias it
        out: np.ndarray = self._stream.resample_chunk(x, last=last)
        return out


def _as_mono_f32(samples: np.ndarray) -> np.ndarray:
    """Contiguous 1-D float32 view/copy of `samples`; rejects multi-channel input."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected mono audio of shape [N], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)
