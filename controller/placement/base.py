"""The placement policy Protocol, and the node filters the baseline policies share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import Domain
from aifactory.controller.placement.fragmentation import WorkloadMix
from aifactory.controller.placement.request import (
    PlacementRequest,
    Unplaced,
    node_workers,
)

__all__ = ["GroupCount", "IgnoresWorkload", "PlacementPolicy", "eligible", "greedy",
           "nodes_with_room"]

GroupCount = Callable[[Domain], int]


class PlacementPolicy(Protocol):
    """Where one gang goes in a snapshot, or why not.

    ``place`` is pure: it never mutates the state, the mix or the policy, so a trial call
    (preemption, backfill reservations) changes nothing. A policy that scores placements
    by the workload seen so far reads it from the ``WorkloadMix`` its caller owns, and says
    what a request adds to it in ``learn``; the others ignore both. ``gang``: places all
    workers or none; ``power_aware``: honours power budgets; ``locality_wait_seconds``:
    how long a multi-node gang waits for one rack before it may spread (0: never waits)."""

    name: str
    gang: bool
    power_aware: bool
    locality_wait_seconds: float

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None,
              mix: WorkloadMix | None = None) -> Placement | Unplaced: ...

    def learn(self, mix: WorkloadMix, req: PlacementRequest, host_tracked: bool) -> None:
        """Add ``req``'s job to ``mix`` (once per job) if this policy reads the mix."""
        ...


class IgnoresWorkload:
    """For baselines: placement never reads the workload mix, so nothing is learned."""

    __slots__ = ()

    def learn(self, mix: WorkloadMix, req: PlacementRequest, host_tracked: bool) -> None:
        return None


def eligible(state: ClusterState, req: PlacementRequest, n: int) -> bool:
    return req.models is None or state.topo.node_model[n] in req.models


def nodes_with_room(state: ClusterState, req: PlacementRequest, dom: Domain) -> list[int]:
    """The domain's nodes, in index order, of an allowed model with room for one worker of
    ``req``: ``gpus_per_worker`` whole free GPUs, or one GPU with the share free (and the
    worker's CPU and memory)."""
    if req.fractional:
        classes, m = state.node_class, req.milli
        nodes = [n for n in range(dom.node_start, dom.node_end)
                 if classes[n][1] and classes[n][1][0] >= m and eligible(state, req, n)]
    else:
        free, g = state.node_free, req.gpus_per_worker
        nodes = [n for n in range(dom.node_start, dom.node_end)
                 if free[n] >= g and eligible(state, req, n)]
    if req.host:
        nodes = [n for n in nodes if state.host_room(n, req.cpu_milli, req.memory_mib) > 0]
    return nodes


def greedy(state: ClusterState, req: PlacementRequest, nodes: Iterable[int]
            ) -> list[tuple[int, int]] | None:
    """Take workers node by node in the given order (nodes from ``nodes_with_room``)
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
