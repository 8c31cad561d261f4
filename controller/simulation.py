"""Discrete-event simulation of a factory: arrivals, scheduling cycles, completions, failures.

``Simulation`` owns the authoritative usage (``ClusterState``), the queue and the simulated
backend, and runs the pure scheduler at every event on a virtual clock (fast replays of real
traces), or is stepped by wall-clock time (``advance_to``) for the operator. Metrics are
gathered as it goes, so every policy is measured the same way.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from controller.backends.base import WorkloadPhase
from controller.backends.simulated import SimulatedBackend, default_utilization
from controller.factory import FactorySpec
from controller.metrics import SimMetrics, SimResult
from controller.placement import PlacementRequest, Unplaced
from controller.policies import PlacementPolicy, make_policy
from controller.power import profile_for
from controller.scheduler import CycleResult, QueuedJob, RunningJob, SchedulerConfig, schedule
from controller.spec import JobKind, JobSpec
from controller.state import BudgetIndex, ClusterState, Placement, WorkerSlot
from controller.topology import Topology

__all__ = ["Arrival", "FailureEvent", "Simulation", "VirtualClock", "build_state"]


@dataclass(frozen=True, slots=True)
class Arrival:
    """A job entering the queue at ``at`` seconds; ``runtime_seconds`` is its true length
    (known to the simulator, hidden from the scheduler); None = runs until stopped."""

    spec: JobSpec
    at: float = 0.0
    runtime_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class FailureEvent:
    """Inject a failure: a whole node (``gpu`` None) or one GPU, repaired after a while."""

    at: float
    node: str
    gpu: int | None = None
    repair_after_seconds: float | None = None


class VirtualClock:
    """A clock the simulation moves; reads are free."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def watts_estimator(topo: Topology) -> Callable[[JobSpec], float]:
    """Estimated draw above idle per GPU of a job: worst eligible model, capped if asked.

    Training is budgeted at full utilization (conservative); inference at its expected
    utilization."""
    def estimate(spec: JobSpec) -> float:
        models = spec.gpu_models or topo.models
        util = 1.0 if spec.kind is JobKind.TRAINING else default_utilization(spec)
        best = 0.0
        for model in models:
            profile = profile_for(model)
            draw = profile.power_watts(util, spec.power_cap_watts_per_gpu)
            best = max(best, draw - profile.idle_power_watts())
        return best
    return estimate


def build_state(factory: FactorySpec, topo: Topology) -> ClusterState:
    """Empty usage with the factory's power budgets indexed over its topology."""
    idle = [profile_for(m).idle_power_watts() for m in topo.models]
    budgets = BudgetIndex.build(
        topo, [(b.name, b.watts, dict(b.selector)) for b in factory.power_budgets], idle,
        factory.base_watts_per_node)
    return ClusterState(topo, budgets)


@dataclass(slots=True)
class _JobRecord:
    spec: JobSpec
    submitted_at: float
    seq: int
    runtime: float | None
    work_saved: float = 0.0
    restarts: int = 0
    first_start: float | None = None
    started_at: float | None = None
    last_checkpoint_at: float = 0.0
    placement: Placement | None = None
    partial: Placement | None = None
    generation: int = 0
    done: bool = False
    failed_reason: str | None = None
    reason: str = ""
    reason_kind: str = ""
    history: list[str] = field(default_factory=list)


