"""What each core event means for an object: conditions, Events, and energy bookkeeping.

The control plane calls its listeners with ``(reason, record, message)`` for Queued,
Waiting, Admitted, Preempted, Restarting, Repaired (a hot swap), PowerCapped, Paused and
Resumed (grid-event curtailment), Succeeded and Failed. Here each becomes the
TrainingJob's conditions (an InferenceService derives its conditions from all its replicas
when its status is built), one Kubernetes Event, and, when a run ends, its energy and
GPU-seconds banked on the object (the record and the backend's workload are forgotten
later, ``Engine._forget_finished``).

Waiting reasons change with every capacity change (``largest free rack has 40 free GPUs``),
so a Waiting Event is posted only when the kind of wait changes (capacity, power, quota,
backfill); the condition message always has the latest words.
"""

from __future__ import annotations

from aifactory.controller.runtime.controlplane import JobRecord
from aifactory.operators.books import EngineView
from aifactory.operators.objects import Tracked
from aifactory.operators.status import wait_reason
from aifactory.operators.translate import format_time

__all__ = ["end_run", "on_core_event"]


def end_run(engine: EngineView, obj: Tracked, key: str, end: float) -> None:
    """A run stopped: bank its energy and GPU-seconds (the backend forgets them)."""
    status = engine.cp.backend.status(key)
    if status is not None:
        obj.energy_banked += status.energy_joules
    since = obj.accounted_at.pop(key, None)
    placement = obj.last_placement.get(key)
    if since is not None and placement is not None:
        obj.gpu_seconds += placement.gpu_equivalents * max(0.0, end - since)


def on_core_event(engine: EngineView, reason: str, rec: JobRecord, message: str) -> None:
    key = rec.spec.key
    obj = engine.owner.get(key)
    if obj is None:
        return  # cancelled, or adopted at start-up before it was owned
    engine.mark_dirty(obj)
    now = engine.cp.now
    stamp = format_time(engine.clock.to_wall(now))
    conds, gen, label = obj.conditions, obj.generation, obj.label(key)
    job = not obj.is_service  # a service's conditions are derived from all replicas

    def cond(type_: str, status: bool, why: str) -> None:
        if job:
            conds.set(type_, status, why, message, generation=gen, now=stamp)

    def clear(type_: str, why: str) -> None:
        if job:
            conds.clear(type_, why, message, generation=gen, now=stamp)

    if reason == "Queued":
        if job:
            conds.set("Queued", True, "Pending", "waiting for the next scheduling cycle",
                      generation=gen, now=stamp)
    elif reason == "Waiting":
        why = wait_reason(rec.reason_kind)
        cond("Queued", True, why)
        if obj.wait_posted.get(key) != why:
            obj.wait_posted[key] = why
            engine.note(obj, "Normal", why, f"{label}{message}", phase_change=False)
    elif reason == "Admitted":
        assert rec.placement is not None
        obj.last_placement[key] = rec.placement
        obj.accounted_at[key] = now
        obj.wait_posted.pop(key, None)
        cond("Queued", False, "Admitted")
        cond("Admitted", True, "Placed")
        cond("Running", True, "Started")
        clear("Preempted", "Readmitted")
        engine.note(obj, "Normal", "Admitted", f"{label}placed: {message}")
        engine.admitted(obj, key)
    elif reason == "Repaired":  # hot swap: some workers moved, the run restarts there
        end_run(engine, obj, key, now)
        assert rec.placement is not None
        obj.last_placement[key] = rec.placement
        obj.accounted_at[key] = now
        cond("Running", True, "Repaired")
        engine.note(obj, "Warning", "Repaired", f"{label}{message}")
    elif reason in ("Preempted", "Restarting"):
        end_run(engine, obj, key, now)
        if reason == "Preempted":
            obj.preempted = f"{label}{message}"
            cond("Preempted", True, "Preempted")
        cond("Running", False, reason)
        cond("Admitted", False, reason)
        cond("Queued", True, "Requeued")
        engine.note(obj, "Warning", reason, f"{label}{message}")
    elif reason == "PowerCapped":  # a grid event's cap changed in place: it runs on
        cond("PowerCapped", rec.power_cap_watts is not None,
             "GridEvent" if rec.power_cap_watts is not None else "Restored")
        engine.note(obj, "Normal", "PowerCapped", f"{label}{message}")
    elif reason == "Paused":  # checkpointed and held until the grid event ends
        end_run(engine, obj, key, now)
        cond("Running", False, "Paused")
        cond("Admitted", False, "Paused")
        cond("Queued", True, "PausedForGridEvent")
        engine.note(obj, "Warning", "Paused", f"{label}{message}")
    elif reason == "Resumed":
        cond("Queued", True, "Resumed")
        engine.note(obj, "Normal", "Resumed", f"{label}{message}")
    elif reason == "Succeeded":
        status = engine.cp.backend.status(key)
        end = status.finished_at if status is not None and status.finished_at is not None \
            else now
        end_run(engine, obj, key, end)
        obj.finished_at[key] = engine.clock.to_wall(end)
        cond("Running", False, "Completed")
        cond("Succeeded", True, "Completed")
        engine.note(obj, "Normal", "Succeeded", f"{label}{message}")
    elif reason == "Failed":
        if key in obj.accounted_at:
            end_run(engine, obj, key, now)
        obj.finished_at[key] = engine.clock.to_wall(now)
        # the backend's reason when no restart could help (RuntimeEnvSetupFailed, ...)
        why = rec.fatal_reason or ("Unschedulable" if rec.first_start is None
                                   else "RestartLimitExceeded")
        cond("Failed", True, why)
        clear("Queued", why)
        clear("Running", why)
        engine.note(obj, "Warning", why, f"{label}{message}")
