"""The "fill until full" experiment of FGD (USENIX ATC'23), for any policy.

Jobs arrive in file order with no departures. Each is placed if the policy finds room, and
dropped otherwise (FGD counts it as failed). We record the GPU allocation rate and the
unallocated GPUs at the first job that does not fit, and at the moments the arrived demand
reaches given fractions of capacity (90 %, 95 %, 100 % by default).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from controller.placement import PlacementRequest, Unplaced
from controller.policies import PlacementPolicy
from controller.spec import JobSpec
from controller.state import ClusterState, Placement

__all__ = ["FillPoint", "FillResult", "fill"]


@dataclass(frozen=True, slots=True)
class FillPoint:
    """The factory when arrived demand first reached ``demand_fraction`` of capacity."""

    demand_fraction: float
    allocation_rate: float
    unallocated_gpus: float
    jobs_failed: int


@dataclass(frozen=True, slots=True)
class FillResult:
    policy: str
    gpus_total: int
    jobs_arrived: int
    jobs_placed: int
    jobs_failed: int
    allocation_rate_at_first_failure: float
    unallocated_gpus_at_first_failure: float
    final_allocation_rate: float
    decision_seconds_p99: float
    points: tuple[FillPoint, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["points"] = [asdict(p) for p in self.points]
        return out


def fill(state: ClusterState, jobs: Sequence[JobSpec], policy: PlacementPolicy,
         watts_per_gpu: Callable[[JobSpec], float] | None = None,
         checkpoints: Sequence[float] = (0.9, 0.95, 1.0),
         stop_at_demand: float = 1.0) -> FillResult:
    """Place ``jobs`` in order on ``state`` (mutated) until demand reaches ``stop_at_demand``."""
    from controller.metrics import percentile

    topo = state.topo
    total = topo.total_gpus
    demand = 0.0
    placed = failed = arrived = 0
    first_failure: tuple[float, float] | None = None
    points: list[FillPoint] = []
    pending_marks = sorted(checkpoints)
    times: list[float] = []
    for spec in jobs:
        if demand >= stop_at_demand * total - 1e-9:
            break
        arrived += 1
        demand += spec.gpu_equivalents
        watts = watts_per_gpu(spec) if (watts_per_gpu and policy.power_aware) else 0.0
        req = PlacementRequest.resolve(spec, topo, watts)
        got: Placement | Unplaced
        if isinstance(req, Unplaced):
            got = req
        else:
            t0 = time.perf_counter()
            got = policy.place(state, req, None)
            times.append(time.perf_counter() - t0)
        if isinstance(got, Placement) and got.complete:
            state.allocate(got)
            placed += 1
        else:
            failed += 1
            if first_failure is None:
                used = state.allocated_gpu_equivalents
                first_failure = (used / total, total - used)
        while pending_marks and demand >= pending_marks[0] * total - 1e-9:
            used = state.allocated_gpu_equivalents
            points.append(FillPoint(pending_marks.pop(0), used / total, total - used, failed))
    used = state.allocated_gpu_equivalents
    if first_failure is None:
        first_failure = (used / total, total - used)
    return FillResult(
        policy=policy.name, gpus_total=total, jobs_arrived=arrived, jobs_placed=placed,
        jobs_failed=failed, allocation_rate_at_first_failure=first_failure[0],
        unallocated_gpus_at_first_failure=first_failure[1],
        final_allocation_rate=used / total, decision_seconds_p99=percentile(times, 99),
        points=tuple(points))
