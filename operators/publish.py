"""The engine's third step: what changed becomes status patches, and meters are refreshed.

Split out of ``aifactory.operators.engine`` (it reads the engine's bookkeeping: which objects are
dirty, which were deferred, what each last wrote). Every pass, each object whose status
changed is rebuilt (``aifactory.operators.objects``) and queued for the outbox unless only its words
or meters changed, which wait for the next refresh (every ``status_interval_seconds``); a
refresh also reads the backend's telemetry for per-object power, accounts GPU-seconds,
writes GPUQueue/PowerBudget status and replaces the snapshot the metrics thread reads.
A TrainingJob whose status turns Succeeded or Failed is final: it is marked terminal and
queued to be forgotten after the retention.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any

from aifactory.controller.core.placements import describe_placement
from aifactory.operators.books import EngineView, StatusKey
from aifactory.operators.configstatus import config_statuses
from aifactory.operators.objects import StatusContext, Tracked, job_status, service_status
from aifactory.operators.status import Phase
from aifactory.operators.translate import format_time

__all__ = ["METERS", "publish", "status_context", "take_snapshot"]

METERS = ("message", "energyJoules", "energyKWh", "gpuHours", "costDollars", "powerWatts")


def _shape(status: dict[str, Any]) -> dict[str, Any]:
    """A status less its words and meters: a change here is written at once."""
    shape = {k: v for k, v in status.items() if k not in METERS}
    shape["conditions"] = [{k: v for k, v in c.items() if k != "message"}
                           for c in status.get("conditions") or []]
    return shape


def run_energy(engine: EngineView, key: str) -> float:
    """Joules of the key's current run, as the backend counts them."""
    status = engine.cp.backend.status(key)
    return 0.0 if status is None else status.energy_joules


def status_context(engine: EngineView) -> StatusContext:
    """What status building reads, for one pass."""
    return StatusContext(engine.cp.topo, engine.cp.factory.cost, engine.cp.jobs,
                         engine.clock.to_wall,
                         functools.partial(describe_placement, topo=engine.cp.topo),
                         functools.partial(run_energy, engine), format_time(time.time()))


def publish(engine: EngineView, refresh: bool) -> None:
    """Status of every changed object, and meters and config status at refresh."""
    if refresh or engine.books.power_needed:
        _refresh_power(engine)
        engine.books.power_needed = False
    if refresh:
        _account(engine)
        engine.books.dirty |= engine.books.deferred
        engine.books.deferred.clear()
    if engine.books.dirty:
        ctx = status_context(engine)
        waiting: list[Tracked] = []
        blockers: dict[StatusKey, StatusKey] = {}  # a waiting write -> whose claim stops it
        for obj in engine.books.dirty:
            if obj.terminal or engine.objects.get(obj.ident) is not obj:
                continue
            status = service_status(obj, ctx) if obj.is_service else job_status(obj, ctx)
            if status == obj.written:
                continue
            shape = _shape(status)
            if not refresh and shape == obj.written_shape:
                engine.books.deferred.add(obj)  # only words or meters changed: at refresh
                continue
            key = (obj.kind, obj.namespace, obj.name)
            blocker = engine.books.claims.blocked_by(key, status)
            if blocker is not None and not _in_cycle(blockers, blocker, key):
                waiting.append(obj)  # another's release is not persisted yet: next pass
                blockers[key] = blocker
                engine.stats["status_writes_ordered"] += 1
                continue
            obj.written, obj.written_shape = status, shape
            engine.outbox.put_status(key, status)
            if not obj.is_service and obj.keys and status.get("phase") in Phase.TERMINAL:
                obj.terminal = True  # final: forgotten after the retention
                engine.books.finished.append((time.monotonic() +
                                       engine.opts.finished_retention_seconds, obj))
        engine.books.dirty.clear()
        engine.books.dirty.update(waiting)
    if refresh or engine.books.config_dirty:
        for config, status in config_statuses(engine.cp, engine.configs.values(),
                                              engine.last_gpu_power):
            if status != config.written:
                config.written = status
                engine.outbox.put_status((config.kind, "", config.name), status)
        engine.books.config_dirty = False


def _in_cycle(blockers: dict[StatusKey, StatusKey], start: StatusKey,
              key: StatusKey) -> bool:
    """Whether the chain of waiting writes from ``start`` leads back to ``key``: two gangs
    moving into each other's old GPUs (only an adoption after a restart does that) would
    otherwise wait for each other for ever; one of them is written first."""
    seen: set[StatusKey] = set()
    while start in blockers and start not in seen:
        seen.add(start)
        start = blockers[start]
        if start == key:
            return True
    return False


def _account(engine: EngineView) -> None:
    """GPU-seconds of running work up to now; running objects get fresh meters."""
    now = engine.cp.now
    for obj in engine.objects.values():
        for key, since in obj.accounted_at.items():
            placement = obj.last_placement.get(key)
            if placement is not None:
                obj.gpu_seconds += placement.gpu_equivalents * max(0.0, now - since)
            obj.accounted_at[key] = now
        if obj.accounted_at:
            engine.books.dirty.add(obj)


def _refresh_power(engine: EngineView) -> None:
    """Per-object power from one telemetry snapshot of the backend."""
    snapshot = engine.cp.backend.telemetry()
    topo = engine.cp.topo
    power = [0.0] * topo.total_gpus
    for reading in snapshot.gpus:
        node = topo.node_index.get(reading.node)
        if node is not None and reading.index < topo.nodes[node].gpus:
            power[topo.gpu_start[node] + reading.index] = reading.power_watts
    engine.last_gpu_power = power
    for obj in engine.objects.values():
        total = 0.0
        for key in obj.keys:
            rec = engine.cp.jobs.get(key)
            if rec is not None and rec.placement is not None:
                total += sum(power[g] * s.milli / 1000.0 for s in rec.placement.slots
                             for g in s.gpus)
        if total != obj.power_watts:
            obj.power_watts = total
            engine.books.dirty.add(obj)


def take_snapshot(engine: EngineView) -> None:
    """Numbers for the metrics thread, replaced whole (never read half-written)."""
    phases = collections.Counter(r.phase for r in engine.cp.jobs.values())
    budgets = engine.cp.state.budgets
    counters = dict(engine.stats)
    counters["cycles"] = float(engine.cp.cycles)
    engine.snapshot = {
        "counters": counters,
        "phases": dict(phases),
        "gpus_allocated": engine.cp.state.allocated_gpu_equivalents,
        "gpus_total": float(engine.cp.topo.total_gpus),
        "budgets": {name: (budgets.limits[b], engine.cp.state.budget_watts[b])
                    for b, name in enumerate(budgets.names)},
    }
