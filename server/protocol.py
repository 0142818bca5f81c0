"""Wire protocol v1: client frames -> typed messages, server messages -> msgpack bytes.

The contract is `shared/spec/protocol.md` (in the team's shared folder, beside the repository);
`docs/protocol.md` records the choices made where it is silent. Every frame in both directions
is one binary WebSocket frame holding one msgpack map with a string `type`. This module knows
nothing about sockets, voices or the scheduler: it turns bytes into frozen dataclasses (or a
`ProtocolError` carrying the wire error code) and back.

Decoding is total: whatever bytes arrive, `decode_client_frame` returns a message or raises
`ProtocolError`, never anything else, so one bad client can never crash its session task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, Protocol, TypeAlias

import msgpack

PROTOCOL_VERSION: Final = 1

DEFAULT_CTX: Final = "default"
MAX_CTX_CHARS: Final = 64
MAX_NAME_CHARS: Final = 256  # voice ids and speaker names; real ones are far shorter
DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20
# A client message is one map of scalar fields. Decoding runs on the event loop and holds the
# GIL: a 1 MiB frame of a million empty arrays in an ignored field took 0.5-1.3 s to decode,
# stalling every stream. Containers are limited in size and in number (nested ones too).
MAX_FRAME_ITEMS: Final = 64        # entries in one map or array
MAX_FRAME_CONTAINERS: Final = 16   # maps and arrays in one frame

OPUS_SAMPLE_RATES: Final = (8000, 12000, 16000, 24000, 48000)
OPUS_FRAME_MS: Final = 20
# pcm may also use the voice's native rate; this only rejects absurd values before the voice is
# known. `check_sample_rate` pins the exact rule once it is.
PCM_SAMPLE_RATE_BOUNDS: Final = (4000, 192_000)
SPEED_BOUNDS: Final = (0.5, 2.0)
NOISE_BOUNDS: Final = (0.0, 2.0)
BITRATE_BOUNDS: Final = (6000, 510_000)
MAX_BUFFER_DELAY_MS_BOUNDS: Final = (0.0, 10_000.0)


class ErrorCode(StrEnum):
    """The `code` of an `error` message; the spec fixes this list."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    UNKNOWN_VOICE = "unknown_voice"
    TEXT_TOO_LONG = "text_too_long"
    TOO_MANY_CONTEXTS = "too_many_contexts"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"


class AudioFormat(StrEnum):
    """The `format` of a stream's audio."""

    OPUS = "opus"
    PCM_S16LE = "pcm_s16le"


class ProtocolError(Exception):
    """A client frame or request the server refuses; becomes one `error` message on the wire.

    `ctx` is set when the failing frame named a valid context, so the client can tell which
    stream the error belongs to.
    """

    def __init__(
        self,
        code: ErrorCode | str,
        message: str,
        ctx: str | None = None,
        *,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.ctx = ctx
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.message!r}, ctx={self.ctx!r})"

    def to_frame(self) -> bytes:
        """The `error` message for this error, ready to send."""
        return encode_error(
            code=self.code, message=self.message, ctx=self.ctx, retry_after_s=self.retry_after_s
        )


class FrameLimits(Protocol):
    """The limits the decoder needs; `config.LimitsConfig` satisfies it."""

    @property
    def max_frame_bytes(self) -> int: ...


@dataclass(frozen=True)
class DecodeLimits:
    """Stand-alone limits for callers without a config (tests, tools)."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES


# --------------------------------------------------------------------------- client messages


@dataclass(frozen=True, slots=True)
class StartMsg:
    """`start`: open a stream. `None` means "the voice's own default"."""

    TYPE: ClassVar[str] = "start"
    ctx: str = DEFAULT_CTX
    voice: str | None = None  # None: the server's default voice
    speaker: int | str | None = None  # None: speaker 0 of a multi-speaker voice
    format: AudioFormat = AudioFormat.OPUS
    sample_rate: int = 48000
    speed: float = 1.0
    noise_scale: float | None = None
    noise_w: float | None = None
    bitrate: int = 32000  # opus only; ignored for pcm
    max_buffer_delay_ms: float = 300.0
    words: bool = True
    markdown: bool = True  # addition: read text as Markdown (markup is not spoken)
    normalize: bool = True  # addition: read "$5", "Dr.", "5 km" as said (English voices)
    read_code: bool = True  # addition: False: fenced code blocks are not read aloud
    max_speed: float | None = None  # addition: speak up to this fast to keep up with a live feed

    @property
    def length_scale(self) -> float:
        """VITS stretches durations by length_scale, so a faster speed means a smaller one."""
        return 1.0 / self.speed


@dataclass(frozen=True, slots=True)
class TextMsg:
    """`text`: append text to the stream's buffer (may split words anywhere)."""

    TYPE: ClassVar[str] = "text"
    ctx: str
    text: str


