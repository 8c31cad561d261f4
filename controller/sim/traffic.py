"""Request traffic for simulated inference services: a load curve, and what it does to replicas.

A ``LoadCurve`` is relative load (0-1) over time: ``diurnal()`` (a smooth day with its peak
in the afternoon and its trough at night, as user-facing services see), or a CSV of
``seconds,requests_per_second`` (``load_curve_csv``: a user's own recorded rate). The
Alibaba DLRM inference trace in ``../shared/traces`` records instance counts, not request
rates (its per-app counts barely move over 31 days), so it is not used as a load.

``TrafficModel`` turns each service's curve into what its replicas see, by Little's law:
``rate x latency`` requests are in flight, split evenly over the ready replicas; a replica
serves up to ``saturation_in_flight`` requests at the base latency, beyond that requests
queue (latency grows in proportion) and its GPUs are fully busy. It implements
``ReportsLoad`` for the autoscaler, and sets each replica's GPU utilization on the control
plane (``ControlPlane.set_utilization``), so modelled watts follow the load too.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from aifactory.controller.backends.base import ReplicaLoad
from aifactory.controller.core.errors import InputFileError, SpecError
from aifactory.controller.core.spec import JobSpec, replica_parts
from aifactory.controller.runtime.autoscale import AutoscalePolicy
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.scaler import replicas_of

__all__ = ["DAY", "LoadCurve", "ServiceTraffic", "TrafficModel", "diurnal", "load_curve_csv",
           "traffic_for"]

DAY = 86400.0
IDLE_UTILIZATION = 0.05  # a serving replica with no request still keeps its GPU warm


@dataclass(frozen=True, slots=True)
class LoadCurve:
    """Relative load at ``times`` (seconds, ascending), linear in between; repeats every
    ``period`` seconds when set, else holds its last value."""

    name: str
    times: tuple[float, ...]
    values: tuple[float, ...]
    period: float | None = DAY

    def at(self, t: float) -> float:
        if self.period:
            t = t % self.period
        i = bisect.bisect_right(self.times, t)
        if i == 0:
            return self.values[0]
        if i >= len(self.times):
            if not self.period:
                return self.values[-1]
            t0, v0, t1, v1 = self.times[-1], self.values[-1], self.period, self.values[0]
        else:
            t0, v0, t1, v1 = self.times[i - 1], self.values[i - 1], self.times[i], \
                self.values[i]
        return v0 if t1 <= t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)


def diurnal(trough: float = 0.1, peak_hour: float = 14.0, step_seconds: float = 900.0
            ) -> LoadCurve:
    """A day of user traffic: ``trough`` of the peak at night (12 h before ``peak_hour``),
    the peak at ``peak_hour``, a steep morning ramp and a slower evening decline."""
    if not 0.0 <= trough <= 1.0:
        raise SpecError("trough", f"must be between 0 and 1, got {trough}")
    times, values = [], []
    t = 0.0
    while t < DAY:
        phase = 2 * math.pi * ((t / 3600.0 - peak_hour) / 24.0)
        shape = (1 + math.cos(phase)) / 2  # 1 at the peak, 0 twelve hours away
        values.append(trough + (1 - trough) * shape ** 1.5)
        times.append(t)
        t += step_seconds
    return LoadCurve("diurnal", tuple(times), tuple(values), DAY)


def load_curve_csv(path: str | Path) -> LoadCurve:
    """A recorded rate: a CSV with a header, seconds in the first column and requests per
    second in the second (further columns ignored), normalised to its peak; or, when the
    second column is headed ``relative_load``, the relative load itself (1.0: the sized
    peak). Held after its last row (no repeat)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise InputFileError(str(path), str(exc.strerror or exc)) from exc
    head = lines[0].split(",") if lines else []
    relative = len(head) > 1 and head[1].strip() == "relative_load"
    rows: list[tuple[float, float]] = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        cells = line.split(",")
        try:
            rows.append((float(cells[0]), float(cells[1])))
        except (ValueError, IndexError) as exc:
            raise InputFileError(str(path), "want 'seconds,requests_per_second' numbers, "
                                 f"got {line!r}", n) from exc
    if not rows:
        raise InputFileError(str(path), "no rows after the header (seconds,"
                             "requests_per_second)")
    rows.sort()
    peak = 1.0 if relative else max(r for _, r in rows)
    if not peak > 0 or any(r < 0 or not math.isfinite(r) for _, r in rows):
        raise InputFileError(str(path), "requests_per_second must be >= 0, some > 0",
                             column="requests_per_second")
    return LoadCurve(p.stem, tuple(t for t, _ in rows), tuple(r / peak for _, r in rows),
                     None)


