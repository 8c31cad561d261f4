"""A consistent, immutable picture of a running control plane, for the metrics exporter.

``PlaneObserver.snapshot()`` reads one telemetry sample and the control plane's queue, usage
and job records, and returns a ``FactorySnapshot`` of plain values: per GPU (optional),
per node, per job, per power budget, per topology domain and level, per queue, and the
scheduler's own counters. The Prometheus adapter (``controller.observe.exporter``) only formats it,
so everything here is testable without ``prometheus_client``.

The control plane is thread-confined: call ``snapshot()`` from the thread that drives it, or
hold the lock that thread holds while it steps (``controller.observe.exporter`` takes a lock for
that). Nothing here mutates the plane; the telemetry source may settle its own counters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import TYPE_CHECKING, Protocol

from aifactory.controller.backends.base import GPUReading, MetersJobEnergy
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.histogram import HistogramCounts
from aifactory.controller.observe.telemetry import (
    BackendTelemetry,
    EnergyAttributor,
    GPUKey,
    ModelTelemetry,
    NvmlTelemetry,
    TelemetrySource,
    TelemetryUnavailableError,
)

if TYPE_CHECKING:
    from aifactory.controller.core.spec import JobSpec
    from aifactory.controller.core.state import Placement
    from aifactory.controller.runtime.controlplane import ControlPlane
    from aifactory.controller.runtime.scaler import ServiceView

__all__ = [
    "BudgetSample",
    "DomainSample",
    "FactorySnapshot",
    "JobSample",
    "LevelSample",
    "NodeSample",
    "PlaneObserver",
    "QueueSample",
    "SchedulerSample",
    "TelemetryChoice",
    "choose_telemetry",
]

LOG = logging.getLogger("aifactory.telemetry")
TELEMETRY_CHOICES = ("auto", "backend", "nvml", "model")
BASE_LEVELS = ("block", "rack")  # always labels on GPU and node series ("" when absent)
FACTORY_LEVEL = "factory"


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class NodeSample:
    labels: tuple[str, ...]  # node, <levels>, model
    gpus: int
    gpus_allocated: int
    power_watts: float
    energy_joules: float
    utilization: float  # mean over the node's GPUs
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_celsius: float  # hottest GPU
    power_limit_watts: float  # sum over the node's GPUs


@dataclass(frozen=True, slots=True)
class JobSample:
    namespace: str
    name: str
    queue: str
    phase: str
    gpus: float
    energy_joules: float
    cost_dollars: float
    gpu_seconds: float
    restarts: int
    preemptions: int


@dataclass(frozen=True, slots=True)
class BudgetSample:
    name: str
    limit_watts: float
    draw_watts: float  # measured: telemetry of the GPUs in scope plus per-node base
    allocated_watts: float  # what admission counts: idle + estimates of admitted jobs


@dataclass(frozen=True, slots=True)
class DomainSample:
    level: str
    name: str
    gpus: int
    gpus_allocated: int


@dataclass(frozen=True, slots=True)
class LevelSample:
    level: str
    domains: int
    domains_fully_free: int
    largest_free_gpus: int


@dataclass(frozen=True, slots=True)
class QueueSample:
    name: str
    nominal_gpus: float
    allocated_gpus: float
    pending_gpus: float
    pending_jobs: tuple[tuple[str, int], ...]  # (priority, jobs)
    jobs_by_phase: tuple[tuple[str, int], ...]
    wait: HistogramCounts | None


@dataclass(frozen=True, slots=True)
class ServiceSample:
    """One InferenceService's replicas and load (``ServiceView`` as the metrics see it)."""

    namespace: str
    name: str
    desired: int
    placed: int
    ready: int
    in_flight: float
    requests_total: float
    request_seconds_total: float
    scale_ups: int
    scale_downs: int


class ServiceSource(Protocol):
    """Where services' views come from: the autoscaler (``controller.runtime.scaler``)."""

    scale_counts: dict[tuple[str, str], int]

    def views(self) -> list[tuple[str, ServiceView]]: ...


