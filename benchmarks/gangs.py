"""Scenario 3: gangs on a real network topology (Lingjun fabric, Kalos-like gangs).

The factory and the workload are described in ``benchmarks/gang_workload.py``: 847 hosts x
8 H100 in 119 real racks and 3 blocks; gangs drawn to match AcmeTrace's Kalos summary
(median 1 GPU, mean 26.8, up to 1,024), multi-node gangs preferring one rack; openb pods
as background. Reported per policy, mean ± sd over seeds:

- of the multi-node gangs that fit in one rack (<= 64 GPUs), the share placed inside one
  rack; the same for one block; racks spanned per multi-node gang (mean, p95);
- gangs that waited for capacity while enough GPUs were free in the factory (the
  fragmentation a gang scheduler causes), as a share of gangs;
- queue wait of gangs (mean, p95; and the mean for gangs of 128 GPUs or more), the
  allocation over the arrival window, gangs never placed.

    python -m benchmarks.gangs            # 8,000 gangs + background, 5 seeds
    python -m benchmarks.gangs --smoke    # 120 gangs, 2 seeds
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from aifactory.controller.inputs.factory import FactorySpec
from aifactory.controller.runtime.measurements import percentile
from aifactory.controller.sim.simulation import Simulation
from benchmarks.common import (
    NO_LOCALITY,
    base_parser,
    machine,
    machine_line,
    markdown_table,
    policy,
    policy_names,
    run_sampled,
    stat,
    timed,
    write_json,
)
from benchmarks.gang_workload import GANG_NAMESPACE, GangWorkload, gang_workload, lingjun_factory

__all__ = ["gang_metrics", "main"]

DEFAULT_JSON = "benchmarks/results/gangs.json"


def gang_metrics(sim: Simulation) -> dict[str, Any]:
    """Gang-only numbers from a finished simulation."""
    m = sim.metrics
    gangs = [r for r in sim.jobs.values() if r.spec.namespace == GANG_NAMESPACE]
    waits = [r.first_start - r.submitted_at for r in gangs if r.first_start is not None]
    big = [r.first_start - r.submitted_at for r in gangs
           if r.first_start is not None and r.spec.total_gpus >= 128]
    free_waiters = sum(1 for key in m.unplaced_while_free
                       if key.startswith(f"{GANG_NAMESPACE}/"))
    return {
        "gangs": len(gangs),
        "multi_node_gangs_fitting_a_rack": m.gangs_fit_rack,
        "single_rack_fraction": m.gangs_in_rack / m.gangs_fit_rack if m.gangs_fit_rack
        else float("nan"),
        "single_block_fraction": m.gangs_in_block / m.gangs_fit_block if m.gangs_fit_block
        else float("nan"),
        "racks_spanned_mean": sum(m.racks_spanned) / len(m.racks_spanned)
        if m.racks_spanned else float("nan"),
        "racks_spanned_p95": percentile(m.racks_spanned, 95),
        "gangs_waited_while_gpus_free": free_waiters,
        "gangs_waited_while_gpus_free_fraction": free_waiters / len(gangs) if gangs else 0.0,
        "gang_wait_seconds_mean": sum(waits) / len(waits) if waits else float("nan"),
        "gang_wait_seconds_p95": percentile(waits, 95),
        "big_gang_wait_seconds_mean": sum(big) / len(big) if big else float("nan"),
        "gangs_never_placed": sum(1 for r in gangs if r.first_start is None),
    }


def run_one(factory: FactorySpec, workload: GangWorkload, name: str, seed: int
            ) -> dict[str, Any]:
    sim = Simulation(factory, policy(name, seed), seed=seed)
    sim.submit_all(workload.arrivals)
    out = run_sampled(sim, 0.0, workload.window_seconds)
    return {**out, **gang_metrics(sim)}


COLUMNS: tuple[tuple[str, str, str, float, str], ...] = (
    ("single_rack_fraction", "in 1 rack (fits one)", ".1f", 100, " %"),
    ("single_block_fraction", "in 1 block (fits one)", ".1f", 100, " %"),
    ("racks_spanned_mean", "racks spanned mean", ".2f", 1, ""),
    ("racks_spanned_p95", "racks p95", ".1f", 1, ""),
    ("gangs_waited_while_gpus_free_fraction", "waited while GPUs free", ".1f", 100, " %"),
    ("gang_wait_seconds_mean", "gang wait mean s", ".0f", 1, ""),
    ("gang_wait_seconds_p95", "gang wait p95 s", ".0f", 1, ""),
    ("big_gang_wait_seconds_mean", "wait >=128 GPUs s", ".0f", 1, ""),
    ("allocation_over_arrival_window", "alloc", ".1f", 100, " %"),
    ("gangs_never_placed", "never placed", ".1f", 1, ""),
    ("wall_seconds", "wall s", ".1f", 1, ""),
)


def summarize(rows: list[dict[str, Any]], names: Sequence[str], title: str) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    table = []
    for name in names:
        runs = [r for r in rows if r["policy"] == name]
        stats = {key: stat(float(r[key]) for r in runs) for key, *_ in COLUMNS}
        summary[name] = {k: v.to_dict() for k, v in stats.items()}
        table.append([name, *(stats[key].fmt(spec, scale, unit)
                              for key, _, spec, scale, unit in COLUMNS)])
    print(f"\n{title}\n")
    print(markdown_table(["policy", *(header for _, header, *_ in COLUMNS)], table))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_JSON)
    parser.add_argument("--gangs", type=int, default=8000, help="gangs per seed")
    parser.add_argument("--gang-load", type=float, default=0.8,
                        help="GPU-time the gangs offer, as a share of the factory's")
    parser.add_argument("--background-load", type=float, default=0.2,
                        help="GPU-time the openb background offers")
    parser.add_argument("--summary", default="Kalos", help="AcmeTrace cluster to match")
    parser.add_argument("--ablation", action="store_true",
                        help=f"also run {NO_LOCALITY} (ours without delay scheduling)")
    args = parser.parse_args(argv)
    names = policy_names(args.policies)
    if args.ablation and NO_LOCALITY not in names:
        names.append(NO_LOCALITY)
    gangs, seeds = args.gangs, args.seeds
    if args.smoke:
        gangs, seeds = 120, 2
    factory = lingjun_factory()
    info = machine()
    print(f"# Scenario 3: gangs on the Lingjun topology\n\n{machine_line(info)}")
    print(f"\nfactory: {factory.topology().describe()}")
    rows: list[dict[str, Any]] = []
    workloads = []

    def work() -> None:
        for seed in range(1, seeds + 1):
            workload = gang_workload(seed, gangs, factory.total_gpus, args.gang_load,
                                     args.background_load, args.summary)
            workloads.append({"seed": seed, "gangs": workload.gangs,
                              "background_pods": workload.background,
                              "window_seconds": workload.window_seconds,
                              "size_mean": workload.sizes.mean,
                              "size_median": workload.sizes.median})
            for name in names:
                out, wall = timed(run_one, factory, workload, name, seed)
                rows.append({"policy": name, "seed": seed, "wall_seconds": wall, **out})
                print(f"  seed {seed} {name}: {wall:.1f} s", file=sys.stderr, flush=True)

    _, wall = timed(work)
    sizes = workloads[0]
    print(f"workload: {gangs} gangs per seed (size model mean {sizes['size_mean']:.2f}, "
          f"median {sizes['size_median']}), about {sizes['background_pods']} openb pods, "
          f"arrival window about {sizes['window_seconds'] / 3600:.1f} h, {seeds} seeds")
    summary = summarize(rows, names, "**Gangs** (mean ± sd over seeds):")
    print(f"\nwall time {wall:.0f} s")
    write_json(args.json_path, {"scenario": "gangs", "machine": info, "args": vars(args),
                                "workloads": workloads, "summary": summary, "runs": rows,
                                "wall_seconds": wall})
    return 0


if __name__ == "__main__":
    sys.exit(main())
