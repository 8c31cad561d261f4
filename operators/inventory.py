"""Where the GPUs come from: the cluster's Node objects, or a simulated factory spec.

A Node counts as a GPU node when its allocatable ``nvidia.com/gpu`` is positive (real GPUs,
the device plugin's count) or, on clusters without GPUs such as kind, when it carries the GPU
feature discovery label ``nvidia.com/gpu.count`` (simulated GPUs on labelled nodes). The GPU
model comes from ``nvidia.com/gpu.product``; racks and blocks from ``aifactory.io/rack`` and
``aifactory.io/block`` (a node without them is a rack of its own). Cordoned nodes
(``spec.unschedulable``) are part of the inventory: a cordon means no new work, not the end
of what runs there (``operators.nodes`` keeps new work off them).

``--inventory auto`` (the default) uses the Nodes when any is a GPU node, else the factory
spec given by ``--cluster`` (a built-in name or a SimulatedFactory YAML).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.topology import (
    CLIQUE_LABEL,
    GPU_COUNT_LABEL,
    GPU_PRODUCT_LABEL,
    NodeInfo,
    nvlink_levels,
)
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes, load_factory

__all__ = ["GPU_RESOURCE", "INVENTORY_MODES", "choose_factory", "nodes_from_objects"]

GPU_RESOURCE = "nvidia.com/gpu"
INVENTORY_MODES = ("auto", "nodes", "factory")


def _count(raw: Any) -> int:
    try:
        value = int(str(raw))
    except (TypeError, ValueError):
        return 0
    return max(value, 0)


def nodes_from_objects(items: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
    """GPU nodes from Node objects (dicts as the API returns them), by name."""
    nodes: list[NodeInfo] = []
    for item in items:
        meta = item.get("metadata") or {}
        name = meta.get("name")
        if not isinstance(name, str):
            continue  # a cordoned node stays: it keeps what runs there (operators.nodes)
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        allocatable = ((item.get("status") or {}).get("allocatable") or {}).get(GPU_RESOURCE)
        gpus = _count(allocatable) or _count(labels.get(GPU_COUNT_LABEL))
        if gpus <= 0:
            continue
        product = labels.get(GPU_PRODUCT_LABEL, "")
        model = product or "unknown"  # NodeInfo canonicalises the spelling
        nodes.append(NodeInfo.from_labels(name, labels, gpus=gpus, gpu_model=model))
    return sorted(nodes, key=lambda n: n.name)


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
        factory = factory_from_nodes("cluster-nodes", nodes, "Node objects")
        if any(n.label(CLIQUE_LABEL) for n in nodes):
            factory = replace(factory, levels=nvlink_levels())
        return factory
    return load_factory(cluster)
