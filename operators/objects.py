"""The objects the engine follows, and the ``status`` each one gets from the core's records.

A ``Tracked`` is one TrainingJob (one gang) or InferenceService (one gang per replica): its
identity, the core keys it owns, its conditions, and what the core forgets between runs
(the last placement, energy of earlier runs, GPU-seconds so far). ``job_status`` and
``service_status`` turn that plus the core's ``JobRecord`` into the status dict; they read,
never change, the control plane.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aifactory.controller.core.placements import placement_span
from aifactory.controller.core.spec import JobSpec, replica_index
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import Topology
from aifactory.controller.power.model import CostModel
from aifactory.controller.runtime.controlplane import JobRecord
from aifactory.controller.runtime.scaler import ServiceView
from aifactory.operators.status import Conditions, Phase, energy_fields, wait_reason
from aifactory.operators.translate import (
    GROUP,
    SERVICE_KIND,
    VERSION,
    format_time,
    placement_workers,
)

__all__ = ["StatusContext", "Tracked", "job_status", "service_status"]


@dataclass(slots=True, eq=False)
class Tracked:
    """One TrainingJob or InferenceService as the engine follows it."""

    kind: str
    namespace: str
    name: str
    uid: str
    generation: int
    created: float  # wall seconds, from metadata.creationTimestamp
    spec: JobSpec | None = None
    invalid: str | None = None
    keys: list[str] = field(default_factory=list)
    conditions: Conditions = field(default_factory=Conditions)
    last_placement: dict[str, Placement] = field(default_factory=dict)
    finished_at: dict[str, float] = field(default_factory=dict)  # wall, per key
    energy_banked: float = 0.0  # joules of runs that ended (and before a restart)
    gpu_seconds: float = 0.0
    accounted_at: dict[str, float] = field(default_factory=dict)  # core clock, per key
    power_watts: float = 0.0
    preempted: str = ""  # last preemption message (InferenceService)
    wait_posted: dict[str, str] = field(default_factory=dict)  # key -> last Waiting Event
    terminal: bool = False  # found Succeeded/Failed at startup: its status is final
    written: dict[str, Any] | None = None
    written_shape: dict[str, Any] | None = None  # ``written`` less messages and meters

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> dict[str, str]:
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": self.kind, "name": self.name,
                "namespace": self.namespace, "uid": self.uid}

    @property
    def is_service(self) -> bool:
        return self.kind == SERVICE_KIND

    def label(self, key: str) -> str:
        """``replica r2: `` before a replica's messages; nothing for a TrainingJob."""
        index = replica_index(key)
        return "" if index is None or not self.is_service else f"replica r{index}: "


@dataclass(frozen=True, slots=True)
class StatusContext:
    """What status building needs from the engine, read-only."""

    topo: Topology
    cost: CostModel
    records: Mapping[str, JobRecord]
    to_wall: Callable[[float], float]
    describe: Callable[[Placement], str]
    run_energy: Callable[[str], float]  # joules of the key's current run
    now: str  # RFC 3339, for condition transitions
    # An InferenceService's replicas as the autoscaler sees them (None: not tracked).
    service_view: Callable[[str], ServiceView | None] = lambda key: None


def _energy(obj: Tracked, ctx: StatusContext, running: list[str], power: float
            ) -> dict[str, Any]:
    energy = obj.energy_banked + sum(ctx.run_energy(k) for k in running)
    return energy_fields(energy, obj.gpu_seconds, power,
                         ctx.cost.cost_dollars(energy, obj.gpu_seconds))


def _placement_fields(obj: Tracked, ctx: StatusContext,
                      placements: list[tuple[str, Placement]]) -> dict[str, Any]:
    if not placements:
        return {"placement": None, "span": None}
    topo = ctx.topo
    levels, span = placement_span([p for _, p in placements], topo)
    workers: list[dict[str, Any]] = []
    for key, placement in placements:
        workers.extend(placement_workers(placement, topo,
                                         replica_index(key) if obj.is_service else None))
    merged = Placement(obj.name, tuple(s for _, p in placements for s in p.slots),
                       placements[0][1].watts_per_gpu)
    nodes = sorted({topo.nodes[s.node].name for s in merged.slots})
    return {
        "placement": {"nodes": nodes, "workers": workers, "levels": levels,
                      "summary": ctx.describe(merged),
                      "wattsPerGPU": round(placements[0][1].watts_per_gpu, 3)},
        "span": span,
    }


def _queue(obj: Tracked) -> dict[str, Any]:
    """The queue the job is charged to: its own, or its namespace's default."""
    return {"queue": obj.spec.queue} if obj.spec is not None else {}