@dataclass(frozen=True, slots=True)
class FlushMsg:
    """`flush`: synthesize everything buffered now, even mid-sentence."""

    TYPE: ClassVar[str] = "flush"
    ctx: str


@dataclass(frozen=True, slots=True)
class EndMsg:
    """`end`: no more text; finish speaking, then `done`."""

    TYPE: ClassVar[str] = "end"
    ctx: str


@dataclass(frozen=True, slots=True)
class CancelMsg:
    """`cancel`: drop all pending text and audio of the stream at once."""

    TYPE: ClassVar[str] = "cancel"
    ctx: str


ClientMsg: TypeAlias = StartMsg | TextMsg | FlushMsg | EndMsg | CancelMsg


# --------------------------------------------------------------------------- decoding


def check_frame_size(size: int, *, limit: int) -> None:
    """Raise `bad_request` for a frame over `limits.max_frame_bytes` (checked before decoding)."""
    if size > limit:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"frame of {size} bytes exceeds the limit of {limit} bytes"
        )


def text_frame_error() -> ProtocolError:
    """The error for a WebSocket text frame: the protocol only uses binary msgpack frames."""
    return ProtocolError(
        ErrorCode.BAD_REQUEST, "text frames are not accepted; send one msgpack map per binary frame"
    )


def decode_client_frame(data: bytes, *, limits: FrameLimits) -> ClientMsg:
    """Decode and validate one client frame. Raises only `ProtocolError`.

    Unknown extra fields are ignored so that newer clients keep working with this server.
    """
    check_frame_size(len(data), limit=limits.max_frame_bytes)
    obj = _unpack(data)
    if not isinstance(obj, dict):
        raise _bad(f"a frame must hold one msgpack map, got {_kind(obj)}")
    ctx = _decode_ctx(obj)
    kind = obj.get("type")
    if kind is None:
        raise _bad("missing field 'type'", ctx)
    if not isinstance(kind, str):
        raise _bad(f"field 'type' must be str, got {_kind(kind)}", ctx)
    if kind == StartMsg.TYPE:
        return _decode_start(obj, ctx)
    if kind == TextMsg.TYPE:
        return _decode_text(obj, ctx)
    if kind == FlushMsg.TYPE:
        return FlushMsg(ctx=ctx)
    if kind == EndMsg.TYPE:
        return EndMsg(ctx=ctx)
    if kind == CancelMsg.TYPE:
        return CancelMsg(ctx=ctx)
    raise _bad(f"unknown message type {kind[:40]!r}; expected one of {_CLIENT_TYPES}", ctx)


_CLIENT_TYPES: Final = ", ".join(m.TYPE for m in (StartMsg, TextMsg, FlushMsg, EndMsg, CancelMsg))


def check_sample_rate(msg: StartMsg, *, native_rate: int) -> None:
    """Validate `sample_rate` once the voice is known: pcm may also use the voice's own rate."""
    if msg.sample_rate in OPUS_SAMPLE_RATES:
        return
    if msg.format is AudioFormat.PCM_S16LE and msg.sample_rate == native_rate:
        return
    allowed = ", ".join(str(r) for r in OPUS_SAMPLE_RATES)
    if msg.format is AudioFormat.PCM_S16LE:
        allowed += f" or the voice's native {native_rate}"
    message = f"sample_rate {msg.sample_rate} is not supported for {msg.format}; use {allowed}"
    raise _bad(message, msg.ctx)


def decode_server_frame(data: bytes) -> dict[str, Any]:
    """Decode a server message into a plain dict (for tests and Python clients)."""
    obj = msgpack.unpackb(data, raw=False)
    if not isinstance(obj, dict):
        raise ValueError(f"server frame is not a map: {_kind(obj)}")
    return obj


class _TooManyContainers(Exception):
    pass


