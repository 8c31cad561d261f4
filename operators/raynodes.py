"""``--backend ray`` on Kubernetes: the Node objects give the Ray nodes their topology.

Each Ray worker names its Kubernetes node with the Ray label ``aifactory.io/node`` (the
DaemonSet in deploy/ray/ sets it from ``spec.nodeName``). ``KubeNodeDirectory`` is the Ray
backend's ``NodeDirectory`` over the Nodes the operator lists at start-up and then watches:
a Ray node's rack, block, NVLink clique and GPU model are read from its Node's labels with
the same parser the simulated inventory uses (``operators.inventory.node_info``); what Ray
can schedule (the GPU count) stays Ray's (``controller.backends.ray.join``). A Node
relabelled, deleted or added changes the inventory at the backend's next refresh, and the
control plane is rebuilt over it (``controller.runtime.resync.Reconciler``).

What cannot be joined is left out, never guessed, and reported once per change (``report``,
after each engine pass): a log line, a Warning Event ``RayNodeUnmatched`` on the Node where
one exists (a Ray node naming no Node has none to carry it), and the gauge
``aifactory_ray_nodes_unmatched{reason}`` (``counts``): ``no-node-label``, ``no-node``,
``duplicate``, ``no-ray-node``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aifactory.controller.backends.directory import UnmatchedNode, UnmatchedReason
from aifactory.controller.core.topology import NodeInfo
from aifactory.operators.inventory import has_gpus, node_info
from aifactory.operators.kube import ObjectRef

__all__ = ["UNMATCHED_EVENT_REASON", "KubeNodeDirectory"]

UNMATCHED_EVENT_REASON = "RayNodeUnmatched"
log = logging.getLogger(__name__)

PostEvent = Callable[[ObjectRef, str, str, str], None]  # ref, type, reason, message


class KubeNodeDirectory:
    """The Nodes by name (``NodeDirectory``), and the reporting of what Ray could not join.
    Fed and read on the engine's thread only (Node events are engine requests)."""

    def __init__(self) -> None:
        self._machines: dict[str, NodeInfo] = {}
        self._uids: dict[str, str] = {}
        self._left_out: tuple[UnmatchedNode, ...] = ()  # as the backend's last join said
        self._reported: dict[tuple[str, UnmatchedReason], UnmatchedNode] = {}

    def observe(self, body: Mapping[str, Any], deleted: bool) -> None:
        """A Node event (or a Node of the start-up listing)."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name") or "")
        if not name:
            return
        info = None if deleted else node_info(body)
        if info is None:
            self._machines.pop(name, None)
            self._uids.pop(name, None)
            return
        self._machines[name] = info
        self._uids[name] = str(meta.get("uid") or "")

    # ----------------------------------------------------------------- NodeDirectory

    def machine(self, name: str) -> NodeInfo | None:
        return self._machines.get(name)

    def gpu_machines(self) -> list[str]:
        return [name for name, info in self._machines.items() if has_gpus(info)]

    def unmatched(self, nodes: Sequence[UnmatchedNode]) -> None:
        self._left_out = tuple(nodes)

    # ----------------------------------------------------------------- reporting

    def report(self, post_event: PostEvent) -> bool:
        """Log (and post an Event on the Node for) each node newly left out, and log each
        one no longer left out. True if anything changed."""
        now = {(u.name, u.reason): u for u in self._left_out}
        changed = False
        for key, node in sorted(now.items(), key=lambda item: item[0][0]):
            if key in self._reported:
                continue
            changed = True
            log.warning("left out of the inventory (%s): %s", node.reason.value, node.detail)
            uid = self._uids.get(node.name)
            if uid is not None:
                ref = {"apiVersion": "v1", "kind": "Node", "name": node.name,
                       "namespace": "", "uid": uid}
                post_event(ref, "Warning", UNMATCHED_EVENT_REASON, node.detail)
        for key in sorted(self._reported.keys() - now.keys(), key=lambda k: k[0]):
            changed = True
            log.info("%s is no longer left out of the inventory (was: %s)", key[0],
                     key[1].value)
        self._reported = now
        return changed

    def counts(self) -> dict[str, int]:
        """Nodes left out by the last join, per reason (every reason, 0 included)."""
        out = {reason.value: 0 for reason in UnmatchedReason}
        for node in self._left_out:
            out[node.reason.value] += 1
        return out
