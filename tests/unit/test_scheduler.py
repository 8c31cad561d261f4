"""The scheduling cycle on a small factory:

            factory (32 GPUs)
            /              \\
      rack r0              rack r1          (one block b0)
      n00 n01              n00 n01          (8 GPUs each)
"""

from __future__ import annotations

from functools import partial

import pytest

from aifactory.controller.core.spec import JobSpec, QueueSpec
from aifactory.controller.core.state import ClusterState
from aifactory.controller.scheduling.cycle import schedule
from aifactory.controller.scheduling.cycle_io import (
    CycleResult,
    QueuedJob,
    RunningJob,
)
from tests.factories import grid, running_job, scheduler_config

TOPO = grid(1, 2, 2)
config = partial(scheduler_config, TOPO)  # our policy on TOPO, no power estimate
run = running_job


def queued(*specs: JobSpec) -> list[QueuedJob]:
    return [QueuedJob(s, float(i), i) for i, s in enumerate(specs)]


def admitted(result: CycleResult) -> list[str]:
    return [a.job for a in result.admitted]


def test_priority_then_submission_order() -> None:
    state = ClusterState(TOPO)
    jobs = queued(JobSpec("low", workers=2, gpus_per_worker=8, priority=1),
                  JobSpec("high", workers=2, gpus_per_worker=8, priority=9),
                  JobSpec("late-high", workers=2, gpus_per_worker=8, priority=9))
    result = schedule(state, jobs, [], 0.0, config(backfill=False))
    assert admitted(result) == ["default/high", "default/late-high"]
    assert result.waiting["default/low"] == ("gang of 16 GPUs (2 x 8) waits: 0 GPUs free in "
                                             "the factory, needs 16")
    assert state.free_whole_gpus == 32  # the input snapshot is never mutated


def test_backfill_never_delays_the_head_job() -> None:
    state = ClusterState(TOPO)
    long = run(state, JobSpec("long", gpus_per_worker=8, expected_runtime_seconds=10_000),
               "n-b0-r0-00", 8)
    short = run(state, JobSpec("short", gpus_per_worker=8, expected_runtime_seconds=100),
                "n-b0-r1-00", 8)
    jobs = queued(
        JobSpec("head", workers=3, gpus_per_worker=8, priority=5),
        JobSpec("quick", gpus_per_worker=8, expected_runtime_seconds=50),
        JobSpec("slow", gpus_per_worker=8, expected_runtime_seconds=5_000),
        JobSpec("unknown", gpus_per_worker=8))
    result = schedule(state, jobs, [long, short], 0.0, config(preemption=False))
    # The head starts when "short" ends (t=100) on the rack-r1 nodes plus one more. "quick"
    # ends before that and may run anywhere; "slow" and "unknown" would sit on the head's nodes.
    assert "default/quick" in admitted(result)
    assert "default/slow" not in admitted(result)
    assert "waits behind higher-priority default/head" in result.waiting["default/slow"]
    assert result.waiting_kind["default/slow"] == "backfill"


def test_preemption_picks_the_victims_that_lose_least_work() -> None:
    state = ClusterState(TOPO)
    now = 1000.0
    fresh = run(state, JobSpec("fresh-ckpt", gpus_per_worker=8, priority=1), "n-b0-r0-00", 8,
                started=0.0, checkpoint=990.0)
    stale = run(state, JobSpec("stale-ckpt", gpus_per_worker=8, priority=1), "n-b0-r0-01", 8,
                started=0.0, checkpoint=100.0)
    other = run(state, JobSpec("other", workers=1, gpus_per_worker=8, priority=1),
                "n-b0-r1-00", 8, started=0.0, checkpoint=500.0)
    vip = run(state, JobSpec("vip", gpus_per_worker=8, priority=9), "n-b0-r1-01", 8)
    result = schedule(state, queued(JobSpec("urgent", gpus_per_worker=8, priority=5)),
                      [fresh, stale, other, vip], now, config())
    assert admitted(result) == ["default/urgent"]
    assert [p.victim for p in result.preempted] == ["default/fresh-ckpt"]
    assert result.preempted[0].lost_gpu_seconds == pytest.approx(80.0)
    assert "has higher priority (5 > 1)" in result.preempted[0].reason


