"""The simulated factory end to end on a virtual clock: runs, failures, power, energy."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from aifactory.controller.cli.main import main
from aifactory.controller.core.spec import JobSpec, PowerBudgetSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import Topology
from aifactory.controller.inputs.factory import load_factory
from aifactory.controller.inputs.workload import Arrival
from aifactory.controller.placement.registry import make_policy
from aifactory.controller.power.model import profile_for
from aifactory.controller.runtime.controlplane import build_state
from aifactory.controller.sim.fill import fill
from aifactory.controller.sim.simulation import FailureEvent, Simulation

REPO = Path(__file__).resolve().parents[2]


def small() -> Simulation:
    return Simulation(replace(load_factory("small"), power_budgets=()), "aifactory")


def test_jobs_run_to_completion_and_free_their_gpus() -> None:
    sim = small()
    sim.submit_all([Arrival(JobSpec("a", workers=4, gpus_per_worker=8,
                                    expected_runtime_seconds=100), 0.0, 100.0),
                    Arrival(JobSpec("b", workers=1, gpus_per_worker=2), 10.0, 50.0)])
    result = sim.run()
    assert result.jobs_completed == 2
    assert sim.jobs["default/a"].history[-1] == "100s succeeded"
    assert sim.jobs["default/b"].history[-1] == "60s succeeded"
    assert sim.state.free_whole_gpus == 256
    sim.state.check_consistency()


def test_node_failure_restarts_the_gang_from_its_last_checkpoint() -> None:
    sim = small()
    spec = JobSpec("ckpt", workers=2, gpus_per_worker=8, checkpoint_interval_seconds=100,
                   restart_limit=2)
    sim.submit_all([Arrival(spec, 0.0, 1000.0)])
    placements: list[Placement] = []
    sim.listeners.append(lambda reason, rec, msg: placements.append(rec.placement)
                         if reason == "Admitted" and rec.placement is not None else None)
    sim.run(until=1.0)
    victim_node = sim.topo.nodes[placements[0].slots[0].node].name
    sim.inject(FailureEvent(at=250.0, node=victim_node, repair_after_seconds=10_000))
    result = sim.run()
    rec = sim.jobs["default/ckpt"]
    assert rec.restarts == 1 and result.restarts == 1
    assert rec.done and rec.failed_reason is None
    # Checkpoint at 200 s of work: 800 s remain after the restart at 250 s -> ends at 1050 s.
    assert rec.history[-1] == "1050s succeeded"
    assert len(placements) == 2
    assert all(sim.topo.nodes[n].name != victim_node for n in placements[1].nodes)
    assert any("requeued" in h and victim_node in h for h in rec.history)


def test_a_job_without_checkpoints_loses_all_work_and_respects_the_restart_limit() -> None:
    sim = small()
    spec = JobSpec("fragile", workers=1, gpus_per_worker=8, restart_limit=0)
    sim.submit_all([Arrival(spec, 0.0, 1000.0)])
    sim.run(until=1.0)
    placement = sim.jobs["default/fragile"].placement
    assert placement is not None
    node = sim.topo.nodes[placement.slots[0].node].name
    sim.inject(FailureEvent(at=500.0, node=node, gpu=3))
    result = sim.run()
    rec = sim.jobs["default/fragile"]
    assert rec.failed_reason == f"{node} failed; restart limit 0 reached"
    assert result.jobs_failed == 1


def test_power_budget_is_never_exceeded_by_our_policy_but_is_by_a_baseline() -> None:
    base = load_factory("small")
    topo = Topology.build(base.nodes, base.levels)
    idle = 79.1 * topo.total_gpus
    budget = idle + 0.5 * topo.total_gpus * (691.0 - 79.1)
    factory = replace(base, power_budgets=(PowerBudgetSpec("factory", budget),))
    jobs = [Arrival(JobSpec(f"j{i}", workers=4, gpus_per_worker=8,
                            expected_runtime_seconds=600), float(i), 600.0) for i in range(8)]
    exceeded = {}
    for policy in ("aifactory", "first-fit"):
        sim = Simulation(factory, policy)
        sim.submit_all(jobs)
        result = sim.run()
        assert result.jobs_completed == 8
        exceeded[policy] = result.power_budget_exceeded_seconds
    assert exceeded["aifactory"] == 0.0
    assert exceeded["first-fit"] > 0.0


def test_energy_and_cost_follow_the_power_model() -> None:
    sim = small()
    sim.submit_all([Arrival(JobSpec("e", workers=1, gpus_per_worker=8), 0.0, 3600.0)])
    result = sim.run()
    profile = profile_for("H200")
    busy_w = profile.power_watts(0.93)
    idle_w = profile.idle_power_watts()
    assert sim.jobs["default/e"].energy_joules == pytest.approx(8 * 3600 * busy_w, rel=1e-6)
    assert result.energy_joules == pytest.approx((248 * idle_w + 8 * busy_w) * 3600, rel=1e-6)
    kwh = result.energy_joules / 3.6e6
    assert result.cost_dollars == pytest.approx(kwh * 0.10 + 8 * 2.00, rel=1e-6)


def test_fill_mode_reports_the_first_failure() -> None:
    factory = load_factory("small")
    topo = Topology.build(factory.nodes, factory.levels)
    jobs = [JobSpec(f"f{i}", gpus_per_worker=3) for i in range(100)]
    out = fill(build_state(factory, topo), jobs, make_policy("aifactory"))
    # 3-GPU jobs on 8-GPU nodes: two per node, 2 GPUs stranded on each of the 32 nodes.
    assert out.jobs_placed == 64
    assert out.unallocated_gpus_at_first_failure == 64
    assert out.allocation_rate_at_first_failure == pytest.approx(0.75)


def test_cli_simulate_compare_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    out = tmp_path / "r.json"
    code = main(["simulate", "--compare", "aifactory,first-fit,per-pod", "--json", str(out),
                 "--workload", str(REPO / "manifests" / "samples"), "--no-progress"])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert [r["policy"] for r in results] == ["aifactory", "first-fit", "per-pod"]
    for key in ("jobs_submitted", "jobs_completed", "gpus_total", "gpu_allocation_rate_mean",
                "queue_wait_seconds_mean", "queue_wait_seconds_p95",
                "gang_single_rack_fraction", "unplaced_while_capacity_free", "energy_joules",
                "cost_dollars", "decision_seconds_p99"):
        assert key in results[0]
    assert results[0]["jobs_submitted"] == 13
    assert "aifactory simulate (replay)" in capsys.readouterr().out


def test_cli_fill_mode_json_has_first_failure_fields(tmp_path: Path) -> None:
    out = tmp_path / "f.json"
    assert main(["simulate", "--mode", "fill", "--json", str(out), "--no-progress",
                 "--workload", str(REPO / "manifests" / "samples")]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert {"allocation_rate_at_first_failure", "unallocated_gpus_at_first_failure"} <= set(row)


def test_cli_bad_policy_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--policy", "fifo"]) == 2
    assert "unknown policy 'fifo'; valid policies are aifactory, first-fit" in \
        capsys.readouterr().err


def test_cli_says_why_a_job_waited_before_it_ran(capsys: pytest.CaptureFixture[str]) -> None:
    # In the demo a block-required 96-GPU gang waits for a block: the jobs table says so
    # beside where it ran, so a reader need not guess why it started late.
    assert main(["simulate", "--no-progress", "--workload",
                 str(REPO / "manifests" / "samples")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "it waited: block-required gang of 96 GPUs (12 x 8) fits no block" in \
        out.replace("│", "").replace("  ", " ")
