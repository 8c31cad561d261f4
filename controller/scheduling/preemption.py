"""Choosing whom to preempt for work that fits on one node, and a cheap fit pre-check.

The general victim search (``controller.scheduling.cycle``) releases candidates in order of least
lost work across a whole domain until the gang fits. For work that fits on one node (a
fraction of a GPU, or up to a node's GPUs) that walk may release victims all over the
factory before any single node has room. kube-scheduler instead finds, per node, the
fewest lowest-cost victims that make the pod fit there and picks the cheapest node; this
module does that, in O(candidates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import Domain
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.request import PlacementRequest

__all__ = ["Victim", "VictimIndex", "cheapest_node_victims", "may_fit"]


class Victim(Protocol):
    """What the search needs of a running job (``scheduler.RunningJob`` is one)."""

    @property
    def placement(self) -> Placement: ...

    def lost_gpu_seconds(self, now: float) -> float: ...


def may_fit(state: ClusterState, req: PlacementRequest, dom: Domain) -> bool:
    """A necessary condition for ``req`` to place inside ``dom``, in O(GPUs per node)."""
    if req.fractional:
        return state.free_gpus(dom, req.models) > 0 or any(
            free >= req.milli for free in state.partial_by_free)
    return state.worker_capacity(dom, req.gpus_per_worker, req.models) >= req.workers


def _fits(used: dict[int, int], req: PlacementRequest) -> bool:
    if req.fractional:
        return any(MILLI_PER_GPU - u >= req.milli for u in used.values())
    return sum(1 for u in used.values() if u == 0) >= req.total_gpus


@dataclass(slots=True)
class VictimIndex:
    """Candidates grouped by node, cheapest first, with the work each would lose: built
    once per candidate list and cycle, shared by every one-node search."""

    by_node: dict[int, list[Victim]]
    lost: dict[int, float]  # id(victim) -> lost GPU-seconds
    freeable_milli: dict[int, int]  # node -> milli-GPU its candidates hold there

    @staticmethod
    def build(candidates: Sequence[Victim], now: float) -> VictimIndex:
        lost = {id(v): v.lost_gpu_seconds(now) for v in candidates}
        by_node: dict[int, list[Victim]] = {}
        freeable: dict[int, int] = {}
        for victim in candidates:
            for slot in victim.placement.slots:
                freeable[slot.node] = freeable.get(slot.node, 0) + slot.milli * len(slot.gpus)
            for n in {s.node for s in victim.placement.slots}:
                by_node.setdefault(n, []).append(victim)
        for victims in by_node.values():
            victims.sort(key=lambda v: lost[id(v)])
        return VictimIndex(by_node, lost, freeable)


def cheapest_node_victims(state: ClusterState, req: PlacementRequest, index: VictimIndex
                          ) -> list[Victim] | None:
    """The victim set losing least work (then fewest victims, then lowest node index)
    that frees one node enough for ``req``; None when no node can be freed enough.

    On each node, candidates are released least lost work first until the request fits,
    then any victim whose release turns out not to be needed is kept running."""
    topo = state.topo
    lost = index.lost
    need = 1 if req.fractional else req.total_gpus
    best: tuple[tuple[float, int, int], list[Victim]] | None = None
    for n, victims in index.by_node.items():
        if n in req.avoid_nodes or topo.nodes[n].gpus < need or (
                req.models is not None and topo.node_model[n] not in req.models):
            continue
        if not req.fractional and \
                state.node_free[n] + index.freeable_milli[n] // MILLI_PER_GPU < need:
            continue  # even releasing every candidate here leaves too few whole GPUs
        used = {g: state.gpu_used_milli[g] for g in topo.gpu_range(n)}
        taken: list[Victim] = []
        for victim in victims:
            _free_on(victim, n, used, -1)
            taken.append(victim)
            if _fits(used, req):
                break
        else:
            continue
        for victim in sorted(taken, key=lambda v: -lost[id(v)]):
            if len(taken) == 1:
                break
            _free_on(victim, n, used, +1)
            if _fits(used, req):
                taken = [t for t in taken if t is not victim]
            else:
                _free_on(victim, n, used, -1)
        key = (sum(lost[id(v)] for v in taken), len(taken), n)
        if best is None or key < best[0]:
            best = (key, taken)
    return None if best is None else best[1]


def _free_on(victim: Victim, node: int, used: dict[int, int], sign: int) -> None:
    for slot in victim.placement.slots:
        if slot.node == node:
            for g in slot.gpus:
                used[g] += sign * slot.milli
