"""How long one scrape of /metrics takes for a large simulated factory.

Builds a simulated factory (default: 10,240 GPUs per-GPU and node-level, and the built-in
100k factory node-level), fills about 70 % of its GPUs with running jobs, starts the real
metrics server on a free loopback port and times complete HTTP GETs of /metrics, the way
Prometheus scrapes it. Prints, per factory: the median and worst of N scrapes, the series
count, the body size, the split between taking the snapshot and formatting the text (wall
time, median) and the CPU time the serving thread spent on both (less sensitive to other
load on the machine than the wall times).
With ``--client`` it also times prometheus_client's own ``generate_latest`` of the same
collector, for comparison; ``--per-gpu-100k`` adds the 100k factory with per-GPU series.

    PYTHONPATH=. python benchmarks/scrape_time.py [--scrapes 5] [--client] [--per-gpu-100k]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.inputs.factory import load_factory, parse_factory
from aifactory.controller.inputs.workload import Arrival
from aifactory.controller.observe.exporter import start_metrics_server
from aifactory.controller.sim.simulation import Simulation


def factory_doc(blocks: int, racks: int, nodes: int) -> dict[str, Any]:
    gpus = blocks * racks * nodes * 8
    return {
        "apiVersion": "aifactory.io/v1alpha1", "kind": "SimulatedFactory",
        "metadata": {"name": f"bench-{gpus}"},
        "spec": {"levels": ["block", "rack", "node"],
                 "nodeGroups": [{"gpuModel": "H200", "gpusPerNode": 8, "blocks": blocks,
                                 "racksPerBlock": racks, "nodesPerRack": nodes,
                                 "namePrefix": "h200"}],
                 "queues": [{"name": "default", "nominalGPUs": gpus}],
                 "powerBudgets": [{"name": "factory", "watts": gpus * 700}]},
    }


def filled(factory: Any, share: float = 0.7) -> Simulation:
    """A simulation with ~``share`` of the GPUs held by 64-GPU training gangs."""
    sim = Simulation(factory)
    jobs = int(factory.total_gpus * share) // 64
    sim.submit_all(Arrival(JobSpec(name=f"train-{i:05d}", workers=8, gpus_per_worker=8,
                                   namespace=f"team-{i % 7}", queue="default"),
                           0.0, 86400.0) for i in range(jobs))
    sim.run(until=60.0)
    return sim


CLIENT = """
import json, sys, time, urllib.request
url, count = sys.argv[1], int(sys.argv[2])
out = []
for _ in range(count):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        body = resp.read()
    out.append([time.perf_counter() - started, len(body), body.count(b"\\n") -
                body.count(b"\\n#") - int(body.startswith(b"#"))])
print(json.dumps(out))
"""


def time_scrapes(sim: Simulation, per_gpu: bool, scrapes: int, renderer: str
                 ) -> dict[str, float]:
    """Scrapes from another process (as Prometheus would: not sharing our GIL)."""
    with start_metrics_server(sim, 0, "127.0.0.1", per_gpu=per_gpu,
                              renderer=renderer) as server:
        snapshot: list[float] = []
        render: list[float] = []
        cpu: list[float] = []
        client = subprocess.Popen([sys.executable, "-c", CLIENT, server.url, str(scrapes)],
                                  stdout=subprocess.PIPE, text=True)
        while client.poll() is None:  # the server thread notes each scrape's split
            time.sleep(0.01)
            if server.collector.last_snapshot_seconds and (
                    not snapshot or snapshot[-1] != server.collector.last_snapshot_seconds):
                snapshot.append(server.collector.last_snapshot_seconds)
                render.append(server.collector.last_render_seconds)
                cpu.append(server.collector.last_cpu_seconds)
        out, _ = client.communicate()
        rows = json.loads(out)
    times = [r[0] for r in rows]
    return {"median": statistics.median(times), "max": max(times), "series": rows[-1][2],
            "bytes": rows[-1][1], "snapshot": statistics.median(snapshot or [0.0]),
            "render": statistics.median(render or [0.0]),
            "cpu": statistics.median(cpu or [0.0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=5)
    parser.add_argument("--client", action="store_true",
                        help="also time prometheus_client's generate_latest (slow)")
    parser.add_argument("--per-gpu-100k", action="store_true",
                        help="also scrape the 100k factory with per-GPU series (~130 MB)")
    args = parser.parse_args()
    small = parse_factory(factory_doc(5, 4, 64))
    big = load_factory("100k")
    cases = [("10,240 GPUs", small, True), ("10,240 GPUs", small, False),
             ("100,352 GPUs (100k)", big, False)]
    if args.per_gpu_100k:
        cases.append(("100,352 GPUs (100k)", big, True))
    print(f"{'factory':<22} {'mode':<10} {'renderer':<8} {'median ms':>9} {'max ms':>8} "
          f"{'snapshot':>9} {'format':>7} {'CPU ms':>7} {'series':>8} {'MB':>6}")
    sims: dict[int, Simulation] = {}
    for label, factory, per_gpu in cases:
        sim = sims.get(id(factory)) or sims.setdefault(id(factory), filled(factory))
        renderers = ["fast", "client"] if args.client and per_gpu else ["fast"]
        for renderer in renderers:
            r = time_scrapes(sim, per_gpu, args.scrapes, renderer)
            fast = renderer == "fast"
            fmt = f"{r['render'] * 1e3:7.0f}" if fast else f"{'-':>7}"
            cpu = f"{r['cpu'] * 1e3:7.0f}" if fast else f"{'-':>7}"
            print(f"{label:<22} {'per-GPU' if per_gpu else 'node':<10} {renderer:<8} "
                  f"{r['median'] * 1e3:9.0f} {r['max'] * 1e3:8.0f} "
                  f"{r['snapshot'] * 1e3:9.0f} {fmt} {cpu} {r['series']:>8} "
                  f"{r['bytes'] / 1e6:6.1f}")


if __name__ == "__main__":
    main()
