"""Scenario 1: fragmentation, fill until full (the FGD experiment, USENIX ATC'23).

The real openb GPU node list (1,213 nodes, 6,212 GPUs of 7 models, racked by model with
``assign_racks``), pods from the openb ``multigpu*`` and ``gpushare*`` lists, no
departures: each pod is placed if the policy finds room and dropped otherwise. Reported as
FGD's analysis scripts report it: the allocation rate (GPUs requested by placed pods over
all GPUs) and the unallocated GPUs (capacity minus that) when the arrived demand first
reaches 90 %, 95 % and 100 % of capacity.

As in FGD's simulator, nodes have their CPU and memory and each pod asks for its own (a
node with free GPUs but no CPU left strands them), and the CPU-only pods (1,088 per list)
are scheduled as zero-GPU jobs; ``--gpus-only`` schedules GPUs alone and drops them.
CPU-only nodes are left out in both modes (FGD's experiments use the GPU node list).

Two submission orders:

- ``fgd``: FGD's protocol, per seed, draw for draw as FGD's Go simulator builds it (seeds
  42, 43, ... as in FGD's runs): pods sorted by name, shuffled, resampled to 130 % of
  capacity (``controller.sim.fill.fgd_order``, Go's ``math/rand`` ported); every policy
  sees the same sequence per seed. With ``--gpus-only`` the sequence is built from the
  whole list, then CPU-only pods are dropped and CPU and memory ignored;
- ``file``: the file's own order (one sequence; only ``random`` varies with the seed).
  Most gpushare lists hold less than 90 % of capacity in total, so their checkpoints are
  never reached in file order ("—").

For lists where every pod needs at most one GPU (``gpushare*``), an offline reference is
printed beside the policies: the same pods packed best-fit-decreasing onto single GPUs
with the whole sequence known in advance (node boundaries do not matter for such pods).

    python -m benchmarks.fragmentation            # all 9 lists, both orders, 5 seeds
    python -m benchmarks.fragmentation --smoke    # 2 lists, 120 nodes, 2 seeds
    python -m benchmarks.fragmentation --vs-fgd   # FGD's protocol against FGD's published
                                                  # results: 3 lists, seeds 42-51, ours
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes
from aifactory.controller.inputs.traces import assign_racks, load_openb_nodes, load_openb_pods
from aifactory.controller.power.estimates import watts_estimator
from aifactory.controller.runtime.controlplane import build_state
from aifactory.controller.sim.fill import FillResult, fgd_order, fill
from benchmarks.common import (
    NO_FGD,
    Stat,
    base_parser,
    machine,
    machine_line,
    markdown_table,
    openb_path,
    policy,
    policy_names,
    stat,
    timed,
    write_json,
)
from benchmarks.fgd_published import FGD_ALLOCATION_AT_100

__all__ = ["main"]

TRACES = ("multigpu20", "multigpu30", "multigpu40", "multigpu50",
          "gpushare20", "gpushare40", "gpushare60", "gpushare80", "gpushare100")
MARKS = (0.9, 0.95, 1.0)
DEFAULT_JSON = "benchmarks/results/fragmentation.json"


def openb_factory(node_limit: int | None = None, host_resources: bool = True) -> FactorySpec:
    nodes = load_openb_nodes(openb_path("openb_node_list_gpu_node.csv"),
                             host_resources=host_resources)
    if node_limit is not None:
        nodes = nodes[:node_limit]
    return factory_from_nodes("openb", assign_racks(nodes))


def offline_reference(jobs: Sequence[JobSpec], gpus: int) -> float | None:
    """Unallocated GPUs at 100 % arrived demand when the pods arrived by then are packed
    best-fit-decreasing onto single GPUs; None when a pod needs more than one GPU."""
    if any(s.total_gpus > 1 or s.gpu_models for s in jobs):
        return None
    demand = 0.0
    arrived: list[int] = []
    for s in jobs:
        if demand >= gpus - 1e-9:
            break
        demand += s.gpu_equivalents
        arrived.append(s.gpu_milli)
    if demand < gpus - 1e-9:
        return None  # the sequence never reaches 100 % of capacity
    free = [1000] * gpus  # sorted ascending
    placed = 0
    for milli in sorted(arrived, reverse=True):
        i = bisect.bisect_left(free, milli)
        if i < len(free):
            left = free.pop(i) - milli
            bisect.insort(free, left)
            placed += milli
    return gpus - placed / 1000


def _point(result: FillResult, mark: float) -> tuple[float, float]:
    for p in result.points:
        if abs(p.demand_fraction - mark) < 1e-9:
            return p.unallocated_gpus, p.allocation_rate
    return float("nan"), float("nan")


FIRST_FGD_SEED = 42  # FGD's runs use seeds 42-51


def gpus_alone(jobs: Sequence[JobSpec]) -> list[JobSpec]:
    """The sequence with CPU-only pods dropped and CPU and memory asked by none."""
    return [replace(s, cpu_milli=0, memory_mib=0) for s in jobs if not s.cpu_only]


def run(traces: Sequence[str], names: Sequence[str], seeds: int, orders: Sequence[str],
        node_limit: int | None, pod_limit: int | None, ratio: float,
        host_resources: bool = True, first_seed: int = FIRST_FGD_SEED,
        known_workload: bool = False) -> dict[str, Any]:
    factory = openb_factory(node_limit, host_resources)
    topo = factory.topology()
    watts = watts_estimator(topo)
    out: dict[str, Any] = {"gpus": topo.total_gpus, "nodes": len(topo.nodes), "runs": []}
    for trace in traces:
        # The whole list (CPU-only pods included) for FGD's draws; GPUs alone after.
        pods = [j.spec for j in load_openb_pods(openb_path(f"openb_pod_list_{trace}.csv"),
                                                True)]
        if pod_limit is not None:
            pods = pods[:pod_limit]
        for order in orders:
            for seed in range(first_seed, first_seed + seeds):
                jobs = fgd_order(pods, topo.total_gpus, seed, ratio) if order == "fgd" \
                    else pods
                if not host_resources:
                    jobs = gpus_alone(jobs)
                known = (pods if host_resources else gpus_alone(pods)) if known_workload \
                    else None
                reference = offline_reference(jobs, topo.total_gpus)
                for name in names:
                    if order == "file" and seed > first_seed and name != "random":
                        continue  # the same sequence and a deterministic policy
                    result, wall = timed(fill, build_state(factory, topo), jobs,
                                         policy(name, seed), watts, MARKS, 1.0, known)
                    row = {"trace": trace, "order": order, "seed": seed, "policy": name,
                           "wall_seconds": wall, "offline_reference_unallocated": reference,
                           **result.to_dict()}
                    out["runs"].append(row)
                print(f"  {trace} {order} seed {seed} done", file=sys.stderr, flush=True)
    return out


def _runs(data: dict[str, Any], trace: str, order: str, name: str) -> list[dict[str, Any]]:
    return [r for r in data["runs"] if r["trace"] == trace and r["order"] == order
            and r["policy"] == name]


def _unalloc(runs: list[dict[str, Any]], mark: float) -> Stat:
    values = []
    for r in runs:
        hit = [p for p in r["points"] if abs(p["demand_fraction"] - mark) < 1e-9]
        values.append(hit[0]["unallocated_gpus"] if hit else float("nan"))
    return stat(values)


def summarize(data: dict[str, Any], traces: Sequence[str], names: Sequence[str],
              orders: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for order in orders:
        for trace in traces:
            rows = []
            table: dict[str, Any] = {}
            ours = _unalloc(_runs(data, trace, order, "aifactory"), 1.0)
            refs = [r["offline_reference_unallocated"] for r in data["runs"]
                    if r["trace"] == trace and r["order"] == order
                    and r["offline_reference_unallocated"] is not None]
            for name in names:
                runs = _runs(data, trace, order, name)
                marks = [_unalloc(runs, m) for m in MARKS]
                alloc = stat(_point_value(r, 1.0) for r in runs)
                failed = stat(r["jobs_failed"] for r in runs)
                reduction = float("nan")
                if name != "aifactory" and marks[-1].mean > 0:
                    reduction = (marks[-1].mean - ours.mean) / marks[-1].mean
                table[name] = {"unallocated": {str(m): s.to_dict() for m, s in
                                               zip(MARKS, marks, strict=True)},
                               "allocation_rate_at_100": alloc.to_dict(),
                               "jobs_failed": failed.to_dict(),
                               "ours_reduction_vs_this_at_100": reduction}
                rows.append([name, *(s.fmt(".1f") for s in marks), alloc.fmt(".1f", 100, " %"),
                             failed.fmt(".0f"),
                             "" if name == "aifactory" or reduction != reduction
                             else f"{reduction:+.1%}"])
            if refs:
                ref = stat(refs)
                rows.append(["offline best-fit-decreasing (reference)", "", "",
                             ref.fmt(".1f"), stat(1 - v / data["gpus"] for v in refs)
                             .fmt(".1f", 100, " %"), "", ""])
                table["offline_reference"] = ref.to_dict()
            summary[f"{order}/{trace}"] = table
            seeds = len(_runs(data, trace, order, "aifactory"))
            what = f"{seeds} seeds" if order == "fgd" else "one sequence; random over seeds"
            print(f"\n**{trace}**, {order} order ({what}):\n")
            print(markdown_table(
                ["policy", "unalloc GPUs @90 %", "@95 %", "@100 %", "alloc @100 %",
                 "pods failed", "ours: fewer unalloc GPUs @100 %"], rows))
    return summary


def _point_value(run_row: dict[str, Any], mark: float) -> float:
    for p in run_row["points"]:
        if abs(p["demand_fraction"] - mark) < 1e-9:
            return float(p["allocation_rate"])
    return float("nan")


def headline(summary: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Ours vs each baseline at 100 % arrived: the largest and the mean reduction."""
    out: dict[str, Any] = {}
    rows = []
    for name in names:
        if name == "aifactory":
            continue
        values = [t[name]["ours_reduction_vs_this_at_100"] for t in summary.values()
                  if name in t and t[name]["ours_reduction_vs_this_at_100"] ==
                  t[name]["ours_reduction_vs_this_at_100"]]
        if not values:
            continue
        s = stat(values)
        out[name] = {"max": s.high, "min": s.low, "mean": s.mean, "n": s.n}
        rows.append([name, f"{s.high:+.1%}", f"{s.mean:+.1%}", f"{s.low:+.1%}", str(s.n)])
    print("\n**Fewer unallocated GPUs at 100 % arrived demand, ours vs each policy** "
          "(over every list and order; FGD reports up to 49 % vs packing schedulers):\n")
    print(markdown_table(["vs policy", "largest", "mean", "smallest", "lists x orders"],
                         rows))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_JSON)
    parser.add_argument("--traces", default=",".join(TRACES), help="openb pod lists")
    parser.add_argument("--orders", default="fgd,file", help="fgd, file or both")
    parser.add_argument("--ratio", type=float, default=1.3,
                        help="FGD order: resample to this multiple of capacity")
    parser.add_argument("--from-json", default="",
                        help="comma-separated JSON files of earlier runs (e.g. lists run "
                             "in parallel): print their tables together, run nothing")
    parser.add_argument("--gpus-only", action="store_true",
                        help="schedule GPUs alone (ignore the CPU and memory of nodes and pods)")
    parser.add_argument("--ablation", action="store_true",
                        help=f"also run {NO_FGD} (ours without the fragmentation score)")
    parser.add_argument("--first-seed", type=int, default=FIRST_FGD_SEED,
                        help="first seed (FGD's runs use 42-51)")
    parser.add_argument("--vs-fgd", action="store_true",
                        help="FGD's protocol against FGD's published results: lists "
                             f"{', '.join(FGD_ALLOCATION_AT_100)}, fgd order, 10 seeds from "
                             "--first-seed, ours unless --policies says otherwise")
    args = parser.parse_args(argv)
    if args.vs_fgd:
        return _vs_fgd(args, argv or [])
    names = policy_names(args.policies)
    if args.ablation and NO_FGD not in names:
        names.append(NO_FGD)
    traces = [t.strip() for t in args.traces.split(",") if t.strip()]
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    node_limit = pod_limit = None
    seeds = args.seeds
    if args.smoke:
        traces, node_limit, seeds = ["multigpu50", "gpushare40"], 120, 2
    if args.from_json:
        return _reprint([p.strip() for p in args.from_json.split(",") if p.strip()])
    info = machine()
    print(f"# Scenario 1: fragmentation, fill until full\n\n{machine_line(info)}")
    data, wall = timed(run, traces, names, seeds, orders, node_limit, pod_limit, args.ratio,
                       not args.gpus_only, args.first_seed)
    print(f"\nfactory: openb GPU node list, {data['nodes']} nodes, {data['gpus']} GPUs; "
          + ("GPUs only" if args.gpus_only else "GPUs, CPU and memory scheduled"))
    summary = summarize(data, traces, names, orders)
    best = headline(summary, names)
    print(f"\nwall time {wall:.0f} s")
    write_json(args.json_path, {"scenario": "fragmentation", "machine": info,
                                "args": vars(args), "summary": summary, "headline": best,
                                "wall_seconds": wall, **data})
    return 0


