"""The engine: the one place the ControlPlane lives, driven by one asyncio task.

The core is not thread-safe and need not be: handlers (``aifactory.operators.handlers``) only append
requests to a queue and wake the engine; the engine task drains the queue, lets the core poll
its backend and run a scheduling cycle, and turns what changed into status patches and Events
for the outbox (``aifactory.operators.outbox``). So a burst of 300 creations is a few scheduling
cycles, not 300, and a handler returns in microseconds. The one other reader is the metrics
server's thread: it takes ``Engine.lock`` while it snapshots the plane, and the engine holds
that lock for each pass (it waits without blocking the event loop while a scrape reads).

Loop, every ``tick_seconds`` (100 ms) or as soon as a request arrives (after
``coalesce_seconds``, or as long as the last pass took up to 50 ms, to gather a burst):

1. apply requests: submit, rescale or cancel jobs; replace queues and power budgets;
2. ``poll`` the backend (finished and failed work), then a scheduling ``cycle`` when
   anything changed (and at least once a second). With a backend whose nodes come and go
   under it (Ray), a ``controller.runtime.resync.Reconciler`` does this and also fences nodes that
   left; a node never seen before rebuilds the plane over the grown inventory
   (``on_plane_replaced`` tells the metrics server);
3. publish: the status of every object whose phase or conditions changed, Events for each
   transition (``aifactory.operators.transitions``), and, every ``status_interval_seconds``, energy,
   power and cost of running jobs, waiting reasons whose words changed, and the status of
   queues and budgets.

A TrainingJob that finished keeps its final status; ``finished_retention_seconds`` later
(so Prometheus scrapes its final counters) the engine forgets it, and the core forgets its
record, its backend workload and its per-job metrics: the operator's memory follows the
live jobs, not every job it ever ran.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from aifactory.controller.core.clock import Clock
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import (
    JobSpec,
    PowerBudgetSpec,
    QueueSpec,
    replica_index,
    replica_jobs,
)
from aifactory.controller.power.grid import BudgetWindow, GridEvent
from aifactory.controller.runtime.autoscale import policy_from_manifest
from aifactory.controller.runtime.controlplane import ControlPlane, JobRecord
from aifactory.controller.runtime.resync import Reconciler
from aifactory.operators import publish
from aifactory.operators.books import EngineOptions, StatusBooks
from aifactory.operators.configstatus import ConfigEntry
from aifactory.operators.grid import GridLink, GridOptions
from aifactory.operators.kube import KubeClient, ObjectRef
from aifactory.operators.nodes import NodeBook
from aifactory.operators.objects import StatusContext, Tracked
from aifactory.operators.outbox import Outbox
from aifactory.operators.raynodes import KubeNodeDirectory
from aifactory.operators.routing import ServiceRouting
from aifactory.operators.scaling import ServiceScaling
from aifactory.operators.status import Conditions, Phase
from aifactory.operators.tenancy import NamespaceGrant, priority_refusal
from aifactory.operators.transitions import end_run, on_core_event
from aifactory.operators.translate import (
    QUEUE_KIND,
    SERVICE_KIND,
    config_from_manifest,
    format_time,
    job_spec_from_manifest,
    parse_time,
    service_base,
)

__all__ = ["Engine"]

log = logging.getLogger(__name__)
MAX_COALESCE_SECONDS = 0.05


def _final_written(kind: str, body: Mapping[str, Any]) -> bool:
    """A TrainingJob whose final status (Succeeded or Failed) was written for its current
    generation: nothing left to do for it."""
    status = body.get("status") or {}
    generation = int((body.get("metadata") or {}).get("generation") or 1)
    return kind != SERVICE_KIND and status.get("phase") in Phase.TERMINAL and \
        status.get("observedGeneration") == generation


class Engine:
    """Owns the ControlPlane; everything else talks to it through requests."""

    def __init__(self, cp: ControlPlane, kube: KubeClient, clock: Clock,
                 options: EngineOptions | None = None,
                 reconciler: Reconciler | None = None,
                 may_write: Callable[[], bool] | None = None,
                 grid: GridOptions | None = None) -> None:
        self.cp = cp
        self.reconciler = reconciler
        self.lock = threading.Lock()  # held while the plane changes; scrapes take it to read
        self.on_plane_replaced: list[Callable[[ControlPlane], None]] = []
        self.on_stop: list[Callable[[], None]] = []  # after the loop: metrics, backend
        self.clock = clock
        self.opts = options = options or EngineOptions()
        self.objects: dict[tuple[str, str, str], Tracked] = {}
        self.owner: dict[str, Tracked] = {}
        self.configs: dict[tuple[str, str], ConfigEntry] = {}
        # Node health from Node objects (operators.nodes); None: not followed (an inventory
        # from a factory spec, or a backend that sees its nodes die itself, as Ray does).
        self.node_book: NodeBook | None = None
        # With --backend ray on Kubernetes: the Nodes that give the Ray nodes their topology
        # (operators.raynodes); None: the Ray nodes' own labels.
        self.node_directory: KubeNodeDirectory | None = None
        # Each namespace's queue grant (start-up loads them); None: not checked here (the
        # operator may not read Namespaces; the API server's admission policies still hold).
        self.namespaces: dict[str, NamespaceGrant] | None = None
        self.stats: dict[str, float] = collections.defaultdict(float)
        self.books = StatusBooks()
        self.outbox = Outbox(kube, self.stats, options.writers, may_write,
                             self._written)
        self.kube = kube
        self.last_gpu_power: list[float] = []
        self.snapshot: dict[str, Any] = {}
        self.on_admitted: list[Callable[[Tracked, str], None]] = []
        self._requests: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_refresh = 0.0
        self._last_forced = 0.0
        self._last_pass_seconds = 0.0
        self.grid = GridLink(cp, grid, clock.to_wall)
        self.scaling = ServiceScaling(self, options.autoscale_sync_seconds,
                                      options.sim_traffic)
        self.routing = ServiceRouting(kube, may_write)
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

    def apply_node(self, body: dict[str, Any], deleted: bool) -> None:
        """A Node appeared, changed (Ready, taints, cordon, allocatable GPUs) or went."""
        self._request("node", (body, deleted))

    def apply_namespace(self, body: dict[str, Any], deleted: bool) -> None:
        """A Namespace appeared, changed its annotations (its queue grant) or went away."""
        self._request("namespace", (body, deleted))

    def apply_config(self, kind: str, body: dict[str, Any], deleted: bool) -> None:
        """A GPUQueue or PowerBudget appeared, changed or went away."""
        self._request("config", (kind, body, deleted))

    def grid_event(self, event_id: str, events: list[GridEvent]) -> None:
        """A utility's event arrived, changed or ended (``events`` empty)."""
        self._request("grid", (event_id, events))

    def grid_problem(self, text: str) -> None:
        """The grid signal's source has a problem (``""``: it works again)."""
        self._request("grid_problem", text)

    def _request(self, verb: str, args: Any) -> None:
        self._requests.append((verb, args))
        self._wake.set()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.stats["last_iteration_monotonic"] = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="aifactory-engine")
        self.outbox.start()
        self.routing.start()

    async def stop(self, flush_seconds: float = 5.0) -> None:
        """Stop the loop, give pending writes ``flush_seconds`` to land, then close."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self.outbox.close(flush_seconds)
        await self.routing.close()
        await self.kube.close()
        for close in self.on_stop:
            try:
                close()
            except Exception:
                log.exception("shutting down %s failed", getattr(close, "__qualname__", close))

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
                # Gather a burst: at least the coalescing window, and as long as the last
                # pass took (up to 50 ms), so under a stream of arrivals the engine spends
                # at most about half the event loop in passes and kopf's watch keeps up.
                await asyncio.sleep(max(self.opts.coalesce_seconds,
                                        min(MAX_COALESCE_SECONDS, self._last_pass_seconds)))
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                break
            while not self.lock.acquire(blocking=False):  # a scrape is reading the plane
                await asyncio.sleep(0.002)
            try:
                self.iterate()
            except Exception:  # never let one bad pass end the operator
                self.stats["loop_errors"] += 1
                log.exception("engine iteration failed; continuing")
            finally:
                self.lock.release()

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
        mono = time.monotonic()
        force = mono - self._last_forced >= 1.0
        if force:
            self._last_forced = mono
        if self.grid.step(mono):
            self.books.config_dirty = True
        if self.reconciler is None:
            book = self.node_book
            grown = book.grow(self.cp) if book is not None else None
            if grown is not None:
                self._replace_plane(grown)
            moved = book.follow(self.cp, self.stats) if book is not None else False
            self.cp.poll()
            if book is not None:
                book.fence(self.cp)
            self.cp.cycle(force=force or moved)
        else:
            self.reconciler.step(force=force)
            if self.reconciler.cp is not self.cp:
                self._replace_plane(self.reconciler.cp)
            if self.node_directory is not None:
                self.node_directory.report(self._note_node)
        self.scaling.step()
        refresh = mono >= self._next_refresh
        if refresh:
            self._next_refresh = mono + self.opts.status_interval_seconds
        publish.publish(self, refresh)
        while self.books.finished and self.books.finished[0][0] <= mono:
            self._forget_finished(self.books.finished.popleft()[1])
        if refresh:
            publish.take_snapshot(self)
            self.routing.want(self.scaling.routes())
        self.stats["iterations"] += 1
        self.stats["last_iteration_monotonic"] = time.monotonic()
        self._last_pass_seconds = time.perf_counter() - started
        self.stats["iteration_seconds_total"] += self._last_pass_seconds

    # ----------------------------------------------------------------- request handling

    def _handle(self, verb: str, args: Any) -> None:
        if verb == "apply":
            self._apply(*args)
        elif verb == "grid":
            self.grid.event(*args)
        elif verb == "grid_problem":
            self.grid.set_problem(args)
            self.books.config_dirty = True
        elif verb == "delete":
            kind, namespace, name, uid, done = args
            obj = self.objects.get((kind, namespace, name))
            if obj is not None and (not uid or obj.uid == uid):
                self.forget(obj)
            if not done.done():
                done.set_result(None)
        elif verb == "config":
            self._apply_config(*args)
        elif verb == "namespace":
            self.load_namespace(*args)
        elif verb == "node":
            body, deleted = args
            if self.node_book is not None:
                self.node_book.observe(body, deleted, time.monotonic())
            if self.node_directory is not None:
                self.node_directory.observe(body, deleted)

    def knows(self, kind: str, body: Mapping[str, Any]) -> bool:
        """Whether this object, at this generation, was applied already, or is a finished
        TrainingJob whose final status was written (its watch event is nothing new: most
        often an echo of our own status write)."""
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation") or 1)
        obj = self.objects.get((kind, str(meta.get("namespace") or "default"),
                                str(meta.get("name"))))
        if obj is not None:
            return obj.uid == meta.get("uid") and obj.generation == generation
        return _final_written(kind, body)

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
        if obj.generation < 0 and _final_written(kind, body):
            obj.generation, obj.terminal = generation, True  # finished and forgotten since
        if obj.generation == generation or obj.terminal:
            return  # already seen: handlers are idempotent
        obj.generation = generation
        self.books.dirty.add(obj)
        try:
            spec = job_spec_from_manifest(body, kind)
        except SpecError as exc:
            self.fail_invalid(obj, str(exc))
            return
        spec, refusal = self.tenancy(body, spec)
        if refusal is not None:
            self.fail_invalid(obj, refusal, reason="NotPermitted")
            return
        obj.invalid = None
        if kind == SERVICE_KIND:
            try:
                policy = policy_from_manifest(body)
            except SpecError as exc:
                self.fail_invalid(obj, str(exc))
                return
            self.reconcile_service(obj, self.scaling.replicas_for(spec, policy,
                                                                  body.get("status")))
        elif not obj.keys:
            obj.spec = spec
            self.submit(obj, spec)
        elif spec != obj.spec:
            self.note(obj, "Warning", "SpecChangeIgnored", "the spec of a TrainingJob is "
                      "immutable once submitted; delete and re-create it to change it")

    def fail_invalid(self, obj: Tracked, why: str, reason: str = "InvalidSpec") -> None:
        """A spec the schema let through but the core refuses (``InvalidSpec``), or one its
        namespace may not run (``NotPermitted``): Failed, with the reason, never placed."""
        for key in list(obj.keys):
            self._cancel(obj, key)
        obj.invalid = why
        now = format_time(time.time())
        obj.conditions.set("Failed", True, reason, why, generation=obj.generation, now=now)
        obj.conditions.clear("Queued", reason, why, generation=obj.generation, now=now)
        self.note(obj, "Warning", reason, why)
        self.books.dirty.add(obj)

    def tenancy(self, body: Mapping[str, Any], spec: JobSpec) -> tuple[JobSpec, str | None]:
        """The spec in the queue its namespace sends it to (its own, else the namespace's
        default), and why the namespace may not run it there (``operators.tenancy``), or
        None. Without the right to read Namespaces (``namespaces`` None) only the queue's
        priority cap is checked; the API server's admission policies still hold."""
        named = (body.get("spec") or {}).get("queue")
        named = named if isinstance(named, str) and named else None
        refusal: str | None = None
        if self.namespaces is not None:
            grant = self.namespaces.get(spec.namespace) or NamespaceGrant(spec.namespace)
            queue = grant.queue_for(named)
            refusal = grant.queue_refusal(queue)
        else:
            queue = named or spec.queue
        if queue != spec.queue:
            spec = replace(spec, queue=queue)
        queues = {q.name: q for q in self.cp.factory.queues}
        return spec, refusal or priority_refusal(spec.priority, queues.get(queue))

    def load_namespace(self, body: Mapping[str, Any], deleted: bool = False) -> None:
        """Record (or forget) a namespace's queue grant."""
        if self.namespaces is None:
            return
        grant = NamespaceGrant.from_namespace(body)
        if deleted:
            self.namespaces.pop(grant.namespace, None)
        else:
            self.namespaces[grant.namespace] = grant

    def submit(self, obj: Tracked, spec: JobSpec, at: float | None = None) -> JobRecord:
        self.owner[spec.key] = obj
        if spec.key not in obj.keys:
            obj.keys.append(spec.key)
        return self.cp.submit(spec, at=at)

    def reconcile_service(self, obj: Tracked, service: JobSpec) -> None:
        """Scale replicas up or down (the highest indices go first); any other change
        replaces every replica."""
        if obj.spec is not None and service_base(obj.spec) != service_base(service):
            for key in list(obj.keys):
                self._cancel(obj, key)
        wanted = replica_jobs(service)
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
        self.cp.cancel(key)  # the backend and the core's metrics forget it too
        self.owner.pop(key, None)
        if key in obj.keys:
            obj.keys.remove(key)

    def forget(self, obj: Tracked) -> None:
        """The object is gone: release everything it holds."""
        for key in list(obj.keys):
            self._cancel(obj, key)
        if obj.is_service:
            self.scaling.forget(f"{obj.namespace}/{obj.name}")
        self.objects.pop(obj.ident, None)
        self.books.drop(obj)
        self.books.claims.gone(obj.ident)

    def load_config(self, kind: str, body: dict[str, Any],
                    spec: QueueSpec | PowerBudgetSpec | None, invalid: str | None,
                    windows: tuple[BudgetWindow, ...] = ()) -> None:
        """Record a GPUQueue/PowerBudget the core was built with (start-up); a budget's
        schedule goes to the grid link."""
        meta = body.get("metadata") or {}
        name = str(meta.get("name"))
        self.configs[(kind, name)] = ConfigEntry(kind, name, str(meta.get("uid") or ""),
                                                 int(meta.get("generation") or 1), spec, invalid,
                                                 windows=windows)
        if isinstance(spec, PowerBudgetSpec):
            self.grid.set_windows(name, windows)
        self.books.config_dirty = True

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
        spec, invalid, windows = config_from_manifest(kind, body)
        self.configs[ident] = ConfigEntry(kind, name, str(meta.get("uid") or ""), generation,
                                          spec, invalid, windows=windows)
        self._reconfigure(kind)
        self.books.config_dirty = True

    def _reconfigure(self, kind: str) -> None:
        """Give the core the current queues or budgets, if they differ from what it has."""
        entries = sorted((c for c in self.configs.values() if c.kind == kind),
                         key=lambda c: c.name)
        self.books.config_dirty = True
        if kind == QUEUE_KIND:
            queues = tuple(c.spec for c in entries if isinstance(c.spec, QueueSpec))
            if queues == self.cp.factory.queues:
                return
            self.cp.reconfigure(queues=queues)
        else:
            budgets = tuple(c.spec for c in entries if isinstance(c.spec, PowerBudgetSpec))
            self.grid.budgets_changed(budgets, {c.name: c.windows for c in entries
                                                if isinstance(c.spec, PowerBudgetSpec)})
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
        self.books.dirty.add(obj)

    def _forget_finished(self, obj: Tracked) -> None:
        """A finished TrainingJob's retention is over: the core and the engine let it go
        (its status stays as written; a later delete finds nothing to release)."""
        for key in obj.keys:
            self.cp.forget(key)
            self.owner.pop(key, None)
        if self.objects.get(obj.ident) is obj:
            del self.objects[obj.ident]
        self.books.drop(obj)

    def _written(self, key: tuple[str, str, str], status: Mapping[str, Any] | None) -> None:
        """A status write landed (None: the object is gone): what the API server shows held
        changed. Called on the event loop by the outbox."""
        if status is None or key not in self.objects:
            # Gone, or deleted while this write was on its way: it holds nothing (else a
            # late write would claim GPUs for an object that no longer exists, for good).
            self.books.claims.gone(key)
        else:
            self.books.claims.written(key, status)

    def _replace_plane(self, cp: ControlPlane) -> None:
        """The reconciler rebuilt the plane over a grown inventory (same jobs, new node
        numbering): follow it, and tell the metrics server."""
        self.cp = cp
        self.grid.rebind(cp)
        self.scaling.rebind(cp)
        for obj in self.objects.values():
            for key in obj.keys:
                rec = cp.jobs.get(key)
                if rec is not None and rec.placement is not None:
                    obj.last_placement[key] = rec.placement
        self.books.config_dirty = True
        self._next_refresh = 0.0
        log.info("inventory changed: %s", cp.topo.describe())
        for callback in self.on_plane_replaced:
            callback(cp)

    def follows_nodes(self) -> bool:
        """Whether Node events matter here (their health, or the Ray nodes' topology)."""
        return self.node_book is not None or self.node_directory is not None

    def _note_node(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        self.outbox.put_event(ref, type_, reason, message, False)

    def note(self, obj: Tracked, type_: str, reason: str, message: str,
             phase_change: bool = True) -> None:
        """A Kubernetes Event on the object (``phase_change`` False: a wait's reason, the
        first to go under back-pressure)."""
        self.outbox.put_event(obj.ref, type_, reason, message, phase_change)

    # ----------------------------------------------------------------- publishing

    def status_context(self) -> StatusContext:
        return publish.status_context(self)
