"""The "fill until full" experiment of FGD (USENIX ATC'23), for any policy.

Jobs arrive in order with no departures. Each is placed if the policy finds room, and
dropped otherwise (FGD counts it as failed). As in FGD's analysis scripts, the allocation
rate is the GPU *requested* by placed jobs over the factory's GPUs (a 0.3-GPU pod counts
0.3 even where a policy without GPU sharing gives it a whole GPU), "unallocated GPUs" is
capacity minus that, and both are read when the arrived demand (GPUs requested by every
job so far, placed or not) first reaches given fractions of capacity (90 %, 95 %, 100 % by
default), and at the first job that does not fit.

``fgd_order`` builds FGD's submission sequence for a seed exactly as FGD's Go simulator
does: jobs sorted by name, shuffled, then resampled (or trimmed) until their demand is
``ratio`` x capacity (FGD uses 1.3), with Go's ``math/rand`` (``controller.sim.gorand``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.placement.fragmentation import WorkloadMix
from aifactory.controller.placement.request import PlacementRequest, Unplaced
from aifactory.controller.sim.gorand import GoRand

__all__ = ["FillPoint", "FillResult", "fgd_order", "fill"]


@dataclass(frozen=True, slots=True)
class FillPoint:
    """The factory when arrived demand first reached ``demand_fraction`` of capacity."""

    demand_fraction: float
    allocation_rate: float
    unallocated_gpus: float
    jobs_failed: int
    occupied_gpus: float = 0.0


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
    demand_reached: float = 0.0
    decision_seconds_p50: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["points"] = [asdict(p) for p in self.points]
        return out


def fill(state: ClusterState, jobs: Sequence[JobSpec], policy: PlacementPolicy,
         watts_per_gpu: Callable[[JobSpec], float] | None = None,
         checkpoints: Sequence[float] = (0.9, 0.95, 1.0),
         stop_at_demand: float = 1.0,
         known_workload: Sequence[JobSpec] | None = None) -> FillResult:
    """Place ``jobs`` in order on ``state`` (mutated) until demand reaches ``stop_at_demand``.

    ``known_workload``: the workload whose shapes a policy that scores by them may know
    before the first placement (FGD derives its typical pods from the pod list up front);
    without it the policy learns the shapes from the requests as they arrive."""
    from aifactory.controller.runtime.measurements import percentile

    topo = state.topo
    total = topo.total_gpus
    demand = 0.0
    allocated = 0.0  # GPUs requested by placed jobs (FGD's used_gpu_milli / 1000)
    placed = failed = arrived = 0
    first_failure: tuple[float, float] | None = None
    points: list[FillPoint] = []
    pending_marks = sorted(checkpoints)
    times: list[float] = []
    mix = WorkloadMix()  # the workload seen so far, for a policy that scores by it
    if known_workload is not None:
        for spec in known_workload:
            known = PlacementRequest.resolve(spec, topo)
            if not isinstance(known, Unplaced):
                policy.learn(mix, known, state.host_tracked)
        mix.frozen = True
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
            policy.learn(mix, req, state.host_tracked)
            t0 = time.perf_counter()
            got = policy.place(state, req, None, mix)
            times.append(time.perf_counter() - t0)
        if isinstance(got, Placement) and got.complete:
            state.allocate(got)
            placed += 1
            allocated += spec.gpu_equivalents
        else:
            failed += 1
            if first_failure is None:
                first_failure = (allocated / total, total - allocated)
        while pending_marks and demand >= pending_marks[0] * total - 1e-9:
            points.append(FillPoint(pending_marks.pop(0), allocated / total,
                                    total - allocated, failed,
                                    state.allocated_gpu_equivalents))
    if first_failure is None:
        first_failure = (allocated / total, total - allocated)
    return FillResult(
        policy=policy.name, gpus_total=total, jobs_arrived=arrived, jobs_placed=placed,
        jobs_failed=failed, allocation_rate_at_first_failure=first_failure[0],
        unallocated_gpus_at_first_failure=first_failure[1],
        final_allocation_rate=allocated / total, decision_seconds_p99=percentile(times, 99),
        points=tuple(points), demand_reached=demand / total if total else 0.0,
        decision_seconds_p50=percentile(times, 50))


def _milli_total(spec: JobSpec) -> int:
    """FGD's ``TotalMilliGpu``: GPUs x milli-GPU per GPU (0 for a CPU-only pod)."""
    return spec.gpu_milli if spec.is_fractional else spec.total_gpus * MILLI_PER_GPU


def _milli_per_gpu(spec: JobSpec) -> int:
    """FGD's ``MilliGpu``: milli-GPU per GPU (1000 for whole GPUs, 0 for a CPU-only pod)."""
    return 0 if spec.cpu_only else spec.gpu_milli


def fgd_order(jobs: Sequence[JobSpec], capacity_gpus: float, seed: int,
              ratio: float = 1.3) -> list[JobSpec]:
    """FGD's submission sequence for one seed, draw for draw (``controller.sim.gorand``).

    As FGD's simulator does (``Simulate``: ``rand.Seed``, one ``rand.Int`` to log the seed;
    ``SortClusterPods``: sort by name, ``rand.Shuffle``; ``TunePodsByNodeTotalResource``):
    while the pods' GPU demand exceeds ``ratio`` x capacity, remove a random pod; while
    below, append a random pod of the name-sorted list, renamed ``<name>-tuned-<i>``, and
    stop at the first draw whose *per-GPU* milli would pass the target (FGD compares
    ``MilliGpu``, not the pod's total; kept for fidelity). ``jobs`` must be the whole pod
    list, CPU-only pods included, for the draws to match FGD's (FGD uses seeds 42-51).
    """
    rng = GoRand(seed)
    rng.int_()  # FGD's log.Debugf("Random Int: %d", rand.Int()) draws once
    ordered = sorted(jobs, key=lambda s: s.name)
    out = list(ordered)

    def swap(i: int, j: int) -> None:
        out[i], out[j] = out[j], out[i]

    rng.shuffle(len(out), swap)
    if ratio <= 0 or not any(_milli_total(s) for s in ordered):
        return out  # nothing to tune by (FGD's simulator panics on a list without GPU pods)
    total = sum(_milli_total(s) for s in out)
    target = ratio * capacity_gpus * MILLI_PER_GPU
    if total > target:
        while total > target and out:
            i = rng.intn(len(out))
            total -= _milli_total(out.pop(i))
    elif total < target:
        i = 0
        while True:
            pick = ordered[rng.intn(len(ordered))]
            if total + _milli_per_gpu(pick) > target:
                break
            out.append(replace(pick, name=f"{pick.name}-tuned-{i}"))
            total += _milli_total(pick)
            i += 1
    return out
