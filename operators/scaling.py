"""InferenceService replicas in the operator: ``spec.replicas`` (``kubectl scale``) or the
autoscaler.

Every InferenceService is tracked by one ``Autoscaler`` (``controller.runtime.scaler``) over
the engine's control plane, reading load from the backend where it ``ReportsLoad`` (Ray's
serving workers). Without ``spec.autoscaling`` the replicas are what ``spec.replicas`` says;
with it the autoscaler owns the count (as the HPA owns a Deployment's), starting from
``spec.replicas`` and keeping its own choice across spec changes, and ``kubectl scale``
is overridden at the next sync like a Deployment under an HPA. Each change goes through the
engine's ``reconcile_service`` (this class is the autoscaler's ``ScaleTarget``), posts a
``Scaled`` Event with the load that caused it, and marks the object for a status write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aifactory.controller.backends.base import ReportsLoad
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.runtime.autoscale import AutoscalePolicy
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.scaler import Autoscaler, ScaleChange, ServiceView
from aifactory.controller.sim.traffic import (
    LoadCurve,
    TrafficModel,
    diurnal,
    load_curve_csv,
    traffic_for,
)
from aifactory.operators.routing import Route
from aifactory.operators.translate import SERVICE_KIND

if TYPE_CHECKING:
    from aifactory.operators.objects import Tracked

__all__ = ["ServiceScaling"]


class _Engine(Protocol):
    cp: ControlPlane
    objects: dict[tuple[str, str, str], Tracked]

    def reconcile_service(self, obj: Tracked, service: JobSpec) -> None: ...

    def note(self, obj: Tracked, type_: str, reason: str, message: str,
             phase_change: bool = True) -> None: ...

    def mark_dirty(self, obj: Tracked) -> None: ...


class ServiceScaling:
    """The engine's autoscaler and its ``ScaleTarget``. ``traffic`` ('diurnal' or a CSV
    path): simulated requests drive the services instead of the backend's reports (the
    simulated backend, whose replicas serve nothing)."""

    def __init__(self, engine: _Engine, sync_seconds: float = 15.0,
                 traffic: str | None = None) -> None:
        self.engine = engine
        self.curve: LoadCurve | None = None
        self.traffic: TrafficModel | None = None
        if traffic is not None:
            follow = None if traffic == "diurnal" else Path(traffic)
            self.curve = diurnal() if follow is None else load_curve_csv(follow)
            self.traffic = TrafficModel(engine.cp, {}, origin=engine.cp.now, follow=follow)
        load = self.traffic if self.traffic is not None else self._load(engine.cp)
        self.autoscaler = Autoscaler(engine.cp, load, self, sync_seconds=sync_seconds)

    @staticmethod
    def _load(cp: ControlPlane) -> ReportsLoad | None:
        return cp.backend if isinstance(cp.backend, ReportsLoad) else None

    def rebind(self, cp: ControlPlane) -> None:
        """The engine's plane was rebuilt (a grown inventory): follow it."""
        self.autoscaler.rebind(cp)
        if self.traffic is not None:
            self.traffic.cp = cp
        else:
            self.autoscaler.load = self._load(cp)

    def replicas_for(self, service: JobSpec, policy: AutoscalePolicy | None,
                     status: Mapping[str, Any] | None = None) -> JobSpec:
        """The service spec with the replicas to run now (spec's, or the autoscaler's).
        ``status``: the object's, whose ``desiredReplicas`` a restarted operator resumes
        from, so a restart never scales an autoscaled service back to spec.replicas."""
        last = (status or {}).get("desiredReplicas")
        start = last if isinstance(last, int) and not isinstance(last, bool) else None
        n = self.autoscaler.track(service, policy, start)
        if self.traffic is not None and self.curve is not None:
            self.traffic.add(service.key, traffic_for(service, policy, self.curve))
        return replace(service, workers=n, group_size=n)

    def forget(self, key: str) -> None:
        self.autoscaler.untrack(key)
        if self.traffic is not None:
            self.traffic.remove(key)

    def step(self) -> list[ScaleChange]:
        """A sync when due (simulated traffic refreshed first)."""
        if not self.autoscaler.due(self.engine.cp.now):
            return []
        if self.traffic is not None:
            self.traffic.refresh()
        return self.autoscaler.step()

    def view(self, key: str) -> ServiceView | None:
        return self.autoscaler.view(key)


    def routes(self) -> list[Route]:
        """Every tracked service's ready endpoints, for its Kubernetes Service."""
        out = []
        for key, view in self.autoscaler.views():
            namespace, _, name = key.partition("/")
            obj = self.engine.objects.get((SERVICE_KIND, namespace, name))
            if obj is not None:
                out.append(Route(namespace, name, obj.uid, view.endpoints))
        return out


    # ----------------------------------------------------------------- ScaleTarget

    def scale(self, service: JobSpec, replicas: int, change: ScaleChange) -> None:
        obj = self.engine.objects.get((SERVICE_KIND, service.namespace, service.name))
        if obj is None:
            return
        self.engine.reconcile_service(obj, service)
        self.engine.note(obj, "Normal", "Scaled", change.reason)
        self.engine.mark_dirty(obj)