@dataclass(frozen=True, slots=True)
class ServiceTraffic:
    """One service's traffic: ``curve`` times ``peak_requests_per_second``, each request
    taking ``latency_seconds`` while its replica is below ``saturation_in_flight``."""

    curve: LoadCurve
    peak_requests_per_second: float
    latency_seconds: float = 0.2
    saturation_in_flight: float = 16.0

    def rate(self, t: float) -> float:
        return self.curve.at(t) * self.peak_requests_per_second


def traffic_for(service: JobSpec, policy: AutoscalePolicy | None, curve: LoadCurve,
                latency_seconds: float = 0.2, peak_share: float = 0.8) -> ServiceTraffic:
    """Traffic sized to a service: at the peak it needs ``peak_share`` of its maximum
    replicas at their target load (its replica count at saturation without a policy)."""
    if policy is not None:
        saturation = policy.target_in_flight * 1.25
        peak_in_flight = peak_share * policy.max_replicas * policy.target_in_flight
    else:
        saturation = 16.0
        peak_in_flight = peak_share * max(1, service.workers) * saturation
    return ServiceTraffic(curve, peak_in_flight / latency_seconds, latency_seconds,
                          saturation)


@dataclass(slots=True)
class _Served:
    in_flight: float = 0.0
    latency: float = 0.0
    requests: float = 0.0
    latency_total: float = 0.0


@dataclass(slots=True)
class _Service:
    traffic: ServiceTraffic
    replicas: dict[str, _Served] = field(default_factory=dict)
    at: float | None = None


class TrafficModel:
    """``ReportsLoad`` for the simulator: call ``refresh()`` before the autoscaler reads."""

    def __init__(self, cp: ControlPlane, services: Mapping[str, ServiceTraffic], *,
                 origin: float = 0.0, follow: Path | None = None) -> None:
        self.cp = cp
        self.services = {key: _Service(t) for key, t in services.items()}
        self.origin = origin  # the curves' time 0 on the plane's clock
        self.follow = follow  # a CSV re-read when it changes (a live-driven rate)
        self._mtime = follow.stat().st_mtime_ns if follow is not None else 0

    def add(self, key: str, traffic: ServiceTraffic) -> None:
        """Drive one more service (or re-size one whose spec changed)."""
        old = self.services.get(key)
        self.services[key] = _Service(traffic) if old is None else \
            _Service(traffic, old.replicas, old.at)

    def remove(self, key: str) -> None:
        self.services.pop(key, None)

    def _reread(self) -> None:
        path = self.follow
        if path is None:
            return
        try:
            mtime = path.stat().st_mtime_ns
            if mtime == self._mtime:
                return
            curve = load_curve_csv(path)
        except (OSError, InputFileError):
            return  # mid-write or gone: keep the last good curve
        self._mtime = mtime
        for svc in self.services.values():
            svc.traffic = replace(svc.traffic, curve=curve)

    def refresh(self) -> None:
        """Count what was served since the last refresh (the state then held throughout),
        then spread the load now over the ready replicas."""
        now = self.cp.now
        self._reread()
        for key, svc in self.services.items():
            if svc.at is not None and now > svc.at:
                dt = now - svc.at
                for served in svc.replicas.values():
                    done = served.in_flight / served.latency * dt if served.latency else 0.0
                    served.requests += done
                    served.latency_total += done * served.latency
            svc.at = now
            ready = [r for r in replicas_of(self.cp, key) if r.placement is not None]
            t = svc.traffic
            offered = t.rate(now - self.origin) * t.latency_seconds / len(ready) \
                if ready else 0.0
            slow = max(1.0, offered / t.saturation_in_flight)
            kept: dict[str, _Served] = {}
            for rec in ready:
                served = svc.replicas.get(rec.spec.key) or _Served()
                served.in_flight = offered * slow
                served.latency = t.latency_seconds * slow
                kept[rec.spec.key] = served
                busy = min(1.0, offered / t.saturation_in_flight)
                self.cp.set_utilization(rec, IDLE_UTILIZATION +
                                        (1 - IDLE_UTILIZATION) * busy)
            svc.replicas = kept

    def replica_load(self, job: str) -> ReplicaLoad | None:
        parts = replica_parts(job)
        svc = self.services.get(parts[0]) if parts is not None else None
        served = svc.replicas.get(job) if svc is not None else None
        if served is None:
            return None
        return ReplicaLoad(served.in_flight, served.requests, served.latency_total)

    def demand(self, service: str) -> float:
        """Requests per second the service is offered now (0 when not modelled)."""
        svc = self.services.get(service)
        return 0.0 if svc is None else svc.traffic.rate(self.cp.now - self.origin)
