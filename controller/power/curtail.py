"""Which running jobs give up power when a budget falls below the draw: pure planning.

Given the running jobs in a budget's scope (each with its flexibility tier, GPUs, power
profile, utilization and own cap), the budget's modelled draw with no grid-event cap on any
job, and the new limit, a strategy returns the caps and pauses that bring the draw under it:

- ``flexible`` (ours): caps first, most flexible tier first, every job of a tier slowed
  alike and no further than its tier allows (``FLEX_SLOWDOWN``); capping saves far more
  watts per unit of lost speed than pausing (dynamic power ~ speed^3). Only when every
  tier's caps are not enough, checkpoint and pause jobs, most flexible tier first and the
  least work lost since the last checkpoint first. Tier 0 is never touched; what cannot be
  shed without it is reported as ``short_watts``.
- ``uniform``: one cap on every GPU in scope, whatever the tier (a baseline).
- ``pause_newest``: pause the most recently started jobs until under (a baseline).

Plans are computed from the uncapped picture every time, so the controller applies the
difference and a rising limit relaxes caps by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aifactory.controller.power.grid import FLEX_SLOWDOWN
from aifactory.controller.power.model import GPUPowerProfile
from aifactory.controller.power.utilisation import speed_under_cap

__all__ = [
    "STRATEGIES",
    "CurtailPlan",
    "FlexJob",
    "flexible",
    "job_watts",
    "pause_newest",
    "uniform",
]

_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class FlexJob:
    """A running job as curtailment sees it. ``slots``: (GPU profile, GPU-equivalents) per
    worker slot; ``own_cap``: the cap the job runs under without any grid event (its own,
    or power-capped admission's); ``lost_if_paused``: GPU-seconds of work since its last
    checkpoint; ``pausable``: it can resume from a checkpoint (training)."""

    key: str
    tier: int
    slots: tuple[tuple[GPUPowerProfile, float], ...]
    utilization: float
    own_cap: float | None
    lost_if_paused: float
    started_at: float
    pausable: bool = True

    @property
    def gpus(self) -> float:
        return sum(g for _, g in self.slots)

    def speed(self, cap: float | None) -> float:
        return speed_under_cap(self.slots[0][0], self.utilization, cap) if self.slots else 1.0


@dataclass(frozen=True, slots=True)
class CurtailPlan:
    """Per-GPU caps (job -> watts) and jobs to pause; ``shed_watts`` below the uncapped
    draw; ``short_watts`` still over the limit when all allowed actions are taken."""

    caps: dict[str, float]
    pauses: tuple[str, ...]
    shed_watts: float
    short_watts: float


def job_watts(job: FlexJob, cap: float | None) -> float:
    """Modelled draw of the job's GPUs under ``cap`` (None: its own cap)."""
    eff = job.own_cap if cap is None else (cap if job.own_cap is None
                                           else min(cap, job.own_cap))
    return sum(p.power_watts(job.utilization, eff) * g for p, g in job.slots)


def _idle_watts(job: FlexJob) -> float:
    return sum(p.idle_power_watts() * g for p, g in job.slots)


def cap_for_slowdown(job: FlexJob, slowdown: float) -> float | None:
    """The lowest per-GPU cap that keeps the job at ``1 - slowdown`` of its own speed
    (None: no cap needed, i.e. no slowdown)."""
    if slowdown <= 0 or not job.slots:
        return None
    profile = job.slots[0][0]
    target = job.speed(job.own_cap) * (1.0 - slowdown)
    low, high = profile.min_power_limit_watts, profile.effective_cap_watts(job.own_cap)
    if job.speed(low) >= target:
        return low
    for _ in range(30):
        mid = (low + high) / 2
        if job.speed(mid) >= target:
            high = mid
        else:
            low = mid
    return high


def _caps_at(jobs: Sequence[FlexJob], slowdown: float) -> tuple[dict[str, float], float]:
    caps: dict[str, float] = {}
    saved = 0.0
    for j in jobs:
        cap = cap_for_slowdown(j, min(slowdown, FLEX_SLOWDOWN.get(j.tier, 0.0)))
        if cap is None:
            continue
        s = job_watts(j, None) - job_watts(j, cap)
        if s > _EPS:
            caps[j.key] = cap
            saved += s
    return caps, saved


def _caps_by_tier(jobs: Sequence[FlexJob], need: float) -> tuple[dict[str, float], float]:
    """Caps shedding at least ``need`` watts if they can: tiers from the most flexible,
    each tier slowed alike by the least common slowdown that covers what is left."""
    caps: dict[str, float] = {}
    saved = 0.0
    for tier in sorted({j.tier for j in jobs if j.tier > 0}, reverse=True):
        rest = need - saved
        if rest <= _EPS:
            break
        group = [j for j in jobs if j.tier == tier]
        full_caps, full = _caps_at(group, FLEX_SLOWDOWN.get(tier, 0.0))
        if full <= rest:
            caps.update(full_caps)
            saved += full
            continue
        low, high = 0.0, FLEX_SLOWDOWN.get(tier, 0.0)
        for _ in range(30):
            mid = (low + high) / 2
            if _caps_at(group, mid)[1] >= rest:
                high = mid
            else:
                low = mid
        got, s = _caps_at(group, high)
        caps.update(got)
        saved += s
    return caps, saved


def flexible(jobs: Sequence[FlexJob], draw: float, limit: float) -> CurtailPlan:
    """Ours: caps by tier first, then pauses (see the module doc)."""
    need = draw - limit
    if need <= _EPS:
        return CurtailPlan({}, (), 0.0, 0.0)
    candidates = sorted((j for j in jobs if j.tier > 0 and j.pausable),
                        key=lambda j: (-j.tier, j.lost_if_paused, -j.started_at, j.key))
    paused: list[FlexJob] = []
    while True:
        by_pause = sum(job_watts(j, None) - _idle_watts(j) for j in paused)
        keys = {j.key for j in paused}
        caps, by_caps = _caps_by_tier([j for j in jobs if j.key not in keys], need - by_pause)
        if by_pause + by_caps >= need - _EPS or not candidates:
            break
        paused.append(candidates.pop(0))
    shed = by_pause + by_caps
    return CurtailPlan(caps, tuple(j.key for j in paused), shed, max(0.0, need - shed))


def uniform(jobs: Sequence[FlexJob], draw: float, limit: float) -> CurtailPlan:
    """Baseline: one cap on every GPU in scope (tier 0 included), the highest that is
    enough."""
    need = draw - limit
    if need <= _EPS or not jobs:
        return CurtailPlan({}, (), 0.0, max(0.0, need))
    floor = min(p.min_power_limit_watts for j in jobs for p, _ in j.slots) if \
        any(j.slots for j in jobs) else 0.0
    top = max(p.power_limit_watts for j in jobs for p, _ in j.slots) if floor else 0.0

    def saved(cap: float) -> float:
        return sum(job_watts(j, None) - job_watts(j, cap) for j in jobs)

    low, high = floor, top
    if saved(low) < need:
        high = low
    else:
        for _ in range(40):
            mid = (low + high) / 2
            if saved(mid) >= need:
                low = mid
            else:
                high = mid
        high = low
    caps = {j.key: high for j in jobs if job_watts(j, None) - job_watts(j, high) > _EPS}
    shed = saved(high)
    return CurtailPlan(caps, (), shed, max(0.0, need - shed))


def pause_newest(jobs: Sequence[FlexJob], draw: float, limit: float) -> CurtailPlan:
    """Baseline: pause the most recently started pausable jobs (any tier) until under."""
    need = draw - limit
    paused: list[str] = []
    shed = 0.0
    for j in sorted((j for j in jobs if j.pausable), key=lambda j: (-j.started_at, j.key)):
        if shed >= need - _EPS:
            break
        paused.append(j.key)
        shed += job_watts(j, None) - _idle_watts(j)
    return CurtailPlan({}, tuple(paused), shed, max(0.0, need - shed))


Strategy = Callable[[Sequence[FlexJob], float, float], CurtailPlan]
STRATEGIES: dict[str, Strategy] = {
    "flexible": flexible,
    "uniform": uniform,
    "pause-newest": pause_newest,
}
