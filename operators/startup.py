"""Start-up: build the control plane from the cluster, then rebuild its state from status.

Nothing new is scheduled until every existing object is accounted for:

1. wait until the API server serves our CRDs;
2. list GPUQueues and PowerBudgets (they become the core's queues and budgets), the Nodes
   (the inventory, unless a factory spec or the Ray cluster is used; with Ray, the topology
   of the Ray nodes, ``operators.raynodes``) and every TrainingJob
   and InferenceService;
3. a job that still runs is ``adopt``ed where it runs: its GPUs are marked used, its start
   time, restarts, energy and GPU-hours carry on, nothing is launched twice. With a
   backend that finds its work again (Ray: detached placement groups named after the job),
   what the backend finds is the truth: the gang is adopted on the GPUs its workers hold,
   even if the operator died before writing Running; a gang whose job is gone, finished or
   invalid is removed; a job whose status says Running but whose gang is gone is requeued.
   With the simulated backend, whose work died with the old process, a job whose status
   says Running (or Admitted) is adopted at its recorded placement and relaunched there
   without restarting its progress (``aifactory.operators.session.reattach``);
4. every other job that is not finished is resubmitted in its original order
   (``metadata.creationTimestamp``, then namespace and name), keeping its restart count;
5. finished jobs (Succeeded/Failed at their current generation) are left as they are.

A placement that no longer fits (a node left the inventory, or two jobs claim one GPU) is
not trusted: that job is requeued with a Warning Event saying why.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aifactory.controller.backends.base import AdoptsGangs, FoundGang
from aifactory.controller.backends.directory import NODE_NAME_LABEL
from aifactory.controller.core.errors import InvariantError, SpecError
from aifactory.controller.core.placements import describe_placement, placement_from_node_slots
from aifactory.controller.core.spec import JobSpec, PowerBudgetSpec, QueueSpec, replica_jobs
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import GPU_COUNT_LABEL, GPU_PRESENT_LABEL, Topology
from aifactory.controller.inputs.factory import FactorySpec
from aifactory.controller.power.grid import BudgetWindow
from aifactory.controller.runtime.autoscale import policy_from_manifest
from aifactory.controller.runtime.clock import WallClock
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.resync import Reconciler
from aifactory.operators.books import EngineOptions
from aifactory.operators.engine import Engine
from aifactory.operators.grid import GridOptions
from aifactory.operators.inventory import GPU_RESOURCE, choose_factory
from aifactory.operators.kube import KubeClient, KubeError
from aifactory.operators.nodes import NodeBook
from aifactory.operators.objects import Tracked
from aifactory.operators.raynodes import KubeNodeDirectory
from aifactory.operators.session import (
    BackendSession,
    RayOptions,
    gang_adopter,
    open_backend,
    reattach,
)
from aifactory.operators.status import Phase
from aifactory.operators.translate import (
    BUDGET_KIND,
    QUEUE_KIND,
    SERVICE_KIND,
    TRAINING_KIND,
    config_from_manifest,
    format_time,
    job_spec_from_manifest,
    parse_time,
    placement_from_status,
)

__all__ = ["OperatorOptions", "RecoveryReport", "build_engine", "recover", "wait_for_crds"]

log = logging.getLogger(__name__)
KINDS = (TRAINING_KIND, SERVICE_KIND, QUEUE_KIND, BUDGET_KIND)


@dataclass(frozen=True, slots=True)
class OperatorOptions:
    """Everything ``aifactory operator`` is told on its command line."""

    backend: str = "sim"
    cluster: str = "small"
    inventory: str = "auto"
    sim_speed: float = 1.0
    policy: str = "aifactory"
    ray: RayOptions = field(default_factory=RayOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)
    metrics_port: int = 9402  # 0: no metrics server
    telemetry: str = "auto"
    per_gpu_metrics: bool = True
    node_grace_seconds: float = 40.0  # NotReady this long fails a node's gangs
    grid: GridOptions = field(default_factory=GridOptions)  # grid events (operators.grid)


@dataclass(slots=True)
class RecoveryReport:
    """What start-up found: counts per outcome."""

    adopted: int = 0
    requeued: int = 0
    finished: int = 0
    invalid: int = 0
    conflicts: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # gangs found with no job to own them

    def __str__(self) -> str:
        text = (f"adopted {self.adopted} running gangs at their recorded placements, "
                f"requeued {self.requeued}, left {self.finished} finished, "
                f"{self.invalid} invalid, {len(self.conflicts)} placement conflicts")
        if self.removed:
            text += f"; removed {len(self.removed)} gangs nobody owns: {', '.join(self.removed)}"
        return text


async def wait_for_crds(kube: KubeClient, timeout_seconds: float = 120.0) -> None:
    """Block until every CRD is served, saying what is missing while waiting."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while True:
        missing = sorted(set(KINDS) - await kube.served_kinds())
        if not missing:
            return
        if loop.time() > deadline:
            raise SpecError("CRDs", f"{', '.join(missing)} not served by the API server after "
                            f"{timeout_seconds:.0f} s; install them: kubectl apply -k manifests/")
        log.warning("waiting for CRDs %s (kubectl apply -k manifests/)", ", ".join(missing))
        await asyncio.sleep(2.0)


