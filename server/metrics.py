"""Prometheus metrics for /metrics, on a registry owned by one `Metrics` object.

Each app builds its own `Metrics`, so tests can create many apps in one process without
"duplicated timeseries" errors from prometheus_client's global registry. The attributes are the
prometheus_client objects themselves (`metrics.ttfa_seconds.observe(0.2)`); the few methods add
units or logic that callers should not repeat.
"""

from __future__ import annotations

import logging
import os
from typing import Final

from prometheus_client import (GC_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.admission import GpuSampleLike, RefusalReason

log = logging.getLogger(__name__)

# The Content-Type header value for `render()`'s bytes. It includes a charset, so pass it as a
# header (aiohttp's `content_type=` argument refuses a charset).
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# Time to first audio: 10 ms (a warm GPU) .. 5 s (a saturated CPU).
TTFA_BUCKETS: Final = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                       1.5, 2.0, 3.0, 5.0)
# One scheduler step (one batched model call): sub-millisecond on GPU, a second on a busy CPU.
STEP_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# How far behind a client reads (ping round trip behind its audio): a network round trip when
# it keeps up; `limits.max_send_lag_s` (5 s) closes it.
CLIENT_LAG_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Event-loop lag: anything above a few ms means something blocks the loop.
LOOP_LAG_BUCKETS: Final = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

BATCH_STAGES: Final = ("acoustic", "decode")


