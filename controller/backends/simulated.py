"""A simulated AI factory: fake GPU nodes with a real topology, drawing power by the model.

This is a first-class backend, not a test double: the simulator, the benchmarks and the
operator on clusters without GPUs (kind) all run work here. Time comes from an injected clock
(virtual for fast replays, wall-clock for the operator). Jobs progress at a speed set by
their power cap (a capped GPU clocks down: speed ~ cube root of the dynamic power share),
checkpoint every ``checkpoint_interval_seconds``, and lose only the work since the last
checkpoint when a node or GPU fails.

Energy is integrated per GPU from piecewise-constant power and attributed to the jobs that
own the GPU over time (shares split by milli-GPU), so job energy sums to the energy of the
allocated GPUs.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from aifactory.controller.backends.base import (
    GPUReading,
    TelemetrySnapshot,
    WorkloadPhase,
    WorkloadStatus,
)
from aifactory.controller.core.spec import JobKind, JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import NodeInfo
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.power.model import GPUPowerProfile, profile_for
from aifactory.controller.power.utilisation import (
    DEFAULT_MEMORY_GIB,
    GIB,
    default_utilization,
    speed_under_cap,
)

__all__ = ["SimulatedBackend"]







@dataclass(slots=True)
class _Workload:
    spec: JobSpec
    placement: Placement
    started_at: float
    runtime_seconds: float | None
    work_done_before: float
    speed: float
    utilization: float
    phase: WorkloadPhase = WorkloadPhase.RUNNING
    finished_at: float | None = None
    message: str = ""
    retryable: bool = True
    energy_joules: float = 0.0
    frozen_work: float | None = None
    # Since when ``speed`` holds (a power cap changed in place moves it), and the last
    # checkpoint's time before then.
    segment_at: float = -1.0
    checkpoint_before: float | None = None

    def __post_init__(self) -> None:
        if self.segment_at < 0:
            self.segment_at = self.started_at

    def work_done(self, now: float) -> float:
        if self.frozen_work is not None:
            return self.frozen_work
        return self.work_done_before + max(0.0, now - self.segment_at) * self.speed

    def finish_time(self) -> float | None:
        if self.runtime_seconds is None or self.phase is not WorkloadPhase.RUNNING:
            return None
        remaining = max(0.0, self.runtime_seconds - self.work_done_before)
        return self.segment_at + remaining / self.speed

    def change_speed(self, speed: float, now: float) -> None:
        """Run on at ``speed`` from ``now`` (work done so far kept)."""
        self.checkpoint_before = self.last_checkpoint_at(now)
        self.work_done_before = self.work_done(now)
        self.segment_at = now
        self.speed = speed

    def checkpointed_work(self, now: float) -> float:
        """Work saved at the last checkpoint (all of it for jobs that never checkpoint? no:
        a job without checkpoints loses everything)."""
        interval = self.spec.checkpoint_interval_seconds
        if interval is None:
            return 0.0
        done = self.work_done(now)
        return math.floor(done / interval) * interval

    def last_checkpoint_at(self, now: float) -> float:
        interval = self.spec.checkpoint_interval_seconds
        if interval is None:
            return self.started_at
        saved = self.checkpointed_work(now)
        if saved <= self.work_done_before:
            return self.started_at if self.checkpoint_before is None else \
                self.checkpoint_before
        return self.segment_at + (saved - self.work_done_before) / self.speed


@dataclass(slots=True)
class _GPU:
    node: int
    profile: GPUPowerProfile
    power: float
    energy: float = 0.0
    last: float = 0.0
    owners: dict[str, int] = field(default_factory=dict)
    failed: bool = False


class SimulatedBackend:
    """Simulated GPU nodes. ``clock()`` returns seconds (virtual or wall)."""

    def __init__(self, nodes: Sequence[NodeInfo], clock: Callable[[], float],
                 default_runtime_seconds: float | None = 3600.0) -> None:
        self._nodes = list(nodes)
        self._clock = clock
        # When each running job's status next changes (it finishes or checkpoints), as a
        # heap, and jobs changed otherwise (failed, stopped) since ``changed_jobs`` was asked.
        self._due: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}
        self._changed: set[str] = set()
        self.default_runtime_seconds = default_runtime_seconds
        self._node_index = {n.name: i for i, n in enumerate(self._nodes)}
        self._down: set[int] = set()
        self._removed: set[int] = set()  # deleted nodes: not reported any more
        self._gpus: list[_GPU] = []
        self._node_first_gpu: list[int] = []
        start = clock()
        for i, node in enumerate(self._nodes):
            self._node_first_gpu.append(len(self._gpus))
            profile = profile_for(node.gpu_model)
            for _ in range(node.gpus):
                self._gpus.append(_GPU(i, profile, profile.idle_power_watts(), last=start))
        self._jobs: dict[str, _Workload] = {}
        self._runtimes: dict[str, float | None] = {}

    # ----------------------------------------------------------------- backend protocol

    def inventory(self) -> Sequence[NodeInfo]:
        return [n for i, n in enumerate(self._nodes) if i not in self._down]

    def all_nodes(self) -> Sequence[NodeInfo]:
        return list(self._nodes)

    def set_runtime(self, job: str, seconds: float | None) -> None:
        """The true runtime of a job (from a trace); the scheduler never sees it."""
        self._runtimes[job] = seconds

    def launch(self, spec: JobSpec, placement: Placement, work_done: float = 0.0) -> None:
        now = self._clock()
        existing = self._jobs.get(spec.key)
        if existing is not None and existing.phase is WorkloadPhase.RUNNING:
            return
        runtime = self._runtimes.get(spec.key, spec.expected_runtime_seconds
                                     or self.default_runtime_seconds)
        if spec.kind is JobKind.INFERENCE and spec.key not in self._runtimes:
            runtime = None
        util = default_utilization(spec)
        # A CPU-only job holds no GPU: it runs at full speed and draws no GPU power.
        first = self._gpus[placement.slots[0].gpus[0]].profile \
            if placement.slots and placement.slots[0].gpus else None
        speed = speed_under_cap(first, util, spec.power_cap_watts_per_gpu) if first else 1.0
        work = _Workload(spec, placement, now, runtime, work_done, speed, util)
        # A relaunched job (after preemption or a failure) keeps its energy: the counter
        # stays monotonic and sums every run, as a job's energy bill should.
        work.energy_joules = existing.energy_joules if existing is not None else 0.0
        self._jobs[spec.key] = work
        for slot in placement.slots:
            for g in slot.gpus:
                gpu = self._gpus[g]
                self._settle(g, now)
                gpu.owners[spec.key] = slot.milli
                self._repower(g)
        self._changed.add(spec.key)
        self._schedule(spec.key, work, now)

    def _schedule(self, key: str, work: _Workload, now: float) -> None:
        """Remember when the job's status next changes: its end, or its next checkpoint."""
        at = work.finish_time()
        interval = work.spec.checkpoint_interval_seconds
        if interval and work.phase is WorkloadPhase.RUNNING and work.frozen_work is None:
            target = (math.floor(work.work_done(now) / interval) + 1) * interval
            checkpoint = work.segment_at + (target - work.work_done_before) / work.speed
            at = checkpoint if at is None else min(at, checkpoint)
        if at is None:
            self._due_at.pop(key, None)
            return
        self._due_at[key] = at
        heapq.heappush(self._due, (at, key))

    def changed_jobs(self) -> list[str]:
        """Jobs that finished, failed, stopped, started or checkpointed since the last call."""
        now = self._clock()
        changed = self._changed
        self._changed = set()
        while self._due and self._due[0][0] <= now + 1e-9:
            at, key = heapq.heappop(self._due)
            if self._due_at.get(key) != at:
                continue  # superseded by a later launch
            del self._due_at[key]
            changed.add(key)
            work = self._jobs.get(key)
            if work is not None and work.phase is WorkloadPhase.RUNNING:
                self._maybe_finish(work, now)
                if work.phase is WorkloadPhase.RUNNING:
                    self._schedule(key, work, now)
        return list(changed)

    def stop(self, job: str) -> None:
        work = self._jobs.get(job)
        if work is None:
            return
        now = self._clock()
        self._release(work, now)
        self._changed.add(job)
        if work.phase is WorkloadPhase.RUNNING:
            work.frozen_work = work.work_done(now)
            work.phase = WorkloadPhase.FAILED
            work.finished_at = now
            work.message = "stopped"

    def forget(self, job: str) -> None:
        self.stop(job)
        self._jobs.pop(job, None)

    def status(self, job: str) -> WorkloadStatus | None:
        work = self._jobs.get(job)
        if work is None:
            return None
        now = self._clock()
        self._maybe_finish(work, now)
        progress = 0.0
        if work.runtime_seconds:
            progress = min(1.0, work.work_done(now) / work.runtime_seconds)
        return WorkloadStatus(
            job=job, phase=work.phase, progress=progress, started_at=work.started_at,
            finished_at=work.finished_at, last_checkpoint_at=work.last_checkpoint_at(now),
            message=work.message, retryable=work.retryable,
            energy_joules=self._job_energy(work, now))

    def gpu_power(self) -> list[tuple[str, int, float]]:
        """Each GPU's draw now (``ReportsPower``): what ``telemetry`` reports as power."""
        names = [n.name for n in self._nodes]
        first = self._node_first_gpu
        return [(names[gpu.node], g - first[gpu.node], gpu.power)
                for g, gpu in enumerate(self._gpus) if gpu.node not in self._removed]

    def telemetry(self) -> TelemetrySnapshot:
        now = self._clock()
        for work in list(self._jobs.values()):
            self._maybe_finish(work, now)
        readings: list[GPUReading] = []
        for g, gpu in enumerate(self._gpus):
            if gpu.node in self._removed:
                continue
            self._settle(g, now)
            node = self._nodes[gpu.node]
            util = self._gpu_utilization(gpu)
            mem_total = DEFAULT_MEMORY_GIB.get(node.gpu_model, 80) * GIB
            used_share = sum(gpu.owners.values()) / MILLI_PER_GPU
            readings.append(GPUReading(
                node=node.name, index=g - self._node_first_gpu[gpu.node],
                model=node.gpu_model, power_watts=gpu.power, energy_joules=gpu.energy,
                utilization=util, memory_used_bytes=int(mem_total * 0.9 * used_share),
                memory_total_bytes=mem_total,
                temperature_celsius=30.0 + 45.0 * (gpu.power / gpu.profile.power_limit_watts),
                sm_clock_mhz=0.0 if gpu.failed else (1980.0 if gpu.owners else 345.0),
                power_limit_watts=gpu.profile.power_limit_watts, jobs=tuple(sorted(gpu.owners))))
        return TelemetrySnapshot(now, "simulated", tuple(readings))

    # ----------------------------------------------------------------- events

    def next_finish_for(self, job: str) -> float | None:
        """When a running job will complete at its current speed (None: never/unknown)."""
        work = self._jobs.get(job)
        return None if work is None else work.finish_time()

    def finished_jobs(self) -> list[str]:
        """Jobs that have completed by now (their GPUs released)."""
        now = self._clock()
        done = []
        for key, work in self._jobs.items():
            self._maybe_finish(work, now)
            if work.phase is WorkloadPhase.SUCCEEDED:
                done.append(key)
        return done

    def fail_node(self, name: str, message: str = "", removed: bool = False) -> list[str]:
        """A node dies: its jobs fail (retryable), it leaves the inventory (and, when
        ``removed``, its telemetry). Returns the jobs."""
        n = self._node_index[name]
        self._down.add(n)
        if removed:
            self._removed.add(n)
        hit = self._fail_gpus(set(range(self._node_first_gpu[n],
                                         self._node_first_gpu[n] + self._nodes[n].gpus)),
                              message or f"node {name} failed")
        return hit

    def fail_gpu(self, name: str, index: int, message: str = "") -> list[str]:
        n = self._node_index[name]
        return self._fail_gpus({self._node_first_gpu[n] + index},
                               message or f"GPU {index} on node {name} failed")

    def repair_node(self, name: str) -> None:
        n = self._node_index[name]
        self._down.discard(n)
        self._removed.discard(n)
        now = self._clock()
        for g in range(self._node_first_gpu[n], self._node_first_gpu[n] + self._nodes[n].gpus):
            self._settle(g, now)
            self._gpus[g].failed = False
            self._repower(g)

    def running_work(self, job: str) -> tuple[JobSpec, float, float] | None:
        """A running job's spec, the seconds of work it has done and its joules so far (to
        carry it over to a backend over a changed inventory), or None."""
        work = self._jobs.get(job)
        if work is None or work.phase is not WorkloadPhase.RUNNING:
            return None
        now = self._clock()
        return work.spec, work.work_done(now), self._job_energy(work, now)

    def resume(self, spec: JobSpec, placement: Placement, work_done: float,
               energy_joules: float, runtime_seconds: float | None = None) -> None:
        """Run a job carried over from another simulated backend, where it stood."""
        if runtime_seconds is not None:
            self._runtimes[spec.key] = runtime_seconds
        self.launch(spec, placement, work_done=work_done)
        self._jobs[spec.key].energy_joules = energy_joules

    def set_power_cap(self, job: str, watts_per_gpu: float | None) -> None:
        """``CapsPower``: the running job's GPUs draw and run as capped from now on."""
        work = self._jobs.get(job)
        if work is None or work.phase is not WorkloadPhase.RUNNING:
            return
        now = self._clock()
        self._maybe_finish(work, now)
        if work.phase is not WorkloadPhase.RUNNING:
            return
        work.spec = replace(work.spec, power_cap_watts_per_gpu=watts_per_gpu)
        first = self._gpus[work.placement.slots[0].gpus[0]].profile \
            if work.placement.slots and work.placement.slots[0].gpus else None
        work.change_speed(speed_under_cap(first, work.utilization, watts_per_gpu)
                          if first else 1.0, now)
        for slot in work.placement.slots:
            for g in slot.gpus:
                self._settle(g, now)
                self._repower(g)
        self._changed.add(job)
        self._schedule(job, work, now)

    def set_utilization(self, job: str, utilization: float) -> None:
        """``FollowsLoad``: the running job's GPUs draw at ``utilization`` from now on
        (energy up to now is settled at the old draw)."""
        work = self._jobs.get(job)
        if work is None or work.phase is not WorkloadPhase.RUNNING:
            return
        now = self._clock()
        work.utilization = min(1.0, max(0.0, utilization))
        for slot in work.placement.slots:
            for g in slot.gpus:
                self._settle(g, now)
                self._repower(g)

    def failed_gpus(self) -> list[tuple[str, int]]:
        return [(self._nodes[gpu.node].name, g - self._node_first_gpu[gpu.node])
                for g, gpu in enumerate(self._gpus) if gpu.failed]

    def saved_work(self, job: str) -> float:
        """Seconds of work kept by the job's last checkpoint (restart resumes from here)."""
        work = self._jobs.get(job)
        if work is None:
            return 0.0
        now = self._clock()
        if work.frozen_work is not None and work.phase is WorkloadPhase.FAILED:
            interval = work.spec.checkpoint_interval_seconds
            return 0.0 if interval is None else \
                math.floor(work.frozen_work / interval) * interval
        return work.checkpointed_work(now)

    def job_energy_joules(self, job: str) -> float:
        work = self._jobs.get(job)
        return 0.0 if work is None else self._job_energy(work, self._clock())

    # ----------------------------------------------------------------- internals

    def _fail_gpus(self, gpus: set[int], message: str) -> list[str]:
        now = self._clock()
        hit: list[str] = []
        for key, work in self._jobs.items():
            if work.phase is not WorkloadPhase.RUNNING:
                continue
            if any(g in gpus for s in work.placement.slots for g in s.gpus):
                self._maybe_finish(work, now)
                if work.phase is not WorkloadPhase.RUNNING:
                    continue
                work.frozen_work = work.work_done(now)
                self._release(work, now)
                self._changed.add(key)
                work.phase = WorkloadPhase.FAILED
                work.finished_at = now
                work.message = message
                work.retryable = True
                hit.append(key)
        for g in gpus:
            self._settle(g, now)
            self._gpus[g].failed = True
            self._repower(g)
        return hit

    def _maybe_finish(self, work: _Workload, now: float) -> None:
        end = work.finish_time()
        if end is not None and end <= now + 1e-9:
            work.frozen_work = work.runtime_seconds
            self._release(work, end)
            work.phase = WorkloadPhase.SUCCEEDED
            work.finished_at = end
            work.message = "completed"

    def _release(self, work: _Workload, at: float) -> None:
        for slot in work.placement.slots:
            for g in slot.gpus:
                gpu = self._gpus[g]
                if work.spec.key in gpu.owners:
                    self._settle(g, at)
                    del gpu.owners[work.spec.key]
                    self._repower(g)

    def _gpu_utilization(self, gpu: _GPU) -> float:
        util = 0.0
        for job, milli in gpu.owners.items():
            work = self._jobs.get(job)
            if work is not None:
                util += work.utilization * milli / MILLI_PER_GPU
        return min(1.0, util)

    def _repower(self, g: int) -> None:
        gpu = self._gpus[g]
        if gpu.failed:
            gpu.power = 0.0
            return
        if not gpu.owners:
            gpu.power = gpu.profile.idle_power_watts()
            return
        caps = [w.spec.power_cap_watts_per_gpu for j in gpu.owners
                if (w := self._jobs.get(j)) is not None and w.spec.power_cap_watts_per_gpu]
        gpu.power = gpu.profile.power_watts(self._gpu_utilization(gpu),
                                            min(caps) if caps else None)

    def _settle(self, g: int, now: float) -> None:
        gpu = self._gpus[g]
        dt = now - gpu.last
        if dt <= 0:
            return
        joules = gpu.power * dt
        gpu.energy += joules
        total = sum(gpu.owners.values())
        if total:
            for job, milli in gpu.owners.items():
                work = self._jobs.get(job)
                if work is not None:
                    work.energy_joules += joules * milli / total
        gpu.last = now

    def _job_energy(self, work: _Workload, now: float) -> float:
        if work.phase is WorkloadPhase.RUNNING:
            for slot in work.placement.slots:
                for g in slot.gpus:
                    self._settle(g, now)
        return work.energy_joules
