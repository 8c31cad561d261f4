"""The fragmentation measure (FGD) and where it sends work that fits on one node.

Mixed factory used by the placement cases (one block, one rack per node shape):

              factory (20 GPUs)
             /                \\
      rack big (8-GPU nodes)   rack small (2-GPU nodes)
      big-0  big-1             small-0 small-1

``busy`` lists (node, milli-GPU used per GPU) before the job arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.core.topology import BLOCK_LABEL, RACK_LABEL, NodeInfo, Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.fragmentation import (
    FragmentationScorer,
    Shape,
    WorkloadMix,
    fragment_milli,
)
from aifactory.controller.placement.request import PlacementRequest
from aifactory.controller.placement.topology_aware import place_topology_aware

ANY = None


@dataclass(frozen=True)
class FragCase:
    free: tuple[int, ...]
    typical: tuple[tuple[float, int, int, frozenset[int] | None], ...]
    model: int
    expected: float


FRAGMENT = {
    "an empty node is no fragment for whole-GPU work that fits it": FragCase(
        (1000,) * 8, ((1.0, 8, MILLI_PER_GPU, ANY),), 0, 0.0),
    "every free GPU is fragment for a task bigger than the node's free GPUs": FragCase(
        (1000, 1000), ((1.0, 4, MILLI_PER_GPU, ANY),), 0, 2000.0),
    "partially used GPUs are fragment for whole-GPU work": FragCase(
        (1000, 300), ((1.0, 1, MILLI_PER_GPU, ANY),), 0, 300.0),
    "a GPU with less free than the share is fragment for that share": FragCase(
        (1000, 300, 600), ((1.0, 1, 500, ANY),), 0, 300.0),
    "a node of a model the task may not use is all fragment": FragCase(
        (1000, 1000), ((1.0, 1, MILLI_PER_GPU, frozenset({1})),), 0, 2000.0),
    "the measure is the popularity-weighted sum over typical tasks": FragCase(
        (1000, 1000, 500), ((0.5, 1, MILLI_PER_GPU, ANY), (0.5, 4, MILLI_PER_GPU, ANY)), 0,
        0.5 * 500 + 0.5 * 2500),
    "a full node has no fragment": FragCase((0, 0), ((1.0, 1, MILLI_PER_GPU, ANY),), 0, 0.0),
}


@pytest.mark.parametrize("case", FRAGMENT.values(), ids=FRAGMENT.keys())
def test_fragment_milli(case: FragCase) -> None:
    typical = tuple((*t, 0, 0) for t in case.typical)  # no CPU or memory asked
    assert fragment_milli(case.model, case.free, typical) == pytest.approx(case.expected)


def test_every_shape_is_typical_by_default_rare_ones_too() -> None:
    mix = WorkloadMix()
    for i in range(90):
        mix.observe(f"one-{i}", (1, MILLI_PER_GPU, None, 0, 0))
    mix.observe("rare", (8, MILLI_PER_GPU, None, 0, 0))
    typical = mix.typical()
    assert [(t[1], t[2]) for t in typical] == [(1, MILLI_PER_GPU), (8, MILLI_PER_GPU)]
    assert typical[1][0] == pytest.approx(1 / 91)


def test_typical_shapes_cover_95_percent_of_workers_most_popular_first() -> None:
    mix = WorkloadMix(coverage=0.95)  # FGD's cut
    for i in range(90):
        mix.observe(f"one-{i}", (1, MILLI_PER_GPU, None, 0, 0))
    for i in range(6):
        mix.observe(f"gang-{i}", (8, MILLI_PER_GPU, None, 0, 0), weight=1)
    mix.observe("rare", (2, MILLI_PER_GPU, None, 0, 0))
    mix.observe("one-0", (1, MILLI_PER_GPU, None, 0, 0))  # the same job again counts once
    typical = mix.typical()
    assert [(t[1], t[2]) for t in typical] == [(1, MILLI_PER_GPU), (8, MILLI_PER_GPU)]
    assert sum(t[0] for t in typical) == pytest.approx(1.0)
    assert typical[0][0] == pytest.approx(90 / 96)
    assert mix.observed_workers == 97


def test_scores_are_cached_until_the_workload_changes() -> None:
    mix = WorkloadMix(refresh_growth=0.5)
    mix.observe("a", (8, MILLI_PER_GPU, None, 0, 0))
    scorer = FragmentationScorer(mix)
    empty_two = (0, (MILLI_PER_GPU, MILLI_PER_GPU), -1, -1, 0)
    first = scorer.move(empty_two, 1, MILLI_PER_GPU)
    # A 1-GPU task on a 2-GPU node nobody's 8-GPU tasks can use removes 1000 of fragment.
    assert first == (-1000.0, MILLI_PER_GPU, 2)
    mix.observe("b", (1, MILLI_PER_GPU, None, 0, 0))
    assert scorer.move(empty_two, 1, MILLI_PER_GPU) != first  # new typical shapes, new scores


def mixed_topology() -> Topology:
    nodes = []
    for rack, gpus, count in (("big", 8, 2), ("small", 2, 2)):
        for i in range(count):
            nodes.append(NodeInfo(f"{rack}-{i}", gpus, "H100",
                                  ((BLOCK_LABEL, "b0"), (RACK_LABEL, rack))))
    return Topology.build(nodes)


TOPO = mixed_topology()


def state_with(busy: tuple[tuple[str, tuple[int, ...]], ...]) -> ClusterState:
    state = ClusterState(TOPO)
    for i, (name, used) in enumerate(busy):
        n = TOPO.node_index[name]
        gpus = list(TOPO.gpu_range(n))
        slots = tuple(WorkerSlot(n, (gpus[k],), milli) for k, milli in enumerate(used) if milli)
        state.allocate(Placement(f"busy/{i}", slots))
    return state


@dataclass(frozen=True)
class PlaceCase:
    job: JobSpec
    seen: tuple[tuple[Shape, int], ...]
    busy: tuple[tuple[str, tuple[int, ...]], ...] = ()
    node: str = ""
    gpu_free_before: int = MILLI_PER_GPU


PLACE = {
    "with 8-GPU work common, a 1-GPU job takes a small node, keeping big ones whole": PlaceCase(
        JobSpec("j", gpus_per_worker=1),
        (((8, MILLI_PER_GPU, None, 0, 0), 5), ((1, MILLI_PER_GPU, None, 0, 0), 5)),
        node="small-0"),
    "without a workload to protect, the tightest node wins (BestFit)": PlaceCase(
        JobSpec("j", gpus_per_worker=1), (), busy=(("big-1", (1000,) * 7),), node="big-1"),
    "a share goes where its leftover still fits the typical share, not the tightest GPU":
        PlaceCase(JobSpec("j", gpu_milli=200), (((1, 300, None, 0, 0), 10),),
                  busy=(("small-0", (600, 0)), ("small-1", (500, 0))),
                  node="small-1", gpu_free_before=500),
    "equal scores go to the tightest GPU": PlaceCase(
        JobSpec("j", gpu_milli=200), (((1, 200, None, 0, 0), 10),),
        busy=(("small-0", (600, 0)), ("small-1", (800, 0))),
        node="small-1", gpu_free_before=200),
}


@pytest.mark.parametrize("case", PLACE.values(), ids=PLACE.keys())
def test_one_node_work_goes_where_it_fragments_least(case: PlaceCase) -> None:
    mix = WorkloadMix()
    for i, (shape, count) in enumerate(case.seen):
        for k in range(count):
            mix.observe(f"seen-{i}-{k}", shape)
    state = state_with(case.busy)
    req = PlacementRequest.resolve(case.job, TOPO)
    assert isinstance(req, PlacementRequest)
    got = place_topology_aware(state, req, None, FragmentationScorer(mix))
    assert isinstance(got, Placement), got
    assert [TOPO.nodes[n].name for n in got.nodes] == [case.node]
    assert state.gpu_free_milli(got.slots[0].gpus[0]) == case.gpu_free_before
    state.allocate(got)
    state.check_consistency()


def test_without_the_score_the_same_share_takes_the_tightest_gpu() -> None:
    """The contrast for the case above: plain BestFit strands 200 milli-GPU on small-0."""
    state = state_with((("small-0", (600, 0)), ("small-1", (500, 0))))
    req = PlacementRequest.resolve(JobSpec("j", gpu_milli=200), TOPO)
    assert isinstance(req, PlacementRequest)
    got = place_topology_aware(state, req)
    assert isinstance(got, Placement)
    assert [TOPO.nodes[n].name for n in got.nodes] == ["small-0"]


# ---------------------------------------------------------------- scarce GPU models
#
# Two models: "common" (2 nodes x 8 GPUs) and "scarce" (1 node x 2 GPUs), one rack each.


def two_model_topology() -> Topology:
    nodes = [NodeInfo(f"common-{i}", 8, "A-common", ((BLOCK_LABEL, "b0"), (RACK_LABEL, "c")))
             for i in range(2)]
    nodes.append(NodeInfo("scarce-0", 2, "B-scarce", ((BLOCK_LABEL, "b0"), (RACK_LABEL, "s"))))
    return Topology.build(nodes)


TWO = two_model_topology()
COMMON, SCARCE = TWO.models.index("A-common"), TWO.models.index("B-scarce")


def scarce_mix(scarce_only: int, unrestricted: int, common_only: int = 0) -> WorkloadMix:
    mix = WorkloadMix()
    for i in range(scarce_only):
        mix.observe(f"only-scarce-{i}", (1, MILLI_PER_GPU, frozenset({SCARCE}), 0, 0))
    for i in range(common_only):
        mix.observe(f"only-common-{i}", (1, MILLI_PER_GPU, frozenset({COMMON}), 0, 0))
    for i in range(unrestricted):
        mix.observe(f"any-{i}", (1, MILLI_PER_GPU, None, 0, 0))
    return mix


def test_topology_counts_gpus_per_model() -> None:
    assert TWO.model_gpus[COMMON] == 16 and TWO.model_gpus[SCARCE] == 2


def test_scarcity_is_restricted_demand_share_over_capacity_share() -> None:
    scorer = FragmentationScorer(scarce_mix(scarce_only=3, unrestricted=5, common_only=2))
    scorer.bind(TWO.kinds)
    s = scorer.scarcity()  # per node kind; here one kind per model
    scarce = TWO.node_kind[TWO.node_index["scarce-0"]]
    common = TWO.node_kind[TWO.node_index["common-0"]]
    # Work restricted to "scarce" is 30 % of demand on 2/18 of the GPUs, to "common" 20 %
    # on 16/18.
    assert s[scarce] == pytest.approx(0.3 / (2 / 18))
    assert s[common] == pytest.approx(0.2 / (16 / 18))


def test_no_restricted_demand_means_no_scarcity() -> None:
    scorer = FragmentationScorer(scarce_mix(scarce_only=0, unrestricted=10))
    scorer.bind(TWO.kinds)
    assert scorer.scarcity() == (0.0, 0.0)


def _place_any(mix: WorkloadMix, job: JobSpec) -> str:
    state = ClusterState(TWO)
    n = TWO.node_index["common-1"]
    state.allocate(Placement("busy", (WorkerSlot(n, tuple(TWO.gpu_range(n))[:4], MILLI_PER_GPU),)))
    req = PlacementRequest.resolve(job, TWO)
    assert isinstance(req, PlacementRequest)
    got = place_topology_aware(state, req, None, FragmentationScorer(mix))
    assert isinstance(got, Placement), got
    return TWO.nodes[got.nodes[0]].name


def test_unrestricted_work_keeps_off_a_model_that_restricted_work_needs() -> None:
    # FGD alone cannot tell the nodes apart when as much work is restricted to each model
    # (each node is useless to the same share of tasks), so the tightest node wins: the
    # small node of the scarce model. Scarcity sends the job to the common model instead.
    balanced = scarce_mix(scarce_only=1, unrestricted=8, common_only=1)
    assert _place_any(balanced, JobSpec("j", gpus_per_worker=1)) == "common-1"
    assert _place_any(balanced, JobSpec("j", gpu_milli=250)) == "common-1"
    # Without restricted work there is nothing to protect: the tightest node, BestFit.
    assert _place_any(scarce_mix(0, 10), JobSpec("j", gpus_per_worker=1)) == "scarce-0"


def test_restricted_work_still_goes_to_its_model() -> None:
    job = JobSpec("j", gpus_per_worker=1, gpu_models=("B-scarce",))
    assert _place_any(scarce_mix(3, 7), job) == "scarce-0"