def _unpack(data: bytes) -> object:
    containers = 0

    def count(container: Any) -> Any:   # called as each map or array is completed
        nonlocal containers
        containers += 1
        if containers > MAX_FRAME_CONTAINERS:
            raise _TooManyContainers
        return container

    try:
        # strict_map_key off: an extra field named by an int, nil or float is ignored like any
        # other unknown field (msgpack refused the whole frame as invalid).
        return msgpack.unpackb(data, raw=False, use_list=True, max_array_len=MAX_FRAME_ITEMS,
                               max_map_len=MAX_FRAME_ITEMS, list_hook=count, object_hook=count,
                               strict_map_key=False)
    except _TooManyContainers:
        raise _bad(f"frame holds more than {MAX_FRAME_CONTAINERS} maps and arrays; a message "
                   "is one map of fields") from None
    # msgpack reports malformed input through several exception types (ExtraData, FormatError,
    # StackError, UnicodeDecodeError for bad str bytes, TypeError for unhashable map keys, a
    # ValueError for a map or array over MAX_FRAME_ITEMS, ...); all of them mean the same
    # thing to the client.
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError) as exc:
        detail = f" ({exc})" if "exceeds max_" in str(exc) else ""
        raise _bad(f"frame is not valid msgpack: {type(exc).__name__}{detail}") from exc


def _decode_ctx(obj: Mapping[Any, Any]) -> str:
    ctx = obj.get("ctx")
    if ctx is None:
        return DEFAULT_CTX
    if not isinstance(ctx, str):
        raise _bad(f"field 'ctx' must be str, got {_kind(ctx)}")
    if not 1 <= len(ctx) <= MAX_CTX_CHARS:
        raise _bad(f"field 'ctx' must be 1..{MAX_CTX_CHARS} characters, got {len(ctx)}")
    return ctx


def _decode_text(obj: Mapping[Any, Any], ctx: str) -> TextMsg:
    # The per-stream text limit (`text_too_long`) is the session's: only a live context has one.
    text = obj.get("text")
    if text is None:
        raise _bad("missing field 'text'", ctx)
    if not isinstance(text, str):
        raise _bad(f"field 'text' must be str, got {_kind(text)}", ctx)
    return TextMsg(ctx=ctx, text=text)


_START_DEFAULTS: Final = StartMsg()  # the defaults live on the dataclass, in one place


def _decode_start(obj: Mapping[Any, Any], ctx: str) -> StartMsg:
    d = _START_DEFAULTS
    fmt = _format(obj, ctx)
    speed = _number(obj, "speed", ctx, default=d.speed, bounds=SPEED_BOUNDS)
    return StartMsg(
        ctx=ctx,
        voice=_name(obj, "voice", ctx),
        speaker=_speaker(obj, ctx),
        format=fmt,
        sample_rate=_sample_rate(obj, ctx, fmt, default=d.sample_rate),
        speed=speed,
        noise_scale=_optional_number(obj, "noise_scale", ctx, bounds=NOISE_BOUNDS),
        noise_w=_optional_number(obj, "noise_w", ctx, bounds=NOISE_BOUNDS),
        bitrate=_integer(obj, "bitrate", ctx, default=d.bitrate, bounds=BITRATE_BOUNDS),
        max_buffer_delay_ms=_number(
            obj, "max_buffer_delay_ms", ctx,
            default=d.max_buffer_delay_ms, bounds=MAX_BUFFER_DELAY_MS_BOUNDS,
        ),
        words=_boolean(obj, "words", ctx, default=d.words),
        markdown=_boolean(obj, "markdown", ctx, default=d.markdown),
        normalize=_boolean(obj, "normalize", ctx, default=d.normalize),
        read_code=_boolean(obj, "read_code", ctx, default=d.read_code),
        max_speed=_max_speed(obj, ctx, speed),
    )


def _max_speed(obj: Mapping[Any, Any], ctx: str, speed: float) -> float | None:
    most = _optional_number(obj, "max_speed", ctx, bounds=SPEED_BOUNDS)
    if most is not None and most < speed:
        raise _bad(f"field 'max_speed' ({most:g}) must not be below 'speed' ({speed:g})", ctx)
    return most


def _format(obj: Mapping[Any, Any], ctx: str) -> AudioFormat:
    value = obj.get("format")
    if value is None:
        return AudioFormat.OPUS
    if not isinstance(value, str):
        raise _bad(f"field 'format' must be str, got {_kind(value)}", ctx)
    try:
        return AudioFormat(value)
    except ValueError:
        raise _bad(
            f"unknown format {value[:40]!r}; expected 'opus' or 'pcm_s16le'", ctx
        ) from None