ParsedConfig = tuple[Mapping[str, Any], QueueSpec | PowerBudgetSpec | None, str | None,
                     tuple[BudgetWindow, ...]]


def _configs(items: Iterable[Mapping[str, Any]], kind: str) -> list[ParsedConfig]:
    return [(item, *config_from_manifest(kind, item)) for item in items]


async def build_engine(kube: KubeClient, options: OperatorOptions,
                       may_write: Callable[[], bool] | None = None,
                       ) -> tuple[Engine, RecoveryReport]:
    """Everything up to a recovered, not yet started, engine. ``may_write`` is the leader
    election's fence (status is written only while it says True)."""
    await wait_for_crds(kube)
    listing = {kind: await kube.list_objects(kind) for kind in KINDS}
    namespaces = await _namespaces(kube)
    clock = WallClock(options.sim_speed)
    node_objects: list[dict[str, Any]] = []
    directory: KubeNodeDirectory | None = None
    if options.backend == "sim":
        node_objects = [] if options.inventory == "factory" else await kube.list_nodes()
        factory = choose_factory(options.inventory, node_objects, options.cluster)
        topo = factory.topology()
        session = open_backend("sim", topo, clock)
    else:
        directory = await _node_directory(kube, options.ray)
        session = open_backend(options.backend, None, clock, options.ray, directory)
        assert session.factory is not None and session.topology is not None
        factory, topo = session.factory, session.topology
    try:
        engine, report = _assemble(kube, options, listing, clock, session, factory, topo,
                                   namespaces, may_write)
        engine.node_directory = directory
        if options.backend == "sim" and factory.source == "Node objects":
            # The inventory is the cluster's Nodes: follow their health from now on.
            engine.node_book = NodeBook(options.node_grace_seconds)
            now = time.monotonic()
            for item in node_objects:
                engine.node_book.observe(item, False, now)
        return engine, report
    except BaseException:
        session.close()
        raise


async def _node_directory(kube: KubeClient, ray: RayOptions) -> KubeNodeDirectory | None:
    """The Nodes as the Ray nodes' directory (``--ray-topology nodes``, or ``auto`` when
    some Node has GPUs), filled from a listing; None: the Ray nodes' own labels."""
    if ray.topology == "ray" or ray.local:
        return None
    directory = KubeNodeDirectory()
    for item in await kube.list_nodes():
        directory.observe(item, False)
    if ray.topology == "auto" and not directory.gpu_machines():
        log.info("no Node has GPUs (allocatable %s, %s or %s=true): the Ray nodes' own "
                 "labels give the topology", GPU_RESOURCE, GPU_COUNT_LABEL, GPU_PRESENT_LABEL)
        return None
    log.info("the Ray nodes' topology comes from the Node each names (%s)", NODE_NAME_LABEL)
    return directory


def _assemble(kube: KubeClient, options: OperatorOptions,
              listing: Mapping[str, list[Any]], clock: WallClock, session: BackendSession,
              factory: FactorySpec, topo: Topology,
              namespaces: list[dict[str, Any]] | None = None,
              may_write: Callable[[], bool] | None = None,
              ) -> tuple[Engine, RecoveryReport]:
    backend = session.backend
    queues = _configs(listing[QUEUE_KIND], QUEUE_KIND)
    budgets = _configs(listing[BUDGET_KIND], BUDGET_KIND)
    factory = replace(
        factory,
        queues=tuple(sorted((s for _, s, _, _ in queues if isinstance(s, QueueSpec)),
                            key=lambda q: q.name)),
        power_budgets=tuple(sorted((s for _, s, _, _ in budgets
                                    if isinstance(s, PowerBudgetSpec)), key=lambda b: b.name)))
    cp = ControlPlane(factory, backend, options.policy, clock=clock, topology=topo)
    reconciler: Reconciler | None = None
    if session.rebuild_factory is not None:
        rebuild_factory = session.rebuild_factory

        def grown() -> FactorySpec:  # the new inventory, with the queues and budgets we have
            assert reconciler is not None
            have = reconciler.cp.factory
            return replace(rebuild_factory(), queues=have.queues,
                           power_budgets=have.power_budgets)

        reconciler = Reconciler(cp, backend, grown)
    engine = Engine(cp, kube, clock, options.engine, reconciler, may_write, options.grid)
    engine.on_stop.append(session.close)
    for kind, entries in ((QUEUE_KIND, queues), (BUDGET_KIND, budgets)):
        for item, spec, invalid, windows in entries:
            engine.load_config(kind, dict(item), spec, invalid, windows)
    if namespaces is not None:
        engine.namespaces = {}
        for item in namespaces:
            engine.load_namespace(item)
    log.info("inventory: %s from %s; %d queues, %d power budgets", topo.describe(),
             factory.source or factory.name, len(factory.queues), len(factory.power_budgets))
    report = recover(engine, listing[TRAINING_KIND] + listing[SERVICE_KIND])
    log.info("recovery: %s", report)
    return engine, report


