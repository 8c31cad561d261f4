"""Scenario 4: a power-capped factory (the scenario 3 workload under a power budget).

The Lingjun factory and the Kalos-like gang workload of scenario 3
(``benchmarks/gang_workload.py``), with one factory-wide power budget set to 70 % and to
85 % of the factory's peak draw (every GPU at full load). Measured over the arrival window
(the same horizon for every policy):

- work done, in GPU-hours of full-speed work (a job capped to 80 % speed does 0.8
  GPU-hours of work per GPU-hour it holds), and the GPU-hours allocated;
- queue wait (mean, p95) of the jobs started by the horizon, and the jobs still waiting;
- seconds during which any budget's modelled draw was above its limit, and the peak draw
  over the budget. Ours must never exceed it; the baselines ignore power, so theirs is
  measured, not prevented.

Rows: every policy as it is; ``aifactory + capping``: ours with power-capped admission (a
gang that waits only on power starts under a per-GPU cap, down to the cap that keeps the
simulator's modelled speed at 80 %: speed ~ cube root of the dynamic power share, an
assumption of ``aifactory.controller.backends.simulated``); ``static GPU cap``: ours with no power
budget but a quota of the GPUs that fit the same budget at full draw,
(budget - idle draw of the factory) / (full-load draw above idle per GPU).

    python -m benchmarks.power            # budgets 70 % and 85 %, 5 seeds
    python -m benchmarks.power --smoke    # 100 gangs, 2 seeds, a 30 % budget
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from aifactory.controller.core.spec import (
    DEFAULT_QUEUE,
    JobKind,
    JobSpec,
    PowerBudgetSpec,
    QueueSpec,
)
from aifactory.controller.inputs.factory import FactorySpec
from aifactory.controller.placement.topology_aware import TopologyAwarePolicy
from aifactory.controller.power.estimates import watts_estimator
from aifactory.controller.runtime.measurements import percentile
from aifactory.controller.sim.simulation import Simulation
from benchmarks.common import (
    Stat,
    base_parser,
    machine,
    machine_line,
    markdown_table,
    policy,
    policy_names,
    stat,
    timed,
    write_json,
)
from benchmarks.gang_workload import GangWorkload, gang_workload, lingjun_factory

__all__ = ["main", "static_cap_gpus"]

DEFAULT_JSON = "benchmarks/results/power.json"
CAPPING = "aifactory + capping"
STATIC = "static GPU cap"
MIN_CAPPED_SPEED = 0.8
SMOKE_GANGS = 100


def static_cap_gpus(factory: FactorySpec, watts: float) -> int:
    """GPUs that can run at full draw within ``watts``, the rest idle."""
    topo = factory.topology()
    per_gpu = watts_estimator(topo)(JobSpec("probe", kind=JobKind.TRAINING))
    return max(0, math.floor((watts - factory.idle_watts()) / per_gpu))


def budgeted(factory: FactorySpec, watts: float) -> FactorySpec:
    return replace(factory, power_budgets=(PowerBudgetSpec("factory", watts),))


def run_one(factory: FactorySpec, workload: GangWorkload, row: str, seed: int,
            fraction: float) -> dict[str, Any]:
    watts = fraction * factory.peak_watts()
    cap_gpus = static_cap_gpus(factory, watts)
    if row == STATIC:
        # Ours, blind to watts, held to a quota of GPUs; overruns measured on the budget.
        spec = replace(budgeted(factory, watts),
                       queues=(QueueSpec(DEFAULT_QUEUE, float(cap_gpus), 0.0),))
        sim = Simulation(spec, TopologyAwarePolicy(name=STATIC, power_aware=False),
                         seed=seed)
    elif row == CAPPING:
        sim = Simulation(budgeted(factory, watts), policy("aifactory", seed), seed=seed,
                         power_capping_min_speed=MIN_CAPPED_SPEED)
    else:
        sim = Simulation(budgeted(factory, watts), policy(row, seed), seed=seed)
    sim.submit_all(workload.arrivals)
    horizon = workload.window_seconds
    result = sim.run(until=horizon)
    work = 0.0
    waits = []
    capped = 0
    for key, rec in sim.jobs.items():
        if rec.first_start is None:
            continue
        waits.append(rec.first_start - rec.submitted_at)
        status = sim.backend.status(key)
        if status is not None and rec.runtime:
            work += rec.spec.gpu_equivalents * status.progress * rec.runtime
        capped += rec.power_cap_watts is not None
    waiting = sum(1 for r in sim.jobs.values() if r.first_start is None)
    return {
        "budget_watts": watts, "static_cap_gpus": cap_gpus,
        "work_gpu_hours": work / 3600.0, "allocated_gpu_hours": result.gpu_hours,
        "wait_seconds_mean": sum(waits) / len(waits) if waits else float("nan"),
        "wait_seconds_p95": percentile(waits, 95), "jobs_waiting_at_horizon": waiting,
        "power_budget_exceeded_seconds": result.power_budget_exceeded_seconds,
        "budget_peak_ratio": max(sim.metrics.budget_peak_ratio, default=float("nan")),
        "jobs_started_capped": capped, "preemptions": result.preemptions,
    }


COLUMNS: tuple[tuple[str, str, str, float, str], ...] = (
    ("work_gpu_hours", "work done GPU-h", ",.0f", 1, ""),
    ("allocated_gpu_hours", "allocated GPU-h", ",.0f", 1, ""),
    ("wait_seconds_mean", "wait mean s", ".0f", 1, ""),
    ("wait_seconds_p95", "wait p95 s", ".0f", 1, ""),
    ("jobs_waiting_at_horizon", "waiting at end", ".0f", 1, ""),
    ("power_budget_exceeded_seconds", "s over budget", ",.0f", 1, ""),
    ("budget_peak_ratio", "peak draw / budget", ".3f", 1, ""),
    ("jobs_started_capped", "jobs capped", ".0f", 1, ""),
)


def summarize(runs: list[dict[str, Any]], rows_wanted: Sequence[str],
              fractions: Sequence[float], gangs: int, seeds: int, total_gpus: int
              ) -> dict[str, Any]:
    """Print the tables of every budget, and each row's work done against the static GPU
    cap on the same seed (the workloads differ a lot between seeds, so the paired ratio
    says more than the means)."""
    summary: dict[str, Any] = {}
    for fraction in fractions:
        sample = next(r for r in runs if r["budget_fraction"] == fraction)
        table = []
        block: dict[str, Any] = {}
        static = {r["seed"]: r["work_gpu_hours"] for r in runs
                  if r["row"] == STATIC and r["budget_fraction"] == fraction}
        for row in rows_wanted:
            mine = [r for r in runs if r["row"] == row and r["budget_fraction"] == fraction]
            stats = {key: stat(float(r[key]) for r in mine) for key, *_ in COLUMNS}
            paired = [100.0 * (r["work_gpu_hours"] / static[r["seed"]] - 1.0) for r in mine
                      if static.get(r["seed"])]
            stats["work_vs_static_percent"] = stat(paired)
            block[row] = {k: v.to_dict() for k, v in stats.items()}
            table.append([row, *(stats[key].fmt(spec, scale, unit)
                                 for key, _, spec, scale, unit in COLUMNS),
                          _signed(stats["work_vs_static_percent"]),
                          ", ".join(f"{v:+.1f}" for v in paired)])
        summary[f"{fraction:.2f}"] = block
        print(f"\n**Budget {fraction:.0%} of peak** ({sample['budget_watts'] / 1e6:.2f} MW; "
              f"static cap {sample['static_cap_gpus']} of {total_gpus} GPUs), "
              f"{gangs} gangs + background per seed, {seeds} seeds:\n")
        print(markdown_table(["policy", *(h for _, h, *_ in COLUMNS),
                              "work vs static cap, same seed", "per seed %"], table))
    return summary


def _signed(value: Stat) -> str:
    if value.n == 0:
        return "—"
    return f"{value.mean:+.2f} %" + (f" ± {value.sd:.2f}" if value.n > 1 else "")


def resummarize(path: str) -> int:
    """Print the tables again from a JSON this script wrote (no simulation)."""
    data = json.loads(Path(path).read_text())
    args = data["args"]
    runs = data["runs"]
    rows_wanted = list(dict.fromkeys(r["row"] for r in runs))
    fractions = list(dict.fromkeys(r["budget_fraction"] for r in runs))
    seeds = len({r["seed"] for r in runs})
    gangs = SMOKE_GANGS if args.get("smoke") else args["gangs"]
    # JSONs written before the factory size was recorded: the factory is always Lingjun.
    total_gpus = data.get("total_gpus") or lingjun_factory().total_gpus
    print(f"# Scenario 4: power-capped factory (from {path})\n\n{machine_line(data['machine'])}")
    summarize(runs, rows_wanted, fractions, gangs, seeds, total_gpus)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_JSON)
    parser.add_argument("--gangs", type=int, default=4000,
                        help="gangs per seed (scenario 3 uses 8,000; half keeps 80 runs "
                             "within an hour on 2 cores)")
    parser.add_argument("--budgets", default="0.70,0.85",
                        help="factory budgets as fractions of peak draw")
    parser.add_argument("--gang-load", type=float, default=0.8)
    parser.add_argument("--background-load", type=float, default=0.2)
    parser.add_argument("--from-json", metavar="PATH",
                        help="print the tables again from a JSON this script wrote")
    args = parser.parse_args(argv)
    if args.from_json:
        return resummarize(args.from_json)
    rows_wanted = [*policy_names(args.policies), CAPPING, STATIC]
    gangs, seeds = args.gangs, args.seeds
    fractions = [float(f) for f in args.budgets.split(",")]
    if args.smoke:  # small, and a budget tight enough to bind
        gangs, seeds, fractions = SMOKE_GANGS, 2, [0.3]
    factory = lingjun_factory()
    info = machine()
    print(f"# Scenario 4: power-capped factory\n\n{machine_line(info)}")
    print(f"\nfactory: {factory.topology().describe()}; peak draw "
          f"{factory.peak_watts() / 1e6:.2f} MW, idle {factory.idle_watts() / 1e6:.2f} MW")
    runs: list[dict[str, Any]] = []

    def work() -> None:
        for seed in range(1, seeds + 1):
            workload = gang_workload(seed, gangs, factory.total_gpus, args.gang_load,
                                     args.background_load)
            for fraction in fractions:
                for row in rows_wanted:
                    out, wall = timed(run_one, factory, workload, row, seed, fraction)
                    runs.append({"row": row, "budget_fraction": fraction, "seed": seed,
                                 "wall_seconds": wall, **out})
                    print(f"  seed {seed} budget {fraction:.0%} {row}: {wall:.1f} s",
                          file=sys.stderr, flush=True)

    _, wall = timed(work)
    summary = summarize(runs, rows_wanted, fractions, gangs, seeds, factory.total_gpus)
    print(f"\nwall time {wall:.0f} s")
    write_json(args.json_path, {"scenario": "power", "machine": info, "args": vars(args),
                                "total_gpus": factory.total_gpus, "summary": summary,
                                "runs": runs, "wall_seconds": wall})
    return 0


if __name__ == "__main__":
    sys.exit(main())
