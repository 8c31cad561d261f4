"""The control plane: one factory's queue, usage and jobs, driving any cluster backend.

It owns the authoritative ``ClusterState`` and the job records, runs the pure scheduler
(``controller.scheduling.cycle.schedule``) when something changed, launches admitted gangs on the
backend, stops preempted ones, and polls the backend for completions and failures (a failed
gang is requeued from its last checkpoint up to its restart limit). The simulator
(``controller.sim.simulation``) is this class on a virtual clock with the simulated backend; the
operator drives it in real time with the simulated or the Ray backend.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from aifactory.controller.backends.base import (
    CapsPower,
    ClusterBackend,
    FollowsLoad,
    ForgetsJobs,
    RefusesRuntimes,
    ReportsChanges,
    SavesWork,
    WorkloadPhase,
    WorkloadStatus,
)
from aifactory.controller.core.placements import describe_placement
from aifactory.controller.core.spec import JobSpec, PowerBudgetSpec, QueueSpec
from aifactory.controller.core.state import BudgetIndex, ClusterState, Placement
from aifactory.controller.core.topology import Topology
from aifactory.controller.inputs.factory import FactorySpec
from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.placement.registry import make_policy
from aifactory.controller.placement.request import PlacementRequest, Unplaced
from aifactory.controller.power.estimates import power_cap_options, watts_estimator
from aifactory.controller.power.model import profile_for
from aifactory.controller.runtime.measurements import SimMetrics, SimResult
from aifactory.controller.scheduling.cycle import schedule
from aifactory.controller.scheduling.cycle_io import (
    CycleMemory,
    CycleResult,
    QueuedJob,
    RunningJob,
    SchedulerConfig,
)

__all__ = ["ControlPlane", "JobPhase", "JobRecord", "build_state"]


class JobPhase:
    """Phases a job's status shows (strings, as the CRDs' ``status.phase``)."""

    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"






def build_state(factory: FactorySpec, topo: Topology) -> ClusterState:
    """Empty usage with the factory's power budgets indexed over its topology."""
    idle = [profile_for(m).idle_power_watts() for m in topo.models]
    budgets = BudgetIndex.build(
        topo, [(b.name, b.watts, dict(b.selector)) for b in factory.power_budgets], idle,
        factory.base_watts_per_node)
    return ClusterState(topo, budgets)


@dataclass(slots=True)
class JobRecord:
    """Everything the control plane knows about one job; the operator writes it to status."""

    spec: JobSpec
    submitted_at: float
    seq: int
    runtime: float | None = None
    work_saved: float = 0.0
    restarts: int = 0
    preemptions: int = 0
    first_start: float | None = None
    started_at: float | None = None
    last_checkpoint_at: float = 0.0
    placement: Placement | None = None
    partial: Placement | None = None
    generation: int = 0
    done: bool = False
    succeeded: bool = False
    failed_reason: str | None = None
    fatal_reason: str | None = None  # the backend's reason when no restart could help
    reason: str = ""
    reason_kind: str = ""
    waited_because: str = ""  # the last reason it waited for before it first started
    energy_joules: float = 0.0
    where: str = ""
    power_cap_watts: float | None = None  # imposed by power-capped admission while running
    utilization: float | None = None  # its GPUs' load now, when known (inference traffic)
    history: list[str] = field(default_factory=list)

    @property
    def phase(self) -> str:
        if self.done:
            return JobPhase.SUCCEEDED if self.succeeded else JobPhase.FAILED
        return JobPhase.RUNNING if self.placement is not None else JobPhase.QUEUED


