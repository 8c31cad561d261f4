"""Inference autoscaling that acts: each InferenceService's replicas follow its load.

The ``Autoscaler`` runs beside a ``ControlPlane`` (the simulator, the operator, ``aifactory
run``). Every ``sync_seconds`` (15 s, the HorizontalPodAutoscaler's sync period) it reads each
ready replica's requests in flight from a ``ReportsLoad`` source (the Ray backend's serving
workers, or the simulator's traffic model), asks ``autoscale.decide`` for the replica count
(toward ``targetInFlightRequests`` per replica, within ``[minReplicas, maxReplicas]``: up at
once but at most doubling, down only to the highest recommendation of the stabilization
window), and hands a change to a ``ScaleTarget``: by default the control plane itself, whose
replica gangs it submits and cancels; in the operator, the engine, which also writes status
and Events. A service without ``spec.autoscaling`` is tracked too (its replicas are what
``spec.replicas`` says, ``kubectl scale``), so status reads the same for both.

Power-aware by construction: a new replica is a gang the scheduler admits against every
PowerBudget, so a scale-up that would break one waits queued with the scheduler's reason,
which ``view()`` gives for status ("2 of 6 replicas wait: ..."). A scale-down cancels the
highest-indexed replicas first (the waiting ones first, as they are the newest) and frees
their watts in the same step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

from aifactory.controller.backends.base import ReplicaLoad, ReportsLoad
from aifactory.controller.core.spec import JobSpec, replica_name
from aifactory.controller.runtime.autoscale import AutoscalePolicy, decide, replica_changes
from aifactory.controller.runtime.controlplane import ControlPlane, JobRecord

__all__ = ["DEFAULT_SYNC_SECONDS", "Autoscaler", "ControlPlaneReplicas", "ScaleChange",
           "ScaleTarget", "ServiceView"]

DEFAULT_SYNC_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class ScaleChange:
    """One decision that changed a service's replica count."""

    service: str  # namespace/name
    at: float
    replicas_from: int
    replicas_to: int
    reason: str


class ScaleTarget(Protocol):
    """Whoever owns a service's replicas and changes their number."""

    def scale(self, service: JobSpec, replicas: int, change: ScaleChange) -> None:
        """Run ``replicas`` replicas of ``service`` (its spec as tracked)."""
        ...


class ControlPlaneReplicas:
    """The default ``ScaleTarget``: replica gangs submitted to and cancelled on the control
    plane directly (the simulator and ``aifactory run``, where nothing else owns them)."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    def scale(self, service: JobSpec, replicas: int, change: ScaleChange) -> None:
        names = [rec.spec.name for rec in replicas_of(self.cp, service.key)]
        add, remove = replica_changes(service, names, replicas)
        for name in remove:
            self.cp.cancel(f"{service.namespace}/{name}")
        for spec in add:
            self.cp.submit(spec)


@dataclass(frozen=True, slots=True)
class ServiceView:
    """What a service's status shows: replicas wanted, placed (running) and ready (serving),
    load, each ready replica's endpoint, and why the rest wait (empty when none does)."""

    desired: int
    placed: int
    ready: int
    in_flight: float
    requests_total: float  # since the service was first tracked: a Prometheus counter
    latency_seconds_total: float
    endpoints: tuple[str, ...]
    waiting: str
    reason: str  # the last scaling decision, or how the count was set


@dataclass(slots=True)
class _Tracked:
    service: JobSpec
    policy: AutoscalePolicy | None
    desired: int
    reason: str
    recommendations: deque[tuple[float, int]] = field(default_factory=deque)
    # Counters stay monotonic while replicas come and go: what a replica served is kept
    # in ``retired`` once it stops reporting (or restarts from zero).
    seen: dict[str, ReplicaLoad] = field(default_factory=dict)
    retired: tuple[float, float] = (0.0, 0.0)