def _reprint(paths: Sequence[str]) -> int:
    """Tables of earlier runs read back from their JSON, merged (same factory and mode)."""
    import json

    parts = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            parts.append(json.load(fh))
    runs = [r for part in parts for r in part["runs"]]
    present = {r["trace"] for r in runs}
    traces = [t for t in TRACES if t in present] + sorted(present - set(TRACES))
    names = list(dict.fromkeys(r["policy"] for r in runs))
    orders = list(dict.fromkeys(r["order"] for r in runs))
    first = parts[0]
    print("# Scenario 1: fragmentation, fill until full\n")
    for path, part in zip(paths, parts, strict=True):
        print(f"{path}: {machine_line(part['machine'])}, wall {part['wall_seconds']:.0f} s, "
              f"args {' '.join(f'{k}={v}' for k, v in part['args'].items() if v)}")
    print(f"\nfactory: openb GPU node list, {first['nodes']} nodes, {first['gpus']} GPUs")
    summary = summarize({"gpus": first["gpus"], "nodes": first["nodes"], "runs": runs},
                        traces, names, orders)
    headline(summary, names)
    return 0


def vs_fgd_table(data: dict[str, Any], name: str = "aifactory") -> dict[str, Any]:
    """Ours against FGD's published allocation at 100 % arrived demand, per list and seed:
    prints the summary and the per-seed table, returns them."""
    out: dict[str, Any] = {}
    summary_rows = []
    seed_rows = []
    for trace, published in FGD_ALLOCATION_AT_100.items():
        runs = {r["seed"]: r for r in data["runs"] if r["trace"] == trace
                and r["order"] == "fgd" and r["policy"] == name}
        seeds = sorted(s for s in runs if s in published)
        if not seeds:
            continue
        ours = {s: 100 * _point_value(runs[s], 1.0) for s in seeds}
        diff = {s: ours[s] - published[s] for s in seeds}
        fgd_mean = sum(published[s] for s in seeds) / len(seeds)
        ours_mean = sum(ours.values()) / len(seeds)
        wins = sum(1 for d in diff.values() if d > 0.005)
        ties = sum(1 for d in diff.values() if abs(d) <= 0.005)
        out[trace] = {"seeds": seeds, "fgd": {s: published[s] for s in seeds},
                      "ours": ours, "fgd_mean": fgd_mean, "ours_mean": ours_mean,
                      "wins": wins, "ties": ties}
        summary_rows.append([trace, f"{fgd_mean:.2f} %", f"{ours_mean:.2f} %",
                             f"{ours_mean - fgd_mean:+.2f} pt",
                             f"{min(diff.values()):+.2f} to {max(diff.values()):+.2f}",
                             f"{wins} of {len(seeds)}" + (f" ({ties} tied)" if ties else "")])
        seed_rows.append([trace, *(f"{diff[s]:+.2f}" for s in seeds)])
    print(f"\n**Allocation at 100 % arrived demand, {name} vs FGD's published results** "
          "(FGD's pod order per seed, 130 % demand, CPU and memory scheduled; FGD: "
          "expected_results/analysis_allo_discrete.csv of the FGD authors' simulator):\n")
    print(markdown_table(["list", "FGD (published)", "ours", "ours - FGD (mean)",
                          "ours - FGD per seed (range)", "seeds ours ahead"], summary_rows))
    seeds_header = next(iter(out.values()))["seeds"] if out else []
    print("\nours - FGD per seed, points of allocation:\n")
    print(markdown_table(["list", *(str(s) for s in seeds_header)], seed_rows))
    return out


def _vs_fgd(args: Any, argv: Sequence[str]) -> int:
    names = policy_names(args.policies) if any(a.startswith("--policies") for a in argv) \
        else ["aifactory"]
    traces = list(FGD_ALLOCATION_AT_100)
    info = machine()
    print(f"# Scenario 1, FGD's protocol: ours against FGD's published results\n\n"
          f"{machine_line(info)}")
    data, wall = timed(run, traces, names, 10 if not args.smoke else 1, ["fgd"],
                       None, None, args.ratio, True, args.first_seed)
    print(f"\nfactory: openb GPU node list, {data['nodes']} nodes, {data['gpus']} GPUs; "
          "GPUs, CPU and memory scheduled, CPU-only pods included")
    result = {name: vs_fgd_table(data, name) for name in names}
    print(f"\nwall time {wall:.0f} s")
    write_json(args.json_path, {"scenario": "fragmentation-vs-fgd", "machine": info,
                                "args": vars(args), "vs_fgd": result, "wall_seconds": wall,
                                **data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