def _order(doc: Mapping[str, Any]) -> tuple[float, str, str]:
    meta = doc.get("metadata") or {}
    return (parse_time(meta.get("creationTimestamp")) or 0.0, str(meta.get("namespace")),
            str(meta.get("name")))


def _recorded(status: Mapping[str, Any], service: bool) -> dict[int | None, list[Any]]:
    """Recorded workers per replica (key None for a TrainingJob)."""
    placement = status.get("placement") or {}
    workers = placement.get("workers") if isinstance(placement, Mapping) else None
    out: dict[int | None, list[Any]] = {}
    for worker in workers or []:
        if not isinstance(worker, Mapping):
            continue
        replica = worker.get("replica") if service else None
        if service and not isinstance(replica, int):
            continue
        out.setdefault(replica, []).append(worker)
    return out


async def _namespaces(kube: KubeClient) -> list[dict[str, Any]] | None:
    """Every Namespace (their queue grants), or None without the right to list them."""
    try:
        return await kube.list_namespaces()
    except KubeError as exc:
        if exc.status != 403:
            raise
        log.warning("may not list Namespaces (%s): queue grants are left to the API "
                    "server's admission policies; give the operator get/list/watch on "
                    "namespaces to check them here too", exc)
        return None


def recover(engine: Engine, docs: Iterable[Mapping[str, Any]]) -> RecoveryReport:
    """Adopt the running, requeue the waiting, leave the finished (see module docstring)."""
    report = RecoveryReport()
    clock = engine.clock
    adopter = gang_adopter(engine.cp.backend)
    found = {g.job: g for g in adopter.adoptable()} if adopter is not None else {}
    later: list[tuple[Tracked, JobSpec, float, Mapping[str, Any]]] = []
    for doc in sorted(docs, key=_order):
        kind = str(doc.get("kind"))
        body = dict(doc)
        obj = engine.track(kind, body)
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        engine.books.claims.written(obj.ident, status)  # what the API server shows held
        obj.generation = int(meta.get("generation") or 1)
        phase = status.get("phase")
        if phase in Phase.TERMINAL and status.get("observedGeneration") == obj.generation:
            obj.terminal = True
            report.finished += 1
            continue
        try:
            spec = job_spec_from_manifest(body, kind)
        except SpecError as exc:
            engine.fail_invalid(obj, str(exc))
            report.invalid += 1
            continue
        spec, refusal = engine.tenancy(body, spec)
        if refusal is not None and phase not in (Phase.RUNNING, Phase.ADMITTED):
            engine.fail_invalid(obj, refusal, reason="NotPermitted")  # never placed
            report.invalid += 1
            continue
        service = kind == SERVICE_KIND
        if service:
            try:
                policy = policy_from_manifest(body)
            except SpecError as exc:
                engine.fail_invalid(obj, str(exc))
                report.invalid += 1
                continue
            # The autoscaler's last count (status.desiredReplicas), not spec.replicas: a
            # restart must neither drop the replicas it added nor leave them unscaled.
            spec = engine.scaling.replicas_for(spec, policy, status)
        obj.spec = spec
        obj.energy_banked = float(status.get("energyJoules") or 0.0)
        obj.gpu_seconds = float(status.get("gpuHours") or 0.0) * 3600.0
        recorded = _recorded(status, service) if phase in (Phase.RUNNING,
                                                           Phase.ADMITTED) else {}
        started_wall = parse_time(status.get("startedAt"))
        created = clock.from_wall(obj.created)
        gangs = replica_jobs(spec) if service else [spec]
        for i, gang in enumerate(gangs):
            workers = recorded.get(i if service else None)
            running = found.pop(gang.key, None)
            if adopter is not None:
                if running is not None and _adopt_found(engine, adopter, obj, gang, running,
                                                        status, bool(workers), report):
                    continue
                if running is None and workers:
                    _conflict(engine, obj, gang, "its status says it runs, but the backend "
                              "has no gang for it (it ended or its nodes went while the "
                              "operator was down)", report)
            elif workers and (service or started_wall is not None) and \
                    _adopt(engine, obj, gang, workers, status, started_wall, report):
                continue
            later.append((obj, gang, created, status))
    for job, running in found.items():  # deleted, finished or invalid meanwhile
        assert adopter is not None
        adopter.discard(running)
        report.removed.append(job)
    for obj, gang, created, status in later:
        rec = engine.submit(obj, gang, at=created)
        rec.restarts = int(status.get("restarts") or 0) if not obj.is_service else 0
        rec.preemptions = int(status.get("preemptions") or 0) if not obj.is_service else 0
        engine.mark_dirty(obj)
        report.requeued += 1
    return report