def replicas_of(cp: ControlPlane, service: str) -> list[JobRecord]:
    """The live (not done) replica records of ``service`` (namespace/name), by index.

    Looked up by name, index by index, until two indices in a row are unknown: O(replicas),
    not O(every job). Replicas are numbered from 0 without gaps (a new one takes the lowest
    free index, the highest go first), so nothing past that is missed."""
    found: list[JobRecord] = []
    misses, i = 0, 0
    while misses < 2:
        rec = cp.jobs.get(replica_name(service, i))
        if rec is None:
            misses += 1
        else:
            misses = 0
            if not rec.done:
                found.append(rec)
        i += 1
    return found


class Autoscaler:
    """Every tracked service's replica count, decided each sync from the load it reports."""

    def __init__(self, cp: ControlPlane, load: ReportsLoad | None,
                 target: ScaleTarget | None = None, *,
                 sync_seconds: float = DEFAULT_SYNC_SECONDS) -> None:
        if not sync_seconds > 0:
            raise ValueError(f"sync_seconds must be > 0, got {sync_seconds}")
        self.cp = cp
        self.load = load
        self.target: ScaleTarget = target or ControlPlaneReplicas(cp)
        self.sync_seconds = sync_seconds
        self.services: dict[str, _Tracked] = {}
        self.changes: list[ScaleChange] = []  # the last 1,000 changes, oldest first
        self.scale_counts: dict[tuple[str, str], int] = {}  # (service, up|down) -> changes
        self.listeners: list[Callable[[ScaleChange], None]] = []
        self._last_sync: float | None = None

    # ----------------------------------------------------------------- what is tracked

    def track(self, service: JobSpec, policy: AutoscalePolicy | None,
              start: int | None = None) -> int:
        """Follow ``service`` (``workers`` = the replicas its spec asks for). Returns the
        replicas to run now: with a policy, the count the autoscaler already chose (kept
        across spec changes, clamped to the new bounds), else the spec's own. ``start``:
        the count an earlier autoscaler chose (an operator restart reads it from status),
        used instead of the spec's when the service is new here."""
        key = service.key
        old = self.services.get(key)
        if policy is None:
            desired, reason = service.workers, f"spec.replicas is {service.workers}"
        elif old is None or old.policy is None:
            first = service.workers if start is None or old is not None else start
            desired = min(policy.max_replicas, max(policy.min_replicas, first))
            reason = f"autoscaling from {desired} replicas"
        else:
            desired = min(policy.max_replicas, max(policy.min_replicas, old.desired))
            reason = old.reason
        tracked = _Tracked(service, policy, desired, reason)
        if old is not None:
            tracked.seen, tracked.retired = old.seen, old.retired
        if policy is not None and old is not None and old.policy is not None:
            tracked.recommendations = old.recommendations
        elif policy is not None:
            # As the HPA does for a new target: the count it starts at counts as a
            # recommendation, so it is not scaled down before a window has passed (after
            # an operator restart too, which forgot the window's recommendations).
            tracked.recommendations.append((self.cp.now, desired))
        self.services[key] = tracked
        return desired

    def rebind(self, cp: ControlPlane) -> None:
        """Follow a rebuilt control plane (a grown inventory): same jobs, new plane."""
        self.cp = cp
        if isinstance(self.target, ControlPlaneReplicas):
            self.target.cp = cp

    def untrack(self, key: str) -> None:
        self.services.pop(key, None)

    def desired(self, key: str) -> int | None:
        tracked = self.services.get(key)
        return None if tracked is None else tracked.desired

    # ----------------------------------------------------------------- deciding

    def due(self, now: float) -> bool:
        return self._last_sync is None or now - self._last_sync >= self.sync_seconds - 1e-9

    def step(self, force: bool = False) -> list[ScaleChange]:
        """One sync when due (or ``force``): decide every autoscaled service and apply the
        changes through the target. Returns the changes made."""
        now = self.cp.now
        if not (force or self.due(now)):
            return []
        self._last_sync = now
        made: list[ScaleChange] = []
        for key, tracked in list(self.services.items()):
            if tracked.policy is None:
                continue
            change = self._decide(key, tracked, now)
            if change is not None:
                made.append(change)
        return made

    def _decide(self, key: str, tracked: _Tracked, now: float) -> ScaleChange | None:
        policy = tracked.policy
        assert policy is not None
        loads = [load for rec in self._replicas(tracked)
                 if (load := self._ready_load(rec)) is not None]
        window = policy.scale_down_stabilization_seconds
        recent = tracked.recommendations
        while recent and now - recent[0][0] > window:
            recent.popleft()
        current = tracked.desired
        decision = decide(policy, current, [x.in_flight for x in loads],
                          [r for _, r in recent])
        if loads:  # a recommendation from real load: kept for the window
            recent.append((now, decision.recommendation))
        if decision.replicas == current:
            return None
        change = ScaleChange(key, now, current, decision.replicas, decision.reason)
        tracked.desired = decision.replicas
        tracked.reason = decision.reason
        tracked.service = replace(tracked.service, workers=decision.replicas,
                                  group_size=decision.replicas)
        self.target.scale(tracked.service, decision.replicas, change)
        self.changes.append(change)
        del self.changes[:-1000]
        direction = (key, "up" if change.replicas_to > current else "down")
        self.scale_counts[direction] = self.scale_counts.get(direction, 0) + 1
        for listener in self.listeners:
            listener(change)
        return change

    def _replicas(self, tracked: _Tracked) -> list[JobRecord]:
        return replicas_of(self.cp, tracked.service.key)

    def _ready_load(self, rec: JobRecord) -> ReplicaLoad | None:
        if rec.placement is None or self.load is None:
            return None
        return self.load.replica_load(rec.spec.key)

    # ----------------------------------------------------------------- reading

    def view(self, key: str) -> ServiceView | None:
        """The service's status now; its request counters include retired replicas'."""
        tracked = self.services.get(key)
        if tracked is None:
            return None
        replicas = self._replicas(tracked)
        loads = {rec.spec.key: load for rec in replicas
                 if (load := self._ready_load(rec)) is not None}
        requests, latency = tracked.retired
        for name, last in tracked.seen.items():
            now = loads.get(name)
            if now is None or now.requests_total < last.requests_total:
                requests += last.requests_total
                latency += last.latency_seconds_total
        tracked.retired, tracked.seen = (requests, latency), loads
        view = view_of(tracked.desired, replicas, loads, tracked.reason)
        if self.load is None:  # nothing reports serving: a placed replica counts as ready
            view = replace(view, ready=view.placed)
        return replace(view, requests_total=view.requests_total + requests,
                       latency_seconds_total=view.latency_seconds_total + latency)

    def tracked(self) -> Iterable[str]:
        return self.services.keys()

    def views(self) -> list[tuple[str, ServiceView]]:
        """Every tracked service's view (``ServiceSource``, for the metrics)."""
        return [(k, v) for k in list(self.services) if (v := self.view(k)) is not None]


def view_of(desired: int, replicas: list[JobRecord], load: Mapping[str, ReplicaLoad],
            reason: str) -> ServiceView:
    """A service's view from its replica records and the loads of the ready ones."""
    placed = [r for r in replicas if r.placement is not None]
    loads = [x for r in placed if (x := load.get(r.spec.key)) is not None]
    waiting = [r for r in replicas if r.placement is None]
    why = ""
    if waiting:
        first = next((r.reason for r in waiting if r.reason), "not placed yet")
        why = f"{len(waiting)} of {len(replicas)} replicas wait: {first}"
    return ServiceView(
        desired=desired, placed=len(placed), ready=len(loads),
        in_flight=sum(x.in_flight for x in loads),
        requests_total=sum(x.requests_total for x in loads),
        latency_seconds_total=sum(x.latency_seconds_total for x in loads),
        endpoints=tuple(x.endpoint for x in loads if x.endpoint),
        waiting=why, reason=reason)
