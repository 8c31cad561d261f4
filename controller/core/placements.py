"""Placements in the words other systems and people use, spelled once.

Inside the core a placement names nodes and GPUs by index; status, Ray and a person name
nodes by name with GPU indices local to the node (``NodeSlot``). ``node_slots`` and
``placement_from_node_slots`` convert between the two (the second checks what it is given,
since it rebuilds placements from status and from gangs found running); ``placement_span``
and ``describe_placement`` say in a few words where a placement sits in the topology.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.controller.core.topology import Topology
from aifactory.controller.core.units import MILLI_PER_GPU

__all__ = ["NodeSlot", "describe_placement", "node_slots", "placement_from_node_slots",
           "placement_span"]

# One worker: (node name, node-local GPU indices, thousandths of each GPU it holds).
NodeSlot = tuple[str, tuple[int, ...], int]


def node_slots(placement: Placement, topo: Topology) -> list[NodeSlot]:
    """The placement's workers as (node name, node-local GPU indices, milli)."""
    out: list[NodeSlot] = []
    for slot in placement.slots:
        first = topo.gpu_start[slot.node]
        out.append((topo.nodes[slot.node].name, tuple(g - first for g in slot.gpus),
                    slot.milli))
    return out


def placement_from_node_slots(job: str, slots: Iterable[tuple[Any, Any, Any]],
                              topo: Topology, watts_per_gpu: float = 0.0,
                              cpu_milli: int = 0, memory_mib: int = 0,
                              where: str = "workers") -> Placement:
    """Rebuild a Placement from (node name, node-local GPU indices, milli) per worker, each
    worker holding the job's ``cpu_milli`` and ``memory_mib``. SpecError names the worker
    (``<where>[i].node``/``.gpus``/``.milli``) when a node is not in ``topo``, the indices are
    not distinct GPUs of that node, or the share is not in 1..1000."""
    out: list[WorkerSlot] = []
    for i, (node_name, local, milli) in enumerate(slots):
        path = f"{where}[{i}]"
        node = topo.node_index.get(node_name) if isinstance(node_name, str) else None
        if node is None:
            raise SpecError(f"{path}.node", f"node {node_name!r} is not in the inventory")
        count = topo.nodes[node].gpus
        if (not isinstance(local, Sequence) or isinstance(local, str) or not local
                or not all(isinstance(g, int) and not isinstance(g, bool) and 0 <= g < count
                           for g in local) or len(set(local)) != len(local)):
            raise SpecError(f"{path}.gpus", f"must list distinct GPU indices below {count} "
                            f"on node {node_name}, got {local!r}")
        if not isinstance(milli, int) or isinstance(milli, bool) or \
                not 0 < milli <= MILLI_PER_GPU:
            raise SpecError(f"{path}.milli",
                            f"must be an integer in 1..{MILLI_PER_GPU}, got {milli!r}")
        first = topo.gpu_start[node]
        out.append(WorkerSlot(node, tuple(first + g for g in local), milli, cpu_milli,
                              memory_mib))
    if not out:
        raise SpecError(where, "is empty")
    return Placement(job, tuple(out), watts_per_gpu)


def _domains_by_level(placements: Sequence[Placement], topo: Topology) -> list[set[int]]:
    """The domains the placements touch at every level, root level first."""
    nodes = {s.node for p in placements for s in p.slots}
    return [{topo.ancestor(n, level) for n in nodes} for level in range(len(topo.levels))]


def placement_span(placements: Sequence[Placement], topo: Topology
                   ) -> tuple[dict[str, int], str]:
    """Domains touched per level, and the span in a few words: ``rack b0-r1``, ``2 racks``.

    The words name the smallest single domain that holds everything, else the count of the
    highest level's domains (``2 blocks``)."""
    if not any(p.slots for p in placements):
        return {}, ""
    doms = _domains_by_level(placements, topo)
    levels = {spec.name: len(d) for spec, d in zip(topo.levels, doms, strict=True)}
    for level in range(topo.node_level, -1, -1):
        if len(doms[level]) == 1:  # the lowest level with a single domain
            index = next(iter(doms[level]))
            return levels, f"{topo.levels[level].name} {topo.domains[level][index].name}"
    top = topo.levels[0].name
    return levels, f"{levels[top]} {top}s"


def describe_placement(placement: Placement, topo: Topology) -> str:
    """``16 GPUs on 2 nodes in rack b0-r1`` style summary of a placement: its GPUs, its
    node (or how many), then each level up until one domain holds it all."""
    doms = _domains_by_level([placement], topo)
    nodes = placement.nodes
    where = f"node {topo.nodes[nodes[0]].name}" if len(nodes) == 1 else f"{len(nodes)} nodes"
    parts = [f"{placement.gpu_equivalents:g} GPUs on {where}"]
    for level in range(topo.node_level - 1, -1, -1):
        name = topo.levels[level].name
        if len(doms[level]) == 1:
            parts.append(f"in {name} {topo.domains[level][next(iter(doms[level]))].name}")
            break
        parts.append(f"across {len(doms[level])} {name}s")
    return " ".join(parts)
