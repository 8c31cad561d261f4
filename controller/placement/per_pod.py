"""``per-pod``: kube-scheduler-like placement, each worker on its own, LeastAllocated.

__all__ = ["PerPodPolicy"]

No gang semantics: a gang can be partially placed and hold GPUs while it waits, which is what
the simulator measures against the gang policies.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.base import GroupCount, IgnoresWorkload, nodes_with_room
from aifactory.controller.placement.explain import explain_unplaced
from aifactory.controller.placement.fragmentation import WorkloadMix
from aifactory.controller.placement.request import (
    PlacementRequest,
    Unplaced,
    materialize,
    node_workers,
    share_slot,
)


@dataclass(slots=True)
class PerPodPolicy(IgnoresWorkload):
    """kube-scheduler-like: LeastAllocated per worker, no gang; partial placements happen."""

    name: str = "per-pod"
    gang: bool = False
    power_aware: bool = False
    locality_wait_seconds: float = 0.0

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None,
              mix: WorkloadMix | None = None) -> Placement | Unplaced:
        topo = state.topo
        g = req.gpus_per_worker
        if req.fractional:
            best_gpu: tuple[int, int, int] | None = None
            for n in nodes_with_room(state, req, topo.root):
                for gpu in topo.gpu_range(n):
                    free = MILLI_PER_GPU - state.gpu_used_milli[gpu]
                    if free >= req.milli:
                        key = (-state.node_free[n], -free, gpu)
                        if best_gpu is None or key < best_gpu:
                            best_gpu = key
            if best_gpu is None:
                return explain_unplaced(state, req)
            gpu = best_gpu[2]
            return Placement(req.job, (share_slot(req, topo.node_of_gpu(gpu), gpu),),
                             req.watts_per_gpu)
        left = state.node_free.copy()
        out: list[tuple[int, int]] = []
        # Least allocated first (most free share, then lowest index), one worker at a time.
        nodes = nodes_with_room(state, req, topo.root)
        hosts = {n: node_workers(state, req, n) for n in nodes}
        heap = [(-left[n] / max(1, topo.nodes[n].gpus), n) for n in nodes]
        heapq.heapify(heap)
        for _ in range(req.workers):
            if not heap:
                break
            _, best_n = heapq.heappop(heap)
            left[best_n] -= g
            hosts[best_n] -= 1
            if left[best_n] >= g and hosts[best_n] > 0:
                heapq.heappush(heap, (-left[best_n] / max(1, topo.nodes[best_n].gpus),
                                      best_n))
            if out and out[-1][0] == best_n:
                out[-1] = (best_n, out[-1][1] + 1)
            else:
                out.append((best_n, 1))
        if not out:
            return explain_unplaced(state, req)
        merged: dict[int, int] = {}
        for n, k in out:
            merged[n] = merged.get(n, 0) + k
        placement = materialize(state, req, sorted(merged.items()))
        if len(placement.slots) < req.workers:
            return Placement(placement.job, placement.slots, placement.watts_per_gpu,
                             complete=False)
        return placement
