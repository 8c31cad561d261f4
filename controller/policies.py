"""Placement policies: ours and the baselines people run today, behind one small Protocol.

All run in the same simulator on the same input so that their numbers compare:

- ``aifactory``: ours (``controller.placement``): lowest level, tightest domain, power-aware.
- ``first-fit``: nodes in name order, first that has room (a gang scheduler without topology
  beyond a required level, like Volcano's gang plugin with default node order).
- ``best-fit``: the node with the fewest free GPUs that fits, cluster-wide, no topology.
- ``random``: a random node with room (seeded).
- ``kueue-bestfit``: Kueue TAS as KEP-2724 describes BestFit: start at the requested level
  (the node level when none), go up while nothing fits (preferred) or fail (required), choose
  the fitting domain with least free capacity, then distribute downwards taking the children
  with most free capacity first and the tightest fitting child for the remainder; nodes with
  most free capacity first. Kueue has no GPU sharing (``nvidia.com/gpu`` is an integer
  resource), so a fractional request takes a whole GPU.
- ``per-pod``: kube-scheduler-like: each worker placed on its own, LeastAllocated, no gang
  semantics, so a gang can be partially placed and hold GPUs while it waits.

Only ``aifactory`` honours power budgets; the others ignore them (their violations are
measured by the simulator, not prevented).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Protocol

from controller.fragmentation import FragmentationScorer, WorkloadMix
from controller.placement import (
    PlacementRequest,
    Unplaced,
    explain_unplaced,
    materialize,
    node_workers,
    place_topology_aware,
    share_slot,
)
from controller.state import MILLI, ClusterState, Placement
from controller.topology import Domain

__all__ = ["POLICY_NAMES", "PlacementPolicy", "make_policy"]

GroupCount = Callable[[Domain], int]


class PlacementPolicy(Protocol):
    """Where one gang goes in a snapshot, or why not. Pure: never mutates the state."""

    name: str
    gang: bool
    power_aware: bool

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None) -> Placement | Unplaced: ...


@dataclass(slots=True)
class TopologyAwarePolicy:
    """Ours. With ``fragmentation_aware`` it learns the workload mix from the requests it
    sees (each job once) and scores one-node placements by FGD's fragmentation measure
    (``controller.fragmentation``); without, one-node work is plain BestFit."""

    name: str = "aifactory"
    gang: bool = True
    power_aware: bool = True
    fragmentation_aware: bool = True
    # Delay scheduling for locality (see scheduler._Cycle.locality): seconds a multi-node
    # gang waits for one rack (or block) before it may span more; 0 turns it off. 600 s:
    # on the Lingjun gang benchmark 300 s let gangs spread on the busiest seed (92.8 % in
    # one rack) and the spread gangs then fragmented racks for the gangs behind them; 600 s
    # kept >= 95 % in one rack on every seed with a lower p95 wait (benchmarks/README.md).
    locality_wait_seconds: float = 600.0
    mix: WorkloadMix = field(default_factory=WorkloadMix)
    scorer: FragmentationScorer = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.scorer = FragmentationScorer(self.mix if self.fragmentation_aware
                                          else WorkloadMix())

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None) -> Placement | Unplaced:
        if self.fragmentation_aware:
            # CPU and memory enter the shape only where nodes track them.
            cpu, memory = (req.cpu_milli, req.memory_mib) if state.host_tracked else (0, 0)
            if req.fractional:
                self.mix.observe(req.job, (1, req.milli, req.models, cpu, memory))
            else:
                self.mix.observe(req.job, (req.gpus_per_worker, MILLI, req.models, cpu,
                                           memory), req.workers)
        return place_topology_aware(state, req, group_count, self.scorer)


def _eligible(state: ClusterState, req: PlacementRequest, n: int) -> bool:
    return req.models is None or state.topo.node_model[n] in req.models


def _nodes_with_room(state: ClusterState, req: PlacementRequest, dom: Domain) -> list[int]:
    """The domain's nodes, in index order, of an allowed model with room for one worker of
    ``req``: ``gpus_per_worker`` whole free GPUs, or one GPU with the share free (and the
    worker's CPU and memory)."""
    if req.fractional:
        classes, m = state.node_class, req.milli
        nodes = [n for n in range(dom.node_start, dom.node_end)
                 if classes[n][1] and classes[n][1][0] >= m and _eligible(state, req, n)]
    else:
        free, g = state.node_free, req.gpus_per_worker
        nodes = [n for n in range(dom.node_start, dom.node_end)
                 if free[n] >= g and _eligible(state, req, n)]
    if req.host:
        nodes = [n for n in nodes if state.host_room(n, req.cpu_milli, req.memory_mib) > 0]
    return nodes


def _greedy(state: ClusterState, req: PlacementRequest, nodes: Iterable[int]
            ) -> list[tuple[int, int]] | None:
    """Take workers node by node in the given order (nodes from ``_nodes_with_room``)
    until the gang is placed."""
    out: list[tuple[int, int]] = []
    remaining = req.workers
    for n in nodes:
        k = min(node_workers(state, req, n), remaining)
        out.append((n, k))
        remaining -= k
        if remaining == 0:
            return out
    return None


@dataclass(slots=True)
class NodeOrderPolicy:
    """A non-topology policy defined by how it orders nodes and GPUs (first/best/random)."""

    name: str
    order: str
    seed: int = 0
    gang: bool = True
    power_aware: bool = False
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def _node_order(self, state: ClusterState, dom: Domain, req: PlacementRequest
                    ) -> list[int]:
        """``_nodes_with_room`` in the policy's order. Filtering first keeps a nearly full
        factory cheap: a shuffle or sort of every node per decision dominated."""
        nodes = _nodes_with_room(state, req, dom)
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
              group_count: GroupCount | None = None) -> Placement | Unplaced:
        if req.fractional:
            return self._place_fraction(state, req)
        dom = self._pick_domain(state, req)
        got = None if dom is None else _greedy(state, req, self._node_order(state, dom, req))
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
                free = MILLI - state.gpu_used_milli[gpu]
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


