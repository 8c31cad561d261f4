"""The curtailment controller: PowerBudget limits follow schedules and grid events, and the
running jobs give up power in the order their owners chose.

Every ``step()`` (the simulator calls it on a control period, the operator on its refresh):

1. each budget's limit is the lowest of its base, its schedule and the active grid events
   (``controller.power.grid``); the control plane admits against it from then on;
2. for each budget whose modelled draw (with no grid cap on any job) is above its limit, a
   strategy (``controller.power.curtail``; ours caps by flexibility tier, then pauses)
   chooses caps and pauses; the controller applies the difference: caps changed in place on
   a backend that ``CapsPower``, jobs checkpointed and held out of the queue;
3. when a limit rises, caps relax by the same rule and paused jobs go back to the queue as
   room allows (all of them when the event is over);
4. closed loop: a budget's measured draw (``ReportsPower``) still over its limit
   ``settle_seconds`` after the last action raises ``overrun`` and the next plan sheds that
   much more (escalation to the next action); a job whose GPUs draw more than its cap
   allows is named in ``unhonoured``.

It counts what it did (actions by kind, shed watts, GPU-seconds lost per tier) for the
metrics, the report and the benchmark. Tier-0 jobs are never capped or paused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aifactory.controller.backends.base import CapsPower, ReportsPower
from aifactory.controller.core.spec import JobKind
from aifactory.controller.power.curtail import STRATEGIES, FlexJob, flexible, job_watts
from aifactory.controller.power.grid import (
    DEFAULT_LEVEL_PERCENT,
    MAX_TIER,
    BudgetLimit,
    BudgetWindow,
    GridEvent,
    effective_limit,
    next_change,
)
from aifactory.controller.power.model import GPUPowerProfile, profile_for
from aifactory.controller.power.utilisation import default_utilization
from aifactory.controller.runtime.controlplane import ControlPlane, JobRecord

__all__ = ["CurtailmentController", "GridAccount"]


@dataclass(slots=True)
class GridAccount:
    """What curtailment did, as totals (counters) and the latest values (gauges)."""

    actions: dict[str, int] = field(default_factory=lambda: {
        "cap": 0, "pause": 0, "restore": 0, "resume": 0})
    lost_gpu_seconds: dict[int, float] = field(
        default_factory=lambda: dict.fromkeys(range(MAX_TIER + 1), 0.0))
    shed_watts: dict[str, float] = field(default_factory=dict)
    short_watts: dict[str, float] = field(default_factory=dict)
    overrun_watts: dict[str, float] = field(default_factory=dict)
    unhonoured: dict[str, str] = field(default_factory=dict)


class CurtailmentController:
    """Drives one ``ControlPlane``'s budgets from schedules and grid events (see module)."""

    def __init__(self, cp: ControlPlane, *,
                 windows: Mapping[str, Sequence[BudgetWindow]] | None = None,
                 strategy: str = "flexible",
                 levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT,
                 settle_seconds: float = 30.0,
                 to_wall: Callable[[float], float] | None = None) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        self.cp = cp
        self.base = {b.name: b.watts for b in cp.factory.power_budgets}
        self.windows = {k: tuple(v) for k, v in (windows or {}).items()}
        self.events: dict[str, GridEvent] = {}
        self.strategy = STRATEGIES[strategy]
        self.levels = levels
        self.settle_seconds = settle_seconds
        # Windows and events are in wall time; the plane's clock may run faster (the
        # operator's --sim-speed). None: the same clock (the simulator's virtual time).
        self.to_wall = to_wall or (lambda t: t)
        self.limits: dict[str, BudgetLimit] = {}
        self.capped: dict[str, float] = {}  # job -> grid cap (W per GPU) in force
        self._own: dict[str, float | None] = {}  # job -> its cap before the grid's
        self.paused: dict[str, str] = {}  # job -> the budget that paused it
        self.account = GridAccount()
        self._last: float | None = None
        self._acted_at: dict[str, float] = {}
        self._node_base: list[float] | None = None
        self._lowered_since: dict[str, float] = {}
        self._profiles: list[GPUPowerProfile] | None = None  # per node of cp.topo
        self._flex_cache: dict[str, tuple[object, float | None, int, FlexJob]] = {}
        self._last_jobs: dict[str, FlexJob] = {}  # as of the last step: the interval since
        self._measured_at = -math.inf
        self.measure_seconds = 10.0

    # ----------------------------------------------------------------- inputs

    def set_events(self, source: str, events: Iterable[GridEvent]) -> None:
        """Replace every event of ``source`` (a file, an OpenADR VTN) with ``events``."""
        self.events = {k: e for k, e in self.events.items() if e.source != source}
        for ev in events:
            self.events[ev.id] = ev

    def rebind(self, cp: ControlPlane) -> None:
        """Follow a rebuilt control plane (same jobs, new node numbering)."""
        self.cp = cp
        self._node_base = None
        self._profiles = None
        self._flex_cache.clear()

    def set_windows(self, budget: str, windows: Sequence[BudgetWindow]) -> None:
        self.windows[budget] = tuple(windows)

    def set_base(self, base: Mapping[str, float]) -> None:
        """The budgets' own limits (PowerBudget objects changed)."""
        self.base = dict(base)

    def next_wakeup(self, now: float) -> float | None:
        """The next plane time a window or event starts or ends (same clock as events)."""
        windows = [w for ws in self.windows.values() for w in ws]
        return next_change(windows, self.events.values(), now)

    def sheddable_watts(self) -> float:
        """Watts the site could still shed now without touching tier 0: every flexible
        job at its tier's lowest cap, or paused (what a VEN reports to its utility)."""
        jobs = [j for j, _ in self._flex_jobs(self.cp.now)]
        uncapped = sum(job_watts(j, None) for j in jobs)
        now = sum(job_watts(j, self.capped.get(j.key)) for j in jobs)
        most = flexible(jobs, uncapped, 0.0).shed_watts
        return max(0.0, most - (uncapped - now))

    # ----------------------------------------------------------------- the loop

    def step(self) -> None:
        cp = self.cp
        now = cp.now
        self._account_until(now)
        index = cp.state.budgets
        wall = self.to_wall(now)
        self.limits = {
            name: effective_limit(name, self.base.get(name, index.limits[b]),
                                  self.windows.get(name, ()), self.events.values(), wall,
                                  self.levels)
            for b, name in enumerate(index.names)}
        cp.set_budget_limits({n: lim.watts for n, lim in self.limits.items()})
        self._measure(now)
        jobs = self._flex_jobs(now)
        want_caps: dict[str, float] = {}
        want_pauses: dict[str, str] = {}
        for b, name in enumerate(index.names):
            scope = [j for j, budgets in jobs if b in budgets]
            uncapped = cp.metrics.budget_actual[b] + sum(
                job_watts(j, None) - job_watts(j, self.capped[j.key])
                for j in scope if j.key in self.capped) if self.capped else \
                cp.metrics.budget_actual[b]
            limit = self.limits[name].watts - self.account.overrun_watts.get(name, 0.0)
            plan = self.strategy(scope, uncapped, limit,
                                 lambda j: self._unsaved(cp.jobs[j.key], now))
            for key, cap in plan.caps.items():
                want_caps[key] = min(cap, want_caps.get(key, cap))
            for key in plan.pauses:
                want_pauses.setdefault(key, name)
            self.account.shed_watts[name] = plan.shed_watts + sum(
                self._full_watts(cp.jobs[k]) for k, b in self.paused.items()
                if b == name and k in cp.jobs)
            self.account.short_watts[name] = plan.short_watts
            self._release(name, limit - (uncapped - plan.shed_watts), plan.pauses)
        self._apply(want_caps, want_pauses)

    def _apply(self, caps: Mapping[str, float], pauses: Mapping[str, str]) -> None:
        cp = self.cp
        for key, budget in pauses.items():
            rec = cp.jobs.get(key)
            if rec is None or rec.placement is None:
                continue
            why = f"paused for {self._cause(budget)}, resumes when it ends"
            self.account.lost_gpu_seconds[self._tier(rec)] += self._unsaved(rec, cp.now)
            self.capped.pop(key, None)
            self._own.pop(key, None)
            cp.pause(rec, why)
            self.paused[key] = budget
            self.account.actions["pause"] += 1
            self._acted_at[budget] = cp.now
        if not isinstance(cp.backend, CapsPower):
            return
        for key in sorted(set(caps) | set(self.capped)):
            rec = cp.jobs.get(key)
            if rec is None or rec.placement is None or rec.done:
                self.capped.pop(key, None)
                self._own.pop(key, None)
                continue
            cap = caps.get(key)
            held = self.capped.get(key)
            # A cap within 1 W above the one in force is left alone; a lower one is
            # applied however small the step (else the draw stays over the limit).
            if cap is not None and held is not None and held <= cap < held + 1.0:
                continue
            own = self._own.setdefault(key, cp.running_spec(rec).power_cap_watts_per_gpu)
            if cap is None:
                cp.recap(rec, self._own.pop(key, None),
                         "power cap restored: the grid event is over"
                         if not self._lowered(rec) else "power cap raised: room again")
                del self.capped[key]
                self.account.actions["restore"] += 1
            else:
                # Rounded down to 0.1 W: rounding up would leave the draw over the limit.
                cap = math.floor(10.0 * (cap if own is None else min(cap, own))) / 10.0
                cp.recap(rec, cap, f"capped to {cap:.0f} W per GPU for "
                         f"{self._cause_of(rec)}")
                self.capped[key] = cap
                self.account.actions["cap"] += 1

    def _release(self, budget: str, room: float, keep: Sequence[str]) -> None:
        """Paused jobs of ``budget`` go back to the queue: all when no event or window
        lowers it, else those whose full draw fits in ``room``, least flexible first."""
        cp = self.cp
        lowered = self.limits[budget].cause is not None
        mine = sorted((k for k, b in self.paused.items() if b == budget and k not in keep),
                      key=lambda k: (self._tier(cp.jobs[k]) if k in cp.jobs else 0, k))
        for key in mine:
            rec = cp.jobs.get(key)
            if rec is None or rec.done:
                del self.paused[key]
                continue
            need = self._full_watts(rec)
            if lowered and need > room:
                continue
            room -= need
            del self.paused[key]
            cp.release_hold(key, "resumed: the grid event is over" if not lowered
                            else f"resumed: room under {self._cause(budget)}")
            self.account.actions["resume"] += 1

    # ----------------------------------------------------------------- measuring

    def _measure(self, now: float) -> None:
        """Closed loop: measured draw per budget against its limit once actions settled,
        and caps the hardware does not honour."""
        cp = self.cp
        backend = cp.backend
        lowered = any(lim.cause for lim in self.limits.values())
        if not isinstance(backend, ReportsPower) or \
                (not lowered and not self.capped and not self.account.overrun_watts) or \
                now - self._measured_at < self.measure_seconds:
            return
        self._measured_at = now
        index = cp.state.budgets
        node_of = cp.topo.node_index
        measured = [0.0] * len(index.names)
        gpu_watts: dict[tuple[str, int], float] = {}
        for node, gpu, watts in backend.gpu_power():
            gpu_watts[(node, gpu)] = watts
            n = node_of.get(node)
            if n is not None:
                for b in index.node_budgets[n]:
                    measured[b] += watts
        if self._node_base is None or len(self._node_base) != len(index.names):
            # measured covers the GPUs; a budget also counts its nodes' base power
            self._node_base = [cp.factory.base_watts_per_node * sum(
                b in bs for bs in index.node_budgets) for b in range(len(index.names))]
        for b, name in enumerate(index.names):
            over = measured[b] + self._node_base[b] - self.limits[name].watts
            since = self._lowered_since.get(name)
            if self.limits[name].cause is None:
                self._lowered_since.pop(name, None)
            elif since is None:
                self._lowered_since[name] = since = now
            settled = since is not None and now - since >= self.settle_seconds and \
                now - self._acted_at.get(name, -1e18) >= self.settle_seconds
            if over > 1.0 and settled:
                self.account.overrun_watts[name] = self.account.overrun_watts.get(name, 0.0) \
                    + over
                self._acted_at[name] = now
            elif self.limits[name].cause is None:
                self.account.overrun_watts.pop(name, None)
        self.account.unhonoured = {}
        for key, cap in self.capped.items():
            rec = cp.jobs.get(key)
            if rec is None or rec.placement is None:
                continue
            for slot in rec.placement.slots:
                name = cp.topo.nodes[slot.node].name
                start = cp.topo.gpu_start[slot.node]
                for g in slot.gpus:
                    w = gpu_watts.get((name, g - start))
                    if w is not None and w > cap * 1.05 + 1.0:
                        self.account.unhonoured[key] = (
                            f"GPU {g - start} on {name} draws {w:.0f} W over its "
                            f"{cap:.0f} W cap")

    def _account_until(self, now: float) -> None:
        last, self._last = self._last, now
        if last is None or now <= last:
            return
        dt = now - last
        cp = self.cp
        for key, cap in self.capped.items():  # as they ran since the last step
            job = self._last_jobs.get(key)
            if job is None:
                continue
            slow = 1.0 - job.speed(cap) / max(1e-9, job.speed(None))
            self.account.lost_gpu_seconds[job.tier] += job.gpus * dt * max(0.0, slow)
        for key in self.paused:
            rec = cp.jobs.get(key)
            if rec is not None and not rec.done:
                self.account.lost_gpu_seconds[self._tier(rec)] += rec.spec.gpu_equivalents * dt

    # ----------------------------------------------------------------- helpers

    def _flex_jobs(self, now: float) -> list[tuple[FlexJob, frozenset[int]]]:
        cp = self.cp
        index = cp.state.budgets
        out: list[tuple[FlexJob, frozenset[int]]] = []
        for rec in cp.jobs.values():
            if rec.placement is None or rec.done or not rec.placement.slots:
                continue
            budgets = frozenset(b for s in rec.placement.slots for b in index.node_budgets[s.node])
            if budgets:
                out.append((self._flex(rec, now), budgets))
        self._last_jobs = {j.key: j for j, _ in out}
        live = self._last_jobs.keys()
        for key in [k for k in self._flex_cache if k not in live]:
            del self._flex_cache[key]
        return out

    def _flex(self, rec: JobRecord, now: float) -> FlexJob:
        """The job as the planner sees it (cached while its placement, cap and tier hold)."""
        assert rec.placement is not None
        own = self._own[rec.spec.key] if rec.spec.key in self.capped \
            else self.cp.running_spec(rec).power_cap_watts_per_gpu
        tier = self._tier(rec)
        hit = self._flex_cache.get(rec.spec.key)
        if hit is not None and hit[0] is rec.placement and hit[1] == own and hit[2] == tier:
            return hit[3]
        if self._profiles is None:
            self._profiles = [profile_for(n.gpu_model) for n in self.cp.topo.nodes]
        profiles = self._profiles
        slots = tuple((profiles[s.node], len(s.gpus) * s.milli / 1000.0)
                      for s in rec.placement.slots if s.gpus)
        job = self._new_flex(rec, slots, own, tier)
        self._flex_cache[rec.spec.key] = (rec.placement, own, tier, job)
        return job

    def _new_flex(self, rec: JobRecord, slots: tuple[tuple[GPUPowerProfile, float], ...],
                  own: float | None, tier: int) -> FlexJob:
        return FlexJob(
            key=rec.spec.key, tier=tier, slots=slots,
            utilization=default_utilization(rec.spec), own_cap=own,
            lost_if_paused=0.0,  # asked of the backend only when a pause is planned
            started_at=rec.started_at or 0.0,
            pausable=rec.spec.kind is JobKind.TRAINING)

    def _unsaved(self, rec: JobRecord, now: float) -> float:
        """GPU-seconds of work since the job's last checkpoint (lost if paused now)."""
        assert rec.placement is not None
        status = self.cp.backend.status(rec.spec.key)
        at = status.last_checkpoint_at if status is not None and \
            status.last_checkpoint_at is not None else rec.last_checkpoint_at
        return rec.placement.gpu_equivalents * max(0.0, now - at)

    def tier_of(self, rec: JobRecord) -> int:
        """The job's flexibility tier: its own, else its queue's default, else 0."""
        return self._tier(rec)

    def _tier(self, rec: JobRecord) -> int:
        if rec.spec.flexibility is not None:
            return rec.spec.flexibility
        for q in self.cp.factory.queues:
            if q.name == rec.spec.queue:
                return q.default_flexibility
        return 0

    def _full_watts(self, rec: JobRecord) -> float:
        util = default_utilization(rec.spec)
        p = profile_for(self.cp.topo.nodes[0].gpu_model if not rec.spec.gpu_models
                        else rec.spec.gpu_models[0])
        return rec.spec.gpu_equivalents * (p.power_watts(util) - p.idle_power_watts())

    def _cause(self, budget: str) -> str:
        lim = self.limits.get(budget)
        return (lim.cause if lim is not None and lim.cause else f"power budget {budget}")

    def _cause_of(self, rec: JobRecord) -> str:
        assert rec.placement is not None
        index = self.cp.state.budgets
        for s in rec.placement.slots:
            for b in index.node_budgets[s.node]:
                if self.limits[index.names[b]].cause:
                    return self._cause(index.names[b])
        return "a power budget"

    def _lowered(self, rec: JobRecord) -> bool:
        if rec.placement is None:
            return False
        index = self.cp.state.budgets
        return any(self.limits[index.names[b]].cause is not None
                   for s in rec.placement.slots for b in index.node_budgets[s.node])