def test_rack_required_preemption_frees_one_whole_rack() -> None:
    state = ClusterState(TOPO)
    a = run(state, JobSpec("a", gpus_per_worker=8, priority=0), "n-b0-r0-00", 8,
            checkpoint=0.0)
    b = run(state, JobSpec("b", gpus_per_worker=4, priority=0), "n-b0-r1-00", 4,
            checkpoint=0.0)
    c = run(state, JobSpec("c", gpus_per_worker=4, priority=0), "n-b0-r1-01", 4,
            checkpoint=0.0)
    result = schedule(state, queued(JobSpec("gang", workers=2, gpus_per_worker=8,
                                            required_level="rack", priority=3)),
                      [a, b, c], 100.0, config())
    victims = sorted(p.victim for p in result.preempted)
    # Rack r1 holds 8 GPUs of victims (cost 800 GPU-s) against 8 in rack r0: both cost 800;
    # either way the gang ends up inside one rack.
    assert admitted(result) == ["default/gang"]
    placement = result.admitted[0].placement
    assert len(placement.domains_at(TOPO, 1)) == 1
    assert victims in (["default/a"], ["default/b", "default/c"])


QUEUES = (QueueSpec("research", 16, cohort="lab"), QueueSpec("prod", 16, cohort="lab"),
          QueueSpec("solo", 8))


def test_borrowing_idle_quota_from_the_cohort() -> None:
    state = ClusterState(TOPO)
    jobs = queued(JobSpec("big", workers=3, gpus_per_worker=8, queue="research"))
    result = schedule(state, jobs, [], 0.0, config(queues=QUEUES))
    assert admitted(result) == ["default/big"]
    assert result.admitted[0].borrowing


def test_quota_without_cohort_waits_with_reason() -> None:
    state = ClusterState(TOPO)
    jobs = queued(JobSpec("a", gpus_per_worker=8, queue="solo"),
                  JobSpec("b", gpus_per_worker=4, queue="solo"),
                  JobSpec("c", gpus_per_worker=4, queue="nope"))
    result = schedule(state, jobs, [], 0.0, config(queues=QUEUES))
    assert admitted(result) == ["default/a"]
    assert result.waiting["default/b"] == ("queue solo is at its quota: 8 of 8 GPUs in use, "
                                           "the job needs 4")
    assert result.waiting["default/c"] == ("queue 'nope' does not exist; known queues: prod, "
                                           "research, solo")


def test_owner_reclaims_borrowed_quota_by_preemption() -> None:
    state = ClusterState(TOPO)
    borrowed = [run(state, JobSpec(f"r{i}", gpus_per_worker=8, queue="research", priority=9),
                    node, 8) for i, node in enumerate(("n-b0-r0-00", "n-b0-r0-01",
                                                       "n-b0-r1-00", "n-b0-r1-01"))]
    result = schedule(state, queued(JobSpec("p", gpus_per_worker=8, queue="prod")),
                      borrowed, 10.0, config(queues=QUEUES))
    assert admitted(result) == ["default/p"]
    assert len(result.preempted) == 1
    assert "reclaims its queue's nominal quota" in result.preempted[0].reason


def test_a_job_that_can_never_fit_fails_with_reason() -> None:
    state = ClusterState(TOPO)
    result = schedule(state, queued(JobSpec("huge", workers=5, gpus_per_worker=8)), [], 0.0,
                      config())
    assert result.failed["default/huge"] == ("gang of 40 GPUs (5 x 8) exceeds the factory: "
                                             "32 GPUs in total")


@pytest.mark.parametrize(
    ("min_domains", "expected"),
    [pytest.param(2, [0, 0, 1, 1], id="two racks, packed within the bound of 2 per rack"),
     pytest.param(4, [0, 1, 0, 1], id="more domains asked than exist: least loaded first")])
def test_inference_replicas_spread_across_racks(min_domains: int, expected: list[int]) -> None:
    state = ClusterState(TOPO)
    specs = [JobSpec(f"svc-r{i}", gpus_per_worker=2, spread_level="rack", group="svc",
                     group_size=4, spread_min_domains=min_domains, priority=1)
             for i in range(4)]
    running: list[RunningJob] = []
    racks = []
    for i, spec in enumerate(specs):
        result = schedule(state, [QueuedJob(spec, float(i), i)], running, float(i), config())
        adm = result.admitted[0]
        state.allocate(adm.placement)
        running.append(RunningJob(spec, adm.placement, 0.0, 0.0))
        racks.append(adm.placement.domains_at(TOPO, 1)[0])
    assert racks == expected
