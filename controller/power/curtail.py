"""Which running jobs give up power when a budget falls below the draw: pure planning.

Given the running jobs in a budget's scope (each with its flexibility tier, GPUs, power
profile, utilization and own cap), the budget's modelled draw with no grid-event cap on any
job, and the new limit, a strategy returns the caps and pauses that bring the draw under it:

- ``flexible`` (ours): caps first, for the least work lost: every flexible job slowed
  alike until the less flexible reach their tier's allowance (``FLEX_SLOWDOWN``: 10, 25,
  50 %), then only the more flexible further; capping saves far more watts per unit of lost
  speed than pausing, and many small slowdowns more than a few deep ones (dynamic power ~
  speed^3). Only when every tier's caps are not enough, checkpoint and
  pause jobs, most flexible tier first and the least work lost since the last checkpoint
  first. Tier 0 is never touched; what cannot be shed without it is ``short_watts``.
- ``uniform``: one cap on every GPU in scope, whatever the tier (a baseline).
- ``pause_newest``: pause the most recently started jobs until under (a baseline).

Plans are computed from the uncapped picture every time, so the controller applies the
difference and a rising limit relaxes caps by the same rule.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from aifactory.controller.power.grid import FLEX_SLOWDOWN
from aifactory.controller.power.model import GPUPowerProfile
from aifactory.controller.power.utilisation import lowest_cap_for_speed, speed_under_cap

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
    return _cap_for(job.slots[0][0], job.utilization, job.own_cap, slowdown)


@functools.lru_cache(maxsize=65_536)
def _cap_for(profile: GPUPowerProfile, utilization: float, own_cap: float | None,
             slowdown: float) -> float:
    target = speed_under_cap(profile, utilization, own_cap) * (1.0 - slowdown)
    low = profile.min_power_limit_watts
    if speed_under_cap(profile, utilization, low) >= target:
        return low
    return lowest_cap_for_speed(profile, utilization, target,
                                profile.effective_cap_watts(own_cap), steps=30)


_STEPS = 200  # a shape's savings curve, sampled in slowdown from 0 to its tier's allowance


@functools.lru_cache(maxsize=4096)
def _curve(profile: GPUPowerProfile, utilization: float, own_cap: float | None,
           allowance: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Caps and watts saved per GPU at slowdowns ``allowance * i / _STEPS``."""
    full = profile.power_watts(utilization, own_cap)
    caps, saved = [profile.effective_cap_watts(own_cap)], [0.0]
    for i in range(1, _STEPS + 1):
        cap = _cap_for(profile, utilization, own_cap, allowance * i / _STEPS)
        caps.append(cap)
        saved.append(max(saved[-1], full - profile.power_watts(utilization, cap)))
    return tuple(caps), tuple(saved)


def _shape(job: FlexJob) -> tuple[GPUPowerProfile, float, float | None, float]:
    return (job.slots[0][0], job.utilization, job.own_cap, FLEX_SLOWDOWN.get(job.tier, 0.0))


def _marginals(saved: tuple[float, ...], allowance: float) -> tuple[float, ...]:
    """Watts saved per GPU per unit of slowdown, step by step, made non-increasing (the
    curve is concave: dynamic power ~ speed^3), negated for ``bisect``."""
    ds = allowance / _STEPS
    out: list[float] = []
    last = math.inf
    for i in range(_STEPS):
        last = min(last, (saved[i + 1] - saved[i]) / ds)
        out.append(-last)
    return tuple(out)


def _caps_shared(jobs: Sequence[FlexJob], need: float) -> tuple[dict[str, float], float]:
    """Caps shedding at least ``need`` watts if they can, for the least work lost: each
    flexible job is slowed until the watts one more step of slowdown saves fall below a
    price common to all, no job past its tier's allowance; the highest price that covers
    ``need`` (every allowance if none does). With one kind of GPU and load that is the same
    slowdown for every flexible job until the less flexible reach their allowance (10 %,
    then 25 %), after which only the more flexible slow further. Sharing beats slowing a
    few jobs deeply: dynamic power goes ~ speed^3, so many small slowdowns shed more watts
    per lost GPU-hour."""
    groups: dict[tuple[GPUPowerProfile, float, float | None, float], float] = {}
    for j in jobs:
        if j.tier > 0 and j.slots:
            key = _shape(j)
            groups[key] = groups.get(key, 0.0) + j.gpus
    if not groups or need <= _EPS:
        return {}, 0.0
    curves = {key: _curve(*key) for key in groups}
    marginals = {key: _marginals(curves[key][1], key[3]) for key in groups}

    def steps(price: float) -> dict[tuple[GPUPowerProfile, float, float | None, float], int]:
        return {key: bisect.bisect_right(marginals[key], -price) for key in groups}

    def saved(at: Mapping[tuple[GPUPowerProfile, float, float | None, float], int]) -> float:
        return sum(gpus * curves[key][1][at[key]] for key, gpus in groups.items())

    top = max(-m[0] for m in marginals.values())
    if saved(steps(0.0)) <= need:
        chosen = steps(0.0)
    else:
        low, high = 0.0, top  # saved(steps(low)) >= need > saved(steps(high)) or equal
        for _ in range(50):
            mid = (low + high) / 2
            if saved(steps(mid)) >= need:
                low = mid
            else:
                high = mid
        chosen = steps(low)
    caps: dict[str, float] = {}
    total = 0.0
    for j in jobs:
        if j.tier <= 0 or not j.slots:
            continue
        i = chosen[_shape(j)]
        if i == 0:
            continue
        cap = curves[_shape(j)][0][i]
        s = job_watts(j, None) - job_watts(j, cap)
        if s > _EPS:
            caps[j.key] = cap
            total += s
    return caps, total


