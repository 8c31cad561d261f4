"""Ray nodes joined to Kubernetes Nodes: topology from the Node, GPUs from Ray.

The Ray nodes (as ``ray.nodes()`` reports them) carry deliberately wrong racks; the Node
objects (as the API server serves them) are the truth::

    Node objects                      Ray nodes (aifactory.io/node -> rack label)
    rack k-a: gpu-0, gpu-1            gpu-0 -> r-wrong, gpu-1 -> r-wrong
    rack k-b: gpu-2 (no Ray node)     ray-x -> names "ghost" (no Node)
    cpu-0 (no GPUs, no Ray node)      (no label)  -> id "anon"
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from aifactory.controller.backends.directory import UnmatchedReason
from aifactory.controller.backends.ray.gang import RayNode, ray_node
from aifactory.controller.backends.ray.join import join_ray_nodes
from aifactory.controller.core.clock import VirtualClock
from aifactory.controller.core.topology import (
    BLOCK_LABEL,
    CLIQUE_LABEL,
    GPU_PRESENT_LABEL,
    GPU_PRODUCT_LABEL,
    RACK_LABEL,
    NodeInfo,
)
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.resync import Reconciler
from aifactory.operators.raynodes import UNMATCHED_EVENT_REASON, KubeNodeDirectory
from tests.factories import RecordingBackend


def k8s_node(name: str, rack: str | None = None, gpus: int = 8, product: str | None = "NVIDIA-H200",
             uid: str = "", **labels: str) -> dict[str, Any]:
    """A Node object as the API server serves it."""
    all_labels = dict(labels)
    if rack is not None:
        all_labels[RACK_LABEL] = rack
    if product is not None:
        all_labels[GPU_PRODUCT_LABEL] = product
    status = {"allocatable": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {"metadata": {"name": name, "uid": uid or f"uid-{name}", "labels": all_labels},
            "status": status}


def ray_entry(node_id: str, name: str | None, gpus: float = 8.0, rack: str = "r-wrong",
              **labels: str) -> dict[str, Any]:
    """One ``ray.nodes()`` entry."""
    all_labels = {RACK_LABEL: rack, **labels}
    if name is not None:
        all_labels["aifactory.io/node"] = name
    return {"NodeID": node_id, "Alive": True, "NodeManagerAddress": "10.0.0.9",
            "Resources": {"GPU": gpus, "CPU": 4.0, "accelerator_type:A100": 1.0},
            "Labels": all_labels}


def ray_nodes(*entries: dict[str, Any]) -> list[RayNode]:
    return [n for e in entries if (n := ray_node(e)) is not None]


def directory(*nodes: dict[str, Any]) -> KubeNodeDirectory:
    d = KubeNodeDirectory()
    for node in nodes:
        d.observe(node, False)
    return d


@dataclass(frozen=True)
class JoinCase:
    id: str
    nodes: tuple[dict[str, Any], ...]
    ray: tuple[dict[str, Any], ...]
    joined: dict[str, tuple[int, str, str | None]]  # name -> (GPUs, model, rack)
    left_out: tuple[tuple[str, UnmatchedReason], ...] = field(default=())


JOIN_CASES = [
    JoinCase("the Node's rack wins over the Ray label, Ray's GPU count over the Node's",
             (k8s_node("gpu-0", "k-a", gpus=8),), (ray_entry("id-0", "gpu-0", gpus=4.0),),
             {"gpu-0": (4, "H200", "k-a")}),
    JoinCase("a Node without a GPU product label keeps Ray's detected model",
             (k8s_node("gpu-0", "k-a", product=None),), (ray_entry("id-0", "gpu-0"),),
             {"gpu-0": (8, "A100", "k-a")}),
    JoinCase("a Node without a rack is a rack of its own, whatever Ray says",
             (k8s_node("gpu-0"),), (ray_entry("id-0", "gpu-0"),), {"gpu-0": (8, "H200", None)}),
    JoinCase("a Ray node without a node label is left out",
             (k8s_node("gpu-0", "k-a"),),
             (ray_entry("id-0", "gpu-0"), ray_entry("anon", None)),
             {"gpu-0": (8, "H200", "k-a")}, (("anon", UnmatchedReason.NO_NODE_LABEL),)),
    JoinCase("a Ray node naming no Node is left out",
             (k8s_node("gpu-0", "k-a"),),
             (ray_entry("id-0", "gpu-0"), ray_entry("ray-x", "ghost")),
             {"gpu-0": (8, "H200", "k-a")}, (("ghost", UnmatchedReason.NO_NODE),)),
    JoinCase("two live Ray nodes naming one Node are both left out",
             (k8s_node("gpu-0", "k-a"),), (ray_entry("id-0", "gpu-0"), ray_entry("id-1", "gpu-0")),
             {}, (("gpu-0", UnmatchedReason.DUPLICATE),)),
    JoinCase("a GPU Node no Ray node names is reported; a Node without GPUs is not",
             (k8s_node("gpu-0", "k-a"), k8s_node("gpu-2", "k-b"), k8s_node("cpu-0", gpus=0,
                                                                           product=None)),
             (ray_entry("id-0", "gpu-0"),),
             {"gpu-0": (8, "H200", "k-a")}, (("gpu-2", UnmatchedReason.NO_RAY_NODE),)),
    JoinCase("GFD's gpu.present marks a GPU Node before the device plugin counts its GPUs",
             (k8s_node("gpu-3", gpus=0, **{GPU_PRESENT_LABEL: "true"}),), (),
             {}, (("gpu-3", UnmatchedReason.NO_RAY_NODE),)),
    JoinCase("a Ray node on a Node the device plugin has not counted yet still joins",
             (k8s_node("gpu-3", "k-c", gpus=0),), (ray_entry("id-3", "gpu-3"),),
             {"gpu-3": (8, "H200", "k-c")}),
]


@pytest.mark.parametrize("case", JOIN_CASES, ids=[c.id for c in JOIN_CASES])
def test_ray_nodes_join_their_kubernetes_nodes(case: JoinCase) -> None:
    joined, left_out = join_ray_nodes(ray_nodes(*case.ray), directory(*case.nodes))
    assert {n.info.name: (n.info.gpus, n.info.gpu_model, n.info.label(RACK_LABEL))
            for n in joined} == case.joined
    assert tuple((u.name, u.reason) for u in left_out) == case.left_out
    for node in joined:  # the node id stays Ray's: bundles are pinned by it
        assert node.node_id.startswith("id-")


def test_an_nvlink_clique_on_the_nodes_adds_the_nvlink_level() -> None:
    nodes = [k8s_node(f"gb-{i}", "k-a", gpus=4, product="NVIDIA-GB200",
                      **{CLIQUE_LABEL: f"dom-{i // 2}", BLOCK_LABEL: "b0"}) for i in range(4)]
    joined, left_out = join_ray_nodes(
        ray_nodes(*(ray_entry(f"id-{i}", f"gb-{i}", gpus=4.0) for i in range(4))),
        directory(*nodes))
    assert left_out == []
    topo = factory_from_nodes("t", [n.info for n in joined]).topology()
    assert [level.name for level in topo.levels] == ["block", "rack", "nvlink", "node"]
    assert topo.describe().startswith("1 blocks > 1 racks > 2 nvlinks > 4 nodes")


def test_a_deleted_or_relabelled_node_changes_what_the_join_gives() -> None:
    d = directory(k8s_node("gpu-0", "k-a"), k8s_node("gpu-1", "k-a"))
    ray = ray_nodes(ray_entry("id-0", "gpu-0"), ray_entry("id-1", "gpu-1"))
    d.observe(k8s_node("gpu-1", "k-b"), False)
    joined, _ = join_ray_nodes(ray, d)
    assert [n.info.label(RACK_LABEL) for n in joined] == ["k-a", "k-b"]
    d.observe(k8s_node("gpu-1", "k-b"), True)
    joined, left_out = join_ray_nodes(ray, d)
    assert [n.info.name for n in joined] == ["gpu-0"]
    assert [(u.name, u.reason) for u in left_out] == [("gpu-1", UnmatchedReason.NO_NODE)]


def test_what_is_left_out_is_reported_once_per_change(caplog: pytest.LogCaptureFixture) -> None:
    d = directory(k8s_node("gpu-0", "k-a"), k8s_node("gpu-2", "k-b", uid="u-2"))
    posted: list[tuple[dict[str, str], str, str, str]] = []

    def post(ref: Any, type_: str, reason: str, message: str) -> None:
        posted.append((dict(ref), type_, reason, message))

    ray = ray_nodes(ray_entry("id-0", "gpu-0"), ray_entry("ray-x", "ghost"))
    caplog.set_level(logging.INFO, "aifactory.operators.raynodes")
    for _ in range(3):  # the backend joins on every refresh; the operator reports changes
        d.unmatched(join_ray_nodes(ray, d)[1])
        d.report(post)
    assert d.counts() == {"no-node-label": 0, "no-node": 1, "duplicate": 0, "no-ray-node": 1}
    # An Event only where a Node exists (gpu-2); the Ray node naming "ghost" has none.
    assert [(p[0]["kind"], p[0]["name"], p[0]["uid"], p[1], p[2]) for p in posted] == [
        ("Node", "gpu-2", "u-2", "Warning", UNMATCHED_EVENT_REASON)]
    assert "no live Ray node with GPUs names it" in posted[0][3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and any("ghost" in w and "does not exist" in w for w in warnings)
    # A Ray node starts on gpu-2: it joins, and that is logged once.
    ray = [*ray, *ray_nodes(ray_entry("id-2", "gpu-2"))]
    caplog.clear()
    for _ in range(2):
        d.unmatched(join_ray_nodes(ray, d)[1])
        d.report(post)
    assert d.counts()["no-ray-node"] == 0 and len(posted) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "gpu-2 is no longer left out of the inventory (was: no-ray-node)"]


def test_a_relabelled_node_rebuilds_the_plane_over_its_new_rack() -> None:
    nodes = [NodeInfo("a", 8, "H200", ((BLOCK_LABEL, "b0"), (RACK_LABEL, "r1"))),
             NodeInfo("b", 8, "H200", ((BLOCK_LABEL, "b0"), (RACK_LABEL, "r2")))]
    backend = RecordingBackend(nodes)
    clock = VirtualClock()
    factory = factory_from_nodes("t", nodes)
    cp = ControlPlane(factory, backend, clock=clock, topology=factory.topology())
    reconciler = Reconciler(cp, backend, lambda: factory_from_nodes("t", backend.inventory()))
    reconciler.step()
    assert reconciler.cp is cp and cp.topo.describe().startswith("1 blocks > 2 racks")
    backend.nodes[1] = NodeInfo("b", 8, "H200", ((BLOCK_LABEL, "b0"), (RACK_LABEL, "r1")))
    reconciler.step()
    assert reconciler.cp is not cp
    assert reconciler.cp.topo.describe().startswith("1 blocks > 1 racks > 2 nodes")
