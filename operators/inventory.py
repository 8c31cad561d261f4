"""Where the GPUs come from: the cluster's Node objects, or a simulated factory spec.

A Node counts as a GPU node when its allocatable ``nvidia.com/gpu`` is positive (real GPUs,
the device plugin's count) or, on clusters without GPUs such as kind, when it carries the GPU
feature discovery label ``nvidia.com/gpu.count`` (simulated GPUs on labelled nodes). The GPU
model comes from ``nvidia.com/gpu.product``; racks and blocks from ``aifactory.io/rack`` and
``aifactory.io/block`` (a node without them is a rack of its own); rack-scale NVLink domains
from ``nvidia.com/gpu.clique``. With ``--backend ray`` the same reading gives the Ray nodes
their topology (``operators.raynodes``). Cordoned nodes
(``spec.unschedulable``) are part of the inventory: a cordon means no new work, not the end
of what runs there (``operators.nodes`` keeps new work off them).

``--inventory auto`` (the default) uses the Nodes when any is a GPU node, else the factory
spec given by ``--cluster`` (a built-in name or a SimulatedFactory YAML).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.topology import (
    GPU_COUNT_LABEL,
    GPU_PRESENT_LABEL,
    GPU_PRODUCT_LABEL,
    NodeInfo,
)
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes, load_factory

__all__ = ["GPU_RESOURCE", "INVENTORY_MODES", "choose_factory", "has_gpus", "node_info",
           "nodes_from_objects"]

GPU_RESOURCE = "nvidia.com/gpu"
INVENTORY_MODES = ("auto", "nodes", "factory")


def _count(raw: Any) -> int:
    try:
        value = int(str(raw))
    except (TypeError, ValueError):
        return 0
    return max(value, 0)


def node_info(item: Mapping[str, Any]) -> NodeInfo | None:
    """One Node object (a dict as the API returns it) as an inventory entry, whatever its
    GPUs (``gpus`` 0 when it has none); None without a name. The one reading of a Node's
    labels: the simulated inventory and the Ray join (``operators.raynodes``) both use it."""
    meta = item.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    allocatable = ((item.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE)
    gpus = _count(allocatable) or _count(labels.get(GPU_COUNT_LABEL))
    model = labels.get(GPU_PRODUCT_LABEL, "") or "unknown"  # NodeInfo canonicalises it
    return NodeInfo.from_labels(name, labels, gpus=gpus, gpu_model=model)


def has_gpus(node: NodeInfo) -> bool:
    """A GPU node: a GPU count (allocatable ``nvidia.com/gpu`` or GFD's count label), or
    GFD's ``nvidia.com/gpu.present=true`` on a node whose device plugin has not counted yet."""
    return node.gpus > 0 or node.label(GPU_PRESENT_LABEL) == "true"


def nodes_from_objects(items: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
    """GPU nodes from Node objects (dicts as the API returns them), by name. Cordoned
    nodes stay: they keep what runs there (operators.nodes)."""
    infos = (node_info(item) for item in items)
    return sorted((n for n in infos if n is not None and n.gpus > 0), key=lambda n: n.name)


def choose_factory(mode: str, node_objects: Iterable[Mapping[str, Any]],
                   cluster: str) -> FactorySpec:
    """The factory the operator schedules on: Nodes (``nodes``/``auto`` with GPU nodes) or
    the spec ``cluster`` (``factory``/``auto`` without)."""
    if mode not in INVENTORY_MODES:
        raise SpecError("--inventory", f"must be one of {', '.join(INVENTORY_MODES)}, "
                        f"got {mode!r}")
    nodes = nodes_from_objects(node_objects) if mode != "factory" else []
    if mode == "nodes" and not nodes:
        raise SpecError("--inventory nodes", f"no Node has allocatable {GPU_RESOURCE} or a "
                        f"{GPU_COUNT_LABEL} label; label the nodes or use --inventory factory")
    if nodes:
        return factory_from_nodes("cluster-nodes", nodes, "Node objects")
    return load_factory(cluster)
