"""How a placed gang looks on Ray, as plain values: no Ray import, so it is unit-tested pure.

The Ray backend (``controller.backends.ray.backend``) turns a ``Placement`` into one placement
group per job with one bundle per worker, each bundle pinned with a ``bundle_label_selector``
on ``ray.io/node-id`` to the node our scheduler chose; this module computes those bundles, the
distributed-training environment of every worker (``RANK``, ``LOCAL_RANK``, ...), the names
that let a restarted operator find its placement groups and actors again, and maps
``ray.nodes()`` entries to the ``NodeInfo`` inventory the scheduler reads.

Ray node labels (``ray start --labels``, ``Cluster.add_node(labels=...)``) carry the topology:
``aifactory.io/block``, ``aifactory.io/rack``, ``nvidia.com/gpu.product`` and the node's name
``aifactory.io/node`` (the Ray node id when absent). On Kubernetes the operator takes the
topology from the Node that ``aifactory.io/node`` names instead (``controller.backends.ray.join``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aifactory.controller.backends.directory import NODE_NAME_LABEL
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import JobKind, JobSpec
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.controller.core.topology import (
    BLOCK_LABEL,
    CLIQUE_LABEL,
    GPU_PRODUCT_LABEL,
    HOSTNAME_LABEL,
    RACK_LABEL,
    ZONE_LABEL,
    NodeInfo,
    Topology,
)
from aifactory.controller.core.units import MILLI_PER_GPU

__all__ = [
    "NODE_ID_LABEL",
    "NODE_NAME_LABEL",
    "PG_PREFIX",
    "POOL_PREFIX",
    "RAY_NAMESPACE",
    "TOPOLOGY_LABELS",
    "Bundle",
    "RayNode",
    "WorkerPlan",
    "WorkerReport",
    "gang_bundles",
    "job_of_pg",
    "pg_name",
    "pool_actor_name",
    "ray_node",
    "worker_actor_name",
    "worker_plans",
]

NODE_ID_LABEL = "ray.io/node-id"
RAY_NAMESPACE = "aifactory"
PG_PREFIX = "aifactory/"
# Pre-started workers: ``aifactory/_pool/<node>/<token>`` (``_`` is in no Kubernetes namespace
# name, so no job's names collide with them).
POOL_PREFIX = PG_PREFIX + "_pool/"
TOPOLOGY_LABELS = (ZONE_LABEL, BLOCK_LABEL, RACK_LABEL, CLIQUE_LABEL, GPU_PRODUCT_LABEL)
_ACCELERATOR_PREFIX = "accelerator_type:"


# --------------------------------------------------------------------------- inventory


@dataclass(frozen=True, slots=True)
class RayNode:
    """One live Ray node that has GPUs: our inventory entry, its Ray id and its address."""

    info: NodeInfo
    node_id: str
    address: str
    named: bool = True  # its name is its ``aifactory.io/node`` label (else its Ray id)


def ray_node(entry: Mapping[str, Any]) -> RayNode | None:
    """Map one ``ray.nodes()`` entry to an inventory node; None for dead or GPU-less nodes.

    The GPU model is the ``nvidia.com/gpu.product`` label, else Ray's detected
    ``accelerator_type:<model>`` resource, else ``unknown`` (the generic power profile).
    """
    if not entry.get("Alive", False):
        return None
    resources = entry.get("Resources") or {}
    gpus = math.floor(float(resources.get("GPU", 0.0)) + 1e-9)
    if gpus <= 0:
        return None
    node_id = str(entry.get("NodeID", ""))
    raw_labels = entry.get("Labels") or {}
    labels = {str(k): str(v) for k, v in raw_labels.items()}
    name = labels.get(NODE_NAME_LABEL) or node_id
    model = labels.get(GPU_PRODUCT_LABEL)
    if model is None:
        detected = [k[len(_ACCELERATOR_PREFIX):] for k in resources
                    if str(k).startswith(_ACCELERATOR_PREFIX)]
        model = detected[0] if detected else "unknown"
    kept = {k: v for k, v in labels.items() if k in TOPOLOGY_LABELS}
    kept[HOSTNAME_LABEL] = name
    kept.setdefault(GPU_PRODUCT_LABEL, model)
    info = NodeInfo(name=name, gpus=gpus, gpu_model=model, labels=tuple(sorted(kept.items())))
    return RayNode(info=info, node_id=node_id, address=str(entry.get("NodeManagerAddress", "")),
                   named=bool(labels.get(NODE_NAME_LABEL)))


# --------------------------------------------------------------------------- names


def pg_name(job: str) -> str:
    """The placement group of job ``namespace/name`` is ``aifactory/namespace/name``."""
    return PG_PREFIX + job


def job_of_pg(name: str) -> str | None:
    """The job key a placement group name belongs to, or None if it is not ours."""
    if not name.startswith(PG_PREFIX):
        return None
    job = name[len(PG_PREFIX):]
    return job if "/" in job else None


def worker_actor_name(job: str, rank: int) -> str:
    """Detached worker actors are named ``aifactory/<namespace>/<name>/w<rank>``."""
    return f"{pg_name(job)}/w{rank}"


def pool_actor_name(node: str, token: str) -> str:
    """A pre-started worker on ``node`` is named ``aifactory/_pool/<node>/<token>``."""
    return f"{POOL_PREFIX}{node}/{token}"


# --------------------------------------------------------------------------- bundles


@dataclass(frozen=True, slots=True)
class Bundle:
    """One placement-group bundle: resources and the selector that pins it to a node."""

    resources: Mapping[str, float]
    selector: Mapping[str, str]
    node: str
    local_gpus: tuple[int, ...]
    milli: int


def _gpus_of(slot: WorkerSlot) -> float:
    return len(slot.gpus) * slot.milli / MILLI_PER_GPU


def gang_bundles(placement: Placement, topo: Topology, node_ids: Mapping[str, str],
                 cpus_per_worker: float) -> list[Bundle]:
    """One bundle per worker slot, pinned by ``ray.io/node-id`` to the chosen node.

    ``node_ids`` maps our node names to Ray node ids; a slot on a node Ray does not know
    (it left the cluster) is a SpecError naming the node, since the bundle could never be
    placed."""
    if cpus_per_worker < 0:
        raise SpecError("cpus_per_worker", f"must be >= 0, got {cpus_per_worker}")
    bundles: list[Bundle] = []
    for rank, slot in enumerate(placement.slots):
        node = topo.nodes[slot.node]
        node_id = node_ids.get(node.name)
        if node_id is None:
            raise SpecError(f"placement of {placement.job} worker {rank}",
                            f"node {node.name} is not in the Ray cluster; live nodes are "
                            f"{', '.join(sorted(node_ids)) or 'none'}")
        resources: dict[str, float] = {"GPU": _gpus_of(slot)}
        if cpus_per_worker > 0:
            resources["CPU"] = cpus_per_worker
        start = topo.gpu_start[slot.node]
        bundles.append(Bundle(resources=resources, selector={NODE_ID_LABEL: node_id},
                              node=node.name, local_gpus=tuple(g - start for g in slot.gpus),
                              milli=slot.milli))
    return bundles


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    """Everything one worker actor needs to run its part of the gang."""

    job: str
    kind: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    node: str
    local_gpus: tuple[int, ...]
    milli: int
    checkpoint_dir: str
    entrypoint: str | None
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    started_at: float
    attempt: int = 0
    serve_host: str | None = None

    def distributed_env(self, master_addr: str, master_port: int) -> dict[str, str]:
        """The environment ``torch.distributed`` (env://) and JAX read."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "NODE_RANK": str(self.node_rank),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            "AIFACTORY_JOB": self.job,
            "AIFACTORY_CHECKPOINT_DIR": self.checkpoint_dir,
            "AIFACTORY_ATTEMPT": str(self.attempt),
        }


