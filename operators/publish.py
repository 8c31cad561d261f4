"""The engine's third step: what changed becomes status patches, and meters are refreshed
within a write budget.

Split out of ``aifactory.operators.engine`` (it reads the engine's bookkeeping: which objects are
dirty, which wait for a meter refresh, what each last wrote). Two kinds of write:

* **changes**: every pass, each object whose status changed is rebuilt
  (``aifactory.operators.objects``); if its phase, placement or conditions differ from what was
  written, the status goes out at once, in the outbox's change lane;
* **meters**: energy, power, cost and GPU-hours of running objects, and the words of a
  message, are refreshed round-robin, least recently written first, within a global
  budget of ``meter_writes_per_second`` (and no object more often than every
  ``status_interval_seconds``). So status writes do not grow with the number of running
  jobs: a meter in status is at most max(``status_interval_seconds``, objects in the ring /
  budget) old (``StatusBooks.meter_lag``); Prometheus is the live source. An unchanged
  object is never written.

Every ``status_interval_seconds`` a refresh reads the backend's telemetry once (per-GPU
power, which each status built until the next refresh reads), writes GPUQueue/PowerBudget
status and replaces the snapshot the metrics thread reads. A TrainingJob whose status
turns Succeeded or Failed is final: it is marked terminal and queued to be forgotten after
the retention.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any

from aifactory.controller.backends.base import ReportsPower
from aifactory.controller.core.placements import describe_placement
from aifactory.operators.books import EngineView, StatusKey
from aifactory.operators.configstatus import config_statuses
from aifactory.operators.objects import StatusContext, Tracked, job_status, service_status
from aifactory.operators.status import Phase
from aifactory.operators.translate import format_time

__all__ = ["METERS", "publish", "status_context", "take_snapshot"]

METERS = ("message", "energyJoules", "energyKWh", "gpuHours", "costDollars", "powerWatts",
          "inFlightRequests", "scaling")
EXTRA_CHECKS = 16  # meter checks a pass may make beyond its write allowance (unchanged ones)


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
                         functools.partial(run_energy, engine), format_time(time.time()),
                         engine.scaling.view)


def publish(engine: EngineView, refresh: bool) -> None:
    """Changes of every dirty object; meters within the budget; config status at refresh."""
    mono = time.monotonic()
    if refresh:
        _refresh_power(engine)
    ctx: StatusContext | None = None
    if engine.books.dirty:
        ctx = status_context(engine)
        _write_changes(engine, ctx, mono)
    _write_meters(engine, ctx, mono)
    if refresh or engine.books.config_dirty:
        for config, status in config_statuses(engine.cp, engine.configs.values(),
                                              engine.last_gpu_power,
                                              engine.grid.budget_status()):
            if status != config.written:
                config.written = status
                engine.outbox.put_status((config.kind, "", config.name), status)
        engine.books.config_dirty = False


def _build(engine: EngineView, obj: Tracked, ctx: StatusContext) -> dict[str, Any]:
    """The object's status now, its GPU-seconds and power brought up to date first."""
    _account(engine, obj)
    obj.power_watts = _power(engine, obj)
    return service_status(obj, ctx) if obj.is_service else job_status(obj, ctx)


def _write_changes(engine: EngineView, ctx: StatusContext, mono: float) -> None:
    """Every dirty object: a changed shape is written now; words or meters alone join the
    meter ring."""
    books = engine.books
    waiting: list[Tracked] = []
    blockers: dict[StatusKey, StatusKey] = {}  # a waiting write -> whose claim stops it
    for obj in books.dirty:
        if obj.terminal or engine.objects.get(obj.ident) is not obj:
            continue
        status = _build(engine, obj, ctx)
        if obj.accounted_at:
            books.meters.setdefault(obj, mono)  # running: its meters drift
        if status == obj.written:
            continue
        shape = _shape(status)
        if shape == obj.written_shape:
            books.meters.setdefault(obj, mono)  # only words or meters: within the budget
            continue
        if not _write(engine, obj, status, shape, mono, blockers):
            waiting.append(obj)
    books.dirty.clear()
    books.dirty.update(waiting)


