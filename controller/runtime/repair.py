"""Hot swap: a gang that lost workers to failed nodes is repaired, not restarted from scratch.

When nodes fail under a running gang, only the workers on those nodes move: to free nodes
inside the smallest topology domain that holds the gang's surviving workers, widening level
by level, but never past the gang's required level (a rack-required gang stays in its rack).
Every lost worker of a gang moves at once, whichever of several failed nodes it was on. The
gang then restarts from its last checkpoint with the rest of its placement unchanged (its
surviving workers keep their GPUs), so a 512-GPU job that lost one node does not wait in the
queue behind everything else for a whole new placement.

When no spare fits inside the allowed domain, ``hot_swap`` changes nothing and says why; the
caller requeues the gang from its checkpoint with that reason. A gang that lost every worker,
or is at its restart limit, is not repaired here (the normal requeue handles it).
"""

from __future__ import annotations

from dataclasses import replace

from aifactory.controller.core.placements import describe_placement
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.core.topology import Domain, Topology
from aifactory.controller.placement.request import PlacementRequest, Unplaced
from aifactory.controller.runtime.controlplane import ControlPlane

__all__ = ["hot_swap"]

_SPARE = "!spare/"


def _domain_of(topo: Topology, node: int, level: int) -> Domain:
    return topo.root if level < 0 else topo.domains[level][topo.ancestor(node, level)]


def _levels(topo: Topology, kept: tuple[WorkerSlot, ...], required: int | None) -> list[int]:
    """Levels to look for spares at, lowest first: from the lowest level whose one domain
    holds every surviving worker up to the required level (or the root, -1)."""
    lowest = -1
    for level in range(topo.node_level - 1, -1, -1):
        if len({topo.ancestor(s.node, level) for s in kept}) == 1:
            lowest = level
            break
    top = required if required is not None else -1
    return list(range(lowest, top - 1, -1)) if lowest >= top else []


def _only(state: ClusterState, dom: Domain, blocked: frozenset[int]) -> ClusterState:
    """A copy of ``state`` whose free GPUs outside ``dom`` (and on ``blocked`` nodes) are
    held, so a placement can only use ``dom``."""
    trial = state.clone()
    topo = state.topo
    for n in range(len(topo.nodes)):
        if dom.node_start <= n < dom.node_end and n not in blocked:
            continue
        free = tuple(g for g in topo.gpu_range(n) if state.gpu_used_milli[g] == 0)
        if free:
            trial.allocate(Placement(f"{_SPARE}{n}", (WorkerSlot(n, free),)))
    return trial


def hot_swap(cp: ControlPlane, key: str, lost: frozenset[int], blocked: frozenset[int],
             why: str) -> str | None:
    """Move the workers of running job ``key`` that are on ``lost`` nodes to spares (never
    on ``blocked`` nodes: failed or cordoned), and restart it from its checkpoint there.
    Returns None when repaired, else why not (the caller requeues the gang)."""
    rec = cp.jobs.get(key)
    if rec is None or rec.placement is None or rec.done:
        return "not running"
    placement = rec.placement
    kept = tuple(s for s in placement.slots if s.node not in lost)
    moving = len(placement.slots) - len(kept)
    if moving == 0:
        return "no worker on a failed node"
    if not kept:
        return "every worker was on a failed node"
    if rec.restarts >= rec.spec.restart_limit:
        return f"restart limit {rec.spec.restart_limit} reached"
    topo = cp.topo
    req = PlacementRequest.resolve(cp.running_spec(rec), topo, placement.watts_per_gpu)
    if isinstance(req, Unplaced) or req.fractional:
        return "a fractional replica is requeued whole"
    base = cp.state.clone()
    base.release(key)
    base.allocate(replace(placement, job=f"{key}#kept", slots=kept))
    sub = replace(req, job=f"{key}#swap", workers=moving, required_level=None,
                  preferred_level=None, spread_level=None, avoid_nodes=lost | blocked)
    levels = _levels(topo, kept, req.required_level)
    got: Placement | Unplaced | None = None
    dom = topo.root
    for level in levels:
        dom = _domain_of(topo, kept[0].node, level)
        got = cp.policy.place(_only(base, dom, lost | blocked), sub, None, cp.memory.mix)
        if isinstance(got, Placement) and got.complete:
            break
    if not isinstance(got, Placement) or not got.complete:
        if not levels:
            return f"no spare for {moving} worker(s)"
        widest = levels[-1]
        where = "the factory" if widest < 0 else f"{topo.levels[widest].name} {dom.name}"
        return f"no spare for {moving} worker(s) in {where}"
    repaired = Placement(key, kept + got.slots, placement.watts_per_gpu)
    moved_to = sorted({topo.nodes[s.node].name for s in got.slots})
    cp.relocate(rec, repaired, f"{why}: hot swap moved {moving} worker(s) to "
                f"{', '.join(moved_to)} ({describe_placement(repaired, topo)}); restarting "
                "from the last checkpoint")
    return None
