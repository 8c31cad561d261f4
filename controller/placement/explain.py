"""Why a gang cannot be placed: reasons a person can act on, and the never-fits check.

``static_check`` judges a request against the empty factory (a gang that can never fit is
refused for good); ``explain_unplaced`` says why it does not fit the current usage: the
largest free domain at the level it may not cross, CPU or memory, or the power headroom of
the budget in the way. Pure: reads a ``ClusterState``, returns an ``Unplaced``.
"""

from __future__ import annotations

from aifactory.controller.core.state import ClusterState
from aifactory.controller.core.topology import Domain
from aifactory.controller.placement.request import (
    PlacementRequest,
    Unplaced,
    host_capacity,
    level_name,
)

__all__ = ["explain_unplaced", "static_check"]


def static_check(empty: ClusterState, req: PlacementRequest) -> Unplaced | None:
    """Reasons a gang can never fit this factory, judged on the empty factory."""
    topo = empty.topo
    what = req.describe()
    model_txt = f"{'|'.join(req.model_names)} " if req.model_names else ""
    if req.cpu_only:
        if host_capacity(empty, req, topo.root) < req.workers:
            return _host_never(empty, req, model_txt)
        return None
    if req.fractional:
        if empty.free_gpus(topo.root, req.models) == 0:
            return Unplaced(f"{what} fits nowhere: the factory has no {model_txt}GPUs",
                            permanent=True)
        if req.host and host_capacity(empty, req, topo.root) == 0:
            return _host_never(empty, req, model_txt)
        return None
    largest = empty.largest_node_free(topo.root, req.models)
    if req.gpus_per_worker > largest:
        return Unplaced(f"worker of {req.gpus_per_worker} GPUs fits no node: the largest "
                        f"{model_txt}node has {largest} GPUs", permanent=True)
    total = empty.free_gpus(topo.root, req.models)
    if empty.worker_capacity(topo.root, req.gpus_per_worker, req.models) < req.workers:
        return Unplaced(f"{what} exceeds the factory: {total} {model_txt}GPUs in total",
                        permanent=True)
    if req.host and host_capacity(empty, req, topo.root) < req.workers:
        return _host_never(empty, req, model_txt)
    if req.required_level is not None:
        doms = topo.domains[req.required_level]
        best = max(doms, key=lambda d: empty.free_gpus(d, req.models))
        if max(empty.worker_capacity(d, req.gpus_per_worker, req.models) for d in doms) \
                < req.workers:
            name = level_name(topo, req.required_level)
            return Unplaced(f"{name}-required {what} fits no {name}: the largest {name} has "
                            f"{empty.free_gpus(best, req.models)} {model_txt}GPUs",
                            permanent=True)
    return None


def _host_never(empty: ClusterState, req: PlacementRequest, model_txt: str) -> Unplaced:
    g = 1 if req.fractional else req.gpus_per_worker
    nodes = [n for n in range(len(empty.topo.nodes)) if empty.node_free[n] >= g
             and (req.models is None or empty.topo.node_model[n] in req.models)]
    cpu = max((empty.cpu_free[n] for n in nodes), default=0)
    memory = max((empty.memory_free[n] for n in nodes), default=0)
    have = ", ".join(
        ([f"{cpu}m CPU"] if req.cpu_milli else []) + ([f"{memory} MiB"] if req.memory_mib
                                                       else []))
    where = f"{model_txt}node" if req.cpu_only else f"{model_txt}node with {g} GPUs"
    if req.cpu_only and nodes and host_capacity(empty, req, empty.topo.root) > 0:
        return Unplaced(f"{req.describe()} asking {req.host_text()} per worker exceeds the "
                        f"factory: all nodes together hold only "
                        f"{host_capacity(empty, req, empty.topo.root)} such workers",
                        permanent=True)
    return Unplaced(f"{req.describe()} asking {req.host_text()} per worker fits no "
                    f"{where}: the most such a node has is {have}", permanent=True)