def job_status(obj: Tracked, ctx: StatusContext) -> dict[str, Any]:
    """Status of a TrainingJob from its one core record."""
    base: dict[str, Any] = {"observedGeneration": obj.generation, **_queue(obj)}
    if obj.invalid is not None or not obj.keys:
        return {**base, "phase": Phase.FAILED, "message": obj.invalid or "not submitted",
                "conditions": obj.conditions.as_list(), "placement": None, "span": None,
                "gpus": None, **energy_fields(0.0, 0.0, 0.0, 0.0)}
    key = obj.keys[0]
    rec = ctx.records.get(key)
    if rec is None:
        return {**base, "phase": Phase.QUEUED, "conditions": obj.conditions.as_list()}
    phase = rec.phase
    running = [key] if rec.placement is not None else []
    if rec.placement is not None:
        shown: Placement | None = rec.placement
        message = ctx.describe(rec.placement)
    elif rec.done:
        shown = obj.last_placement.get(key) if rec.succeeded else None
        message = "completed" if rec.succeeded else (rec.failed_reason or "failed")
    else:
        shown = None
        message = rec.reason or "waiting for the next scheduling cycle"
    started = rec.started_at if (rec.placement is not None or rec.succeeded) else None
    finished = obj.finished_at.get(key) if rec.done else None
    return {
        **base,
        "phase": phase,
        "message": message,
        "gpus": rec.spec.gpu_equivalents,
        "conditions": obj.conditions.as_list(),
        "restarts": rec.restarts,
        "preemptions": rec.preemptions,
        "startedAt": None if started is None else format_time(ctx.to_wall(started)),
        "completionTime": None if finished is None else format_time(finished),
        **_placement_fields(obj, ctx, [(key, shown)] if shown is not None else []),
        **_energy(obj, ctx, running, obj.power_watts if running else 0.0),
    }


def _serving(view: ServiceView | None) -> dict[str, Any]:
    """Where to send requests and what the autoscaler last decided."""
    if view is None:
        return {}
    return {"endpoints": list(view.endpoints), "inFlightRequests": round(view.in_flight, 2),
            "scaling": view.reason}


def service_status(obj: Tracked, ctx: StatusContext) -> dict[str, Any]:
    """Status of an InferenceService from its replicas' records; conditions are derived."""
    base: dict[str, Any] = {"observedGeneration": obj.generation, **_queue(obj)}
    gen, now = obj.generation, ctx.now
    conds = obj.conditions
    if obj.invalid is not None:
        return {**base, "phase": Phase.FAILED, "message": obj.invalid, "replicas": 0,
                "readyReplicas": 0, "conditions": conds.as_list(), "placement": None,
                "span": None, **energy_fields(0.0, 0.0, 0.0, 0.0)}
    records = [(k, ctx.records.get(k)) for k in obj.keys]
    placed = [(k, r.placement) for k, r in records if r is not None and r.placement is not None]
    failed = [(k, r) for k, r in records if r is not None and r.done and not r.succeeded]
    waiting = [(k, r) for k, r in records if r is not None and not r.done and r.placement is None]
    desired = len(obj.keys)
    if desired and len(failed) == desired:
        phase = Phase.FAILED
    elif placed or desired == 0:
        phase = Phase.RUNNING
    else:
        phase = Phase.QUEUED
    summary = f"{len(placed)} of {desired} replicas placed"
    if failed:
        key, rec = failed[0]
        conds.set("Failed", True, rec.fatal_reason or "Unschedulable",
                  f"{obj.label(key)}{rec.failed_reason or 'failed'}", generation=gen, now=now)
    else:
        conds.clear("Failed", "Schedulable", summary, generation=gen, now=now)
    if waiting:
        key, rec = waiting[0]
        conds.set("Queued", True, wait_reason(rec.reason_kind),
                  f"{obj.label(key)}{rec.reason or 'waiting for the next scheduling cycle'}",
                  generation=gen, now=now)
    else:
        conds.clear("Queued", "AllPlaced", summary, generation=gen, now=now)
    all_placed = len(placed) == desired
    conds.set("Admitted", all_placed, "Placed" if all_placed else "Pending", summary,
              generation=gen, now=now)
    conds.set("Running", bool(placed), "Started" if placed else "NoReplicaRunning", summary,
              generation=gen, now=now)
    if obj.preempted and not all_placed:
        conds.set("Preempted", True, "Preempted", obj.preempted, generation=gen, now=now)
    else:
        conds.clear("Preempted", "Readmitted", summary, generation=gen, now=now)
    gpus = sum(r.spec.gpu_equivalents for _, r in records if r is not None)
    message = summary
    if waiting:
        message = conds.items["Queued"]["message"]
    elif failed:
        message = conds.items["Failed"]["message"]
    running_keys = [k for k, _ in placed]
    view = ctx.service_view(f"{obj.namespace}/{obj.name}")
    return {
        **base,
        "phase": phase,
        "message": message,
        "replicas": len(placed),
        "readyReplicas": view.ready if view is not None else len(placed),
        "desiredReplicas": desired,
        **_serving(view),
        "gpus": round(gpus, 3),
        "conditions": conds.as_list(),
        "restarts": sum(r.restarts for _, r in records if r is not None),
        "preemptions": sum(r.preemptions for _, r in records if r is not None),
        **_placement_fields(obj, ctx, [(k, p) for k, p in placed if p is not None]),
        **_energy(obj, ctx, running_keys, obj.power_watts if running_keys else 0.0),
    }
