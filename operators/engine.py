"""The engine: the one place the ControlPlane lives, driven by one asyncio task.

The core is not thread-safe and need not be: handlers (``operators.handlers``) only append
requests to a queue and wake the engine; the engine task drains the queue, lets the core poll
its backend and run a scheduling cycle, and turns what changed into status patches and Events
for the outbox (``operators.outbox``). So a burst of 300 creations is a few scheduling
cycles, not 300, and a handler returns in microseconds.

Loop, every ``tick_seconds`` (100 ms) or as soon as a request arrives (after
``coalesce_seconds`` to gather a burst):

1. apply requests: submit, rescale or cancel jobs; replace queues and power budgets;
2. ``poll`` the backend (finished and failed work), then a scheduling ``cycle`` when
   anything changed (and at least once a second);
3. publish: the status of every object whose phase or conditions changed, Events for each
   transition (``operators.transitions``), and, every ``status_interval_seconds``, energy,
   power and cost of running jobs, waiting reasons whose words changed, and the status of
   queues and budgets.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.controlplane import ControlPlane, JobRecord
from controller.errors import SpecError
from controller.spec import JobSpec, PowerBudgetSpec, QueueSpec
from operators.configstatus import ConfigEntry, config_statuses
from operators.kube import KubeClient
from operators.objects import StatusContext, Tracked, job_status, service_status
from operators.outbox import Outbox
from operators.status import Conditions
from operators.transitions import end_run, on_core_event
from operators.translate import (
    QUEUE_KIND,
    SERVICE_KIND,
    budget_from_manifest,
    format_time,
    job_spec_from_manifest,
    parse_time,
    queue_from_manifest,
    replica_index,
    replica_specs,
    service_base,
)

__all__ = ["Engine", "EngineOptions", "SimClock"]

log = logging.getLogger(__name__)
METERS = ("message", "energyJoules", "energyKWh", "gpuHours", "costDollars", "powerWatts")


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Timing of the engine loop, in seconds."""

    tick_seconds: float = 0.1
    coalesce_seconds: float = 0.005
    status_interval_seconds: float = 5.0
    writers: int = 6
    delete_timeout_seconds: float = 30.0


class SimClock:
    """The core's clock: wall time times ``speed`` (1 wall second = ``speed`` simulated
    seconds). Absolute, so times written to status stay valid across operator restarts."""

    def __init__(self, speed: float = 1.0) -> None:
        if not speed > 0:
            raise SpecError("--sim-speed", f"must be a number > 0, got {speed}")
        self.speed = speed

    def __call__(self) -> float:
        return time.time() * self.speed

    def to_wall(self, t: float) -> float:
        return t / self.speed

    def from_wall(self, wall: float) -> float:
        return wall * self.speed


def _shape(status: dict[str, Any]) -> dict[str, Any]:
    """A status less its words and meters: a change here is written at once."""
    shape = {k: v for k, v in status.items() if k not in METERS}
    shape["conditions"] = [{k: v for k, v in c.items() if k != "message"}
                           for c in status.get("conditions") or []]
    return shape


