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

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import (
    API_VERSION,
    JobKind,
    JobSpec,
    PowerBudgetSpec,
    QueueSpec,
    job_from_manifest,
)
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.controller.core.topology import Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.model import canonical_model

__all__ = [
    "BUDGET_KIND",
    "GROUP",
    "PLURALS",
    "QUEUE_KIND",
    "SERVICE_KIND",
    "TRAINING_KIND",
    "VERSION",
    "budget_from_manifest",
    "format_time",
    "job_spec_from_manifest",
    "parse_time",
    "placement_from_status",
    "placement_span",
    "placement_workers",
    "plain",
    "queue_from_manifest",
    "replica_index",
    "replica_specs",
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
REPLICA_SEPARATOR = ":r"


def plain(value: Any) -> Any:
    """A deep copy made of dicts, lists and scalars (kopf bodies are mapping views)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _canonical_models(spec: JobSpec) -> JobSpec:
    """``NVIDIA-H200`` and ``H200`` name the same GPUs; the inventory uses canonical names."""
    if not spec.gpu_models:
        return spec
    models = tuple(canonical_model(m) or m for m in spec.gpu_models)
    return replace(spec, gpu_models=models)


def job_spec_from_manifest(doc: Mapping[str, Any], kind: str) -> JobSpec:
    """Parse a TrainingJob or InferenceService body; SpecError names the bad field."""
    if doc.get("kind") != kind:
        raise SpecError("kind", f"must be {kind!r}, got {doc.get('kind')!r}")
    body = {"apiVersion": doc.get("apiVersion", API_VERSION), "kind": kind,
            "metadata": doc.get("metadata"), "spec": doc.get("spec")}
    return _canonical_models(job_from_manifest(body))


def service_base(service: JobSpec) -> JobSpec:
    """The service with its replica count blanked: equal bases mean only scaling changed."""
    return replace(service, workers=0, group_size=0)


def replica_specs(service: JobSpec) -> list[JobSpec]:
    """One single-worker gang per replica of an InferenceService (``workers`` = replicas)."""
    group = f"{service.namespace}/{service.name}"
    return [replace(service, name=f"{service.name}{REPLICA_SEPARATOR}{i}", workers=1,
                    group=group, group_size=service.workers)
            for i in range(service.workers)]


def replica_index(key: str) -> int | None:
    """``ns/svc:r3`` -> 3; None for a TrainingJob key."""
    head, sep, tail = key.rpartition(REPLICA_SEPARATOR)
    if not sep or not head or not tail.isdigit():
        return None
    return int(tail)


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
            required: bool = False) -> float | None:
    value = spec.get(key)
    bound = "> 0" if positive else ">= 0"
    if value is None:
        if required:
            raise SpecError(f"spec.{key}", f"is required (a number {bound})")
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
            or value < 0 or (positive and value == 0)):
        raise SpecError(f"spec.{key}", f"must be a number {bound}, got {value!r}")
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
    return QueueSpec(name=_name(doc), nominal_gpus=nominal,
                     borrowing_limit_gpus=_number(spec, "borrowingLimitGPUs"),
                     cohort=cohort, weight=1.0 if weight is None else weight)


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
    for slot in placement.slots:
        first = topo.gpu_start[slot.node]
        worker: dict[str, Any] = {"node": topo.nodes[slot.node].name,
                                  "gpus": [g - first for g in slot.gpus]}
        if slot.milli != MILLI_PER_GPU:
            worker["milli"] = slot.milli
        if replica is not None:
            worker["replica"] = replica
        out.append(worker)
    return out


def placement_from_status(job: str, workers: Sequence[Mapping[str, Any]], topo: Topology,
                          watts_per_gpu: float, cpu_milli: int = 0,
                          memory_mib: int = 0) -> Placement:
    """Rebuild a Placement from ``status.placement.workers`` (each worker holding the job's
    ``cpu_milli`` and ``memory_mib``); SpecError if it cannot be."""
    if not workers:
        raise SpecError("status.placement.workers", "is empty")
    slots: list[WorkerSlot] = []
    for i, worker in enumerate(workers):
        path = f"status.placement.workers[{i}]"
        node_name = worker.get("node")
        node = topo.node_index.get(node_name) if isinstance(node_name, str) else None
        if node is None:
            raise SpecError(f"{path}.node", f"node {node_name!r} is not in the inventory")
        local = worker.get("gpus")
        count = topo.nodes[node].gpus
        if (not isinstance(local, list) or not local
                or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < count
                           for g in local) or len(set(local)) != len(local)):
            raise SpecError(f"{path}.gpus", f"must list distinct GPU indices below {count} "
                            f"on node {node_name}, got {local!r}")
        milli = worker.get("milli", MILLI_PER_GPU)
        if not isinstance(milli, int) or isinstance(milli, bool) or not 0 < milli <= MILLI_PER_GPU:
            raise SpecError(f"{path}.milli",
                            f"must be an integer in 1..{MILLI_PER_GPU}, got {milli!r}")
        first = topo.gpu_start[node]
        slots.append(WorkerSlot(node, tuple(first + g for g in local), milli, cpu_milli,
                                memory_mib))
    return Placement(job, tuple(slots), watts_per_gpu)


def placement_span(placements: Sequence[Placement], topo: Topology
                   ) -> tuple[dict[str, int], str]:
    """Domains touched per level, and the span in a few words: ``rack b0-r1``, ``2 racks``.

    The words name the smallest single domain that holds everything, else the count of the
    highest level's domains (``2 blocks``)."""
    slots = [s for p in placements for s in p.slots]
    if not slots:
        return {}, ""
    levels: dict[str, int] = {}
    doms_by_level: list[set[int]] = []
    for level, spec in enumerate(topo.levels):
        doms = {topo.ancestor(s.node, level) for s in slots}
        levels[spec.name] = len(doms)
        doms_by_level.append(doms)
    for level in range(topo.node_level, -1, -1):
        doms = doms_by_level[level]
        if len(doms) == 1:
            # Prefer the lowest level with a single domain.
            index = next(iter(doms))
            return levels, f"{topo.levels[level].name} {topo.domains[level][index].name}"
    # Nothing single below the root: count at the top level that still splits.
    top = topo.levels[0].name
    return levels, f"{levels[top]} {top}s"


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
