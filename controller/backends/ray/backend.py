"""Ray as the execution layer: every gang our scheduler places runs as Ray actors exactly there.

One placement group per job, named ``aifactory/<namespace>/<name>``, with one bundle
(``{"GPU": n, "CPU": c}``) per worker; each bundle is pinned with ``bundle_label_selector`` on
``ray.io/node-id`` to the node the scheduler chose, so Ray never second-guesses the placement.
Workers are detached ``GangWorker`` actors (``aifactory.controller.backends.ray.worker``), one per
bundle: pre-started ones from a pool on each node (``controller.backends.ray.pool``: a gang
then starts in well under a second instead of waiting for new processes) or, for jobs with
a Ray runtime environment and with the pool off, ones created inside their bundles, named
``aifactory/<namespace>/<name>/w<rank>``. Placement groups and actors are detached so they
outlive the operator, and a restarted operator finds them by name (``adoptable``/``adopt``)
instead of launching twins.

Status comes from polling the workers (``WorkerReport``): a worker that fails, whose actor
dies or whose node leaves the cluster fails the gang, which the control plane requeues from
its checkpoint directory (``<checkpoint_root>/<namespace>/<name>``, the same for every
attempt). The job's code reaches the workers through Ray's ``runtime_env``
(``controller.backends.ray.runtime_env``); a runtime environment Ray cannot set up, or an
image on a cluster that runs none, fails the job for good (``WorkloadStatus.fatal_reason``).
Finished, failed and stopped gangs leave nothing behind: actors are killed and the
placement group is removed. Power comes from NVML through a per-node telemetry actor where
nodes have GPUs, else from the power model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RuntimeEnvSetupError
from ray.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import (
    PlacementGroupSchedulingStrategy,
)

from aifactory.controller.backends.actuators import PowerActuator
from aifactory.controller.backends.base import (
    ReplicaLoad,
    RuntimeRefusal,
    TelemetrySnapshot,
    WorkloadPhase,
    WorkloadStatus,
)
from aifactory.controller.backends.directory import NodeDirectory
from aifactory.controller.backends.energy import GpuKey, Owner
from aifactory.controller.backends.ray.gang import (
    NODE_ID_LABEL,
    NODE_NAME_LABEL,
    RAY_NAMESPACE,
    RayNode,
    WorkerPlan,
    WorkerReport,
    gang_bundles,
    job_of_pg,
    pg_name,
    ray_node,
    worker_actor_name,
    worker_plans,
)
from aifactory.controller.backends.ray.join import join_ray_nodes
from aifactory.controller.backends.ray.pool import GangWorkers, WorkerPool
from aifactory.controller.backends.ray.runtime_env import (
    IMAGE_UNSUPPORTED,
    SETUP_FAILED,
    image_refusal,
    needs_own_worker_process,
    ray_runtime_env,
    setup_failure_message,
)
from aifactory.controller.backends.ray.telemetry import GpuPower
from aifactory.controller.backends.ray.worker import GangWorker
from aifactory.controller.core.errors import AifactoryError, SpecError
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import NodeInfo, Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes
from aifactory.controller.power.utilisation import default_utilization

log = logging.getLogger(__name__)

__all__ = ["AdoptableGang", "RayBackend", "RayBackendError", "default_checkpoint_root",
           "make_ray_backend"]

_ACTIVE_PG_STATES = ("PENDING", "CREATED", "RESCHEDULING")
_CALL_TIMEOUT_SECONDS = 5.0


class RayBackendError(AifactoryError):
    """Ray refused or failed something the backend needed (message says what and where)."""


def default_checkpoint_root() -> str:
    """``$AIFACTORY_CHECKPOINT_ROOT``, else ``$TMPDIR/aifactory/checkpoints`` (use a shared
    filesystem on a real multi-machine cluster)."""
    root = os.environ.get("AIFACTORY_CHECKPOINT_ROOT")
    if root:
        return root
    return str(Path(os.environ.get("TMPDIR", "/tmp")) / "aifactory" / "checkpoints")


@dataclass(frozen=True, slots=True)
class AdoptableGang:
    """A gang found running on Ray (by its placement group's name) with its workers' plans."""

    job: str
    plans: tuple[WorkerPlan, ...]
    started_at: float
    attempt: int

    @property
    def slots(self) -> tuple[tuple[str, tuple[int, ...], int], ...]:
        return tuple((p.node, p.local_gpus, p.milli) for p in self.plans)


@dataclass(slots=True)
class _Gang:
    spec: JobSpec
    pg: PlacementGroup
    actors: list[Any]
    plans: list[WorkerPlan]
    node_ids: list[str]
    started_at: float
    ready_ref: Any = None
    ready_at: float | None = None
    reports: dict[int, WorkerReport] = field(default_factory=dict)
    pending: dict[int, Any] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    setup_failed: dict[int, str] = field(default_factory=dict)  # RuntimeEnvSetupError
    final: WorkloadStatus | None = None
    logs: dict[int, str] = field(default_factory=dict)
    capped: bool = False  # GPU limits set by set_power_cap (reset at teardown)

    @property
    def job(self) -> str:
        return self.spec.key


class RayBackend:
    """The ``ClusterBackend`` over a Ray cluster. Connects with ``ray.init`` unless Ray is
    already initialised in this process. Call ``factory()`` (or ``bind(topology)``) before
    launching: placements name nodes by their index in that topology.

    ``container_images``: the cluster runs ``runtime.image`` (podman on every node); off, a
    job with an image fails with ``RuntimeImageUnsupported``. ``runtime_env_setup_timeout_
    seconds`` bounds Ray's setup of a job's runtime environment (fetch, pip, image pull).
    ``prestart_per_node`` idle workers are kept started on every GPU node (0: none; every
    worker is then a new Ray worker process, started when its gang launches)."""

    def __init__(self, *, address: str | None = None, namespace: str = RAY_NAMESPACE,
                 checkpoint_root: str | None = None, cpus_per_worker: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 start_timeout_seconds: float = 120.0, poll_interval_seconds: float = 0.2,
                 serve_host: str | None = None, telemetry: str = "auto",
                 actuator: PowerActuator | None = None, container_images: bool = False,
                 runtime_env_setup_timeout_seconds: float = 600.0,
                 directory: NodeDirectory | None = None, prestart_per_node: int = 2) -> None:
        if not ray.is_initialized():
            ray.init(address=address, namespace=namespace, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self.namespace = namespace
        self.checkpoint_root = checkpoint_root or default_checkpoint_root()
        self.cpus_per_worker = cpus_per_worker
        self.start_timeout_seconds = start_timeout_seconds
        self.poll_interval_seconds = poll_interval_seconds
        self.serve_host = serve_host
        self.container_images = container_images
        self.runtime_env_setup_timeout_seconds = runtime_env_setup_timeout_seconds
        self._clock = clock
        self._worker_cls = ray.remote(GangWorker)
        self.pool = WorkerPool(self._worker_cls, namespace, prestart_per_node) \
            if prestart_per_node > 0 else None
        self._found: GangWorkers | None = None  # the workers adoptable() found, for adopt
        self._topology: Topology | None = None
        self._gangs: dict[str, _Gang] = {}
        self._attempts: dict[str, int] = {}
        self._nodes: list[RayNode] = []
        self._alive_ids: set[str] = set()
        self._nodes_at = -1.0
        self._refreshed_at = -1.0
        self.power = GpuPower(telemetry)
        # Where grid-event caps go: NVML on each node through its telemetry actor, unless
        # another actuator is given (tests: a RecordingActuator, which touches no GPU).
        self.actuator: PowerActuator = actuator or _NodeNvml(self)
        self.local_cluster: Any = None  # a LocalRayCluster this backend started and stops
        # Where the nodes' names and topology come from: the Kubernetes Nodes the Ray nodes
        # name (``controller.backends.ray.join``), or None: the Ray nodes' own labels.
        self.directory = directory

    # ----------------------------------------------------------------- inventory

    def ray_nodes(self, fresh: bool = False) -> list[RayNode]:
        """Live GPU nodes (``ray.nodes()``, cached for ``poll_interval_seconds``); with a
        directory, only those joined to its machines (the rest told to it as unmatched)."""
        now = time.monotonic()
        if fresh or now - self._nodes_at > self.poll_interval_seconds:
            entries = ray.nodes()  # type: ignore[no-untyped-call]
            self._alive_ids = {str(e["NodeID"]) for e in entries if e.get("Alive")}
            self._nodes = [n for e in entries if (n := ray_node(e)) is not None]
            if self.directory is not None:
                self._nodes, unmatched = join_ray_nodes(self._nodes, self.directory)
                self.directory.unmatched(unmatched)
            self._nodes_at = now
            start = self._clock()
            for n in self._nodes:
                self.power.ensure_node(n.info.name, n.info.gpus, n.info.gpu_model, start)
        return list(self._nodes)

    def inventory(self) -> Sequence[NodeInfo]:
        return [n.info for n in self.ray_nodes()]

    def factory(self, name: str = "ray") -> FactorySpec:
        """A factory over the live GPU nodes (levels block > rack > node, with an NVLink
        level when nodes carry ``nvidia.com/gpu.clique``; one ``default`` queue), whose
        topology this backend binds to."""
        nodes = self.inventory()
        if not nodes and self.directory is not None:
            raise RayBackendError(
                "no live Ray node with GPUs is joined to a Kubernetes Node: start each Ray "
                f"worker with --num-gpus and --labels {NODE_NAME_LABEL}=<its node name> "
                "(deploy/ray/ does), on a Node that exists; or take the Ray nodes' own "
                "labels (the operator's --ray-topology ray)")
        if not nodes:
            raise RayBackendError("the Ray cluster has no live node with GPUs; start nodes "
                                  "with --num-gpus and --labels aifactory.io/rack=...")
        source = "ray" if self.directory is None else "Ray nodes joined to Node objects"
        spec = factory_from_nodes(name, nodes, source=source)
        self.bind(spec.topology())
        return spec

    def bind(self, topology: Topology) -> None:
        """Use ``topology``'s node order to read placements (the control plane's), and
        start the pool's workers on its nodes."""
        self._topology = topology
        self._fill_pool()

    @property
    def topology(self) -> Topology:
        if self._topology is None:
            raise RayBackendError("RayBackend.factory() or bind(topology) must be called "
                                  "before launch, so placements can name nodes")
        return self._topology

    # ----------------------------------------------------------------- launch / stop

    def checkpoint_dir(self, job: str) -> str:
        namespace, _, name = job.partition("/")
        return str(Path(self.checkpoint_root) / namespace / name)

    def launch(self, spec: JobSpec, placement: Placement, *, work_done: float = 0.0) -> None:
        """Pin one bundle per worker and start the workers. ``work_done`` is not needed:
        a relaunched gang resumes from ``ctx.latest_checkpoint`` in its checkpoint dir."""
        key = spec.key
        gang = self._gangs.get(key)
        if gang is not None and gang.final is None:
            return
        now = self._clock()
        refusal = image_refusal(spec, self.container_images)
        if refusal is not None:
            self._gangs.pop(key, None)
            self._failed_before_start(spec, now, refusal, fatal_reason=IMAGE_UNSUPPORTED)
            return
        node_ids = {n.info.name: n.node_id for n in self.ray_nodes(fresh=True)}
        try:
            bundles = gang_bundles(placement, self.topology, node_ids, self.cpus_per_worker)
        except SpecError as exc:
            self._gangs.pop(key, None)
            self._failed_before_start(spec, now, str(exc))
            return
        self._remove_leftovers(key)
        attempt = self._attempts[key] = self._attempts.get(key, -1) + 1
        plans = worker_plans(spec, bundles, self.checkpoint_dir(key), now, attempt,
                             self.serve_host)
        pg = placement_group([dict(b.resources) for b in bundles], strategy="PACK",
                             name=pg_name(key), lifetime="detached",
                             bundle_label_selector=[dict(b.selector) for b in bundles])
        if self.pool is not None and not needs_own_worker_process(spec):
            # Pre-started workers, pinned to their nodes; each waits for the group.
            nodes = {n.node_id: n for n in self._nodes}
            actors = [self.pool.take(nodes[b.selector[NODE_ID_LABEL]]) for b in bundles]
            for rank, actor in enumerate(actors):
                actor.start.remote(None if rank == 0 else actors[0], plans[rank], pg)
            ready_ref = None  # readiness is read with pg.wait(0): no task, no process
        else:
            runtime_env = ray_runtime_env(
                spec.runtime, setup_timeout_seconds=self.runtime_env_setup_timeout_seconds)
            actors = [self._new_worker(pg, plan, bundles[plan.rank].resources["GPU"],
                                       runtime_env) for plan in plans]
            for rank, actor in enumerate(actors):
                actor.start.remote(None if rank == 0 else actors[0])
            ready_ref = pg.ready()
        self._gangs[key] = _Gang(spec, pg, actors, plans,
                                 [b.selector[NODE_ID_LABEL] for b in bundles], now,
                                 ready_ref=ready_ref)
        self._own_gpus(spec, plans, now)

    def runtime_refusal(self, spec: JobSpec) -> RuntimeRefusal | None:
        """``RefusesRuntimes``: an image on a cluster that runs none (``container_images``
        off) fails at submission; ``launch`` refuses it too, for callers that skip that."""
        why = image_refusal(spec, self.container_images)
        return None if why is None else RuntimeRefusal(IMAGE_UNSUPPORTED, why)

    def _new_worker(self, pg: PlacementGroup, plan: WorkerPlan, gpus: float,
                    runtime_env: Mapping[str, Any]) -> Any:
        name = worker_actor_name(plan.job, plan.rank)
        options: dict[str, Any] = {
            "name": name, "namespace": self.namespace, "lifetime": "detached",
            "num_cpus": self.cpus_per_worker, "num_gpus": gpus,
            "max_concurrency": 16, "max_restarts": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=plan.rank),
        }
        if runtime_env:  # the job's code (a worker process of its own; see runtime_env)
            options["runtime_env"] = dict(runtime_env)
        try:
            return self._worker_cls.options(**options).remote(plan)
        except ValueError:  # the name is still held by a worker of an older attempt
            self._kill_named(name)
            return self._worker_cls.options(**options).remote(plan)

    def _failed_before_start(self, spec: JobSpec, now: float, message: str,
                             fatal_reason: str | None = None) -> None:
        """The placement names a node that just left Ray (the control plane's inventory was
        a moment behind): nothing ran, so ``retryable=False`` asks the control plane to
        requeue without counting a restart (its meaning of the flag). With
        ``fatal_reason`` the job can never start here (an image on a cluster without
        container support): it fails for good."""
        self._attempts[spec.key] = self._attempts.get(spec.key, -1) + 1
        final = WorkloadStatus(spec.key, WorkloadPhase.FAILED, started_at=now, finished_at=now,
                               message=message, retryable=False, fatal_reason=fatal_reason)
        self._gangs[spec.key] = _Gang(spec, None, [], [], [], now,  # type: ignore[arg-type]
                                      final=final)

    def stop(self, job: str) -> None:
        gang = self._gangs.get(job)
        if gang is None:
            self._remove_leftovers(job)
            return
        if gang.final is None:
            now = self._clock()
            self._sample_energy(now)
            gang.final = self._status_of(gang, now, stopped=True)
        self._teardown(gang)

    def forget(self, job: str) -> None:
        """Stop and drop every record of the job (the operator's delete)."""
        self.stop(job)
        self._gangs.pop(job, None)

    def _teardown(self, gang: _Gang) -> None:
        if not gang.actors and gang.pg is None:
            return
        live = [a for r, a in enumerate(gang.actors)
                if r not in gang.lost and r not in gang.setup_failed]
        stops = [a.stop.remote() for a in live]
        if stops:
            ray.wait(stops, num_returns=len(stops), timeout=2.0)
        if gang.spec.runtime.command:
            for rank, actor in enumerate(live):
                with contextlib.suppress(Exception):
                    gang.logs[rank] = ray.get(actor.logs.remote(0), timeout=2.0)
        for actor in gang.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if gang.pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(gang.pg)
        gang.actors = []
        gang.pg = None  # type: ignore[assignment]
        gang.pending.clear()
        self.power.release(gang.job, self._clock())
        if gang.capped:  # the next job on these GPUs must not inherit the cap
            self._cap_gpus(gang, None)

    def _kill_named(self, name: str) -> None:
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True)

    def _remove_leftovers(self, job: str) -> None:
        """Remove a placement group (and its workers) of ``job`` this backend does not track,
        left by an earlier operator that nobody adopted."""
        try:
            pg = get_placement_group(pg_name(job))
        except ValueError:
            return
        info = placement_group_table(pg)
        for actor in GangWorkers(self.namespace).any_of(job, len(info.get("bundles") or {})):
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        remove_placement_group(pg)

    # ----------------------------------------------------------------- status

    def status(self, job: str) -> WorkloadStatus | None:
        gang = self._gangs.get(job)
        if gang is None:
            return None
        if gang.final is not None:
            return gang.final
        self.refresh()
        return gang.final or self._status_of(gang, self._clock())

    def workers(self, job: str) -> list[WorkerReport]:
        """The latest report of every worker of the job (after a refresh)."""
        gang = self._gangs.get(job)
        if gang is None:
            return []
        if gang.final is None:
            self.refresh(force=True)
        return [gang.reports[r] for r in sorted(gang.reports)]

    def endpoints(self, job: str) -> tuple[str, ...]:
        return tuple(r.endpoint for r in self.workers(job) if r.endpoint)

    def replica_load(self, job: str) -> ReplicaLoad | None:
        """``ReportsLoad``: an inference replica's requests in flight and counters, from its
        worker's last report (the poll's, not a fresh one); None until it serves."""
        gang = self._gangs.get(job)
        reports = [] if gang is None or gang.final is not None else \
            [r for r in gang.reports.values() if r.endpoint]
        if not reports:
            return None
        return ReplicaLoad(in_flight=float(sum(r.in_flight for r in reports)),
                           requests_total=sum(r.requests_total for r in reports),
                           latency_seconds_total=sum(r.latency_seconds_total
                                                     for r in reports),
                           endpoint=reports[0].endpoint)

    def logs(self, job: str, lines: int = 100) -> str:
        """Kept output of a command job's workers, rank by rank."""
        gang = self._gangs.get(job)
        if gang is None:
            return ""
        parts: list[str] = []
        for rank in range(len(gang.plans)):
            text = gang.logs.get(rank)
            if text is None and rank < len(gang.actors) and rank not in gang.lost:
                try:
                    text = ray.get(gang.actors[rank].logs.remote(lines),
                                   timeout=_CALL_TIMEOUT_SECONDS)
                except Exception:
                    text = None
            if text:
                kept = text.splitlines()[-lines:] if lines > 0 else text.splitlines()
                parts.append(f"== worker {rank} ==\n" + "\n".join(kept))
        return "\n".join(parts)

    def refresh(self, force: bool = False) -> None:
        """Poll every live gang's workers at most once per ``poll_interval_seconds``."""
        mono = time.monotonic()
        if not force and mono - self._refreshed_at < self.poll_interval_seconds:
            return
        self._refreshed_at = mono
        active = [g for g in self._gangs.values() if g.final is None]
        if not active:
            self._fill_pool()
            return
        self.ray_nodes(fresh=True)
        refs: dict[Any, tuple[_Gang, int]] = {}
        for gang in active:
            if gang.ready_at is None and (gang.pg.wait(timeout_seconds=0)
                                          if gang.ready_ref is None
                                          else ray.wait([gang.ready_ref], timeout=0)[0]):
                gang.ready_at = self._clock()
            for rank, actor in enumerate(gang.actors):
                if rank in gang.lost or rank in gang.setup_failed:
                    continue
                if rank not in gang.pending:
                    gang.pending[rank] = actor.poll.remote()
                refs[gang.pending[rank]] = (gang, rank)
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.2)
        for ref in ready:
            gang, rank = refs[ref]
            gang.pending.pop(rank, None)
            try:
                gang.reports[rank] = ray.get(ref)
            except RuntimeEnvSetupError as exc:  # the job's code or packages never arrived
                gang.setup_failed[rank] = setup_failure_message(
                    exc, f"worker {rank} on {gang.plans[rank].node}")
            except Exception as exc:  # the actor died: RayActorError, ActorDiedError, ...
                gang.lost[rank] = (f"worker {rank} on {gang.plans[rank].node} lost: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        for gang in active:
            for rank, node_id in enumerate(gang.node_ids):
                if node_id not in self._alive_ids and rank not in gang.lost:
                    gang.lost[rank] = (f"worker {rank} lost: node {gang.plans[rank].node} "
                                       "left the Ray cluster")
        now = self._clock()
        self._sample_energy(now)
        for gang in active:
            status = self._status_of(gang, now)
            if status.phase in (WorkloadPhase.SUCCEEDED, WorkloadPhase.FAILED):
                gang.final = status
                self._teardown(gang)
        self._fill_pool()

    def _fill_pool(self) -> None:
        """Top the pool up, but not while a gang is starting: new processes would take the
        CPU its workers need to start."""
        if self.pool is None or any(
                g.final is None and (len(g.reports) < len(g.plans) or
                                     any(r.phase == "starting" for r in g.reports.values()))
                for g in self._gangs.values()):
            return
        self.pool.fill(self.ray_nodes())

    def _status_of(self, gang: _Gang, now: float, stopped: bool = False) -> WorkloadStatus:
        reports = [gang.reports[r] for r in sorted(gang.reports)]
        world = len(gang.plans)
        progress = min((r.progress for r in reports), default=0.0) if len(reports) == world \
            else 0.0
        checkpoints = [r.checkpoint_at for r in reports if r.checkpoint_at is not None]
        base = WorkloadStatus(
            job=gang.job, phase=WorkloadPhase.STARTING, progress=progress,
            started_at=gang.started_at,
            last_checkpoint_at=max(checkpoints) if checkpoints else None,
            message="starting", energy_joules=self.power.joules(gang.job))
        failed = [r for r in reports if r.phase == "failed"]
        if stopped:
            return replace(base, phase=WorkloadPhase.FAILED, finished_at=now, message="stopped")
        if gang.setup_failed:
            return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                           message=gang.setup_failed[min(gang.setup_failed)],
                           retryable=False, fatal_reason=SETUP_FAILED)
        if gang.lost:
            return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                           message=gang.lost[min(gang.lost)],
                           lost_nodes=tuple(sorted({gang.plans[r].node for r in gang.lost})))
        if failed:
            return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                           message=failed[0].message,
                           retryable=all(r.retryable for r in failed))
        if gang.ready_at is None and now - gang.started_at > self.start_timeout_seconds:
            nodes = sorted({p.node for p in gang.plans})
            return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                           message=f"placement group {pg_name(gang.job)} not ready after "
                                   f"{self.start_timeout_seconds:g} s (pinned to "
                                   f"{', '.join(nodes)})")
        if len(reports) == world and all(r.phase == "succeeded" for r in reports):
            end = max((r.finished_at or now) for r in reports)
            return replace(base, phase=WorkloadPhase.SUCCEEDED, finished_at=end,
                           message="all workers finished")
        if len(reports) == world and all(r.phase in ("running", "succeeded")
                                         for r in reports):
            endpoints = [r.endpoint for r in reports if r.endpoint]
            return replace(base, phase=WorkloadPhase.RUNNING,
                           message=f"serving at {', '.join(endpoints)}" if endpoints
                           else "running")
        return base

    # ----------------------------------------------------------------- adoption

    def adoptable(self) -> list[AdoptableGang]:
        """Gangs of ours running on Ray that this backend does not track (after a restart of
        the operator), found by placement-group name; their workers say where they run."""
        found: list[AdoptableGang] = []
        workers = self._found = GangWorkers(self.namespace)
        for info in placement_group_table().values():
            job = job_of_pg(str(info.get("name", "")))
            if job is None or job in self._gangs or info.get("state") not in _ACTIVE_PG_STATES:
                continue
            plans = self._plans_of(workers.of(job, len(info.get("bundles") or {})))
            if plans is None:
                continue
            found.append(AdoptableGang(job, tuple(plans), min(p.started_at for p in plans),
                                       max(p.attempt for p in plans)))
        return found

    @staticmethod
    def _plans_of(actors: list[Any] | None) -> list[WorkerPlan] | None:
        if actors is None:
            return None
        try:
            plans: list[WorkerPlan | None] = ray.get([a.describe.remote() for a in actors],
                                                     timeout=_CALL_TIMEOUT_SECONDS)
        except Exception:
            return None
        return None if None in plans else plans  # type: ignore[return-value]

    def adopt(self, spec: JobSpec, gang: AdoptableGang) -> None:
        """Track a running gang found by ``adoptable`` as this job's (no relaunch)."""
        pg = get_placement_group(pg_name(gang.job))
        actors = (self._found or GangWorkers(self.namespace)).of(gang.job, len(gang.plans))
        if actors is None:
            raise RayBackendError(f"the workers of {gang.job} are gone since they were found")
        by_name = {n.info.name: n.node_id for n in self.ray_nodes(fresh=True)}
        node_ids = [by_name.get(p.node, "") for p in gang.plans]
        self._attempts[gang.job] = gang.attempt
        self._gangs[gang.job] = _Gang(spec, pg, actors, list(gang.plans), node_ids,
                                      gang.started_at, ready_ref=pg.ready())
        self._own_gpus(spec, gang.plans, self._clock())

    def discard(self, gang: AdoptableGang) -> None:
        """Remove a found gang nobody wants (its job was deleted while the operator was
        down): its workers and placement group go."""
        self._remove_leftovers(gang.job)

    # ----------------------------------------------------------------- telemetry

    def set_power_cap(self, job: str, watts_per_gpu: float | None) -> None:
        """``CapsPower``: every GPU of the running gang to ``watts_per_gpu`` (None: the
        GPU's default), through the actuator; the power model follows."""
        gang = self._gangs.get(job)
        if gang is None or gang.final is not None:
            return
        gang.spec = replace(gang.spec, power_cap_watts_per_gpu=watts_per_gpu)
        self._cap_gpus(gang, watts_per_gpu)
        self._own_gpus(gang.spec, gang.plans, self._clock())

    def _cap_gpus(self, gang: _Gang, watts: float | None) -> None:
        for plan in gang.plans:
            self.actuator.set_power_limits(plan.node, dict.fromkeys(plan.local_gpus, watts))
        gang.capped = watts is not None

    def _own_gpus(self, spec: JobSpec, plans: Sequence[WorkerPlan], now: float) -> None:
        self._sample_energy(now)
        owner = Owner(spec.key, plans[0].milli if plans else MILLI_PER_GPU,
                      default_utilization(spec), spec.power_cap_watts_per_gpu)
        self.power.assign(((p.node, g) for p in plans for g in p.local_gpus), owner, now)

    def _owners(self) -> dict[GpuKey, dict[str, int]]:
        owners: dict[GpuKey, dict[str, int]] = {}
        for gang in self._gangs.values():
            if gang.final is not None:
                continue
            for plan in gang.plans:
                report = gang.reports.get(plan.rank)
                ids = [int(g) for g in report.gpu_ids if g.isdigit()] if report and \
                    self.power.nvml else list(plan.local_gpus)
                for g in ids:
                    owners.setdefault((plan.node, g), {})[gang.job] = plan.milli
        return owners

    def _sample_energy(self, now: float) -> None:
        self.power.sample(now, self.ray_nodes(), self._owners())

    def telemetry(self) -> TelemetrySnapshot:
        return self.power.snapshot(self._clock(), self.ray_nodes(), self._owners())

    def job_energy_joules(self, job: str) -> float:
        return self.power.joules(job)

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop every gang this backend tracks and the telemetry actors."""
        for job in list(self._gangs):
            self.stop(job)
        if self.pool is not None:
            self.pool.close()
        self.power.close()
        if self.local_cluster is not None:
            self.local_cluster.shutdown()
            self.local_cluster = None

    def disconnect(self) -> None:
        """Leave the cluster stopping nothing: detached gangs run on for the next control
        plane to adopt (an operator restart). A local cluster this backend started goes,
        and its gangs with it."""
        if self.local_cluster is not None:
            self.close()
            return
        if self.pool is not None:  # idle ones only: gangs run on
            self.pool.close()
        self.power.close()
        if ray.is_initialized():
            ray.shutdown()


def make_ray_backend(address: str | None = None, *,
                     local_nodes: Sequence[NodeInfo] | None = None, local: bool = False,
                     **options: Any) -> RayBackend:
    """The Ray backend the operator and ``aifactory run`` use.

    Connects to ``address``, else to ``$RAY_ADDRESS``; with neither (or ``local``), starts a
    local Ray cluster of simulated GPU nodes (``local_nodes``, default 4 x 8 H200 in 2
    racks) that ``close()`` shuts down again. ``options`` go to ``RayBackend``
    (``checkpoint_root``, ``cpus_per_worker``, ``serve_host``, ``telemetry``, ``clock``...).
    Call ``backend.factory()`` for the factory to build the ``ControlPlane`` over (it binds
    the backend's topology)."""
    address = None if local else address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        return RayBackend(address=address, **options)
    from aifactory.controller.backends.ray.demo import DEMO_NODES
    from aifactory.controller.backends.ray.local import LocalRayCluster

    options.setdefault("serve_host", "127.0.0.1")  # everything is on this machine
    cluster = LocalRayCluster(list(local_nodes) if local_nodes else list(DEMO_NODES)).start()
    try:
        backend = RayBackend(**options)
    except Exception:
        cluster.shutdown()
        raise
    backend.local_cluster = cluster
    return backend


class _NodeNvml:
    """The default actuator: NVML on the gang's nodes, through their telemetry actors."""

    def __init__(self, backend: RayBackend) -> None:
        self.backend = backend

    def set_power_limits(self, node: str, limits: Mapping[int, float | None]) -> None:
        ray_node = next((n for n in self.backend.ray_nodes() if n.info.name == node), None)
        if ray_node is None:
            log.warning("power limits for %s not set: the node left", node)
            return
        for index, error in self.backend.power.set_power_limits(ray_node, limits).items():
            log.warning("power limit of GPU %d on %s not set: %s", index, node, error)
