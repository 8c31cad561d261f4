"""Grid events: shedding load for the utility (a 25 % event for 3 h, 30 % within 30 s).

A utility asks the factory to lower its draw. Two events, after the field trials of Emerald
AI's software-only curtailment:

- ``25% for 3h`` (Emerald AI + Oracle, Phoenix, May 2025: 256 GPUs, 25 % for 3 h): the
  signal arrives when the event starts;
- ``30% within 30s`` (Emerald AI, London, Dec 2025: 96 Blackwell GPUs, > 30 % within 30 s,
  held for hours): the signal arrives 30 s before the lower limit applies (the ramp the
  utility allows); held 3 h here.

Factories: the built-in ``small`` (the default factory: 256 H200) and ``100k`` (100,352
H200). Their budgets are replaced by one ``site`` budget over every node whose base is the
factory's own ``factory`` budget (150 kW and 59 MW, 85 % of peak draw), so admission holds
the steady draw at or under the base; an event lowers the site limit to 75 % / 70 % of the
base. The script checks that the event binds (modelled draw just before the signal above
the new limit) and says so if it does not.

Workload (seeded, the same for every strategy; ``mix``): inference services of 2-4
replicas (1, 2, 4 or 8 GPUs each, tier 0 or 1, half each) holding about 15 % of the GPUs
from t=0, never ending; training gangs of 8 to 64 GPUs (``small``) or 8 to 1,024 GPUs
(``100k``), 8 GPUs per worker, multi-node gangs preferring one rack, tiers 0-3 with 25 %
each, checkpoints every 10-30 min (uniform), runtimes log-normal (median 2 h, sigma 0.8,
capped at 12 h); an initial burst of 1.2x the training capacity at t=0, then Poisson
arrivals offering 1.1x the factory's training capacity, so the queue never empties and the
budget binds. The event starts at 2 h (steady state) and the run ends 1 h after it ends.

Strategies (``controller.power.curtail``), each on the same workload and seed: ``flexible``
(ours: caps by tier, most flexible first, tier 0 untouched, then pauses), ``uniform`` (one
cap on every GPU), ``pause-newest`` (pause the most recently started jobs); plus one run
without the event, for the energy shed. Measured on the site budget's modelled draw
(``sim.metrics.budget_actual``) over every interval the virtual clock moves:

- response: seconds from the signal until the draw is at or under the event's limit;
- seconds over the limit in force after the event starts (goal 0);
- GPU-hours lost per tier (the controller's account: slowdown under caps, paused GPU time,
  work since the last checkpoint at a pause); total;
- energy shed: energy of the run without the event minus this run's, from the signal to the
  end of the event; and the mean draw reduction over the event;
- seconds with ``short_watts`` > 0 (the limit could not be met without touching tier 0).

    python -m benchmarks.grid_events                       # the default factory
    python -m benchmarks.grid_events --smoke               # 64 GPUs, short horizon
    python -m benchmarks.grid_events --plot docs/img/grid-event.png
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aifactory.controller.core.spec import JobKind, JobSpec, PowerBudgetSpec
from aifactory.controller.inputs.factory import FactorySpec, load_factory
from aifactory.controller.inputs.workload import Arrival
from aifactory.controller.power.grid import GridEvent
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import default_utilization
from aifactory.controller.runtime.curtailment import CurtailmentController
from aifactory.controller.sim.simulation import Simulation
from benchmarks.common import machine, machine_line, markdown_table, write_json

__all__ = ["main"]

DEFAULT_JSON = "benchmarks/results/grid-events.json"
FACTORIES = {"default": "small", "100k": "100k"}
STRATEGIES = ("flexible", "uniform", "pause-newest")
NO_EVENT = "no event"
TIERS = (0, 1, 2, 3)
HOUR = 3600.0
SITE = "site"
# Field results (Emerald AI), quoted beside ours.
ANCHORS = (
    "Phoenix, May 2025 (Emerald AI + Oracle): 256 GPUs, 25 % reduction held for 3 h, "
    "software only",
    "London, Dec 2025 (Emerald AI): 96 Blackwell GPUs, > 30 % reduction within 30 s, held "
    "for hours",
)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One event: the limit drops to ``1 - percent`` of the base at ``start``, the signal
    arrives ``ramp`` seconds before."""

    name: str
    percent: float
    ramp: float
    duration: float


@dataclass(frozen=True, slots=True)
class Horizon:
    start: float  # the event's start (the lowered limit applies)
    duration: float
    after: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def until(self) -> float:
        return self.end + self.after


