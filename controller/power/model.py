"""How many watts a GPU draws, what that energy and the GPU-hours cost, and energy over time.

Power-aware admission needs a draw estimate for every GPU: idle when nobody holds it, a curve
of utilization when a job does, never above a power cap. ``GPUPowerProfile`` is that curve:

    P(u, cap) = min(active_idle + slope * u, saturation, max(cap, floor), limit)

The H200 profile is the least-squares fit to real measurements (``aifactory.controller.power.fit``;
a unit test re-fits it from ``../shared/data``). Every other profile is an ASSUMPTION: the
H200 curve scaled to that model's board power limit (idle, active idle, slope, saturation and
the settable cap floor keep the H200's ratios to the limit: 11.3 %, 17.7 %, 114.8 %, 98.7 %
and 28.6 %). That keeps relative comparisons between models honest without claiming
measurements we do not have; replace a profile with a fit when its hardware is measured.

``CostModel`` prices energy and amortized hardware; ``EnergyIntegrator`` turns
piecewise-constant power into joules per key (GPU or job) for the simulator, the way a
Prometheus counter of joules does (``rate()`` of it is power).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from aifactory.controller.core.errors import InvariantError, SpecError
from aifactory.controller.core.gpus import GENERIC_MODEL, canonical_model, known_models

__all__ = [
    "H200",
    "JOULES_PER_KWH",
    "CostModel",
    "EnergyIntegrator",
    "GPUPowerProfile",
    "joules_to_kwh",
    "kwh_to_joules",
    "profile_for",
]

JOULES_PER_KWH = 3_600_000.0
SECONDS_PER_HOUR = 3600.0


def joules_to_kwh(joules: float) -> float:
    return joules / JOULES_PER_KWH


def kwh_to_joules(kwh: float) -> float:
    return kwh * JOULES_PER_KWH


@dataclass(frozen=True, slots=True)
class GPUPowerProfile:
    """Draw of one GPU model in watts. ``watts_per_utilization`` is per unit (0..1).

    ``idle_watts``: no CUDA context (an unallocated GPU). ``active_idle_watts``: context
    held, utilization 0 (an allocated GPU waiting on data). ``saturation_watts``: draw at
    full load, <= ``power_limit_watts``. ``min_power_limit_watts``: the lowest settable
    cap; a lower cap request is raised to it, as ``nvidia-smi -pl`` refuses it.
    """

    model: str
    idle_watts: float
    active_idle_watts: float
    power_limit_watts: float
    watts_per_utilization: float
    saturation_watts: float
    min_power_limit_watts: float
    source: str = ""

    def __post_init__(self) -> None:
        where = f"GPUPowerProfile({self.model!r})"
        if not 0 <= self.idle_watts <= self.active_idle_watts:
            raise SpecError(f"{where}.idle_watts", f"must be between 0 and active_idle_watts "
                            f"({self.active_idle_watts}), got {self.idle_watts}")
        if not self.active_idle_watts <= self.saturation_watts <= self.power_limit_watts:
            raise SpecError(f"{where}.saturation_watts", "must be between active_idle_watts "
                            f"and power_limit_watts ({self.power_limit_watts}), got "
                            f"{self.saturation_watts}")
        if self.watts_per_utilization < 0:
            raise SpecError(f"{where}.watts_per_utilization",
                            f"must be >= 0, got {self.watts_per_utilization}")
        if not 0 < self.min_power_limit_watts <= self.power_limit_watts:
            raise SpecError(f"{where}.min_power_limit_watts", "must be > 0 and <= "
                            f"power_limit_watts, got {self.min_power_limit_watts}")

    def effective_cap_watts(self, cap_watts: float | None) -> float:
        """The cap the GPU would enforce: clamped to [min_power_limit, power_limit]."""
        if cap_watts is None:
            return self.power_limit_watts
        return min(max(cap_watts, self.min_power_limit_watts), self.power_limit_watts)

    def power_watts(self, utilization: float, cap_watts: float | None = None) -> float:
        """Draw at ``utilization`` (clamped to 0..1) under an optional cap in watts."""
        if math.isnan(utilization):
            raise SpecError("utilization", "must be a number between 0 and 1, got nan")
        u = min(max(utilization, 0.0), 1.0)
        linear = self.active_idle_watts + self.watts_per_utilization * u
        return min(linear, self.saturation_watts, self.effective_cap_watts(cap_watts))

    def idle_power_watts(self) -> float:
        """Draw of a GPU nobody has allocated (no CUDA context)."""
        return self.idle_watts

    @property
    def peak_watts(self) -> float:
        """Most this GPU draws uncapped: the full-load saturation."""
        return min(self.saturation_watts, self.power_limit_watts)


# --------------------------------------------------------------------------- profiles

# Least-squares fit to ../shared/data (two H200 SXM runs, driver 580.159, limit 700 W,
# settable 200-700 W). Re-derived by tests/unit/test_power.py; see aifactory.controller.power.fit.
# Fit: rmse 20.5 W, max 82.6 W over 686 steady samples; mean error 3.8 W over the per-phase
# means of h200_power_summary.json.
H200 = GPUPowerProfile(
    model="H200",
    idle_watts=79.1,
    active_idle_watts=124.2,
    power_limit_watts=700.0,
    watts_per_utilization=803.8,
    saturation_watts=691.0,
    min_power_limit_watts=200.0,
    source="least-squares fit to measured H200 SXM samples (../shared/data)",
)


def _scaled(model: str, limit_watts: float) -> GPUPowerProfile:
    """The H200 curve scaled to another board power limit (an assumption, see module doc)."""
    k = limit_watts / H200.power_limit_watts
    return GPUPowerProfile(
        model=model,
        idle_watts=round(H200.idle_watts * k, 1),
        active_idle_watts=round(H200.active_idle_watts * k, 1),
        power_limit_watts=limit_watts,
        watts_per_utilization=round(H200.watts_per_utilization * k, 1),
        saturation_watts=round(H200.saturation_watts * k, 1),
        min_power_limit_watts=round(H200.min_power_limit_watts * k),
        source=f"assumed: H200 curve scaled to a {limit_watts:.0f} W limit",
    )


_PROFILES: dict[str, GPUPowerProfile] = {p.model: p for p in (
    H200,
    _scaled("H100", 700.0),          # H100 SXM5 80GB
    _scaled("H800", 700.0),          # H800 SXM5 (China variant of H100)
    _scaled("B200", 1000.0),
    _scaled("A100", 400.0),          # A100 SXM4 80GB
    _scaled("A800", 400.0),          # A800 SXM4 80GB
    _scaled("L40S", 350.0),
    _scaled("A10", 150.0),
    _scaled("T4", 70.0),
    _scaled("P100", 250.0),
    _scaled("V100M16", 300.0),       # V100 SXM2 16GB (openb trace name)
    _scaled("V100M32", 300.0),       # V100 SXM2 32GB
    _scaled(GENERIC_MODEL, 300.0),   # undisclosed or unknown models
)}


def profile_for(model: str, strict: bool = False) -> GPUPowerProfile:
    """The profile of ``model`` in any accepted spelling.

    Unknown models get the GENERIC (300 W) profile, unless ``strict``: then a SpecError
    lists the models that are known.
    """
    name = canonical_model(model)
    if name is not None:
        return _PROFILES[name]
    if strict:
        raise SpecError("gpuModel", f"unknown GPU model {model!r}; known models are "
                        f"{', '.join(known_models())} (or a GPU feature discovery name "
                        "such as NVIDIA-H200)")
    return _PROFILES[GENERIC_MODEL]


# --------------------------------------------------------------------------- cost


@dataclass(frozen=True, slots=True)
class CostModel:
    """Dollars per kWh of electricity and per GPU-hour of amortized hardware."""

    electricity_dollars_per_kwh: float = 0.10
    hardware_dollars_per_gpu_hour: float = 2.00

    def __post_init__(self) -> None:
        for name in ("electricity_dollars_per_kwh", "hardware_dollars_per_gpu_hour"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise SpecError(f"CostModel.{name}", f"must be a number >= 0, got {value!r}")

    def energy_dollars(self, energy_joules: float) -> float:
        return joules_to_kwh(energy_joules) * self.electricity_dollars_per_kwh

    def hardware_dollars(self, gpu_seconds: float) -> float:
        return gpu_seconds / SECONDS_PER_HOUR * self.hardware_dollars_per_gpu_hour

    def cost_dollars(self, energy_joules: float, gpu_seconds: float) -> float:
        """Electricity for ``energy_joules`` plus hardware for ``gpu_seconds`` GPU-seconds."""
        return self.energy_dollars(energy_joules) + self.hardware_dollars(gpu_seconds)


# --------------------------------------------------------------------------- energy

K = TypeVar("K", bound=Hashable)


class EnergyIntegrator(Generic[K]):
    """Joules per key from piecewise-constant power, like an NVML total-energy counter.

    ``set_power(key, watts, now)`` closes the key's current segment at ``now`` and opens one
    at ``watts``. Times are seconds on the caller's clock and must not go backwards per key.
    ``total_energy_joules`` is O(1): closed energy plus ``now * sum(w) - sum(w * t0)`` over
    the open segments, so a simulator with 100,000 GPUs can read it on every event.
    """

    __slots__ = ("_closed", "_open", "_total_closed", "_total_watts", "_total_wt")

    def __init__(self) -> None:
        self._closed: dict[K, float] = {}
        self._open: dict[K, tuple[float, float]] = {}  # key -> (watts, since_seconds)
        self._total_closed = 0.0
        self._total_watts = 0.0
        self._total_wt = 0.0

    def set_power(self, key: K, watts: float, now_seconds: float) -> None:
        if not (math.isfinite(watts) and watts >= 0):
            raise SpecError("watts", f"must be a finite number >= 0, got {watts}")
        previous = self._open.get(key)
        if previous is not None:
            old_watts, since = previous
            if now_seconds < since:
                raise InvariantError(f"energy of {key!r}: time went backwards from {since} "
                                     f"to {now_seconds} s")
            joules = old_watts * (now_seconds - since)
            self._closed[key] = self._closed.get(key, 0.0) + joules
            self._total_closed += joules
            self._total_watts -= old_watts
            self._total_wt -= old_watts * since
        self._open[key] = (watts, now_seconds)
        self._total_watts += watts
        self._total_wt += watts * now_seconds

    def watts(self, key: K) -> float:
        """Current draw of ``key`` (0 if never set)."""
        current = self._open.get(key)
        return current[0] if current else 0.0

    @property
    def total_watts(self) -> float:
        return self._total_watts

    def energy_joules(self, key: K, now_seconds: float) -> float:
        """Energy of ``key`` up to ``now_seconds`` (0 for a key never set)."""
        joules = self._closed.get(key, 0.0)
        current = self._open.get(key)
        if current is not None:
            watts, since = current
            if now_seconds < since:
                raise InvariantError(f"energy of {key!r} asked at {now_seconds} s, before its "
                                     f"last change at {since} s")
            joules += watts * (now_seconds - since)
        return joules

    def total_energy_joules(self, now_seconds: float) -> float:
        """Energy of every key up to ``now_seconds`` (no earlier than any key's last change)."""
        return max(self._total_closed + now_seconds * self._total_watts - self._total_wt, 0.0)

    def __iter__(self) -> Iterator[K]:
        """Every key that has had a power set, in first-set order."""
        return iter(self._open)

    def __contains__(self, key: object) -> bool:
        return key in self._open

    def __len__(self) -> int:
        return len(self._open)