@dataclass(frozen=True, slots=True)
class SchedulerSample:
    attempts: tuple[tuple[str, int], ...]
    decisions: HistogramCounts
    cycles: int
    preemptions: int
    restarts: int
    jobs_submitted: int
    jobs_completed: int
    jobs_failed: int
    budget_exceeded_seconds: float


@dataclass(frozen=True, slots=True)
class FactorySnapshot:
    """Everything one scrape shows. ``gpus`` is empty in node-level mode."""

    at: float
    factory: str
    source: str
    requested_source: str
    level_labels: tuple[str, ...]  # label names for topology levels (block, rack, ...)
    gpus: tuple[GPUReading, ...]
    gpu_labels: tuple[tuple[str, ...], ...]  # node, gpu, <levels>, model, ns, job
    nodes: tuple[NodeSample, ...]
    power_watts: float
    energy_joules: float
    budgets: tuple[BudgetSample, ...]
    domains: tuple[DomainSample, ...]
    levels: tuple[LevelSample, ...]
    queues: tuple[QueueSample, ...]
    jobs: tuple[JobSample, ...]
    scheduler: SchedulerSample
    services: tuple[ServiceSample, ...] = ()


@dataclass(frozen=True, slots=True)
class TelemetryChoice:
    source: TelemetrySource
    requested: str
    fallback_reason: str = ""


# --------------------------------------------------------------------------- choosing


def _holdings(plane: ControlPlane) -> Iterable[tuple[JobSpec, Placement]]:
    for key, placement in plane.state.allocations.items():
        rec = plane.jobs.get(key)
        if rec is not None:
            yield rec.spec, placement


def choose_telemetry(plane: ControlPlane, prefer: str = "auto",
                     nvml: object = None, node: str | None = None) -> TelemetryChoice:
    """The source to read: ``backend`` (its own telemetry), ``nvml``, ``model`` (the power
    model over allocations), or ``auto``: the simulated backend's, else NVML, else the
    model. When NVML was wanted but cannot run, this logs a warning and returns the model,
    with the reason."""
    if prefer not in TELEMETRY_CHOICES:
        raise ValueError(f"telemetry: unknown source {prefer!r}; valid sources are "
                         f"{', '.join(TELEMETRY_CHOICES)}")
    if prefer == "backend" or (prefer == "auto" and isinstance(plane.backend,
                                                               SimulatedBackend)):
        name = "simulated" if isinstance(plane.backend, SimulatedBackend) else "backend"
        return TelemetryChoice(BackendTelemetry(plane.backend, name), prefer)
    model = ModelTelemetry(plane.topo, lambda: _holdings(plane), lambda: plane.now)
    if prefer == "model":
        return TelemetryChoice(model, prefer)
    try:
        return TelemetryChoice(NvmlTelemetry(node=node, nvml=nvml), prefer)
    except TelemetryUnavailableError as exc:
        LOG.warning("%s; GPU telemetry falls back to the power model "
                    "(aifactory_telemetry_source_info{source=\"model\"})", exc)
        return TelemetryChoice(model, prefer, str(exc))


# --------------------------------------------------------------------------- observing