def flexible(jobs: Sequence[FlexJob], draw: float, limit: float,
             lost: Callable[[FlexJob], float] | None = None) -> CurtailPlan:
    """Ours: caps shared by tier first, then pauses (see the module doc). ``lost``: work
    a pause would lose (default ``lost_if_paused``), asked only when pauses are needed."""
    need = draw - limit
    if need <= _EPS:
        return CurtailPlan({}, (), 0.0, 0.0)
    caps, by_caps = _caps_shared(jobs, need)
    if by_caps >= need - _EPS:
        return CurtailPlan(caps, (), by_caps, 0.0)
    # Caps at every tier's allowance are not enough: pause, most flexible tier first and
    # least work lost first, counting what pausing adds beyond the job's full cap.
    at_full, _ = _caps_shared(jobs, math.inf)
    cost = lost or (lambda j: j.lost_if_paused)
    candidates = sorted((j for j in jobs if j.tier > 0 and j.pausable),
                        key=lambda j: (-j.tier, cost(j), -j.started_at, j.key))
    short = need - by_caps
    paused: list[FlexJob] = []
    for j in candidates:
        if short <= _EPS:
            break
        capped = job_watts(j, at_full[j.key]) if j.key in at_full else job_watts(j, None)
        gain = capped - _idle_watts(j)
        if gain <= _EPS:
            continue
        paused.append(j)
        short -= gain
    keys = {j.key for j in paused}
    by_pause = sum(job_watts(j, None) - _idle_watts(j) for j in paused)
    caps, by_caps = _caps_shared([j for j in jobs if j.key not in keys], need - by_pause)
    shed = by_pause + by_caps
    return CurtailPlan(caps, tuple(j.key for j in paused), shed, max(0.0, need - shed))


def uniform(jobs: Sequence[FlexJob], draw: float, limit: float,
            lost: Callable[[FlexJob], float] | None = None) -> CurtailPlan:
    """Baseline: one cap on every GPU in scope (tier 0 included), the highest that is
    enough."""
    need = draw - limit
    if need <= _EPS or not jobs:
        return CurtailPlan({}, (), 0.0, max(0.0, need))
    floor = min(p.min_power_limit_watts for j in jobs for p, _ in j.slots) if \
        any(j.slots for j in jobs) else 0.0
    top = max(p.power_limit_watts for j in jobs for p, _ in j.slots) if floor else 0.0

    # Jobs of one shape (GPU profile, utilization, own cap) save alike: sum GPUs per shape.
    shapes: dict[tuple[GPUPowerProfile, float, float | None], float] = {}
    for j in jobs:
        for profile, gpus in j.slots:
            key = (profile, j.utilization, j.own_cap)
            shapes[key] = shapes.get(key, 0.0) + gpus

    def saved(cap: float) -> float:
        return sum(gpus * (p.power_watts(u, own) - p.power_watts(
            u, cap if own is None else min(cap, own))) for (p, u, own), gpus in shapes.items())

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


def pause_newest(jobs: Sequence[FlexJob], draw: float, limit: float,
                 lost: Callable[[FlexJob], float] | None = None) -> CurtailPlan:
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


class Strategy(Protocol):
    def __call__(self, jobs: Sequence[FlexJob], draw: float, limit: float,
                 lost: Callable[[FlexJob], float] | None = None) -> CurtailPlan: ...



STRATEGIES: dict[str, Strategy] = {
    "flexible": flexible,
    "uniform": uniform,
    "pause-newest": pause_newest,
}
