"""GPU quotas per named queue, with borrowing of idle quota inside a cohort (like Kueue).

A queue's nominal quota is guaranteed: usage above it is borrowed from the idle nominal quota
of the other queues in its cohort, up to the queue's borrowing limit, and may be reclaimed by
preemption when an owner needs it back. Without any queue configured, quotas are off.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aifactory.controller.core.spec import QueueSpec

__all__ = ["QuotaBook", "QuotaVerdict"]


@dataclass(frozen=True, slots=True)
class QuotaVerdict:
    """Whether a job may be admitted under quota, and if so whether it borrows."""

    ok: bool
    borrowing: bool = False
    reason: str = ""
    permanent: bool = False


class QuotaBook:
    """Usage per queue for one scheduling cycle; ``charge`` as jobs are admitted."""

    __slots__ = ("_queues", "usage")

    def __init__(self, queues: Iterable[QueueSpec], usage: Mapping[str, float] | None = None
                 ) -> None:
        self._queues = {q.name: q for q in queues}
        self.usage: dict[str, float] = {name: 0.0 for name in self._queues}
        for name, used in (usage or {}).items():
            self.usage[name] = self.usage.get(name, 0.0) + used

    @property
    def enabled(self) -> bool:
        return bool(self._queues)

    def queue(self, name: str) -> QueueSpec | None:
        return self._queues.get(name)

    def cohort_members(self, queue: QueueSpec) -> list[QueueSpec]:
        if queue.cohort is None:
            return [queue]
        return [q for q in self._queues.values() if q.cohort == queue.cohort]

    def idle_in_cohort(self, queue: QueueSpec) -> float:
        """Nominal quota of the other queues in the cohort that nobody uses right now."""
        return sum(max(0.0, q.nominal_gpus - self.usage.get(q.name, 0.0))
                   for q in self.cohort_members(queue) if q.name != queue.name)

    def check(self, queue_name: str, gpus: float) -> QuotaVerdict:
        if not self._queues:
            return QuotaVerdict(True)
        queue = self._queues.get(queue_name)
        if queue is None:
            return QuotaVerdict(False, reason=f"queue {queue_name!r} does not exist; known "
                                f"queues: {', '.join(sorted(self._queues))}")
        used = self.usage.get(queue.name, 0.0)
        if used + gpus <= queue.nominal_gpus + 1e-9:
            return QuotaVerdict(True)
        over = used + gpus - queue.nominal_gpus
        limit = queue.borrowing_limit_gpus
        limit_total = queue.nominal_gpus + (limit if limit is not None else 0.0)
        if queue.cohort is None or limit == 0:
            if gpus > queue.nominal_gpus:
                return QuotaVerdict(False, reason=(
                    f"queue {queue.name} has a quota of {queue.nominal_gpus:g} GPUs and cannot "
                    f"borrow; the job needs {gpus:g}"), permanent=queue.cohort is None)
            return QuotaVerdict(False, reason=(
                f"queue {queue.name} is at its quota: {used:g} of {queue.nominal_gpus:g} GPUs "
                f"in use, the job needs {gpus:g}"))
        idle = self.idle_in_cohort(queue)
        allowed = idle if limit is None else min(idle, limit)
        if over <= allowed + 1e-9:
            return QuotaVerdict(True, borrowing=True)
        cap_txt = "" if limit is None else f" (borrowing limit {limit:g}, at most " \
            f"{limit_total:g} GPUs)"
        return QuotaVerdict(False, reason=(
            f"queue {queue.name} is at its quota: {used:g} of {queue.nominal_gpus:g} GPUs in "
            f"use, the job needs {gpus:g} and only {idle:g} idle GPUs can be borrowed from "
            f"cohort {queue.cohort}{cap_txt}"))

    def within_nominal(self, queue_name: str, gpus: float) -> bool:
        queue = self._queues.get(queue_name)
        return queue is not None and self.usage.get(queue_name, 0.0) + gpus <= \
            queue.nominal_gpus + 1e-9

    def borrowing(self, queue_name: str) -> bool:
        queue = self._queues.get(queue_name)
        return queue is not None and self.usage.get(queue_name, 0.0) > queue.nominal_gpus + 1e-9

    def same_cohort(self, a: str, b: str) -> bool:
        qa, qb = self._queues.get(a), self._queues.get(b)
        return qa is not None and qb is not None and qa.cohort is not None and \
            qa.cohort == qb.cohort

    def charge(self, queue_name: str, gpus: float) -> None:
        self.usage[queue_name] = self.usage.get(queue_name, 0.0) + gpus
