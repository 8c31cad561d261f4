"""Pure parts of the Ray backend: inventory mapping, names, pinned bundles, worker env.

::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01      (8 GPUs each)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from aifactory.controller.backends.ray.gang import (
    NODE_ID_LABEL,
    gang_bundles,
    job_of_pg,
    pg_name,
    pool_actor_name,
    ray_node,
    worker_actor_name,
    worker_plans,
)
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.placements import placement_from_node_slots
from aifactory.controller.core.spec import JobKind, JobSpec, Runtime
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.controller.core.topology import BLOCK_LABEL, GPU_PRODUCT_LABEL, RACK_LABEL, Topology
from tests.factories import grid_nodes

TOPO = Topology.build(grid_nodes(1, 2, 2))
IDS = {n.name: f"id-{i}" for i, n in enumerate(TOPO.nodes)}


def entry(**kw: Any) -> dict[str, Any]:
    base = {"NodeID": "abc", "Alive": True, "NodeManagerAddress": "10.0.0.1",
            "Resources": {"GPU": 8.0, "CPU": 4.0},
            "Labels": {"aifactory.io/node": "n1", BLOCK_LABEL: "b0", RACK_LABEL: "b0-r1",
                       GPU_PRODUCT_LABEL: "H200", "ray.io/node-id": "abc", "other": "x"}}
    base.update(kw)
    return base


@dataclass(frozen=True)
class NodeCase:
    id: str
    entry: dict[str, Any]
    name: str | None
    gpus: int = 0
    model: str = ""


NODE_CASES = [
    NodeCase("a labelled GPU node keeps its name, rack, block and model", entry(), "n1", 8,
             "H200"),
    NodeCase("a dead node is left out", entry(Alive=False), None),
    NodeCase("a node without GPUs (the head) is left out",
             entry(Resources={"CPU": 4.0}), None),
    NodeCase("an unnamed node is named by its Ray id", entry(Labels={}), "abc", 8, "unknown"),
    NodeCase("the model falls back to Ray's accelerator resource",
             entry(Labels={}, Resources={"GPU": 4.0, "accelerator_type:H100": 1.0}), "abc", 4,
             "H100"),
    NodeCase("a fractional GPU count rounds down", entry(Resources={"GPU": 2.5}), "n1", 2,
             "H200"),
]


@pytest.mark.parametrize("case", NODE_CASES, ids=[c.id for c in NODE_CASES])
def test_ray_nodes_map_to_inventory_nodes(case: NodeCase) -> None:
    node = ray_node(case.entry)
    if case.name is None:
        assert node is None
        return
    assert node is not None
    assert (node.info.name, node.info.gpus, node.info.gpu_model) == (case.name, case.gpus,
                                                                     case.model)
    labels = dict(node.info.labels)
    assert "other" not in labels and "ray.io/node-id" not in labels
    if case.entry["Labels"]:
        assert labels[RACK_LABEL] == "b0-r1" and labels[BLOCK_LABEL] == "b0"


def test_inventory_nodes_build_the_rack_topology() -> None:
    entries = [entry(NodeID=f"id{i}", Labels={"aifactory.io/node": f"n{i}", BLOCK_LABEL: "b0",
                                               RACK_LABEL: f"b0-r{i // 2}"})
               for i in range(4)]
    topo = Topology.build([n.info for e in entries if (n := ray_node(e)) is not None])
    assert topo.describe() == "1 blocks > 2 racks > 4 nodes, 32 GPUs (unknown)"


def test_names_round_trip_and_foreign_groups_are_not_ours() -> None:
    assert pg_name("team-a/train") == "aifactory/team-a/train"
    assert job_of_pg(pg_name("team-a/train")) == "team-a/train"
    assert job_of_pg("someone-else") is None
    assert job_of_pg("aifactory/nonamespace") is None
    assert worker_actor_name("team-a/train", 3) == "aifactory/team-a/train/w3"


def test_pooled_worker_names_are_no_job_s_names() -> None:
    """``_`` is in no Kubernetes namespace name, so a job in any namespace (even one named
    like the pool) never owns a pooled worker's name."""
    name = pool_actor_name("n-b0-r0-00", "abc123")
    assert name == "aifactory/_pool/n-b0-r0-00/abc123"
    assert name != worker_actor_name("_pool/n-b0-r0-00", 0)
    assert not name.startswith(pg_name("pool") + "/")



