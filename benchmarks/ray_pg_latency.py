"""Placement-group and start latency of the Ray backend on a local cluster of simulated GPU nodes.

Prints, measured on this machine:

1. creation-to-ready latency of an 8-bundle gang pinned node by node (``bundle_label_selector``
   on ``ray.io/node-id``), the bundles our scheduler computes for 8 workers x 4 GPUs on
   4 nodes of 8 GPUs; each run starts on an idle cluster (the previous group removed and its
   GPUs back);
2. end to end, from ``ControlPlane.submit`` of that job to every worker running (the
   backend's status ``Running``: environment, rendezvous with rank 0 and the entrypoint
   called), driving the real control plane with the Ray backend, two ways in alternation so
   both see the same load: ``new processes`` (``prestart_per_node=0``: one new Ray worker
   process per worker, started when the gang launches, as before the pool) and ``pre-started``
   (the default pool of 2 idle workers per node, topped up again between runs; each run starts
   when the pool is full again, as on a cluster whose last gang started a few seconds ago).

Measured on 2026-12-01 on the 2-core development machine shared with other engineers' builds
and tests, ``python benchmarks/ray_pg_latency.py --runs 20 --e2e-runs 20``, submission to all
8 workers running, N = 20 each (benchmarks/README.md, "Ray: starting a gang")::

    1-min load 22.0 -> 38.0   new processes  p50 5.89 s  p99 9.46 s
                              pre-started    p50 0.44 s  p99 0.92 s
    1-min load  5.7 -> 24.9   new processes  p50 4.75 s  p99 9.32 s
                              pre-started    p50 0.25 s  p99 0.81 s
    1-min load 13.7 -> 19.1   new processes  p50 3.48 s  p99 6.30 s
                              pre-started    p50 0.34 s  p99 0.89 s

usage: python benchmarks/ray_pg_latency.py [--runs 20] [--e2e-runs 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from aifactory.controller.backends.base import WorkloadPhase
from aifactory.controller.backends.ray.backend import RayBackend
from aifactory.controller.backends.ray.gang import gang_bundles
from aifactory.controller.backends.ray.local import LocalRayCluster
from aifactory.controller.core.spec import JobSpec, Runtime
from aifactory.controller.core.topology import BLOCK_LABEL, RACK_LABEL, NodeInfo
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.measurements import percentile

NODES = [NodeInfo(f"n-r{r}-{i}", 8, "H200", ((BLOCK_LABEL, "b0"), (RACK_LABEL, f"r{r}")))
         for r in range(2) for i in range(2)]


def wait_idle(gpus: float, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ray.available_resources().get("GPU", 0.0) >= gpus:
            return
        time.sleep(0.01)
    raise RuntimeError("GPUs did not come back after removing the placement group")


def _until_running(cp: ControlPlane, backend: RayBackend, spec: JobSpec) -> float:
    t0 = time.perf_counter()
    cp.submit(spec)
    while True:
        cp.step()
        status = backend.status(spec.key)
        if status is not None and status.phase is WorkloadPhase.RUNNING:
            break
        if status is not None and status.phase is WorkloadPhase.FAILED:
            raise RuntimeError(status.message)
        time.sleep(0.005)
    took = time.perf_counter() - t0
    cp.cancel(spec.key)
    backend.forget(spec.key)
    return took


def _pool_full(backend: RayBackend, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while backend.pool is not None and time.monotonic() < end:
        backend.refresh(force=True)  # tops the pool up
        if backend.pool.warm() and backend.pool.size() >= backend.pool.per_node * len(NODES):
            return
        time.sleep(0.05)
    if backend.pool is not None:
        raise RuntimeError("the pool of pre-started workers did not fill in time")


def _line(name: str, values: list[float]) -> str:
    return (f"  {name:<15} p50 {percentile(values, 50):.2f} s  p99 {percentile(values, 99):.2f} s"
            f"  max {max(values):.2f} s  runs: {', '.join(f'{x:.2f}' for x in values)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--e2e-runs", type=int, default=20)
    args = parser.parse_args()
    spec = JobSpec(name="bench", namespace="bench", workers=8, gpus_per_worker=4,
                   runtime=Runtime(entrypoint="aifactory.controller.backends.ray.demo:train",
                                   env=(("AIFACTORY_DEMO_SECONDS", "600"),)))
    load_before = os.getloadavg()[0]
    with LocalRayCluster(NODES, cpus_per_node=4), tempfile.TemporaryDirectory() as tmp:
        options = {"checkpoint_root": tmp, "cpus_per_worker": 0.1,
                   "poll_interval_seconds": 0.01}
        cold = RayBackend(prestart_per_node=0, **options)  # type: ignore[arg-type]
        warm = RayBackend(**options)  # type: ignore[arg-type]
        planes = {name: ControlPlane(b.factory("bench"), b, topology=b.topology)
                  for name, b in (("new processes", cold), ("pre-started", warm))}
        total = float(warm.topology.total_gpus)
        # The scheduler's placement for the gang, turned into pinned bundles.
        cp = planes["new processes"]
        cp.submit(spec)
        cp.cycle(force=True)
        placement = cp.jobs[spec.key].placement
        assert placement is not None
        cp.cancel(spec.key)
        cold.forget(spec.key)
        wait_idle(total)
        ids = {n.info.name: n.node_id for n in warm.ray_nodes(fresh=True)}
        bundles = gang_bundles(placement, warm.topology, ids, 0.01)
        latencies = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            pg = placement_group([dict(b.resources) for b in bundles], strategy="PACK",
                                 bundle_label_selector=[dict(b.selector) for b in bundles])
            if not pg.wait(timeout_seconds=30):
                raise RuntimeError("placement group not ready in 30 s")
            latencies.append(time.perf_counter() - t0)
            remove_placement_group(pg)
            wait_idle(total)
        e2e: dict[str, list[float]] = {name: [] for name in planes}
        backends = {"new processes": cold, "pre-started": warm}
        for _ in range(args.e2e_runs):
            for name, plane in planes.items():  # alternate: both see the same load
                _pool_full(warm)
                e2e[name].append(_until_running(plane, backends[name], spec))
                wait_idle(total)
        cold.close()
        warm.close()
    load_after = os.getloadavg()[0]
    nodes = len({b.node for b in bundles})
    print(f"1-min load average: {load_before:.1f} before, {load_after:.1f} after "
          f"({os.cpu_count()} cores)")
    print(f"8-bundle pinned gang ({nodes} nodes, {bundles[0].resources['GPU']:g} GPUs/bundle), "
          f"{args.runs} runs")
    print(f"  placement group creation -> ready: p50 {percentile(latencies, 50) * 1e3:.1f} ms"
          f"  p99 {percentile(latencies, 99) * 1e3:.1f} ms  max {max(latencies) * 1e3:.1f} ms")
    print(f"submission -> all 8 workers running (ControlPlane + RayBackend), "
          f"{args.e2e_runs} runs each, alternating")
    for name, values in e2e.items():
        print(_line(name, values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
