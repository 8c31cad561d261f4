"""The frozen topology tree and the usage snapshot's O(1) capacity counts."""

from __future__ import annotations

import pytest

from aifactory.controller.core.errors import InvariantError, SpecError
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.core.topology import (
    BLOCK_LABEL,
    CLIQUE_LABEL,
    GPU_COUNT_LABEL,
    GPU_PRODUCT_LABEL,
    RACK_LABEL,
    NodeInfo,
    Topology,
    nvlink_levels,
)
from tests.factories import grid, grid_nodes


def test_tree_is_sorted_by_domain_id_and_contiguous() -> None:
    topo = Topology.build(reversed(grid_nodes(2, 2, 3)))
    assert topo.describe() == "2 blocks > 4 racks > 12 nodes, 96 GPUs (H200)"
    names = [n.name for n in topo.nodes]
    assert names == sorted(names)
    for level_domains in topo.domains[:-1]:
        for dom in level_domains:
            assert dom.gpus == sum(topo.nodes[n].gpus for n in range(dom.node_start,
                                                                      dom.node_end))
    rack = topo.domains[1][3]
    assert rack.id == ("b1", "b1-r1") and rack.parent == 1
    assert topo.ancestor(11, 0) == 1 and topo.ancestor(11, 1) == 3


def test_nodes_without_labels_become_their_own_domains() -> None:
    nodes = [NodeInfo("a", 8, "H100"), NodeInfo("b", 8, "H100", ((RACK_LABEL, "r1"),))]
    topo = Topology.build(nodes)
    assert len(topo.domains[1]) == 2  # each node its own rack
    assert topo.domains[1][0].id[-1] in {"rack:a", "r1"}


def test_nvl72_style_levels_are_expressible() -> None:
    nodes = [NodeInfo(f"tray-{i:02d}", 4, "B200",
                      ((BLOCK_LABEL, "b0"), (RACK_LABEL, "r0"), (CLIQUE_LABEL, f"nvl-{i // 18}")))
             for i in range(36)]
    topo = Topology.build(nodes, nvlink_levels())
    assert topo.level_names == ("block", "rack", "nvlink", "node")
    assert [d.gpus for d in topo.domains[2]] == [72, 72]


def test_node_from_gpu_feature_discovery_labels() -> None:
    node = NodeInfo.from_labels("gpu-1", {GPU_COUNT_LABEL: "8",
                                          GPU_PRODUCT_LABEL: "NVIDIA-H200"})
    assert (node.gpus, node.gpu_model) == (8, "H200")  # one name on every path
    with pytest.raises(SpecError, match=r"nvidia\.com/gpu\.count"):
        NodeInfo.from_labels("gpu-2", {GPU_PRODUCT_LABEL: "NVIDIA-H200"})


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        pytest.param(("rack",), "last level must be 'node'", id="node level missing"),
        pytest.param(("rack", "rack", "node"), "unique", id="duplicate level names"),
    ],
)
def test_bad_levels_are_refused(levels: tuple[str, ...], message: str) -> None:
    from aifactory.controller.core.topology import LevelSpec

    with pytest.raises(SpecError, match=message):
        Topology.build(grid_nodes(1, 1, 1), tuple(LevelSpec(n, f"x/{n}") for n in levels))


def test_duplicate_node_names_are_refused() -> None:
    with pytest.raises(SpecError, match="appears twice"):
        Topology.build([NodeInfo("a", 8, "H200"), NodeInfo("a", 8, "H200")])


def test_capacity_counts_follow_allocations() -> None:
    topo = grid(1, 2, 2)
    state = ClusterState(topo)
    rack0 = topo.domains[1][0]
    assert state.free_gpus(rack0) == 16
    assert state.worker_capacity(rack0, 8) == 2
    state.allocate(Placement("a", (WorkerSlot(0, (0, 1, 2)),)))
    assert state.free_gpus(rack0) == 13
    assert state.worker_capacity(rack0, 4) == 3  # 5 free + 8 free
    assert state.worker_capacity(rack0, 8) == 1
    assert state.has_node_with_free(rack0, 4) == 5
    twin = state.clone()
    twin.release("a")
    assert state.free_gpus(rack0) == 13 and twin.free_gpus(rack0) == 16
    state.check_consistency()


def test_a_gpu_is_never_given_twice() -> None:
    state = ClusterState(grid(1, 1, 1))
    state.allocate(Placement("a", (WorkerSlot(0, (0,), 600),)))
    state.allocate(Placement("b", (WorkerSlot(0, (0,), 400),)))
    with pytest.raises(InvariantError, match="1200/1000"):
        state.allocate(Placement("c", (WorkerSlot(0, (0,), 200),)))
    assert state.gpu_free_milli(0) == 0 and state.node_free[0] == 7
