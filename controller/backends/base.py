"""The small interface every cluster backend implements, and the values it speaks in.

Backends are swappable the way httpx swaps transports: the simulated factory
(``controller.backends.simulated``) and the Ray backend implement the same five calls —
inventory, launch, stop, status, telemetry — and the scheduler never knows which one runs
the work.

What a backend can do beyond those five it states by implementing small capability
Protocols, checked with ``isinstance`` (they are ``runtime_checkable``), never probed by
attribute name: ``ForgetsJobs`` (drop a job's records and stop what still runs),
``SavesWork`` (seconds of work a job's last checkpoint holds), ``MetersJobEnergy`` (joules
per job, split from per-GPU counters) and ``AdoptsGangs`` (find the gangs it runs after a
control-plane restart, take them over or remove them). A third backend implements the five
calls and whichever capabilities it has.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import NodeInfo

__all__ = [
    "AdoptsGangs",
    "CapsPower",
    "ClusterBackend",
    "FailsNodes",
    "FollowsLoad",
    "ForgetsJobs",
    "FoundGang",
    "GPUReading",
    "MetersJobEnergy",
    "RefusesRuntimes",
    "ReplicaLoad",
    "ReportsLoad",
    "RuntimeRefusal",
    "SavesWork",
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
    and launch): the gang is requeued without counting a restart. ``lost_nodes`` names the
    nodes whose workers were lost, when the backend knows: only those workers need to move
    (``controller.runtime.repair``). ``fatal_reason`` (a CamelCase reason such as
    ``RuntimeEnvSetupFailed``) marks a FAILED job no restart can help, because what it asks
    for cannot be set up (its code cannot be fetched, its image cannot be run): the control
    plane fails it at once and the reason becomes its Failed condition's."""

    job: str
    phase: WorkloadPhase
    progress: float = 0.0
    started_at: float = 0.0
    finished_at: float | None = None
    last_checkpoint_at: float | None = None
    message: str = ""
    retryable: bool = True
    energy_joules: float = 0.0
    lost_nodes: tuple[str, ...] = ()  # FAILED: nodes whose workers were lost (hot swap)
    fatal_reason: str | None = None  # FAILED for good: never restarted


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


# ----------------------------------------------------------------- optional capabilities


@runtime_checkable
class ForgetsJobs(Protocol):
    """A backend that keeps per-job records (status, energy, checkpoints) and can drop them:
    the control plane calls it when a job is cancelled or its record is forgotten, so a
    plane that runs for months holds only live and recent jobs."""

    def forget(self, job: str) -> None:
        """Stop the job if it still runs, and drop everything kept about it."""
        ...


@runtime_checkable
class SavesWork(Protocol):
    """A backend that knows how much work a job's last checkpoint holds."""

    def saved_work(self, job: str) -> float:
        """Seconds of work the job's last checkpoint holds (0 before the first)."""
        ...


@dataclass(frozen=True, slots=True)
class RuntimeRefusal:
    """Why a backend can never run a job's runtime as written: ``reason`` is CamelCase (the
    job's Failed condition reason), ``message`` says what to change."""

    reason: str
    message: str


@runtime_checkable
class RefusesRuntimes(Protocol):
    """A backend that knows before placing a job that it cannot run the job's runtime (Ray
    without container support and a ``runtime.image``): the control plane fails such a job
    at submission, so it never takes GPUs, nor preempts anyone for them."""

    def runtime_refusal(self, spec: JobSpec) -> RuntimeRefusal | None:
        """Why ``spec`` can never run here, or None."""
        ...


@runtime_checkable
class ReportsChanges(Protocol):
    """A backend that knows when each job's status changes (it finished, failed, or wrote a
    checkpoint), so the control plane's poll reads only those jobs instead of every running
    one: what keeps a pass cheap with 20,000 jobs running. The simulated factory knows it
    from its clock; a backend without it is polled job by job."""

    def changed_jobs(self) -> list[str]:
        """Jobs whose status may differ since the last call (each at least once)."""
        ...