def worker_plans(spec: JobSpec, bundles: Sequence[Bundle], checkpoint_dir: str,
                 started_at: float, attempt: int = 0,
                 serve_host: str | None = None) -> list[WorkerPlan]:
    """Rank i is bundle i; local ranks count workers on the same node in rank order, and
    node ranks number nodes in order of their first worker."""
    node_rank: dict[str, int] = {}
    per_node: dict[str, int] = {}
    for b in bundles:
        node_rank.setdefault(b.node, len(node_rank))
        per_node[b.node] = per_node.get(b.node, 0) + 1
    seen: dict[str, int] = {}
    plans: list[WorkerPlan] = []
    for rank, b in enumerate(bundles):
        local = seen.get(b.node, 0)
        seen[b.node] = local + 1
        plans.append(WorkerPlan(
            job=spec.key, kind=spec.kind.value, rank=rank, world_size=len(bundles),
            local_rank=local, local_world_size=per_node[b.node], node_rank=node_rank[b.node],
            node=b.node, local_gpus=b.local_gpus, milli=b.milli, checkpoint_dir=checkpoint_dir,
            entrypoint=spec.runtime.entrypoint, command=spec.runtime.command,
            env=spec.runtime.env, started_at=started_at, attempt=attempt,
            serve_host=serve_host if spec.kind is JobKind.INFERENCE else None))
    return plans


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """What one worker actor says about itself when polled (plain values, pickled by Ray).

    ``phase`` is ``starting``, ``running``, ``succeeded`` or ``failed``; ``gpu_ids`` are the
    GPU indices Ray gave the actor on its node; ``endpoint`` is set by inference replicas."""

    rank: int
    phase: str
    node: str
    node_id: str
    pid: int
    gpu_ids: tuple[str, ...] = ()
    progress: float = 0.0
    checkpoint: str | None = None
    checkpoint_at: float | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    message: str = ""
    retryable: bool = True
    endpoint: str | None = None
    in_flight: int = 0
    requests_total: int = 0
    latency_seconds_total: float = 0.0  # summed over the requests answered
    metrics: tuple[tuple[str, float], ...] = field(default=())