class Engine:
    """Owns the ControlPlane; everything else talks to it through requests."""

    def __init__(self, cp: ControlPlane, kube: KubeClient, clock: SimClock,
                 options: EngineOptions = EngineOptions()) -> None:
        self.cp = cp
        self.clock = clock
        self.opts = options
        self.objects: dict[tuple[str, str, str], Tracked] = {}
        self.owner: dict[str, Tracked] = {}
        self.configs: dict[tuple[str, str], ConfigEntry] = {}
        self.stats: dict[str, float] = collections.defaultdict(float)
        self.outbox = Outbox(kube, self.stats, options.writers)
        self.kube = kube
        self.power_needed = False
        self.last_gpu_power: list[float] = []
        self.snapshot: dict[str, Any] = {}
        self.on_admitted: list[Callable[[Tracked, str], None]] = []
        self._requests: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self._dirty: set[Tracked] = set()
        self._deferred: set[Tracked] = set()
        self._config_dirty = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_refresh = 0.0
        self._last_forced = 0.0
        cp.listeners.append(lambda reason, rec, msg: on_core_event(self, reason, rec, msg))

    # ----------------------------------------------------------------- requests (handlers)

    def apply_job(self, kind: str, body: dict[str, Any]) -> None:
        """A TrainingJob/InferenceService was created, resumed or changed (idempotent)."""
        self._request("apply", (kind, body))

    async def delete_job(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Release the object's GPUs; returns once the core has let them go."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._request("delete", (kind, namespace, name, uid, done))
        await asyncio.wait_for(done, self.opts.delete_timeout_seconds)

    def apply_config(self, kind: str, body: dict[str, Any], deleted: bool) -> None:
        """A GPUQueue or PowerBudget appeared, changed or went away."""
        self._request("config", (kind, body, deleted))

    def _request(self, verb: str, args: Any) -> None:
        self._requests.append((verb, args))
        self._wake.set()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.stats["last_iteration_monotonic"] = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="aifactory-engine")
        self.outbox.start()

    async def stop(self, flush_seconds: float = 5.0) -> None:
        """Stop the loop, give pending writes ``flush_seconds`` to land, then close."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self.outbox.close(flush_seconds)
        await self.kube.close()

    def health(self) -> dict[str, Any]:
        """For kopf's liveness endpoint: raises unless the loop iterated recently."""
        if self._task is None or self._task.done():
            raise RuntimeError("the engine loop is not running")
        age = time.monotonic() - self.stats["last_iteration_monotonic"]
        if age > 30:
            raise RuntimeError(f"the engine loop last ran {age:.0f} s ago")
        return {"jobs": len(self.cp.jobs), "iterations": int(self.stats["iterations"])}

    # ----------------------------------------------------------------- the loop

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.opts.tick_seconds)
                if self.opts.coalesce_seconds:
                    await asyncio.sleep(self.opts.coalesce_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            try:
                self.iterate()
            except Exception:  # never let one bad pass end the operator
                self.stats["loop_errors"] += 1
                log.exception("engine iteration failed; continuing")

    def iterate(self) -> None:
        """One pass: requests, backend poll, scheduling cycle, publish."""
        started = time.perf_counter()
        while self._requests:
            verb, args = self._requests.popleft()
            try:
                self._handle(verb, args)
            except Exception:
                self.stats["request_errors"] += 1
                log.exception("request %s failed", verb)
        self.cp.poll()
        mono = time.monotonic()
        force = mono - self._last_forced >= 1.0
        if force:
            self._last_forced = mono
        self.cp.cycle(force=force)
        refresh = mono >= self._next_refresh
        if refresh:
            self._next_refresh = mono + self.opts.status_interval_seconds
        self._publish(refresh)
        if refresh:
            self._take_snapshot()
            # The core's metric lists suit bounded simulations; keep them bounded here.
            for values in (self.cp.metrics.decision_times, self.cp.metrics.waits):
                if len(values) > 100_000:
                    del values[:-10_000]
        self.stats["iterations"] += 1
        self.stats["last_iteration_monotonic"] = time.monotonic()
        self.stats["iteration_seconds_total"] += time.perf_counter() - started

    # ----------------------------------------------------------------- request handling

    def _handle(self, verb: str, args: Any) -> None:
        if verb == "apply":
            self._apply(*args)
        elif verb == "delete":
            kind, namespace, name, uid, done = args
            obj = self.objects.get((kind, namespace, name))
            if obj is not None and (not uid or obj.uid == uid):
                self.forget(obj)
            if not done.done():
                done.set_result(None)
        elif verb == "config":
            self._apply_config(*args)

    def track(self, kind: str, body: dict[str, Any]) -> Tracked:
        """The Tracked for a body, new if the object is new (or was re-created)."""
        meta = body.get("metadata") or {}
        ident = (kind, str(meta.get("namespace") or "default"), str(meta.get("name")))
        obj = self.objects.get(ident)
        uid = str(meta.get("uid") or "")
        if obj is not None and uid and obj.uid != uid:
            self.forget(obj)  # deleted and created again under the same name
            obj = None
        if obj is None:
            created = parse_time(meta.get("creationTimestamp")) or time.time()
            obj = Tracked(kind, ident[1], ident[2], uid, -1, created,
                          conditions=Conditions.from_status(body.get("status")))
            self.objects[ident] = obj
        return obj

    def _apply(self, kind: str, body: dict[str, Any]) -> None:
        obj = self.track(kind, body)
        generation = int((body.get("metadata") or {}).get("generation") or 1)
        if obj.generation == generation or obj.terminal:
            return  # already seen: handlers are idempotent
        obj.generation = generation
        self._dirty.add(obj)
        try:
            spec = job_spec_from_manifest(body, kind)
        except SpecError as exc:
            self.fail_invalid(obj, str(exc))
            return
        obj.invalid = None
        if kind == SERVICE_KIND:
            self._reconcile_service(obj, spec)
        elif not obj.keys:
            obj.spec = spec
            self.submit(obj, spec)
        elif spec != obj.spec:
            self.note(obj, "Warning", "SpecChangeIgnored", "the spec of a TrainingJob is "
                      "immutable once submitted; delete and re-create it to change it")

    def fail_invalid(self, obj: Tracked, why: str) -> None:
        """A spec the schema let through but the core refuses: Failed, with the reason."""
        for key in list(obj.keys):
            self._cancel(obj, key)
        obj.invalid = why
        now = format_time(time.time())
        obj.conditions.set("Failed", True, "InvalidSpec", why, generation=obj.generation,
                           now=now)
        obj.conditions.clear("Queued", "InvalidSpec", why, generation=obj.generation, now=now)
        self.note(obj, "Warning", "InvalidSpec", why)
        self._dirty.add(obj)

    def submit(self, obj: Tracked, spec: JobSpec, at: float | None = None) -> JobRecord:
        self.owner[spec.key] = obj
        if spec.key not in obj.keys:
            obj.keys.append(spec.key)
        return self.cp.submit(spec, at=at)

    def _reconcile_service(self, obj: Tracked, service: JobSpec) -> None:
        """Scale replicas up or down (the highest indices go first); any other change
        replaces every replica."""
        if obj.spec is not None and service_base(obj.spec) != service_base(service):
            for key in list(obj.keys):
                self._cancel(obj, key)
        wanted = replica_specs(service)
        wanted_keys = {spec.key for spec in wanted}
        for key in [k for k in obj.keys if k not in wanted_keys]:
            self._cancel(obj, key)
        for spec in wanted:
            if spec.key not in obj.keys:
                self.submit(obj, spec)
        obj.keys.sort(key=lambda k: replica_index(k) or 0)
        obj.spec = service

    def _cancel(self, obj: Tracked, key: str) -> None:
        rec = self.cp.jobs.get(key)
        if rec is not None and rec.placement is not None:
            end_run(self, obj, key, self.cp.now)
        self.cp.cancel(key)
        self.forget_backend(key)
        self.owner.pop(key, None)
        if key in obj.keys:
            obj.keys.remove(key)

    def forget(self, obj: Tracked) -> None:
        """The object is gone: release everything it holds."""
        for key in list(obj.keys):
            self._cancel(obj, key)
        self.objects.pop(obj.ident, None)
        self._dirty.discard(obj)
        self._deferred.discard(obj)

    def load_config(self, kind: str, body: dict[str, Any],
                    spec: QueueSpec | PowerBudgetSpec | None, invalid: str | None) -> None:
        """Record a GPUQueue/PowerBudget the core was built with (start-up)."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name"))
        self.configs[(kind, name)] = ConfigEntry(kind, name, str(meta.get("uid") or ""),
                                                 int(meta.get("generation") or 1), spec, invalid)
        self._config_dirty = True

    def _apply_config(self, kind: str, body: dict[str, Any], deleted: bool) -> None:
        meta = body.get("metadata") or {}
        name = str(meta.get("name"))
        ident = (kind, name)
        old = self.configs.get(ident)
        if deleted:
            if old is not None and (not meta.get("uid") or meta.get("uid") == old.uid):
                del self.configs[ident]
                self._reconfigure(kind)
            return
        generation = int(meta.get("generation") or 1)
        if old is not None and old.generation == generation and old.uid == meta.get("uid"):
            return  # our own status write coming back
        try:
            spec: QueueSpec | PowerBudgetSpec | None = (
                queue_from_manifest(body) if kind == QUEUE_KIND else budget_from_manifest(body))
            invalid = None
        except SpecError as exc:
            spec, invalid = None, str(exc)
        self.configs[ident] = ConfigEntry(kind, name, str(meta.get("uid") or ""), generation,
                                          spec, invalid)
        self._reconfigure(kind)
        self._config_dirty = True

    def _reconfigure(self, kind: str) -> None:
        """Give the core the current queues or budgets, if they differ from what it has."""
        entries = sorted((c for c in self.configs.values() if c.kind == kind),
                         key=lambda c: c.name)
        self._config_dirty = True
        if kind == QUEUE_KIND:
            queues = tuple(c.spec for c in entries if isinstance(c.spec, QueueSpec))
            if queues == self.cp.factory.queues:
                return
            self.cp.reconfigure(queues=queues)
        else:
            budgets = tuple(c.spec for c in entries if isinstance(c.spec, PowerBudgetSpec))
            if budgets == self.cp.factory.power_budgets:
                return
            self.cp.reconfigure(power_budgets=budgets)
        self._next_refresh = 0.0
        log.info("%ss now: %s", kind, ", ".join(c.name for c in entries) or "none")

    # ----------------------------------------------------------------- core events

    def admitted(self, obj: Tracked, key: str) -> None:
        for callback in self.on_admitted:
            callback(obj, key)

    def mark_dirty(self, obj: Tracked) -> None:
        """Rebuild the object's status at the next publish."""
        self._dirty.add(obj)

    def forget_backend(self, key: str) -> None:
        forget = getattr(self.cp.backend, "forget", None)
        if forget is not None:
            forget(key)

    def note(self, obj: Tracked, type_: str, reason: str, message: str) -> None:
        """A Kubernetes Event on the object."""
        self.outbox.put_event(obj.ref, type_, reason, message)

    # ----------------------------------------------------------------- publishing

    def run_energy(self, key: str) -> float:
        status = self.cp.backend.status(key)
        return 0.0 if status is None else status.energy_joules

    def status_context(self) -> StatusContext:
        return StatusContext(self.cp.topo, self.cp.factory.cost, self.cp.jobs,
                             self.clock.to_wall, self.cp.describe_placement, self.run_energy,
                             format_time(time.time()))

    def _publish(self, refresh: bool) -> None:
        if refresh or self.power_needed:
            self._refresh_power()
            self.power_needed = False
        if refresh:
            self._account()
            self._dirty |= self._deferred
            self._deferred.clear()
        if self._dirty:
            ctx = self.status_context()
            for obj in self._dirty:
                if obj.terminal or self.objects.get(obj.ident) is not obj:
                    continue
                status = service_status(obj, ctx) if obj.is_service else job_status(obj, ctx)
                if status == obj.written:
                    continue
                shape = _shape(status)
                if not refresh and shape == obj.written_shape:
                    self._deferred.add(obj)  # only words or meters changed: at refresh
                    continue
                obj.written, obj.written_shape = status, shape
                self.outbox.put_status((obj.kind, obj.namespace, obj.name), status)
            self._dirty.clear()
        if refresh or self._config_dirty:
            for config, status in config_statuses(self.cp, self.configs.values(),
                                                  self.last_gpu_power):
                if status != config.written:
                    config.written = status
                    self.outbox.put_status((config.kind, "", config.name), status)
            self._config_dirty = False

    def _account(self) -> None:
        """GPU-seconds of running work up to now; running objects get fresh meters."""
        now = self.cp.now
        for obj in self.objects.values():
            for key, since in obj.accounted_at.items():
                placement = obj.last_placement.get(key)
                if placement is not None:
                    obj.gpu_seconds += placement.gpu_equivalents * max(0.0, now - since)
                obj.accounted_at[key] = now
            if obj.accounted_at:
                self._dirty.add(obj)

    def _refresh_power(self) -> None:
        """Per-object power from one telemetry snapshot of the backend."""
        snapshot = self.cp.backend.telemetry()
        topo = self.cp.topo
        power = [0.0] * topo.total_gpus
        for reading in snapshot.gpus:
            node = topo.node_index.get(reading.node)
            if node is not None and reading.index < topo.nodes[node].gpus:
                power[topo.gpu_start[node] + reading.index] = reading.power_watts
        self.last_gpu_power = power
        for obj in self.objects.values():
            total = 0.0
            for key in obj.keys:
                rec = self.cp.jobs.get(key)
                if rec is not None and rec.placement is not None:
                    total += sum(power[g] * s.milli / 1000.0 for s in rec.placement.slots
                                 for g in s.gpus)
            if total != obj.power_watts:
                obj.power_watts = total
                self._dirty.add(obj)

    def _take_snapshot(self) -> None:
        """Numbers for the metrics thread, replaced whole (never read half-written)."""
        phases = collections.Counter(r.phase for r in self.cp.jobs.values())
        budgets = self.cp.state.budgets
        counters = dict(self.stats)
        counters["cycles"] = float(self.cp.cycles)
        self.snapshot = {
            "counters": counters,
            "phases": dict(phases),
            "gpus_allocated": self.cp.state.allocated_gpu_equivalents,
            "gpus_total": float(self.cp.topo.total_gpus),
            "budgets": {name: (budgets.limits[b], self.cp.state.budget_watts[b])
                        for b, name in enumerate(budgets.names)},
        }