@runtime_checkable
class ReportsPower(Protocol):
    """A backend that says each GPU's draw now without a whole telemetry snapshot (energy,
    memory, utilisation of every GPU): what the operator reads every status refresh for
    per-job watts, cheap at 20,000 GPUs."""

    def gpu_power(self) -> list[tuple[str, int, float]]:
        """(node, node-local GPU index, watts) of every reporting GPU."""
        ...


@runtime_checkable
class CapsPower(Protocol):
    """A backend that changes the power cap of a running job's GPUs in place, without a
    restart (grid-event curtailment): the simulated factory changes its model; on real GPUs
    an actuator sets NVML's power limit (``controller.backends.actuators``)."""

    def set_power_cap(self, job: str, watts_per_gpu: float | None) -> None:
        """Cap each GPU of the running job at ``watts_per_gpu`` (None: the GPU's default)."""
        ...


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """What one serving inference replica reports: requests in flight now, and counters
    since it started (requests answered, the seconds they took in all) from which request
    rate and mean latency follow; ``endpoint`` is where it takes requests (None: unknown)."""

    in_flight: float
    requests_total: float = 0.0
    latency_seconds_total: float = 0.0
    endpoint: str | None = None


@runtime_checkable
class ReportsLoad(Protocol):
    """A source of inference load: the Ray backend's serving workers, or the simulator's
    traffic model. The autoscaler (``controller.runtime.scaler``) reads it every sync."""

    def replica_load(self, job: str) -> ReplicaLoad | None:
        """The replica's load; None while it does not serve (not ready)."""
        ...


@runtime_checkable
class FollowsLoad(Protocol):
    """A backend whose modelled GPUs are as busy as their jobs' traffic says (the simulated
    factory, where an inference replica's load comes from a request-rate curve)."""

    def set_utilization(self, job: str, utilization: float) -> None:
        """The running job's GPUs are ``utilization`` (0-1) busy from now on."""
        ...


@runtime_checkable
class MetersJobEnergy(Protocol):
    """A backend that attributes GPU energy to jobs by their GPU share."""

    def job_energy_joules(self, job: str) -> float:
        """Joules the job's GPUs drew for it, over every run the backend remembers."""
        ...


@runtime_checkable
class FailsNodes(Protocol):
    """A backend whose nodes the control plane declares failed and repaired: the simulated
    factory, which learns of a node's failure from outside (the operator from Node
    objects). A real backend learns of dead nodes itself (Ray's raylets)."""

    def fail_node(self, name: str, message: str = "", removed: bool = False) -> list[str]:
        """The node fails: its gangs fail (retryable, with ``message``) and it leaves the
        inventory; ``removed``: it is gone for good, and no longer reported. Returns the
        jobs that failed."""
        ...

    def repair_node(self, name: str) -> None:
        """The node is back: it rejoins the inventory with idle GPUs."""
        ...


class FoundGang(Protocol):
    """A gang a backend found running: its job and (node, local GPUs, milli) per worker."""

    @property
    def job(self) -> str: ...

    @property
    def slots(self) -> tuple[tuple[str, tuple[int, ...], int], ...]: ...

    @property
    def started_at(self) -> float: ...


G = TypeVar("G", bound=FoundGang)


@runtime_checkable
class AdoptsGangs(Protocol[G]):
    """A backend whose work outlives the control plane (Ray's detached actors): after a
    restart it lists the gangs it runs, takes over the ones the plane still wants and
    removes the others."""

    def adoptable(self) -> Sequence[G]:
        """The gangs running now, as found."""
        ...

    def adopt(self, spec: JobSpec, gang: G) -> None:
        """Manage ``gang`` as the job ``spec`` (status, stop, energy) from now on."""
        ...

    def discard(self, gang: G) -> None:
        """Stop and remove a gang no job wants."""
        ...
