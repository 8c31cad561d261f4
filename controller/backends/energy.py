"""GPU energy without GPUs, and attribution of energy to jobs with or without them.

The Ray backend reads power from NVML where nodes have real GPUs and from the power model
(``controller.power.model``) where they do not. ``ModelMeter`` is the second source: every GPU draws
its idle power, or the model's power at the owning jobs' utilization, integrated into a
monotonic joule counter like NVML's total-energy counter. ``EnergyLedger`` serves both: given
successive counter readings and who owned each GPU, it splits every GPU's energy among its
jobs by their GPU share, so the energy of a job sums to the energy of the GPUs it held.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.model import profile_for

__all__ = ["EnergyLedger", "GpuKey", "ModelMeter", "Owner"]

GpuKey = tuple[str, int]
"""(node name, GPU index on the node)."""


@dataclass(frozen=True, slots=True)
class Owner:
    """A job's hold on one GPU: its share in milli-GPU, its utilization, its power cap."""

    job: str
    milli: int = MILLI_PER_GPU
    utilization: float = 0.93
    cap_watts: float | None = None


@dataclass(slots=True)
class _ModelGpu:
    model: str
    power: float
    energy: float = 0.0
    last: float = 0.0
    owners: dict[str, Owner] = field(default_factory=dict)


class ModelMeter:
    """Power and energy of GPUs by the power model; ``now`` is passed in (seconds)."""

    def __init__(self) -> None:
        self._gpus: dict[GpuKey, _ModelGpu] = {}

    def ensure_node(self, node: str, gpus: int, model: str, now: float) -> None:
        profile = profile_for(model)
        for i in range(gpus):
            if (node, i) not in self._gpus:
                self._gpus[(node, i)] = _ModelGpu(model, profile.idle_power_watts(), last=now)

    def assign(self, gpus: Iterable[GpuKey], owner: Owner, now: float) -> None:
        for key in gpus:
            gpu = self._gpus.get(key)
            if gpu is None:
                continue
            self._settle(gpu, now)
            gpu.owners[owner.job] = owner
            self._repower(gpu)

    def release(self, job: str, now: float) -> None:
        for gpu in self._gpus.values():
            if job in gpu.owners:
                self._settle(gpu, now)
                del gpu.owners[job]
                self._repower(gpu)

    def sample(self, now: float) -> dict[GpuKey, tuple[float, float, float, str]]:
        """(power W, energy counter J, utilization, model) of every GPU now."""
        out: dict[GpuKey, tuple[float, float, float, str]] = {}
        for key, gpu in self._gpus.items():
            self._settle(gpu, now)
            out[key] = (gpu.power, gpu.energy, _utilization(gpu), gpu.model)
        return out

    def owners(self, key: GpuKey) -> tuple[str, ...]:
        gpu = self._gpus.get(key)
        return tuple(sorted(gpu.owners)) if gpu is not None else ()

    @staticmethod
    def _settle(gpu: _ModelGpu, now: float) -> None:
        if now > gpu.last:
            gpu.energy += gpu.power * (now - gpu.last)
            gpu.last = now

    @staticmethod
    def _repower(gpu: _ModelGpu) -> None:
        profile = profile_for(gpu.model)
        if not gpu.owners:
            gpu.power = profile.idle_power_watts()
            return
        caps = [o.cap_watts for o in gpu.owners.values() if o.cap_watts]
        gpu.power = profile.power_watts(_utilization(gpu), min(caps) if caps else None)


def _utilization(gpu: _ModelGpu) -> float:
    return min(1.0, sum(o.utilization * o.milli / MILLI_PER_GPU for o in gpu.owners.values()))


class EnergyLedger:
    """Splits the growth of each GPU's energy counter among the jobs that own the GPU."""

    def __init__(self) -> None:
        self._last: dict[GpuKey, float] = {}
        self.job_joules: dict[str, float] = {}

    def observe(self, counters: Mapping[GpuKey, float],
                owners: Mapping[GpuKey, Mapping[str, int]]) -> None:
        """``counters``: joules per GPU now; ``owners``: job -> milli of each owned GPU
        over the interval since the last observation."""
        for key, joules in counters.items():
            before = self._last.get(key)
            self._last[key] = joules
            if before is None or joules < before:
                continue  # first reading, or the counter was reset (driver reload)
            shares = owners.get(key) or {}
            total = sum(shares.values())
            if not total:
                continue
            delta = joules - before
            for job, milli in shares.items():
                self.job_joules[job] = self.job_joules.get(job, 0.0) + delta * milli / total

    def rebase(self) -> None:
        """Forget the last counters (the source changed): the next reading starts anew."""
        self._last.clear()

    def joules(self, job: str) -> float:
        return self.job_joules.get(job, 0.0)
