"""Per-node GPU telemetry on a Ray cluster: a tiny actor on each GPU node that reads NVML.

``nvml_readings()`` is the one place that talks to NVML (``nvidia-ml-py``, imported lazily):
it returns plain dicts, or None where NVML or a GPU is missing, in which case the backend
falls back to the power model (``aifactory.controller.backends.energy.ModelMeter``). When
``controller.observe.telemetry`` grows its own NVML source, this function can delegate to it.
The actor asks for no CPU and is pinned to its node by node affinity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aifactory.controller.backends.actuators import nvml_set_power_limits
from aifactory.controller.backends.base import GPUReading, TelemetrySnapshot
from aifactory.controller.backends.energy import EnergyLedger, GpuKey, ModelMeter, Owner
from aifactory.controller.backends.ray.gang import RayNode
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import DEFAULT_MEMORY_GIB, GIB

__all__ = ["GpuPower", "NodeTelemetry", "nvml_readings"]


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

    def set_power_limits(self, limits: Mapping[int, float | None]) -> dict[int, str]:
        return nvml_set_power_limits(limits)


class GpuPower:
    """Power and energy of a Ray cluster's GPUs, booked to the jobs that hold them.

    ``mode``: ``nvml`` (telemetry actors), ``model`` (power model), or ``auto`` (NVML when
    every GPU node answers with readings, else the model for good). Never blocks: reads go
    out to the node actors and are collected on a later call once all have answered, so NVML
    readings lag one sampling interval; until then the model stands in."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "nvml", "model"):
            raise SpecError("telemetry", f"must be auto, nvml or model, got {mode!r}")
        self.mode = mode
        self._meter = ModelMeter()
        self._ledger = EnergyLedger()
        self._actor_cls = ray.remote(NodeTelemetry)
        self._probes: dict[str, Any] = {}
        self._reads: dict[str, Any] = {}

    @property
    def nvml(self) -> bool:
        return self.mode == "nvml"

    def ensure_node(self, node: str, gpus: int, model: str, now: float) -> None:
        self._meter.ensure_node(node, gpus, model, now)

    def assign(self, gpus: Iterable[GpuKey], owner: Owner, now: float) -> None:
        self._meter.assign(gpus, owner, now)

    def release(self, job: str, now: float) -> None:
        self._meter.release(job, now)

    def joules(self, job: str) -> float:
        return self._ledger.joules(job)

    def _nvml(self, nodes: Sequence[RayNode]) -> dict[str, list[dict[str, Any]]] | None:
        if self.mode == "model":
            return None
        for n in nodes:
            if n.node_id not in self._probes:
                self._probes[n.node_id] = self._actor_cls.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                        n.node_id, soft=False)).remote()
        if not self._reads:
            self._reads = {n.info.name: self._probes[n.node_id].read.remote() for n in nodes}
            return None
        ready, _ = ray.wait(list(self._reads.values()), num_returns=len(self._reads),
                            timeout=0)
        if len(ready) < len(self._reads):
            return None
        out: dict[str, list[dict[str, Any]]] = {}
        for name, ref in self._reads.items():
            try:
                readings = ray.get(ref)
            except Exception:
                readings = None
            if readings:
                out[name] = readings
        self._reads = {}
        if self.mode == "auto":
            if out and len(out) == len(nodes):
                self.mode = "nvml"
                self._ledger.rebase()
            else:
                self.mode = "model"
                self.close()
                return None
        return out

    def sample(self, now: float, nodes: Sequence[RayNode],
               owners: Mapping[GpuKey, Mapping[str, int]]) -> dict[GpuKey, GPUReading]:
        """Read every GPU (NVML, else the model) and book the energy since the last read to
        the jobs in ``owners`` (job -> milli per GPU)."""
        readings = self._nvml(nodes)
        sample: dict[GpuKey, GPUReading] = {}
        if readings is None:
            for (node, index), (watts, joules, util, model) in self._meter.sample(now).items():
                profile = profile_for(model)
                sample[(node, index)] = GPUReading(
                    node=node, index=index, model=model, power_watts=watts,
                    energy_joules=joules, utilization=util, memory_used_bytes=0,
                    memory_total_bytes=DEFAULT_MEMORY_GIB.get(model, 80) * GIB,
                    temperature_celsius=30.0 + 45.0 * watts / profile.power_limit_watts,
                    sm_clock_mhz=0.0, power_limit_watts=profile.power_limit_watts)
        else:
            for node, rows in readings.items():
                for r in rows:
                    index = int(r["index"])
                    sample[(node, index)] = GPUReading(
                        node=node, index=index, model=str(r["model"]),
                        power_watts=float(r["power_watts"]),
                        energy_joules=float(r["energy_joules"]),
                        utilization=float(r["utilization"]),
                        memory_used_bytes=int(r["memory_used_bytes"]),
                        memory_total_bytes=int(r["memory_total_bytes"]),
                        temperature_celsius=float(r["temperature_celsius"]),
                        sm_clock_mhz=float(r["sm_clock_mhz"]),
                        power_limit_watts=float(r["power_limit_watts"]))
        self._ledger.observe({k: v.energy_joules for k, v in sample.items()}, owners)
        return sample

    def snapshot(self, now: float, nodes: Sequence[RayNode],
                 owners: Mapping[GpuKey, Mapping[str, int]]) -> TelemetrySnapshot:
        sample = self.sample(now, nodes, owners)
        out = []
        for key, reading in sorted(sample.items()):
            held = owners.get(key) or {}
            used = reading.memory_used_bytes
            if not self.nvml:
                share = min(1.0, sum(held.values()) / MILLI_PER_GPU)
                used = int(reading.memory_total_bytes * 0.9 * share)
            out.append(replace(reading, memory_used_bytes=used, jobs=tuple(sorted(held))))
        return TelemetrySnapshot(now, "nvml" if self.nvml else "model", tuple(out))

    def set_power_limits(self, node: RayNode, limits: Mapping[int, float | None],
                         timeout: float = 10.0) -> dict[int, str]:
        """NVML power limits on one node, through its telemetry actor (what failed)."""
        if node.node_id not in self._probes:
            self._probes[node.node_id] = self._actor_cls.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                    node.node_id, soft=False)).remote()
        try:
            got: dict[int, str] = ray.get(
                self._probes[node.node_id].set_power_limits.remote(dict(limits)),
                timeout=timeout)
        except Exception as exc:
            return dict.fromkeys(limits, f"node {node.info.name}: {exc}")
        return got

    def close(self) -> None:
        for actor in self._probes.values():
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self._probes.clear()
        self._reads = {}
