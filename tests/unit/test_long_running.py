"""A control plane that runs for months: requeued work resumes, memory stays bounded.

The factory (32 GPUs), driven in real-time style (``poll``/``cycle`` via a
``Reconciler``, as the operator does) on a clock the tests move::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01      (8 GPUs each)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from aifactory.controller.backends.base import WorkloadPhase
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.spec import JobSpec, PowerBudgetSpec
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase
from aifactory.controller.runtime.measurements import SimMetrics, percentile
from aifactory.controller.runtime.reservoir import Reservoir
from aifactory.controller.runtime.resync import Reconciler
from tests.factories import grid_nodes

NODES = grid_nodes(1, 2, 2)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _plane() -> tuple[ControlPlane, SimulatedBackend, Clock]:
    clock = Clock()
    factory = replace(factory_from_nodes("t", NODES), queues=())  # no quotas
    topo = factory.topology()
    backend = SimulatedBackend(topo.nodes, clock)
    return ControlPlane(factory, backend, clock=clock, topology=topo), backend, clock


@dataclass(frozen=True)
class Interruption:
    id: str
    how: str  # "node failure" or "preemption"
    at: float  # seconds of work done when it happens
    saved: float  # seconds of work the last checkpoint holds then


INTERRUPTIONS = [
    Interruption("a node failure resumes from the last checkpoint", "node failure", 250.0,
                 200.0),
    Interruption("a preempted job resumes from its last checkpoint", "preemption", 130.0,
                 100.0),
]


@pytest.mark.parametrize("case", INTERRUPTIONS, ids=lambda c: c.id)
def test_a_requeued_job_resumes_from_its_checkpoint(case: Interruption) -> None:
    cp, backend, clock = _plane()
    loop = Reconciler(cp, backend)
    job = JobSpec("train", workers=2, gpus_per_worker=8, expected_runtime_seconds=1000,
                  checkpoint_interval_seconds=100, restart_limit=3, priority=0)
    cp.submit(job)
    loop.step()
    first = cp.jobs[job.key].placement
    assert first is not None
    clock.t += case.at
    if case.how == "node failure":
        backend.fail_node(cp.topo.nodes[first.slots[0].node].name)
        loop.step()  # the gang fails, is requeued, and relaunches on the 16 GPUs left
    else:
        cp.submit(JobSpec("urgent", workers=4, gpus_per_worker=8, priority=10,
                          expected_runtime_seconds=50))
        loop.step()  # preempts train
        assert cp.jobs[job.key].placement is None
        clock.t += 50
        loop.step()  # urgent is done; train comes back
    rec = cp.jobs[job.key]
    assert rec.phase == JobPhase.RUNNING and rec.work_saved == case.saved
    status = backend.status(job.key)
    assert status is not None and status.progress == pytest.approx(case.saved / 1000)
    clock.t += 1000 - case.saved - 1
    loop.step()
    assert cp.jobs[job.key].phase == JobPhase.RUNNING  # not a second early
    clock.t += 1
    loop.step()
    assert cp.jobs[job.key].phase == JobPhase.SUCCEEDED


def test_forget_drops_a_finished_job_everywhere_but_keeps_live_ones() -> None:
    cp, backend, clock = _plane()
    done = JobSpec("done", workers=1, gpus_per_worker=8, expected_runtime_seconds=10)
    live = JobSpec("live", workers=1, gpus_per_worker=8, expected_runtime_seconds=1000)
    cp.submit(done)
    cp.submit(live)
    cp.step()
    clock.t += 20
    cp.step()
    assert cp.jobs[done.key].phase == JobPhase.SUCCEEDED
    assert backend.status(done.key) is not None and done.key in cp.metrics.job_gpu_seconds
    assert not cp.forget(live.key) and live.key in cp.jobs  # running: cancel it instead
    assert cp.forget(done.key)
    assert done.key not in cp.jobs and backend.status(done.key) is None
    assert done.key not in cp.metrics.job_gpu_seconds
    assert not cp.forget(done.key)  # idempotent
    cp.cancel(live.key)
    assert not cp.jobs and backend.status(live.key) is None
    assert cp.state.allocated_gpu_equivalents == 0
    assert cp.metrics.completed == 1  # counters are totals: forgetting keeps them


def test_cancel_makes_the_backend_forget_a_finished_run() -> None:
    cp, backend, clock = _plane()
    job = JobSpec("short", workers=1, gpus_per_worker=1, expected_runtime_seconds=5)
    cp.submit(job)
    cp.step()
    clock.t += 10
    cp.step()
    status = backend.status(job.key)
    assert status is not None and status.phase is WorkloadPhase.SUCCEEDED
    cp.cancel(job.key)
    assert backend.status(job.key) is None


def test_a_reservoir_is_exact_below_capacity_and_bounded_above() -> None:
    small = Reservoir(capacity=1000)
    values = [float((i * 7919) % 1000) for i in range(1000)]
    small.extend(values)
    assert list(small) == values and not small.sampled
    assert small.mean == sum(values) / len(values)
    assert percentile(small, 95) == percentile(values, 95)

    big = Reservoir(capacity=1000, seed=3)
    stream = [float(i % 10_000) for i in range(50_000)]  # uniform over 0..9999
    big.extend(stream)
    assert len(big) == 50_000 and len(list(big)) == 1000 and big.sampled
    assert big.mean == pytest.approx(sum(stream) / len(stream))
    assert percentile(big, 50) == pytest.approx(5000, abs=500)  # a sample's median
    again = Reservoir(capacity=1000, seed=3)
    again.extend(stream)
    assert list(again) == list(big)  # seeded: the same stream keeps the same sample
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        Reservoir(capacity=0)


def test_scheduler_metrics_stay_bounded_however_many_decisions() -> None:
    cp, _, _ = _plane()
    metrics: SimMetrics = cp.metrics
    metrics.decisions([0.001] * 150_000)
    assert len(metrics.decision_times) == 150_000
    assert len(list(metrics.decision_times)) == metrics.decision_times.capacity < 150_000
    assert percentile(metrics.decision_times, 99) == 0.001


def test_the_exporter_forgets_a_forgotten_job_and_a_new_one_of_that_name_starts_at_zero(
        ) -> None:
    from aifactory.controller.observe.snapshot import PlaneObserver

    cp, _, clock = _plane()
    observer = PlaneObserver(cp)
    job = JobSpec("again", workers=1, gpus_per_worker=8, expected_runtime_seconds=100)
    cp.submit(job)
    cp.step()
    clock.t += 200
    cp.step()
    (first,) = [j for j in observer.snapshot().jobs if j.name == "again"]
    assert first.phase == JobPhase.SUCCEEDED and first.energy_joules > 0
    assert cp.forget(job.key)
    assert not observer.snapshot().jobs
    cp.submit(job)  # deleted and created again under the same name
    (second,) = observer.snapshot().jobs
    assert second.phase == JobPhase.QUEUED and second.energy_joules == 0


def test_power_budgets_added_while_jobs_run_keep_the_books_in_step() -> None:
    """A PowerBudget created while the operator runs (reconfigure) used to leave the peak
    ratios one budget short: the next admission raised IndexError and the engine stalled."""
    cp = _plane()[0]
    cp.submit(JobSpec("before", gpus_per_worker=8))
    cp.step()
    cp.reconfigure(power_budgets=(PowerBudgetSpec("all", 100_000.0, ()),
                                  PowerBudgetSpec("also", 200_000.0, ())))
    cp.submit(JobSpec("after", gpus_per_worker=8))
    cp.step()
    assert cp.jobs["default/after"].placement is not None
    assert len(cp.metrics.budget_peak_ratio) == len(cp.state.budgets.limits) == 2
