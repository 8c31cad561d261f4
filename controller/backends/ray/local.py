"""A local Ray cluster of simulated GPU nodes: demos, ``aifactory run --backend ray``, tests.

Ray can declare GPUs a machine does not have (``num_gpus``), and Ray's ``Cluster`` starts
several raylets on one machine, each its own Ray node with its own labels. So one laptop can
hold a factory in miniature: a head node without GPUs plus one Ray node per factory node,
labelled ``aifactory.io/node``, ``aifactory.io/block``, ``aifactory.io/rack`` and
``nvidia.com/gpu.product`` exactly as ``ray start --labels`` would label real machines, so the
Ray backend cannot tell the difference. Each node costs a raylet (~150 MB); keep it to a few.
Node failure is detected within about two seconds (fast GCS health checks).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import ray
from ray.cluster_utils import Cluster

from aifactory.controller.backends.ray.gang import NODE_NAME_LABEL, RAY_NAMESPACE
from aifactory.controller.core.topology import BLOCK_LABEL, GPU_PRODUCT_LABEL, RACK_LABEL, NodeInfo

__all__ = ["LocalRayCluster", "ray_labels"]

_LABEL_KEYS = (BLOCK_LABEL, RACK_LABEL)
FAST_HEALTH_CHECKS = {
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 3,
    "health_check_initial_delay_ms": 0,
}





def ray_labels(node: NodeInfo) -> dict[str, str]:
    """The Ray node labels that make ``node`` come back from ``ray.nodes()`` as itself."""
    labels = {NODE_NAME_LABEL: node.name, GPU_PRODUCT_LABEL: node.gpu_model}
    for key in _LABEL_KEYS:
        value = node.label(key)
        if value:
            labels[key] = value
    return labels


def _environment() -> None:
    # The raylets, and so every worker and command, inherit this environment: a command's
    # `python` is this interpreter (its virtualenv), as a real node's is its image's.
    bindir = os.path.dirname(sys.executable)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join(p for p in (bindir, os.environ.get("PATH")) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), "aifactory-ray"))


class LocalRayCluster:
    """Head (no GPUs) + one Ray node per ``NodeInfo``; ``start()`` connects this process."""

    def __init__(self, nodes: Sequence[NodeInfo], *, cpus_per_node: float = 4,
                 head_cpus: float = 1, object_store_bytes: int = 80 * 1024 * 1024,
                 namespace: str = RAY_NAMESPACE) -> None:
        self.nodes = list(nodes)
        self.cpus_per_node = cpus_per_node
        self.head_cpus = head_cpus
        self.object_store_bytes = object_store_bytes
        self.namespace = namespace
        self._cluster: Cluster | None = None
        self._ray_nodes: dict[str, Any] = {}

    @property
    def address(self) -> str:
        if self._cluster is None:
            raise RuntimeError("LocalRayCluster is not started")
        return str(self._cluster.address)

    def start(self) -> LocalRayCluster:
        _environment()
        os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
        self._cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": self.head_cpus, "num_gpus": 0, "include_dashboard": False,
            "object_store_memory": self.object_store_bytes,
            "_system_config": dict(FAST_HEALTH_CHECKS)})
        for node in self.nodes:
            self._add(node, wait=False)
        self._cluster.wait_for_nodes()
        ray.init(address=self.address, namespace=self.namespace, log_to_driver=False,
                 configure_logging=False)
        return self

    def _add(self, node: NodeInfo, wait: bool) -> None:
        assert self._cluster is not None
        self._ray_nodes[node.name] = self._cluster.add_node(
            wait=wait, num_cpus=self.cpus_per_node, num_gpus=node.gpus,
            object_store_memory=self.object_store_bytes, labels=ray_labels(node))

    def add_node(self, node: NodeInfo) -> None:
        """A node joins the cluster (it shows up in the backend's inventory)."""
        self._add(node, wait=True)
        if node not in self.nodes:
            self.nodes.append(node)

    def remove_node(self, name: str) -> None:
        """Kill a node's raylet without warning, as a machine failure would."""
        assert self._cluster is not None
        self._cluster.remove_node(self._ray_nodes.pop(name), allow_graceful=False)

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()  # type: ignore[no-untyped-call]
            self._cluster = None

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