def scenarios(duration: float) -> tuple[Scenario, ...]:
    return (Scenario("25% for 3h", 25.0, 0.0, duration),
            Scenario("30% within 30s", 30.0, 30.0, duration))


# --------------------------------------------------------------------------- inputs


def site_factory(name: str) -> tuple[FactorySpec, float]:
    """The built-in factory with one site budget over every node at its ``factory``
    budget's watts (the base the event lowers)."""
    factory = load_factory(FACTORIES.get(name, name))
    own = {b.name: b.watts for b in factory.power_budgets}
    base = own.get("factory", 0.85 * factory.peak_watts())
    return replace(factory, power_budgets=(PowerBudgetSpec(SITE, base),)), base


def mix(seed: int, factory: FactorySpec, until: float, *, burst: float = 1.2,
        load: float = 1.1, inference_share: float = 0.15) -> list[Arrival]:
    """The seeded workload (see the module doc)."""
    rng = random.Random(seed)
    total = factory.total_gpus
    arrivals: list[Arrival] = []
    # Inference services: tier 0 or 1, from t=0, never ending.
    held, s = 0, 0
    while held < inference_share * total:
        replicas = rng.choice((2, 3, 4))
        gpus = rng.choice((1, 2, 4, 8))
        tier = rng.choice((0, 1))
        name = f"svc{s}"
        for r in range(replicas):
            arrivals.append(Arrival(JobSpec(
                f"{name}-{r}", workers=1, gpus_per_worker=gpus, namespace="inference",
                kind=JobKind.INFERENCE, group=f"inference/{name}", group_size=replicas,
                flexibility=tier), 0.0, None))
        held += replicas * gpus
        s += 1
    # Training gangs.
    if total <= 1024:
        sizes, weights = (8, 16, 32, 64), (0.4, 0.3, 0.2, 0.1)
    else:
        sizes = (8, 16, 32, 64, 128, 256, 512, 1024)
        weights = (0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04)
    mean_size = sum(a * w for a, w in zip(sizes, weights, strict=True)) / sum(weights)
    median, sigma, cap = 2 * HOUR, 0.8, 12 * HOUR
    mean_runtime = median * math.exp(sigma**2 / 2)
    train_gpus = (1.0 - inference_share) * total
    n = 0

    def gang(at: float) -> None:
        nonlocal n
        size = rng.choices(sizes, weights)[0]
        runtime = min(cap, rng.lognormvariate(math.log(median), sigma))
        arrivals.append(Arrival(JobSpec(
            f"train{n}", workers=size // 8, gpus_per_worker=8, namespace="training",
            preferred_level="rack" if size > 8 else None,
            expected_runtime_seconds=runtime,
            checkpoint_interval_seconds=rng.uniform(600.0, 1800.0),
            flexibility=rng.choice(TIERS)), at, runtime))
        n += 1

    offered = 0.0
    while offered < burst * train_gpus:
        gang(0.0)
        offered += arrivals[-1].spec.gpu_equivalents
    rate = load * train_gpus / (mean_size * mean_runtime)  # gangs per second
    t = rng.expovariate(rate)
    while t < until:
        gang(t)
        t += rng.expovariate(rate)
    return arrivals


# --------------------------------------------------------------------------- one run


@dataclass(slots=True)
class Trace:
    """What one run saw on the site budget, interval by interval."""

    intervals: list[tuple[float, float, float, float, float]] = field(default_factory=list)
    # (from, to, modelled draw, limit in force, short_watts)
    tiers: list[tuple[float, dict[str, float]]] = field(default_factory=list)


def _tier_draw(sim: Simulation, grid: CurtailmentController | None) -> dict[str, float]:
    """Modelled GPU draw per tier (running jobs) and paused GPUs per tier, for the plot."""
    out: dict[str, float] = {}
    profile = profile_for(sim.topo.nodes[0].gpu_model)
    for rec in sim.jobs.values():
        if rec.placement is None or rec.done:
            continue
        tier = rec.spec.flexibility or 0
        cap = sim.running_spec(rec).power_cap_watts_per_gpu
        watts = profile.power_watts(default_utilization(rec.spec), cap) \
            * rec.placement.gpu_equivalents
        out[f"draw{tier}"] = out.get(f"draw{tier}", 0.0) + watts
        if grid is not None and rec.spec.key in grid.capped:
            out[f"capped{tier}"] = out.get(f"capped{tier}", 0.0) + rec.placement.gpu_equivalents
    if grid is not None:
        for key in grid.paused:
            rec = sim.jobs.get(key)
            if rec is not None:
                tier = rec.spec.flexibility or 0
                out[f"paused{tier}"] = out.get(f"paused{tier}", 0.0) + rec.spec.gpu_equivalents
    return out


