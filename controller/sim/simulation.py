"""Discrete-event simulation of a factory: arrivals, scheduling cycles, completions, failures.

``Simulation`` is the control plane (``controller.runtime.controlplane``) with the simulated backend
on a virtual clock: it runs the pure scheduler at every event (fast replays of real traces),
turns completions into events instead of polling, and injects node and GPU failures. Metrics
are gathered as it goes, so every policy is measured the same way.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aifactory.controller.backends.base import WorkloadPhase
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.clock import VirtualClock
from aifactory.controller.core.spec import JobKind, JobSpec
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.controller.core.topology import Topology
from aifactory.controller.inputs.factory import FactorySpec
from aifactory.controller.inputs.workload import Arrival
from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.runtime.controlplane import ControlPlane, JobRecord
from aifactory.controller.runtime.curtailment import CurtailmentController
from aifactory.controller.runtime.measurements import SimResult
from aifactory.controller.runtime.scaler import Autoscaler
from aifactory.controller.scheduling.cycle_io import CycleResult
from aifactory.controller.sim.traffic import TrafficModel

__all__ = ["FailureEvent", "Simulation"]




@dataclass(frozen=True, slots=True)
class FailureEvent:
    """Inject a failure: a whole node (``gpu`` None) or one GPU, repaired after a while."""

    at: float
    node: str
    gpu: int | None = None
    repair_after_seconds: float | None = None


class Simulation(ControlPlane):
    """The control plane on a virtual clock with the simulated backend: feed it arrivals and
    failures, then ``run()``. Completions are events, so a replay never polls."""

    def __init__(self, factory: FactorySpec, policy: PlacementPolicy | str = "aifactory",
                 *, backfill: bool = True, preemption: bool = True, seed: int = 0,
                 decision_clock: Callable[[], float] | None = time.perf_counter,
                 power_capping_min_speed: float | None = None) -> None:
        self.clock = VirtualClock()
        topo = Topology.build(factory.nodes, factory.levels)
        self.sim_backend = SimulatedBackend(topo.nodes, self.clock, None)
        super().__init__(factory, self.sim_backend, policy, backfill=backfill,
                         preemption=preemption, seed=seed, clock=self.clock,
                         decision_clock=decision_clock, topology=topo,
                         power_capping_min_speed=power_capping_min_speed)
        self._events: list[tuple[float, int, str, object]] = []
        # Called as (from, to) before the virtual clock moves forward: the state seen then
        # held for the whole interval (aifactory.controller.sim.timeseries samples it).
        self.on_advance: list[Callable[[float, float], None]] = []
        self.grid: CurtailmentController | None = None
        self.grid_period_seconds = 5.0
        self.scaler: Autoscaler | None = None
        self.traffic: TrafficModel | None = None
        self._scale_until = 0.0

    def _advance_clock(self, to: float) -> None:
        if to > self.clock.now:
            for hook in self.on_advance:
                hook(self.clock.now, to)
            self.clock.now = to

    # ----------------------------------------------------------------- input

    def submit_at(self, spec: JobSpec, at: float | None = None,
                  runtime_seconds: float | None = None) -> None:
        """Schedule an arrival at virtual time ``at`` (default now)."""
        when = self.now if at is None else at
        self._push(when, "arrival", Arrival(spec, when, runtime_seconds))

    def submit_all(self, arrivals: Iterable[Arrival]) -> None:
        for a in arrivals:
            self._push(a.at, "arrival", a)

    def inject(self, failure: FailureEvent) -> None:
        self._push(failure.at, "failure", failure)

    def attach_grid(self, grid: CurtailmentController, period_seconds: float = 5.0) -> None:
        """Step ``grid`` (budgets following schedules and grid events) at every change of
        a window or event, and every ``period_seconds`` while a budget is lowered or a job
        is capped or paused: the control period the response time is measured against."""
        self.grid = grid
        self.grid_period_seconds = period_seconds
        self._push(self.now, "grid", None)

    def _grid_tick(self) -> None:
        grid = self.grid
        assert grid is not None
        grid.step()
        busy = grid.capped or grid.paused or any(
            lim.cause is not None for lim in grid.limits.values())
        change = grid.next_wakeup(self.now)
        at = self.now + self.grid_period_seconds if busy else change
        if change is not None and at is not None:
            at = min(at, change)
        # Ticks never keep a finished replay alive (a daily window recurs forever).
        if at is not None and (self._events or self._running or self._queued or grid.paused):
            self._push(at, "grid", None)

    def attach_autoscaler(self, scaler: Autoscaler, traffic: TrafficModel | None,
                          until: float) -> None:
        """Sync ``scaler`` every ``scaler.sync_seconds`` of virtual time up to ``until``,
        with ``traffic`` (the services' request load) refreshed just before each sync."""
        self.scaler = scaler
        self.traffic = traffic
        self._scale_until = until
        self._push(self.now, "scale", None)

    def _scale_tick(self) -> None:
        assert self.scaler is not None
        if self.traffic is not None:
            self.traffic.refresh()
        self.scaler.step(force=True)
        at = self.now + self.scaler.sync_seconds
        if at <= self._scale_until:
            self._push(at, "scale", None)

    def recap(self, rec: JobRecord, watts_per_gpu: float | None, why: str) -> None:
        super().recap(rec, watts_per_gpu, why)
        finish = self.sim_backend.next_finish_for(rec.spec.key)
        if finish is not None:  # its speed changed: so did its end
            self._push(finish, "finish", (rec.spec.key, rec.generation))

    def _push(self, at: float, kind: str, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    # ----------------------------------------------------------------- running

    def run(self, until: float | None = None,
            progress: Callable[[int, int], None] | None = None) -> SimResult:
        """Process every event (or those up to ``until``) on the virtual clock."""
        total = sum(1 for e in self._events if e[2] == "arrival")
        handled = 0
        while self._events:
            at = self._events[0][0]
            if until is not None and at > until:
                break
            self._advance_clock(at)
            while self._events and self._events[0][0] <= self.clock.now:
                _, _, kind, payload = heapq.heappop(self._events)
                handled += kind == "arrival"
                self._handle(kind, payload)
            self.cycle()
            if progress is not None:
                progress(handled, total)
        if until is not None:
            self._advance_clock(until)
        return self.result()

    def advance_to(self, now: float | None = None) -> CycleResult | None:
        """Real-time stepping: handle what is due by ``now`` (wall clock), then one cycle."""
        self._advance_clock(now if now is not None else self.clock.now)
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
                    rec.energy_joules = status.energy_joules
                    self.finish(rec, now)
        elif kind == "failure":
            assert isinstance(payload, FailureEvent)
            self._fail(payload)
        elif kind == "grid":
            self._grid_tick()
        elif kind == "scale":
            self._scale_tick()
        elif kind == "repair":
            assert isinstance(payload, str)
            self.sim_backend.repair_node(payload)
            fence = self.state.release(f"!failed/{payload}")
            if fence is not None:
                self.metrics.fenced_gpus -= fence.gpu_equivalents
            self._dirty = True

    def _arrive(self, a: Arrival) -> None:
        key = a.spec.key
        if key in self.jobs and not self.jobs[key].done:
            return
        self.enqueue(a.spec, a.runtime_seconds, a.at)
        if a.runtime_seconds is not None or a.spec.kind is JobKind.TRAINING:
            self.sim_backend.set_runtime(key, a.runtime_seconds
                                         if a.runtime_seconds is not None
                                         else a.spec.expected_runtime_seconds or 3600.0)

    def _launch(self, rec: JobRecord, placement: Placement) -> None:
        self.sim_backend.launch(self.running_spec(rec), placement, rec.work_saved)
        finish = self.sim_backend.next_finish_for(rec.spec.key)
        if finish is not None:
            self._push(finish, "finish", (rec.spec.key, rec.generation))

    def _fail(self, failure: FailureEvent) -> None:
        if failure.gpu is None:
            hit = self.sim_backend.fail_node(failure.node)
            node = self.topo.node_index[failure.node]
            bad = tuple(g for g in self.topo.gpu_range(node))
        else:
            hit = self.sim_backend.fail_gpu(failure.node, failure.gpu)
            node = self.topo.node_index[failure.node]
            bad = (self.topo.gpu_start[node] + failure.gpu,)
        for key in hit:
            rec = self.jobs[key]
            self.state.release(key)
            self.metrics.job_stopped(rec.spec, self.now)
            self.requeue(rec, f"{failure.node} failed", restart=True)
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
