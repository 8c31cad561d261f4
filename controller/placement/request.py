"""A gang's request resolved against one topology, and the small helpers every policy uses.

``PlacementRequest.resolve`` turns a ``JobSpec``'s level and model names into indices once;
``Unplaced`` is a failure as a value, with a reason a person can act on. The helpers count
the workers a node or a domain can hold now (GPUs, CPU and memory), check power headroom
and turn ``(node, workers)`` pairs into a ``Placement`` with concrete GPU indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.core.topology import NODE_LEVEL, Domain, Topology
from aifactory.controller.core.units import MILLI_PER_GPU

__all__ = [
    "PlacementRequest",
    "Unplaced",
    "add_pending",
    "host_capacity",
    "level_index_of",
    "level_name",
    "materialize",
    "node_power_ok",
    "node_workers",
    "share_slot",
]


@dataclass(frozen=True, slots=True)
class Unplaced:
    """A gang that cannot be placed now (or ever, when ``permanent``), and why."""

    reason: str
    permanent: bool = False
    power_limited: bool = False


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """A JobSpec resolved against one topology: level and model names turned into indices."""

    job: str
    workers: int
    gpus_per_worker: int
    milli: int
    models: frozenset[int] | None
    model_names: tuple[str, ...]
    required_level: int | None
    preferred_level: int | None
    spread_level: int | None
    watts_per_gpu: float
    avoid_nodes: frozenset[int] = frozenset()
    spread_cap: int = 1
    cpu_milli: int = 0  # per worker; 0 asks for none
    memory_mib: int = 0

    @property
    def host(self) -> bool:
        """Does each worker ask for CPU or memory as well as GPUs?"""
        return self.cpu_milli > 0 or self.memory_mib > 0

    def host_text(self) -> str:
        parts = ([f"{self.cpu_milli}m CPU"] if self.cpu_milli else []) + (
            [f"{self.memory_mib} MiB memory"] if self.memory_mib else [])
        return " and ".join(parts)

    @property
    def total_gpus(self) -> int:
        return self.workers * self.gpus_per_worker

    @property
    def fractional(self) -> bool:
        return self.milli < MILLI_PER_GPU

    @property
    def cpu_only(self) -> bool:
        """Zero-GPU workers: CPU and memory alone."""
        return self.gpus_per_worker == 0 and not self.fractional

    def describe(self) -> str:
        """``gang of 96 GPUs`` / ``1 GPU worker`` / ``0.46-GPU share`` / ``CPU-only
        worker``, for reasons."""
        if self.cpu_only:
            return "CPU-only worker" if self.workers == 1 else \
                f"gang of {self.workers} CPU-only workers"
        if self.fractional:
            return f"{self.milli / MILLI_PER_GPU:.2f}-GPU share"
        if self.workers == 1:
            return f"{self.gpus_per_worker}-GPU worker"
        return f"gang of {self.total_gpus} GPUs ({self.workers} x {self.gpus_per_worker})"

    @staticmethod
    def resolve(spec: JobSpec, topo: Topology, watts_per_gpu: float = 0.0,
                avoid_nodes: frozenset[int] = frozenset()) -> PlacementRequest | Unplaced:
        """Resolve names; unknown levels or models give a permanent Unplaced with the fix."""
        levels = topo.level_names

        def level(name: str | None, field: str) -> int | Unplaced | None:
            if name is None:
                return None
            if name not in levels:
                return Unplaced(f"{field}: unknown topology level {name!r}; valid levels are "
                                f"{', '.join(levels)}", permanent=True)
            return levels.index(name)

        required = level(spec.required_level, "spec.topology.required")
        preferred = level(spec.preferred_level, "spec.topology.preferred")
        spread = level(spec.spread_level, "spec.topology.spreadAcross") \
            if spec.spread_level in levels or spec.spread_level is None else None
        for value in (required, preferred, spread):
            if isinstance(value, Unplaced):
                return value
        assert not isinstance(required, Unplaced) and not isinstance(preferred, Unplaced)
        assert not isinstance(spread, Unplaced)
        if required is not None and preferred is not None and preferred < required:
            return Unplaced(f"spec.topology.preferred: level {spec.preferred_level!r} is above "
                            f"the required level {spec.required_level!r}; prefer a level at or "
                            "below the required one", permanent=True)
        models: frozenset[int] | None = None
        if spec.gpu_models:
            known = {m: i for i, m in enumerate(topo.models)}
            models = frozenset(known[m] for m in spec.gpu_models if m in known)
            if not models:
                return Unplaced(f"spec.gpuModel: no {'|'.join(spec.gpu_models)} nodes in the "
                                f"factory; models present: {', '.join(topo.models)}",
                                permanent=True)
        if spread is not None and required is not None and spread <= required:
            spread = None
        return PlacementRequest(
            job=spec.key, workers=spec.workers, gpus_per_worker=spec.gpus_per_worker,
            milli=spec.gpu_milli, models=models, model_names=spec.gpu_models,
            required_level=required, preferred_level=preferred, spread_level=spread,
            watts_per_gpu=watts_per_gpu, avoid_nodes=avoid_nodes,
            spread_cap=-(-spec.group_size // max(1, min(spec.spread_min_domains,
                                                         spec.group_size))),
            cpu_milli=spec.cpu_milli, memory_mib=spec.memory_mib)


# --------------------------------------------------------------------------- helpers


def materialize(state: ClusterState, req: PlacementRequest,
                workers_per_node: Sequence[tuple[int, int]]) -> Placement:
    """Turn ``(node, workers)`` pairs into a Placement with concrete GPU indices."""
    slots: list[WorkerSlot] = []
    g = req.gpus_per_worker
    for node, count in workers_per_node:
        gpus = state.free_gpu_indices(node, count * g)
        for w in range(count):
            slots.append(WorkerSlot(node, gpus[w * g:(w + 1) * g], MILLI_PER_GPU, req.cpu_milli,
                                    req.memory_mib))
    return Placement(req.job, tuple(slots), req.watts_per_gpu)


def share_slot(req: PlacementRequest, node: int, gpu: int) -> WorkerSlot:
    """The one slot of a fractional request: ``req.milli`` of ``gpu`` on ``node``."""
    return WorkerSlot(node, (gpu,), req.milli, req.cpu_milli, req.memory_mib)


def node_workers(state: ClusterState, req: PlacementRequest, node: int) -> int:
    """Workers of ``req`` the node holds now, on GPUs, CPU and memory (model not checked).
    GPUs never limit a CPU-only request: its CPU and memory do."""
    if req.cpu_only:
        return state.host_room(node, req.cpu_milli, req.memory_mib)
    if req.fractional:
        cls = state.node_class[node][1]
        room = 1 if cls and cls[0] >= req.milli else 0
    else:
        room = state.node_free[node] // req.gpus_per_worker
    return min(room, state.host_room(node, req.cpu_milli, req.memory_mib)) if req.host \
        else room


def host_capacity(state: ClusterState, req: PlacementRequest, dom: Domain) -> int:
    """Workers of ``req`` the domain holds now, CPU and memory included: O(nodes)."""
    models = req.models
    node_model = state.topo.node_model
    return sum(node_workers(state, req, n) for n in range(dom.node_start, dom.node_end)
               if models is None or node_model[n] in models)


def node_power_ok(state: ClusterState, node: int, watts: float,
                  pending: dict[int, float]) -> bool:
    """Would adding ``watts`` on ``node`` keep every budget covering it within its limit?"""
    for b in state.budgets.node_budgets[node]:
        if state.budget_watts[b] + pending.get(b, 0.0) + watts > state.budgets.limits[b] + 1e-6:
            return False
    return True


def add_pending(state: ClusterState, node: int, watts: float, pending: dict[int, float]) -> None:
    for b in state.budgets.node_budgets[node]:
        pending[b] = pending.get(b, 0.0) + watts


def level_name(topo: Topology, level: int) -> str:
    return "factory" if level < 0 else topo.levels[level].name


def level_index_of(topo: Topology, name: str) -> int:
    return topo.level_names.index(name) if name != NODE_LEVEL else topo.node_level