def _cpu_only_reason(state: ClusterState, req: PlacementRequest) -> Unplaced:
    """Why CPU-only workers wait: the CPU or memory free on the roomiest node."""
    n = len(state.topo.nodes)
    cpu = max((state.cpu_free[i] for i in range(n)), default=0)
    memory = max((state.memory_free[i] for i in range(n)), default=0)
    room = host_capacity(state, req, state.topo.root)
    have = ", ".join(([f"{cpu}m CPU"] if req.cpu_milli else [])
                     + ([f"{memory} MiB memory"] if req.memory_mib else []))
    if room >= req.workers:
        return Unplaced(f"{req.describe()} waits: CPU and memory for {room} such workers are "
                        "free, but not inside the topology level it may not cross")
    return Unplaced(f"{req.describe()} waits: no node has {req.host_text()} free; the most "
                    f"free on one node is {have} (room for {room} of {req.workers} workers)")


def _host_reason(state: ClusterState, req: PlacementRequest, dom: Domain,
                 model_txt: str) -> Unplaced | None:
    """GPUs have room for the gang in ``dom`` but CPU or memory does not, if so."""
    if not req.host:
        return None
    room = host_capacity(state, req, dom)
    if room >= req.workers:
        return None
    return Unplaced(f"{req.describe()} waits: {model_txt}GPUs are free but CPU or memory is "
                    f"not; the nodes hold only {room} workers asking {req.host_text()} each")


def explain_unplaced(state: ClusterState, req: PlacementRequest) -> Unplaced:
    """Why the gang does not fit right now, in words a person can act on."""
    topo = state.topo
    what = req.describe()
    model_txt = f"{'|'.join(req.model_names)} " if req.model_names else ""
    if req.cpu_only:
        return _cpu_only_reason(state, req)
    if req.fractional:
        if state.partial_by_free or state.free_gpus(topo.root, req.models):
            host = _host_reason(state, req, topo.root, model_txt)
            if host is not None:
                return host
        return Unplaced(f"{what} waits: no {model_txt}GPU has {req.milli} milli-GPU free")
    need_watts = req.total_gpus * req.watts_per_gpu
    g = req.gpus_per_worker
    if req.required_level is not None:
        name = level_name(topo, req.required_level)
        doms = topo.domains[req.required_level]
        best = max(doms, key=lambda d: (state.worker_capacity(d, g, req.models),
                                        state.free_gpus(d, req.models)))
        free = state.free_gpus(best, req.models)
        cap = state.worker_capacity(best, g, req.models)
        if cap >= req.workers:
            return _host_reason(state, req, best, model_txt) or _power_reason(
                state, best, need_watts, what)
        text = (f"{name}-required {what} fits no {name}: largest free {name} has {free} free "
                f"{model_txt}GPUs")
        if free >= req.total_gpus:
            text += f" but room for only {cap} workers of {g} GPUs"
        return Unplaced(text)
    free = state.free_gpus(topo.root, req.models)
    cap = state.worker_capacity(topo.root, g, req.models)
    if cap >= req.workers:
        return _host_reason(state, req, topo.root, model_txt) or _power_reason(
            state, topo.root, need_watts, what)
    if free >= req.total_gpus:
        return Unplaced(f"{what} waits: {free} {model_txt}GPUs are free but fragmented; "
                        f"room for only {cap} workers of {g} GPUs")
    return Unplaced(f"{what} waits: {free} of {state.free_gpus(topo.root, None)} free GPUs "
                    f"are {model_txt}GPUs; needs {req.total_gpus}" if req.model_names else
                    f"{what} waits: {free} GPUs free in the factory, needs {req.total_gpus}")


def _power_reason(state: ClusterState, dom: Domain, need: float, what: str) -> Unplaced:
    budgets = state.budgets
    worst = None
    for b in range(len(budgets.names)):
        head = state.power_headroom(b)
        if worst is None or head < worst[0]:
            worst = (head, b)
    if worst is None:
        return Unplaced(f"{what} waits: capacity exists but no placement satisfied the "
                        "constraints")
    head, b = worst
    return Unplaced(f"{what} waits on power: budget {budgets.names[b]} "
                    f"({budgets.limits[b]:.0f} W) has {max(head, 0.0):.0f} W headroom; the "
                    f"gang needs {need:.0f} W more", power_limited=True)
