"""``kueue-bestfit``: Kueue TAS BestFit as KEP-2724 describes it.

__all__ = ["KueueBestFitPolicy"]

Start at the requested level (the node level when none), go up while nothing fits
(preferred) or fail (required), choose the fitting domain with least free capacity, then
distribute downwards taking the children with most free capacity first and the tightest
fitting child for the remainder; nodes with most free capacity first. Kueue has no GPU
sharing (``nvidia.com/gpu`` is an integer resource), so a fractional request takes a whole
GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import accumulate

from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import Domain
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.base import GroupCount, IgnoresWorkload
from aifactory.controller.placement.explain import explain_unplaced
from aifactory.controller.placement.fragmentation import WorkloadMix
from aifactory.controller.placement.request import (
    PlacementRequest,
    Unplaced,
    materialize,
    node_workers,
)


@dataclass(slots=True)
class KueueBestFitPolicy(IgnoresWorkload):
    """Kueue TAS BestFit (KEP-2724), re-implemented on our topology model."""

    name: str = "kueue-bestfit"
    gang: bool = True
    power_aware: bool = False
    locality_wait_seconds: float = 0.0

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None,
              mix: WorkloadMix | None = None) -> Placement | Unplaced:
        if req.fractional:  # no GPU sharing in Kueue: a fraction takes a whole GPU
            req = replace(req, workers=1, gpus_per_worker=1, milli=MILLI_PER_GPU, spread_level=None,
                          spread_cap=1)
        topo = state.topo
        g, w = req.gpus_per_worker, req.workers
        # Kueue's TAS counts every resource a pod asks for in a domain's capacity: with CPU
        # or memory asked, per-node worker counts summed over the domain's node range.
        prefix = list(accumulate(
            (node_workers(state, req, n) if req.models is None
             or topo.node_model[n] in req.models else 0 for n in range(len(topo.nodes))),
            initial=0)) if req.host else []

        def cap(d: Domain) -> int:
            if not req.host:
                return state.worker_capacity(d, g, req.models)
            return prefix[d.node_end] - prefix[d.node_start]

        level = req.required_level if req.required_level is not None else (
            req.preferred_level if req.preferred_level is not None else topo.node_level)
        chosen: list[Domain] = []
        while True:
            doms = topo.domains[level] if level >= 0 else (topo.root,)
            fitting = [d for d in doms if cap(d) >= w]
            if fitting:
                chosen = [min(fitting, key=lambda d: (cap(d), d.id))]
                break
            if req.required_level is not None:
                return explain_unplaced(state, req)
            if level < 0:
                return explain_unplaced(state, req)
            level -= 1
        assignment = self._distribute(state, req, chosen[0], w, cap)
        if assignment is None:
            return explain_unplaced(state, req)
        return materialize(state, req, assignment)

    def _distribute(self, state: ClusterState, req: PlacementRequest, dom: Domain,
                    workers: int, cap: Callable[[Domain], int]
                    ) -> list[tuple[int, int]] | None:
        topo = state.topo
        if dom.level == topo.node_level:
            return [(dom.node_start, workers)]
        kids = sorted((c for c in topo.children_of(dom) if cap(c) > 0),
                      key=lambda c: (-cap(c), c.id))
        picked: list[tuple[Domain, int]] = []
        remaining = workers
        for i, c in enumerate(kids):
            if remaining <= 0:
                break
            if cap(c) >= remaining:
                # BestFit for the last domain: the tightest remaining child that holds it.
                rest = [k for k in kids[i:] if cap(k) >= remaining]
                last = min(rest, key=lambda k: (cap(k), k.id))
                picked.append((last, remaining))
                remaining = 0
                break
            picked.append((c, cap(c)))
            remaining -= cap(c)
        if remaining > 0:
            return None
        out: list[tuple[int, int]] = []
        for c, share in picked:
            got = self._distribute(state, req, c, share, cap)
            if got is None:
                return None
            out.extend(got)
        return out
