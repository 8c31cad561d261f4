"""Watts estimates for admission: what a job will draw, and the caps it could run under.

The scheduler budgets power before anything runs, so it needs an estimate per job:
``watts_estimator`` gives the draw above idle per GPU on the worst GPU model the job may use;
``power_cap_options`` gives power-capped admission the lowest cap that keeps a job's
modelled speed above a floor. Both memoise per job shape, since the same shapes recur.
"""

from __future__ import annotations

from collections.abc import Callable

from aifactory.controller.core.spec import JobKind, JobSpec
from aifactory.controller.core.topology import Topology
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import default_utilization, lowest_cap_for_speed

__all__ = ["power_cap_options", "watts_estimator"]


def watts_estimator(topo: Topology) -> Callable[[JobSpec], float]:
    """Estimated draw above idle per GPU of a job: worst eligible model, capped if asked.

    Training is budgeted at full utilization (conservative); inference at its expected
    utilization."""
    memo: dict[tuple[object, ...], float] = {}

    def estimate(spec: JobSpec) -> float:
        models = spec.gpu_models or topo.models
        util = 1.0 if spec.kind is JobKind.TRAINING else default_utilization(spec)
        key = (models, util, spec.power_cap_watts_per_gpu)
        got = memo.get(key)
        if got is not None:
            return got
        best = 0.0
        for model in models:
            profile = profile_for(model)
            draw = profile.power_watts(util, spec.power_cap_watts_per_gpu)
            best = max(best, draw - profile.idle_power_watts())
        memo[key] = best
        return best
    return estimate


def power_cap_options(topo: Topology, min_speed: float
                      ) -> Callable[[JobSpec], tuple[tuple[float, float], ...]]:
    """Power-capped admission: the per-GPU cap a job blocked on power may be started
    under, with its draw estimate above idle: the lowest cap that keeps the job's modelled
    speed (``speed_under_cap``: ~ cube root of the dynamic power share) at ``min_speed``
    on every GPU model it may use. Lowest, not just low enough: when watts are the limit,
    more GPUs at a lower cap do more work than fewer at full power (the speed curve is
    concave); the benchmarks measured +9 % work vs +5 % for the highest cap that fits.
    Empty when the job's own cap is already at or below that."""
    memo: dict[tuple[object, ...], tuple[tuple[float, float], ...]] = {}

    def options(spec: JobSpec) -> tuple[tuple[float, float], ...]:
        models = spec.gpu_models or topo.models
        util = default_utilization(spec)
        budget_util = 1.0 if spec.kind is JobKind.TRAINING else util
        key = (models, util, budget_util, spec.power_cap_watts_per_gpu)
        got = memo.get(key)
        if got is not None:
            return got
        profiles = [profile_for(m) for m in models]
        top = min(p.effective_cap_watts(spec.power_cap_watts_per_gpu) for p in profiles)
        floor = 0.0
        for p in profiles:
            floor = max(floor, lowest_cap_for_speed(p, util, min_speed))
        out: tuple[tuple[float, float], ...] = ()
        if floor < top:
            cap = round(floor, 1)
            out = ((cap, max(p.power_watts(budget_util, cap) - p.idle_power_watts()
                             for p in profiles)),)
        memo[key] = out
        return out
    return options
