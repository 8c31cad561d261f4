"""``aifactory operator --backend ray`` on a real API server and a real Ray cluster.

The operator runs as a subprocess under its ServiceAccount and connects to the session's
Ray cluster (``ray_env``): a head without GPUs and four raylets with 8 GPUs each::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01

Its inventory is those Ray nodes. Workers run ``tests/integration/ray_programs.py:where``,
which writes the Ray node it runs on into its checkpoint directory, so the test checks from
outside that every worker ran on the node the scheduler chose. Then the operator is killed
(SIGKILL) while a gang runs and started again: the gang must be adopted (same placement
group, same worker processes, no second attempt), not launched twice.
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
    strip_finalizers,
    training_job,
    wait_for,
)

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration

NS = "on-ray"
PROGRAM = "tests.integration.ray_programs:where"


def _job(name: str, workers: int, gpus: int, hold_seconds: float) -> dict[str, Any]:
    return training_job(name, NS, workers=workers, gpus_per_worker=gpus,
                        runtime={"entrypoint": PROGRAM,
                                 "env": [{"name": "HOLD_SECONDS",
                                          "value": f"{hold_seconds:g}"}]})


def _ours(key: str) -> list[dict[str, Any]]:
    """Placement groups of job ``key`` that Ray has not removed."""
    from ray.util.placement_group import placement_group_table

    return [v for v in placement_group_table().values()
            if v.get("name") == f"aifactory/{key}" and v.get("state") != "REMOVED"]


def _workers(job: str, world: int) -> list[Any] | None:
    """The job's worker actors as a restarted operator finds them (pooled ones by asking)."""
    from aifactory.controller.backends.ray.pool import GangWorkers

    return GangWorkers("aifactory").of(f"{NS}/{job}", world)


def _leftovers(pool: bool = False) -> list[str]:
    """Groups and workers of this test's jobs still on the cluster (pre-started workers
    running one of them included); ``pool``: any pre-started worker at all (none may
    outlive the operator)."""
    from aifactory.controller.backends.ray.pool import GangWorkers
    from tests.integration.ray_env import leftovers

    busy = GangWorkers("aifactory").jobs()
    return [x for x in leftovers() if f"aifactory/{NS}/" in x or
            (pool and "aifactory/_pool/" in x)] + \
        [f"pooled worker of {job}" for job in busy if job.startswith(f"{NS}/")]