class ControlPlane:
    """One factory, one policy, one backend. Thread-confined: call it from one thread."""

    def __init__(self, factory: FactorySpec, backend: ClusterBackend,
                 policy: PlacementPolicy | str = "aifactory", *, backfill: bool = True,
                 preemption: bool = True, seed: int = 0,
                 clock: Callable[[], float] = time.time,
                 decision_clock: Callable[[], float] | None = time.perf_counter,
                 topology: Topology | None = None,
                 power_capping_min_speed: float | None = None) -> None:
        self.factory = factory
        self.topo = topology or Topology.build(factory.nodes, factory.levels)
        self.policy = make_policy(policy, seed) if isinstance(policy, str) else policy
        self._now_fn = clock
        self.state = build_state(factory, self.topo)
        self.config = SchedulerConfig(
            policy=self.policy, empty=build_state(factory, self.topo),
            watts_per_gpu=watts_estimator(self.topo), queues=factory.queues,
            backfill=backfill, preemption=preemption,
            power_caps=None if power_capping_min_speed is None else power_cap_options(
                self.topo, power_capping_min_speed))
        # What the scheduler keeps between cycles: the workload mix, memoised verdicts.
        self.memory = CycleMemory()
        self.backend = backend
        self.jobs: dict[str, JobRecord] = {}
        # The queued and the running jobs, kept as they change so that a cycle costs
        # O(queued), not O(every job ever seen), and the scheduler gets the running set and
        # each queue's usage ready-made.
        self._queued: dict[str, JobRecord] = {}
        self._held: dict[str, JobRecord] = {}  # paused: out of the queue until released
        self._running: dict[str, RunningJob] = {}
        self._usage_milli: dict[str, int] = {}
        self._seq = itertools.count()
        self._dirty = False
        self.decision_clock = decision_clock
        self.metrics = SimMetrics(self.topo, self.state, factory.cost)
        self.metrics.start(self.now)
        self.last_cycle: CycleResult | None = None
        self.cycles = 0
        self.listeners: list[Callable[[str, JobRecord, str], None]] = []

    @property
    def now(self) -> float:
        return self._now_fn()

    # ----------------------------------------------------------------- input

    def submit(self, spec: JobSpec, runtime_seconds: float | None = None,
               at: float | None = None) -> JobRecord:
        """Queue a job now (idempotent per key while it is not done). A job the backend can
        never run as written (``RefusesRuntimes``) fails at once, never placed."""
        existing = self.jobs.get(spec.key)
        refusal = self.backend.runtime_refusal(spec) \
            if isinstance(self.backend, RefusesRuntimes) else None
        if refusal is None or (existing is not None and not existing.done):
            return self.enqueue(spec, runtime_seconds, at)
        rec = JobRecord(spec, self.now if at is None else at, next(self._seq), runtime_seconds,
                        done=True, failed_reason=refusal.message, fatal_reason=refusal.reason)
        self.jobs[spec.key] = rec
        self.metrics.job_submitted(spec)
        self.metrics.jobs_failed += 1
        self._emit("Failed", rec, refusal.message)
        return rec

    def enqueue(self, spec: JobSpec, runtime_seconds: float | None = None,
                at: float | None = None) -> JobRecord:
        """Put a job in the queue, submitted at ``at`` (default now)."""
        key = spec.key
        existing = self.jobs.get(key)
        if existing is not None and not existing.done:
            return existing
        when = self.now if at is None else at
        rec = JobRecord(spec, when, next(self._seq), runtime_seconds)
        self.jobs[key] = rec
        self._queued[key] = rec
        self.metrics.job_submitted(spec)
        self._dirty = True
        self._emit("Queued", rec, "queued")
        return rec

    def adopt(self, spec: JobSpec, placement: Placement, started_at: float,
              submitted_at: float | None = None, restarts: int = 0) -> JobRecord:
        """Take over a job already running where ``placement`` says (after a restart of the
        control plane): its GPUs are marked used and nothing is launched twice."""
        rec = self.enqueue(spec, at=submitted_at)
        if rec.placement is not None:
            return rec
        self.state.allocate(placement)
        rec.placement = placement
        rec.started_at = rec.first_start = started_at
        rec.last_checkpoint_at = started_at
        rec.restarts = restarts
        self._now_running(rec)
        self.metrics.job_running(spec, placement, self.now)
        return rec

    def cancel(self, key: str) -> None:
        """Remove a job: stop it if running, drop it if queued (the operator's delete).
        The backend and the metrics forget it too."""
        rec = self.jobs.pop(key, None)
        if rec is None:
            return
        self._queued.pop(key, None)
        self._held.pop(key, None)
        self._not_running(key)
        held = rec.placement is not None or rec.partial is not None
        if held:
            self.state.release(key)
            self.metrics.job_stopped(rec.spec, self.now)
        self._forget_elsewhere(key, stop=held)
        self._dirty = True

    def forget(self, key: str) -> bool:
        """Drop a finished job's record, and what the backend and the metrics keep about
        it, so a control plane that runs for months holds only live and recent jobs.
        Returns False, keeping the job, when it is unknown or not finished (cancel those)."""
        rec = self.jobs.get(key)
        if rec is None or not rec.done:
            return False
        del self.jobs[key]
        self._forget_elsewhere(key, stop=False)
        return True

    def _forget_elsewhere(self, key: str, stop: bool) -> None:
        if isinstance(self.backend, ForgetsJobs):  # stops what runs and drops its records
            self.backend.forget(key)
        elif stop:
            self.backend.stop(key)
        self.metrics.forget(key)

    def reconfigure(self, queues: tuple[QueueSpec, ...] | None = None,
                    power_budgets: tuple[PowerBudgetSpec, ...] | None = None) -> None:
        """Replace the queues and/or power budgets while jobs run (the operator's GPUQueue and
        PowerBudget objects changed). Allocations are kept; the budget estimates are rebuilt
        over them, and the next cycle sees the new limits."""
        factory = replace(
            self.factory,
            queues=self.factory.queues if queues is None else queues,
            power_budgets=self.factory.power_budgets if power_budgets is None
            else power_budgets)
        now = self.now
        running = [r for r in self.jobs.values() if r.placement is not None and not r.done]
        for rec in running:
            self.metrics.job_stopped(rec.spec, now)
        state = build_state(factory, self.topo)
        for placement in self.state.allocations.values():
            state.allocate(placement)
        self.factory = factory
        self.state = state
        self.config = replace(self.config, empty=build_state(factory, self.topo),
                              queues=factory.queues)
        self.metrics.rebind(state)
        for rec in running:
            assert rec.placement is not None
            self.metrics.job_running(rec.spec, rec.placement, now)
        self._dirty = True

    # ----------------------------------------------------------------- grid events

    def set_budget_limits(self, limits: Mapping[str, float]) -> None:
        """Move PowerBudget limits in place (a schedule window or a grid event began or
        ended): nothing is rebuilt, and the next cycle admits against the new limits."""
        index = self.state.budgets
        new = tuple(limits.get(n, w) for n, w in zip(index.names, index.limits, strict=True))
        if new == index.limits:
            return
        budgets = replace(index, limits=new)
        self.state.budgets = budgets
        self.config.empty.budgets = budgets
        self._dirty = True

    def recap(self, rec: JobRecord, watts_per_gpu: float | None, why: str) -> None:
        """Change a running job's per-GPU power cap in place (None: back to its own), on a
        backend that ``CapsPower``: its budget estimate, modelled draw and speed follow."""
        assert rec.placement is not None and isinstance(self.backend, CapsPower)
        key, now = rec.spec.key, self.now
        self.metrics.job_stopped(self.running_spec(rec), now)
        rec.power_cap_watts = watts_per_gpu
        spec = self.running_spec(rec)
        placement = replace(rec.placement, watts_per_gpu=self.config.watts_per_gpu(spec))
        self.state.release(key)
        self.state.allocate(placement)
        rec.placement = placement
        self._running[key] = replace(self._running[key], spec=spec, placement=placement)
        self.backend.set_power_cap(key, spec.power_cap_watts_per_gpu)
        self.metrics.job_running(spec, placement, now)
        rec.history.append(f"{now:.0f}s {why}")
        self._dirty = True
        self._emit("PowerCapped", rec, why)

    def pause(self, rec: JobRecord, why: str) -> None:
        """Stop a running job (it resumes from its last checkpoint) and hold it out of the
        queue until ``release_hold``: not a restart, not a preemption."""
        key = rec.spec.key
        self.state.release(key)
        self.metrics.job_stopped(self.running_spec(rec), self.now)
        self.requeue(rec, why, restart=False)
        self.backend.stop(key)
        if self._queued.pop(key, None) is not None:
            self._held[key] = rec
        rec.reason = why
        self._dirty = True
        self._emit("Paused", rec, why)

    def release_hold(self, key: str, why: str) -> None:
        """A paused job goes back to the queue (the next cycle may start it)."""
        rec = self._held.pop(key, None)
        if rec is None or rec.done:
            return
        rec.reason = why
        self._queued[key] = rec
        self._dirty = True
        self._emit("Resumed", rec, why)

    def _emit(self, reason: str, rec: JobRecord, message: str) -> None:
        for listener in self.listeners:
            listener(reason, rec, message)

    def _now_running(self, rec: JobRecord) -> None:
        """Book-keeping when a job starts running (its placement is set)."""
        key = rec.spec.key
        assert rec.placement is not None
        self._queued.pop(key, None)
        self._not_running(key)
        self._running[key] = RunningJob(self.running_spec(rec), rec.placement,
                                        rec.started_at or 0.0, rec.last_checkpoint_at)
        queue = rec.spec.queue
        self._usage_milli[queue] = self._usage_milli.get(queue, 0) + round(
            rec.placement.gpu_equivalents * 1000)

    @staticmethod
    def running_spec(rec: JobRecord) -> JobSpec:
        """The spec a job runs with: its own, under the power cap admission imposed, at
        the GPU load its traffic gives it (when known)."""
        if rec.power_cap_watts is None and rec.utilization is None:
            return rec.spec
        spec = rec.spec
        if rec.power_cap_watts is not None:
            spec = replace(spec, power_cap_watts_per_gpu=rec.power_cap_watts)
        if rec.utilization is not None:
            spec = replace(spec, expected_utilization=rec.utilization)
        return spec

    def set_utilization(self, rec: JobRecord, utilization: float) -> None:
        """A running job's GPUs are now ``utilization`` busy (an inference replica's load
        moved): its modelled draw follows, and so does the backend's where it
        ``FollowsLoad``. The budget estimate it was admitted with is kept."""
        if rec.placement is None or rec.utilization == utilization:
            return
        now = self.now
        self.metrics.job_stopped(self.running_spec(rec), now)
        rec.utilization = utilization
        spec = self.running_spec(rec)
        self._running[rec.spec.key] = replace(self._running[rec.spec.key], spec=spec)
        if isinstance(self.backend, FollowsLoad):
            self.backend.set_utilization(rec.spec.key, utilization)
        self.metrics.job_running(spec, rec.placement, now)

    def _not_running(self, key: str) -> None:
        job = self._running.pop(key, None)
        if job is not None:
            queue = job.spec.queue
            self._usage_milli[queue] -= round(job.placement.gpu_equivalents * 1000)

    # ----------------------------------------------------------------- real-time stepping

    def step(self) -> CycleResult | None:
        """Poll the backend for finished or failed work, then run one scheduling cycle."""
        self.poll()
        return self.cycle(force=True)

    def poll(self, repair: Callable[[JobRecord, WorkloadStatus], bool] | None = None
             ) -> None:
        """Finished, failed and checkpointed work from the backend: only the jobs whose
        status changed when the backend says which (``ReportsChanges``), else every running
        job. A gang that failed because it lost workers on named nodes goes to ``repair``
        first (a hot swap); when that returns True it has dealt with the gang."""
        backend = self.backend
        keys = [k for k in backend.changed_jobs() if k in self._running] \
            if isinstance(backend, ReportsChanges) else list(self._running)
        for key in keys:
            rec = self.jobs[key]
            if rec.placement is None or rec.done:
                continue
            status = self.backend.status(key)
            if status is None:
                continue
            if status.last_checkpoint_at is not None and \
                    status.last_checkpoint_at != rec.last_checkpoint_at:
                rec.last_checkpoint_at = status.last_checkpoint_at
                self._running[key] = replace(self._running[key],
                                             last_checkpoint_at=rec.last_checkpoint_at)
            rec.energy_joules = status.energy_joules
            if status.phase is WorkloadPhase.SUCCEEDED:
                self.finish(rec, status.finished_at or self.now)
            elif status.phase is WorkloadPhase.FAILED:
                if status.fatal_reason is not None:
                    self.fail_for_good(rec, status.message or "worker failed",
                                       status.fatal_reason)
                    continue
                if repair is not None and status.retryable and status.lost_nodes and \
                        repair(rec, status):
                    continue
                self.fail_running(rec, status.message or "worker failed",
                                  restart=status.retryable)

    def finish(self, rec: JobRecord, at: float) -> None:
        self.state.release(rec.spec.key)
        self._not_running(rec.spec.key)
        rec.placement = None
        rec.done = rec.succeeded = True
        rec.history.append(f"{at:.0f}s succeeded")
        self.metrics.job_stopped(rec.spec, at)
        self.metrics.job_completed(rec.spec, rec.energy_joules)
        self._dirty = True
        self._emit("Succeeded", rec, "all workers finished")

    def fail_running(self, rec: JobRecord, why: str, restart: bool = True) -> None:
        """A running gang lost a worker: release it and requeue (or fail past the limit)."""
        key = rec.spec.key
        self.state.release(key)
        self.metrics.job_stopped(rec.spec, self.now)
        self.requeue(rec, why, restart=restart)
        self.backend.stop(key)
        self._dirty = True

    def fail_for_good(self, rec: JobRecord, why: str, reason: str) -> None:
        """A running gang failed in a way no restart helps (``WorkloadStatus.fatal_reason``):
        release it and fail the job now, whatever its restart limit."""
        key = rec.spec.key
        self.state.release(key)
        self.metrics.job_stopped(rec.spec, self.now)
        self._not_running(key)
        self._queued.pop(key, None)
        rec.placement = None
        rec.done = True
        rec.failed_reason = why
        rec.fatal_reason = reason
        rec.history.append(f"{self.now:.0f}s failed: {why}")
        self.metrics.jobs_failed += 1
        self.backend.stop(key)
        self._dirty = True
        self._emit("Failed", rec, why)

    def relocate(self, rec: JobRecord, placement: Placement, why: str) -> None:
        """Restart a running gang from its last checkpoint on ``placement`` (a repair that
        moved some of its workers): counted as a restart, reported as ``Repaired``."""
        key = rec.spec.key
        now = self.now
        if isinstance(self.backend, SavesWork):
            rec.work_saved = self.backend.saved_work(key)
        self.backend.stop(key)
        self.metrics.job_stopped(rec.spec, now)
        self.state.release(key)
        self.state.allocate(placement)
        rec.placement = placement
        rec.started_at = rec.last_checkpoint_at = now
        rec.restarts += 1
        rec.generation += 1
        self.metrics.restarts += 1
        self._now_running(rec)
        rec.where = describe_placement(placement, self.topo)
        rec.history.append(f"{now:.0f}s repaired: {why}")
        self._launch(rec, placement)
        self.metrics.job_running(self.running_spec(rec), placement, now)
        self._dirty = True
        self._emit("Repaired", rec, why)

    def requeue(self, rec: JobRecord, why: str, restart: bool) -> None:
        if isinstance(self.backend, SavesWork):
            rec.work_saved = self.backend.saved_work(rec.spec.key)
        rec.placement = None
        rec.started_at = None
        rec.power_cap_watts = None
        rec.utilization = None
        rec.generation += 1
        self._not_running(rec.spec.key)
        if self.jobs.get(rec.spec.key) is rec:
            self._queued[rec.spec.key] = rec
        if restart:
            rec.restarts += 1
            self.metrics.restarts += 1
            if rec.restarts > rec.spec.restart_limit:
                rec.done = True
                self._queued.pop(rec.spec.key, None)
                rec.failed_reason = f"{why}; restart limit {rec.spec.restart_limit} reached"
                self.metrics.jobs_failed += 1
                self._emit("Failed", rec, rec.failed_reason)
                return
            self._emit("Restarting", rec, f"{why}; restart {rec.restarts} of "
                       f"{rec.spec.restart_limit} from the last checkpoint")
        rec.history.append(f"{self.now:.0f}s requeued: {why}")

    # ----------------------------------------------------------------- the cycle

    def pending(self) -> list[QueuedJob]:
        return [QueuedJob(r.spec, r.submitted_at, r.seq, r.partial)
                for r in self._queued.values()]

    def running(self) -> list[RunningJob]:
        return list(self._running.values())

    def queue_usage(self) -> dict[str, float]:
        """GPUs (fractions included) held by each queue's running jobs."""
        return {q: milli / 1000 for q, milli in self._usage_milli.items()}

    def cycle(self, force: bool = False) -> CycleResult | None:
        if not (self._dirty or force):
            return None
        self._dirty = False
        now = self.now
        pending = self.pending()
        if not pending:
            self.metrics.observe(now)
            return None
        result = schedule(self.state, pending, self._running, now, self.config,
                          self.decision_clock, queue_usage=self.queue_usage(),
                          memory=self.memory)
        self.cycles += 1
        self.last_cycle = result
        self._apply(result, now)
        self.metrics.observe(now)
        return result

    def _launch(self, rec: JobRecord, placement: Placement) -> None:
        # A requeued job resumes from the work its last checkpoint saved.
        self.backend.launch(self.running_spec(rec), placement, work_done=rec.work_saved)

    def _apply(self, result: CycleResult, now: float) -> None:
        self.metrics.decisions(result.decision_seconds)
        self.metrics.count_attempts(len(result.admitted), len(result.waiting), len(result.failed))
        for pre in result.preempted:
            rec = self.jobs[pre.victim]
            self.state.release(pre.victim)
            self.metrics.job_stopped(rec.spec, now)
            self.metrics.preemptions += 1
            rec.preemptions += 1
            rec.history.append(f"{now:.0f}s {pre.reason}")
            self.requeue(rec, pre.reason, restart=False)
            self.backend.stop(pre.victim)
            self._emit("Preempted", rec, pre.reason)
        for key, placement in result.partial.items():
            rec = self.jobs[key]
            self.state.release(key)
            self.state.allocate(placement)
            rec.partial = placement
        for adm in result.admitted:
            rec = self.jobs[adm.job]
            if adm.job not in self.state.allocations:
                self.state.allocate(adm.placement)
            rec.partial = None
            rec.placement = adm.placement
            rec.started_at = now
            rec.last_checkpoint_at = now
            if rec.first_start is None and rec.reason:
                rec.waited_because = rec.reason
            rec.reason = ""
            rec.power_cap_watts = adm.power_cap_watts
            self._now_running(rec)
            if rec.first_start is None:
                rec.first_start = now
                self.metrics.job_started(rec.spec, now - rec.submitted_at, adm.placement)
            rec.where = describe_placement(adm.placement, self.topo)
            rec.history.append(f"{now:.0f}s admitted: {rec.where}")
            self._launch(rec, adm.placement)
            self.metrics.job_running(self.running_spec(rec), adm.placement, now)
            self._emit("Admitted", rec, rec.where)
        for key, reason in result.failed.items():
            rec = self.jobs[key]
            rec.done = True
            rec.failed_reason = reason
            self._queued.pop(key, None)
            self.metrics.jobs_failed += 1
            self._emit("Failed", rec, reason)
        free_now = self.state.free_gpus(self.topo.root)
        seen_free = self.metrics.unplaced_while_free
        for key, reason in result.waiting.items():
            rec = self.jobs[key]
            changed = reason != rec.reason
            rec.reason = reason
            rec.reason_kind = result.waiting_kind.get(key, "")
            if rec.reason_kind in ("capacity", "locality") and key not in seen_free and \
                    0 < rec.spec.total_gpus <= free_now:
                req = PlacementRequest.resolve(rec.spec, self.topo)
                if not isinstance(req, Unplaced) and not req.fractional and \
                        self.state.free_gpus(self.topo.root, req.models) >= req.total_gpus:
                    self.metrics.unplaced_while_free.add(key)
            if changed:
                self._emit("Waiting", rec, reason)

    def result(self) -> SimResult:
        never = sum(1 for r in self.jobs.values() if r.first_start is None)
        return self.metrics.result(self.policy.name, self.now, never)