class PlaneObserver:
    """Builds ``FactorySnapshot``s of one control plane. ``per_gpu=False`` leaves out the
    per-GPU readings (node-level aggregation, for very large factories)."""

    def __init__(self, plane: ControlPlane, telemetry: TelemetryChoice | None = None,
                 per_gpu: bool = True, services: ServiceSource | None = None) -> None:
        self.plane = plane
        self.services = services
        self.telemetry = telemetry or choose_telemetry(plane)
        self.per_gpu = per_gpu
        self.attributor = EnergyAttributor()
        self._job_energy: dict[str, float] = {}
        self._queue_priorities: set[tuple[str, str]] = set()
        topo = plane.topo
        names = topo.level_names[:-1]
        self.level_labels = tuple(BASE_LEVELS) + tuple(n for n in names
                                                        if n not in BASE_LEVELS)
        where = [names.index(n) if n in names else -1 for n in self.level_labels]
        self._node_levels: list[tuple[str, ...]] = []
        for n in range(len(topo.nodes)):
            self._node_levels.append(tuple(
                topo.domains[lvl][topo.node_domain[lvl][n]].name if lvl >= 0 else ""
                for lvl in where))
        self._empty_levels = tuple("" for _ in self.level_labels)

    def snapshot(self) -> FactorySnapshot:
        plane = self.plane
        topo = plane.topo
        telemetry = self.telemetry.source.read()
        if not isinstance(self.telemetry.source, BackendTelemetry):
            self.attributor.update(telemetry, self._owner_shares())
        gpus, gpu_labels, nodes, node_power = self._gpus_and_nodes(telemetry.gpus)
        base = plane.factory.base_watts_per_node
        power = math.fsum(n.power_watts for n in nodes) + base * len(topo.nodes)
        energy = math.fsum(n.energy_joules for n in nodes)
        return FactorySnapshot(
            at=telemetry.at, factory=plane.factory.name, source=self.telemetry.source.name,
            requested_source=self.telemetry.requested, level_labels=self.level_labels,
            gpus=gpus, gpu_labels=gpu_labels, nodes=nodes, power_watts=power,
            energy_joules=energy, budgets=self._budgets(node_power),
            domains=self._domains(), levels=self._levels(), queues=self._queues(),
            jobs=self._jobs(), scheduler=self._scheduler(), services=self._services())

    def _services(self) -> tuple[ServiceSample, ...]:
        source = self.services
        if source is None:
            return ()
        counts = source.scale_counts
        out = []
        for key, v in source.views():
            namespace, _, name = key.partition("/")
            out.append(ServiceSample(
                namespace, name, v.desired, v.placed, v.ready, v.in_flight,
                v.requests_total, v.latency_seconds_total,
                counts.get((key, "up"), 0), counts.get((key, "down"), 0)))
        return tuple(out)

    # ----------------------------------------------------------------- GPUs and nodes

    def _owners(self) -> dict[int, str]:
        """Global GPU index -> the job holding the largest share of it (ties: by key)."""
        best: dict[int, tuple[int, str]] = {}
        for key, placement in self.plane.state.allocations.items():
            if key not in self.plane.jobs:
                continue  # fences of failed GPUs
            for slot in placement.slots:
                for g in slot.gpus:
                    have = best.get(g)
                    if have is None or (slot.milli, have[1]) > (have[0], key):
                        best[g] = (slot.milli, key)
        return {g: key for g, (_, key) in best.items()}

    def _owner_shares(self) -> dict[GPUKey, list[tuple[str, int]]]:
        topo = self.plane.topo
        shares: dict[GPUKey, list[tuple[str, int]]] = {}
        for key, placement in self.plane.state.allocations.items():
            if key not in self.plane.jobs:
                continue
            for slot in placement.slots:
                node = topo.nodes[slot.node].name
                start = topo.gpu_start[slot.node]
                for g in slot.gpus:
                    shares.setdefault((node, g - start), []).append((key, slot.milli))
        return shares

    def _gpus_and_nodes(self, readings: tuple[GPUReading, ...]
                        ) -> tuple[tuple[GPUReading, ...], tuple[tuple[str, ...], ...],
                                   tuple[NodeSample, ...], dict[int, float]]:
        """Per-GPU labels (when per-GPU) and per-node sums. Column-wise: a 100,000-GPU
        factory is summed in C (``map``/``sum`` over slices), not reading by reading."""
        topo = self.plane.topo
        index = topo.node_index
        used = self.plane.state.gpu_used_milli
        names = list(map(attrgetter("node"), readings))
        cols = [list(map(attrgetter(f), readings)) for f in _SUMMED]
        temps = list(map(attrgetter("temperature_celsius"), readings))
        total = len(names)
        starts = [0, *(i for i in range(1, total) if names[i] != names[i - 1])]
        merged: dict[str, list[float]] = {}
        models: dict[str, str] = {}
        owners = self._owners() if self.per_gpu else {}
        labels: list[tuple[str, ...]] = []
        for a, b in zip(starts, [*starts[1:], total], strict=True):
            name = names[a]
            n = index.get(name, -1)
            sums = [sum(col[a:b]) for col in cols]
            allocated = 0
            if n >= 0:
                first = topo.gpu_start[n]
                node_used = used[first:first + topo.nodes[n].gpus]
                allocated = len(node_used) - node_used.count(0)
            have = merged.get(name)
            if have is None:
                merged[name] = [b - a, allocated, max(temps[a:b]), *sums]
                models[name] = readings[a].model
            else:  # the same node in two runs: readings were not grouped by node
                have[0] += b - a
                have[2] = max(have[2], *temps[a:b])
                for i, v in enumerate(sums):
                    have[3 + i] += v
            if self.per_gpu:
                levels = self._node_levels[n] if n >= 0 else self._empty_levels
                base = topo.gpu_start[n] if n >= 0 else -1
                count = topo.nodes[n].gpus if n >= 0 else 0
                for r in readings[a:b]:
                    owner = owners.get(base + r.index, "") if r.index < count else ""
                    ns, _, job = owner.partition("/")
                    labels.append((name, _index_text(r.index), *levels, r.model, ns, job))
        nodes: list[NodeSample] = []
        node_power: dict[int, float] = {}
        for name, (gpus, held, temp, power, energy, util, mem_used, mem_total,
                   limit) in merged.items():
            n = index.get(name, -1)
            levels = self._node_levels[n] if n >= 0 else self._empty_levels
            nodes.append(NodeSample(
                labels=(name, *levels, models[name]), gpus=int(gpus),
                gpus_allocated=int(held), power_watts=power, energy_joules=energy,
                utilization=util / gpus, memory_used_bytes=int(mem_used),
                memory_total_bytes=int(mem_total), temperature_celsius=temp,
                power_limit_watts=limit))
            if n >= 0:
                node_power[n] = power
        return (readings if self.per_gpu else (), tuple(labels), tuple(nodes), node_power)

    # ----------------------------------------------------------------- factory

    def _budgets(self, node_power: dict[int, float]) -> tuple[BudgetSample, ...]:
        plane = self.plane
        budgets = plane.state.budgets
        if not budgets.names:
            return ()
        base = plane.factory.base_watts_per_node
        draw = [0.0] * len(budgets.names)
        for n, covering in enumerate(budgets.node_budgets):
            watts = node_power.get(n, 0.0) + base
            for b in covering:
                draw[b] += watts
        return tuple(BudgetSample(name, limit, draw[b], plane.state.budget_watts[b])
                     for b, (name, limit) in enumerate(zip(budgets.names, budgets.limits,
                                                           strict=True)))

    def _domains(self) -> tuple[DomainSample, ...]:
        topo = self.plane.topo
        state = self.plane.state
        out = [DomainSample(FACTORY_LEVEL, FACTORY_LEVEL, topo.total_gpus,
                            topo.total_gpus - state.free_whole_gpus)]
        for lvl in range(topo.node_level):
            level = topo.levels[lvl].name
            for dom in topo.domains[lvl]:
                out.append(DomainSample(level, dom.name, dom.gpus,
                                        dom.gpus - state.free_gpus(dom)))
        return tuple(out)

    def _levels(self) -> tuple[LevelSample, ...]:
        topo = self.plane.topo
        state = self.plane.state
        free_all = state.free_whole_gpus
        out = [LevelSample(FACTORY_LEVEL, 1, int(free_all == topo.total_gpus), free_all)]
        for lvl in range(topo.node_level):
            frees = [(state.free_gpus(d), d.gpus) for d in topo.domains[lvl]]
            out.append(LevelSample(topo.levels[lvl].name, len(frees),
                                   sum(1 for f, g in frees if f == g),
                                   max((f for f, _ in frees), default=0)))
        nodes = topo.nodes
        out.append(LevelSample(
            topo.levels[-1].name, len(nodes),
            sum(1 for n, node in enumerate(nodes) if state.node_free[n] == node.gpus),
            max(state.node_free, default=0)))
        return tuple(out)

    # ----------------------------------------------------------------- queues and jobs

    def _queues(self) -> tuple[QueueSample, ...]:
        plane = self.plane
        nominal = {q.name: q.nominal_gpus for q in plane.factory.queues}
        allocated: dict[str, float] = dict.fromkeys(nominal, 0.0)
        pending_gpus: dict[str, float] = dict.fromkeys(nominal, 0.0)
        pending: dict[tuple[str, str], int] = {}
        phases: dict[tuple[str, str], int] = {}
        for rec in plane.jobs.values():
            queue = rec.spec.queue
            phase = rec.phase
            phases[(queue, phase)] = phases.get((queue, phase), 0) + 1
            allocated.setdefault(queue, 0.0)
            pending_gpus.setdefault(queue, 0.0)
            if rec.placement is not None and not rec.done:
                allocated[queue] += rec.placement.gpu_equivalents
            elif not rec.done:
                pending_gpus[queue] += rec.spec.gpu_equivalents
                pair = (queue, str(rec.spec.priority))
                pending[pair] = pending.get(pair, 0) + 1
                self._queue_priorities.add(pair)
        waits = plane.metrics.queue_waits.counts()
        out: list[QueueSample] = []
        for queue in sorted(allocated):
            prios = sorted((p for q, p in self._queue_priorities if q == queue), key=_prio)
            out.append(QueueSample(
                queue, nominal.get(queue, 0.0), allocated[queue], pending_gpus[queue],
                tuple((p, pending.get((queue, p), 0)) for p in prios),
                tuple((phase, phases.get((queue, phase), 0))
                      for phase in ("Queued", "Running", "Succeeded", "Failed")),
                waits.get(queue)))
        return tuple(out)

    def _jobs(self) -> tuple[JobSample, ...]:
        plane = self.plane
        now = plane.now
        cost = plane.factory.cost
        from_backend = isinstance(self.telemetry.source, BackendTelemetry)
        backend = plane.backend
        out: list[JobSample] = []
        for key, rec in plane.jobs.items():
            if from_backend:
                if isinstance(backend, MetersJobEnergy):
                    joules = backend.job_energy_joules(key)
                else:
                    status = plane.backend.status(key)
                    joules = status.energy_joules if status is not None else 0.0
                joules = max(joules, rec.energy_joules)
            else:
                joules = self.attributor.job_joules.get(key, 0.0)
            joules = max(joules, self._job_energy.get(key, 0.0))  # a counter never falls
            self._job_energy[key] = joules
            gpu_seconds = plane.metrics.gpu_seconds(key, now)
            held = rec.placement.gpu_equivalents if rec.placement is not None and \
                not rec.done else 0.0
            out.append(JobSample(
                rec.spec.namespace, rec.spec.name, rec.spec.queue, rec.phase, held, joules,
                cost.cost_dollars(joules, gpu_seconds), gpu_seconds, rec.restarts,
                rec.preemptions))
        gone = self._job_energy.keys() - plane.jobs.keys()  # forgotten or cancelled
        if gone:
            for key in gone:
                del self._job_energy[key]
                self.attributor.job_joules.pop(key, None)
        return tuple(out)

    def _scheduler(self) -> SchedulerSample:
        m = self.plane.metrics
        return SchedulerSample(
            attempts=tuple(sorted(m.attempts.items())), decisions=m.decision_histogram.counts(),
            cycles=self.plane.cycles, preemptions=m.preemptions, restarts=m.restarts,
            jobs_submitted=m.submitted, jobs_completed=m.completed, jobs_failed=m.jobs_failed,
            budget_exceeded_seconds=m.exceeded_seconds)

    def close(self) -> None:
        self.telemetry.source.close()


_SUMMED = ("power_watts", "energy_joules", "utilization", "memory_used_bytes",
           "memory_total_bytes", "power_limit_watts")
_INDEX_TEXT = tuple(str(i) for i in range(256))


def _index_text(i: int) -> str:
    return _INDEX_TEXT[i] if 0 <= i < len(_INDEX_TEXT) else str(i)


def _prio(p: str) -> tuple[int, str]:
    try:
        return (int(p), p)
    except ValueError:
        return (0, p)
