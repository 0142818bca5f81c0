"""Per-stream encoders: float32 mono audio at the voice rate -> protocol `audio` payloads.

Both encoders share one small interface (`StreamEncoder`) so the session treats them alike:

    pts_ms = enc.duration_ms_out        # read BEFORE encode: where the new payload starts
    data = enc.encode(chunk)            # opus: list[bytes] (20 ms packets); pcm: bytes
    if data: send audio(pts_ms=pts_ms, data=data)
    ...
    data = enc.finish()                 # once, at the end of the stream

Encoding is blocking CPU work meant for a worker thread; there is no asyncio here. An encoder
holds mutable state, so one stream's encoder must be used by one thread at a time.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import opuslib

from .resample import StreamResampler

logger = logging.getLogger(__name__)

FORMAT_OPUS = "opus"
FORMAT_PCM = "pcm_s16le"
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the rates libopus accepts
OPUS_FRAME_MS = 20  # protocol: each packet is exactly one 20 ms frame
OPUS_BITRATE_RANGE = (500, 512_000)  # libopus' accepted bits/s
PCM_SCALE = 32767.0  # +1.0 -> 32767 and -1.0 -> -32767: symmetric, never wraps

Payload = list[bytes] | bytes  # opus: one packet per 20 ms frame; pcm: s16le bytes


class StreamEncoder(ABC):
    """Resample then encode one stream's audio; tracks how much audio was emitted.

    `encode` returns the payload units completed so far (possibly empty), `finish` flushes the
    resampler and any partial frame and may be called once; after it the encoder is closed.
    """

    format: ClassVar[str]
    frame_ms: ClassVar[int | None]  # `ready.frame_ms`: 20 for opus, None for pcm

    def __init__(self, *, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = int(in_rate)
        self.out_rate = int(out_rate)
        self._resampler = StreamResampler(self.in_rate, self.out_rate, quality=quality)
        self._samples_out = 0
        self._finished = False

    @property
    def samples_out(self) -> int:
        """Samples (at `out_rate`) carried by all payloads returned so far."""
        return self._samples_out

    @property
    def duration_ms_out(self) -> float:
        """Audio emitted so far in ms: the `pts_ms` of the next payload (opus: frames * 20)."""
        return self._samples_out * 1000.0 / self.out_rate

    @property
    def finished(self) -> bool:
        return self._finished

    def encode(self, samples: np.ndarray) -> Payload:
        """Feed float32 mono audio [N] at `in_rate`; return the payload completed so far."""
        self._check_open()
        return self._emit(self._resampler.process(samples), final=False)

    def finish(self) -> Payload:
        """End of stream: flush everything held back and return the last payload."""
        self._check_open()
        tail = self._resampler.process(np.zeros(0, np.float32), last=True)
        self._finished = True
        return self._emit(tail, final=True)

    def _check_open(self) -> None:
        if self._finished:
            raise RuntimeError(f"{type(self).__name__} already finished")

    @abstractmethod
    def _emit(self, resampled: np.ndarray, *, final: bool) -> Payload:
        """Encode resampled audio [M] at `out_rate`; `final` means no more will come."""


class OpusStreamEncoder(StreamEncoder):
    """Opus, one raw packet per exact 20 ms frame (no container), mono.

    Packet k of the stream starts at pts k * 20 ms. Opus delays its output by the encoder's
    lookahead (6.5 ms at 48 kHz); with `flush_delay` (default) `finish` pads enough zeros to
    push the last real samples through that delay, which can add one frame of silence.
    """

    format = FORMAT_OPUS
    frame_ms = OPUS_FRAME_MS

    def __init__(
        self,
        *,
        in_rate: int,
        out_rate: int = 48000,
        bitrate: int = 32000,
        complexity: int = 5,
        flush_delay: bool = True,
        quality: str = "HQ",
    ) -> None:
        _check_opus_settings(out_rate, bitrate, complexity)
        super().__init__(in_rate=in_rate, out_rate=out_rate, quality=quality)
        self.frame_size = self.out_rate * OPUS_FRAME_MS // 1000  # samples per packet
        self._encoder = opuslib.Encoder(self.out_rate, 1, opuslib.APPLICATION_VOIP)
        self._encoder.bitrate = int(bitrate)
        self._encoder.complexity = int(complexity)
        self.lookahead = int(self._encoder.lookahead)  # codec delay in samples at out_rate
        self._flush_delay = flush_delay
        self._pending = np.zeros(0, np.float32)  # resampled audio not yet a whole frame

    @property
    def frames_out(self) -> int:
        """Packets emitted so far; the next packet's pts_ms is frames_out * 20."""
        return self._samples_out // self.frame_size

    def _emit(self, resampled: np.ndarray, *, final: bool) -> list[bytes]:
        buf = np.concatenate((self._pending, resampled)) if self._pending.size else resampled
        if final:
            buf = self._pad_final(buf)
        n_frames = buf.size // self.frame_size
        cut = n_frames * self.frame_size
        self._pending = buf[cut:].copy()  # copy: do not pin the whole chunk in memory
        if n_frames == 0:
            return []
        frames = _to_unit_range(buf[:cut]).reshape(n_frames, self.frame_size)  # [F, S]
        packets = [self._encoder.encode_float(f.tobytes(), self.frame_size) for f in frames]
        self._samples_out += cut
        return packets

    def _pad_final(self, buf: np.ndarray) -> np.ndarray:
        """Zero-pad to a whole frame (plus the codec delay, so no real audio stays inside)."""
        needed = buf.size
        if self._flush_delay and self._samples_out + buf.size > 0:  # an empty stream stays empty
            needed += self.lookahead
        total = -(-needed // self.frame_size) * self.frame_size  # round up to a frame
        return np.concatenate((buf, np.zeros(total - buf.size, np.float32)))


class PcmStreamEncoder(StreamEncoder):
    """Signed 16-bit little-endian mono PCM; exact length, clipped to [-1, 1], rounded."""

    format = FORMAT_PCM
    frame_ms = None

    def __init__(self, *, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        if out_rate not in OPUS_RATES and out_rate != in_rate:
            raise ValueError(
                f"pcm sample_rate must be one of {OPUS_RATES} or the voice rate {in_rate}, "
                f"got {out_rate}"
            )
        super().__init__(in_rate=in_rate, out_rate=out_rate, quality=quality)

    def _emit(self, resampled: np.ndarray, *, final: bool) -> bytes:
        self._samples_out += resampled.size
        return float_to_s16le(resampled)


def make_encoder(
    fmt: str,
    *,
    in_rate: int,
    out_rate: int,
    bitrate: int = 32000,
    complexity: int = 5,
) -> StreamEncoder:
    """Build the encoder for a `start` message's `format` (raises ValueError when invalid)."""
    if fmt == FORMAT_OPUS:
        return OpusStreamEncoder(
            in_rate=in_rate, out_rate=out_rate, bitrate=bitrate, complexity=complexity
        )
    if fmt == FORMAT_PCM:
        return PcmStreamEncoder(in_rate=in_rate, out_rate=out_rate)
    raise ValueError(f"unknown audio format {fmt!r}; expected {FORMAT_OPUS!r} or {FORMAT_PCM!r}")


def float_to_s16le(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] -> s16le bytes, rounding to nearest rather than truncating toward 0."""
    scaled = np.rint(_to_unit_range(samples) * PCM_SCALE)
    return scaled.astype("<i2").tobytes()


def _to_unit_range(samples: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1] (infinities too); NaN -> 0 so one bad model output cannot poison the
    codec state. A new array. (np.nan_to_num then clip took 3x as long: this runs on every
    chunk in the encoder threads.)"""
    x = np.clip(np.asarray(samples, np.float32), -1.0, 1.0)
    nan = np.isnan(x)
    if nan.any():
        x[nan] = 0.0
    return x


def _check_opus_settings(out_rate: int, bitrate: int, complexity: int) -> None:
    if out_rate not in OPUS_RATES:
        raise ValueError(f"opus sample_rate must be one of {OPUS_RATES}, got {out_rate}")
    lo, hi = OPUS_BITRATE_RANGE
    if not lo <= bitrate <= hi:
        raise ValueError(f"opus bitrate must be in [{lo}, {hi}] bits/s, got {bitrate}")
    if not 0 <= complexity <= 10:
        raise ValueError(f"opus complexity must be in [0, 10], got {complexity}")
