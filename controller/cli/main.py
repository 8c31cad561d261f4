"""The ``aifactory`` command line: ``simulate``, ``operator``; reports plug in here.

``aifactory simulate`` with no arguments runs the default simulated factory on the sample
manifests in ``manifests/samples/``. ``--compare`` runs several policies on the same input
and prints them side by side; ``--json`` writes ``{"results": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.inputs.workload import DEFAULT_WORKLOAD, default_workload

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    # The module docstring is the help text, without its reStructuredText literal marks.
    parser = argparse.ArgumentParser(prog="aifactory",
                                     description=(__doc__ or "").replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run jobs on a simulated factory")
    sim.add_argument("--cluster", default="small",
                     help="factory spec: built-in name (small, 100k, nvl72), YAML path, openb "
                          "node CSV or Lingjun topology CSV (default: small)")
    sim.add_argument("--workload", default=None,
                     help="folder of TrainingJob/InferenceService manifests, or an openb pod "
                          f"CSV (default: {DEFAULT_WORKLOAD})")
    sim.add_argument("--policy", default="aifactory", help="placement policy")
    sim.add_argument("--compare", default=None,
                     help="comma-separated policies to run on the same input")
    sim.add_argument("--mode", choices=("replay", "fill"), default="replay",
                     help="replay: arrivals and departures in time; fill: place in order with "
                          "no departures (FGD)")
    sim.add_argument("--json", dest="json_path", default=None, help="write results as JSON")
    sim.add_argument("--limit", type=int, default=None, help="use only the first N jobs")
    sim.add_argument("--seed", type=int, default=0, help="seed for the random policy")
    sim.add_argument("--gpus-only", action="store_true",
                     help="schedule GPUs alone: ignore the CPU and memory of nodes and jobs "
                          "and leave CPU-only jobs out (by default CPU and memory are "
                          "scheduled whenever the factory gives them)")
    sim.add_argument("--grid-events", default=None, metavar="FILE",
                     help="replay a utility's grid events (YAML: events with start, "
                          "durationSeconds, percent/watts/level, budgets): power budgets "
                          "drop and the curtailment controller caps and pauses jobs by "
                          "their flexibility tier")
    sim.add_argument("--grid-strategy", default="flexible",
                     choices=("flexible", "uniform", "pause-newest"),
                     help="how load is shed in a grid event: flexible (ours: caps by tier, "
                          "then pauses), or a baseline")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.add_argument("--show-jobs", action="store_true",
                     help="print where every job ran or why it waited (default for "
                          "workloads of up to 50 jobs with one policy)")
    from aifactory.controller.cli.live import add_simulate_arguments
    from aifactory.controller.cli.ray_run import add_parser as add_run_parser
    from aifactory.controller.cli.report import add_report_command
    from aifactory.controller.cli.traffic import add_traffic_arguments

    add_simulate_arguments(sim)
    add_traffic_arguments(sim)
    add_report_command(sub)
    add_run_parser(sub, DEFAULT_WORKLOAD)
    # The operator parses its own flags (operators/main.py); only its name lives here.
    sub.add_parser("operator", add_help=False, help="run the Kubernetes operator "
                   "(aifactory operator --help)")
    return parser


def _policies(args: argparse.Namespace) -> list[str]:
    from aifactory.controller.placement.registry import POLICY_NAMES

    names = [n.strip() for n in args.compare.split(",")] if args.compare else [args.policy]
    for name in names:
        if name not in POLICY_NAMES:
            raise AifactoryError(f"--policy/--compare: unknown policy {name!r}; valid "
                                 f"policies are {', '.join(POLICY_NAMES)}")
    return names


def _simulate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from aifactory.controller.cli.grid import attach_grid
    from aifactory.controller.cli.live import sampler_for
    from aifactory.controller.cli.traffic import attach_traffic
    from aifactory.controller.core.topology import Topology
    from aifactory.controller.inputs.factory import load_factory
    from aifactory.controller.inputs.workload import load_workload
    from aifactory.controller.placement.registry import make_policy
    from aifactory.controller.power.estimates import watts_estimator
    from aifactory.controller.runtime.controlplane import build_state
    from aifactory.controller.sim.fill import fill
    from aifactory.controller.sim.simulation import Simulation

    console = Console(width=None if sys.stdout.isatty() else 200)
    factory = load_factory(args.cluster)
    if args.gpus_only:
        factory = factory.gpus_only()
    workload = Path(args.workload) if args.workload else default_workload()
    # CPU and memory are scheduled when the inventory gives them (else a CPU-only job
    # would ask for nothing the factory counts).
    host = factory.host_tracked
    arrivals = load_workload(workload, host_resources=host)
    if args.limit is not None:
        arrivals = arrivals[: args.limit]
    names = _policies(args)
    if args.serve_metrics is not None:
        from aifactory.controller.cli.live import serve_from_args

        return serve_from_args(args, factory, arrivals, names[0], console, workload)
    topo = Topology.build(factory.nodes, factory.levels)
    console.print(f"[bold]factory[/] {factory.name}: {topo.describe()}")
    cpu_only = sum(1 for a in arrivals if a.spec.cpu_only)
    console.print(f"[bold]workload[/] {workload}: {len(arrivals)} jobs"
                  + (f" ({cpu_only} CPU-only)" if cpu_only else "") + f", mode {args.mode}; "
                  + ("GPUs, CPU and memory scheduled" if host else "GPUs scheduled"
                     + (" (--gpus-only)" if args.gpus_only else
                        " (the factory gives no CPU or memory)")))
    results: list[dict[str, Any]] = []
    sims: list[Simulation] = []
    for name in names:
        started = time.perf_counter()
        if args.mode == "fill":
            state = build_state(factory, topo)
            out = fill(state, [a.spec for a in arrivals], make_policy(name, args.seed),
                       watts_estimator(topo))
            row = out.to_dict()
        else:
            sim = Simulation(factory, name, seed=args.seed)
            sampler = sampler_for(sim, args)
            grid = attach_grid(sim, args) if args.grid_events else None
            scaler = attach_traffic(sim, args, workload) if args.traffic else None
            until = sim.now + args.traffic_hours * 3600.0 if scaler is not None else None
            sim.submit_all(arrivals)
            if args.no_progress or len(arrivals) < 200:
                res = sim.run(until)
            else:
                with Progress(console=console, transient=True) as bar:
                    task = bar.add_task(f"{name}", total=len(arrivals))

                    def advance(done: int, total: int, bar: Any = bar, task: Any = task
                                ) -> None:
                        bar.update(task, completed=done)

                    res = sim.run(until, progress=advance)
            row = res.to_dict()
            if scaler is not None:
                row["autoscaling"] = _scaling_row(scaler)
                _print_scaling(console, name, row["autoscaling"])
            if grid is not None:
                row["grid"] = _grid_row(grid, args.grid_strategy)
                _print_grid(console, name, row["grid"])
            if sampler is not None:
                row["timeseries"] = sampler.series().to_dict()
            sims.append(sim)
        row["wall_seconds"] = time.perf_counter() - started
        results.append(row)
    _print_table(console, results, args.mode)
    if sims and (args.show_jobs or (len(arrivals) <= 50 and not args.compare)):
        _print_jobs(console, sims[0])
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"results": results}, indent=2) + "\n")
        console.print(f"wrote {args.json_path}")
    return 0


def _scaling_row(scaler: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in scaler.tracked():
        changes = [c for c in scaler.changes if c.service == key]
        counts = [c.replicas_to for c in changes]
        view = scaler.view(key)
        out[key] = {"scale_ups": sum(1 for c in changes if c.replicas_to > c.replicas_from),
                    "scale_downs": sum(1 for c in changes
                                       if c.replicas_to < c.replicas_from),
                    "replicas_min": min(counts, default=view.desired),
                    "replicas_max": max(counts, default=view.desired),
                    "replicas_now": view.desired, "ready_now": view.ready}
    return out


def _print_scaling(console: Any, policy: str, rows: dict[str, Any]) -> None:
    for key, row in rows.items():
        console.print(
            f"[bold]autoscaling[/] {policy}, {key}: {row['scale_ups']} scale-ups, "
            f"{row['scale_downs']} scale-downs, replicas {row['replicas_min']}-"
            f"{row['replicas_max']} (now {row['replicas_now']}, {row['ready_now']} ready)")


def _grid_row(grid: Any, strategy: str) -> dict[str, Any]:
    acc = grid.account
    return {"strategy": strategy, "actions": dict(acc.actions),
            "lost_gpu_hours_by_tier": {str(t): s / 3600 for t, s in
                                       acc.lost_gpu_seconds.items()},
            "events": sorted(grid.events)}


def _print_grid(console: Any, policy: str, row: dict[str, Any]) -> None:
    lost = row["lost_gpu_hours_by_tier"]
    acts = row["actions"]
    console.print(
        f"[bold]grid[/] {policy}, {row['strategy']}: {acts['cap']} caps, {acts['pause']} "
        f"pauses, {acts['restore']} caps restored, {acts['resume']} resumed; GPU-hours lost "
        f"by tier: " + ", ".join(f"{t}: {v:.1f}" for t, v in sorted(lost.items())))


REPLAY_COLUMNS = (
    ("policy", "policy", "{}"),
    ("jobs_completed", "done", "{}"),
    ("jobs_never_placed", "never placed", "{}"),
    ("gpu_allocation_rate_mean", "alloc", "{:.1%}"),
    ("queue_wait_seconds_mean", "wait mean s", "{:.0f}"),
    ("queue_wait_seconds_p95", "wait p95 s", "{:.0f}"),
    ("gang_single_rack_fraction", "1-rack gangs", "{:.0%}"),
    ("unplaced_while_capacity_free", "waited w/ GPUs free", "{}"),
    ("energy_joules", "energy MWh", "{}"),
    ("cost_dollars", "cost $", "{:,.0f}"),
    ("decision_seconds_p99", "decide p99 ms", "{}"),
)
FILL_COLUMNS = (
    ("policy", "policy", "{}"),
    ("jobs_placed", "placed", "{}"),
    ("jobs_failed", "failed", "{}"),
    ("allocation_rate_at_first_failure", "alloc @1st fail", "{:.1%}"),
    ("unallocated_gpus_at_first_failure", "unalloc GPUs @1st fail", "{:.1f}"),
    ("final_allocation_rate", "alloc @100% demand", "{:.1%}"),
    ("decision_seconds_p99", "decide p99 ms", "{}"),
)


def _cell(key: str, fmt: str, value: Any) -> str:
    if key == "energy_joules":
        return f"{value / 3.6e9:.2f}"
    if key == "decision_seconds_p99":
        return f"{value * 1e3:.2f}"
    return fmt.format(value)


def _print_table(console: Any, rows: Sequence[dict[str, Any]], mode: str) -> None:
    from rich.table import Table

    columns = FILL_COLUMNS if mode == "fill" else REPLAY_COLUMNS
    table = Table(title=f"aifactory simulate ({mode})")
    for _, header, _ in columns:
        table.add_column(header, justify="left" if header == "policy" else "right")
    for row in rows:
        table.add_row(*(_cell(k, f, row[k]) for k, _, f in columns))
    console.print(table)


def _print_jobs(console: Any, sim: Any) -> None:
    from rich.table import Table

    table = Table(title=f"jobs ({sim.policy.name})")
    for header in ("job", "GPUs", "state", "waited s", "where it ran / why it waits"):
        table.add_column(header, justify="right" if header in ("GPUs", "waited s") else "left")
    for key, rec in sim.jobs.items():
        waited = "" if rec.first_start is None else f"{rec.first_start - rec.submitted_at:.0f}"
        if rec.failed_reason:
            state, where = "failed", rec.failed_reason
        elif rec.first_start is None:
            state, where = "waiting", rec.reason
        else:
            state = "done" if rec.done else "running"
            where = rec.where + (f" ({rec.restarts} restarts)" if rec.restarts else "")
            if rec.waited_because and rec.first_start > rec.submitted_at:
                where += f"; it waited: {rec.waited_because}"
        table.add_row(key, f"{rec.spec.gpu_equivalents:g}", state, waited, where)
    console.print(table)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["operator"]:
        # The CLI is the composition root: the one place the core may call the operator
        # layer (see .importlinter), lazily, so `simulate` never imports kopf.
        from aifactory.operators.main import main as operator_main

        return operator_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "run":
            from aifactory.controller.cli.ray_run import run

            return run(args, Path(args.workload) if args.workload else default_workload())
        if args.command == "report":
            from aifactory.controller.cli.report import run_report

            return run_report(args)
    except AifactoryError as exc:
        print(f"aifactory: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
