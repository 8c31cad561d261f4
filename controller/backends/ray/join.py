"""Ray nodes joined to the machines a ``NodeDirectory`` knows (Kubernetes Nodes), as values.

Each live Ray node with GPUs names its machine with the label ``aifactory.io/node`` (the
DaemonSet in deploy/ray/ sets it from the downward API's ``spec.nodeName``). Joined, the
inventory entry takes from each side what that side knows best:

* from the directory (the Node): the name, rack, block, zone and NVLink clique, the GPU model
  (GPU Feature Discovery's ``nvidia.com/gpu.product``; Ray's detected model when the Node
  has none);
* from Ray: the GPU count (what Ray can actually schedule there), liveness, id and address.

Ray's own topology labels are ignored once a directory is used: topology is written once,
on the Node. A Ray node without the label, naming no known machine, or naming one that
another live Ray node names too, is left out; so is a GPU machine no Ray node names. Each
comes back as an ``UnmatchedNode`` for the operator to report. No Ray import: unit-tested
pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from aifactory.controller.backends.directory import NodeDirectory, UnmatchedNode, UnmatchedReason
from aifactory.controller.backends.ray.gang import NODE_NAME_LABEL, TOPOLOGY_LABELS, RayNode
from aifactory.controller.core.topology import GPU_PRODUCT_LABEL, HOSTNAME_LABEL, NodeInfo

__all__ = ["join_ray_nodes", "joined_info"]


def joined_info(ray: NodeInfo, machine: NodeInfo) -> NodeInfo:
    """The inventory entry of a Ray node on ``machine`` (see the module's table)."""
    labels = {k: v for k, v in machine.labels if k in TOPOLOGY_LABELS}
    model = machine.gpu_model if machine.label(GPU_PRODUCT_LABEL) else ray.gpu_model
    labels.setdefault(GPU_PRODUCT_LABEL, model)
    labels[HOSTNAME_LABEL] = machine.name
    return NodeInfo(name=machine.name, gpus=ray.gpus, gpu_model=model,
                    labels=tuple(sorted(labels.items())))


def join_ray_nodes(nodes: Sequence[RayNode], directory: NodeDirectory
                   ) -> tuple[list[RayNode], list[UnmatchedNode]]:
    """The Ray nodes joined to their machines (names and topology from the directory), and
    everything left out, with why."""
    unmatched: list[UnmatchedNode] = []
    by_machine: dict[str, list[RayNode]] = {}
    for node in nodes:
        if node.named:
            by_machine.setdefault(node.info.name, []).append(node)
            continue
        unmatched.append(UnmatchedNode(
            node.node_id, UnmatchedReason.NO_NODE_LABEL,
            f"Ray node {node.node_id} at {node.address or '?'} has {node.info.gpus} GPUs but "
            f"no {NODE_NAME_LABEL} label; start it with --labels "
            f"{NODE_NAME_LABEL}=<its Kubernetes node name>"))
    joined: list[RayNode] = []
    for name, group in sorted(by_machine.items()):
        machine = directory.machine(name)
        if len(group) > 1:
            ids = ", ".join(sorted(f"{n.node_id} at {n.address or '?'}" for n in group))
            unmatched.append(UnmatchedNode(
                name, UnmatchedReason.DUPLICATE,
                f"{len(group)} live Ray nodes name Kubernetes node {name} ({ids}); none is "
                "used until one is left"))
        elif machine is None:
            node = group[0]
            unmatched.append(UnmatchedNode(
                name, UnmatchedReason.NO_NODE,
                f"Ray node {node.node_id} at {node.address or '?'} names Kubernetes node "
                f"{name} ({NODE_NAME_LABEL}), which does not exist"))
        else:
            joined.append(replace(group[0], info=joined_info(group[0].info, machine)))
    for name in sorted(set(directory.gpu_machines()) - by_machine.keys()):
        unmatched.append(UnmatchedNode(
            name, UnmatchedReason.NO_RAY_NODE,
            f"Kubernetes node {name} has GPUs but no live Ray node with GPUs names it "
            f"({NODE_NAME_LABEL}={name}); is a Ray worker running there?"))
    return joined, unmatched