def _write(engine: EngineView, obj: Tracked, status: dict[str, Any], shape: dict[str, Any],
           mono: float, blockers: dict[StatusKey, StatusKey] | None = None) -> bool:
    """Queue a status whose shape changed; False if another's release must land first."""
    books = engine.books
    key = (obj.kind, obj.namespace, obj.name)
    blocker = books.claims.blocked_by(key, status)
    if blocker is not None and (blockers is None or not _in_cycle(blockers, blocker, key)):
        if blockers is not None:
            blockers[key] = blocker
        engine.stats["status_writes_ordered"] += 1
        return False  # another's release is not persisted yet: next pass
    obj.written, obj.written_shape = status, shape
    engine.outbox.put_status(key, status, change=True)
    books.meters.pop(obj, None)
    if obj.accounted_at:  # running: its meters drift from now on
        books.meters[obj] = mono
    if not obj.is_service and obj.keys and status.get("phase") in Phase.TERMINAL:
        obj.terminal = True  # final: forgotten after the retention
        books.finished.append((time.monotonic() + engine.opts.finished_retention_seconds,
                               obj))
    return True


def _write_meters(engine: EngineView, ctx: StatusContext | None, mono: float) -> None:
    """Refresh meters and words, least recently written first, within the budget."""
    books, opts = engine.books, engine.opts
    rate = opts.meter_writes_per_second
    books.meter_tokens = min(max(rate, 1.0),
                             books.meter_tokens + rate * max(0.0, mono - books.meter_tokens_at))
    books.meter_tokens_at = mono
    ring = books.meters
    fresh_after = mono - opts.status_interval_seconds
    checks = int(books.meter_tokens) + EXTRA_CHECKS
    while ring and books.meter_tokens >= 1.0 and checks > 0:
        obj, since = next(iter(ring.items()))
        if since > fresh_after:
            break  # everyone else was checked more recently
        del ring[obj]
        if obj.terminal or engine.objects.get(obj.ident) is not obj:
            continue
        checks -= 1
        ctx = ctx or status_context(engine)
        status = _build(engine, obj, ctx)
        if status != obj.written:
            shape = _shape(status)
            if shape != obj.written_shape:
                books.dirty.add(obj)  # a change the next pass writes (and orders)
                continue
            obj.written = status
            engine.outbox.put_status((obj.kind, obj.namespace, obj.name), status,
                                     change=False)
            books.meter_tokens -= 1.0
        if obj.accounted_at:
            ring[obj] = mono
    books.meter_lag = mono - next(iter(ring.values())) if ring else 0.0


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


def _account(engine: EngineView, obj: Tracked) -> None:
    """The object's GPU-seconds of running work up to now."""
    now = engine.cp.now
    for key, since in obj.accounted_at.items():
        placement = obj.last_placement.get(key)
        if placement is not None:
            obj.gpu_seconds += placement.gpu_equivalents * max(0.0, now - since)
        obj.accounted_at[key] = now


def _power(engine: EngineView, obj: Tracked) -> float:
    """The object's watts, from the last telemetry refresh's per-GPU power."""
    power = engine.last_gpu_power
    total = 0.0
    for key in obj.accounted_at:
        rec = engine.cp.jobs.get(key)
        if rec is not None and rec.placement is not None:
            total += sum(power[g] * s.milli / 1000.0 for s in rec.placement.slots
                         for g in s.gpus if g < len(power))
    return total


def _refresh_power(engine: EngineView) -> None:
    """Per-GPU power, once per refresh: the backend's draw alone where it can say it
    (``ReportsPower``), else from a telemetry snapshot."""
    backend = engine.cp.backend
    readings = backend.gpu_power() if isinstance(backend, ReportsPower) else \
        [(r.node, r.index, r.power_watts) for r in backend.telemetry().gpus]
    topo = engine.cp.topo
    power = [0.0] * topo.total_gpus
    for name, index, watts in readings:
        node = topo.node_index.get(name)
        if node is not None and index < topo.nodes[node].gpus:
            power[topo.gpu_start[node] + index] = watts
    engine.last_gpu_power = power


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
        "gauges": {"meter_lag_seconds": engine.books.meter_lag,
                   "meter_waiting": float(len(engine.books.meters)),
                   "status_backlog": float(engine.outbox.status_backlog),
                   "event_backlog": float(len(engine.outbox.events))},
        "grid": engine.grid.snapshot(),
        "ray_nodes_unmatched": None if engine.node_directory is None else
        engine.node_directory.counts(),
    }
