"""Scenario 2: time replay of the openb pod lists, by creation and deletion time.

The openb ``default`` and ``gpuspec*`` pod lists on the real openb GPU node list: each pod
arrives at its ``creation_time`` and runs for ``deletion_time - creation_time`` (the
scheduler never sees that), fractional GPUs share a GPU and ``gpu_spec`` restricts the GPU
model. Reported per policy: queue wait mean and p95 (of the pods that started), the
allocation rate over time (GPUs requested by running pods over all GPUs, sampled at 20
points of the arrival window; the table shows its mean over the window and its peak), pods
never placed, and pods that waited for capacity while enough GPUs were free in total.

Two variants of the same pods:

- ``real``: the trace as it is. Its pods barely overlap in time (never more than about
  66 GPUs requested at once on 6,212), so nothing ever waits: a sanity check and a speed
  test more than a contest;
- ``stress``: every 2nd node of each (model, GPUs per node) group (the same mix, half the
  GPUs) and arrivals 3,000 times faster (durations unchanged), so pods queue and the
  trace's QoS priorities preempt.

    python -m benchmarks.replay           # real: default + gpuspec05..33; stress: default
                                          # and gpuspec33 (the unconstrained and the most
                                          # constrained list; each stress run takes minutes)
    python -m benchmarks.replay --smoke   # default, 600 pods, both variants

By default the scheduler sees GPUs only, as the scenario asks; ``--host-resources`` also
gives nodes their CPU and memory and pods their requests (as FGD's simulator does).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aifactory.controller.core.topology import NodeInfo
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes
from aifactory.controller.inputs.traces import assign_racks, load_openb_nodes, load_openb_pods
from aifactory.controller.inputs.workload import Arrival
from aifactory.controller.sim.simulation import Simulation
from benchmarks.common import (
    base_parser,
    machine,
    machine_line,
    markdown_table,
    openb_path,
    policy,
    policy_names,
    run_sampled,
    stat,
    timed,
    write_json,
)

__all__ = ["Variant", "main", "replay"]

TRACES = ("default", "gpuspec05", "gpuspec10", "gpuspec20", "gpuspec25", "gpuspec33")
SAMPLES = 20
DEFAULT_JSON = "benchmarks/results/replay.json"


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    node_stride: int  # keep every n-th node of each (model, GPUs per node) group
    compress: float  # arrivals this many times faster


VARIANTS = (Variant("real", 1, 1.0), Variant("stress", 2, 3000.0))


def thinned_nodes(stride: int, host_resources: bool = False) -> list[NodeInfo]:
    nodes = load_openb_nodes(openb_path("openb_node_list_gpu_node.csv"),
                             host_resources=host_resources)
    if stride <= 1:
        return nodes
    seen: dict[tuple[str, int], int] = {}
    kept = []
    for n in nodes:
        i = seen.get((n.gpu_model, n.gpus), 0)
        seen[(n.gpu_model, n.gpus)] = i + 1
        if i % stride == 0:
            kept.append(n)
    return kept


def arrivals(trace: str, compress: float, limit: int | None = None,
             host_resources: bool = False) -> list[Arrival]:
    jobs = load_openb_pods(openb_path(f"openb_pod_list_{trace}.csv"), host_resources)
    if limit is not None:
        jobs = jobs[:limit]
    start = min((j.arrival_seconds or 0.0) for j in jobs)
    return [Arrival(j.spec, start + ((j.arrival_seconds or 0.0) - start) / compress,
                    j.duration_seconds) for j in jobs]


def replay(factory: FactorySpec, jobs: Sequence[Arrival], name: str, seed: int
           ) -> dict[str, Any]:
    """Run one policy over the arrivals; allocation sampled over the arrival window."""
    sim = Simulation(factory, policy(name, seed), seed=seed)
    sim.submit_all(jobs)
    return run_sampled(sim, min(a.at for a in jobs), max(a.at for a in jobs), SAMPLES)


def run(traces: Sequence[str], variants: Sequence[Variant], names: Sequence[str],
        seeds: int, pod_limit: int | None, stress_traces: Sequence[str] | None = None,
        host_resources: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for variant in variants:
        factory = factory_from_nodes("openb", assign_racks(
            thinned_nodes(variant.node_stride, host_resources)))
        wanted = traces if variant.name != "stress" or stress_traces is None else [
            t for t in traces if t in stress_traces]
        for trace in wanted:
            jobs = arrivals(trace, variant.compress, pod_limit, host_resources)
            for name in names:
                for seed in range(1, (seeds if name == "random" else 1) + 1):
                    out, wall = timed(replay, factory, jobs, name, seed)
                    rows.append({"trace": trace, "variant": variant.name, "policy": name,
                                 "seed": seed, "gpus": factory.total_gpus,
                                 "wall_seconds": wall, **out})
                    print(f"  {variant.name} {trace} {name} seed {seed}: {wall:.1f} s",
                          file=sys.stderr, flush=True)
    return rows


def summarize(rows: list[dict[str, Any]], traces: Sequence[str],
              variants: Sequence[Variant], names: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in variants:
        for trace in traces:
            table = []
            block: dict[str, Any] = {}
            gpus = 0
            for name in names:
                runs = [r for r in rows if r["trace"] == trace and r["variant"] == variant.name
                        and r["policy"] == name]
                if not runs:
                    continue
                gpus = runs[0]["gpus"]
                cols = {
                    "queue_wait_seconds_mean": stat(r["queue_wait_seconds_mean"] for r in runs),
                    "queue_wait_seconds_p95": stat(r["queue_wait_seconds_p95"] for r in runs),
                    "allocation_over_arrival_window": stat(
                        r["allocation_over_arrival_window"] for r in runs),
                    "allocation_peak": stat(r["allocation_peak"] for r in runs),
                    "jobs_never_placed": stat(r["jobs_never_placed"] for r in runs),
                    "unplaced_while_capacity_free": stat(
                        r["unplaced_while_capacity_free"] for r in runs),
                    "wall_seconds": stat(r["wall_seconds"] for r in runs),
                }
                block[name] = {k: v.to_dict() for k, v in cols.items()}
                table.append([
                    name, cols["queue_wait_seconds_mean"].fmt(".0f"),
                    cols["queue_wait_seconds_p95"].fmt(".0f"),
                    cols["allocation_over_arrival_window"].fmt(".1f", 100, " %"),
                    cols["allocation_peak"].fmt(".1f", 100, " %"),
                    cols["jobs_never_placed"].fmt(".0f"),
                    cols["unplaced_while_capacity_free"].fmt(".0f"),
                    cols["wall_seconds"].fmt(".1f")])
            if not block:
                continue
            summary[f"{variant.name}/{trace}"] = block
            print(f"\n**{trace}**, {variant.name} ({gpus} GPUs, arrivals "
                  f"{variant.compress:g}x faster):\n")
            print(markdown_table(["policy", "wait mean s", "wait p95 s",
                                  "alloc (arrival window)", "alloc peak", "never placed",
                                  "waited while GPUs free", "wall s"], table))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_JSON)
    parser.add_argument("--traces", default=",".join(TRACES), help="openb pod lists")
    parser.add_argument("--variants", default="real,stress", help="real, stress or both")
    parser.add_argument("--stress-traces", default="default,gpuspec33",
                        help="pod lists for the stress variant")
    parser.add_argument("--host-resources", action="store_true",
                        help="schedule the nodes' and pods' CPU and memory as well as GPUs")
    args = parser.parse_args(argv)
    names = policy_names(args.policies)
    traces = [t.strip() for t in args.traces.split(",") if t.strip()]
    wanted = {v.strip() for v in args.variants.split(",")}
    variants = [v for v in VARIANTS if v.name in wanted]
    seeds, pod_limit = args.seeds, None
    if args.smoke:
        traces, seeds, pod_limit = ["default"], 2, 600
    info = machine()
    print(f"# Scenario 2: time replay\n\n{machine_line(info)}")
    stress = None if args.smoke else [t.strip() for t in args.stress_traces.split(",")]
    rows, wall = timed(run, traces, variants, names, seeds, pod_limit, stress,
                       args.host_resources)
    if args.host_resources:
        print("\nresources: GPUs, CPU and memory scheduled")
    summary = summarize(rows, traces, variants, names)
    print(f"\nwall time {wall:.0f} s")
    write_json(args.json_path, {"scenario": "replay", "machine": info, "args": vars(args),
                                "summary": summary, "runs": rows, "wall_seconds": wall})
    return 0


if __name__ == "__main__":
    sys.exit(main())