def _sample_rate(obj: Mapping[Any, Any], ctx: str, fmt: AudioFormat, *, default: int) -> int:
    if fmt is AudioFormat.PCM_S16LE:
        return _integer(obj, "sample_rate", ctx, default=default, bounds=PCM_SAMPLE_RATE_BOUNDS)
    rate = _integer(obj, "sample_rate", ctx, default=default, bounds=None)
    if rate not in OPUS_SAMPLE_RATES:
        allowed = ", ".join(str(r) for r in OPUS_SAMPLE_RATES)
        raise _bad(f"sample_rate {rate} is not supported for opus; use one of {allowed}", ctx)
    return rate


def _speaker(obj: Mapping[Any, Any], ctx: str) -> int | str | None:
    value = obj.get("speaker")
    if value is None or isinstance(value, str):
        return _name(obj, "speaker", ctx)
    if isinstance(value, float) and value.is_integer():   # as every integer field (docs §1)
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _bad(f"field 'speaker' must be >= 0, got {value}", ctx)
        return value
    raise _bad(f"field 'speaker' must be int or str, got {_kind(value)}", ctx)


def _name(obj: Mapping[Any, Any], field: str, ctx: str) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"field {field!r} must be str, got {_kind(value)}", ctx)
    if not 1 <= len(value) <= MAX_NAME_CHARS:
        raise _bad(f"field {field!r} must be 1..{MAX_NAME_CHARS} characters", ctx)
    return value


def _boolean(obj: Mapping[Any, Any], field: str, ctx: str, *, default: bool) -> bool:
    value = obj.get(field)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"field {field!r} must be bool, got {_kind(value)}", ctx)
    return value


def _number(
    obj: Mapping[Any, Any], field: str, ctx: str, *, default: float, bounds: tuple[float, float],
) -> float:
    value = _optional_number(obj, field, ctx, bounds=bounds)
    return default if value is None else value


def _optional_number(
    obj: Mapping[Any, Any], field: str, ctx: str, *, bounds: tuple[float, float],
) -> float | None:
    """A finite number within bounds; ints are accepted (JS and msgpack send 1.0 as 1)."""
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"field {field!r} must be a number, got {_kind(value)}", ctx)
    # float() of a huge msgpack int would overflow; such a value is out of range anyway.
    number = (float(value) if isinstance(value, float) or abs(value) < 2**53
              else math.copysign(math.inf, value))
    _check_bounds(field, number, bounds, ctx)
    return number


def _integer(
    obj: Mapping[Any, Any], field: str, ctx: str, *,
    default: int, bounds: tuple[float, float] | None,
) -> int:
    """An integer; an integral float (48000.0) is accepted for clients that only have floats."""
    value = obj.get(field)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"field {field!r} must be an integer, got {_kind(value)}", ctx)
    if bounds is not None:
        _check_bounds(field, value, bounds, ctx)
    return value


def _check_bounds(field: str, value: float, bounds: tuple[float, float], ctx: str) -> None:
    lo, hi = bounds
    # `not (lo <= v <= hi)` also rejects NaN, which fails every comparison.
    if not lo <= value <= hi:
        raise _bad(f"field {field!r} must be between {lo:g} and {hi:g}, got {value:.6g}", ctx)


def _bad(message: str, ctx: str | None = None) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, ctx)


def _kind(value: object) -> str:
    """A msgpack-flavoured type name for error messages (clients do not speak Python)."""
    names = {type(None): "nil", bool: "bool", int: "int", float: "float", str: "str",
             bytes: "bin", list: "array", dict: "map"}
    if isinstance(value, (msgpack.ExtType, msgpack.Timestamp)):
        return "ext"
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- server messages


@dataclass(frozen=True, slots=True)
class Usage:
    """The `usage` map of `done`; None goes out as nil (no NVML power, no tariff, no audio)."""

    chars: int
    phrases: int
    audio_ms: float
    compute_ms: float
    energy_j: float | None
    cost: float | None
    ttfa_ms: float | None
    encode_ms: float | None = None  # addition: CPU time resampling and encoding its audio

    def to_wire(self) -> dict[str, Any]:
        return {
            "chars": self.chars,
            "phrases": self.phrases,
            "audio_ms": _ms(self.audio_ms),
            "compute_ms": _ms(self.compute_ms),
            "energy_j": self.energy_j,
            "cost": self.cost,
            "ttfa_ms": None if self.ttfa_ms is None else _ms(self.ttfa_ms),
            "encode_ms": None if self.encode_ms is None else _ms(self.encode_ms),
        }


