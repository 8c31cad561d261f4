"""Kill the operator while jobs run and wait; after it comes back, every job is accounted for
exactly once: none lost, none restarted, none placed twice.

The inventory here is the cluster's Node objects (``--inventory nodes``), created through
the API as kubelets would register them: two nodes with allocatable ``nvidia.com/gpu``, two
kind-style nodes with only a ``nvidia.com/gpu.count`` label, and a CPU node that must be
ignored::

    block b1
    ├── rack r1: gpu-r1-a (8, allocatable), gpu-r1-b (8, allocatable)
    └── rack r2: gpu-r2-a (8, label),       gpu-r2-b (8, label)
    cpu-0 (no GPUs)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    ensure_namespace,
    gpu_slots,
    training_job,
    wait_for,
)

pytestmark = pytest.mark.integration

NS = "restart"


def _node(name: str, rack: str | None, allocatable: int | None = None,
          count_label: int | None = None) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name}
    if rack:
        labels |= {"aifactory.io/rack": rack, "aifactory.io/block": "b1",
                   "nvidia.com/gpu.product": "NVIDIA-H200"}
    if count_label:
        labels["nvidia.com/gpu.count"] = str(count_label)
    node: dict[str, Any] = {"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": name, "labels": labels}}
    if allocatable:
        node["status"] = {"capacity": {"nvidia.com/gpu": str(allocatable)},
                          "allocatable": {"nvidia.com/gpu": str(allocatable)}}
    return node


NODES = [_node("gpu-r1-a", "r1", allocatable=8), _node("gpu-r1-b", "r1", allocatable=8),
         _node("gpu-r2-a", "r2", count_label=8), _node("gpu-r2-b", "r2", count_label=8),
         _node("cpu-0", None)]


@pytest.fixture(scope="module")
def nodes(aifactory_installed: KubeTestEnv) -> Iterator[KubeTestEnv]:
    env = aifactory_installed
    env.apply(NODES)
    ensure_namespace(env, NS)
    yield env
    env.kubectl("delete", "node", *(n["metadata"]["name"] for n in NODES), check=False)


def _service(name: str, replicas: int) -> dict[str, Any]:
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"model": "m", "gpusPerReplica": 2, "minReplicas": 1, "maxReplicas": 4,
                     "replicas": replicas, "topology": {"spreadAcross": "rack"}}}


def _reasons(env: KubeTestEnv, name: str) -> list[str]:
    out = env.kubectl("get", "events", f"-n={NS}", "-o", "json",
                      f"--field-selector=involvedObject.name={name}").stdout
    return [e["reason"] for e in json.loads(out)["items"]]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def test_operator_restart_loses_restarts_and_double_places_nothing(
        nodes: KubeTestEnv, tmp_path: Any) -> None:
    env = nodes
    operator = OperatorProcess(env, tmp_path, ["--inventory=nodes", "--status-interval=1"])
    jobs, services = Watch(env, "trainingjobs"), Watch(env, "inferenceservices")
    try:
        operator.start()
        env.apply([training_job("rack-gang", NS, workers=2, gpus_per_worker=8,
                                topology={"required": "rack"}, expectedRuntimeSeconds=3600),
                   training_job("single", NS, workers=1, gpus_per_worker=8,
                                expectedRuntimeSeconds=3600),
                   _service("serve", 2)])
        jobs.wait_phase(NS, "rack-gang", ["Running"])
        jobs.wait_phase(NS, "single", ["Running"])
        wait_for(lambda: services.status(NS, "serve").get("replicas") == 2, 15,
                 "both replicas placed")
        # 28 of 32 GPUs are taken: these two wait.
        env.apply([training_job("waits-gang", NS, workers=2, gpus_per_worker=8),
                   training_job("waits-then-deleted", NS, workers=1, gpus_per_worker=8)])
        for name in ("waits-gang", "waits-then-deleted"):
            def waits(n: str = name) -> bool:
                return "free" in jobs.status(NS, n).get("message", "")

            wait_for(waits, 10, f"{name} to wait with a reason")
        wait_for(lambda: jobs.status(NS, "rack-gang").get("energyJoules", 0) > 0, 10,
                 "energy to be reported")
        before = {n: jobs.status(NS, n) for n in ("rack-gang", "single")}
        before_serve = services.status(NS, "serve")

        operator.kill()
        # While it is down: one job arrives, one waiting job is deleted (the finalizer
        # holds it until the operator returns).
        env.apply(training_job("arrived-while-down", NS, workers=1, gpus_per_worker=2))
        env.kubectl("delete", "trainingjob", "waits-then-deleted", f"-n={NS}", "--wait=false")
        operator.start()

        jobs.wait_phase(NS, "arrived-while-down", ["Running"])
        wait_for(lambda: env.kubectl("get", "trainingjob", "waits-then-deleted", f"-n={NS}",
                                     check=False).returncode != 0, 15,
                 "the job deleted while the operator was down to go")
        recovery = wait_for(lambda: "recovery:" in operator.log_tail(400) and
                            operator.log_tail(400), 10, "the recovery log line")
        # requeued: the two that waited and the one that arrived while it was down.
        assert "adopted 4 running gangs at their recorded placements, requeued 3" in recovery
        for name, old in before.items():
            now = jobs.wait_phase(NS, name, ["Running"])
            assert now["placement"]["workers"] == old["placement"]["workers"], name
            assert now["startedAt"] == old["startedAt"], name
            assert now["restarts"] == 0 and now["preemptions"] == 0, name
            assert now["energyJoules"] >= old["energyJoules"], name
            assert _reasons(env, name).count("Admitted") == 1, name
        serve = services.status(NS, "serve")
        assert serve["replicas"] == 2
        assert serve["placement"]["workers"] == before_serve["placement"]["workers"]
        assert jobs.phase(NS, "waits-gang") == "Queued"
        reasons = {r for n in ("rack-gang", "single", "serve") for r in _reasons(env, n)}
        assert not reasons & {"Restarting", "PlacementConflict", "Preempted"}, reasons

        running = [jobs.status(NS, n) for n in ("rack-gang", "single", "arrived-while-down")]
        running.append(services.status(NS, "serve"))
        held = gpu_slots(running)
        assert len(held) == len(set(held)) == 16 + 8 + 4 + 2

        def settled() -> str | None:
            # The metrics thread reads a snapshot refreshed every status interval, so one
            # scrape can still count the job deleted while the operator was down: wait for
            # a scrape that shows the settled state, and check that same scrape.
            text = operator.metrics()
            ok = (_metric(text, 'aifactory_operator_jobs{phase="Running"}') == 5
                  and _metric(text, 'aifactory_operator_jobs{phase="Queued"}') == 1)
            return text if ok else None

        metrics = wait_for(settled, 10, "the operator's own count of jobs")
        # rack-gang, single, 2 replicas, arrived-while-down running; waits-gang queued.
        assert _metric(metrics, 'aifactory_operator_jobs{phase="Queued"}') == 1
        assert _metric(metrics, 'aifactory_operator_gpus{state="allocated"}') == 30

        # The adopted gang's GPUs really are held, and really are released.
        env.kubectl("delete", "trainingjob", "rack-gang", f"-n={NS}", "--timeout=20s")
        placed = jobs.wait_phase(NS, "waits-gang", ["Running"])
        old_nodes = {w["node"] for w in before["rack-gang"]["placement"]["workers"]}
        assert {w["node"] for w in placed["placement"]["workers"]} == old_nodes
    finally:
        if operator.alive():
            env.kubectl("delete", "trainingjobs,inferenceservices", "--all", f"-n={NS}",
                        "--timeout=30s", check=False)
        operator.stop()
        jobs.close()
        services.close()