def placement(*slots: tuple[int, tuple[int, ...]], milli: int = 1000) -> Placement:
    return Placement("it/j", tuple(WorkerSlot(n, g, milli) for n, g in slots))


def test_every_bundle_is_pinned_to_the_chosen_node_with_its_gpus() -> None:
    p = placement((0, (0, 1, 2, 3)), (0, (4, 5, 6, 7)), (3, (24, 25, 26, 27)))
    bundles = gang_bundles(p, TOPO, IDS, 0.1)
    assert [b.selector for b in bundles] == [{NODE_ID_LABEL: "id-0"}, {NODE_ID_LABEL: "id-0"},
                                             {NODE_ID_LABEL: "id-3"}]
    assert [dict(b.resources) for b in bundles] == [{"GPU": 4.0, "CPU": 0.1}] * 3
    assert [b.local_gpus for b in bundles] == [(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3)]


def test_a_fraction_of_a_gpu_becomes_a_fractional_bundle_without_cpu() -> None:
    (bundle,) = gang_bundles(placement((1, (8,)), milli=500), TOPO, IDS, 0.0)
    assert dict(bundle.resources) == {"GPU": 0.5}


def test_a_node_that_left_the_cluster_is_named_in_the_error() -> None:
    ids = {k: v for k, v in IDS.items() if k != TOPO.nodes[2].name}
    with pytest.raises(SpecError, match=f"node {TOPO.nodes[2].name} is not in the Ray"):
        gang_bundles(placement((2, (16,))), TOPO, ids, 1.0)


def test_ranks_local_ranks_and_node_ranks_follow_the_bundles() -> None:
    p = placement((1, (8, 9)), (0, (0, 1)), (1, (10, 11)), (0, (2, 3)))
    spec = JobSpec("j", workers=4, gpus_per_worker=2, namespace="it",
                   runtime=Runtime(entrypoint="m:f", env=(("A", "1"),)))
    plans = worker_plans(spec, gang_bundles(p, TOPO, IDS, 1.0), "/ckpt", 5.0, attempt=2)
    assert [(p.rank, p.local_rank, p.local_world_size, p.node_rank) for p in plans] == [
        (0, 0, 2, 0), (1, 0, 2, 1), (2, 1, 2, 0), (3, 1, 2, 1)]
    env = plans[2].distributed_env("10.0.0.9", 29500)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                "MASTER_PORT", "AIFACTORY_CHECKPOINT_DIR",
                                "AIFACTORY_ATTEMPT")} == {
        "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.9",
        "MASTER_PORT": "29500", "AIFACTORY_CHECKPOINT_DIR": "/ckpt", "AIFACTORY_ATTEMPT": "2"}
    assert plans[0].serve_host is None


def test_inference_replicas_get_the_serving_host() -> None:
    spec = JobSpec("r0", kind=JobKind.INFERENCE, namespace="it")
    (plan,) = worker_plans(spec, gang_bundles(placement((0, (0,))), TOPO, IDS, 1.0), "/c",
                           0.0, serve_host="127.0.0.1")
    assert plan.serve_host == "127.0.0.1" and plan.kind == "InferenceService"


def test_reported_slots_rebuild_the_placement_or_name_the_worker_whose_node_is_gone() -> None:
    p = placement((1, (8, 9)), (3, (30, 31)))
    bundles = gang_bundles(p, TOPO, IDS, 1.0)
    slots = [(b.node, b.local_gpus, b.milli) for b in bundles]
    assert placement_from_node_slots("it/j", slots, TOPO) == p
    smaller = Topology.build(TOPO.nodes[:2])
    with pytest.raises(SpecError, match=r"workers\[1\]\.node"):
        placement_from_node_slots("it/j", slots, smaller)
