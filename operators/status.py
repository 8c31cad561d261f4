"""What ``status`` says: phases, Kubernetes-style conditions, and the printer-column fields.

Pure: the engine hands in what the core knows and gets back the dict it merge-patches into
``/status``. Optional fields are written as None when they no longer apply, because a JSON
merge patch only removes a key that is explicitly null.

Conditions follow ``metav1.Condition``: ``type``, ``status`` (True/False), a CamelCase
``reason``, a ``message`` a person can act on, ``lastTransitionTime`` (changes only when the
status flips) and ``observedGeneration``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONDITION_TYPES",
    "WAIT_REASONS",
    "Conditions",
    "Phase",
    "energy_fields",
    "wait_reason",
]

CONDITION_TYPES = ("Queued", "Admitted", "Running", "Succeeded", "Failed", "Preempted")
JOULES_PER_KWH = 3.6e6

# The core's kinds of waiting, as condition and Event reasons.
WAIT_REASONS = {
    "capacity": "InsufficientCapacity",
    "power": "PowerBudgetExceeded",
    "quota": "QuotaExceeded",
    "backfill": "WaitingForHigherPriority",
}


class Phase:
    """``status.phase`` values (the CRDs' enum)."""

    QUEUED = "Queued"
    ADMITTED = "Admitted"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    TERMINAL = frozenset({"Succeeded", "Failed"})


def wait_reason(kind: str) -> str:
    """Condition reason for a core waiting kind (``power`` -> ``PowerBudgetExceeded``)."""
    return WAIT_REASONS.get(kind, "Pending")


@dataclass(slots=True)
class Conditions:
    """The conditions of one object, keyed by type, in the order of ``CONDITION_TYPES``."""

    items: dict[str, dict[str, Any]] = field(default_factory=dict)

    @staticmethod
    def from_status(status: Mapping[str, Any] | None) -> Conditions:
        """Pick up conditions already written (after an operator restart)."""
        out = Conditions()
        for cond in (status or {}).get("conditions") or []:
            if isinstance(cond, Mapping) and cond.get("type") in CONDITION_TYPES:
                out.items[str(cond["type"])] = dict(cond)
        return out

    def set(self, type_: str, status: bool, reason: str, message: str, *, generation: int,
            now: str) -> bool:
        """Set one condition; True if anything changed. The transition time moves only when
        the status flips."""
        value = "True" if status else "False"
        old = self.items.get(type_)
        if old is not None and old.get("status") == value and old.get("reason") == reason \
                and old.get("message") == message \
                and old.get("observedGeneration") == generation:
            return False
        since = old["lastTransitionTime"] if old is not None and old.get("status") == value \
            and old.get("lastTransitionTime") else now
        self.items[type_] = {"type": type_, "status": value, "reason": reason,
                             "message": message[:32768], "lastTransitionTime": since,
                             "observedGeneration": generation}
        return True

    def clear(self, type_: str, reason: str, message: str, *, generation: int,
              now: str) -> bool:
        """Set a condition False, but only if it exists (False conditions are not invented)."""
        if type_ not in self.items:
            return False
        return self.set(type_, False, reason, message, generation=generation, now=now)

    def is_true(self, type_: str) -> bool:
        cond = self.items.get(type_)
        return cond is not None and cond.get("status") == "True"

    def as_list(self) -> list[dict[str, Any]]:
        return [dict(self.items[t]) for t in CONDITION_TYPES if t in self.items]


def energy_fields(energy_joules: float, gpu_seconds: float, power_watts: float,
                  cost_dollars: float) -> dict[str, Any]:
    """The energy and cost fields of a job's status, rounded for display."""
    return {
        "energyJoules": round(energy_joules, 1),
        "energyKWh": round(energy_joules / JOULES_PER_KWH, 4),
        "gpuHours": round(gpu_seconds / 3600.0, 4),
        "costDollars": round(cost_dollars, 4),
        "powerWatts": round(power_watts),
    }
