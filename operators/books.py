"""What the engine's steps share: the engine's options, which objects must be written, and
the view of the engine that publishing and event handling get.

The engine (``aifactory.operators.engine``) owns the control plane and runs the loop; two of
its steps live in their own modules: ``publish`` (status patches and meters) and
``transitions`` (what each core event means for an object). They read and write the same
bookkeeping, ``StatusBooks``, and see the engine only through ``EngineView``, so neither
imports the engine nor touches its internals.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aifactory.controller.core.clock import Clock
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators.configstatus import ConfigEntry
from aifactory.operators.objects import Tracked
from aifactory.operators.outbox import Outbox

__all__ = ["EngineOptions", "EngineView", "StatusBooks"]


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Timing of the engine loop, in seconds."""

    tick_seconds: float = 0.1
    coalesce_seconds: float = 0.005
    status_interval_seconds: float = 5.0
    writers: int = 6
    delete_timeout_seconds: float = 30.0
    finished_retention_seconds: float = 300.0  # wall seconds a finished job stays in the core


@dataclass(slots=True, eq=False)
class StatusBooks:
    """Which objects' status must be rebuilt, and when finished ones are let go.

    ``dirty``: rebuilt at the next publish; ``deferred``: only words or meters changed,
    written at the next refresh; ``finished``: (monotonic deadline, object) of final
    TrainingJobs, forgotten after the retention; ``config_dirty``: GPUQueue/PowerBudget
    status to rewrite; ``power_needed``: read telemetry at the next publish (an admission)."""

    dirty: set[Tracked] = field(default_factory=set)
    deferred: set[Tracked] = field(default_factory=set)
    finished: collections.deque[tuple[float, Tracked]] = field(
        default_factory=collections.deque)
    config_dirty: bool = False
    power_needed: bool = False

    def drop(self, obj: Tracked) -> None:
        """The object is gone: nothing of it is written any more."""
        self.dirty.discard(obj)
        self.deferred.discard(obj)


class EngineView(Protocol):
    """The engine as ``publish`` and ``transitions`` see it."""

    cp: ControlPlane
    clock: Clock
    opts: EngineOptions
    books: StatusBooks
    objects: dict[tuple[str, str, str], Tracked]
    owner: dict[str, Tracked]
    configs: dict[tuple[str, str], ConfigEntry]
    stats: dict[str, float]
    outbox: Outbox
    last_gpu_power: list[float]
    snapshot: dict[str, Any]
    on_admitted: list[Callable[[Tracked, str], None]]

    def note(self, obj: Tracked, type_: str, reason: str, message: str) -> None: ...

    def mark_dirty(self, obj: Tracked) -> None: ...

    def admitted(self, obj: Tracked, key: str) -> None: ...
