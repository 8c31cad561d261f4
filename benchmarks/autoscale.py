"""Autoscaling reaction times on a real Ray cluster under a closed-loop HTTP load test.

A local Ray cluster of simulated GPU nodes (4 x 8 H200) runs one InferenceService through the
real control plane, the Ray backend and the autoscaler (``controller/runtime/scaler.py``):
each replica is a Ray actor serving HTTP whose handler holds every request ``--request-
seconds``; the replicas report their requests in flight. Client threads send requests back to
back to the ready replicas' endpoints (closed loop: N clients keep about N requests in flight).

Phases: ``--low`` clients until the service settles at its minimum, a step to ``--high``
clients, then back to ``--low``. Printed, from the load step: seconds until the autoscaler
first acts, until it wants the final count, and until that many replicas serve (process start
on Ray included); after the drop, seconds to the first scale-down (never inside the
stabilization window) and to the minimum. Also the requests answered and their mean latency.

usage: python -m benchmarks.autoscale [--sync-seconds 15] [--window 60] [--high 24]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aifactory.controller.backends.ray.backend import RayBackend
from aifactory.controller.backends.ray.local import LocalRayCluster
from aifactory.controller.core.spec import JobKind, JobSpec, Runtime
from aifactory.controller.core.topology import BLOCK_LABEL, RACK_LABEL, NodeInfo
from aifactory.controller.runtime.autoscale import AutoscalePolicy, replica_changes
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.scaler import Autoscaler, ScaleChange

NODES = [NodeInfo(f"n-r{r}-{i}", 8, "H200", ((BLOCK_LABEL, "b0"), (RACK_LABEL, f"r{r}")))
         for r in range(2) for i in range(2)]
SERVICE = "bench/chat"


def hold(ctx: Any) -> Callable[[bytes], bytes]:
    """The replicas' handler factory: each request takes REQUEST_SECONDS."""
    import os

    seconds = float(os.environ.get("REQUEST_SECONDS", "0.5"))

    def handle(body: bytes) -> bytes:
        time.sleep(seconds)
        return body

    return handle


class Clients:
    """``count`` threads, each sending one request at a time to a random ready replica."""

    def __init__(self, endpoints: Callable[[], list[str]]) -> None:
        self.endpoints = endpoints
        self.want = 0
        self.errors = 0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def set(self, count: int) -> None:
        self.want = count
        while len(self.threads) < count:
            t = threading.Thread(target=self._run, args=(len(self.threads),), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, index: int) -> None:
        while not self.stop.is_set():
            ends = self.endpoints()
            if index >= self.want or not ends:
                self.stop.wait(0.05)
                continue
            req = urllib.request.Request(random.choice(ends), data=b"x", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    resp.read()
            except OSError:
                self.errors += 1
                self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=35)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sync-seconds", type=float, default=15.0)
    p.add_argument("--window", type=float, default=60.0,
                   help="scaleDownStabilizationSeconds (default 60)")
    p.add_argument("--target", type=float, default=4.0, help="targetInFlightRequests")
    p.add_argument("--low", type=int, default=2, help="clients before and after the step")
    p.add_argument("--high", type=int, default=24, help="clients during the step")
    p.add_argument("--max-replicas", type=int, default=8)
    p.add_argument("--request-seconds", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    service = JobSpec(name="chat", namespace="bench", kind=JobKind.INFERENCE, workers=1,
                      gpus_per_worker=1, group=SERVICE, restart_limit=100,
                      runtime=Runtime(entrypoint="benchmarks.autoscale:hold", env=(
                          ("REQUEST_SECONDS", str(args.request_seconds)),)))
    policy = AutoscalePolicy(1, args.max_replicas, args.target,
                             scale_down_stabilization_seconds=args.window)
    with LocalRayCluster(NODES, cpus_per_node=4), tempfile.TemporaryDirectory() as tmp:
        backend = RayBackend(checkpoint_root=tmp, cpus_per_worker=0.1, serve_host="127.0.0.1",
                             poll_interval_seconds=0.2)
        cp = ControlPlane(backend.factory("bench"), backend, topology=backend.topology)
        scaler = Autoscaler(cp, backend, sync_seconds=args.sync_seconds)
        changes: list[ScaleChange] = []
        scaler.listeners.append(changes.append)
        for spec in replica_changes(service, [], scaler.track(service, policy))[0]:
            cp.submit(spec)
        lock = threading.Lock()
        endpoints: list[str] = []

        def ready() -> list[str]:
            with lock:
                return list(endpoints)

        clients = Clients(ready)
        deadline = time.monotonic() + args.timeout

        def run_until(done: Callable[[], bool], what: str) -> float:
            while not done():
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting for {what}")
                cp.step()
                scaler.step()
                view = scaler.view(SERVICE)
                with lock:
                    endpoints[:] = list(view.endpoints) if view else []
                time.sleep(0.05)
            return time.monotonic()

        def view_is(want: int) -> Callable[[], bool]:
            return lambda: (v := scaler.view(SERVICE)) is not None and \
                v.desired == want and v.ready == want

        try:
            clients.set(args.low)
            run_until(view_is(policy.min_replicas), "the service to settle at its minimum")
            settled = len(changes)
            stepped = time.monotonic()
            clients.set(args.high)
            final = min(args.max_replicas, -(-args.high // int(args.target)))
            first_act = run_until(lambda: len(changes) > settled, "the first scale-up")
            wanted = run_until(lambda: (d := scaler.desired(SERVICE)) is not None
                               and d >= final, f"the autoscaler to want {final}")
            serving = run_until(lambda: (v := scaler.view(SERVICE)) is not None and
                                v.ready >= final, f"{final} replicas serving")
            ups = [c for c in changes[settled:] if c.replicas_to > c.replicas_from]
            clients.set(args.low)
            dropped = time.monotonic()
            mark = len(changes)
            first_down = run_until(lambda: any(c.replicas_to < c.replicas_from
                                               for c in changes[mark:]), "the first scale-down")
            at_min = run_until(view_is(policy.min_replicas), "back to the minimum")
            view = scaler.view(SERVICE)
        finally:
            clients.close()
            for key in list(cp.jobs):
                cp.cancel(key)
            backend.close()
        assert view is not None
    steps = " -> ".join(str(c.replicas_to) for c in ups)
    print(f"autoscaling on Ray ({len(NODES)} nodes x 8 simulated H200), sync "
          f"{args.sync_seconds:g} s, window {args.window:g} s, target {args.target:g} in flight "
          f"per replica, requests of {args.request_seconds:g} s, {args.low} -> {args.high} -> "
          f"{args.low} clients")
    print(f"  load step: first scale-up after {first_act - stepped:.1f} s, wants {final} after "
          f"{wanted - stepped:.1f} s (1 -> {steps}), {final} serving after "
          f"{serving - stepped:.1f} s")
    print(f"  load drop: first scale-down after {first_down - dropped:.1f} s (window "
          f"{args.window:g} s), back to 1 after {at_min - dropped:.1f} s")
    mean = view.latency_seconds_total / view.requests_total if view.requests_total else 0.0
    print(f"  {view.requests_total:.0f} requests answered, mean latency {mean:.2f} s, "
          f"{clients.errors} client errors; scale changes: {len(changes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
