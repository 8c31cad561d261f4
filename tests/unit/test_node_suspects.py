"""A worker's death is seen before its node's: on Ray an actor's ``ActorDiedError`` arrives
while ``ray.nodes()`` still lists the node alive. The reconciler must neither put the
requeued gang back on that node nor requeue a gang whole that a hot swap can repair.

The factory (32 GPUs), stepped by a ``Reconciler`` on a clock the tests move::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01      (8 GPUs each)
"""

from __future__ import annotations

from dataclasses import replace

from aifactory.controller.backends.base import WorkloadPhase, WorkloadStatus
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.clock import VirtualClock
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase
from aifactory.controller.runtime.resync import Reconciler
from tests.factories import grid_nodes

NODES = grid_nodes(1, 2, 2)


class LateNodeNews(SimulatedBackend):
    """A simulated backend where a gang can lose its workers on a node that the inventory
    still lists (the worker's death seen first), as a Ray cluster reports it."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(factory_from_nodes("t", NODES).topology().nodes, clock)
        self.lost: dict[str, str] = {}  # job -> node its workers were lost on

    def lose_workers(self, job: str, node: str) -> None:
        self.lost[job] = node

    def launch(self, spec: JobSpec, placement: Placement, work_done: float = 0.0) -> None:
        self.lost.pop(spec.key, None)
        super().launch(spec, placement, work_done)

    def changed_jobs(self) -> list[str]:
        return sorted(set(super().changed_jobs()) | set(self.lost))

    def status(self, job: str) -> WorkloadStatus | None:
        status = super().status(job)
        if status is None or job not in self.lost:
            return status
        node = self.lost[job]
        return replace(status, phase=WorkloadPhase.FAILED, message=f"worker on {node} lost",
                       lost_nodes=(node,), retryable=True)


def _plane() -> tuple[ControlPlane, LateNodeNews, VirtualClock]:
    clock = VirtualClock(1000.0)
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    backend = LateNodeNews(clock)
    return ControlPlane(factory, backend, clock=clock, topology=topo), backend, clock


def _nodes(cp: ControlPlane, key: str) -> list[str]:
    placement = cp.jobs[key].placement
    assert placement is not None
    return [cp.topo.nodes[s.node].name for s in placement.slots]


def test_a_gang_that_lost_its_only_node_is_not_put_back_on_it() -> None:
    cp, backend, clock = _plane()
    loop = Reconciler(cp, backend, suspect_seconds=30)
    job = JobSpec("train", workers=2, gpus_per_worker=4, expected_runtime_seconds=1000,
                  restart_limit=3, required_level="node")
    cp.submit(job)
    loop.step()
    (victim,) = set(_nodes(cp, job.key))
    backend.lose_workers(job.key, victim)
    clock.now += 5
    loop.step()  # requeued whole (every worker was there) and placed again at once
    rec = cp.jobs[job.key]
    assert rec.phase == JobPhase.RUNNING and rec.restarts == 1, rec.history
    assert victim not in _nodes(cp, job.key)
    assert victim in loop.suspected()
    # Nothing new lands on the suspect while it is suspect ...
    other = JobSpec("other", workers=3, gpus_per_worker=8, expected_runtime_seconds=100)
    cp.submit(other)
    loop.step()
    assert cp.jobs[other.key].phase == JobPhase.QUEUED
    # ... and it takes work again once it stayed listed for suspect_seconds (its node lived).
    clock.now += 30
    loop.step()
    assert not loop.suspected()
    assert cp.jobs[other.key].phase == JobPhase.RUNNING
    assert victim in _nodes(cp, other.key)


def test_a_suspect_that_left_and_rejoined_is_trusted_at_once() -> None:
    cp, backend, _clock = _plane()
    loop = Reconciler(cp, backend, suspect_seconds=3600)
    job = JobSpec("train", workers=1, gpus_per_worker=8, expected_runtime_seconds=1000)
    cp.submit(job)
    loop.step()
    (victim,) = _nodes(cp, job.key)
    backend.lose_workers(job.key, victim)
    loop.step()
    assert victim in loop.suspected()
    backend.fail_node(victim)
    loop.step()
    backend.repair_node(victim)
    loop.step()
    assert not loop.suspected()


def test_a_gang_whose_status_names_one_lost_node_is_hot_swapped_not_requeued() -> None:
    cp, backend, clock = _plane()
    loop = Reconciler(cp, backend)
    job = JobSpec("swap", workers=2, gpus_per_worker=8, expected_runtime_seconds=1000,
                  restart_limit=3)
    cp.submit(job)
    loop.step()
    victim, survivor = _nodes(cp, job.key)
    repaired: list[str] = []
    cp.listeners.append(lambda reason, rec, msg: repaired.append(msg)
                        if reason == "Repaired" else None)
    backend.lose_workers(job.key, victim)  # seen first by the poll, not the inventory
    clock.now += 5
    loop.step()
    rec = cp.jobs[job.key]
    assert repaired and "hot swap moved 1 worker(s)" in repaired[0], rec.history
    after = _nodes(cp, job.key)
    assert survivor in after and victim not in after
    assert rec.phase == JobPhase.RUNNING and rec.restarts == 1
