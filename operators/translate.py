"""Custom resources to the core's model and back: specs in, placements and times out.

Pure functions, no Kubernetes client and no kopf, so every translation is unit-tested
without a cluster. The engine (``aifactory.operators.engine``) calls them; the handlers never do.

Keys: a TrainingJob is one gang with the core key ``<namespace>/<name>``. An InferenceService
is one gang per replica, keyed ``<namespace>/<name>:r<i>``; ``:`` cannot appear in a
Kubernetes name, so a replica key never collides with a TrainingJob's. Replicas of one service
share the spread group ``<namespace>/<name>``.

A placement is written to ``status.placement.workers`` as ``{node, gpus, milli, replica}``
with GPU indices local to the node, which is exactly what ``placement_from_status`` needs to
rebuild it after an operator restart.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.placements import node_slots, placement_from_node_slots
from aifactory.controller.core.spec import (
    API_VERSION,
    JobKind,
    JobSpec,
    PowerBudgetSpec,
    QueueSpec,
    job_from_manifest,
)
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.grid import BudgetWindow, parse_time_of_day

__all__ = [
    "BUDGET_KIND",
    "GROUP",
    "PLURALS",
    "QUEUE_KIND",
    "SERVICE_KIND",
    "TRAINING_KIND",
    "VERSION",
    "budget_from_manifest",
    "budget_schedule_from_manifest",
    "config_from_manifest",
    "format_time",
    "job_spec_from_manifest",
    "parse_time",
    "placement_from_status",
    "placement_workers",
    "plain",
    "queue_from_manifest",
    "service_base",
]

GROUP = "aifactory.io"
VERSION = "v1alpha1"
TRAINING_KIND = JobKind.TRAINING.value
SERVICE_KIND = JobKind.INFERENCE.value
QUEUE_KIND = "GPUQueue"
BUDGET_KIND = "PowerBudget"
PLURALS = {
    TRAINING_KIND: "trainingjobs",
    SERVICE_KIND: "inferenceservices",
    QUEUE_KIND: "gpuqueues",
    BUDGET_KIND: "powerbudgets",
}


def plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars (kopf bodies are mapping views)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def job_spec_from_manifest(doc: Mapping[str, Any], kind: str) -> JobSpec:
    """Parse a TrainingJob or InferenceService body; SpecError names the bad field."""
    if doc.get("kind") != kind:
        raise SpecError("kind", f"must be {kind!r}, got {doc.get('kind')!r}")
    body = {"apiVersion": doc.get("apiVersion", API_VERSION), "kind": kind,
            "metadata": doc.get("metadata"), "spec": doc.get("spec")}
    return job_from_manifest(body)


def service_base(service: JobSpec) -> JobSpec:
    """The service with its replica count blanked: equal bases mean only scaling changed."""
    return replace(service, workers=0, group_size=0)


# --------------------------------------------------------------------------- queues, budgets


def _name(doc: Mapping[str, Any]) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise SpecError("metadata.name", "is required")
    return name


def _spec(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        raise SpecError("spec", "is required")
    return spec


def _number(spec: Mapping[str, Any], key: str, *, positive: bool = False,
            required: bool = False, path: str = "spec") -> float | None:
    value = spec.get(key)
    bound = "> 0" if positive else ">= 0"
    if value is None:
        if required:
            raise SpecError(f"{path}.{key}", f"is required (a number {bound})")
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise SpecError(f"{path}.{key}", f"must be a number {bound}, got {value!r}")
    return float(value)


def queue_from_manifest(doc: Mapping[str, Any]) -> QueueSpec:
    """A GPUQueue (cluster-scoped; its name is the queue name jobs refer to)."""
    spec = _spec(doc)
    nominal = _number(spec, "nominalGPUs", required=True)
    assert nominal is not None
    cohort = spec.get("cohort")
    if cohort is not None and (not isinstance(cohort, str) or not cohort):
        raise SpecError("spec.cohort", f"must be a cohort name, got {cohort!r}")
    weight = _number(spec, "weight", positive=True)
    max_priority = spec.get("maxPriority")
    if max_priority is not None and (not isinstance(max_priority, int)
                                     or isinstance(max_priority, bool)):
        raise SpecError("spec.maxPriority", f"must be an integer, got {max_priority!r}")
    flexibility = spec.get("defaultFlexibility", 0)
    if isinstance(flexibility, bool) or flexibility not in (0, 1, 2, 3):
        raise SpecError("spec.defaultFlexibility", "must be a grid-event flexibility tier "
                        f"0-3 (0: never capped or paused), got {flexibility!r}")
    return QueueSpec(name=_name(doc), nominal_gpus=nominal,
                     borrowing_limit_gpus=_number(spec, "borrowingLimitGPUs"),
                     cohort=cohort, weight=1.0 if weight is None else weight,
                     max_priority=max_priority, default_flexibility=flexibility)


def budget_schedule_from_manifest(doc: Mapping[str, Any]) -> tuple[BudgetWindow, ...]:
    """A PowerBudget's ``spec.schedule``: daily (``HH:MM`` in ``spec.timeZone``) or
    one-off (RFC 3339) windows at some watts or a percent of ``spec.watts``."""
    spec = _spec(doc)
    zone = spec.get("timeZone")
    if zone is not None:
        try:
            ZoneInfo(str(zone))
        except (ZoneInfoNotFoundError, ValueError):
            raise SpecError("spec.timeZone", f"{zone!r} is not an IANA time zone; write e.g. "
                            "America/Phoenix or UTC") from None
    raw = spec.get("schedule") or []
    if not isinstance(raw, list):
        raise SpecError("spec.schedule", "must be a list of windows {start, end, daily, "
                        "watts or percent}")
    out: list[BudgetWindow] = []
    for i, w in enumerate(raw):
        path = f"spec.schedule[{i}]"
        if not isinstance(w, Mapping):
            raise SpecError(path, f"must be a window {{start, end, percent}}, got {w!r}")
        watts = _number(w, "watts", positive=True, path=path)
        percent = _number(w, "percent", path=path)
        if (watts is None) == (percent is None) or (percent is not None and percent > 100):
            raise SpecError(f"{path}.percent", "give exactly one of watts or percent (0-100)")
        daily = bool(w.get("daily", False))
        start, end = (w.get("start"), w.get("end"))
        if not isinstance(start, str) or not isinstance(end, str):
            raise SpecError(f"{path}.start", "start and end are required strings")
        if daily:
            a = parse_time_of_day(start, f"{path}.start")
            b = parse_time_of_day(end, f"{path}.end")
        else:
            a, b = _when(start, f"{path}.start"), _when(end, f"{path}.end")
            if b <= a:
                raise SpecError(f"{path}.end", f"must be after start {start}")
        out.append(BudgetWindow(a, b, watts=watts, percent=percent, daily=daily,
                                time_zone=None if zone is None else str(zone)))
    return tuple(out)


def config_from_manifest(kind: str, doc: Mapping[str, Any]
                         ) -> tuple[QueueSpec | PowerBudgetSpec | None, str | None,
                                    tuple[BudgetWindow, ...]]:
    """A GPUQueue or PowerBudget (with its ``spec.schedule``), or None and why it is
    invalid: what start-up and a later change of the object both read."""
    try:
        if kind == QUEUE_KIND:
            return queue_from_manifest(doc), None, ()
        return budget_from_manifest(doc), None, budget_schedule_from_manifest(doc)
    except SpecError as exc:
        return None, str(exc), ()


def _when(text: str, path: str) -> float:
    got = parse_time(text)
    if got is None:
        raise SpecError(path, f"{text!r} is not an RFC 3339 time such as 2026-07-14T17:00:00Z "
                        "(or set daily: true and write HH:MM)")
    return got


def budget_from_manifest(doc: Mapping[str, Any]) -> PowerBudgetSpec:
    """A PowerBudget: ``spec.watts`` over the nodes ``spec.nodeSelector.matchLabels`` picks."""
    spec = _spec(doc)
    watts = _number(spec, "watts", positive=True, required=True)
    assert watts is not None
    selector = spec.get("nodeSelector") or {}
    labels = (selector.get("matchLabels") or {}) if isinstance(selector, Mapping) else None
    if not isinstance(labels, Mapping):
        raise SpecError("spec.nodeSelector.matchLabels", "must map label names to values, "
                        "e.g. {aifactory.io/rack: b0-r0}")
    pairs: list[tuple[str, str]] = []
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise SpecError("spec.nodeSelector.matchLabels",
                            f"must map label names to string values, got {key!r}: {value!r}")
        pairs.append((key, value))
    return PowerBudgetSpec(_name(doc), watts, tuple(sorted(pairs)))


# --------------------------------------------------------------------------- placements


def placement_workers(placement: Placement, topo: Topology,
                      replica: int | None = None) -> list[dict[str, Any]]:
    """``[{node, gpus (node-local indices), milli, replica}]`` for ``status.placement``."""
    out: list[dict[str, Any]] = []
    for node, gpus, milli in node_slots(placement, topo):
        worker: dict[str, Any] = {"node": node, "gpus": list(gpus)}
        if milli != MILLI_PER_GPU:
            worker["milli"] = milli
        if replica is not None:
            worker["replica"] = replica
        out.append(worker)
    return out


def placement_from_status(job: str, workers: Sequence[Mapping[str, Any]], topo: Topology,
                          watts_per_gpu: float, cpu_milli: int = 0,
                          memory_mib: int = 0) -> Placement:
    """Rebuild a Placement from ``status.placement.workers`` (each worker holding the job's
    ``cpu_milli`` and ``memory_mib``); SpecError names the worker field if it cannot be."""
    where = "status.placement.workers"
    if not workers:
        raise SpecError(where, "is empty")
    slots = [(w.get("node"), w.get("gpus"), w.get("milli", MILLI_PER_GPU)) for w in workers]
    return placement_from_node_slots(job, slots, topo, watts_per_gpu, cpu_milli, memory_mib,
                                     where=where)


# --------------------------------------------------------------------------- times


def format_time(seconds: float) -> str:
    """RFC 3339 in UTC with microseconds: what ``status`` times use."""
    stamp = dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> float | None:
    """Seconds since the epoch from an RFC 3339 time, or None if absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        stamp = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()
