"""Live node lifecycle on a real API server: the operator watches Node objects.

Six Node objects of 8 GPUs in three racks are the inventory (``--inventory=nodes``, a 3 s
NotReady grace so the test stays short). No kubelet runs: the test plays the node lifecycle
itself, deleting, cordoning, tainting and patching ``status.conditions`` as Kubernetes
would, and checks what a user sees: phases, restarts, placements and Events. A watch checks
on every event that no GPU is shown held twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    gpu_node,
    object_events,
    operator_on_nodes,
    training_job,
    wait_for,
)
from tests.integration.test_operator_ha import no_gpu_held_twice

pytestmark = pytest.mark.integration

NS = "node-lifecycle"
NAMES = [f"life-r{r}-{s}" for r in range(3) for s in "ab"]



@pytest.fixture(scope="module")
def operator(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[OperatorProcess]:
    with operator_on_nodes(aifactory_installed, tmp_path_factory.mktemp("nodes"), NS,
                           [gpu_node(n, n.rsplit("-", 1)[0].removeprefix("life-"),
                                     ready=True) for n in NAMES],
                           ["--node-grace-seconds=3"]) as proc:
        yield proc


def _set_ready(env: KubeTestEnv, name: str, status: str) -> None:
    patch = {"status": {"conditions": [{"type": "Ready", "status": status}]}}
    env.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p",
                json.dumps(patch))


def _node_of(watch: Watch, name: str) -> str:
    workers = (watch.status(NS, name).get("placement") or {}).get("workers") or []
    return str(workers[0]["node"]) if workers else ""


def _restarted_off(watch: Watch, name: str, bad: set[str]) -> bool:
    status = watch.status(NS, name)
    return status.get("phase") == "Running" and status.get("restarts") == 1 and \
        _node_of(watch, name) not in bad



def test_failed_nodes_fail_their_gangs_and_cordoned_nodes_keep_theirs(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> None:
    env = aifactory_installed
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    jobs = ["deleted", "cordoned", "blip", "notready", "tainted"]
    where: dict[str, str] = {}
    try:
        for name in jobs:
            env.apply(training_job(name, NS, workers=1, gpus_per_worker=8,
                                   expectedRuntimeSeconds=3600))
        for name in jobs:
            watch.wait_phase(NS, name, ["Running"], timeout=30)
        where.update({name: _node_of(watch, name) for name in jobs})
        assert len(set(where.values())) == 5  # one whole node each; one node is free

        # A cordon: nothing new lands there, and what runs there keeps running.
        env.kubectl("cordon", where["cordoned"])
        # A NotReady blip shorter than the 3 s grace changes nothing.
        _set_ready(env, where["blip"], "False")
        time.sleep(0.5)
        _set_ready(env, where["blip"], "True")
        # Then three failures: a deleted node, NotReady past the grace, a GPU health taint.
        env.kubectl("delete", "node", where["deleted"])
        _set_ready(env, where["notready"], "False")
        env.kubectl("taint", "node", where["tainted"],
                    "nvidia.com/gpu.health=unhealthy:NoExecute")
        bad = {where[n] for n in ("deleted", "notready", "tainted", "cordoned")}
        # One free node is left for three failed gangs: one restarts there, two wait.
        wait_for(lambda: sum(_restarted_off(watch, n, bad) for n in
                             ("deleted", "notready", "tainted")) == 1, 60,
                 "one failed gang to restart on the free node")
        for name in ("deleted", "notready", "tainted"):
            wait_for(lambda n=name: watch.status(NS, n).get("restarts") == 1, 30,
                     f"{name} to count its restart")
            assert any("restart 1 of 3 from the last checkpoint" in e
                       for e in object_events(env, NS, name)), object_events(env, NS, name)
        assert any("was deleted" in e for e in object_events(env, NS, "deleted"))
        assert any("has not been Ready" in e for e in object_events(env, NS, "notready"))
        assert any("nvidia.com/gpu.health:NoExecute" in e
                   for e in object_events(env, NS, "tainted"))
        for name in ("cordoned", "blip"):
            status = watch.status(NS, name)
            assert status["phase"] == "Running" and status.get("restarts", 0) == 0
            assert _node_of(watch, name) == where[name]

        # A new job never lands on the cordoned or failed nodes; the recovered one takes it.
        env.apply(training_job("newcomer", NS, workers=1, gpus_per_worker=8,
                               expectedRuntimeSeconds=3600))
        time.sleep(2)
        assert _node_of(watch, "newcomer") not in bad
        _set_ready(env, where["notready"], "True")
        env.kubectl("taint", "node", where["tainted"], "nvidia.com/gpu.health-")
        # Two nodes came back for three waiting 8-GPU jobs: two of them run there now.
        four = ("deleted", "notready", "tainted", "newcomer")
        wait_for(lambda: sum(watch.phase(NS, n) == "Running" for n in four) == 3, 60,
                 "the waiting gangs to run on the recovered nodes")
        placed = {_node_of(watch, n) for n in four if watch.phase(NS, n) == "Running"}
        assert placed <= set(NAMES) - {where["deleted"], where["cordoned"], where["blip"]}
        wait_for(lambda: "aifactory_operator_node_failures_total 3.0" in operator.metrics(),
                 15, "the node failures to be counted")
        assert f'node="{where["deleted"]}"' not in operator.metrics()  # its series went
        assert watch.violations == [], watch.violations[:3]
        print(f"\ninvariant checked on {watch.events} watch events: 0 violations")
    finally:
        watch.close()
        if "cordoned" in where:
            env.kubectl("uncordon", where["cordoned"], check=False)
