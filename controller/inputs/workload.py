"""Workloads for the simulator: a folder of manifests, or a trace's pod list.

A folder holds TrainingJob and InferenceService YAML exactly as users ``kubectl apply`` them
(``manifests/samples/``); other kinds in it (GPUQueue, PowerBudget, ...) are left to their own
readers. An optional annotation ``aifactory.io/submit-after-seconds`` staggers arrivals, and
``aifactory.io/runtime-seconds`` gives the simulator a true runtime that differs from the
job's own estimate. A CSV is read as an openb pod list.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from aifactory.controller.core.errors import InputFileError, SpecError
from aifactory.controller.core.spec import JobKind, JobSpec, job_from_manifest, replica_jobs
from aifactory.controller.inputs._csv import read_header

__all__ = ["DEFAULT_WORKLOAD", "JOB_KINDS", "Arrival", "default_workload", "load_manifest_docs",
           "load_workload"]

JOB_KINDS = {JobKind.TRAINING.value, JobKind.INFERENCE.value}
SUBMIT_AFTER = "aifactory.io/submit-after-seconds"
RUNTIME = "aifactory.io/runtime-seconds"
DEFAULT_WORKLOAD = "manifests/samples"


@dataclass(frozen=True, slots=True)
class Arrival:
    """A job entering the queue at ``at`` seconds; ``runtime_seconds`` is its true length
    (known to the simulator, hidden from the scheduler); None = runs until stopped."""

    spec: JobSpec
    at: float = 0.0
    runtime_seconds: float | None = None


def load_manifest_docs(path: Path) -> list[tuple[Path, int, dict[str, Any]]]:
    """Every YAML document under ``path`` (a file or a folder), with its file and index."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.suffix in {".yaml", ".yml"})
    if not path.exists():
        raise InputFileError(str(path), "no such file or folder")
    out: list[tuple[Path, int, dict[str, Any]]] = []
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise InputFileError(str(f), f"invalid YAML: {exc}", line) from exc
        for i, doc in enumerate(docs):
            if isinstance(doc, dict):
                out.append((f, i, doc))
    return out


def _float_annotation(doc: dict[str, Any], key: str, where: str) -> float | None:
    meta = doc.get("metadata") or {}
    raw = (meta.get("annotations") or {}).get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where} metadata.annotations[{key}]",
                        f"must be a number of seconds, got {raw!r}") from exc
    if value < 0:
        raise SpecError(f"{where} metadata.annotations[{key}]", f"must be >= 0, got {value}")
    return value


def load_workload(path: str | Path, host_resources: bool = True) -> list[Arrival]:
    """Arrivals from a manifest folder/file or an openb pod CSV.

    With ``host_resources`` (the default) jobs keep the CPU and memory they ask for, and an
    openb pod list's CPU-only pods are zero-GPU jobs; without, CPU and memory are dropped
    from every job and CPU-only jobs are left out (GPUs alone are scheduled)."""
    p = Path(path)
    if p.suffix == ".csv":
        from aifactory.controller.inputs.traces import load_openb_pods

        return [Arrival(t.spec, t.arrival_seconds or 0.0, t.duration_seconds)
                for t in load_openb_pods(p, host_resources and _has_host_columns(p))]
    if not host_resources:
        return [replace(a, spec=replace(a.spec, cpu_milli=0, memory_mib=0))
                for a in load_workload(p) if not a.spec.cpu_only]
    arrivals: list[Arrival] = []
    for f, i, doc in load_manifest_docs(p):
        if doc.get("kind") not in JOB_KINDS:
            continue
        where = f"{f}[{i}]"
        try:
            job = job_from_manifest(doc)
        except SpecError as exc:
            raise SpecError(f"{where} {exc.field}", exc.message) from exc
        at = _float_annotation(doc, SUBMIT_AFTER, where) or 0.0
        runtime = _float_annotation(doc, RUNTIME, where)
        if job.kind is JobKind.INFERENCE:
            arrivals.extend(Arrival(r, at, None) for r in replica_jobs(job))
        else:
            arrivals.append(Arrival(job, at, runtime or job.expected_runtime_seconds))
    arrivals.sort(key=lambda a: a.at)
    return arrivals


def _has_host_columns(path: Path) -> bool:
    return {"cpu_milli", "memory_mib"} <= set(read_header(path))


def default_workload() -> Path:
    """``manifests/samples`` of the source checkout this package runs from."""
    here = Path(__file__).resolve().parents[2] / DEFAULT_WORKLOAD
    if here.is_dir():
        return here
    raise InputFileError(str(here), f"no --workload given and no {DEFAULT_WORKLOAD}/ beside the "
                         "package; pass --workload DIR|POD_CSV")