@dataclass(slots=True)
class KueueBestFitPolicy:
    """Kueue TAS BestFit (KEP-2724), re-implemented on our topology model."""

    name: str = "kueue-bestfit"
    gang: bool = True
    power_aware: bool = False

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None) -> Placement | Unplaced:
        if req.fractional:  # no GPU sharing in Kueue: a fraction takes a whole GPU
            req = replace(req, workers=1, gpus_per_worker=1, milli=MILLI, spread_level=None,
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


@dataclass(slots=True)
class PerPodPolicy:
    """kube-scheduler-like: LeastAllocated per worker, no gang; partial placements happen."""

    name: str = "per-pod"
    gang: bool = False
    power_aware: bool = False

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None) -> Placement | Unplaced:
        topo = state.topo
        g = req.gpus_per_worker
        if req.fractional:
            best_gpu: tuple[int, int, int] | None = None
            for n in _nodes_with_room(state, req, topo.root):
                for gpu in topo.gpu_range(n):
                    free = MILLI - state.gpu_used_milli[gpu]
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
        nodes = _nodes_with_room(state, req, topo.root)
        hosts = {n: node_workers(state, req, n) for n in nodes}
        heap = [(-left[n] / topo.nodes[n].gpus, n) for n in nodes]
        heapq.heapify(heap)
        for _ in range(req.workers):
            if not heap:
                break
            _, best_n = heapq.heappop(heap)
            left[best_n] -= g
            hosts[best_n] -= 1
            if left[best_n] >= g and hosts[best_n] > 0:
                heapq.heappush(heap, (-left[best_n] / topo.nodes[best_n].gpus, best_n))
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


POLICY_NAMES = ("aifactory", "first-fit", "best-fit", "random", "kueue-bestfit", "per-pod")


def make_policy(name: str, seed: int = 0) -> PlacementPolicy:
    """A policy by name; unknown names raise ValueError listing the valid ones."""
    if name == "aifactory":
        return TopologyAwarePolicy()
    if name == "first-fit":
        return NodeOrderPolicy("first-fit", "first", seed)
    if name == "best-fit":
        return NodeOrderPolicy("best-fit", "best", seed)
    if name == "random":
        return NodeOrderPolicy("random", "random", seed)
    if name == "kueue-bestfit":
        return KueueBestFitPolicy()
    if name == "per-pod":
        return PerPodPolicy()
    raise ValueError(f"unknown policy {name!r}; valid policies are {', '.join(POLICY_NAMES)}")
