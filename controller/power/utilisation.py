"""How hard a job drives its GPUs, and how fast a GPU runs under a power cap.

The power model's view of work: the utilization a job drives when it says nothing
(training saturates, inference idles between requests), the memory a GPU model carries,
and the relative speed of a capped GPU (dynamic power ~ f^3, speed ~ f). Used by the
simulated backend, the admission estimates, telemetry and the simulator's metrics alike.
"""

from __future__ import annotations

import math

from aifactory.controller.core.spec import JobKind, JobSpec
from aifactory.controller.power.model import GPUPowerProfile

__all__ = ["DEFAULT_MEMORY_GIB", "GIB", "default_utilization", "lowest_cap_for_speed",
           "speed_under_cap"]

GIB = 1024**3


DEFAULT_MEMORY_GIB = {"H200": 141, "H100": 80, "B200": 180, "A100": 80, "L40S": 48}


def default_utilization(spec: JobSpec) -> float:
    """Utilization a job drives on its GPUs when it says nothing (training ~ saturating)."""
    if spec.expected_utilization is not None:
        return spec.expected_utilization
    return 0.93 if spec.kind is JobKind.TRAINING else 0.6


def speed_under_cap(profile: GPUPowerProfile, utilization: float,
                    cap_watts: float | None) -> float:
    """Relative speed of a capped GPU: dynamic power scales ~ f^3, speed ~ f."""
    if cap_watts is None:
        return 1.0
    full = profile.power_watts(utilization)
    capped = profile.power_watts(utilization, cap_watts)
    base = profile.active_idle_watts
    if full <= base or capped >= full:
        return 1.0
    share: float = (capped - base) / (full - base)
    return max(0.05, math.pow(share, 1.0 / 3.0))


def lowest_cap_for_speed(profile: GPUPowerProfile, utilization: float, min_speed: float,
                         high: float | None = None, steps: int = 40) -> float:
    """The lowest power cap, between the GPU's lowest settable limit and ``high`` (its
    limit by default), at which it keeps ``min_speed`` (``speed_under_cap``), by
    bisection in ``steps`` halvings."""
    low = profile.min_power_limit_watts
    high = profile.power_limit_watts if high is None else high
    for _ in range(steps):
        mid = (low + high) / 2
        if speed_under_cap(profile, utilization, mid) >= min_speed:
            high = mid
        else:
            low = mid
    return high
