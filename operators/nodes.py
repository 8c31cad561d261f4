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

A node that is healthy again takes work again. Each change is logged, counted in
``aifactory_operator_node_failures_total``, and the affected jobs get an Event (their restart
names the node and why). A node object without a Ready condition (as a test cluster without
kubelets has) counts as ready.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["NodeBook", "NodeHealth"]

GPU_RESOURCE = "nvidia.com/gpu"


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
    nodes: dict[str, NodeHealth] = field(default_factory=dict)

    def observe(self, body: Mapping[str, Any], deleted: bool, now: float) -> None:
        """A Node event (or a Node of the start-up listing)."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        if not name:
            return
        previous = self.nodes.get(name)
        if deleted:
            self.nodes[name] = NodeHealth(name, present=False)
            return
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
