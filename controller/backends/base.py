"""The small interface every cluster backend implements, and the values it speaks in.

Backends are swappable the way httpx swaps transports: the simulated factory
(``aifactory.controller.backends.simulated``) and the Ray backend implement the same five calls —
inventory, launch, stop, status, telemetry — and the scheduler never knows which one runs
the work.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import NodeInfo

__all__ = [
    "ClusterBackend",
    "GPUReading",
    "TelemetrySnapshot",
    "WorkloadPhase",
    "WorkloadStatus",
]


class WorkloadPhase(enum.Enum):
    """Where launched work is in its life on the backend."""

    STARTING = "Starting"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True, slots=True)
class WorkloadStatus:
    """What a backend knows about one launched job.

    For a FAILED job, ``retryable`` True means the work itself failed (a worker or its node
    died): the gang is requeued from its last checkpoint and the failure counts against the
    job's restart limit. False means nothing ran (the chosen node vanished between placement
    and launch): the gang is requeued without counting a restart."""

    job: str
    phase: WorkloadPhase
    progress: float = 0.0
    started_at: float = 0.0
    finished_at: float | None = None
    last_checkpoint_at: float | None = None
    message: str = ""
    retryable: bool = True
    energy_joules: float = 0.0


@dataclass(frozen=True, slots=True)
class GPUReading:
    """One GPU's telemetry. ``energy_joules`` is a monotonic counter since the backend began
    (the NVML total-energy counter on real GPUs)."""

    node: str
    index: int
    model: str
    power_watts: float
    energy_joules: float
    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_celsius: float
    sm_clock_mhz: float
    power_limit_watts: float
    jobs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TelemetrySnapshot:
    """All GPU readings at one instant, and where they came from (``simulated``/``nvml``)."""

    at: float
    source: str
    gpus: tuple[GPUReading, ...]


class ClusterBackend(Protocol):
    """Runs placed work. Every call is cheap; long work happens behind it."""

    def inventory(self) -> Sequence[NodeInfo]:
        """The GPU nodes that can take work now (failed nodes left out)."""
        ...

    def launch(self, spec: JobSpec, placement: Placement, *, work_done: float = 0.0) -> None:
        """Start every worker of the gang where the placement says. Idempotent per job.

        ``work_done``: seconds of work the job's last checkpoint holds (a requeued job
        resumes from there). A backend that keeps real checkpoints (Ray: the job's
        checkpoint directory) may ignore it; the simulated one starts from it."""
        ...

    def stop(self, job: str) -> None:
        """Stop a job's workers and release what the backend holds. Idempotent."""
        ...

    def status(self, job: str) -> WorkloadStatus | None:
        """The job's status, or None if the backend does not know it."""
        ...

    def telemetry(self) -> TelemetrySnapshot:
        """Power, energy and utilization of every GPU now."""
        ...
