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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aifactory.controller.core.clock import Clock
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators.configstatus import ConfigEntry
from aifactory.operators.grid import GridLink
from aifactory.operators.objects import Tracked
from aifactory.operators.outbox import Outbox
from aifactory.operators.raynodes import KubeNodeDirectory
from aifactory.operators.scaling import ServiceScaling

__all__ = ["Claims", "EngineOptions", "EngineView", "StatusBooks", "StatusKey", "claimed_slots"]

StatusKey = tuple[str, str, str]  # kind, namespace, name
Slot = tuple[str, int]  # node name, node-local GPU index
HOLDING = ("Running", "Admitted")


def claimed_slots(status: Mapping[str, Any]) -> dict[Slot, int]:
    """The GPU slots (with the thousandths of each) a status shows its object holding: the
    placement of a Running (or Admitted) object; nothing for any other phase."""
    if status.get("phase") not in HOLDING:
        return {}
    out: dict[Slot, int] = {}
    for worker in (status.get("placement") or {}).get("workers") or []:
        milli = int(worker.get("milli", 1000))
        for gpu in worker.get("gpus") or []:
            slot = (str(worker.get("node")), int(gpu))
            out[slot] = out.get(slot, 0) + milli
    return out


@dataclass(slots=True)
class Claims:
    """What the API server shows held: the GPU slots of every object whose last *written*
    status holds them. A status that would show an object holding a slot another object's
    written status still holds waits until that other write lands (its release is
    persisted first), so no LIST ever shows one GPU held by two Running jobs, and a
    replica that recovers from what it lists never finds two claims to choose between."""

    by_slot: dict[Slot, dict[StatusKey, int]] = field(default_factory=dict)
    by_object: dict[StatusKey, dict[Slot, int]] = field(default_factory=dict)

    def blocked_by(self, key: StatusKey, status: Mapping[str, Any]) -> StatusKey | None:
        """Another object whose written status still holds a slot ``status`` would take."""
        for slot, milli in claimed_slots(status).items():
            others = self.by_slot.get(slot) or {}
            held = sum(m for k, m in others.items() if k != key)
            if held and held + milli > 1000:
                return next(k for k in others if k != key)
        return None

    def written(self, key: StatusKey, status: Mapping[str, Any]) -> None:
        """``status`` of ``key`` landed in the API server."""
        self.gone(key)
        slots = claimed_slots(status)
        if slots:
            self.by_object[key] = slots
            for slot, milli in slots.items():
                self.by_slot.setdefault(slot, {})[key] = milli

    def gone(self, key: StatusKey) -> None:
        """``key`` holds nothing any more (its object was deleted)."""
        for slot in self.by_object.pop(key, {}):
            holders = self.by_slot.get(slot)
            if holders is not None:
                holders.pop(key, None)
                if not holders:
                    del self.by_slot[slot]


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Timing of the engine loop, in seconds."""

    tick_seconds: float = 0.1
    coalesce_seconds: float = 0.005
    status_interval_seconds: float = 5.0
    meter_writes_per_second: float = 20.0  # the budget of meter-only status writes
    writers: int = 16
    delete_timeout_seconds: float = 30.0
    finished_retention_seconds: float = 300.0  # wall seconds a finished job stays in the core
    autoscale_sync_seconds: float = 15.0  # the autoscaler's period (the HPA's default)
    # With --backend sim: InferenceService load from this curve ('diurnal' or a CSV path,
    # re-read when it changes); None: no simulated traffic.
    sim_traffic: str | None = None


@dataclass(slots=True, eq=False)
class StatusBooks:
    """Which objects' status must be rebuilt, and when finished ones are let go.

    ``dirty``: rebuilt at the next publish; ``meters``: the meter ring, objects whose
    meters or words may be stale (running ones, and those whose words changed), least
    recently written first, with the monotonic time each joined; ``meter_tokens``: the
    meter write budget's bucket; ``meter_lag``: seconds the oldest in the ring has waited;
    ``finished``: (monotonic deadline, object) of final TrainingJobs, forgotten after the
    retention; ``config_dirty``: GPUQueue/PowerBudget status to rewrite."""

    dirty: set[Tracked] = field(default_factory=set)
    meters: collections.OrderedDict[Tracked, float] = field(
        default_factory=collections.OrderedDict)
    meter_tokens: float = 0.0
    meter_tokens_at: float = 0.0
    meter_lag: float = 0.0
    finished: collections.deque[tuple[float, Tracked]] = field(
        default_factory=collections.deque)
    config_dirty: bool = False
    claims: Claims = field(default_factory=Claims)

    def drop(self, obj: Tracked) -> None:
        """The object is gone: nothing of it is written any more."""
        self.dirty.discard(obj)
        self.meters.pop(obj, None)


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
    grid: GridLink
    scaling: ServiceScaling
    node_directory: KubeNodeDirectory | None

    def note(self, obj: Tracked, type_: str, reason: str, message: str,
             phase_change: bool = True) -> None: ...

    def mark_dirty(self, obj: Tracked) -> None: ...

    def admitted(self, obj: Tracked, key: str) -> None: ...
