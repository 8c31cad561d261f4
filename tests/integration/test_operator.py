"""The operator on a real API server, under its own ServiceAccount and RBAC.

One ``aifactory operator --backend sim`` subprocess serves the module, on a 64-GPU simulated
factory (``data/factory-64.yaml``)::

    factory
    ├── b0: b0-r0 (2 nodes x 8 GPUs), b0-r1 (2 x 8)
    └── b1: b1-r0 (2 x 8),            b1-r1 (2 x 8)

Each test works in its own namespace and deletes its jobs at the end (the operator releases
the finalizers), so the next test finds the factory empty. Assertions read what users read:
``status``, ``kubectl get`` columns, ``kubectl describe`` Events.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
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

FACTORY = Path(__file__).parent / "data" / "factory-64.yaml"
GPUS = 64
_namespaces = itertools.count()


@pytest.fixture(scope="module")
def operator(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(aifactory_installed, tmp_path_factory.mktemp("operator"),
                           [f"--cluster={FACTORY}", "--inventory=factory",
                            "--status-interval=1"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def jobs(aifactory_installed: KubeTestEnv) -> Iterator[Watch]:
    watch = Watch(aifactory_installed, "trainingjobs")
    yield watch
    watch.close()


@pytest.fixture(scope="module")
def services(aifactory_installed: KubeTestEnv) -> Iterator[Watch]:
    watch = Watch(aifactory_installed, "inferenceservices")
    yield watch
    watch.close()


@pytest.fixture
def ns(aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> Iterator[str]:
    """A fresh namespace; its jobs are deleted (and gone) afterwards."""
    env = aifactory_installed
    name = f"op-{next(_namespaces)}"
    ensure_namespace(env, name)
    yield name
    env.kubectl("delete", "trainingjobs,inferenceservices", "--all", f"-n={name}",
                "--timeout=30s")
    assert operator.alive(), operator.log_tail()


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def _table(env: KubeTestEnv, *args: str) -> list[dict[str, str]]:
    """``kubectl get`` output as rows keyed by column header."""
    lines = env.kubectl("get", *args).stdout.strip().splitlines()
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", line.strip()), strict=False))
            for line in lines[1:]]


def _events(env: KubeTestEnv, ns: str, name: str) -> list[dict[str, Any]]:
    out = env.kubectl("get", "events", f"-n={ns}", "-o", "json",
                      f"--field-selector=involvedObject.name={name}").stdout
    return list(json.loads(out)["items"])


def test_job_is_placed_in_one_rack_and_kubectl_get_shows_every_column(
        aifactory_installed: KubeTestEnv, jobs: Watch, ns: str) -> None:
    env = aifactory_installed
    env.apply(training_job("pretrain", ns, workers=2, gpus_per_worker=8,
                           topology={"required": "rack"}, expectedRuntimeSeconds=3600))
    status = jobs.wait_phase(ns, "pretrain", ["Running"])
    workers = status["placement"]["workers"]
    assert [len(w["gpus"]) for w in workers] == [8, 8]
    assert len({w["node"] for w in workers}) == 2
    assert status["placement"]["levels"]["rack"] == 1
    assert re.fullmatch(r"rack b\d-r\d", status["span"])
    assert _condition(status, "Admitted")["status"] == "True"
    assert _condition(status, "Running")["status"] == "True"
    assert _condition(status, "Queued")["status"] == "False"

    def filled_row() -> dict[str, str] | None:
        rows = _table(env, "trainingjobs", f"-n={ns}")
        row = rows[0] if rows else {}
        return row if row.get("POWER(W)", "0") not in ("0", "<none>") and \
            row.get("ENERGY(KWH)", "0") not in ("0", "<none>") else None

    row = wait_for(filled_row, 10, "power and energy columns to be filled")
    assert row["NAME"] == "pretrain" and row["PHASE"] == "Running" and row["GPUS"] == "16"
    assert row["SPAN"] == status["span"] and row["QUEUE"] == "default"
    # 16 H200s at full load: the simulated draw is between idle and the 700 W limit each.
    assert 16 * 100 < int(row["POWER(W)"]) <= 16 * 700
    assert float(row["ENERGY(KWH)"]) > 0
    assert "trainingjob.aifactory.io/pretrain" in env.kubectl(
        "get", "aifactory", f"-n={ns}", "-o", "name").stdout
    described = env.kubectl("describe", "trainingjob", "pretrain", f"-n={ns}").stdout
    assert re.search(r"Normal\s+Admitted\s+.*placed: 16 GPUs on 2 nodes in rack", described)


def test_deleting_a_job_frees_its_gpus(aifactory_installed: KubeTestEnv, jobs: Watch,
                                       ns: str) -> None:
    env = aifactory_installed
    env.apply(training_job("whole", ns, workers=8, gpus_per_worker=8,
                           expectedRuntimeSeconds=3600))
    jobs.wait_phase(ns, "whole", ["Running"])
    env.apply(training_job("next", ns, workers=1, gpus_per_worker=8))
    waiting = wait_for(lambda: _condition(jobs.status(ns, "next"), "Queued").get("reason")
                       == "InsufficientCapacity" and jobs.status(ns, "next"), 10,
                       "next to wait for capacity")
    assert waiting["phase"] == "Queued"
    assert "0 GPUs free in the factory, needs 8" in waiting["message"]
    env.kubectl("delete", "trainingjob", "whole", f"-n={ns}", "--timeout=20s")
    gone = env.kubectl("get", "trainingjob", "whole", f"-n={ns}", check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    jobs.wait_phase(ns, "next", ["Running"])


def test_higher_priority_job_preempts_and_the_victim_says_why(
        aifactory_installed: KubeTestEnv, jobs: Watch, ns: str) -> None:
    env = aifactory_installed
    env.apply(training_job("low", ns, workers=8, gpus_per_worker=8, priority=0,
                           expectedRuntimeSeconds=3600, checkpointIntervalSeconds=60))
    jobs.wait_phase(ns, "low", ["Running"])
    env.apply(training_job("high", ns, workers=2, gpus_per_worker=8, priority=100))
    jobs.wait_phase(ns, "high", ["Running"])
    low = jobs.wait_phase(ns, "low", ["Queued"])
    preempted = _condition(low, "Preempted")
    assert preempted["status"] == "True"
    assert f"preempted by {ns}/high, which has higher priority (100 > 0)" in \
        preempted["message"]
    assert low["preemptions"] == 1 and low.get("placement") is None
    events = wait_for(lambda: [e for e in _events(env, ns, "low") if e["reason"] == "Preempted"],
                      10, "a Preempted Event on the victim")
    assert events[0]["type"] == "Warning" and f"{ns}/high" in events[0]["message"]
    # The GPUs the victim held are not counted twice: only the preemptor holds any now.
    held = gpu_slots([jobs.status(ns, "high")])
    assert len(held) == len(set(held)) == 16


def test_job_over_its_power_budget_waits_with_a_reason(
        aifactory_installed: KubeTestEnv, jobs: Watch, ns: str) -> None:
    env = aifactory_installed
    budget = f"tight-{ns}"
    env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "PowerBudget",
               "metadata": {"name": budget}, "spec": {"watts": 1_000_000}})
    try:
        def estimated() -> int | None:
            raw = env.kubectl("get", "powerbudget", budget, "-o",
                              "jsonpath={.status.estimatedWatts}").stdout
            return int(raw) if raw else None

        idle = wait_for(estimated, 10, "the budget's estimated draw")
        # Room for 1 kW above idle: an 8-GPU job needs several kW more.
        env.kubectl("patch", "powerbudget", budget, "--type=merge",
                    "-p", json.dumps({"spec": {"watts": idle + 1000}}))
        env.apply(training_job("hungry", ns, workers=1, gpus_per_worker=8))
        status = wait_for(lambda: _condition(jobs.status(ns, "hungry"), "Queued").get(
            "reason") == "PowerBudgetExceeded" and jobs.status(ns, "hungry"), 15,
            "hungry to wait on power")
        assert status["phase"] == "Queued"
        assert f"budget {budget}" in status["message"] and "W headroom" in status["message"]
        events = wait_for(lambda: [e for e in _events(env, ns, "hungry")
                                   if e["reason"] == "PowerBudgetExceeded"], 10,
                          "a PowerBudgetExceeded Event")
        assert budget in events[0]["message"]
        env.kubectl("patch", "powerbudget", budget, "--type=merge",
                    "-p", json.dumps({"spec": {"watts": idle + 100_000}}))
        jobs.wait_phase(ns, "hungry", ["Running"])
    finally:
        env.kubectl("delete", "powerbudget", budget, check=False)


def test_bad_input_fails_or_waits_with_a_reason_and_harms_nobody(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, jobs: Watch,
        ns: str) -> None:
    env = aifactory_installed
    env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "GPUQueue",
               "metadata": {"name": "default"}, "spec": {"nominalGPUs": GPUS}})
    try:
        env.apply([training_job("no-queue", ns, queue="nope"),
                   training_job("too-big", ns, workers=9, gpus_per_worker=8),
                   training_job("no-model", ns, gpuModel="B200"),
                   training_job("fine", ns, workers=1, gpus_per_worker=4)])
        jobs.wait_phase(ns, "fine", ["Running"])
        too_big = jobs.wait_phase(ns, "too-big", ["Failed"])
        assert _condition(too_big, "Failed")["reason"] == "Unschedulable"
        assert "gang of 72 GPUs (9 x 8) exceeds the factory: 64 GPUs in total" in \
            too_big["message"]
        no_model = jobs.wait_phase(ns, "no-model", ["Failed"])
        assert "spec.gpuModel: no B200 nodes in the factory; models present: H200" in \
            no_model["message"]
        no_queue = wait_for(lambda: _condition(jobs.status(ns, "no-queue"), "Queued").get(
            "reason") == "QuotaExceeded" and jobs.status(ns, "no-queue"), 10,
            "no-queue to wait on its queue")
        assert "queue 'nope' does not exist; known queues: default" in no_queue["message"]
        warnings = wait_for(lambda: [e for e in _events(env, ns, "too-big")
                                     if e["type"] == "Warning"], 10, "a Warning Event")
        assert warnings[0]["reason"] == "Unschedulable"
        assert operator.alive()
        assert jobs.phase(ns, "fine") == "Running"
    finally:
        env.kubectl("delete", "gpuqueue", "default", check=False)


def test_inference_service_spreads_over_racks_and_scales(
        aifactory_installed: KubeTestEnv, services: Watch, ns: str) -> None:
    env = aifactory_installed
    env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
               "metadata": {"name": "chat", "namespace": ns},
               "spec": {"model": "m", "gpusPerReplica": 2, "minReplicas": 1, "maxReplicas": 6,
                        "replicas": 4, "topology": {"spreadAcross": "rack", "minDomains": 2}}})
    status = wait_for(lambda: services.status(ns, "chat").get("replicas") == 4 and
                      services.status(ns, "chat"), 15, "4 replicas placed")
    assert status["phase"] == "Running" and status["gpus"] == 8
    assert status["placement"]["levels"]["rack"] >= 2
    assert sorted(w["replica"] for w in status["placement"]["workers"]) == [0, 1, 2, 3]
    env.kubectl("scale", "inferenceservice", "chat", f"-n={ns}", "--replicas=2")
    scaled = wait_for(lambda: services.status(ns, "chat").get("desiredReplicas") == 2 and
                      services.status(ns, "chat").get("replicas") == 2 and
                      services.status(ns, "chat"), 15, "scale down to 2 replicas")
    assert sorted(w["replica"] for w in scaled["placement"]["workers"]) == [0, 1]
    assert len(gpu_slots([scaled])) == 4


def test_job_runs_to_completion_with_energy_and_cost(
        aifactory_installed: KubeTestEnv, jobs: Watch, ns: str) -> None:
    env = aifactory_installed
    env.apply(training_job("short", ns, workers=1, gpus_per_worker=8,
                           expectedRuntimeSeconds=1.5))
    status = jobs.wait_phase(ns, "short", ["Succeeded"], timeout=20)
    assert _condition(status, "Succeeded")["status"] == "True"
    assert _condition(status, "Running")["status"] == "False"
    assert status["completionTime"] > status["startedAt"]
    # ~1.5 s x 8 GPUs at a few hundred watts each.
    assert 8 * 1.0 * 100 < status["energyJoules"] < 8 * 3.0 * 700
    assert status["costDollars"] > 0 and status["gpuHours"] > 0
    assert status["powerWatts"] == 0


def test_operator_has_only_the_permissions_it_uses(aifactory_installed: KubeTestEnv,
                                                    operator: OperatorProcess) -> None:
    env = aifactory_installed

    def can(*args: str) -> bool:
        out = env.kubectl("auth", "can-i", *args, kubeconfig=operator.kubeconfig, check=False)
        return out.stdout.strip() == "yes"

    assert can("patch", "trainingjobs.aifactory.io", "--subresource=status", "-A")
    assert can("list", "nodes")
    assert can("create", "events", "-n=default")
    for verb, resource in (("delete", "trainingjobs.aifactory.io"),
                           ("create", "trainingjobs.aifactory.io"),
                           ("get", "secrets"), ("create", "pods"), ("patch", "nodes"),
                           ("patch", "gpuqueues.aifactory.io"),
                           ("delete", "events")):
        assert not can(verb, resource, "-A"), f"the operator may {verb} {resource}"


def test_the_metrics_port_serves_the_factory_exporter_and_the_operator_counters(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, jobs: Watch,
        ns: str) -> None:
    env = aifactory_installed
    env.apply(training_job("metered", ns, workers=1, gpus_per_worker=8,
                           expectedRuntimeSeconds=3600))
    status = jobs.wait_phase(ns, "metered", ["Running"])
    energy = wait_for(lambda: operator.samples("aifactory_job_energy_joules_total",
                                               job_namespace=ns, job_name="metered"), 10,
                      "the job's energy counter")
    assert energy[0][1] > 0
    power = operator.samples("aifactory_gpu_power_watts", job_namespace=ns,
                             job_name="metered")
    held = sorted((w["node"], str(g)) for w in status["placement"]["workers"]
                  for g in w["gpus"])
    assert sorted((labels["node"], labels["gpu"]) for labels, _ in power) == held
    idle = operator.samples("aifactory_gpu_power_watts", job_name="")
    assert len(idle) == GPUS - 8
    # 8 H200s at full load draw more than any idle one, and no more than the 700 W limit.
    assert min(w for _, w in power) > max(w for _, w in idle)
    assert max(w for _, w in power) <= 700
    assert operator.samples("aifactory_telemetry_source_info", source="simulated",
                            requested="auto")[0][1] == 1
    assert operator.samples("aifactory_operator_gpus", state="total")[0][1] == GPUS
    wait_for(lambda: operator.samples("aifactory_operator_gpus", state="allocated")[0][1]
             >= 8, 10, "the operator's count of allocated GPUs (refreshed every second)")
    for counter in ("aifactory_operator_engine_iterations_total",
                    "aifactory_operator_scheduling_cycles_total",
                    "aifactory_operator_status_patches_total"):
        assert operator.samples(counter)[0][1] > 0, counter
