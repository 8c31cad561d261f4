"""A light time series of a simulation run, for ``aifactory report``.

``TimeSeriesSampler`` hooks the simulation's clock (``Simulation.on_advance``): whenever
virtual time jumps from ``t0`` to ``t1``, the state seen at ``t0`` held for the whole
interval, so every grid point ``k * interval`` in ``[t0, t1)`` gets it, measured once.
A sample costs O(racks + running jobs + live jobs), nothing per GPU, and a replay of a long
trace stays bounded: past ``max_points`` the grid coarsens by two.

Recorded: the factory's modelled power draw and every power budget's draw and limit, mean
GPU utilization per rack, pending jobs and held GPUs per queue, and at the end energy, cost
and GPU-hours per queue. ``TimeSeries`` is plain JSON (``aifactory simulate --json ...
--sample-seconds N`` writes it next to the results); ``controller.observe.promquery`` builds the
same shape from Prometheus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from aifactory.controller.backends.base import MetersJobEnergy
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import default_utilization
from aifactory.controller.runtime.scaler import replicas_of

if TYPE_CHECKING:
    from aifactory.controller.core.state import Placement
    from aifactory.controller.runtime.controlplane import JobRecord
    from aifactory.controller.sim.simulation import Simulation

__all__ = ["SERVICE_COLUMNS", "BudgetSeries", "TimeSeries", "TimeSeriesSampler", "Totals"]

SERVICE_COLUMNS = ("service_desired", "service_ready", "service_rate", "service_watts")


@dataclass(frozen=True, slots=True)
class BudgetSeries:
    """A budget's draw over time; ``limits_watts`` its limit at each time when it moved
    (a schedule window or a grid event), else empty and ``limit_watts`` held throughout."""

    name: str
    limit_watts: float
    draw_watts: tuple[float, ...]
    limits_watts: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Totals:
    """Energy, cost and GPU-hours of the jobs of one queue (or namespace) so far."""

    name: str
    energy_joules: float
    cost_dollars: float
    gpu_hours: float


@dataclass(frozen=True, slots=True)
class TimeSeries:
    """Columns over ``times`` (seconds): ``rack_utilization[r][t]``, ``queue_pending[q][t]``
    and ``queue_gpus[q][t]`` follow ``racks`` and ``queues``."""

    title: str
    source: str  # simulation | prometheus
    times: tuple[float, ...]
    power_watts: tuple[float, ...]
    budgets: tuple[BudgetSeries, ...]
    racks: tuple[str, ...]
    rack_utilization: tuple[tuple[float, ...], ...]
    queues: tuple[str, ...]
    queue_pending: tuple[tuple[float, ...], ...]
    queue_gpus: tuple[tuple[float, ...], ...]
    totals: tuple[Totals, ...] = ()  # per queue
    namespace_totals: tuple[Totals, ...] = ()
    summary: dict[str, float] = field(default_factory=dict)
    # With grid events: GPU draw above idle per flexibility tier 0-3 over ``times``, and
    # the events as (id, start, end) in the same seconds.
    tier_draw: tuple[tuple[float, ...], ...] = ()
    grid_events: tuple[tuple[str, float, float], ...] = ()
    # With autoscaled inference: per service (``services``) over ``times``, replicas wanted
    # and serving, requests per second offered, and its replicas' GPU draw in watts.
    services: tuple[str, ...] = ()
    service_desired: tuple[tuple[float, ...], ...] = ()
    service_ready: tuple[tuple[float, ...], ...] = ()
    service_rate: tuple[tuple[float, ...], ...] = ()
    service_watts: tuple[tuple[float, ...], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(doc: Any) -> TimeSeries:
        """Read what ``to_dict`` wrote; a clear SpecError names the first bad field."""
        if not isinstance(doc, dict):
            raise SpecError("timeseries", f"must be a mapping, got {type(doc).__name__}")
        try:
            return TimeSeries(
                title=str(doc.get("title", "")), source=str(doc.get("source", "")),
                times=_floats(doc["times"]), power_watts=_floats(doc["power_watts"]),
                budgets=tuple(BudgetSeries(str(b["name"]), float(b["limit_watts"]),
                                           _floats(b["draw_watts"]),
                                           _floats(b.get("limits_watts", ())))
                              for b in doc.get("budgets", ())),
                racks=tuple(str(r) for r in doc.get("racks", ())),
                rack_utilization=tuple(_floats(r) for r in doc.get("rack_utilization", ())),
                queues=tuple(str(q) for q in doc.get("queues", ())),
                queue_pending=tuple(_floats(q) for q in doc.get("queue_pending", ())),
                queue_gpus=tuple(_floats(q) for q in doc.get("queue_gpus", ())),
                totals=_totals(doc.get("totals", ())),
                namespace_totals=_totals(doc.get("namespace_totals", ())),
                summary={str(k): float(v) for k, v in (doc.get("summary") or {}).items()},
                tier_draw=tuple(_floats(t) for t in doc.get("tier_draw", ())),
                grid_events=tuple((str(e[0]), float(e[1]), float(e[2]))
                                  for e in doc.get("grid_events", ())),
                services=tuple(str(s) for s in doc.get("services", ())),
                **{k: tuple(_floats(c) for c in doc.get(k, ())) for k in SERVICE_COLUMNS})
        except KeyError as exc:
            raise SpecError(f"timeseries.{exc.args[0]}", "is required (write it with "
                            "aifactory simulate --json PATH --sample-seconds N)") from exc
        except (TypeError, ValueError) as exc:
            raise SpecError("timeseries", f"holds a value that is not a number: {exc}"
                            ) from exc


def _totals(rows: Any) -> tuple[Totals, ...]:
    return tuple(Totals(str(t["name"]), float(t["energy_joules"]), float(t["cost_dollars"]),
                        float(t["gpu_hours"])) for t in rows)


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float("nan") if v is None else float(v) for v in values)


class TimeSeriesSampler:
    """Records a ``TimeSeries`` while a ``Simulation`` runs (attach before ``run()``)."""

    def __init__(self, sim: Simulation, interval_seconds: float = 60.0,
                 max_points: int = 4000) -> None:
        if not interval_seconds > 0:
            raise SpecError("--sample-seconds", f"must be > 0, got {interval_seconds}")
        self.sim = sim
        self.interval = float(interval_seconds)
        self.max_points = max(16, max_points)
        topo = sim.topo
        names = topo.level_names
        self.rack_level = names.index("rack") if "rack" in names else \
            max(0, topo.node_level - 1)
        self.racks = tuple(d.name for d in topo.domains[self.rack_level])
        self.rack_gpus = [d.gpus for d in topo.domains[self.rack_level]]
        self.queues = sorted({q.name for q in sim.factory.queues})
        self.base_watts = sim.factory.base_watts_per_node * len(topo.nodes)
        self.times: list[float] = []
        self.power: list[float] = []
        self.budget_draw: list[list[float]] = [[] for _ in sim.state.budgets.names]
        self.budget_limit: list[list[float]] = [[] for _ in sim.state.budgets.names]
        self.tier_draw: list[list[float]] = [[] for _ in range(4)]
        self.rack_util: list[list[float]] = [[] for _ in self.racks]
        self.pending: dict[str, list[float]] = {q: [] for q in self.queues}
        self.gpus: dict[str, list[float]] = {q: [] for q in self.queues}
        self._next = sim.now
        self._limits: list[float] = list(sim.state.budgets.limits)
        self._tiers: list[float] = [0.0] * 4
        self._live: set[str] = set(sim.jobs)
        self._racks_of: dict[str, tuple[Placement, list[tuple[int, float]]]] = {}
        self.services: list[str] = []
        self.service_cols: dict[str, list[list[float]]] = {}  # service -> 4 columns
        self._services_now: dict[str, tuple[float, float, float, float]] = {}
        sim.on_advance.append(self._advance)
        sim.listeners.append(self._event)

    # ----------------------------------------------------------------- hooks

    def _event(self, reason: str, rec: JobRecord, message: str) -> None:
        if reason == "Queued":
            self._live.add(rec.spec.key)

    def _advance(self, start: float, end: float) -> None:
        if self._next >= end:
            return
        row = self._measure()
        while self._next < end:
            self._record(self._next, row)
            self._next += self.interval

    # ----------------------------------------------------------------- measuring

    def _measure(self) -> tuple[float, list[float], list[float], dict[str, int],
                                dict[str, float]]:
        sim = self.sim
        metrics = sim.metrics
        util = [0.0] * len(self.racks)
        gpus: dict[str, float] = {}
        for key, placement in sim.state.allocations.items():
            rec = sim.jobs.get(key)
            if rec is None:
                continue
            for rack, share in self._rack_shares(rec.spec, placement):
                util[rack] += share
            queue = rec.spec.queue
            gpus[queue] = gpus.get(queue, 0.0) + placement.gpu_equivalents
        util = [u / g if g else 0.0 for u, g in zip(util, self.rack_gpus, strict=True)]
        pending: dict[str, int] = {}
        done: list[str] = []
        for key in self._live:
            rec = sim.jobs.get(key)
            if rec is None or rec.done:
                done.append(key)
            elif rec.placement is None:
                pending[rec.spec.queue] = pending.get(rec.spec.queue, 0) + 1
        self._live.difference_update(done)
        for key in done:
            self._racks_of.pop(key, None)
        tiers = [0.0] * 4
        grid = sim.grid
        if grid is not None:
            for key, watts in metrics.job_delta.items():
                rec = sim.jobs.get(key)
                if rec is not None:
                    tiers[grid.tier_of(rec)] += watts
        self._limits = list(sim.state.budgets.limits)
        self._tiers = tiers
        self._services_now = self._measure_services()
        return (metrics.total_watts + self.base_watts, list(metrics.budget_actual), util,
                pending, gpus)

    def _measure_services(self) -> dict[str, tuple[float, float, float, float]]:
        """(desired, ready, requests/s, watts) of every autoscaler-tracked service."""
        sim = self.sim
        scaler = sim.scaler
        if scaler is None:
            return {}
        out: dict[str, tuple[float, float, float, float]] = {}
        job_delta = sim.metrics.job_delta
        for key in scaler.tracked():
            view = scaler.view(key)
            if view is None:
                continue
            watts = 0.0
            for rec in replicas_of(sim, key):
                if rec.placement is not None:
                    idle = profile_for(sim.topo.nodes[rec.placement.slots[0].node]
                                       .gpu_model).idle_power_watts() \
                        if rec.placement.slots else 0.0
                    watts += job_delta.get(rec.spec.key, 0.0) + \
                        idle * rec.placement.gpu_equivalents
            rate = sim.traffic.demand(key) if sim.traffic is not None else 0.0
            out[key] = (float(view.desired), float(view.ready), rate, watts)
        return out

    def _rack_shares(self, spec: JobSpec, placement: Placement) -> list[tuple[int, float]]:
        """(rack index, utilization x GPU-equivalents) of a job, cached per placement."""
        cached = self._racks_of.get(spec.key)
        if cached is not None and cached[0] is placement:
            return cached[1]
        u = default_utilization(spec)
        per: dict[int, float] = {}
        topo = self.sim.topo
        for slot in placement.slots:
            rack = topo.ancestor(slot.node, self.rack_level)
            per[rack] = per.get(rack, 0.0) + u * len(slot.gpus) * slot.milli / 1000.0
        shares = sorted(per.items())
        self._racks_of[spec.key] = (placement, shares)
        return shares

    def _record(self, at: float, row: tuple[float, list[float], list[float], dict[str, int],
                                           dict[str, float]]) -> None:
        power, budgets, util, pending, gpus = row
        for queue in set(pending) | set(gpus):
            if queue not in self.pending:  # a queue no factory config names
                self.queues.append(queue)
                self.pending[queue] = [0.0] * len(self.times)
                self.gpus[queue] = [0.0] * len(self.times)
        self.times.append(at)
        self.power.append(power)
        for column, value in zip(self.budget_draw, budgets, strict=True):
            column.append(value)
        for column, value in zip(self.budget_limit, self._limits, strict=True):
            column.append(value)
        for column, value in zip(self.tier_draw, self._tiers, strict=True):
            column.append(value)
        for column, value in zip(self.rack_util, util, strict=True):
            column.append(value)
        for queue in self.queues:
            self.pending[queue].append(float(pending.get(queue, 0)))
            self.gpus[queue].append(gpus.get(queue, 0.0))
        for key in self._services_now:
            if key not in self.service_cols:
                self.services.append(key)
                self.service_cols[key] = [[0.0] * (len(self.times) - 1) for _ in range(4)]
        for key in self.services:
            now = self._services_now.get(key, (0.0, 0.0, 0.0, 0.0))
            for column, value in zip(self.service_cols[key], now, strict=True):
                column.append(value)
        if len(self.times) > self.max_points:
            self._coarsen()

    def _coarsen(self) -> None:
        """Keep every other point and double the interval (long replays stay small)."""
        def half(values: list[float]) -> list[float]:
            return values[::2]

        self.times = half(self.times)
        self.power = half(self.power)
        self.budget_draw = [half(c) for c in self.budget_draw]
        self.budget_limit = [half(c) for c in self.budget_limit]
        self.tier_draw = [half(c) for c in self.tier_draw]
        self.rack_util = [half(c) for c in self.rack_util]
        self.pending = {q: half(c) for q, c in self.pending.items()}
        self.gpus = {q: half(c) for q, c in self.gpus.items()}
        self.service_cols = {k: [half(c) for c in cols]
                             for k, cols in self.service_cols.items()}
        self.interval *= 2
        self._next = self.times[-1] + self.interval

    # ----------------------------------------------------------------- result

    def series(self, title: str = "") -> TimeSeries:
        """The series so far, with a last point at the current time and per-queue totals."""
        sim = self.sim
        if not self.times or self.times[-1] < sim.now:
            self._record(sim.now, self._measure())
        backend = sim.backend
        cost = sim.factory.cost
        now = sim.now
        totals: dict[str, list[float]] = {}
        by_namespace: dict[str, list[float]] = {}
        for key, rec in sim.jobs.items():
            joules = max(rec.energy_joules, backend.job_energy_joules(key)
                         if isinstance(backend, MetersJobEnergy) else 0.0)
            gpu_seconds = sim.metrics.gpu_seconds(key, now)
            for group, name in ((totals, rec.spec.queue), (by_namespace, rec.spec.namespace)):
                t = group.setdefault(name, [0.0, 0.0, 0.0])
                t[0] += joules
                t[1] += cost.cost_dollars(joules, gpu_seconds)
                t[2] += gpu_seconds / 3600.0
        names = sim.state.budgets.names
        limits = sim.state.budgets.limits
        result = sim.result()
        return TimeSeries(
            title=title or f"{sim.factory.name} / {sim.policy.name}", source="simulation",
            times=tuple(self.times), power_watts=tuple(self.power),
            budgets=tuple(BudgetSeries(n, lim, tuple(c),
                                       tuple(moved) if len(set(moved)) > 1 else ())
                          for n, lim, c, moved in zip(names, limits, self.budget_draw,
                                                      self.budget_limit, strict=True)),
            tier_draw=tuple(tuple(c) for c in self.tier_draw) if sim.grid is not None
            else (),
            grid_events=tuple((e.id, e.start, e.end if e.end is not None else sim.now)
                              for e in sim.grid.events.values()) if sim.grid is not None
            else (),
            services=tuple(self.services),
            **{name: tuple(tuple(self.service_cols[k][i]) for k in self.services)
               for i, name in enumerate(SERVICE_COLUMNS)},
            racks=self.racks, rack_utilization=tuple(tuple(c) for c in self.rack_util),
            queues=tuple(self.queues),
            queue_pending=tuple(tuple(self.pending[q]) for q in self.queues),
            queue_gpus=tuple(tuple(self.gpus[q]) for q in self.queues),
            totals=tuple(Totals(q, *totals.get(q, [0.0, 0.0, 0.0]))
                         for q in sorted(set(self.queues) | set(totals))),
            namespace_totals=tuple(Totals(n, *t) for n, t in sorted(by_namespace.items())),
            summary={"gpus_total": float(result.gpus_total),
                     "jobs_completed": float(result.jobs_completed),
                     "gpu_allocation_rate_mean": result.gpu_allocation_rate_mean,
                     "energy_joules": result.energy_joules,
                     "cost_dollars": result.cost_dollars,
                     "simulated_seconds": result.simulated_seconds})
