"""Several nodes of one gang fail at once: every lost worker moves in one repair.

    rack multi-r0: multi-r0-a .. multi-r0-f   (6 nodes x 8 GPUs)

A rack-required gang of 4 x 8 runs on four of them; two of those nodes are deleted in one
command (as when a switch or a power feed takes several hosts). Failures that arrive within
a second are acted on together: both workers move to the two spare nodes of the same rack in
one hot swap, the other two keep their nodes, and the gang restarts once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    gpu_node,
    operator_on_nodes,
    training_job,
    wait_for,
)
from tests.integration.test_operator_ha import no_gpu_held_twice

pytestmark = pytest.mark.integration

NS = "multi-swap"
NAMES = [f"multi-r0-{c}" for c in "abcdef"]



@pytest.fixture(scope="module")
def operator(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[OperatorProcess]:
    with operator_on_nodes(aifactory_installed, tmp_path_factory.mktemp("multi"), NS,
                           [gpu_node(n, "multi-r0") for n in NAMES]) as proc:
        yield proc


def test_two_failed_nodes_of_a_gang_are_swapped_in_one_repair(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> None:
    env = aifactory_installed
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    try:
        env.apply(training_job("wide", NS, workers=4, gpus_per_worker=8,
                               topology={"required": "rack"}, checkpointIntervalSeconds=60,
                               expectedRuntimeSeconds=3600))
        status = watch.wait_phase(NS, "wide", ["Running"], timeout=30)
        before = [w["node"] for w in status["placement"]["workers"]]
        assert len(set(before)) == 4
        lost, kept = before[:2], before[2:]
        started = time.monotonic()
        env.kubectl("delete", "node", *lost)
        wait_for(lambda: watch.status(NS, "wide").get("restarts") == 1
                 and not set(lost) & {w["node"] for w in
                                      watch.status(NS, "wide")["placement"]["workers"]},
                 30, "both lost workers to move")
        swap_seconds = time.monotonic() - started
        after = [w["node"] for w in watch.status(NS, "wide")["placement"]["workers"]]
        assert set(kept) <= set(after) and len(set(after)) == 4
        assert set(after) <= set(NAMES) - set(lost)
        assert watch.phase(NS, "wide") == "Running"
        wait_for(lambda: "aifactory_operator_hot_swaps_total 1.0" in operator.metrics(), 15,
                 "one hot swap counted")
        assert watch.status(NS, "wide").get("restarts") == 1  # one repair for both
        assert watch.violations == [], watch.violations[:3]
        print(f"\nhot swap of 2 workers: {swap_seconds:.1f} s from the deletion to the "
              f"repaired placement in status (1 s of it batching failures)")
    finally:
        watch.close()
