"""Live node lifecycle: what the Node objects say about each GPU node, and what follows.

The operator watches Nodes (RBAC get/list/watch) and keeps, per node of its inventory:

- **failed**, which fails the workers there (their gangs restart from their last
  checkpoint, elsewhere) and takes no new work, when the node
  - was deleted;
  - has a ``NoExecute`` taint (the node lifecycle controller's ``not-ready``/
    ``unreachable`` taints, or a GPU health taint such as ``nvidia.com/gpu.health``);
  - reports fewer allocatable ``nvidia.com/gpu`` than the inventory counted (GPUs lost);
  - or has been ``Ready=False``/``Unknown`` for ``grace_seconds`` (default 40, the
    kube-controller-manager's node-monitor grace): a shorter blip changes nothing;
- **cordoned** (``spec.unschedulable``): no new work, and what runs there keeps running.

Nodes that join (or change their topology labels, GPU count or model) rebuild the inventory
with every running gang carried over where it runs (``grow``).

A gang that lost workers on failed nodes is repaired when spares exist: only the lost
workers move, inside the domain its constraints allow (``controller.runtime.repair``), and it
restarts from its checkpoint; otherwise it is requeued from its checkpoint with the reason. A
node that is healthy again takes work again. Each change is logged, counted
(``aifactory_operator_node_failures_total``, ``_hot_swaps_total``), and the affected jobs get
an Event naming the node and why. A node object without a Ready condition (as a test cluster without
kubelets has) counts as ready.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aifactory.controller.backends.base import FailsNodes
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.topology import NodeInfo
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.repair import hot_swap
from aifactory.controller.runtime.resync import rebuild, remap, sync_inventory
from aifactory.operators.inventory import nodes_from_objects

__all__ = ["NodeBook", "NodeHealth"]

GPU_RESOURCE = "nvidia.com/gpu"
log = logging.getLogger(__name__)


@dataclass(slots=True)
class NodeHealth:
    """What one Node object says now."""

    name: str
    present: bool = True
    ready: bool = True
    not_ready_since: float | None = None
    no_execute: tuple[str, ...] = ()
    allocatable_gpus: int | None = None
    cordoned: bool = False

    def failure(self, now: float, grace_seconds: float, gpus: int) -> str | None:
        """Why the node counts as failed now, or None."""
        if not self.present:
            return f"node {self.name} was deleted"
        if self.no_execute:
            return f"node {self.name} is tainted {', '.join(self.no_execute)}:NoExecute"
        if self.allocatable_gpus is not None and self.allocatable_gpus < gpus:
            return (f"node {self.name} reports {self.allocatable_gpus} allocatable "
                    f"{GPU_RESOURCE} of {gpus}")
        if not self.ready and self.not_ready_since is not None and \
                now - self.not_ready_since >= grace_seconds:
            return (f"node {self.name} has not been Ready for {now - self.not_ready_since:.0f} s "
                    f"(grace {grace_seconds:g} s)")
        return None


def _count(raw: Any) -> int | None:
    try:
        return max(int(str(raw)), 0)
    except (TypeError, ValueError):
        return None


@dataclass(slots=True)
class NodeBook:
    """The latest word on every node, and the verdicts drawn from it."""

    grace_seconds: float = 40.0
    # Failures within this many seconds of the first are acted on together, so a gang that
    # loses several nodes at once (a rack's power, a switch) is repaired once, not node by
    # node.
    batch_seconds: float = 1.0
    nodes: dict[str, NodeHealth] = field(default_factory=dict)
    _first_new: float | None = None
    _fencing: bool = False  # the last fence() excluded some node
    failed: dict[str, str] = field(default_factory=dict)  # as last acted on: node -> why
    cordoned: set[str] = field(default_factory=set)
    # Present GPU Nodes as inventory entries, and whether any changed since ``grow`` looked
    # (a Node's heartbeat that changes nothing the inventory reads costs no rebuild check).
    infos: dict[str, NodeInfo] = field(default_factory=dict)
    _inventory_changed: bool = False
    # Whether ``follow`` has anything to look at: a Node event since it last looked, or a
    # NotReady node whose grace period runs (it walks every node only then).
    _observed: bool = False
    _timing: bool = False

    def observe(self, body: Mapping[str, Any], deleted: bool, now: float) -> None:
        """A Node event (or a Node of the start-up listing)."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        if not name:
            return
        previous = self.nodes.get(name)
        self._observed = True
        if deleted:
            self.nodes[name] = NodeHealth(name, present=False)
            self.infos.pop(name, None)
            return
        info = next(iter(nodes_from_objects([body])), None)
        if info is not None and self.infos.get(name) != info:
            self.infos[name] = info
            self._inventory_changed = True
        spec, status = body.get("spec") or {}, body.get("status") or {}
        ready = True
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Ready":
                ready = cond.get("status") == "True"
        since = None
        if not ready:
            since = previous.not_ready_since if previous is not None and \
                previous.not_ready_since is not None else now
        taints = tuple(sorted(str(t.get("key")) for t in spec.get("taints") or []
                              if t.get("effect") == "NoExecute"))
        allocatable = (status.get("allocatable") or {}).get(GPU_RESOURCE)
        self.nodes[name] = NodeHealth(
            name, True, ready, since, taints,
            None if allocatable is None else _count(allocatable),
            bool(spec.get("unschedulable")))

    def verdicts(self, inventory: Iterable[tuple[str, int]], now: float
                 ) -> tuple[dict[str, str], set[str]]:
        """For the inventory's ``(node, GPUs)``: the failed nodes with why, and the
        cordoned ones. Nodes never observed are healthy."""
        failed: dict[str, str] = {}
        cordoned: set[str] = set()
        for name, gpus in inventory:
            health = self.nodes.get(name)
            if health is None:
                continue
            why = health.failure(now, self.grace_seconds, gpus)
            if why is not None:
                failed[name] = why
            elif health.cordoned:
                cordoned.add(name)
        return failed, cordoned

    # ----------------------------------------------------------------- acting on it

    def grow(self, cp: ControlPlane) -> ControlPlane | None:
        """A plane over the Nodes as they are now when GPU nodes joined or changed their
        topology labels, GPU count or model (None when the inventory is as the plane has
        it). Running gangs carry over where they run, with the work they have done; queued
        jobs keep their order; nodes that left stay in the inventory, failed. The simulated
        backend only: Ray's inventory is its own (``controller.runtime.resync.Reconciler``)."""
        old = cp.backend
        if not isinstance(old, SimulatedBackend) or not self._inventory_changed:
            return None
        self._inventory_changed = False
        seen = dict(self.infos)
        have = {n.name: n for n in cp.topo.nodes}
        if all(have.get(name) == node for name, node in seen.items()):
            return None
        wanted = {**have, **seen}  # nodes not heard of keep their place (failed ones too)
        factory = factory_from_nodes(cp.factory.name, list(wanted.values()), cp.factory.source)
        factory = replace(factory, levels=cp.factory.levels, queues=cp.factory.queues,
                          power_budgets=cp.factory.power_budgets, cost=cp.factory.cost)
        topo = factory.topology()
        backend = SimulatedBackend(topo.nodes, lambda: cp.now)
        for key, rec in cp.jobs.items():
            running = old.running_work(key) if rec.placement is not None else None
            moved = remap(rec.placement, cp.topo, topo) if rec.placement is not None else None
            if running is not None and moved is not None:
                spec, done, joules = running
                backend.resume(spec, moved, done, joules)
        for name, why in self.failed.items():  # still failed on the new backend
            health = self.nodes.get(name)
            backend.fail_node(name, why, removed=health is not None and not health.present)
        new = rebuild(cp, factory, backend)
        joined = sorted(seen.keys() - have.keys())
        log.info("inventory from Node objects changed (%s): %s",
                 f"joined: {', '.join(joined)}" if joined else "labels or GPUs changed",
                 topo.describe())
        return new

    def follow(self, cp: ControlPlane, stats: dict[str, float],
               now: float | None = None) -> bool:
        """Act on what changed since the last call: fail the workers on newly failed nodes
        (hot swapping them, see ``_repair``), take back recovered nodes, note cordons.
        True if anything changed."""
        now = time.monotonic() if now is None else now
        if not (self._observed or self._timing or self._first_new is not None):
            return False  # no Node changed and no grace period runs: nothing to act on
        self._observed = False
        failed, cordoned = self.verdicts(((n.name, n.gpus) for n in cp.topo.nodes), now)
        if failed.keys() - self.failed.keys():
            if self._first_new is None:
                self._first_new = now
            if now - self._first_new < self.batch_seconds:
                failed = {n: w for n, w in failed.items() if n in self.failed}  # not yet
            else:
                self._first_new = None
        backend = cp.backend
        changed = False
        hit: dict[str, str] = {}  # job -> why (the first failed node it was on)
        for name, why in failed.items():
            if name in self.failed:
                continue
            jobs: list[str] = []
            if isinstance(backend, FailsNodes):
                jobs = backend.fail_node(name, why, removed=not self.nodes[name].present)
            for job in jobs:
                hit.setdefault(job, why)
            stats["node_failures"] += 1
            log.warning("%s: %d gang(s) there lose workers, and it takes no new work", why,
                        len(jobs))
            changed = True
        if hit:
            self._repair(cp, stats, hit, failed, cordoned)
        for name in self.failed:
            if name not in failed:
                if isinstance(backend, FailsNodes):
                    backend.repair_node(name)
                log.info("node %s is healthy again and takes work", name)
                changed = True
        for name in sorted(cordoned ^ self.cordoned):
            log.info("node %s %s", name, "is cordoned: it keeps what runs there and takes "
                     "no new work" if name in cordoned else "is uncordoned")
            changed = True
        self.failed, self.cordoned = failed, cordoned
        # A NotReady node not yet declared failed: its grace period runs out without an event.
        self._timing = any(h.present and not h.ready and h.name not in failed
                           for h in self.nodes.values())
        return changed

    def fence(self, cp: ControlPlane) -> None:
        """Keep new work off failed and cordoned nodes (after the plane polled its backend,
        so GPUs freed there are fenced too); lift the fences of nodes that recovered."""
        excluded = bool(self.failed or self.cordoned)
        if not excluded and not self._fencing:
            return  # every node healthy, and no fence left to lift: nothing to walk
        sync_inventory(cp, [n.name for n in cp.topo.nodes
                            if n.name not in self.failed and n.name not in self.cordoned])
        self._fencing = excluded

    @staticmethod
    def _repair(cp: ControlPlane, stats: dict[str, float], hit: Mapping[str, str],
                failed: Mapping[str, str], cordoned: set[str]) -> None:
        """Gangs that lost workers on failed nodes: hot swap the lost workers to spares in
        the domain their constraints allow, every failed node at once; a gang with no spare
        is requeued from its checkpoint with the reason."""
        index = cp.topo.node_index
        lost = frozenset(index[n] for n in failed if n in index)
        blocked = lost | frozenset(index[n] for n in cordoned if n in index)
        for job, why in sorted(hit.items()):
            refused = hot_swap(cp, job, lost, blocked, why)
            rec = cp.jobs.get(job)
            if refused is None:
                stats["hot_swaps"] += 1
            elif rec is not None and rec.placement is not None and not rec.done:
                cp.fail_running(rec, f"{why}; {refused}; requeued from its checkpoint")
