"""Keeping the control plane's picture in step with a real cluster whose nodes come and go.

The simulator changes its own inventory, so it knows when a node fails; on Ray (or any real
backend) nodes die and join under the control plane. ``Reconciler.step()`` is
``ControlPlane.step()`` plus that: GPUs of nodes that left the inventory are fenced (held by a
``!failed/<node>`` placeholder, as the simulator does) so no gang is placed on a dead node,
fences are lifted when the node returns, and a node never seen before, or one whose entry
changed (relabelled to another rack), rebuilds the control plane over the new inventory,
carrying every job over (running ones adopted where they run).

``adopt_running`` is the operator-restart half: gangs a backend finds still running (the Ray
backend finds them by placement-group name) are adopted into a fresh control plane instead of
being launched twice, and gangs of jobs that no longer exist are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from aifactory.controller.backends.base import (
    AdoptsGangs,
    ClusterBackend,
    FoundGang,
    G,
    WorkloadStatus,
)
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.placements import NodeSlot, placement_from_node_slots
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.controller.core.topology import Topology
from aifactory.controller.inputs.factory import FactorySpec
from aifactory.controller.runtime.controlplane import ControlPlane, JobRecord
from aifactory.controller.runtime.repair import hot_swap
from aifactory.controller.scheduling.cycle_io import CycleResult

__all__ = [
    "FENCE_PREFIX",
    "AdoptionReport",
    "AdoptsGangs",
    "FoundGang",
    "InventoryChange",
    "Reconciler",
    "adopt_running",
    "rebuild",
    "remap",
    "sync_inventory",
]

FENCE_PREFIX = "!failed/"
SUSPECT_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class AdoptionReport:
    adopted: tuple[str, ...]
    discarded: tuple[str, ...]


def adopt_running(cp: ControlPlane, backend: AdoptsGangs[G],
                  specs: Mapping[str, JobSpec]) -> AdoptionReport:
    """Adopt every running gang whose job is in ``specs``; discard the others (and gangs on
    nodes the control plane no longer has)."""
    adopted: list[str] = []
    discarded: list[str] = []
    for gang in backend.adoptable():
        spec = specs.get(gang.job)
        placement = None if spec is None else _rebuilt(
            gang.job, gang.slots, cp.topo, cp.config.watts_per_gpu(spec), spec.cpu_milli,
            spec.memory_mib)
        if spec is None or placement is None:
            backend.discard(gang)
            discarded.append(gang.job)
            continue
        backend.adopt(spec, gang)
        cp.adopt(spec, placement, started_at=gang.started_at)
        adopted.append(gang.job)
    return AdoptionReport(tuple(adopted), tuple(discarded))


@dataclass(frozen=True, slots=True)
class InventoryChange:
    """Nodes fenced off now, fences lifted now, and live nodes the topology lacks."""

    down: tuple[str, ...]
    up: tuple[str, ...]
    unknown: tuple[str, ...]


def sync_inventory(cp: ControlPlane, alive: Iterable[str]) -> InventoryChange:
    """Fence every free GPU of nodes not in ``alive``; lift fences of nodes back in it.

    GPUs a running gang holds on a dead node are fenced once that gang has failed and
    released them (call this after ``cp.poll()``)."""
    live = set(alive)
    topo, state = cp.topo, cp.state
    down: list[str] = []
    up: list[str] = []
    for n, node in enumerate(topo.nodes):
        key = FENCE_PREFIX + node.name
        fence = state.allocations.get(key)
        if node.name in live:
            if fence is not None:
                state.release(key)
                cp.metrics.fenced_gpus -= fence.gpu_equivalents
                up.append(node.name)
            continue
        held = set(fence.slots[0].gpus) if fence is not None else set()
        free = {g for g in topo.gpu_range(n) if state.gpu_used_milli[g] == 0}
        if not free:
            continue
        if fence is not None:
            state.release(key)
            cp.metrics.fenced_gpus -= fence.gpu_equivalents
        else:
            down.append(node.name)
        new = Placement(key, (WorkerSlot(n, tuple(sorted(held | free))),))
        state.allocate(new)
        cp.metrics.fenced_gpus += new.gpu_equivalents
    unknown = tuple(sorted(live - set(topo.node_index)))
    return InventoryChange(tuple(down), tuple(up), unknown)


def remap(placement: Placement, old: Topology, new: Topology) -> Placement | None:
    """The same GPUs, by node name, in ``new``'s numbering (None if a node is gone)."""
    slots = []
    for slot in placement.slots:
        start = old.gpu_start[slot.node]
        slots.append((old.nodes[slot.node].name, tuple(g - start for g in slot.gpus),
                      slot.milli))
    first = placement.slots[0] if placement.slots else None
    return _rebuilt(placement.job, slots, new, placement.watts_per_gpu,
                    first.cpu_milli if first else 0, first.memory_mib if first else 0)


def _rebuilt(job: str, slots: Sequence[NodeSlot], topo: Topology, watts_per_gpu: float,
             cpu_milli: int, memory_mib: int) -> Placement | None:
    """The placement on ``topo``, or None when a worker's node or GPUs are not there."""
    try:
        return placement_from_node_slots(job, slots, topo, watts_per_gpu, cpu_milli,
                                         memory_mib)
    except SpecError:
        return None


