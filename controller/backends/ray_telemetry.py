"""Per-node GPU telemetry on a Ray cluster: a tiny actor on each GPU node that reads NVML.

``nvml_readings()`` is the one place that talks to NVML (``nvidia-ml-py``, imported lazily):
it returns plain dicts, or None where NVML or a GPU is missing, in which case the backend
falls back to the power model (``controller.backends.energy.ModelMeter``). When
``controller.telemetry`` grows its own NVML source, this function can delegate to it.
The actor asks for no CPU and is pinned to its node by node affinity.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["NodeTelemetry", "nvml_readings"]


def nvml_readings() -> list[dict[str, Any]] | None:
    """Every GPU of this machine through NVML: power (W), total energy counter (J),
    utilization (0-1), memory (bytes), temperature (C), SM clock (MHz), enforced power limit
    (W), model. None when ``pynvml`` is not installed, NVML does not initialise, or there
    is no GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return None
        out: list[dict[str, Any]] = []
        for i in range(count):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append({
                "index": i,
                "model": name.decode() if isinstance(name, bytes) else str(name),
                "power_watts": pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "energy_joules": pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0,
                "utilization": pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0,
                "memory_used_bytes": int(mem.used),
                "memory_total_bytes": int(mem.total),
                "temperature_celsius": float(pynvml.nvmlDeviceGetTemperature(
                    h, pynvml.NVML_TEMPERATURE_GPU)),
                "sm_clock_mhz": float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)),
                "power_limit_watts": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
            })
        return out
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


class NodeTelemetry:
    """Instantiated by the Ray backend as an actor on each GPU node (num_cpus=0)."""

    def read(self) -> list[dict[str, Any]] | None:
        return nvml_readings()
