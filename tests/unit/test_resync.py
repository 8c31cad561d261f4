"""Keeping the control plane in step with a changing inventory (simulated backend).

::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01      (8 GPUs each)
"""

from __future__ import annotations

from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.clock import VirtualClock
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.topology import NodeInfo
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase
from aifactory.controller.runtime.resync import FENCE_PREFIX, rebuild, sync_inventory
from tests.factories import RecordingBackend, grid_nodes

NODES = grid_nodes(1, 2, 2)


def plane(nodes: list[NodeInfo], clock: VirtualClock | None = None) -> ControlPlane:
    factory = factory_from_nodes("t", nodes)
    topo = factory.topology()
    now = clock or VirtualClock()
    backend = SimulatedBackend(topo.nodes, clock=now)
    return ControlPlane(factory, backend, clock=now, topology=topo)


def test_a_dead_node_is_fenced_until_it_returns() -> None:
    cp = plane(NODES)
    dead = NODES[0].name
    change = sync_inventory(cp, [n.name for n in NODES[1:]])
    assert change.down == (dead,) and change.unknown == ()
    assert cp.state.allocations[FENCE_PREFIX + dead].gpu_count == 8
    cp.submit(JobSpec("big", workers=4, gpus_per_worker=8))
    cp.cycle(force=True)
    assert cp.jobs["default/big"].phase == JobPhase.QUEUED  # 32 GPUs, one node fenced
    cp.submit(JobSpec("small", workers=3, gpus_per_worker=8))
    cp.cycle(force=True)
    placed = cp.jobs["default/small"].placement
    assert placed is not None and cp.topo.node_index[dead] not in placed.nodes
    change = sync_inventory(cp, [n.name for n in NODES])
    assert change.up == (dead,) and FENCE_PREFIX + dead not in cp.state.allocations


def test_gpus_freed_on_a_dead_node_join_its_fence() -> None:
    cp = plane(NODES)
    cp.submit(JobSpec("half", workers=1, gpus_per_worker=4, required_level="node"))
    cp.cycle(force=True)
    node = cp.jobs["default/half"].placement.nodes[0]  # type: ignore[union-attr]
    name = cp.topo.nodes[node].name
    alive = [n.name for n in NODES if n.name != name]
    sync_inventory(cp, alive)
    assert cp.state.allocations[FENCE_PREFIX + name].gpu_count == 4
    cp.fail_running(cp.jobs["default/half"], f"{name} left")
    sync_inventory(cp, alive)
    assert cp.state.allocations[FENCE_PREFIX + name].gpu_count == 8


def test_a_new_node_rebuilds_the_plane_and_keeps_running_jobs_in_place() -> None:
    clock = VirtualClock()
    cp = plane(NODES, clock)
    cp.submit(JobSpec("run", workers=2, gpus_per_worker=8, required_level="rack"))
    cp.submit(JobSpec("wait", workers=3, gpus_per_worker=8))
    cp.cycle(force=True)
    before = [cp.topo.nodes[s.node].name for s in cp.jobs["default/run"].placement.slots]  # type: ignore[union-attr]
    grown = [*NODES, NodeInfo("n-new", 8, "H200")]
    assert sync_inventory(cp, [n.name for n in grown]).unknown == ("n-new",)
    launched: list[str] = []
    # The simulated backend cannot grow; Ray's rebinds.
    cp.backend = RecordingBackend(launched=launched)
    new = rebuild(cp, factory_from_nodes("t", grown))
    rec = new.jobs["default/run"]
    assert rec.phase == JobPhase.RUNNING
    assert [new.topo.nodes[s.node].name for s in rec.placement.slots] == before  # type: ignore[union-attr]
    assert new.jobs["default/wait"].phase == JobPhase.QUEUED
    # 24 GPUs are free with node 5, but only across racks: our policy first waits up to its
    # locality delay for one rack, then spreads.
    clock.now = 601.0
    new.cycle(force=True)
    assert new.jobs["default/wait"].phase == JobPhase.RUNNING
    assert launched == ["default/wait"]  # the adopted gang was not launched again
