"""``aifactory operator --backend ray``: the Ray nodes' topology comes from their Nodes.

The session's Ray cluster (``ray_env``) labels its raylets with racks of its own; the Node
objects on the API server put them in other racks, and the Node labels must win. Each Ray
node names its Node with ``aifactory.io/node``::

    Ray labels (ignored)           Node objects (the truth)
    rack b0-r0: r0-00, r0-01       rack k-east: n-b0-r0-00, n-b0-r1-00
    rack b0-r1: r1-00, r1-01       rack k-west: n-b0-r0-01, k-gpu-spare (no Ray node)
                                   n-b0-r1-01: no Node (left out, until the test adds it)

A rack-required gang of two 8-GPU workers fits only k-east, which spans two Ray racks. The
Ray node without a Node and the GPU Node without a Ray node are left out and reported (a
Warning Event on the Node, the ``aifactory_ray_nodes_unmatched`` gauge, a log line). Then the
Nodes change under the running operator: the missing Node appears and another is relabelled
into k-east, and a three-worker rack gang lands on the three k-east nodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    delete_all,
    ensure_namespace,
    gpu_node,
    object_events,
    only_nodes,
    strip_finalizers,
    training_job,
    wait_for,
)

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration

NS = "ray-topology"
PROGRAM = "tests.integration.ray_programs:where"
RACKS = {"n-b0-r0-00": "k-east", "n-b0-r1-00": "k-east", "n-b0-r0-01": "k-west",
         "k-gpu-spare": "k-west"}
SPARE = "k-gpu-spare"  # a GPU Node no Ray node runs on
UNNAMED = "n-b0-r1-01"  # a Ray node whose Node does not exist (at first)


def _job(name: str, workers: int) -> dict[str, Any]:
    return training_job(name, NS, workers=workers, gpus_per_worker=8,
                        topology={"required": "rack"},
                        runtime={"entrypoint": PROGRAM,
                                 "env": [{"name": "HOLD_SECONDS", "value": "1"}]})


def _ours() -> list[str]:
    from tests.integration.ray_env import leftovers

    return [x for x in leftovers() if f"aifactory/{NS}/" in x]


def _remove_ours() -> None:
    """Whatever a failed test left on the session's Ray cluster goes (others share it)."""
    from ray.util.placement_group import placement_group_table, remove_placement_group

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if str(actor.get("name", "")).startswith(f"aifactory/{NS}/"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    for info in placement_group_table().values():
        if str(info.get("name", "")).startswith(f"aifactory/{NS}/") and \
                info.get("state") != "REMOVED":
            remove_placement_group(ray.util.get_placement_group(info["name"]))


def _unmatched(operator: OperatorProcess) -> dict[str, float]:
    return {labels["reason"]: value
            for labels, value in operator.samples("aifactory_ray_nodes_unmatched")}


def _ran_on(root: Path, name: str, workers: int) -> list[str] | None:
    """The Ray node ids the job's workers ran on (``ray_programs.where`` writes them)."""
    files = [root / NS / name / f"where-0-{rank}.json" for rank in range(workers)]
    if not all(f.exists() for f in files):
        return None
    return [json.loads(f.read_text())["node_id"] for f in files]


@pytest.fixture
def operator(aifactory_installed: KubeTestEnv, ray_cluster: Any,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    env = aifactory_installed
    only_nodes(env, [])
    env.apply([gpu_node(name, rack) for name, rack in RACKS.items()])
    ensure_namespace(env, NS)
    proc = OperatorProcess(
        env, tmp_path, ["--backend=ray", f"--ray-address={ray_cluster.address}",
                        "--ray-cpus-per-worker=0.1", "--status-interval=1"],
        environ={"AIFACTORY_CHECKPOINT_ROOT": str(tmp_path / "checkpoints")})
    try:
        yield proc
    finally:
        try:
            if proc.alive():
                env.kubectl("delete", "trainingjobs", "--all", f"-n={NS}", "--timeout=30s",
                            check=False)
            proc.stop()
            delete_all(env, NS)
            strip_finalizers(env, NS)
            try:
                wait_for(lambda: not _ours(), 15, "our gangs to go", interval=0.2)
            finally:
                _remove_ours()
        finally:
            env.kubectl("delete", "node", *RACKS, UNNAMED, "--ignore-not-found", check=False)


def test_node_labels_give_the_ray_nodes_their_racks_and_the_unmatched_are_reported(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, tmp_path: Path) -> None:
    env = aifactory_installed
    root = tmp_path / "checkpoints"
    ids = {str(n["Labels"]["aifactory.io/node"]): str(n["NodeID"]) for n in ray.nodes()
           if n.get("Alive") and n["Labels"].get("aifactory.io/node")}
    jobs = Watch(env, "trainingjobs")
    try:
        operator.start()
        log = operator.log_tail(300)
        assert "the Ray nodes' topology comes from the Node each names" in log
        assert "inventory: 1 blocks > 2 racks > 3 nodes, 24 GPUs" in log

        # 1. What could not be joined is left out and reported: gauge, Event, log line.
        wait_for(lambda: _unmatched(operator) == {"no-node-label": 0, "no-node": 1,
                                                  "duplicate": 0, "no-ray-node": 1},
                 20, "the unmatched gauge", interval=0.3)
        events = wait_for(lambda: object_events(env, "default", SPARE), 20,
                          f"an Event on Node {SPARE}", interval=0.3)
        assert events == [f"RayNodeUnmatched: Kubernetes node {SPARE} has GPUs but no live "
                          f"Ray node with GPUs names it (aifactory.io/node={SPARE}); is a "
                          "Ray worker running there?"]
        log = operator.log_tail(300)
        assert f"names Kubernetes node {UNNAMED} (aifactory.io/node), which does not " \
               "exist" in log
        assert log.count("which does not exist") == 1  # once per change, not every poll

        # 2. A rack gang lands in k-east, which the Ray labels would split in two racks.
        env.apply(_job("east", workers=2))
        done = jobs.wait_phase(NS, "east", ["Succeeded"], timeout=60)
        chosen = sorted(w["node"] for w in done["placement"]["workers"])
        assert chosen == ["n-b0-r0-00", "n-b0-r1-00"]
        ran = wait_for(lambda: _ran_on(root, "east", 2), 10, "the workers' records")
        assert sorted(ran) == sorted(ids[n] for n in chosen)

        # 3. The Nodes change; the inventory follows. The missing Node appears (k-west),
        # then n-b0-r0-01 is relabelled into k-east.
        env.apply(gpu_node(UNNAMED, "k-west"))
        wait_for(lambda: "4 nodes, 32 GPUs" in operator.log_tail(100), 20,
                 "the inventory to take in the new Node")
        wait_for(lambda: _unmatched(operator).get("no-node") == 0, 20,
                 "the no-node count to drop", interval=0.3)
        env.kubectl("label", "node", "n-b0-r0-01", "aifactory.io/rack=k-east", "--overwrite")
        env.apply(_job("east3", workers=3))
        done = jobs.wait_phase(NS, "east3", ["Succeeded"], timeout=60)
        assert sorted(w["node"] for w in done["placement"]["workers"]) == [
            "n-b0-r0-00", "n-b0-r0-01", "n-b0-r1-00"]
        ran = wait_for(lambda: _ran_on(root, "east3", 3), 10, "the workers' records")
        assert sorted(ran) == sorted(ids[n] for n in ("n-b0-r0-00", "n-b0-r0-01",
                                                      "n-b0-r1-00"))
    finally:
        jobs.close()
