"""Hot swap: only the workers on failed nodes move, inside the domain the gang may use.

    factory
    └── b0
        ├── b0-r0: n-b0-r0-00 .. n-b0-r0-03   (4 nodes x 8 GPUs)
        └── b0-r1: n-b0-r1-00 .. n-b0-r1-03
"""

from __future__ import annotations

from dataclasses import replace

from aifactory.controller.backends.base import WorkloadPhase
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.clock import VirtualClock
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.repair import hot_swap
from tests.factories import grid_nodes

NODES = grid_nodes(1, 2, 4)


def plane() -> tuple[ControlPlane, SimulatedBackend, VirtualClock]:
    clock = VirtualClock(1000.0)
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    backend = SimulatedBackend(topo.nodes, clock)
    return ControlPlane(factory, backend, clock=clock, topology=topo), backend, clock


def nodes_of(cp: ControlPlane, key: str) -> list[str]:
    rec = cp.jobs[key]
    assert rec.placement is not None
    return [cp.topo.nodes[s.node].name for s in rec.placement.slots]


def fail(cp: ControlPlane, backend: SimulatedBackend, *names: str
         ) -> tuple[frozenset[int], list[str]]:
    hit: list[str] = []
    for name in names:
        hit += backend.fail_node(name, f"node {name} failed")
    return frozenset(cp.topo.node_index[n] for n in names), hit


def test_only_the_lost_workers_move_and_stay_in_the_required_rack() -> None:
    cp, backend, clock = plane()
    cp.submit(JobSpec("gang", workers=3, gpus_per_worker=8, required_level="rack",
                      checkpoint_interval_seconds=60))
    cp.step()
    before = nodes_of(cp, "default/gang")
    clock.now += 600
    lost, hit = fail(cp, backend, before[1])
    assert hit == ["default/gang"]
    assert hot_swap(cp, "default/gang", lost, lost, f"node {before[1]} failed") is None
    after = nodes_of(cp, "default/gang")
    assert before[0] in after and before[2] in after and before[1] not in after
    rack = {n.rsplit("-", 1)[0] for n in before}
    assert {n.rsplit("-", 1)[0] for n in after} == rack  # still one rack
    rec = cp.jobs["default/gang"]
    assert rec.restarts == 1 and rec.work_saved > 0  # resumes from its checkpoint
    status = backend.status("default/gang")
    assert status is not None and status.phase is WorkloadPhase.RUNNING
    assert "hot swap moved 1 worker(s)" in rec.history[-1]


def test_several_failed_nodes_of_one_gang_are_swapped_at_once() -> None:
    cp, backend, _ = plane()
    cp.submit(JobSpec("gang", workers=2, gpus_per_worker=8, required_level="block"))
    cp.step()
    before = nodes_of(cp, "default/gang")
    # Two more gangs fill the rest of the gang's rack: the swap must leave the rack.
    cp.submit(JobSpec("filler", workers=2, gpus_per_worker=8, required_level="rack"))
    cp.step()
    lost, _ = fail(cp, backend, *before)
    assert hot_swap(cp, "default/gang", lost, lost, "two nodes failed") == \
        "every worker was on a failed node"
    cp2, backend2, _ = plane()
    cp2.submit(JobSpec("gang", workers=4, gpus_per_worker=8, required_level="block"))
    cp2.step()
    before2 = nodes_of(cp2, "default/gang")
    lost2, _ = fail(cp2, backend2, before2[0], before2[1])
    assert hot_swap(cp2, "default/gang", lost2, lost2, "two nodes failed") is None
    after2 = nodes_of(cp2, "default/gang")
    assert set(after2).isdisjoint({before2[0], before2[1]})
    assert {before2[2], before2[3]} <= set(after2) and len(after2) == 4


def test_without_a_spare_in_the_rack_nothing_moves_and_the_reason_names_the_rack() -> None:
    cp, backend, _ = plane()
    cp.submit(JobSpec("gang", workers=2, gpus_per_worker=8, required_level="rack"))
    cp.step()
    before = nodes_of(cp, "default/gang")
    rack = before[0].rsplit("-", 1)[0]
    cp.submit(JobSpec("filler", workers=2, gpus_per_worker=8, required_level="rack"))
    cp.step()
    assert {n.rsplit("-", 1)[0] for n in nodes_of(cp, "default/filler")} == {rack}
    lost, _ = fail(cp, backend, before[0])
    why = hot_swap(cp, "default/gang", lost, lost, "node failed")
    assert why is not None and why.startswith("no spare for 1 worker(s) in rack ")
    assert nodes_of(cp, "default/gang") == before  # unchanged: the caller requeues it
