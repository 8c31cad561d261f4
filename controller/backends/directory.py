"""Where a backend's machines get their topology when somebody else manages the machines.

A Ray node knows what Ray can schedule on it (its GPUs) and, through the label
``aifactory.io/node``, which machine it runs on. On Kubernetes that machine is a Node whose
labels already say its rack, block, NVLink domain and GPU model (written once, by the
cluster's admins and GPU Feature Discovery). A ``NodeDirectory`` is that second source: the
backend asks it for the topology of each machine its nodes name, and tells it which nodes
could not be joined, so the operator can report them (log, Event, metric). Nothing unmatched
is guessed into the inventory.

Pure values and a Protocol: no Ray, no Kubernetes, so the operator and unit tests use it
without either.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from aifactory.controller.core.topology import NodeInfo

__all__ = ["NODE_NAME_LABEL", "NodeDirectory", "UnmatchedNode", "UnmatchedReason"]

# The label by which a backend node (``ray start --labels``) names the machine it runs on.
NODE_NAME_LABEL = "aifactory.io/node"


class UnmatchedReason(enum.Enum):
    """Why a backend node or a machine is left out of the inventory (a metric label)."""

    NO_NODE_LABEL = "no-node-label"  # the backend node does not say which machine it is on
    NO_NODE = "no-node"  # it names a machine the directory does not know
    DUPLICATE = "duplicate"  # several live backend nodes name the same machine
    NO_RAY_NODE = "no-ray-node"  # a GPU machine no backend node names


@dataclass(frozen=True, slots=True)
class UnmatchedNode:
    """One node left out: ``name`` is the machine's name (the backend node's id when it
    names none), ``detail`` says what a person should look at."""

    name: str
    reason: UnmatchedReason
    detail: str

    @property
    def machine_known(self) -> bool:
        """Whether the directory has a machine of this name (an Event can go on it)."""
        return self.reason in (UnmatchedReason.NO_RAY_NODE, UnmatchedReason.DUPLICATE)


class NodeDirectory(Protocol):
    """Machines by name, with their topology (the operator's view of the Kubernetes Nodes).

    Which source wins for what, when a backend joins its nodes to these machines: the
    directory gives the name and every topology label (rack, block, NVLink clique, zone) and
    the GPU model; the backend gives the GPU count (what it can actually schedule) and
    liveness."""

    def machine(self, name: str) -> NodeInfo | None:
        """The machine called ``name`` with its labels, or None when there is none. Its
        ``gpus`` is the directory's count (0 when it has none), never used as capacity."""
        ...

    def gpu_machines(self) -> Collection[str]:
        """Names of the machines that have GPUs, so should run a backend node."""
        ...

    def unmatched(self, nodes: Sequence[UnmatchedNode]) -> None:
        """After each join: everything left out this time (empty when all matched)."""
        ...
