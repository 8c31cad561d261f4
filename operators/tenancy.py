"""Who may use which queue, and how high a job may ask: the operator's copy of the rules the
API server enforces at apply time (``manifests/admission.yaml``).

A cluster admin grants a namespace its queues on the Namespace object, which tenants cannot
edit (Namespaces are cluster-scoped; the ``admin`` and ``edit`` roles do not reach them):

- ``aifactory.io/queues``: the GPUQueues its jobs may name, comma-separated (``*``: any);
- ``aifactory.io/default-queue``: where a job that names no queue goes (default: the first
  granted queue; ``default`` when the grant is ``*``).

A namespace without the annotation may use no queue: nothing runs until an admin onboards
the team. A GPUQueue's ``spec.maxPriority`` caps the ``spec.priority`` of its jobs; across
queues, priority decides nothing (only quota reclaim preempts another queue's jobs), so a
tenant's own number reaches no further than its own queue.

The ValidatingAdmissionPolicies refuse such jobs when they are applied; the operator checks
the same rules before it places a job, so a cluster without the policies (or a grant revoked
while a job waited) still never runs one, and the job is marked Failed with the same words.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aifactory.controller.core.spec import DEFAULT_QUEUE, QueueSpec

__all__ = ["ANY_QUEUE", "DEFAULT_QUEUE_ANNOTATION", "QUEUES_ANNOTATION", "NamespaceGrant",
           "priority_refusal"]

QUEUES_ANNOTATION = "aifactory.io/queues"
DEFAULT_QUEUE_ANNOTATION = "aifactory.io/default-queue"
ANY_QUEUE = "*"


@dataclass(frozen=True, slots=True)
class NamespaceGrant:
    """The queues one namespace may use, as its annotations say."""

    namespace: str
    queues: tuple[str, ...] = ()
    default_queue: str | None = None

    @staticmethod
    def from_namespace(body: Mapping[str, Any]) -> NamespaceGrant:
        meta = body.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        raw = str(annotations.get(QUEUES_ANNOTATION) or "")
        queues = tuple(q.strip() for q in raw.split(",") if q.strip())
        default = str(annotations.get(DEFAULT_QUEUE_ANNOTATION) or "").strip() or None
        return NamespaceGrant(str(meta.get("name") or ""), queues, default)

    @property
    def any_queue(self) -> bool:
        return ANY_QUEUE in self.queues

    def queue_for(self, named: str | None) -> str:
        """The queue a job goes to: the one it names, else the namespace's default."""
        if named:
            return named
        if self.default_queue:
            return self.default_queue
        granted = [q for q in self.queues if q != ANY_QUEUE]
        return granted[0] if granted else DEFAULT_QUEUE

    def queue_refusal(self, queue: str) -> str | None:
        """Why a job of this namespace may not use ``queue`` (the API server's words), or
        None when it may."""
        if self.any_queue or queue in self.queues:
            return None
        if not self.queues:
            return (f"spec.queue: namespace {self.namespace} may not use queue {queue}; it has "
                    f"no queues: a cluster admin grants them with the annotation "
                    f"{QUEUES_ANNOTATION} on the Namespace")
        return (f"spec.queue: namespace {self.namespace} may not use queue {queue}; its "
                f"queues are {', '.join(self.queues)}")


def priority_refusal(priority: int, queue: QueueSpec | None) -> str | None:
    """Why ``priority`` is above what ``queue`` allows (the API server's words), or None."""
    if queue is None or queue.max_priority is None or priority <= queue.max_priority:
        return None
    return (f"spec.priority: {priority} is above the maximum priority {queue.max_priority} "
            f"of queue {queue.name}")