def run_one(factory: FactorySpec, base: float, arrivals: Sequence[Arrival],
            horizon: Horizon, scenario: Scenario | None, strategy: str | None,
            seed: int, tier_every: float | None = None, period: float = 5.0
            ) -> dict[str, Any]:
    sim = Simulation(factory, seed=seed)
    sim.submit_all(arrivals)
    grid: CurtailmentController | None = None
    signal = horizon.start - (scenario.ramp if scenario else 0.0)
    if scenario is not None and strategy is not None:
        grid = CurtailmentController(sim, strategy=strategy)
        grid.set_events("file", [GridEvent(
            "ev", horizon.start, horizon.end, percent=100.0 - scenario.percent,
            signal_at=signal)])
        sim.attach_grid(grid, period_seconds=period)
    trace = Trace()
    next_tier = [0.0]

    def sample(a: float, b: float) -> None:
        short = grid.account.short_watts.get(SITE, 0.0) if grid is not None else 0.0
        trace.intervals.append((a, b, sim.metrics.budget_actual[0],
                                sim.state.budgets.limits[0], short))
        if tier_every is not None and a >= next_tier[0]:
            trace.tiers.append((a, _tier_draw(sim, grid)))
            next_tier[0] = a + tier_every

    sim.on_advance.append(sample)
    started = time.perf_counter()
    sim.run(until=horizon.until)
    wall = time.perf_counter() - started
    new_limit = base * (1.0 - (scenario.percent if scenario else 0.0) / 100.0)
    return {"trace": trace, "wall_seconds": wall, "grid": grid, "sim": sim,
            "signal": signal, "new_limit": new_limit}


def _energy(trace: Trace, lo: float, hi: float) -> float:
    """Joules of modelled site draw between ``lo`` and ``hi``."""
    return math.fsum(max(0.0, min(b, hi) - max(a, lo)) * d for a, b, d, _, _ in trace.intervals)


def _draw_at(trace: Trace, t: float) -> float:
    for a, b, d, _, _ in trace.intervals:
        if a <= t < b:
            return d
    return trace.intervals[-1][2] if trace.intervals else 0.0


def training_work(sim: Simulation) -> dict[int, float]:
    """GPU-hours of full-speed training work done by the horizon, per tier (progress x
    runtime x GPUs; a capped job does less per hour it holds, a paused one loses the work
    since its last checkpoint)."""
    work = dict.fromkeys(TIERS, 0.0)
    for key, rec in sim.jobs.items():
        status = sim.backend.status(key)
        if rec.spec.kind is JobKind.TRAINING and status is not None and rec.runtime:
            work[rec.spec.flexibility or 0] += \
                rec.spec.gpu_equivalents * status.progress * rec.runtime / HOUR
    return work


def measure(out: dict[str, Any], base_run: dict[str, Any], horizon: Horizon,
            scenario: Scenario) -> dict[str, Any]:
    trace: Trace = out["trace"]
    grid: CurtailmentController = out["grid"]
    signal, new_limit = out["signal"], out["new_limit"]
    before = _draw_at(trace, signal - 1e-6)
    response = None
    for a, b, d, _, _ in trace.intervals:
        if b <= signal:
            continue
        if d <= new_limit + 1e-6:
            response = max(0.0, a - signal)
            break
    over = math.fsum(max(0.0, min(b, horizon.end) - max(a, horizon.start))
                     for a, b, d, lim, _ in trace.intervals if d > lim + 1e-6)
    over_peak = max((d - lim for a, b, d, lim, _ in trace.intervals
                     if b > horizon.start and a < horizon.end), default=0.0)
    short_s = math.fsum(max(0.0, min(b, horizon.until) - max(a, signal))
                        for a, b, _, _, s in trace.intervals if s > 1.0)
    lost = {t: grid.account.lost_gpu_seconds.get(t, 0.0) / HOUR for t in TIERS}
    e_base = _energy(base_run["trace"], signal, horizon.end)
    e_mine = _energy(trace, signal, horizon.end)
    work = training_work(out["sim"])
    plain = training_work(base_run["sim"])
    return {
        "draw_before_watts": before, "new_limit_watts": new_limit,
        "binds": before > new_limit + 1e-6,
        "response_seconds": response,
        "seconds_over_after_start": over,
        "peak_over_watts_during_event": max(0.0, over_peak),
        "lost_gpu_hours": {str(t): v for t, v in lost.items()},
        "lost_gpu_hours_total": math.fsum(lost.values()),
        "energy_shed_mwh": (e_base - e_mine) / 3.6e9,
        "mean_reduction_percent": 100.0 * (e_base - e_mine) / e_base if e_base else 0.0,
        "short_seconds": short_s,
        "actions": dict(grid.account.actions),
        "training_work_gpu_hours": {str(t): work[t] for t in TIERS},
        "work_lost_vs_no_event_gpu_hours": {str(t): plain[t] - work[t] for t in TIERS},
        "work_lost_vs_no_event_total": math.fsum(plain.values()) - math.fsum(work.values()),
        "wall_seconds": out["wall_seconds"],
    }


