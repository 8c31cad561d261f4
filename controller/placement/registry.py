"""Placement policies: ours and the baselines people run today, behind one small Protocol.

__all__ = ["POLICY_NAMES", "make_policy"]

All run in the same simulator on the same input so that their numbers compare:

- ``aifactory``: ours (``controller.placement.topology_aware``): lowest level, tightest
  domain, power-aware.
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

from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.placement.kueue_bestfit import KueueBestFitPolicy
from aifactory.controller.placement.node_order import NodeOrderPolicy
from aifactory.controller.placement.per_pod import PerPodPolicy
from aifactory.controller.placement.topology_aware import TopologyAwarePolicy

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
