"""Energy and power caps of the Ray backend's gangs: which job owns which GPU, and its cap.

Power comes from NVML through a per-node telemetry actor where nodes have GPUs, else from
the power model (``controller.backends.ray.telemetry.GpuPower``). ``GangPower`` tells that
meter which gang owns which GPU (so a job's joules are its GPUs' joules) and sets the GPU
power limits of grid-event caps through an actuator: by default ``NodeNvml``, NVML on each
node through its telemetry actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from aifactory.controller.backends.actuators import PowerActuator
from aifactory.controller.backends.base import TelemetrySnapshot
from aifactory.controller.backends.energy import GpuKey, Owner
from aifactory.controller.backends.ray.gang import RayNode, WorkerPlan
from aifactory.controller.backends.ray.telemetry import GpuPower
from aifactory.controller.backends.ray.tracking import TrackedGang
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.utilisation import default_utilization

log = logging.getLogger(__name__)

__all__ = ["GangPower", "NodeNvml"]


class GangPower:
    """The power side of the gangs in ``gangs`` (the backend's own record, read live):
    ``meter`` samples the GPUs of ``ray_nodes()``, ``actuator`` sets their limits."""

    def __init__(self, meter: GpuPower, actuator: PowerActuator,
                 gangs: Mapping[str, TrackedGang],
                 ray_nodes: Callable[[], Sequence[RayNode]]) -> None:
        self.meter = meter
        self.actuator = actuator
        self._gangs = gangs
        self._ray_nodes = ray_nodes

    def cap(self, gang: TrackedGang, watts: float | None) -> None:
        """Every GPU of ``gang`` to ``watts`` (None: the GPU's default)."""
        for plan in gang.plans:
            self.actuator.set_power_limits(plan.node, dict.fromkeys(plan.local_gpus, watts))
        gang.capped = watts is not None

    def own(self, spec: JobSpec, plans: Sequence[WorkerPlan], now: float) -> None:
        """The GPUs of ``plans`` are ``spec``'s from ``now`` (energy up to now is sampled
        first, for their previous owners)."""
        self.sample(now)
        owner = Owner(spec.key, plans[0].milli if plans else MILLI_PER_GPU,
                      default_utilization(spec), spec.power_cap_watts_per_gpu)
        self.meter.assign(((p.node, g) for p in plans for g in p.local_gpus), owner, now)

    def owners(self) -> dict[GpuKey, dict[str, int]]:
        """The live gangs' milli-GPUs on every GPU (the GPUs their workers report, with
        NVML; else the ones planned)."""
        owners: dict[GpuKey, dict[str, int]] = {}
        for gang in self._gangs.values():
            if gang.final is not None:
                continue
            for plan in gang.plans:
                report = gang.reports.get(plan.rank)
                ids = [int(g) for g in report.gpu_ids if g.isdigit()] if report and \
                    self.meter.nvml else list(plan.local_gpus)
                for g in ids:
                    owners.setdefault((plan.node, g), {})[gang.job] = plan.milli
        return owners

    def sample(self, now: float) -> None:
        self.meter.sample(now, self._ray_nodes(), self.owners())

    def snapshot(self, now: float) -> TelemetrySnapshot:
        return self.meter.snapshot(now, self._ray_nodes(), self.owners())


class NodeNvml:
    """The default actuator: NVML on the gang's nodes, through their telemetry actors."""

    def __init__(self, meter: GpuPower, ray_nodes: Callable[[], Sequence[RayNode]]) -> None:
        self.meter = meter
        self._ray_nodes = ray_nodes

    def set_power_limits(self, node: str, limits: Mapping[int, float | None]) -> None:
        ray_node = next((n for n in self._ray_nodes() if n.info.name == node), None)
        if ray_node is None:
            log.warning("power limits for %s not set: the node left", node)
            return
        for index, error in self.meter.set_power_limits(ray_node, limits).items():
            log.warning("power limit of GPU %d on %s not set: %s", index, node, error)
