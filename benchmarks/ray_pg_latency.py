"""Placement-group latency of the Ray backend on a local cluster of simulated GPU nodes.

Prints two numbers the issue asks for, measured on this machine:

1. creation-to-ready latency of an 8-bundle gang pinned node by node (``bundle_label_selector``
   on ``ray.io/node-id``), the bundles our scheduler computes for 8 workers x 4 GPUs on
   4 nodes of 8 GPUs; each run starts on an idle cluster (the previous group removed and its
   GPUs back);
2. end to end, from ``ControlPlane.submit`` of that job to every worker actor running
   (process start, environment, rendezvous with rank 0 included), driving the real
   control plane with the Ray backend.

usage: python benchmarks/ray_pg_latency.py [--runs 20] [--e2e-runs 5]
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--e2e-runs", type=int, default=5)
    args = parser.parse_args()
    spec = JobSpec(name="bench", namespace="bench", workers=8, gpus_per_worker=4,
                   runtime=Runtime(entrypoint="aifactory.controller.backends.ray.demo:train",
                                   env=(("AIFACTORY_DEMO_SECONDS", "600"),)))
    with LocalRayCluster(NODES, cpus_per_node=4), tempfile.TemporaryDirectory() as tmp:
        backend = RayBackend(checkpoint_root=tmp, cpus_per_worker=0.1,
                             poll_interval_seconds=0.01)
        cp = ControlPlane(backend.factory("bench"), backend, topology=backend.topology)
        total = float(backend.topology.total_gpus)
        # The scheduler's placement for the gang, turned into pinned bundles.
        cp.submit(spec)
        cp.cycle(force=True)
        placement = cp.jobs[spec.key].placement
        assert placement is not None
        cp.cancel(spec.key)
        wait_idle(total)
        ids = {n.info.name: n.node_id for n in backend.ray_nodes(fresh=True)}
        bundles = gang_bundles(placement, backend.topology, ids, 0.01)
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
        e2e = []
        for _ in range(args.e2e_runs):
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
            e2e.append(time.perf_counter() - t0)
            cp.cancel(spec.key)
            backend.forget(spec.key)
            wait_idle(total)
        backend.close()
    nodes = len({b.node for b in bundles})
    print(f"8-bundle pinned gang ({nodes} nodes, {bundles[0].resources['GPU']:g} GPUs/bundle), "
          f"{args.runs} runs")
    print(f"  placement group creation -> ready: p50 {percentile(latencies, 50) * 1e3:.1f} ms"
          f"  p99 {percentile(latencies, 99) * 1e3:.1f} ms  max {max(latencies) * 1e3:.1f} ms")
    print(f"submission -> all 8 workers running (ControlPlane + RayBackend), "
          f"{args.e2e_runs} runs")
    print(f"  p50 {percentile(e2e, 50):.2f} s  max {max(e2e):.2f} s  "
          f"runs: {', '.join(f'{x:.2f}' for x in e2e)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
