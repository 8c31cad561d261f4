"""The wall clock the control plane runs on outside a simulation.

``WallClock(speed)`` is Unix time times ``speed`` (1 wall second = ``speed`` plane seconds):
``speed`` 1 is real time; the operator's ``--sim-speed`` runs a simulated backend faster.
Absolute, not relative to a start, so times written to status stay valid across restarts.
It implements ``aifactory.controller.core.clock.Clock``.
"""

from __future__ import annotations

import time

from aifactory.controller.core.errors import SpecError

__all__ = ["WallClock"]


class WallClock:
    """Wall time times ``speed``."""

    def __init__(self, speed: float = 1.0) -> None:
        if not speed > 0:
            raise SpecError("--sim-speed", f"must be a number > 0, got {speed}")
        self.speed = speed

    def __call__(self) -> float:
        return time.time() * self.speed

    def to_wall(self, t: float) -> float:
        return t / self.speed

    def from_wall(self, wall: float) -> float:
        return wall * self.speed
