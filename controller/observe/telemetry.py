"""Where GPU telemetry comes from: the backend (simulated), NVML, or the power model.

Every watt the exporter shows comes through one small interface, ``TelemetrySource``:
``read()`` returns a ``TelemetrySnapshot`` of per-GPU readings (power, the energy counter,
utilization, memory, temperature, SM clock, power limit). Three sources implement it:

* ``BackendTelemetry``: whatever the cluster backend reports; for the simulated factory
  that is its power model with exact per-GPU energy.
* ``NvmlTelemetry``: the GPUs of this machine through NVML (nvidia-ml-py). Power,
  utilization and memory cost microseconds per call, but the total-energy counter costs
  about 4 ms per call on an H200 (``../shared/data/README.md``), so it reads power on every
  sample and the energy counter only every ``energy_interval_seconds``; in between, the
  exported counter is the last hardware reading plus the integral of the sampled power, and
  it never goes backwards.
* ``ModelTelemetry``: the power model applied to the jobs that hold each GPU, for when
  neither the backend nor NVML can say anything (it is what a machine without NVML falls
  back to; the caller logs that and the exporter shows it in
  ``aifactory_telemetry_source_info``).

``EnergyAttributor`` turns successive snapshots into per-job energy: each GPU's counter
increase between two samples goes to the jobs that held the GPU at the start of the
interval, split by their share of it.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aifactory.controller.backends.base import ClusterBackend, GPUReading, TelemetrySnapshot
from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.core.gpus import gpu_model_name
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.model import GPUPowerProfile, profile_for
from aifactory.controller.power.utilisation import DEFAULT_MEMORY_GIB, GIB, default_utilization

__all__ = [
    "BackendTelemetry",
    "EnergyAttributor",
    "GPUKey",
    "ModelTelemetry",
    "NvmlTelemetry",
    "TelemetrySource",
    "TelemetryUnavailableError",
]

GPUKey = tuple[str, int]  # (node name, GPU index on the node)
LOG = logging.getLogger("aifactory.telemetry")


class TelemetryUnavailableError(AifactoryError):
    """A telemetry source cannot run here; the message says why and what would fix it."""


class TelemetrySource(Protocol):
    """Reads every GPU it can see. ``name`` is what ``aifactory_telemetry_source_info``
    shows: ``simulated``, ``nvml`` or ``model``."""

    @property
    def name(self) -> str: ...

    def read(self) -> TelemetrySnapshot: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- backend


class BackendTelemetry:
    """The backend's own telemetry: the simulated factory's power model, or the Ray
    backend's (NVML on every node where it answers, else the power model). ``name``
    follows the source of the latest snapshot, and a change of source is logged."""

    def __init__(self, backend: ClusterBackend, name: str = "simulated") -> None:
        self.backend = backend
        self.name = name

    def read(self) -> TelemetrySnapshot:
        snapshot = self.backend.telemetry()
        if snapshot.source != self.name:
            if snapshot.source == "model":
                LOG.warning("GPU telemetry from the backend falls back to the power model: "
                            "no NVML readings from its nodes (yet) "
                            "(aifactory_telemetry_source_info{source=\"model\"})")
            else:
                LOG.info("GPU telemetry from the backend: %s readings", snapshot.source)
            self.name = snapshot.source
        return snapshot

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- model


class ModelTelemetry:
    """The power model over the jobs holding each GPU; energy integrates the modelled power.

    ``holdings()`` yields ``(spec, placement)`` of every job that holds GPUs now. Power is
    piecewise constant between reads: the draw computed at one read counts until the next.
    """

    name = "model"

    def __init__(self, topo: Topology,
                 holdings: Callable[[], Iterable[tuple[JobSpec, Placement]]],
                 clock: Callable[[], float] = time.time) -> None:
        self.topo = topo
        self._holdings = holdings
        self._clock = clock
        total = topo.total_gpus
        self._profiles: list[GPUPowerProfile] = []
        for node in topo.nodes:
            self._profiles.extend([profile_for(node.gpu_model)] * node.gpus)
        self._power = [p.idle_power_watts() for p in self._profiles]
        self._energy = [0.0] * total
        self._last = clock()

    def read(self) -> TelemetrySnapshot:
        now = self._clock()
        dt = max(0.0, now - self._last)
        self._last = now
        energy = self._energy
        for g, watts in enumerate(self._power):
            energy[g] += watts * dt
        util = [0.0] * len(energy)
        share = [0] * len(energy)
        caps: dict[int, float] = {}
        owners: dict[int, list[str]] = {}
        for spec, placement in self._holdings():
            u = default_utilization(spec)
            for slot in placement.slots:
                for g in slot.gpus:
                    util[g] += u * slot.milli / MILLI_PER_GPU
                    share[g] += slot.milli
                    owners.setdefault(g, []).append(spec.key)
                    if spec.power_cap_watts_per_gpu:
                        caps[g] = min(caps.get(g, math.inf), spec.power_cap_watts_per_gpu)
        readings: list[GPUReading] = []
        topo = self.topo
        for n, node in enumerate(topo.nodes):
            mem_total = DEFAULT_MEMORY_GIB.get(node.gpu_model, 80) * GIB
            for i, g in enumerate(topo.gpu_range(n)):
                profile = self._profiles[g]
                held = share[g] > 0
                u = min(1.0, util[g])
                watts = profile.power_watts(u, caps.get(g)) if held else \
                    profile.idle_power_watts()
                self._power[g] = watts
                readings.append(GPUReading(
                    node=node.name, index=i, model=node.gpu_model, power_watts=watts,
                    energy_joules=energy[g], utilization=u,
                    memory_used_bytes=int(mem_total * 0.9 * min(share[g], MILLI_PER_GPU)
                                          / MILLI_PER_GPU),
                    memory_total_bytes=mem_total,
                    temperature_celsius=30.0 + 45.0 * watts / profile.power_limit_watts,
                    sm_clock_mhz=1980.0 if held else 345.0,
                    power_limit_watts=profile.effective_cap_watts(caps.get(g)),
                    jobs=tuple(sorted(owners.get(g, ())))))
        return TelemetrySnapshot(now, self.name, tuple(readings))

    def close(self) -> None:
        return None


# --------------------------------------------------------------------------- NVML


@dataclass(slots=True)
class _NvmlGPU:
    handle: Any
    model: str
    counter_ok: bool = True
    base_joules: float = math.nan      # last hardware counter reading
    integral_joules: float = 0.0       # integrated power since that reading
    exported_joules: float = 0.0       # what the last read returned (monotonic)
    last_power: float = math.nan
    last_at: float = math.nan


class NvmlTelemetry:
    """The GPUs of this machine through NVML; one instance per node agent or operator pod.

    ``nvml`` is the ``pynvml`` module (injected by tests); ``node`` names this machine in
    the readings (default: the host name). Raises ``TelemetryUnavailableError`` when
    nvidia-ml-py is missing, the driver library cannot load, or no GPU is present.
    """

    name = "nvml"

    def __init__(self, node: str | None = None, nvml: Any = None,
                 clock: Callable[[], float] = time.monotonic,
                 energy_interval_seconds: float = 30.0) -> None:
        if not energy_interval_seconds > 0:
            raise ValueError(f"energy_interval_seconds must be > 0, got "
                             f"{energy_interval_seconds}")
        if nvml is None:
            try:
                import pynvml as nvml_module
            except ImportError as exc:
                raise TelemetryUnavailableError(
                    "NVML unavailable: nvidia-ml-py is not installed "
                    "(pip install 'aifactory[nvml]')") from exc
            nvml = nvml_module
        self.nvml = nvml
        self.node = node or socket.gethostname()
        self._clock = clock
        self.energy_interval_seconds = energy_interval_seconds
        self.energy_counter_reads = 0
        self._last_counter_at = -math.inf
        error = getattr(nvml, "NVMLError", Exception)
        try:
            nvml.nvmlInit()
        except error as exc:
            raise TelemetryUnavailableError(
                f"NVML unavailable: the NVIDIA driver library could not start ({exc}); "
                "is this a machine with an NVIDIA GPU and driver?") from exc
        except OSError as exc:
            raise TelemetryUnavailableError(f"NVML unavailable: {exc}") from exc
        try:
            count = int(nvml.nvmlDeviceGetCount())
            self._gpus = [self._open(i) for i in range(count)]
        except error as exc:
            nvml.nvmlShutdown()
            raise TelemetryUnavailableError(f"NVML unavailable: listing GPUs failed ({exc})"
                                            ) from exc
        if not self._gpus:
            nvml.nvmlShutdown()
            raise TelemetryUnavailableError("NVML unavailable: the driver sees no GPU here")
        self._closed = False

    def _open(self, index: int) -> _NvmlGPU:
        handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        raw = self._call(self.nvml.nvmlDeviceGetName, handle, default="unknown")
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        model = gpu_model_name(name)
        return _NvmlGPU(handle, model)

    def _call(self, fn: Callable[..., Any], *args: Any, default: Any = math.nan) -> Any:
        """One NVML call; a failing call (not supported, GPU lost) gives ``default``."""
        try:
            return fn(*args)
        except getattr(self.nvml, "NVMLError", Exception):
            return default

    @property
    def gpu_count(self) -> int:
        return len(self._gpus)

    def read(self) -> TelemetrySnapshot:
        nvml = self.nvml
        now = self._clock()
        read_counter = now - self._last_counter_at >= self.energy_interval_seconds
        if read_counter:
            self._last_counter_at = now
        readings: list[GPUReading] = []
        for i, gpu in enumerate(self._gpus):
            h = gpu.handle
            power = self._call(nvml.nvmlDeviceGetPowerUsage, h) / 1000.0
            util = self._call(nvml.nvmlDeviceGetUtilizationRates, h, default=None)
            mem = self._call(nvml.nvmlDeviceGetMemoryInfo, h, default=None)
            temp = float(self._call(nvml.nvmlDeviceGetTemperature, h,
                                    getattr(nvml, "NVML_TEMPERATURE_GPU", 0)))
            clock = float(self._call(nvml.nvmlDeviceGetClockInfo, h,
                                     getattr(nvml, "NVML_CLOCK_SM", 1)))
            limit = self._call(nvml.nvmlDeviceGetEnforcedPowerLimit, h) / 1000.0
            energy = self._energy(gpu, power, now, read_counter)
            readings.append(GPUReading(
                node=self.node, index=i, model=gpu.model, power_watts=power,
                energy_joules=energy,
                utilization=(util.gpu / 100.0) if util is not None else math.nan,
                memory_used_bytes=int(mem.used) if mem is not None else 0,
                memory_total_bytes=int(mem.total) if mem is not None else 0,
                temperature_celsius=temp, sm_clock_mhz=clock, power_limit_watts=limit))
        return TelemetrySnapshot(time.time(), self.name, tuple(readings))

    def _energy(self, gpu: _NvmlGPU, power: float, now: float, read_counter: bool) -> float:
        """Counter reading when due, else last reading + trapezoid of power since; never
        lower than what was exported before (a Prometheus counter must not go back)."""
        if not math.isnan(gpu.last_at) and not math.isnan(power):
            prev = power if math.isnan(gpu.last_power) else gpu.last_power
            gpu.integral_joules += (prev + power) / 2.0 * max(0.0, now - gpu.last_at)
        gpu.last_at = now
        if not math.isnan(power):
            gpu.last_power = power
        if read_counter and gpu.counter_ok:
            self.energy_counter_reads += 1
            millijoules = self._call(self.nvml.nvmlDeviceGetTotalEnergyConsumption,
                                     gpu.handle)
            if math.isnan(millijoules):
                gpu.counter_ok = False  # no counter on this GPU: integrate power only
            else:
                gpu.base_joules = millijoules / 1000.0
                gpu.integral_joules = 0.0
        base = 0.0 if math.isnan(gpu.base_joules) else gpu.base_joules
        gpu.exported_joules = max(gpu.exported_joules, base + gpu.integral_joules)
        return gpu.exported_joules

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._call(self.nvml.nvmlShutdown, default=None)


# --------------------------------------------------------------------------- attribution


class EnergyAttributor:
    """Per-job joules from per-GPU counters and who held each GPU over time.

    ``update(snapshot, owners)``: the increase of every GPU's counter since the previous
    update is split among the jobs that held it at that previous update (``owners`` maps a
    GPU to ``(job, milli)`` pairs), in proportion to their milli-GPU shares. Energy of an
    unheld GPU goes to nobody (``unattributed_joules``)."""

    def __init__(self) -> None:
        self.job_joules: dict[str, float] = {}
        self.unattributed_joules = 0.0
        self._last: dict[GPUKey, float] = {}
        self._owners: Mapping[GPUKey, Sequence[tuple[str, int]]] = {}

    def update(self, snapshot: TelemetrySnapshot,
               owners: Mapping[GPUKey, Sequence[tuple[str, int]]]) -> None:
        last = self._last
        held_by = self._owners
        jobs = self.job_joules
        for r in snapshot.gpus:
            key = (r.node, r.index)
            prev = last.get(key)
            last[key] = r.energy_joules
            if prev is None or not r.energy_joules > prev:
                continue
            delta = r.energy_joules - prev
            holders = held_by.get(key)
            total = sum(m for _, m in holders) if holders else 0
            if not total:
                self.unattributed_joules += delta
                continue
            for job, milli in holders or ():
                jobs[job] = jobs.get(job, 0.0) + delta * milli / total
        self._owners = owners
