"""The one clock every layer speaks of: seconds on the control plane's time line.

The control plane reads time through a ``Clock`` and never from the system: the simulator
moves a ``VirtualClock`` event by event, the operator runs a wall clock scaled by its
simulation speed (``aifactory.controller.runtime.clock.WallClock``), and tests move either by
hand. ``to_wall``/``from_wall`` convert plane seconds to Unix seconds and back, for times a
person reads (status timestamps) and times read back after a restart.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["Clock", "VirtualClock"]


@runtime_checkable
class Clock(Protocol):
    """Seconds on the plane's time line; calling it reads the time and is cheap."""

    def __call__(self) -> float: ...

    def to_wall(self, t: float) -> float:
        """Unix seconds of plane time ``t``."""
        ...

    def from_wall(self, wall: float) -> float:
        """Plane time of Unix seconds ``wall``."""
        ...


class VirtualClock:
    """Time that moves only when its owner sets ``now`` (the simulator, tests).

    Plane time is taken as Unix seconds (``to_wall`` is the identity), which is what a
    simulation that starts at 0 means by "seconds since the start"."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def to_wall(self, t: float) -> float:
        return t

    def from_wall(self, wall: float) -> float:
        return wall
