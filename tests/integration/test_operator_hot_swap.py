"""Hot swap on a real API server: a gang that loses a node moves only that worker.

    block b0
    ├── rack swap-r0: swap-r0-a, swap-r0-b, swap-r0-c   (8 GPUs each)
    └── rack swap-r1: swap-r1-a, swap-r1-b

Two rack-required gangs of 2 x 8: the tightest rack first (swap-r1, full), then swap-r0,
which keeps one spare node. A failed node under the swap-r0 gang is repaired in place: its
worker moves to the spare, the other worker keeps its node, the run restarts from its
checkpoint. A failed node under the swap-r1 gang finds no spare in its rack: the gang is
requeued from its checkpoint with that reason, and never leaves its required rack.
"""

from __future__ import annotations

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

NS = "hot-swap"
NAMES = ["swap-r0-a", "swap-r0-b", "swap-r0-c", "swap-r1-a", "swap-r1-b"]
JOINING = ["swap-r2-a", "swap-r2-b"]  # added while the operator runs



@pytest.fixture(scope="module")
def operator(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[OperatorProcess]:
    with operator_on_nodes(aifactory_installed, tmp_path_factory.mktemp("swap"), NS,
                           [gpu_node(n, n.rsplit("-", 1)[0]) for n in NAMES],
                           also_delete=JOINING) as proc:
        yield proc


def _nodes(watch: Watch, name: str) -> list[str]:
    workers = (watch.status(NS, name).get("placement") or {}).get("workers") or []
    return [str(w["node"]) for w in workers]



def test_a_lost_worker_moves_to_a_spare_in_its_rack_or_the_gang_requeues(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> None:
    env = aifactory_installed
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    try:
        for name in ("tight", "roomy"):
            env.apply(training_job(name, NS, workers=2, gpus_per_worker=8,
                                   topology={"required": "rack"},
                                   checkpointIntervalSeconds=60,
                                   expectedRuntimeSeconds=3600))
            watch.wait_phase(NS, name, ["Running"], timeout=30)
        assert sorted(_nodes(watch, "tight")) == ["swap-r1-a", "swap-r1-b"]
        roomy = _nodes(watch, "roomy")
        assert {n.rsplit("-", 1)[0] for n in roomy} == {"swap-r0"}
        failing, surviving = roomy

        env.kubectl("taint", "node", failing, "nvidia.com/gpu.health=unhealthy:NoExecute")
        wait_for(lambda: watch.status(NS, "roomy").get("restarts") == 1
                 and failing not in _nodes(watch, "roomy"), 30, "the hot swap")
        after = _nodes(watch, "roomy")
        assert surviving in after and len(after) == 2  # the survivor kept its node
        assert {n.rsplit("-", 1)[0] for n in after} == {"swap-r0"}
        assert watch.phase(NS, "roomy") == "Running"
        assert any(e.startswith("Repaired:") and "hot swap moved 1 worker(s)" in e
                   for e in object_events(env, NS, "roomy")), object_events(env, NS, "roomy")

        env.kubectl("delete", "node", "swap-r1-a")
        wait_for(lambda: watch.status(NS, "tight").get("restarts") == 1, 30,
                 "the gang without a spare to be requeued")
        assert any("no spare for 1 worker(s) in rack swap-r1" in e
                   for e in object_events(env, NS, "tight")), object_events(env, NS, "tight")
        assert watch.phase(NS, "tight") == "Queued"  # its rack cannot hold it now
        wait_for(lambda: "aifactory_operator_hot_swaps_total 1.0" in operator.metrics(), 15,
                 "the hot swap to be counted (the snapshot refreshes every second)")
        assert watch.violations == [], watch.violations[:3]
    finally:
        watch.close()


def test_nodes_that_join_take_work_and_running_gangs_stay_where_they_run(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> None:
    """After the test above, the rack-required gang ``tight`` waits (its rack lost a node)
    and ``roomy`` runs. A new rack of two Nodes joins: the inventory grows, ``tight`` runs
    there, and ``roomy`` keeps its GPUs and its run (it is carried over, not relaunched)."""
    env = aifactory_installed
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    try:
        watch.wait_phase(NS, "tight", ["Queued"], timeout=10)
        roomy_before = watch.status(NS, "roomy")
        env.apply([gpu_node(n, n.rsplit("-", 1)[0]) for n in JOINING])
        status = watch.wait_phase(NS, "tight", ["Running"], timeout=30)
        assert sorted(w["node"] for w in status["placement"]["workers"]) == JOINING
        roomy = watch.status(NS, "roomy")
        assert roomy["phase"] == "Running"
        assert roomy["placement"]["workers"] == roomy_before["placement"]["workers"]
        assert roomy.get("startedAt") == roomy_before.get("startedAt")
        assert roomy.get("restarts") == roomy_before.get("restarts")
        grown = [line for line in operator.log_tail(300).splitlines()
                 if "inventory from Node objects changed (joined:" in line]
        assert all(any(n in line for line in grown) for n in JOINING), grown
        assert watch.violations == [], watch.violations[:3]
    finally:
        watch.close()
