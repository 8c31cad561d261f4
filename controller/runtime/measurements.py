"""What a control plane measures as it runs, the same way for every policy and backend.

Time-weighted GPU allocation (the GPUs *requested* by running jobs over the factory's GPUs,
as FGD defines the allocation rate: a 0.3-GPU share counts 0.3 even where a policy without
GPU sharing gives it a whole GPU, and GPUs a non-gang policy holds for a partly placed gang
count nothing until the gang runs), queue waits, gang locality (inside one rack / one block, racks
spanned), jobs that waited while enough GPUs were free in total (fragmentation), energy from
the power model, cost, decision latency, preemptions, restarts and the seconds any power
budget's modelled draw was above its limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from aifactory.controller.core.histogram import (
    DECISION_BUCKETS_SECONDS,
    QUEUE_WAIT_BUCKETS_SECONDS,
    Histogram,
    LabelledHistogram,
)
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.model import CostModel, profile_for
from aifactory.controller.power.utilisation import default_utilization
from aifactory.controller.runtime.reservoir import Reservoir

if TYPE_CHECKING:
    pass

__all__ = ["SimMetrics", "SimResult", "percentile"]


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    data = sorted(values)
    if not data:
        return 0.0
    rank = max(0, min(len(data) - 1, round(q / 100.0 * len(data) + 0.5) - 1))
    return data[rank]


@dataclass(frozen=True, slots=True)
class SimResult:
    """One policy's numbers from one run (``--json`` writes these)."""

    policy: str
    jobs_submitted: int
    jobs_completed: int
    jobs_failed: int
    jobs_never_placed: int
    gpus_total: int
    gpu_allocation_rate_mean: float
    queue_wait_seconds_mean: float
    queue_wait_seconds_p95: float
    gang_single_rack_fraction: float
    gang_single_block_fraction: float
    racks_spanned_mean: float
    unplaced_while_capacity_free: int
    energy_joules: float
    cost_dollars: float
    gpu_hours: float
    decision_seconds_p50: float
    decision_seconds_p99: float
    preemptions: int
    restarts: int
    power_budget_exceeded_seconds: float
    simulated_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SimMetrics:
    """Accumulates metrics as the simulation moves; O(1) per event."""

    def __init__(self, topo: Topology, state: ClusterState, cost: CostModel) -> None:
        self.topo = topo
        self.state = state
        self.cost = cost
        names = topo.level_names
        self.rack_level = names.index("rack") if "rack" in names else None
        self.block_level = names.index("block") if "block" in names else None
        self.rack_capacity = max((d.gpus for d in topo.domains[self.rack_level]), default=0) \
            if self.rack_level is not None else 0
        self.block_capacity = max((d.gpus for d in topo.domains[self.block_level]),
                                  default=0) if self.block_level is not None else 0
        idle = sum(profile_for(topo.nodes[n].gpu_model).idle_power_watts() * topo.nodes[n].gpus
                   for n in range(len(topo.nodes)))
        self.total_watts = idle
        self.budget_actual = list(state.budgets.baseline_watts)
        self.job_watts: dict[str, list[tuple[int, float]]] = {}
        self.job_delta: dict[str, float] = {}
        self.job_gpus: dict[str, float] = {}
        self.running_gpus = 0.0
        self.last_t = 0.0
        self.start_t = 0.0
        self.alloc_integral = 0.0
        self.alloc_now = 0.0
        self.fenced_gpus = 0.0  # failed GPUs fenced off by a placeholder allocation
        self.energy_joules = 0.0
        self.exceeded_seconds = 0.0
        # Bounded: exact below 100,000 values, a uniform sample beyond (a long-running
        # control plane sees a wait per job and a decision per placement, forever).
        self.waits = Reservoir()
        self.decision_times = Reservoir()
        # Highest modelled draw of each budget over its limit (a ratio; 1.0 = at the limit).
        self.budget_peak_ratio = [a / lim if lim > 0 else 0.0 for a, lim in
                                  zip(self.budget_actual, state.budgets.limits, strict=True)]
        self.submitted = 0
        self.completed = 0
        self.jobs_failed = 0
        self.preemptions = 0
        self.restarts = 0
        self.gangs_fit_rack = 0
        self.gangs_in_rack = 0
        self.gangs_fit_block = 0
        self.gangs_in_block = 0
        self.racks_spanned = Reservoir()
        self.unplaced_while_free: set[str] = set()
        self.unplaced_forgotten = 0  # jobs counted above, then forgotten
        # For the Prometheus exporter (controller.observe.snapshot): filled as things happen.
        self.queue_waits = LabelledHistogram(QUEUE_WAIT_BUCKETS_SECONDS)
        self.decision_histogram = Histogram(DECISION_BUCKETS_SECONDS)
        self.attempts: dict[str, int] = {"admitted": 0, "waiting": 0, "failed": 0}
        self.job_gpu_seconds: dict[str, float] = {}
        self._job_held: dict[str, tuple[float, float]] = {}

    def start(self, now: float) -> None:
        self.last_t = self.start_t = now

    def observe(self, now: float) -> None:
        """Integrate allocation, power and budget overruns up to ``now``."""
        dt = now - self.last_t
        if dt > 0:
            self.alloc_integral += self.alloc_now * dt
            self.energy_joules += self.total_watts * dt
            limits = self.state.budgets.limits
            if any(a > lim + 1e-6 for a, lim in zip(self.budget_actual, limits, strict=True)):
                self.exceeded_seconds += dt
            self.last_t = now
        self.alloc_now = self.running_gpus

    def job_submitted(self, spec: JobSpec) -> None:
        self.submitted += 1

    def job_started(self, spec: JobSpec, wait: float, placement: Placement) -> None:
        self.waits.add(wait)
        self.queue_waits.observe(spec.queue, wait)
        if spec.workers > 1 and not spec.is_fractional:
            if self.rack_level is not None:
                racks = len(placement.domains_at(self.topo, self.rack_level))
                self.racks_spanned.add(racks)
                if spec.total_gpus <= self.rack_capacity:
                    self.gangs_fit_rack += 1
                    self.gangs_in_rack += racks == 1
            if self.block_level is not None and spec.total_gpus <= self.block_capacity:
                self.gangs_fit_block += 1
                self.gangs_in_block += len(placement.domains_at(self.topo,
                                                                self.block_level)) == 1

    def rebind(self, state: ClusterState) -> None:
        """Follow a state rebuilt with other power budgets (the operator's PowerBudgets
        changed): one draw and one peak per budget of the new state, counted afresh (the
        running jobs are then re-added with ``job_running``)."""
        self.state = state
        self.budget_actual = list(state.budgets.baseline_watts)
        self.budget_peak_ratio = [a / lim if lim > 0 else 0.0 for a, lim in
                                  zip(self.budget_actual, state.budgets.limits, strict=True)]

    def job_running(self, spec: JobSpec, placement: Placement, now: float) -> None:
        """Add the job's modelled draw (actual utilization, not the budget estimate)."""
        self.observe(now)
        util = default_utilization(spec)
        per_budget: dict[int, float] = {}
        delta_total = 0.0
        for slot in placement.slots:
            profile = profile_for(self.topo.nodes[slot.node].gpu_model)
            delta = (profile.power_watts(util, spec.power_cap_watts_per_gpu)
                     - profile.idle_power_watts()) * len(slot.gpus) * slot.milli / MILLI_PER_GPU
            delta_total += delta
            for b in self.state.budgets.node_budgets[slot.node]:
                per_budget[b] = per_budget.get(b, 0.0) + delta
        limits = self.state.budgets.limits
        for b, w in per_budget.items():
            self.budget_actual[b] += w
            if limits[b] > 0:
                self.budget_peak_ratio[b] = max(self.budget_peak_ratio[b],
                                                self.budget_actual[b] / limits[b])
        self.total_watts += delta_total
        self.job_watts[spec.key] = list(per_budget.items())
        self.job_delta[spec.key] = delta_total
        self._job_held[spec.key] = (now, placement.gpu_equivalents)
        self.running_gpus += spec.gpu_equivalents - self.job_gpus.get(spec.key, 0.0)
        self.job_gpus[spec.key] = spec.gpu_equivalents
        self.alloc_now = self.running_gpus

    def job_stopped(self, spec: JobSpec, now: float) -> None:
        self.observe(now)
        for b, w in self.job_watts.pop(spec.key, []):
            self.budget_actual[b] -= w
        self.total_watts -= self.job_delta.pop(spec.key, 0.0)
        since, gpus = self._job_held.pop(spec.key, (now, 0.0))
        self.job_gpu_seconds[spec.key] = self.job_gpu_seconds.get(spec.key, 0.0) + \
            max(0.0, now - since) * gpus
        self.running_gpus -= self.job_gpus.pop(spec.key, 0.0)
        self.alloc_now = self.running_gpus

    def job_completed(self, spec: JobSpec, energy_joules: float) -> None:
        self.completed += 1

    def forget(self, key: str) -> None:
        """Drop what is kept per job for a job the control plane no longer holds."""
        self.job_gpu_seconds.pop(key, None)
        self._job_held.pop(key, None)
        if key in self.unplaced_while_free:
            self.unplaced_while_free.discard(key)
            self.unplaced_forgotten += 1

    def decisions(self, seconds: Iterable[float]) -> None:
        times = tuple(seconds)
        self.decision_times.extend(times)
        self.decision_histogram.observe_all(times)

    def count_attempts(self, admitted: int, waiting: int, failed: int) -> None:
        """One scheduling cycle's outcomes, per job considered."""
        self.attempts["admitted"] += admitted
        self.attempts["waiting"] += waiting
        self.attempts["failed"] += failed

    def gpu_seconds(self, key: str, now: float) -> float:
        """GPU-seconds a job has held so far (GPU-equivalents x seconds, every run)."""
        held = self.job_gpu_seconds.get(key, 0.0)
        since = self._job_held.get(key)
        if since is not None:
            held += max(0.0, now - since[0]) * since[1]
        return held

    def result(self, policy: str, now: float, never_placed: int) -> SimResult:
        self.observe(now)
        span = max(now - self.start_t, 1e-9)
        total = self.topo.total_gpus
        gpu_seconds = self.alloc_integral
        return SimResult(
            policy=policy,
            jobs_submitted=self.submitted,
            jobs_completed=self.completed,
            jobs_failed=self.jobs_failed,
            jobs_never_placed=never_placed,
            gpus_total=total,
            gpu_allocation_rate_mean=(self.alloc_integral / span / total) if total else 0.0,
            queue_wait_seconds_mean=self.waits.mean,
            queue_wait_seconds_p95=percentile(self.waits, 95),
            gang_single_rack_fraction=(self.gangs_in_rack / self.gangs_fit_rack
                                       if self.gangs_fit_rack else 1.0),
            gang_single_block_fraction=(self.gangs_in_block / self.gangs_fit_block
                                        if self.gangs_fit_block else 1.0),
            racks_spanned_mean=self.racks_spanned.mean,
            unplaced_while_capacity_free=len(self.unplaced_while_free) + self.unplaced_forgotten,
            energy_joules=self.energy_joules,
            cost_dollars=self.cost.cost_dollars(self.energy_joules, gpu_seconds),
            gpu_hours=gpu_seconds / 3600.0,
            decision_seconds_p50=percentile(self.decision_times, 50),
            decision_seconds_p99=percentile(self.decision_times, 99),
            preemptions=self.preemptions,
            restarts=self.restarts,
            power_budget_exceeded_seconds=self.exceeded_seconds,
            simulated_seconds=span,
        )
