"""NVML wrapper: VRAM, utilisation, power and energy of one GPU, with a no-GPU fallback.

Admission control and metering read real numbers through `GpuMonitor`. Without a GPU (or
without the NVIDIA driver) the monitor reports `available == False` and returns None instead
of raising, so the server still runs on CPU. Tests inject readings with `GpuMonitor.fake`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency, but a CPU-only install must still start
    pynvml = None

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    """One reading of the device; None where the GPU does not report a field."""

    vram_used_bytes: int
    vram_total_bytes: int
    vram_free_bytes: int
    util_percent: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None


Reader = Callable[[], GpuSample]
Clock = Callable[[], float]


class GpuMonitor:
    """Reads one GPU through NVML, or through an injected `reader` (tests, other backends).

    `energy_j()` is the energy used since this monitor was created: from the driver's energy
    counter when the GPU has one (Volta and later), else by integrating sampled power over
    time, which is only as good as how often `sample()`/`energy_j()` are called.
    Safe to call from several threads.
    """

    def __init__(
        self, index: int = 0, *, uuid: str | None = None, reader: Reader | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.index = index
        self.uuid = uuid       # found by UUID when given (see `for_device`), else by index
        self.name: str | None = None
        self._clock = clock
        self._lock = threading.Lock()
        self._reader = reader
        self._handle: Any = None
        self._nvml_open = False
        self._energy_base_mj: int | None = None  # driver counter at start; None: integrate
        self._energy_sum_j = 0.0
        self._last_power: tuple[float, float] | None = None  # (time s, power W)
        self._unsupported: set[str] = set()
        if reader is None:
            self._open_nvml()

    @classmethod
    def for_device(cls, device: str) -> GpuMonitor | None:
        """The monitor of the GPU that `device` ("cuda", "cuda:N") computes on; None for a CPU
        device (a CPU server must not charge a GPU's power to its streams).

        NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, while CUDA's "cuda:N"
        counts only the visible GPUs (fastest first, by default): the two indices differ on
        many multi-GPU hosts. The GPU is found by the UUID CUDA reports for it, which also
        names a MIG slice, so VRAM is that slice's, not the whole card's."""
        import torch   # here: GpuSample is read by the front ends, which never load torch

        if torch.device(device).type != "cuda":
            return None
        return cls(torch.device(device).index or 0, uuid=_cuda_uuid(device))

    @classmethod
    def fake(
        cls, readings: GpuSample | Iterable[GpuSample], *, clock: Clock = time.monotonic
    ) -> GpuMonitor:
        """A monitor that returns `readings` in turn, then repeats the last one forever."""
        items = [readings] if isinstance(readings, GpuSample) else list(readings)
        if not items:
            raise ValueError("GpuMonitor.fake needs at least one reading")
        stream: Iterator[GpuSample] = itertools.chain(items, itertools.repeat(items[-1]))
        return cls(reader=lambda: next(stream), clock=clock)

    @property
    def available(self) -> bool:
        return self._reader is not None or self._nvml_open

    def sample(self) -> GpuSample | None:
        """Read the device now; None when no GPU is available or the read fails."""
        if not self.available:
            return None
        reading = self._reader() if self._reader is not None else self._read_nvml()
        if reading is not None and reading.power_w is not None:
            self._integrate(reading.power_w)
        return reading

    def energy_j(self) -> float | None:
        """Joules used since the monitor started; None without energy or power data."""
        if not self.available:
            return None
        if self._energy_base_mj is not None:
            counter = self._nvml_optional("energy", pynvml.nvmlDeviceGetTotalEnergyConsumption)
            if counter is not None:
                return (int(counter) - self._energy_base_mj) / 1000.0  # mJ -> J
        self.sample()  # one more power point, so the integral reaches "now"
        with self._lock:
            return self._energy_sum_j if self._last_power is not None else None

    def close(self) -> None:
        """Release NVML; later calls behave as if no GPU were present. Idempotent."""
        self._reader = None
        if self._nvml_open:
            self._nvml_open = False
            self._handle = None
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as exc:
                logger.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> GpuMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- NVML ----------------------------------------------------------------------------

    def _open_nvml(self) -> None:
        if pynvml is None:
            logger.info("nvidia-ml-py not installed: GPU monitoring disabled")
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            logger.info("NVML unavailable (%s): GPU monitoring disabled", exc)
            return
        try:
            self._handle = self._find_handle()
            self.name = _as_str(pynvml.nvmlDeviceGetName(self._handle))
        except pynvml.NVMLError as exc:
            logger.warning("GPU %s not usable through NVML (%s)", self._label, exc)
            pynvml.nvmlShutdown()
            return
        self._nvml_open = True
        self._energy_base_mj = self._nvml_optional(
            "energy", pynvml.nvmlDeviceGetTotalEnergyConsumption
        )
        logger.info("GPU %s (%s): NVML monitoring on", self._label, self.name)

    @property
    def _label(self) -> str:
        return f"{self.index} ({self.uuid})" if self.uuid else str(self.index)

    def _find_handle(self) -> Any:
        if self.uuid is None:
            return pynvml.nvmlDeviceGetHandleByIndex(self.index)
        if self.uuid.startswith(("GPU-", "MIG-")):
            return pynvml.nvmlDeviceGetHandleByUUID(self.uuid)
        # CUDA gives the bare UUID; NVML names a whole GPU "GPU-..." and a MIG slice "MIG-...".
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{self.uuid}")
        except pynvml.NVMLError:
            return pynvml.nvmlDeviceGetHandleByUUID(f"MIG-{self.uuid}")

    def _read_nvml(self) -> GpuSample | None:
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(self._handle)
        except pynvml.NVMLError as exc:
            logger.warning("NVML memory read failed on GPU %s: %s", self._label, exc)
            return None
        util = self._nvml_optional("util", pynvml.nvmlDeviceGetUtilizationRates)
        power_mw = self._nvml_optional("power", pynvml.nvmlDeviceGetPowerUsage)
        temp = self._nvml_optional(
            "temperature", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU
        )
        return GpuSample(
            vram_used_bytes=int(mem.used),
            vram_total_bytes=int(mem.total),
            vram_free_bytes=int(mem.free),
            util_percent=None if util is None else float(util.gpu),
            power_w=None if power_mw is None else power_mw / 1000.0,
            temperature_c=None if temp is None else float(temp),
        )

    def _nvml_optional(self, feature: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call an NVML getter that some GPUs lack; None (logged once) when it fails."""
        if feature in self._unsupported or self._handle is None:
            return None
        try:
            return fn(self._handle, *args)
        except pynvml.NVMLError as exc:
            self._unsupported.add(feature)
            logger.info("GPU %s: %s not available through NVML (%s)", self._label, feature, exc)
            return None

    def _integrate(self, power_w: float) -> None:
        """Trapezoid rule between consecutive power readings."""
        now = self._clock()
        with self._lock:
            if self._last_power is not None:
                t0, p0 = self._last_power
                self._energy_sum_j += (p0 + power_w) / 2.0 * max(0.0, now - t0)
            self._last_power = (now, power_w)


def _cuda_uuid(device: str) -> str | None:
    """The UUID CUDA reports for `device`, or None (no CUDA; the index is used then)."""
    import torch

    try:
        return str(torch.cuda.get_device_properties(torch.device(device)).uuid)
    except Exception as exc:   # no GPU or driver; NVML will say so in its own words
        logger.debug("no CUDA UUID for %s (%s)", device, exc)
        return None


def _as_str(value: str | bytes) -> str:
    """Older nvidia-ml-py returns bytes for names."""
    return value.decode() if isinstance(value, bytes) else value
