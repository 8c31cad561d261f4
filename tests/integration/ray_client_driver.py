"""The operator's Ray backend as a Ray Client driver, in a process of its own.

    python -m tests.integration.ray_client_driver ray://HOST:PORT CHECKPOINT_ROOT

Connects ``RayBackend`` through ``ray://`` (as ``deploy/ray/operator`` runs the operator),
prints the inventory, runs a 2-worker gang of ``ray_programs:where`` through a
``ControlPlane`` and prints its final phase, as one JSON line. A process of its own because
a test process may already be connected to another Ray cluster (``ray.init`` is per process).
"""

from __future__ import annotations

import json
import sys
import time

from aifactory.controller.backends.ray.backend import RayBackend
from aifactory.controller.core.spec import JobSpec, Runtime
from aifactory.controller.runtime.controlplane import ControlPlane


def connect(address: str, checkpoint_root: str, attempts: int = 3) -> RayBackend:
    """RayBackend over ``address``; a refused session is tried again (the Ray Client
    server's per-session driver can fail to start on a machine this loaded, as a pod
    restart would retry it on a cluster)."""
    for attempt in range(1, attempts + 1):
        try:
            return RayBackend(address=address, checkpoint_root=checkpoint_root,
                              cpus_per_worker=0.1, start_timeout_seconds=60)
        except ConnectionError as exc:
            print(f"connect attempt {attempt}: {type(exc).__name__}: {exc}", file=sys.stderr)
            if attempt == attempts:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def main(address: str, checkpoint_root: str, timeout_seconds: float = 120.0) -> None:
    backend = connect(address, checkpoint_root)
    try:
        topology = backend.factory("it")
        plane = ControlPlane(topology, backend, "aifactory", topology=backend.topology)
        spec = JobSpec(name="through-client", workers=2, gpus_per_worker=1, namespace="it",
                       runtime=Runtime(entrypoint="tests.integration.ray_programs:where"))
        plane.submit(spec)
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline and not plane.jobs[spec.key].done:
            plane.step()
            time.sleep(0.1)
        print(json.dumps({"nodes": [[n.name, n.gpus] for n in topology.nodes],
                          "phase": plane.jobs[spec.key].phase}), flush=True)
    finally:
        backend.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
