"""GPU telemetry through NVML (nvidia-ml-py, module `pynvml`), read in the rank actors.

Each rank reads the GPUs Ray gave it: memory used and total, utilization, power, temperature.
Without the library, a driver or a GPU it reads nothing and says why in one log line; a value
one GPU does not report (power on some boards) is left out rather than failing the reading.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MILLIWATTS_PER_WATT = 1000.0


@dataclass(frozen=True)
class GpuReading:
    """One GPU's state at one moment, as NVML reports it."""

    index: int
    """NVML's index of the GPU on its node."""
    uuid: str
    """NVML's UUID of the GPU ("GPU-...")."""
    name: str
    """The product name, e.g. "NVIDIA H200"."""
    memory_used_bytes: int
    """Device memory in use, by every process on the GPU."""
    memory_total_bytes: int
    """Device memory installed."""
    utilization: float | None
    """Fraction of NVML's last sample period in which a kernel ran (0 to 1)."""
    power_watts: float | None
    """Power draw of the board."""
    temperature_celsius: float | None
    """Temperature of the GPU die."""


class NvmlReader:
    """Reads GPUs by the device ids Ray assigns (NVML indices, or UUIDs where the node was
    configured with them). NVML is initialized on the first read that has GPUs to read."""

    def __init__(self, module_name: str = "pynvml") -> None:
        self.module_name = module_name
        self._nvml: Any = None
        self._unavailable: str | None = None

    def _library(self) -> Any:
        if self._nvml is None and self._unavailable is None:
            try:
                nvml = importlib.import_module(self.module_name)
                nvml.nvmlInit()
                self._nvml = nvml
            except Exception as error:  # ImportError, or NVMLError (no driver, no device)
                self._unavailable = f"{type(error).__name__}: {error}"
                logger.warning("GPU telemetry is off: NVML is unavailable (%s)",
                               self._unavailable)
        return self._nvml

    def read(self, device_ids: Sequence[str]) -> list[GpuReading]:
        """The readings of these GPUs, in order; none without NVML. A GPU NVML cannot find
        or read is left out (logged)."""
        if not device_ids:
            return []
        nvml = self._library()
        if nvml is None:
            return []
        readings = []
        for device_id in device_ids:
            try:
                readings.append(self._read_one(nvml, str(device_id)))
            except nvml.NVMLError as error:
                logger.warning("GPU %s: NVML reading failed: %s", device_id, error)
        return readings

    @staticmethod
    def _read_one(nvml: Any, device_id: str) -> GpuReading:
        handle = nvml.nvmlDeviceGetHandleByIndex(int(device_id)) if device_id.isdigit() \
            else nvml.nvmlDeviceGetHandleByUUID(device_id)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        utilization = _optional(nvml, lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        power = _optional(nvml, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        return GpuReading(
            index=int(nvml.nvmlDeviceGetIndex(handle)),
            uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)),
            memory_used_bytes=int(memory.used), memory_total_bytes=int(memory.total),
            utilization=None if utilization is None else utilization / 100.0,
            power_watts=None if power is None else power / MILLIWATTS_PER_WATT,
            temperature_celsius=_optional(nvml, lambda: float(nvml.nvmlDeviceGetTemperature(
                handle, nvml.NVML_TEMPERATURE_GPU))))


def _optional(nvml: Any, query: Callable[[], Any]) -> Any:
    """A value some boards do not report (NVML_ERROR_NOT_SUPPORTED): None then."""
    try:
        return query()
    except nvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    """Older nvidia-ml-py releases return bytes."""
    return value.decode() if isinstance(value, bytes) else value


_reader = NvmlReader()


def read_gpus(device_ids: Sequence[str]) -> list[GpuReading]:
    """This process's readings of `device_ids` (one NVML session per process)."""
    return _reader.read(device_ids)