class Simulation:
    """One factory, one policy. Feed it arrivals and failures, then ``run()``."""

    def __init__(self, factory: FactorySpec, policy: PlacementPolicy | str = "aifactory",
                 *, backfill: bool = True, preemption: bool = True, seed: int = 0,
                 clock: Callable[[], float] | None = None,
                 decision_clock: Callable[[], float] | None = time.perf_counter) -> None:
        self.factory = factory
        self.topo = Topology.build(factory.nodes, factory.levels)
        self.policy = make_policy(policy, seed) if isinstance(policy, str) else policy
        self.clock = VirtualClock() if clock is None else None
        self._now_fn: Callable[[], float] = clock if clock is not None else self.clock  # type: ignore[assignment]
        self.state = build_state(factory, self.topo)
        self.config = SchedulerConfig(
            policy=self.policy, empty=build_state(factory, self.topo),
            watts_per_gpu=watts_estimator(self.topo), queues=factory.queues,
            backfill=backfill, preemption=preemption)
        self.backend = SimulatedBackend(self.topo.nodes, self._now_fn, None)
        self.jobs: dict[str, _JobRecord] = {}
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = itertools.count()
        self._dirty = False
        self.decision_clock = decision_clock
        self.metrics = SimMetrics(self.topo, self.state, factory.cost)
        self.metrics.start(self._now_fn())

    # ----------------------------------------------------------------- input

    @property
    def now(self) -> float:
        return self._now_fn()

    def submit(self, spec: JobSpec, at: float | None = None,
               runtime_seconds: float | None = None) -> None:
        when = self.now if at is None else at
        self._push(when, "arrival", Arrival(spec, when, runtime_seconds))

    def submit_all(self, arrivals: Iterable[Arrival]) -> None:
        for a in arrivals:
            self._push(a.at, "arrival", a)

    def inject(self, failure: FailureEvent) -> None:
        self._push(failure.at, "failure", failure)

    def cancel(self, key: str) -> None:
        """Remove a job: stop it if running, drop it if queued (the operator's delete)."""
        rec = self.jobs.get(key)
        if rec is None:
            return
        if rec.placement is not None or rec.partial is not None:
            self.state.release(key)
            self.backend.forget(key)
            self.metrics.job_stopped(rec.spec, self.now)
        rec.placement = rec.partial = None
        rec.done = True
        rec.failed_reason = rec.failed_reason or "deleted"
        self._dirty = True

    def _push(self, at: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    # ----------------------------------------------------------------- running

    def run(self, until: float | None = None,
            progress: Callable[[int, int], None] | None = None) -> SimResult:
        """Process every event (or those up to ``until``) on the virtual clock."""
        assert self.clock is not None, "run() needs the virtual clock; use advance_to()"
        total = sum(1 for e in self._events if e[2] == "arrival")
        handled = 0
        while self._events:
            at = self._events[0][0]
            if until is not None and at > until:
                break
            self.clock.now = max(self.clock.now, at)
            while self._events and self._events[0][0] <= self.clock.now:
                _, _, kind, payload = heapq.heappop(self._events)
                handled += kind == "arrival"
                self._handle(kind, payload)
            self.cycle()
            if progress is not None:
                progress(handled, total)
        if until is not None:
            self.clock.now = max(self.clock.now, until)
        return self.result()

    def advance_to(self, now: float | None = None) -> CycleResult | None:
        """Real-time stepping: handle what is due by ``now`` (wall clock), then one cycle."""
        if self.clock is not None:
            self.clock.now = max(self.clock.now, now if now is not None else self.clock.now)
        current = self.now
        while self._events and self._events[0][0] <= current:
            _, _, kind, payload = heapq.heappop(self._events)
            self._handle(kind, payload)
        return self.cycle(force=True)

    def _handle(self, kind: str, payload: object) -> None:
        now = self.now
        if kind == "arrival":
            assert isinstance(payload, Arrival)
            self._arrive(payload)
        elif kind == "finish":
            assert isinstance(payload, tuple)
            key, generation = payload
            rec = self.jobs.get(key)
            if rec is not None and rec.generation == generation and rec.placement is not None:
                status = self.backend.status(key)
                if status is not None and status.phase is WorkloadPhase.SUCCEEDED:
                    self._finish(rec, now)
        elif kind == "failure":
            assert isinstance(payload, FailureEvent)
            self._fail(payload)
        elif kind == "repair":
            assert isinstance(payload, str)
            self.backend.repair_node(payload)
            fence = self.state.release(f"!failed/{payload}")
            if fence is not None:
                self.metrics.fenced_gpus -= fence.gpu_equivalents
            self._dirty = True

    def _arrive(self, a: Arrival) -> None:
        key = a.spec.key
        if key in self.jobs and not self.jobs[key].done:
            return
        rec = _JobRecord(a.spec, a.at, next(self._seq), a.runtime_seconds)
        self.jobs[key] = rec
        if a.runtime_seconds is not None or a.spec.kind is JobKind.TRAINING:
            self.backend.set_runtime(key, a.runtime_seconds
                                     if a.runtime_seconds is not None
                                     else a.spec.expected_runtime_seconds or 3600.0)
        self.metrics.job_submitted(a.spec)
        self._dirty = True

    def _finish(self, rec: _JobRecord, now: float) -> None:
        self.state.release(rec.spec.key)
        rec.placement = None
        rec.done = True
        rec.history.append(f"{now:.0f}s succeeded")
        self.metrics.job_stopped(rec.spec, now)
        self.metrics.job_completed(rec.spec, self.backend.job_energy_joules(rec.spec.key))
        self._dirty = True

    def _fail(self, failure: FailureEvent) -> None:
        if failure.gpu is None:
            hit = self.backend.fail_node(failure.node)
            node = self.topo.node_index[failure.node]
            bad = tuple(g for g in self.topo.gpu_range(node))
        else:
            hit = self.backend.fail_gpu(failure.node, failure.gpu)
            node = self.topo.node_index[failure.node]
            bad = (self.topo.gpu_start[node] + failure.gpu,)
        for key in hit:
            rec = self.jobs[key]
            self.state.release(key)
            self.metrics.job_stopped(rec.spec, self.now)
            self._requeue(rec, f"{failure.node} failed", restart=True)
        # Fence the broken GPUs so nothing lands there until repair.
        free_bad = tuple(g for g in bad if self.state.gpu_used_milli[g] == 0)
        fence_key = f"!failed/{failure.node}"
        if free_bad and fence_key not in self.state.allocations:
            fence = Placement(fence_key, (WorkerSlot(node, free_bad),))
            self.state.allocate(fence)
            self.metrics.fenced_gpus += fence.gpu_equivalents
        if failure.repair_after_seconds is not None:
            self._push(self.now + failure.repair_after_seconds, "repair", failure.node)
        self._dirty = True

    def _requeue(self, rec: _JobRecord, why: str, restart: bool) -> None:
        rec.work_saved = self.backend.saved_work(rec.spec.key)
        rec.placement = None
        rec.started_at = None
        rec.generation += 1
        if restart:
            rec.restarts += 1
            self.metrics.restarts += 1
            if rec.restarts > rec.spec.restart_limit:
                rec.done = True
                rec.failed_reason = (f"{why}; restart limit {rec.spec.restart_limit} reached")
                self.metrics.jobs_failed += 1
                return
        rec.history.append(f"{self.now:.0f}s requeued: {why}")
        rec.submitted_at = rec.submitted_at  # keeps its place in line

    # ----------------------------------------------------------------- the cycle

    def pending(self) -> list[QueuedJob]:
        return [QueuedJob(r.spec, r.submitted_at, r.seq, r.partial)
                for r in self.jobs.values() if not r.done and r.placement is None]

    def running(self) -> list[RunningJob]:
        return [RunningJob(r.spec, r.placement, r.started_at or 0.0, r.last_checkpoint_at)
                for r in self.jobs.values() if r.placement is not None and not r.done]

    def cycle(self, force: bool = False) -> CycleResult | None:
        if not (self._dirty or force):
            return None
        self._dirty = False
        now = self.now
        running = self.running()
        for r in running:
            status = self.backend.status(r.spec.key)
            if status is not None and status.last_checkpoint_at is not None:
                self.jobs[r.spec.key].last_checkpoint_at = status.last_checkpoint_at
        pending = self.pending()
        if not pending:
            self.metrics.observe(now)
            return None
        result = schedule(self.state, pending, self.running(), now, self.config,
                          self.decision_clock)
        self._apply(result, now)
        self.metrics.observe(now)
        return result

    def _apply(self, result: CycleResult, now: float) -> None:
        self.metrics.decisions(result.decision_seconds)
        for pre in result.preempted:
            rec = self.jobs[pre.victim]
            self.state.release(pre.victim)
            self.backend.stop(pre.victim)
            self.metrics.job_stopped(rec.spec, now)
            self.metrics.preemptions += 1
            rec.history.append(f"{now:.0f}s {pre.reason}")
            self._requeue(rec, pre.reason, restart=False)
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
            if rec.first_start is None:
                rec.first_start = now
                self.metrics.job_started(rec.spec, now - rec.submitted_at, adm.placement)
            rec.history.append(f"{now:.0f}s admitted on {len(adm.placement.nodes)} nodes")
            self.backend.launch(rec.spec, adm.placement, rec.work_saved)
            self.metrics.job_running(rec.spec, adm.placement, now)
            finish = self.backend.next_finish_for(adm.job)
            if finish is not None:
                self._push(finish, "finish", (adm.job, rec.generation))
        for key, reason in result.failed.items():
            rec = self.jobs[key]
            rec.done = True
            rec.failed_reason = reason
            self.metrics.jobs_failed += 1
        for key, reason in result.waiting.items():
            rec = self.jobs[key]
            rec.reason = reason
            rec.reason_kind = result.waiting_kind.get(key, "")
            if rec.reason_kind == "capacity":
                req = PlacementRequest.resolve(rec.spec, self.topo)
                if not isinstance(req, Unplaced) and not req.fractional and \
                        self.state.free_gpus(self.topo.root, req.models) >= req.total_gpus:
                    self.metrics.unplaced_while_free.add(key)

    def result(self) -> SimResult:
        now = self.now
        never = sum(1 for r in self.jobs.values() if r.first_start is None)
        return self.metrics.result(self.policy.name, now, self.backend, never)