def _where(root: Path, name: str, attempt: int, workers: int) -> list[dict[str, Any]] | None:
    files = [root / NS / name / f"where-{attempt}-{rank}.json" for rank in range(workers)]
    if not all(f.exists() for f in files):
        return None
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture
def operator(aifactory_installed: KubeTestEnv, ray_cluster: Any,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    env = aifactory_installed
    ensure_namespace(env, NS)
    proc = OperatorProcess(
        env, tmp_path, ["--backend=ray", f"--ray-address={ray_cluster.address}",
                        "--ray-cpus-per-worker=0.1", "--status-interval=1",
                        "--autoscale-sync-seconds=1"],
        environ={"AIFACTORY_CHECKPOINT_ROOT": str(tmp_path / "checkpoints")})
    try:
        yield proc
    finally:
        if proc.alive():
            env.kubectl("delete", "trainingjobs,inferenceservices", "--all", f"-n={NS}",
                        "--timeout=30s", check=False)
        proc.stop()
        # Nothing of ours may reach the next tests: objects (held by our finalizer once
        # no operator runs), then gangs.
        delete_all(env, NS)
        strip_finalizers(env, NS)
        try:
            wait_for(lambda: not _leftovers(pool=True), 15, "our gangs and pool to go",
                     interval=0.2)
        finally:
            _remove_leftovers()


def _remove_leftovers() -> None:
    """Whatever a failed test left on the session's cluster goes (the next tests share it)."""
    from ray.util.placement_group import placement_group_table, remove_placement_group

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if str(actor.get("name", "")).startswith((f"aifactory/{NS}/", "aifactory/_pool/")):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
    for info in placement_group_table().values():
        if str(info.get("name", "")).startswith(f"aifactory/{NS}/") and \
                info.get("state") != "REMOVED":
            remove_placement_group(ray.util.get_placement_group(info["name"]))


def test_operator_runs_gangs_on_the_chosen_ray_nodes_and_adopts_them_after_a_crash(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, tmp_path: Path) -> None:
    env = aifactory_installed
    root = tmp_path / "checkpoints"
    ids = {str(n["Labels"].get("aifactory.io/node")): n["NodeID"] for n in ray.nodes()
           if n.get("Alive") and n["Labels"].get("aifactory.io/node")}
    jobs = Watch(env, "trainingjobs")
    try:
        operator.start()
        assert "inventory: 1 blocks > 2 racks > 4 nodes, 32 GPUs" in operator.log_tail(200)

        # 1. A 3-worker gang runs to completion, every worker where the scheduler said.
        env.apply(_job("spread", workers=3, gpus=8, hold_seconds=1))
        done = jobs.wait_phase(NS, "spread", ["Succeeded"], timeout=45)
        chosen = [w["node"] for w in done["placement"]["workers"]]
        seen = _where(root, "spread", 0, 3)
        assert seen is not None and len(set(chosen)) == 3
        assert [s["node_id"] for s in seen] == [ids[node] for node in chosen]
        assert [s["env"]["RANK"] for s in seen] == ["0", "1", "2"]
        assert done["energyJoules"] > 0
        wait_for(lambda: not _ours(f"{NS}/spread"), 10, "the finished gang's group to go")

        # 2. A long gang runs; the operator serves its power and energy.
        env.apply(_job("long", workers=2, gpus=4, hold_seconds=300))
        running = jobs.wait_phase(NS, "long", ["Running"], timeout=30)
        before = wait_for(lambda: _where(root, "long", 0, 2), 20, "both workers to start")
        (group,) = _ours(f"{NS}/long")
        energy = wait_for(lambda: operator.samples("aifactory_job_energy_joules_total",
                                                   job_namespace=NS, job_name="long"), 10,
                          "the long job's energy counter")
        assert energy[0][1] > 0
        power = operator.samples("aifactory_gpu_power_watts", job_namespace=NS,
                                 job_name="long")
        held = sorted((w["node"], str(g)) for w in running["placement"]["workers"]
                      for g in w["gpus"])
        assert sorted((labels["node"], labels["gpu"]) for labels, _ in power) == held
        (info,) = operator.samples("aifactory_telemetry_source_info", requested="auto")
        assert info[0]["source"] in ("model", "nvml")  # no GPU here: the power model
        assert operator.samples("aifactory_operator_engine_iterations_total")[0][1] > 0

        # 3. The operator dies while the gang runs, and comes back: the gang is adopted.
        operator.kill()
        operator.start()
        recovery = wait_for(lambda: "recovery:" in operator.log_tail(400) and
                            operator.log_tail(400), 15, "the recovery log line")
        assert "adopted 1 running gangs" in recovery and "removed" not in recovery
        after = jobs.wait_phase(NS, "long", ["Running"])
        assert after["placement"]["workers"] == running["placement"]["workers"]
        assert after["startedAt"] == running["startedAt"] and after["restarts"] == 0
        (again,) = _ours(f"{NS}/long")
        assert again["placement_group_id"] == group["placement_group_id"]
        workers = _workers("long", 2)
        assert workers is not None
        reports = ray.get([w.poll.remote() for w in workers])
        assert [r.phase for r in reports] == ["running", "running"]
        assert [r.node_id for r in reports] == [b["node_id"] for b in before]
        assert _where(root, "long", 1, 1) is None and \
            not list((root / NS / "long").glob("where-1-*"))  # never started twice

        # 4. Deleting it stops its workers and removes its group.
        env.kubectl("delete", "trainingjob", "long", f"-n={NS}", "--timeout=30s")
        wait_for(lambda: not _leftovers(), 15, "the deleted gang's group and actors to go")
    finally:
        jobs.close()


def _slices(env: KubeTestEnv, name: str) -> list[tuple[str, int]]:
    """(address, port) of every endpoint the EndpointSlices of Service ``name`` list."""
    out = json.loads(env.kubectl("get", "endpointslices", f"-n={NS}", "-o", "json",
                                 f"-l=kubernetes.io/service-name={name}").stdout)
    return sorted((a, s["ports"][0]["port"]) for s in out["items"]
                  for e in s["endpoints"] for a in e["addresses"])


def test_operator_autoscales_a_service_on_ray_and_routes_a_kubernetes_service_to_it(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> None:
    """Replicas report their requests in flight through the operator: three slow requests
    on one replica scale it to three (1 -> 2 -> 3), each serving on its own port; a
    selector-less Service ``chat`` and its EndpointSlices list exactly the ready replicas,
    follow the scale-down, and go with the InferenceService."""
    import threading
    import urllib.request
    from urllib.parse import urlsplit

    env = aifactory_installed
    services = Watch(env, "inferenceservices")
    try:
        operator.start()
        env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
                   "metadata": {"name": "chat", "namespace": NS},
                   "spec": {"model": "m", "gpusPerReplica": 1, "minReplicas": 1,
                            "maxReplicas": 3, "replicas": 1,
                            "autoscaling": {"targetInFlightRequests": 1,
                                            "scaleDownStabilizationSeconds": 0},
                            "runtime": {"entrypoint": "tests.integration.ray_programs:"
                                                      "slow_echo",
                                        "env": [{"name": "DELAY_SECONDS", "value": "6"}]}}})
        first = wait_for(lambda: (s := services.status(NS, "chat")).get("endpoints") and s,
                         60, "the first replica serving")
        (endpoint,) = first["endpoints"]
        got = wait_for(lambda: (r := env.kubectl("get", "service", "chat", f"-n={NS}", "-o",
                                                 "json", check=False)).returncode == 0 and r,
                       15, f"the Service chat: {operator.log_tail(20)}")
        svc = json.loads(got.stdout)
        assert "selector" not in svc["spec"] and svc["spec"]["ports"][0]["port"] == 80
        assert svc["metadata"]["ownerReferences"][0]["kind"] == "InferenceService"
        wait_for(lambda: len(_slices(env, "chat")) == 1, 15, "one endpoint in the slices")
        answers: list[bytes] = []

        def ask(i: int) -> None:
            req = urllib.request.Request(endpoint, data=f"q{i}".encode(), method="POST")
            with urllib.request.urlopen(req, timeout=30) as resp:
                answers.append(resp.read())

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        scaled = wait_for(lambda: (s := services.status(NS, "chat")).get(
            "readyReplicas") == 3 and len(s.get("endpoints") or []) == 3 and s, 60,
            "three replicas serving")
        assert scaled["desiredReplicas"] == 3 and "scale up" in scaled["scaling"]
        routed = wait_for(lambda: len(r := _slices(env, "chat")) == 3 and r, 15,
                          "three endpoints in the slices")
        assert sorted(f"http://{a}:{p}" for a, p in routed) == sorted(scaled["endpoints"])
        for t in threads:
            t.join()
        assert sorted(answers) == [b"rank0:q0", b"rank0:q1", b"rank0:q2"]
        # Load gone (no window): back to one replica, and to one endpoint in the slices.
        down = wait_for(lambda: (s := services.status(NS, "chat")).get(
            "desiredReplicas") == 1 and s.get("readyReplicas") == 1 and s, 60,
            "back to one replica")
        expected = sorted((str(u.hostname), int(u.port or 0))
                          for u in map(urlsplit, down["endpoints"]))
        wait_for(lambda: _slices(env, "chat") == expected, 15,
                 "the slices to follow the scale-down")
        env.kubectl("delete", "inferenceservice", "chat", f"-n={NS}", "--timeout=30s")
        wait_for(lambda: env.kubectl("get", "service", "chat", f"-n={NS}",
                                     check=False).returncode != 0, 15, "the Service to go")
        assert _slices(env, "chat") == []
    finally:
        services.close()
