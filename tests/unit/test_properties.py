"""Invariants that must hold whatever the workload, checked with hypothesis:

- no GPU is given twice (fractions on one GPU never add up to more than one);
- a gang is all or nothing;
- a required topology level is never crossed;
- admitted power estimates never exceed any budget (power-capped admission included);
- usage counted per domain sums up the tree to the root, and matches the allocations.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import BudgetIndex, ClusterState
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.explain import static_check
from aifactory.controller.placement.registry import POLICY_NAMES, make_policy
from aifactory.controller.placement.request import PlacementRequest
from aifactory.controller.scheduling.cycle_io import RunningJob, SchedulerConfig
from tests.factories import grid, run_cycle

jobs = st.builds(
    lambda w, g, milli, req, prio: JobSpec(
        "x", workers=w if milli == MILLI_PER_GPU else 1,
        gpus_per_worker=g if milli == MILLI_PER_GPU else 1,
        gpu_milli=milli, required_level=req, priority=prio),
    st.integers(1, 6), st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([MILLI_PER_GPU, MILLI_PER_GPU, MILLI_PER_GPU, 250, 500, 700]),
    st.sampled_from([None, None, "rack", "block"]), st.integers(0, 3))

WATTS = 400.0


def check_tree(state: ClusterState) -> None:
    state.check_consistency()
    topo = state.topo
    for level in range(topo.node_level):
        total = sum(state.free_gpus(d) for d in topo.domains[level])
        assert total == state.free_gpus(topo.root) == sum(state.node_free)
    for g, used in enumerate(state.gpu_used_milli):
        assert 0 <= used <= MILLI_PER_GPU, f"GPU {g} used {used}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(jobs, st.booleans()), min_size=1, max_size=25),
       st.sampled_from(POLICY_NAMES), st.integers(2, 3), st.booleans())
def test_invariants_hold_under_any_workload(steps: list[tuple[JobSpec, bool]], policy: str,
                                            nodes_per_rack: int, capping: bool) -> None:
    topo = grid(2, 2, nodes_per_rack)
    idle = [80.0]
    limit = topo.total_gpus * 80.0 + 0.5 * topo.total_gpus * WATTS
    rack_limit = topo.domains[1][0].gpus * 80.0 + 0.75 * topo.domains[1][0].gpus * WATTS
    budgets = BudgetIndex.build(topo, [("factory", limit, {}),
                                       ("rack", rack_limit, {"aifactory.io/rack": "b0-r0"})],
                                idle)
    state = ClusterState(topo, budgets)
    the_policy = make_policy(policy, seed=1)
    # With power-capped admission a job blocked on power may start at a quarter of WATTS.
    config = SchedulerConfig(policy=the_policy, empty=ClusterState(topo, budgets),
                             watts_per_gpu=lambda spec: WATTS,
                             power_caps=(lambda spec: ((200.0, WATTS / 4),)) if capping
                             else None)
    running: dict[str, RunningJob] = {}
    for i, (job, finish_one) in enumerate(steps):
        spec = JobSpec(f"j{i}", workers=job.workers, gpus_per_worker=job.gpus_per_worker,
                       gpu_milli=job.gpu_milli, required_level=job.required_level,
                       priority=job.priority)
        result = run_cycle(state, spec, running, float(i), config)
        for adm in result.admitted:
            placement = adm.placement
            # All or nothing: every worker, with the GPUs it asked for (per-pod, the
            # kube-scheduler baseline, binds workers one by one but is only admitted whole).
            assert len(placement.slots) == spec.workers
            assert all(len(s.gpus) == spec.gpus_per_worker for s in placement.slots)
            if spec.required_level is not None and the_policy.gang:
                level = topo.level_names.index(spec.required_level)
                assert len(placement.domains_at(topo, level)) == 1
        check_tree(state)
        if the_policy.power_aware:
            for b in range(len(budgets.names)):
                assert state.budget_watts[b] <= budgets.limits[b] + 1e-6
        if finish_one and running:
            key = sorted(running)[0]
            state.release(key)
            del running[key]
            check_tree(state)


@settings(max_examples=40, deadline=None)
@given(jobs)
def test_a_gang_that_fits_the_empty_factory_is_placed_there(job: JobSpec) -> None:
    topo = grid(2, 2, 2)
    empty = ClusterState(topo)
    req = PlacementRequest.resolve(job, topo)
    assert isinstance(req, PlacementRequest)
    never = static_check(empty, req)
    got = make_policy("aifactory").place(empty, req)
    assert (never is None) == (not hasattr(got, "reason"))
