"""Baselines that walk nodes in one order: ``first-fit`` (name order), ``best-fit``
(fewest free GPUs first, cluster-wide, no topology) and ``random`` (a seeded random node with
room). A gang scheduler without topology beyond a required level, like Volcano's gang plugin
with its default node order."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import Domain
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.base import GroupCount, IgnoresWorkload, greedy, nodes_with_room
from aifactory.controller.placement.explain import explain_unplaced
from aifactory.controller.placement.fragmentation import WorkloadMix
from aifactory.controller.placement.request import (
    PlacementRequest,
    Unplaced,
    materialize,
    share_slot,
)

__all__ = ["NodeOrderPolicy"]


@dataclass(slots=True)
class NodeOrderPolicy(IgnoresWorkload):
    """A non-topology policy defined by how it orders nodes and GPUs (first/best/random)."""

    name: str
    order: str
    seed: int = 0
    gang: bool = True
    power_aware: bool = False
    locality_wait_seconds: float = 0.0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _node_order(self, state: ClusterState, dom: Domain, req: PlacementRequest
                    ) -> list[int]:
        """``nodes_with_room`` in the policy's order. Filtering first keeps a nearly full
        factory cheap: a shuffle or sort of every node per decision dominated."""
        nodes = nodes_with_room(state, req, dom)
        if self.order == "best":
            nodes.sort(key=lambda n: (state.node_free[n], n))
        elif self.order == "random":
            self._rng.shuffle(nodes)
        return nodes

    def _pick_domain(self, state: ClusterState, req: PlacementRequest) -> Domain | None:
        topo = state.topo
        if req.required_level is None:
            return topo.root
        doms = [d for d in topo.domains[req.required_level]
                if state.worker_capacity(d, req.gpus_per_worker, req.models) >= req.workers]
        if not doms:
            return None
        if self.order == "best":
            return min(doms, key=lambda d: (state.free_gpus(d, req.models), d.id))
        if self.order == "random":
            return self._rng.choice(doms)
        return doms[0]

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None,
              mix: WorkloadMix | None = None) -> Placement | Unplaced:
        if req.fractional:
            return self._place_fraction(state, req)
        dom = self._pick_domain(state, req)
        got = None if dom is None else greedy(state, req, self._node_order(state, dom, req))
        if got is None:
            return explain_unplaced(state, req)
        return materialize(state, req, got)

    def _place_fraction(self, state: ClusterState, req: PlacementRequest
                        ) -> Placement | Unplaced:
        topo = state.topo
        m = req.milli
        best: tuple[int, int, int] | None = None
        candidates: list[tuple[int, int]] = []
        for n in self._node_order(state, topo.root, req):
            for gpu in topo.gpu_range(n):
                free = MILLI_PER_GPU - state.gpu_used_milli[gpu]
                if free < m:
                    continue
                if self.order == "first":
                    return Placement(req.job, (share_slot(req, n, gpu),), req.watts_per_gpu)
                if self.order == "random":
                    candidates.append((n, gpu))
                elif best is None or (free, n, gpu) < best:
                    best = (free, n, gpu)
        if self.order == "random" and candidates:
            n, gpu = self._rng.choice(candidates)
            return Placement(req.job, (share_slot(req, n, gpu),), req.watts_per_gpu)
        if best is not None:
            return Placement(req.job, (share_slot(req, best[1], best[2]),), req.watts_per_gpu)
        return explain_unplaced(state, req)