def _adopt(engine: Engine, obj: Tracked, gang: JobSpec, workers: list[Any],
           status: Mapping[str, Any], started_wall: float | None,
           report: RecoveryReport) -> bool:
    cp, clock = engine.cp, engine.clock
    now = cp.now
    started = clock.from_wall(started_wall) if started_wall is not None else now
    watts = (status.get("placement") or {}).get("wattsPerGPU")
    if not isinstance(watts, int | float):
        watts = cp.config.watts_per_gpu(gang)
    try:
        placement = placement_from_status(gang.key, workers, cp.topo, float(watts),
                                          gang.cpu_milli, gang.memory_mib)
        # allocate() refuses a GPU share that is already taken (shares of one GPU may add
        # up to a whole GPU: fractional replicas legitimately share).
        _adopt_at(engine, obj, gang, placement, started, status)
    except (SpecError, InvariantError) as exc:
        _conflict(engine, obj, gang, str(exc), report)
        return False
    reattach(cp.backend, gang, placement, started, now)
    report.adopted += 1
    return True


def _adopt_found(engine: Engine, adopter: AdoptsGangs[Any], obj: Tracked, gang: JobSpec,
                 found: FoundGang, status: Mapping[str, Any], recorded: bool,
                 report: RecoveryReport) -> bool:
    """Adopt a gang the backend found running, on the GPUs its workers hold. Its start is
    the one status recorded (the admission users saw), else the workers' own."""
    cp = engine.cp
    try:
        placement: Placement | None = placement_from_node_slots(
            gang.key, found.slots, cp.topo, cp.config.watts_per_gpu(gang), gang.cpu_milli,
            gang.memory_mib)
    except SpecError:
        placement = None
    started_wall = parse_time(status.get("startedAt")) if recorded else None
    started = found.started_at if started_wall is None else \
        engine.clock.from_wall(started_wall)
    try:
        if placement is None:
            raise SpecError("placement", "its gang runs on a node the inventory no longer has")
        _adopt_at(engine, obj, gang, placement, started, status)
    except (SpecError, InvariantError) as exc:
        adopter.discard(found)
        _conflict(engine, obj, gang, str(exc), report)
        return False
    adopter.adopt(gang, found)
    if status.get("phase") not in (Phase.RUNNING, Phase.ADMITTED):  # died before writing it
        stamp = format_time(time.time())
        for type_ in ("Admitted", "Running"):
            obj.conditions.set(type_, True, "Adopted", "found running after an operator "
                               "restart", generation=obj.generation, now=stamp)
        obj.conditions.set("Queued", False, "Adopted", "found running after an operator "
                           "restart", generation=obj.generation, now=stamp)
    report.adopted += 1
    return True


def _adopt_at(engine: Engine, obj: Tracked, gang: JobSpec, placement: Placement,
              started: float, status: Mapping[str, Any]) -> None:
    """The control plane takes the gang over at ``placement``; raises InvariantError if
    those GPUs are taken."""
    cp = engine.cp
    job = not obj.is_service
    rec = cp.adopt(gang, placement, started_at=started,
                   submitted_at=engine.clock.from_wall(obj.created),
                   restarts=int(status.get("restarts") or 0) if job else 0)
    rec.preemptions = int(status.get("preemptions") or 0) if job else 0
    rec.where = describe_placement(placement, cp.topo)
    engine.owner[gang.key] = obj
    if gang.key not in obj.keys:
        obj.keys.append(gang.key)
    obj.last_placement[gang.key] = placement
    obj.accounted_at[gang.key] = cp.now
    engine.mark_dirty(obj)


def _conflict(engine: Engine, obj: Tracked, gang: JobSpec, why: str,
              report: RecoveryReport) -> None:
    """The job cannot be adopted: it is requeued with a Warning saying why."""
    text = f"recorded placement not reusable after an operator restart: {why}; requeued"
    report.conflicts.append(f"{gang.key}: {why}")
    engine.owner[gang.key] = obj
    stamp = format_time(engine.clock.to_wall(engine.cp.now))
    for type_ in ("Running", "Admitted"):
        obj.conditions.clear(type_, "PlacementConflict", text, generation=obj.generation,
                             now=stamp)
    obj.conditions.set("Queued", True, "PlacementConflict", text, generation=obj.generation,
                       now=stamp)
    engine.note(obj, "Warning", "PlacementConflict", f"{obj.label(gang.key)}{text}")
