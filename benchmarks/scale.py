"""Scenario 5: scale. Decision latency by gang and factory size; full replay wall and memory.

Decision latency: factories of 1,024 (2 blocks x 8 racks x 8 nodes x 8 GPUs), 10,240
(5 x 8 x 32 x 8) and 100,352 GPUs (the built-in ``100k``: 14 x 14 x 64 x 8 H200). Each is
first filled to about half its GPUs by the policy itself with Kalos-like jobs
(``benchmarks/gang_workload.py``), then, repeatedly, the policy is asked to place a gang of
8, 64, 512 and 1,024 GPUs (workers of 8 GPUs, preferring one rack); between repetitions a
few background jobs end and new ones arrive, so every decision sees a different state.
Reported: p50 and p99 of the time ``policy.place`` takes (the decision itself, as the
simulator records it) and of a whole one-job scheduling cycle (``schedule``: snapshot
clone, quota, placement). A gang that does not fit is a decision too (it returns why).
Slow policies get fewer repetitions (a time budget per cell); the sample count is shown.
Also measured on ``100k``: a 512-GPU gang that *requires* one rack.

Full replay: the openb ``default`` pod list on the openb node list, replayed by time
(scenario 2's "real" variant) in a fresh process per policy: wall time and peak resident
memory (``resource.getrusage``).

    python -m benchmarks.scale            # all factories, all policies
    python -m benchmarks.scale --smoke    # 1,024 GPUs, 8- and 64-GPU gangs, few reps
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import BLOCK_LABEL, RACK_LABEL, NodeInfo
from aifactory.controller.inputs.factory import FactorySpec, factory_from_nodes, load_factory
from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.placement.request import PlacementRequest
from aifactory.controller.power.estimates import watts_estimator
from aifactory.controller.runtime.controlplane import build_state
from aifactory.controller.runtime.measurements import percentile
from aifactory.controller.scheduling.cycle import schedule
from aifactory.controller.scheduling.cycle_io import CycleMemory, QueuedJob, SchedulerConfig
from benchmarks.common import (
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
from benchmarks.gang_workload import fit_sizes, load_summary

__all__ = ["main"]

DEFAULT_JSON = "benchmarks/results/scale.json"
FACTORIES = {"1k": (2, 8, 8), "10k": (5, 8, 32), "100k": None}
GANGS = (8, 64, 512, 1024)
FILL = 0.5


def grid_factory(blocks: int, racks: int, nodes: int) -> FactorySpec:
    out = []
    for b in range(blocks):
        for r in range(racks):
            for n in range(nodes):
                out.append(NodeInfo(f"n-b{b}-r{r}-{n:03d}", 8, "H200",
                                    ((BLOCK_LABEL, f"b{b}"), (RACK_LABEL, f"b{b}-r{r}"))))
    return factory_from_nodes(f"grid-{blocks * racks * nodes * 8}", out)


def make_factory(name: str) -> FactorySpec:
    shape = FACTORIES[name]
    return load_factory("100k") if shape is None else grid_factory(*shape)


def gang(gpus: int, name: str, required: str | None = None) -> JobSpec:
    if gpus <= 8:
        return JobSpec(name=name, gpus_per_worker=gpus, required_level=required)
    return JobSpec(name=name, workers=gpus // 8, gpus_per_worker=8, preferred_level="rack",
                   required_level=required)


class Background:
    """Jobs the policy itself placed to fill the factory, with churn between decisions."""

    def __init__(self, state: ClusterState, pol: PlacementPolicy, seed: int,
                 memory: CycleMemory) -> None:
        self.state = state
        self.policy = pol
        self.memory = memory  # shared with the cycles, as the control plane shares it
        self.rng = random.Random(seed)
        s = load_summary("Kalos")
        self.sizes = fit_sizes(s.mean_gpus, min(s.max_gpus, 256))
        self.jobs: list[str] = []
        self.count = 0
        total = state.topo.total_gpus
        misses = 0
        while state.allocated_gpu_equivalents < FILL * total and misses < 50:
            misses = 0 if self.add() else misses + 1

    def add(self) -> bool:
        self.count += 1
        spec = gang(self.sizes.draw(self.rng), f"bg-{self.count}")
        req = PlacementRequest.resolve(spec, self.state.topo)
        assert isinstance(req, PlacementRequest)
        self.policy.learn(self.memory.mix, req, self.state.host_tracked)
        got = self.policy.place(self.state, req, None, self.memory.mix)
        if isinstance(got, Placement) and got.complete:
            self.state.allocate(got)
            self.jobs.append(got.job)
            return True
        return False

    def churn(self, jobs: int = 4) -> None:
        for _ in range(min(jobs, len(self.jobs))):
            self.state.release(self.jobs.pop(self.rng.randrange(len(self.jobs))))
        for _ in range(jobs):
            self.add()


def latency(factory: FactorySpec, name: str, sizes: Sequence[int], reps: int,
            budget_seconds: float, required: str | None = None) -> list[dict[str, Any]]:
    topo = factory.topology()
    pol = policy(name, 1)
    state = build_state(factory, topo)
    memory = CycleMemory()
    bg = Background(state, pol, seed=1, memory=memory)
    config = SchedulerConfig(policy=pol, empty=build_state(factory, topo),
                             watts_per_gpu=watts_estimator(topo), queues=factory.queues)
    out = []
    for size in sizes:
        spec = gang(size, f"probe-{size}", required)
        place_s: list[float] = []
        cycle_s: list[float] = []
        placed = 0
        spent = 0.0
        for rep in range(reps):
            watts = config.watts_per_gpu(spec) if pol.power_aware else 0.0
            req = PlacementRequest.resolve(spec, topo, watts)
            assert isinstance(req, PlacementRequest)
            start = time.perf_counter()
            pol.learn(memory.mix, req, state.host_tracked)
            got = pol.place(state, req, None, memory.mix)
            place_s.append(time.perf_counter() - start)
            placed += isinstance(got, Placement) and got.complete
            start = time.perf_counter()
            schedule(state, [QueuedJob(spec, 0.0, rep)], {}, 0.0, config, memory=memory)
            cycle_s.append(time.perf_counter() - start)
            spent += place_s[-1] + cycle_s[-1]
            bg.churn()
            if spent > budget_seconds:
                break
        out.append({"policy": name, "factory_gpus": topo.total_gpus, "gang_gpus": size,
                    "required_level": required, "samples": len(place_s),
                    "placed_fraction": placed / len(place_s),
                    "allocated_fraction": state.allocated_gpu_equivalents / topo.total_gpus,
                    "place_p50_ms": percentile(place_s, 50) * 1e3,
                    "place_p99_ms": percentile(place_s, 99) * 1e3,
                    "cycle_p50_ms": percentile(cycle_s, 50) * 1e3,
                    "cycle_p99_ms": percentile(cycle_s, 99) * 1e3})
        print(f"  {name} {topo.total_gpus} GPUs gang {size}{' ' + required if required else ''}"
              f": {len(place_s)} samples", file=sys.stderr, flush=True)
    return out


def replay_child(name: str, limit: int | None) -> None:
    """Runs in a fresh process: replay openb default, print wall and peak RSS as JSON."""
    from aifactory.controller.inputs.traces import assign_racks, load_openb_nodes
    from aifactory.controller.sim.simulation import Simulation
    from benchmarks.replay import arrivals

    start = time.perf_counter()
    factory = factory_from_nodes("openb", assign_racks(load_openb_nodes(
        openb_path("openb_node_list_gpu_node.csv"))))
    jobs = arrivals("default", 1.0, limit)
    sim = Simulation(factory, policy(name, 1), seed=1)
    sim.submit_all(jobs)
    loaded = time.perf_counter()
    result = sim.run()
    end = time.perf_counter()
    print(json.dumps({"policy": name, "jobs": len(jobs), "wall_seconds": end - start,
                      "run_seconds": end - loaded, "load_seconds": loaded - start,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "jobs_completed": result.jobs_completed}))


def full_replay(names: Sequence[str], limit: int | None, repeats: int
                ) -> list[dict[str, Any]]:
    out = []
    for name in names:
        for i in range(repeats):
            cmd = [sys.executable, "-m", "benchmarks.scale", "--replay-child", name]
            if limit is not None:
                cmd += ["--replay-limit", str(limit)]
            root = Path(__file__).resolve().parents[1]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root,
                                  env=env)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["repeat"] = i + 1
            out.append(row)
            print(f"  replay {name} #{i + 1}: {row['wall_seconds']:.1f} s", file=sys.stderr,
                  flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0], DEFAULT_JSON)
    parser.add_argument("--factories", default=",".join(FACTORIES))
    parser.add_argument("--reps", type=int, default=200, help="decisions per cell (at most)")
    parser.add_argument("--cell-seconds", type=float, default=20.0,
                        help="time budget per (policy, factory, gang) cell")
    parser.add_argument("--replay-repeats", type=int, default=2)
    parser.add_argument("--replay-child", default=None, help=argparse_hidden())
    parser.add_argument("--replay-limit", type=int, default=None, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.replay_child:
        replay_child(args.replay_child, args.replay_limit)
        return 0
    names = policy_names(args.policies)
    factories = [f.strip() for f in args.factories.split(",") if f.strip()]
    sizes: Sequence[int] = GANGS
    reps, cell, replay_limit, repeats = args.reps, args.cell_seconds, None, args.replay_repeats
    if args.smoke:
        factories, sizes, reps, cell, replay_limit, repeats = ["1k"], (8, 64), 5, 2.0, 300, 1
    info = machine()
    print(f"# Scenario 5: scale\n\n{machine_line(info)}")
    rows: list[dict[str, Any]] = []

    def work() -> None:
        for fname in factories:
            factory = make_factory(fname)
            for name in names:
                rows.extend(latency(factory, name, sizes, reps, cell))
        if "100k" in factories:
            factory = make_factory("100k")
            for name in names:
                rows.extend(latency(factory, name, (512,), reps, cell, required="rack"))

    _, wall = timed(work)
    table = []
    for r in rows:
        table.append([r["policy"], f"{r['factory_gpus']:,}",
                      f"{r['gang_gpus']}{' (rack required)' if r['required_level'] else ''}",
                      str(r["samples"]), f"{r['placed_fraction']:.0%}",
                      f"{r['place_p50_ms']:.2f}", f"{r['place_p99_ms']:.2f}",
                      f"{r['cycle_p50_ms']:.2f}", f"{r['cycle_p99_ms']:.2f}"])
    print("\n**Decision latency** (factory about half full; ms):\n")
    print(markdown_table(["policy", "factory GPUs", "gang GPUs", "samples", "placed",
                          "place p50", "place p99", "cycle p50", "cycle p99"], table))
    replays, replay_wall = timed(full_replay, names, replay_limit, repeats)
    rtable = []
    for name in names:
        mine = [r for r in replays if r["policy"] == name]
        w = stat(r["wall_seconds"] for r in mine)
        m = stat(r["peak_rss_mib"] for r in mine)
        rtable.append([name, str(mine[0]["jobs"]), ", ".join(f"{r['wall_seconds']:.1f}"
                                                             for r in mine),
                       w.fmt(".1f"), m.fmt(".0f")])
    print("\n**Full openb default replay** (real timing; fresh process per run):\n")
    print(markdown_table(["policy", "pods", "wall s per run", "wall s mean", "peak RSS MiB"],
                         rtable))
    print(f"\nwall time {wall + replay_wall:.0f} s")
    write_json(args.json_path, {"scenario": "scale", "machine": info, "args": vars(args),
                                "latency": rows, "replay": replays,
                                "wall_seconds": wall + replay_wall})
    return 0


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
