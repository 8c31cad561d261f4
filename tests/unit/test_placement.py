"""Placement of one gang, table-driven, on this factory:

              factory (64 GPUs)
           /                    \\
      block b0                 block b1
      /      \\                 /      \\
  rack b0-r0  rack b0-r1  rack b1-r0  rack b1-r1
  n00 n01     n00 n01     n00 n01     n00 n01      (8 GPUs each)

``busy`` lists (node, GPUs taken) before the job arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import BudgetIndex, ClusterState, Placement, WorkerSlot
from aifactory.controller.placement.explain import static_check
from aifactory.controller.placement.request import PlacementRequest, Unplaced
from aifactory.controller.placement.topology_aware import place_topology_aware
from tests.factories import grid

TOPO = grid(2, 2, 2)


def state_with(busy: tuple[tuple[str, int], ...]) -> ClusterState:
    state = ClusterState(TOPO)
    for i, (name, gpus) in enumerate(busy):
        n = TOPO.node_index[name]
        state.allocate(Placement(f"busy/{i}", (WorkerSlot(n, state.free_gpu_indices(n, gpus)),)))
    return state


@dataclass(frozen=True)
class Case:
    job: JobSpec
    busy: tuple[tuple[str, int], ...] = ()
    nodes: tuple[str, ...] | None = None
    reason: str | None = None


CASES = {
    "a 1-GPU job goes to the tightest node, keeping empty nodes whole": Case(
        JobSpec("j", gpus_per_worker=1),
        busy=(("n-b0-r0-00", 6), ("n-b1-r1-01", 3)),
        nodes=("n-b0-r0-00",)),
    "a 2-worker gang of 4 fits one node and takes a single node": Case(
        JobSpec("j", workers=2, gpus_per_worker=4),
        busy=(("n-b0-r0-00", 8),),
        nodes=("n-b0-r0-01",)),
    "a 16-GPU gang lands inside one rack, the tightest that fits": Case(
        JobSpec("j", workers=2, gpus_per_worker=8),
        busy=(("n-b0-r0-00", 1), ("n-b1-r0-00", 2)),
        nodes=("n-b0-r1-00", "n-b0-r1-01")),
    "a 24-GPU gang takes the tightest block that holds it, whole nodes first": Case(
        JobSpec("j", workers=3, gpus_per_worker=8),
        busy=(("n-b0-r0-00", 8),),
        nodes=("n-b0-r0-01", "n-b0-r1-00", "n-b0-r1-01")),
    "a rack-required gang never crosses a rack": Case(
        JobSpec("j", workers=2, gpus_per_worker=8, required_level="rack"),
        busy=(("n-b0-r0-00", 1), ("n-b0-r1-00", 1), ("n-b1-r0-00", 1), ("n-b1-r1-00", 1)),
        reason="rack-required gang of 16 GPUs (2 x 8) fits no rack: largest free rack has 15 "
               "free GPUs"),
    "a rack-required gang takes the tightest rack that fits": Case(
        JobSpec("j", workers=3, gpus_per_worker=4, required_level="rack"),
        busy=(("n-b0-r0-00", 4), ("n-b1-r1-00", 2)),
        nodes=("n-b0-r0-00", "n-b0-r0-01")),
    "a gang that fits only fragmented capacity says so": Case(
        JobSpec("j", workers=1, gpus_per_worker=8),
        busy=tuple((n.name, 4) for n in TOPO.nodes),
        reason="8-GPU worker waits: 32 GPUs are free but fragmented; room for only 0 "
               "workers of 8 GPUs"),
    "a gang bigger than what is free waits with the numbers": Case(
        JobSpec("j", workers=6, gpus_per_worker=8),
        busy=(("n-b0-r0-00", 8), ("n-b0-r0-01", 8), ("n-b0-r1-00", 8)),
        reason="gang of 48 GPUs (6 x 8) waits: 40 GPUs free in the factory, needs 48"),
    "a fraction of a GPU packs onto an already shared GPU": Case(
        JobSpec("j", gpu_milli=300),
        busy=(),
        nodes=("n-b0-r0-00",)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_place(case: Case) -> None:
    state = state_with(case.busy)
    req = PlacementRequest.resolve(case.job, TOPO)
    assert isinstance(req, PlacementRequest)
    got = place_topology_aware(state, req)
    if case.reason is not None:
        assert isinstance(got, Unplaced)
        assert got.reason == case.reason
        return
    assert isinstance(got, Placement), got
    assert tuple(TOPO.nodes[n].name for n in got.nodes) == case.nodes
    assert got.gpu_count == case.job.workers * case.job.gpus_per_worker
    state.allocate(got)
    state.check_consistency()


def test_fractions_fill_a_shared_gpu_before_opening_another() -> None:
    state = ClusterState(TOPO)
    gpus = []
    for i, milli in enumerate((500, 300, 200, 400)):
        req = PlacementRequest.resolve(JobSpec(f"f{i}", gpu_milli=milli), TOPO)
        assert isinstance(req, PlacementRequest)
        got = place_topology_aware(state, req)
        assert isinstance(got, Placement)
        state.allocate(got)
        gpus.append(got.slots[0].gpus[0])
    assert gpus[0] == gpus[1] == gpus[2]  # 500 + 300 + 200 = one whole GPU
    assert gpus[3] != gpus[0]
    assert state.gpu_free_milli(gpus[0]) == 0


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        pytest.param(JobSpec("j", workers=9, gpus_per_worker=8), "gang of 72 GPUs (9 x 8) "
                     "exceeds the factory: 64 GPUs in total", id="bigger than the factory"),
        pytest.param(JobSpec("j", workers=3, gpus_per_worker=8, required_level="rack"),
                     "rack-required gang of 24 GPUs (3 x 8) fits no rack: the largest rack "
                     "has 16 GPUs", id="bigger than any rack"),
        pytest.param(JobSpec("j", gpus_per_worker=16), "worker of 16 GPUs fits no node: the "
                     "largest node has 8 GPUs", id="worker bigger than any node"),
    ],
)
def test_never_fits(job: JobSpec, reason: str) -> None:
    req = PlacementRequest.resolve(job, TOPO)
    assert isinstance(req, PlacementRequest)
    got = static_check(ClusterState(TOPO), req)
    assert got is not None and got.permanent and got.reason == reason


@pytest.mark.parametrize(
    ("job", "reason"),
    [
        pytest.param(JobSpec("j", required_level="row"), "spec.topology.required: unknown "
                     "topology level 'row'; valid levels are block, rack, node",
                     id="unknown level"),
        pytest.param(JobSpec("j", gpu_models=("B200",)), "spec.gpuModel: no B200 nodes in "
                     "the factory; models present: H200", id="unknown model"),
        pytest.param(JobSpec("j", required_level="rack", preferred_level="block"),
                     "spec.topology.preferred: level 'block' is above the required level "
                     "'rack'; prefer a level at or below the required one",
                     id="preferred above required"),
    ],
)
def test_resolve_refuses_what_can_never_run(job: JobSpec, reason: str) -> None:
    got = PlacementRequest.resolve(job, TOPO)
    assert isinstance(got, Unplaced) and got.permanent and got.reason == reason


def test_power_budget_steers_a_gang_to_another_rack() -> None:
    # Rack b0-r0 may draw at most 1,000 W above idle; a 16-GPU gang needs 16 x 500 W.
    idle = [80.0]
    budgets = BudgetIndex.build(TOPO, [("rack-b0-r0", 16 * 80 + 1000.0,
                                        {"aifactory.io/rack": "b0-r0"})], idle)
    state = ClusterState(TOPO, budgets)
    req = PlacementRequest.resolve(JobSpec("j", workers=2, gpus_per_worker=8), TOPO, 500.0)
    assert isinstance(req, PlacementRequest)
    got = place_topology_aware(state, req)
    assert isinstance(got, Placement)
    assert all(TOPO.ancestor(n, 1) != 0 for n in got.nodes)


def test_factory_power_budget_makes_a_gang_wait_with_the_numbers() -> None:
    idle = [80.0]
    budgets = BudgetIndex.build(TOPO, [("factory", 64 * 80 + 4000.0, {})], idle)
    state = ClusterState(TOPO, budgets)
    req = PlacementRequest.resolve(JobSpec("j", workers=2, gpus_per_worker=8), TOPO, 500.0)
    assert isinstance(req, PlacementRequest)
    got = place_topology_aware(state, req)
    assert isinstance(got, Unplaced) and got.power_limited
    assert got.reason == ("gang of 16 GPUs (2 x 8) waits on power: budget factory (9120 W) "
                          "has 4000 W headroom; the gang needs 8000 W more")