def rebuild(cp: ControlPlane, factory: FactorySpec,
            backend: ClusterBackend | None = None) -> ControlPlane:
    """A control plane over ``factory``'s (grown) inventory with the same policy and jobs
    (and the same backend, unless one over the new inventory is given): running gangs
    adopted where they run, queued jobs queued in the same order."""
    new = ControlPlane(factory, backend or cp.backend, cp.policy, clock=cp._now_fn,
                       decision_clock=cp.decision_clock)
    new.listeners = cp.listeners
    for key, rec in sorted(cp.jobs.items(), key=lambda item: item[1].seq):
        if rec.done:
            continue
        placement = remap(rec.placement, cp.topo, new.topo) if rec.placement else None
        if placement is not None:
            fresh = new.adopt(rec.spec, placement, rec.started_at or new.now, rec.submitted_at,
                              rec.restarts)
        else:
            fresh = new.enqueue(rec.spec, rec.runtime, rec.submitted_at)
            fresh.restarts = rec.restarts
        fresh.preemptions = rec.preemptions
        fresh.first_start = rec.first_start
        fresh.energy_joules = rec.energy_joules
        fresh.history = rec.history
        new.jobs[key] = fresh
    return new


class Reconciler:
    """Steps a control plane against a backend whose inventory may change (``.cp`` is
    replaced when the inventory grows). ``make_factory`` builds a factory over the current
    inventory (the Ray backend's ``factory`` method, which also rebinds its topology)."""

    def __init__(self, cp: ControlPlane, backend: ClusterBackend,
                 make_factory: Callable[[], FactorySpec] | None = None,
                 suspect_seconds: float = SUSPECT_SECONDS) -> None:
        self.cp = cp
        self.backend = backend
        self._make_factory = make_factory
        self.suspect_seconds = suspect_seconds
        # Nodes a failed gang's status named lost while the inventory still lists them
        # (a worker's death is seen before the node's): name -> when first named, and
        # whether the inventory has since shown it gone.
        self._suspects: dict[str, float] = {}
        self._suspects_gone: set[str] = set()
        self._repaired = False

    def suspected(self) -> frozenset[str]:
        """Nodes held out of placement because a gang lost workers there (see ``step``)."""
        return frozenset(self._suspects)

    def _listed(self) -> set[str]:
        """The inventory's node names; clears suspects. A suspect is cleared when the
        inventory has shown it gone and back (a node that rejoined is a fresh node), or when
        it stayed listed for ``suspect_seconds`` (a worker died, not its node)."""
        listed = {n.name for n in self.backend.inventory()}
        now = self.cp.now
        for name, since in list(self._suspects.items()):
            if name not in listed:
                self._suspects_gone.add(name)
            elif name in self._suspects_gone or now - since >= self.suspect_seconds:
                del self._suspects[name]
                self._suspects_gone.discard(name)
        return listed

    def _relabelled(self) -> bool:
        """Whether a listed node differs from the topology's entry of that name (its labels,
        GPU model or count): a Kubernetes Node moved to another rack, say."""
        topo = self.cp.topo
        index = topo.node_index
        return any(n.name in index and topo.nodes[index[n.name]] != n
                   for n in self.backend.inventory())

    def _unlisted(self) -> frozenset[int]:
        """Indices of the topology's nodes the inventory no longer lists."""
        listed = self._listed()
        return frozenset(i for i, node in enumerate(self.cp.topo.nodes)
                         if node.name not in listed)

    def step(self, force: bool = True) -> CycleResult | None:
        """Poll, follow the inventory, then a scheduling cycle: always with ``force``, else
        only when something changed (a job came, went or moved, or a node left or came).
        Gangs that lost workers (on nodes that left the inventory, or on nodes a failed
        gang's status names) are hot swapped (``controller.runtime.repair``), or requeued
        from their checkpoint with the reason; the nodes a status names take no new work
        until the inventory confirms them (see ``suspected``)."""
        swapped = self._swap_lost()
        self._repaired = False
        self.cp.poll(repair=self._repair)
        swapped = swapped or self._repaired
        # Suspects take no new work; gangs already on them run on (only the inventory or
        # their own status says a node is lost).
        alive = sorted(self._listed() - self._suspects.keys())
        change = sync_inventory(self.cp, alive)
        if (change.unknown or self._relabelled()) and self._make_factory is not None:
            self.cp = rebuild(self.cp, self._make_factory())
            sync_inventory(self.cp, alive)
            force = True
        return self.cp.cycle(force=force or swapped or bool(change.down or change.up))

    def _swap_lost(self) -> bool:
        """Hot swap the running gangs with workers on nodes that left the inventory (before
        their workers are seen to fail)."""
        cp = self.cp
        dead = self._unlisted()
        if not dead:
            return False
        moved = False
        for _, rec in sorted(cp.jobs.items()):
            if rec.placement is not None and not rec.done and \
                    any(s.node in dead for s in rec.placement.slots):
                self._move(rec, dead)
                moved = True
        return moved

    def _repair(self, rec: JobRecord, status: WorkloadStatus) -> bool:
        """``ControlPlane.poll``'s repair: a gang whose status names lost nodes."""
        self._suspect(status.lost_nodes)
        index = self.cp.topo.node_index
        lost = self._unlisted() | frozenset(index[n] for n in status.lost_nodes if n in index)
        self._move(rec, lost)
        self._repaired = True
        return True

    def _move(self, rec: JobRecord, lost: frozenset[int]) -> None:
        """Hot swap the gang's workers on ``lost`` nodes, else requeue it from its
        checkpoint, saying why."""
        cp = self.cp
        assert rec.placement is not None
        names = sorted({cp.topo.nodes[s.node].name for s in rec.placement.slots
                        if s.node in lost})
        why = f"worker(s) on {', '.join(names)} lost"
        refused = hot_swap(cp, rec.spec.key, lost, lost, why)
        if refused is not None and rec.placement is not None and not rec.done:
            cp.fail_running(rec, f"{why}; {refused}; requeued from its checkpoint")

    def _suspect(self, names: Iterable[str]) -> None:
        now = self.cp.now
        for name in names:
            self._suspects.setdefault(name, now)

