"""Book-keeping the benchmarks rely on: node classes and O(1) free counts in the usage
snapshot, the control plane's queued/running sets, allocation as requested GPUs, the fill
experiment's definitions and FGD's submission order, power-capped jobs running capped.

Factory for the simulations (one block, two racks of two 8-GPU nodes):

      rack r0: n00 n01        rack r1: n00 n01
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from aifactory.controller.core.spec import JobSpec, PowerBudgetSpec
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.placement.registry import make_policy
from aifactory.controller.power.estimates import power_cap_options
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import speed_under_cap
from aifactory.controller.runtime.controlplane import build_state
from aifactory.controller.sim.fill import fgd_order, fill
from aifactory.controller.sim.simulation import Simulation
from tests.factories import grid, grid_nodes

TOPO = grid(1, 2, 2)
FACTORY = factory_from_nodes("t", grid_nodes(1, 2, 2))


def test_node_classes_and_free_counts_follow_allocations_and_clones() -> None:
    state = ClusterState(TOPO)
    assert list(state.class_nodes.values()) == [set(range(4))]
    n = TOPO.node_index["n-b0-r0-00"]
    g = list(TOPO.gpu_range(n))
    twin = state.clone()
    state.allocate(Placement("a", (WorkerSlot(n, (g[0],), 300), WorkerSlot(n, (g[1],)))))
    model = TOPO.node_model[n]
    assert state.node_class[n] == (model, (1000,) * 6 + (700, 0), -1, -1, 0)
    assert state.free_at(1, TOPO.node_domain[1][n]) == 14 == state.free_gpus(
        TOPO.domains[1][TOPO.node_domain[1][n]])
    # The clone shared the classes copy-on-write: it still sees four empty nodes.
    assert list(twin.class_nodes.values()) == [set(range(4))]
    assert twin.free_gpus(TOPO.root) == 32 and state.free_gpus(TOPO.root) == 30
    state.release("a")
    state.check_consistency()
    twin.check_consistency()
    assert state.node_class[n] == (model, (1000,) * 8, -1, -1, 0)


def test_the_control_plane_keeps_its_queued_and_running_sets() -> None:
    sim = Simulation(FACTORY, "aifactory")
    sim.submit_at(JobSpec("a", workers=2, gpus_per_worker=8), 0.0, 100.0)
    sim.submit_at(JobSpec("b", workers=2, gpus_per_worker=8), 0.0, 50.0)
    sim.submit_at(JobSpec("c", workers=2, gpus_per_worker=8), 0.0, 10.0)
    sim.submit_at(JobSpec("gone", gpus_per_worker=8), 0.0, 10.0)
    sim.run(until=0.0)
    assert {r.spec.name for r in sim.running()} == {"a", "b"}
    assert [q.spec.name for q in sim.pending()] == ["c", "gone"]
    assert sim.queue_usage() == {"default": 32.0}
    sim.cancel("default/gone")
    assert [q.spec.name for q in sim.pending()] == ["c"]
    sim.run(until=60.0)  # b ends at 50, c starts and ends at 60
    assert {r.spec.name for r in sim.running()} == {"a"}
    assert sim.pending() == [] and sim.queue_usage() == {"default": 16.0}
    result = sim.run()
    assert result.jobs_completed == 3
    assert sim.running() == [] and sim.queue_usage() == {"default": 0.0}


def test_allocation_counts_requested_gpus_even_where_a_policy_gives_a_whole_gpu() -> None:
    for policy in ("aifactory", "kueue-bestfit"):
        sim = Simulation(FACTORY, policy)
        sim.submit_at(JobSpec("half", gpu_milli=500), 0.0, 100.0)
        result = sim.run(until=100.0)
        assert result.gpu_allocation_rate_mean == pytest.approx(0.5 / 32)
        out = fill(build_state(FACTORY, TOPO), [JobSpec("half", gpu_milli=500)],
                   make_policy(policy), checkpoints=())
        assert out.final_allocation_rate == pytest.approx(0.5 / 32)


def test_fill_reads_each_checkpoint_when_arrived_demand_first_reaches_it() -> None:
    jobs = [JobSpec(f"j{i}", gpus_per_worker=8) for i in range(4)]
    jobs.insert(2, JobSpec("too-big", workers=3, gpus_per_worker=8, required_level="rack"))
    out = fill(build_state(FACTORY, TOPO), jobs, make_policy("aifactory"),
               checkpoints=(0.5, 1.0), stop_at_demand=2.0)
    # Demand after each job: 8, 16 (50 %), 40, 48, 56; "too-big" never fits a rack.
    assert [(p.demand_fraction, p.allocation_rate, p.jobs_failed) for p in out.points] == [
        (0.5, 0.5, 0), (1.0, 0.5, 1)]
    assert out.unallocated_gpus_at_first_failure == 16
    assert out.jobs_placed == 4 and out.final_allocation_rate == 1.0


def test_fgd_order_is_seeded_and_resamples_to_the_ratio() -> None:
    pods = [JobSpec(f"p{i:02d}", gpu_milli=250 * (1 + i % 4)) for i in range(20)]
    one, again, other = (fgd_order(pods, 10.0, s, 1.3) for s in (1, 1, 2))
    assert [p.name for p in one] == [p.name for p in again]
    assert [p.name for p in one] != [p.name for p in other]
    demand = sum(p.gpu_equivalents for p in one)
    assert 13.0 - 1.0 < demand <= 13.0
    assert sum(1 for p in one if "-tuned-" in p.name) == len(one) - 20


def test_power_capped_jobs_run_under_the_cap_and_slower() -> None:
    """A 16 kW budget holds one 16-GPU gang at full draw; capped, a second one starts."""
    profile = profile_for("H200")
    idle = 32 * profile.idle_power_watts()
    per_gpu = profile.power_watts(1.0) - profile.idle_power_watts()
    budget = idle + 16 * per_gpu + 16 * 0.6 * per_gpu
    factory = replace(FACTORY, power_budgets=(PowerBudgetSpec("factory", budget),))
    sim = Simulation(factory, "aifactory", power_capping_min_speed=0.8)
    sim.submit_at(JobSpec("first", workers=2, gpus_per_worker=8), 0.0, 1000.0)
    sim.submit_at(JobSpec("second", workers=2, gpus_per_worker=8), 0.0, 1000.0)
    result = sim.run()
    first, second = sim.jobs["default/first"], sim.jobs["default/second"]
    assert first.first_start == second.first_start == 0.0
    ((cap, _),) = power_cap_options(sim.topo, 0.8)(second.spec)
    assert speed_under_cap(profile, 0.93, cap) == pytest.approx(0.8, abs=1e-3)
    assert result.power_budget_exceeded_seconds == 0.0
    assert result.simulated_seconds == pytest.approx(1000.0 / 0.8, rel=1e-3)