def encode_ready(
    *, ctx: str, stream_id: str, voice: str, format: AudioFormat | str, sample_rate: int,
    frame_ms: int, channels: int = 1,
) -> bytes:
    """`ready`: the stream was accepted; `frame_ms` is 20 for opus."""
    return _pack({
        "type": "ready", "ctx": ctx, "stream_id": stream_id, "voice": voice,
        "format": str(format), "sample_rate": sample_rate, "channels": channels,
        "frame_ms": frame_ms,
    })


def encode_audio(
    *, ctx: str, seq: int, pts_ms: float, data: bytes | bytearray | memoryview | Sequence[bytes],
) -> bytes:
    """`audio`: opus -> a list of raw 20 ms packets; pcm -> one bytes value (s16le mono)."""
    payload: object = data if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return _pack({"type": "audio", "ctx": ctx, "seq": seq, "pts_ms": _ms(pts_ms), "data": payload})


def encode_phrase(
    *, ctx: str, phrase_id: int, text: str, start_ms: float, end_ms: float, space_before: str = "",
) -> bytes:
    """`phrase`: where a scheduled phrase's audio sits in the stream's timeline, and the
    whitespace before its text in what the client sent (an addition to the contract)."""
    return _pack({
        "type": "phrase", "ctx": ctx, "id": phrase_id, "text": text,
        "start_ms": _ms(start_ms), "end_ms": _ms(end_ms), "space_before": space_before,
    })


def encode_words(
    *, ctx: str, phrase_id: int, items: Iterable[tuple[str, float, float]],
) -> bytes:
    """`words`: `[word, start_ms, end_ms]` triples on the stream's timeline."""
    wire_items = [[word, _ms(start), _ms(end)] for word, start, end in items]
    return _pack({"type": "words", "ctx": ctx, "phrase_id": phrase_id, "items": wire_items})


USAGE_FIELDS: Final = (
    "chars", "phrases", "audio_ms", "compute_ms", "energy_j", "cost", "ttfa_ms", "encode_ms",
)


def encode_done(*, ctx: str, usage: Usage | Mapping[str, Any]) -> bytes:
    """`done`: every audio message of the stream has been sent.

    `usage` is a `Usage` or a plain map (streaming_tts.metering returns one) with exactly the
    spec's fields; a missing or extra field is a bug, so it raises instead of reaching clients.
    """
    return _pack({"type": "done", "ctx": ctx, "usage": _usage_wire(usage)})


def encode_cancelled(*, ctx: str, usage: Usage | Mapping[str, Any] | None = None) -> bytes:
    """`cancelled`: acknowledges `cancel`; no more `audio` follows for this ctx.

    `usage` (an addition to the contract): what the cancelled stream used, as in `done`; None
    (nil) when no stream of `ctx` was live, or when the server could not tell in time."""
    return _pack({"type": "cancelled", "ctx": ctx,
                  "usage": None if usage is None else _usage_wire(usage)})


def _usage_wire(usage: Usage | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(usage, Usage):
        return usage.to_wire()
    if set(usage) != set(USAGE_FIELDS):
        raise ValueError(f"usage must have exactly {USAGE_FIELDS}, got {sorted(usage)}")
    return dict(usage)


def encode_error(
    *, code: ErrorCode | str, message: str, ctx: str | None = None,
    retry_after_s: int | None = None,
) -> bytes:
    """`error`: `ctx` and `retry_after_s` are omitted when not set (they are optional fields)."""
    msg: dict[str, Any] = {"type": "error", "code": ErrorCode(code).value, "message": message}
    if ctx is not None:
        msg["ctx"] = ctx
    if retry_after_s is not None:
        msg["retry_after_s"] = retry_after_s
    return _pack(msg)


def error_body(
    code: ErrorCode | str, message: str, *, retry_after_s: int | None = None,
) -> dict[str, Any]:
    """The JSON body of an HTTP refusal (401, 503): `{"error": {"code", "message", ...}}`."""
    err: dict[str, Any] = {"code": ErrorCode(code).value, "message": message}
    if retry_after_s is not None:
        err["retry_after_s"] = retry_after_s
    return {"error": err}


def _ms(value: float) -> int | float:
    """Times go out as ints when whole (most are), else rounded to the microsecond."""
    if isinstance(value, int):
        return value
    value = round(float(value), 3)
    return int(value) if value.is_integer() else value


def _pack(msg: Mapping[str, Any]) -> bytes:
    # use_bin_type: audio bytes travel as msgpack bin, text as str, as every client expects.
    packed: bytes = msgpack.packb(msg, use_bin_type=True)
    return packed
