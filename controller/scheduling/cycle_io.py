"""What a scheduling cycle takes and gives (``aifactory.controller.scheduling.cycle`` runs it).

Kept apart from the cycle itself so the cycle module stays readable: the queued and running
jobs it sees, what it decides (admissions, preemptions, reasons to wait), and the
configuration it runs under (all frozen values), and ``CycleMemory``, what the cycles
keep between them, owned by their caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aifactory.controller.core.spec import JobSpec, QueueSpec
from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.placement.fragmentation import WorkloadMix
from aifactory.controller.placement.request import PlacementRequest, Unplaced

__all__ = [
    "INF",
    "MEMO_ENTRIES",
    "Admission",
    "CycleMemory",
    "CycleResult",
    "Preemption",
    "QueuedJob",
    "RunningJob",
    "SchedulerConfig",
]

INF = float("inf")


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """A job waiting for GPUs. ``partial`` holds GPUs a non-gang policy already bound."""

    spec: JobSpec
    submitted_at: float
    seq: int
    partial: Placement | None = None


@dataclass(frozen=True, slots=True)
class RunningJob:
    """An admitted job: where it runs, since when, and when it last checkpointed."""

    spec: JobSpec
    placement: Placement
    started_at: float
    last_checkpoint_at: float

    def lost_gpu_seconds(self, now: float) -> float:
        """Work lost if evicted now: GPUs x seconds since the last checkpoint."""
        return self.placement.gpu_equivalents * max(0.0, now - self.last_checkpoint_at)

    def expected_end(self) -> float:
        runtime = self.spec.expected_runtime_seconds
        return INF if runtime is None else self.started_at + runtime


@dataclass(frozen=True, slots=True)
class Admission:
    """A job to start. ``power_cap_watts``: a per-GPU power cap the scheduler imposed so
    the gang fits its power budgets now (power-capped admission), else None."""

    job: str
    placement: Placement
    backfilled: bool = False
    borrowing: bool = False
    power_cap_watts: float | None = None


@dataclass(frozen=True, slots=True)
class Preemption:
    victim: str
    preemptor: str
    lost_gpu_seconds: float
    reason: str


@dataclass(frozen=True, slots=True)
class CycleResult:
    admitted: tuple[Admission, ...] = ()
    preempted: tuple[Preemption, ...] = ()
    waiting: Mapping[str, str] = field(default_factory=dict)
    waiting_kind: Mapping[str, str] = field(default_factory=dict)
    failed: Mapping[str, str] = field(default_factory=dict)
    partial: Mapping[str, Placement] = field(default_factory=dict)
    decision_seconds: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """What a cycle needs besides the state. ``watts_per_gpu(spec)`` estimates draw above
    idle per GPU for a job (the power model's job); ``empty`` is the empty factory, for
    reasons that never change."""

    policy: PlacementPolicy
    empty: ClusterState
    watts_per_gpu: Callable[[JobSpec], float]
    queues: tuple[QueueSpec, ...] = ()
    backfill: bool = True
    preemption: bool = True
    max_preemption_domains: int = 8
    # Victim searches per cycle (kueue tries preemption for the heads only): the blocked
    # jobs are nominated highest priority first, so the most important ones search first
    # and the rest try again next cycle.
    max_preemption_searches: int = 8
    # Power-capped admission: for a job, the per-GPU caps it may run under, highest first,
    # each with its draw estimate above idle per GPU. A gang that waits only on power is
    # admitted under the highest cap that fits. None turns it off.
    power_caps: Callable[[JobSpec], Sequence[tuple[float, float]]] | None = None


# Entries each memo of ``CycleMemory`` holds before it starts again: a bound on the memory of
# a control plane that runs for months, far above any queue a cycle sees.
MEMO_ENTRIES = 200_000


@dataclass(slots=True)
class CycleMemory:
    """What the scheduler keeps between cycles, owned by whoever runs the cycles (the
    control plane) and passed to each: nothing that changes a decision hides in the config
    or the policy.

    ``mix``: the workload the fragmentation score learns from (each job once, when it is
    nominated). ``requests``: a job's resolved request and never-fits verdict by key (the
    spec object kept and compared by identity: the same queued job is nominated every
    cycle). ``levels``: the lowest level with a domain that could hold a gang shape on the
    empty factory. The two memos are caches (dropped whole past ``MEMO_ENTRIES``); the mix
    is state, and a fresh ``CycleMemory`` starts a workload from nothing."""

    mix: WorkloadMix = field(default_factory=WorkloadMix)
    requests: dict[str, tuple[JobSpec, PlacementRequest | Unplaced, Unplaced | None]] = field(
        default_factory=dict, repr=False)
    levels: dict[tuple[int, int, frozenset[int] | None], int | None] = field(
        default_factory=dict, repr=False)

    def remember_request(self, spec: JobSpec, req: PlacementRequest | Unplaced,
                         never: Unplaced | None) -> None:
        if len(self.requests) >= MEMO_ENTRIES:
            self.requests.clear()
        self.requests[spec.key] = (spec, req, never)

    def remember_level(self, key: tuple[int, int, frozenset[int] | None],
                       level: int | None) -> None:
        if len(self.levels) >= MEMO_ENTRIES:
            self.levels.clear()
        self.levels[key] = level
