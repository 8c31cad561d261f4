"""Ray as the execution layer: every gang our scheduler places runs as Ray actors exactly there.

One placement group per job, named ``aifactory/<namespace>/<name>``, with one bundle
(``{"GPU": n, "CPU": c}``) per worker; each bundle is pinned with ``bundle_label_selector`` on
``ray.io/node-id`` to the node the scheduler chose, so Ray never second-guesses the placement.
Workers are detached ``GangWorker`` actors (``aifactory.controller.backends.ray.worker``), one per
bundle: pre-started ones from a pool on each node (``controller.backends.ray.pool``: a gang
then starts in well under a second instead of waiting for new processes) or, for jobs with
a Ray runtime environment and with the pool off, ones created inside their bundles, named
``aifactory/<namespace>/<name>/w<rank>``. Placement groups and actors are detached so they
outlive the operator, and a restarted operator adopts them instead of launching twins
(``controller.backends.ray.adoption``).

Status comes from polling the workers (``controller.backends.ray.tracking``); a failed gang is
requeued by the control plane from its checkpoint directory. The job's code reaches the
workers through Ray's ``runtime_env`` (``controller.backends.ray.runtime_env``); an image on
a cluster that runs none fails the job for good. Finished, failed and stopped gangs leave
nothing behind: actors are killed and the placement group is removed. Energy and power caps:
``controller.backends.ray.power``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_placement_group, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from aifactory.controller.backends.actuators import PowerActuator
from aifactory.controller.backends.base import (
    ReplicaLoad,
    RuntimeRefusal,
    TelemetrySnapshot,
    WorkloadPhase,
    WorkloadStatus,
)
from aifactory.controller.backends.directory import NodeDirectory
from aifactory.controller.backends.ray.adoption import AdoptableGang, GangFinder
from aifactory.controller.backends.ray.gang import (
    NODE_ID_LABEL,
    NODE_NAME_LABEL,
    RAY_NAMESPACE,
    RayNode,
    WorkerPlan,
    WorkerReport,
    gang_bundles,
    pg_name,
    ray_node,
    worker_actor_name,
    worker_plans,
)
from aifactory.controller.backends.ray.join import join_ray_nodes
from aifactory.controller.backends.ray.pool import WorkerPool
from aifactory.controller.backends.ray.power import GangPower, NodeNvml
from aifactory.controller.backends.ray.runtime_env import (
    IMAGE_UNSUPPORTED,
    image_refusal,
    needs_own_worker_process,
    ray_runtime_env,
)
from aifactory.controller.backends.ray.telemetry import GpuPower
from aifactory.controller.backends.ray.tracking import (
    TrackedGang,
    gang_logs,
    gang_status,
    poll_workers,
    release_gang,
)
from aifactory.controller.backends.ray.worker import GangWorker
from aifactory.controller.core.errors import AifactoryError, SpecError
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import NodeInfo, Topology
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes

__all__ = ["AdoptableGang", "RayBackend", "RayBackendError", "default_checkpoint_root",
           "make_ray_backend"]


class RayBackendError(AifactoryError):
    """Ray refused or failed something the backend needed (message says what and where)."""


def default_checkpoint_root() -> str:
    """``$AIFACTORY_CHECKPOINT_ROOT``, else ``$TMPDIR/aifactory/checkpoints`` (use a shared
    filesystem on a real multi-machine cluster)."""
    root = os.environ.get("AIFACTORY_CHECKPOINT_ROOT")
    if root:
        return root
    return str(Path(os.environ.get("TMPDIR", "/tmp")) / "aifactory" / "checkpoints")


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
        self._finder = GangFinder(namespace)  # gangs an earlier operator left running
        self._topology: Topology | None = None
        self._gangs: dict[str, TrackedGang] = {}
        self._attempts: dict[str, int] = {}
        self._nodes: list[RayNode] = []
        self._alive_ids: set[str] = set()
        self._nodes_at = -1.0
        self._refreshed_at = -1.0
        self.power = GpuPower(telemetry)
        # Where grid-event caps go: NVML on each node through its telemetry actor, unless
        # another actuator is given (tests: a RecordingActuator, which touches no GPU).
        self._gang_power = GangPower(self.power, actuator or NodeNvml(self.power, self.ray_nodes),
                                     self._gangs, self.ray_nodes)
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
        self._finder.remove_leftovers(key)
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
        self._gangs[key] = TrackedGang(spec, pg, actors, plans,
                                       [b.selector[NODE_ID_LABEL] for b in bundles], now,
                                       ready_ref=ready_ref)
        self._gang_power.own(spec, plans, now)

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
        self._gangs[spec.key] = TrackedGang(spec, None, [], [], [],  # type: ignore[arg-type]
                                            now, final=final)

    def stop(self, job: str) -> None:
        gang = self._gangs.get(job)
        if gang is None:
            self._finder.remove_leftovers(job)
            return
        if gang.final is None:
            now = self._clock()
            self._gang_power.sample(now)
            gang.final = self._status_of(gang, now, stopped=True)
        self._teardown(gang)

    def forget(self, job: str) -> None:
        """Stop and drop every record of the job (the operator's delete)."""
        self.stop(job)
        self._gangs.pop(job, None)

    def _teardown(self, gang: TrackedGang) -> None:
        if not gang.actors and gang.pg is None:
            return
        release_gang(gang)
        self.power.release(gang.job, self._clock())
        if gang.capped:  # the next job on these GPUs must not inherit the cap
            self._gang_power.cap(gang, None)

    def _kill_named(self, name: str) -> None:
        with contextlib.suppress(Exception):
            ray.kill(ray.get_actor(name, namespace=self.namespace), no_restart=True)

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
        return "" if gang is None else gang_logs(gang, lines)

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
        poll_workers(active, self._alive_ids, self._clock)
        now = self._clock()
        self._gang_power.sample(now)
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

    def _status_of(self, gang: TrackedGang, now: float, stopped: bool = False) -> WorkloadStatus:
        return gang_status(gang, now, energy_joules=self.power.joules(gang.job),
                           start_timeout_seconds=self.start_timeout_seconds, stopped=stopped)

    # ----------------------------------------------------------------- adoption

    def adoptable(self) -> list[AdoptableGang]:
        """Gangs of ours running on Ray that this backend does not track (after a restart of
        the operator), found by placement-group name; their workers say where they run."""
        return self._finder.adoptable(self._gangs)

    def adopt(self, spec: JobSpec, gang: AdoptableGang) -> None:
        """Track a running gang found by ``adoptable`` as this job's (no relaunch)."""
        pg = get_placement_group(pg_name(gang.job))
        actors = self._finder.workers_of(gang)
        if actors is None:
            raise RayBackendError(f"the workers of {gang.job} are gone since they were found")
        by_name = {n.info.name: n.node_id for n in self.ray_nodes(fresh=True)}
        node_ids = [by_name.get(p.node, "") for p in gang.plans]
        self._attempts[gang.job] = gang.attempt
        self._gangs[gang.job] = TrackedGang(spec, pg, actors, list(gang.plans), node_ids,
                                            gang.started_at, ready_ref=pg.ready())
        self._gang_power.own(spec, gang.plans, self._clock())

    def discard(self, gang: AdoptableGang) -> None:
        """Remove a found gang nobody wants (its job was deleted while the operator was
        down): its workers and placement group go."""
        self._finder.remove_leftovers(gang.job)

    # ----------------------------------------------------------------- telemetry

    def set_power_cap(self, job: str, watts_per_gpu: float | None) -> None:
        """``CapsPower``: every GPU of the running gang to ``watts_per_gpu`` (None: the
        GPU's default), through the actuator; the power model follows."""
        gang = self._gangs.get(job)
        if gang is None or gang.final is not None:
            return
        gang.spec = replace(gang.spec, power_cap_watts_per_gpu=watts_per_gpu)
        self._gang_power.cap(gang, watts_per_gpu)
        self._gang_power.own(gang.spec, gang.plans, self._clock())

    def telemetry(self) -> TelemetrySnapshot:
        return self._gang_power.snapshot(self._clock())

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