# --------------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        m = r["metrics"]
        lost = m["lost_gpu_hours"]
        resp = m["response_seconds"]
        body.append([
            r["factory"], r["scenario"], r["strategy"],
            "never" if resp is None else f"{resp:.0f}",
            f"{m['seconds_over_after_start']:.0f}",
            *(f"{lost[str(t)]:,.1f}" for t in TIERS),
            f"{m['lost_gpu_hours_total']:,.1f}",
            f"{m['energy_shed_mwh']:,.3f}",
            f"{m['mean_reduction_percent']:.1f} %",
            f"{m['short_seconds']:.0f}",
            f"{m['actions']['cap']}/{m['actions']['pause']}",
            *(f"{m['work_lost_vs_no_event_gpu_hours'][str(t)]:,.1f}" for t in TIERS),
            f"{m['work_lost_vs_no_event_total']:,.1f}",
        ])
    return markdown_table(
        ["factory", "event", "strategy", "s signal to under", "s over after start",
         "lost GPU-h tier 0", "tier 1", "tier 2", "tier 3", "lost total", "energy shed MWh",
         "draw cut (mean)", "s short", "caps/pauses", "work lost vs no event, tier 0",
         "tier 1", "tier 2", "tier 3", "total"], body)


def plot(path: str, out: dict[str, Any], horizon: Horizon, scenario: Scenario,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace: Trace = out["trace"]
    xs, draw, lim = [], [], []
    for a, b, d, limit, _ in trace.intervals:
        xs += [a / HOUR, b / HOUR]
        draw += [d / 1e3, d / 1e3]
        lim += [limit / 1e3, limit / 1e3]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    span = (horizon.start / HOUR, horizon.end / HOUR)
    for ax in (ax1, ax2):
        ax.axvspan(*span, color="0.9", zorder=0)
    times = [t / HOUR for t, _ in trace.tiers]
    colours = ("#1b9e77", "#7570b3", "#d95f02", "#e7298a")
    low = [0.0] * len(times)
    for t in TIERS:
        high = [lo + row.get(f"draw{t}", 0.0) / 1e3
                for lo, (_, row) in zip(low, trace.tiers, strict=True)]
        ax1.fill_between(times, low, high, step="post", color=colours[t], alpha=0.55,
                         lw=0, label=f"GPU draw, tier {t}")
        low = high
    ax1.plot(xs, draw, color="black", lw=1.2, label="site draw (modelled)")
    ax1.plot(xs, lim, color="red", lw=1.5, ls="--", label="site limit")
    ax1.set_ylabel("kW")
    ax1.set_title(title)
    ax1.legend(loc="lower left", fontsize=8, ncol=3)
    for t in TIERS[1:]:
        ax2.step(times, [row.get(f"capped{t}", 0.0) for _, row in trace.tiers],
                 where="post", color=colours[t], label=f"tier {t} capped")
        ax2.step(times, [row.get(f"paused{t}", 0.0) for _, row in trace.tiers],
                 where="post", color=colours[t], ls=":", label=f"tier {t} paused")
    ax2.set_ylabel("GPUs")
    ax2.set_xlabel("hours (event shaded)")
    ax2.legend(loc="upper right", fontsize=8, ncol=3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="a 64-GPU factory, 20-minute event (seconds)")
    parser.add_argument("--factories", default="default",
                        help="default and/or 100k (100k: the flexible planner is too slow "
                             "for a 3 h event on 2 cores, see benchmarks/README.md)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--event-start-hours", type=float, default=2.0)
    parser.add_argument("--event-hours", type=float, default=3.0)
    parser.add_argument("--after-hours", type=float, default=1.0)
    parser.add_argument("--period", type=float, default=5.0,
                        help="the curtailment controller's control period, seconds")
    parser.add_argument("--out", default=DEFAULT_JSON, help="JSON path (the .md beside it)")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="draw the first factory's 25 %% event under ours")
    args = parser.parse_args(argv)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    factories = [f.strip() for f in args.factories.split(",") if f.strip()]
    horizon = Horizon(args.event_start_hours * HOUR, args.event_hours * HOUR,
                      args.after_hours * HOUR)
    if args.smoke:
        horizon = Horizon(1800.0, 1200.0, 600.0)
    info = machine()
    lines = [f"# Grid events\n\n{machine_line(info)}"]
    print(lines[0])
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    started = time.perf_counter()
    for fname in factories:
        factory, base = site_factory(fname)
        if args.smoke:
            from aifactory.controller.inputs.factory import factory_from_nodes

            factory = replace(factory_from_nodes("smoke", factory.nodes[:8]),
                              power_budgets=(PowerBudgetSpec(SITE, 0.85 * 64 * 691.0),))
            base = factory.power_budgets[0].watts
        arrivals = mix(args.seed, factory, horizon.until)
        head = (f"\nfactory {fname}: {factory.total_gpus:,} GPUs, site base "
                f"{base / 1e3:,.1f} kW (its own factory budget, "
                f"{100 * base / factory.peak_watts():.0f} % of peak); {len(arrivals):,} "
                f"arrivals (seed {args.seed})")
        print(head, flush=True)
        lines.append(head)
        plain = run_one(factory, base, arrivals, horizon, None, None, args.seed)
        print(f"  {NO_EVENT}: {plain['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
        rows.append({"factory": fname, "scenario": NO_EVENT, "strategy": "—",
                     "wall_seconds": plain["wall_seconds"]})
        for sc in scenarios(horizon.duration):
            for strategy in strategies:
                want_tiers = args.plot and fname == factories[0] and \
                    strategy == "flexible" and sc.ramp == 0.0
                out = run_one(factory, base, arrivals, horizon, sc, strategy, args.seed,
                              tier_every=60.0 if want_tiers else None,
                              period=args.period)
                m = measure(out, plain, horizon, sc)
                print(f"  {sc.name} {strategy}: {m['wall_seconds']:.1f} s", file=sys.stderr,
                      flush=True)
                rows.append({"factory": fname, "scenario": sc.name, "strategy": strategy,
                             "gpus": factory.total_gpus, "base_watts": base, "metrics": m})
                if not m["binds"]:
                    notes.append(f"{fname} {sc.name} {strategy}: the event does not bind "
                                 f"(draw before {m['draw_before_watts'] / 1e3:,.1f} kW <= "
                                 f"new limit {m['new_limit_watts'] / 1e3:,.1f} kW)")
                if want_tiers:
                    plot(args.plot, out, horizon, sc,
                         f"{fname} factory ({factory.total_gpus} GPUs), {sc.name}, ours "
                         f"(flexible)")
    wall = time.perf_counter() - started
    result_rows = [r for r in rows if "metrics" in r]
    text = table(result_rows)
    before = "\n".join(
        f"- {r['factory']} {r['scenario']}: draw just before the signal "
        f"{r['metrics']['draw_before_watts'] / 1e3:,.1f} kW, new limit "
        f"{r['metrics']['new_limit_watts'] / 1e3:,.1f} kW"
        for r in result_rows if r["strategy"] == result_rows[0]["strategy"])
    walls = ", ".join(f"{r['factory']} {r['scenario']} {r['strategy']} "
                      f"{(r.get('metrics') or r)['wall_seconds']:.0f} s" for r in rows)
    body = (f"\n{text}\n\n{before}\n\nfield anchors:\n"
            + "\n".join(f"- {a}" for a in ANCHORS)
            + ("\n\n" + "\n".join(notes) if notes else "")
            + f"\n\nwall time per run: {walls}\ntotal wall time {wall:.0f} s")
    print(body)
    lines.append(body)
    write_json(args.out, {"scenario": "grid-events", "machine": info, "args": vars(args),
                          "horizon": {"event_start": horizon.start,
                                      "event_end": horizon.end, "until": horizon.until},
                          "rows": rows, "anchors": ANCHORS, "wall_seconds": wall})
    md = Path(args.out).with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