def use_multiprocess_metrics(directory: str) -> None:
    """Keep this process's metric values in `directory`, where /metrics of any process of the
    server adds up all of them (prometheus_client's multiprocess mode; server/split.py). Call
    before the first `Metrics()`; child processes inherit it through the environment."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


# How a gauge's values from several processes add up (server/split.py): one per process
# ("livesum": streams, sockets), the back end's only, which the front ends leave at 0
# ("livesum" too), or the worst process ("livemax": lag, busy fractions). Ignored in one process.
SUM: Final = "livesum"
WORST: Final = "livemax"
# Kinds of the model thread's work for no stream (`tts_model_overhead_seconds_total`).
OVERHEAD_KINDS: Final = ("warmup", "cost_probe", "heap_trim")
# Where an ended stream's usage was reported (`tts_streams_ended_total`).
ENDED_REPORTS: Final = ("done", "cancelled", "log_only")


class Metrics:
    """All server metrics on a private `CollectorRegistry`.

    Where the server runs as several processes, each process's values are kept in the shared
    directory and `render()` adds them all up; of the process and garbage-collector series
    (one process's each) only resident memory and open files are kept, summed."""

    def __init__(self, *, namespace: str = "tts") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._vram_warned = False
        self._ns = namespace
        self._shown: dict[str, Gauge | Counter] = {}   # GPU series registered (see _show)
        self._define_stream_metrics(namespace)
        self._define_scheduler_metrics(namespace)
        # The process (resident memory, CPU seconds, open fds) and Python's garbage collector,
        # as prometheus_client's default registry would export them: what shows a leak.
        self._processes = multiprocess()
        if not self._processes:
            self.registry.register(PROCESS_COLLECTOR)
            self.registry.register(GC_COLLECTOR)
        else:   # the two that show a leak, summed over the server's processes (sample_process)
            self.process_rss = Gauge("process_resident_memory_bytes", "Resident memory, all of "
                                     "the server's processes together", registry=self.registry,
                                     multiprocess_mode=SUM)
            self.process_fds = Gauge("process_open_fds", "Open file descriptors, all of the "
                                     "server's processes together", registry=self.registry,
                                     multiprocess_mode=SUM)

    def _define_stream_metrics(self, ns: str) -> None:
        r = self.registry
        self.active_streams = Gauge("active_streams", "Live streams (contexts)", namespace=ns,
                                    registry=r, multiprocess_mode=SUM)
        self.streams_started = Counter("streams_started", "Streams started (answered ready)",
                                       namespace=ns, registry=r)
        self.streams_refused = Counter("streams_refused", "Streams refused by admission",
                                       ["reason"], namespace=ns, registry=r)
        for reason in RefusalReason:  # every reason exported at 0 before its first refusal
            self.streams_refused.labels(reason=reason.value)
        self.protocol_errors = Counter("protocol_errors", "Errors sent to clients, by code: "
                                       "`error` messages and HTTP refusals (401, 403, 426, 503)",
                                       ["code"], namespace=ns, registry=r)
        self.ttfa_seconds = Histogram("ttfa_seconds", "Time from a stream's first text to its "
                                      "first audio message", namespace=ns, registry=r,
                                      buckets=TTFA_BUCKETS)
        self.audio_seconds = Counter(
            "audio_seconds", "Audio queued to the sockets, as `audio` messages (whole 20 ms "
            "frames, Opus padding included); what a cancel or a disconnect dropped unsent is in "
            "it", namespace=ns, registry=r)
        self.listener_underruns = Counter(
            "listener_underruns", "Times a listener ran dry while the server owed it audio: its "
            "playback clock (from the audio sent) passed the end of what was sent while speech "
            "for it was still to be made. A pause in the client's text is not counted.",
            namespace=ns, registry=r)
        self.open_sockets = Gauge("open_sockets", "Open stream WebSockets", namespace=ns,
                                  registry=r, multiprocess_mode=SUM)
        self.client_lag_seconds = Histogram("client_lag_seconds", "How far behind clients with "
                                            "a live stream read: ping round trip, the ping sent "
                                            "behind their audio", namespace=ns, registry=r,
                                            buckets=CLIENT_LAG_BUCKETS)
        self.loop_tasks = Gauge("event_loop_tasks", "asyncio tasks alive on the event loop "
                                "(sampled; a steady rise with streams coming and going is a leak)",
                                namespace=ns, registry=r, multiprocess_mode=SUM)

    def _define_scheduler_metrics(self, ns: str) -> None:
        r = self.registry
        self.step_seconds = Histogram("scheduler_step_seconds", "Duration of one scheduler step",
                                      namespace=ns, registry=r, buckets=STEP_BUCKETS)
        self.batch_size = Histogram("batch_size", "Items per model call", ["stage"],
                                    namespace=ns, registry=r, buckets=BATCH_BUCKETS)
        self.queue_depth = Gauge("scheduler_queue_depth", "Jobs waiting for the model",
                                 namespace=ns, registry=r, multiprocess_mode=SUM)
        self.capacity_load = Gauge("capacity_load_ratio", "Live streams' real-time demand over "
                                   "the measured capacity (admission refuses above "
                                   "admission.max_load, streams starting counted more)",
                                   namespace=ns, registry=r, multiprocess_mode=SUM)
        self.capacity = Gauge("capacity_audio_seconds_per_second", "Audio seconds the model "
                              "makes per second, as admission estimates it: 1 / what recently "
                              "finished streams cost (compute s per audio s)",
                              namespace=ns, registry=r, multiprocess_mode=SUM)
        self.streams_starting = Gauge("streams_starting", "Live streams still building a runway "
                                      "of audio (admission counts them above real time)",
                                      namespace=ns, registry=r, multiprocess_mode=SUM)
        self.loop_lag_seconds = Histogram("event_loop_lag_seconds", "Event-loop wake-up delay",
                                          namespace=ns, registry=r, buckets=LOOP_LAG_BUCKETS)
        self.loop_lag_max_seconds = Gauge("event_loop_lag_max_seconds",
                                          "Largest event-loop lag in the last sample interval",
                                          namespace=ns, registry=r, multiprocess_mode=WORST)
        self.loop_busy_ratio = Gauge("event_loop_busy_ratio", "Event-loop thread CPU time over "
                                     "wall time in the last sample interval (admission refuses "
                                     "above admission.max_loop_busy)", namespace=ns, registry=r,
                                     multiprocess_mode=WORST)
        self.encode_busy_ratio = Gauge("encode_busy_ratio", "Fraction of the encoder threads' "
                                       "time spent resampling and encoding in the last sample "
                                       "interval (admission refuses above "
                                       "admission.max_encode_busy)", namespace=ns, registry=r,
                                       multiprocess_mode=WORST)
        self.real_time_factor = Gauge("real_time_factor", "Compute seconds per audio second "
                                      "(recent; < 1 is faster than real time)", namespace=ns,
                                      registry=r, multiprocess_mode=WORST)
        self.encode_seconds = Counter("encode_seconds", "CPU time spent resampling and "
                                      "encoding audio (Opus or PCM), in the encoder threads, "
                                      "the warm-up probe's included", namespace=ns, registry=r)
        self.compute_seconds = Counter(
            "compute_seconds", "Wall time of the model's steps for streams: the sum of every "
            "stream's usage.compute_ms (the model thread's other work is in "
            "model_overhead_seconds)", namespace=ns, registry=r)
        self.overhead_seconds = Counter(
            "model_overhead_seconds", "Wall time of the model thread's work for no stream, by "
            "kind: warmup (every kernel shape, at start), cost_probe (the cost of a stream "
            "measured at start and when idle), heap_trim (free heap given back). With "
            "compute_seconds, all of the model thread's work", ["kind"], namespace=ns,
            registry=r)
        for kind in OVERHEAD_KINDS:
            self.overhead_seconds.labels(kind=kind)
        self.streams_ended = Counter(
            "streams_ended", "Streams ended, by where their usage was reported: done, "
            "cancelled (those messages), log_only (closed without either: a disconnect, an "
            "error, a shutdown, a failed synthesis; billed from the log)", ["reported"],
            namespace=ns, registry=r)
        self.ended_compute_seconds = Counter(
            "ended_compute_seconds", "usage.compute_ms of ended streams, by where it was "
            "reported (as streams_ended): with no stream live, the three add up to "
            "compute_seconds", ["reported"], namespace=ns, registry=r)
        for reported in ENDED_REPORTS:
            self.streams_ended.labels(reported=reported)
            self.ended_compute_seconds.labels(reported=reported)
        for stage in BATCH_STAGES:  # export both series from the start, not on first use
            self.batch_size.labels(stage=stage)

    # Not made until their first reading: a CPU server (or NVML lacking a reading) exports no
    # GPU series at all, rather than zeros that look like real readings.
    _GPU_SERIES: Final = {
        "vram_used": (Gauge, "gpu_vram_used_bytes", "GPU memory used"),
        "vram_total": (Gauge, "gpu_vram_total_bytes", "GPU memory total"),
        "vram_pressure": (Gauge, "gpu_vram_pressure_ratio", "GPU memory used / total"),
        "utilization": (Gauge, "gpu_utilization_ratio", "GPU busy fraction (NVML)"),
        "power": (Gauge, "gpu_power_watts", "GPU power draw"),
        "temperature": (Gauge, "gpu_temperature_celsius", "GPU temperature"),
        "energy": (Counter, "energy_joules", "GPU energy (NVML)"),
    }

    def _show(self, key: str) -> Gauge | Counter:
        """A GPU series, made and registered with the first reading it gets."""
        metric = self._shown.get(key)
        if metric is None:
            kind, name, doc = self._GPU_SERIES[key]
            extra = {"multiprocess_mode": WORST} if kind is Gauge else {}
            metric = kind(name, doc, namespace=self._ns, registry=self.registry, **extra)
            self._shown[key] = metric
        return metric

    # ------------------------------------------------------------------ helpers

    def sample_process(self) -> None:
        """Where the server runs as several processes: this one's resident memory and open
        files, for their sums (one process: prometheus_client's process collector has them)."""
        if not self._processes:
            return
        read = {family.name: family.samples[0].value for family in PROCESS_COLLECTOR.collect()
                if family.samples}
        for name, gauge in (("process_resident_memory_bytes", self.process_rss),
                            ("process_open_fds", self.process_fds)):
            if name in read:   # no /proc (not Linux): the collector reads nothing
                gauge.set(read[name])

    def add_overhead(self, kind: str, seconds: float) -> None:
        """Model-thread time spent on `kind` (one of OVERHEAD_KINDS), for no stream."""
        kind = _one_of(kind, OVERHEAD_KINDS, "overhead kind")
        self.overhead_seconds.labels(kind=kind).inc(seconds)

    def stream_ended(self, reported: str, compute_ms: float) -> None:
        """A stream ended, its usage reported as `reported` (one of ENDED_REPORTS)."""
        _one_of(reported, ENDED_REPORTS, "report")
        self.streams_ended.labels(reported=reported).inc()
        self.ended_compute_seconds.labels(reported=reported).inc(compute_ms / 1000.0)

    def observe_batch(self, stage: str, size: int) -> None:
        """One model call of `stage` ("acoustic" or "decode") over `size` items."""
        self.batch_size.labels(stage=_one_of(stage, BATCH_STAGES, "batch stage")).observe(size)

    def set_gpu(
        self,
        *,
        vram_used_bytes: int,
        vram_total_bytes: int,
        utilization: float | None = None,
        power_watts: float | None = None,
        temperature_celsius: float | None = None,
        warn_fraction: float = 1.0,
    ) -> None:
        """Record one GPU sample; None leaves a gauge as it was (NVML lacks some readings),
        or absent until a reading comes."""
        self._show("vram_used").set(vram_used_bytes)
        self._show("vram_total").set(vram_total_bytes)
        if vram_total_bytes > 0:
            fraction = vram_used_bytes / vram_total_bytes
            self._show("vram_pressure").set(fraction)
            self.vram_pressure_check(fraction, warn_fraction)
        if utilization is not None:
            self._show("utilization").set(utilization)
        if power_watts is not None:
            self._show("power").set(power_watts)
        if temperature_celsius is not None:
            self._show("temperature").set(temperature_celsius)

    def add_energy(self, joules: float) -> None:
        """GPU energy (NVML's counter) used since the last reading."""
        self._show("energy").inc(joules)

    def record_gpu_sample(self, sample: GpuSampleLike, *, warn_fraction: float) -> None:
        """Record a `streaming_tts.gpu.GpuSample` (duck-typed: vram_used_bytes,
        vram_total_bytes, and optional util_percent, power_w, temperature_c)."""
        util = getattr(sample, "util_percent", None)
        self.set_gpu(
            vram_used_bytes=sample.vram_used_bytes,
            vram_total_bytes=sample.vram_total_bytes,
            utilization=None if util is None else util / 100.0,  # NVML percent -> ratio
            power_watts=getattr(sample, "power_w", None),
            temperature_celsius=getattr(sample, "temperature_c", None),
            warn_fraction=warn_fraction,
        )

    def vram_pressure_check(self, fraction: float, warn_fraction: float) -> bool:
        """Warn once when VRAM use reaches `warn_fraction`; re-arm once it drops below.

        Returns True when this call logged the warning. One warning per episode keeps a
        sampler running every second from flooding the log.
        """
        if fraction < warn_fraction:
            if self._vram_warned:
                log.info("GPU memory pressure back to %.0f%% (below %.0f%%)",
                         fraction * 100, warn_fraction * 100)
            self._vram_warned = False
            return False
        if self._vram_warned:
            return False
        self._vram_warned = True
        log.warning("GPU memory pressure %.0f%% reached the warning level %.0f%%",
                    fraction * 100, warn_fraction * 100)
        return True

    def render(self) -> bytes:
        """The text exposition of every metric (serve with `CONTENT_TYPE`)."""
        if multiprocess():
            from prometheus_client import multiprocess as mp

            registry = CollectorRegistry()
            mp.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def _one_of(label: str, allowed: tuple[str, ...], what: str) -> str:
    """`label`, checked to be one of a series' fixed label values (all exported from the start:
    an unknown one would start a series nobody looks for)."""
    if label not in allowed:
        raise ValueError(f"unknown {what} {label!r}; expected one of {allowed}")
    return label
