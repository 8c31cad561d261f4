"""The operator's write path on the real API server: a budget for meter writes, phase changes
that no meter backlog delays, Events aggregated and not lost, meters never older than the
stated bound.

Counts come from the API server itself (``apiserver_request_total``), read before and after
a window in which only this module's operator runs. The operator runs the built-in ``small``
factory (256 simulated H200s); jobs run for a simulated day, so nothing finishes during a
test. Deadlines are generous (a loaded 2-core machine); each assertion names what a broken
write path would show instead.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aifactory.operators.status import WAIT_REASONS
from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    ensure_namespace,
    release_all,
    training_job,
    wait_for,
)

pytestmark = pytest.mark.integration

NS = "writes"
DAY = 86400


def _patches(env: KubeTestEnv, resource: str = "trainingjobs", subresource: str = "status",
             verb: str = "PATCH") -> float:
    """The API server's count of ``verb`` requests on ``resource``/``subresource``."""
    total = 0.0
    for line in env.kubectl("get", "--raw", "/metrics", timeout=60).stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:
                                                          line.rindex("}")]
                      .replace('"', "").split(","))
        if labels.get("verb") == verb and labels.get("resource") == resource and \
                labels.get("subresource", "") == subresource:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def namespace(aifactory_installed: KubeTestEnv) -> Iterator[str]:
    ensure_namespace(aifactory_installed, NS)
    yield NS


@contextlib.contextmanager
def _operator(env: KubeTestEnv, workdir: Path, *args: str,
              environ: dict[str, str] | None = None
              ) -> Iterator[tuple[OperatorProcess, Watch]]:
    """The operator on the ``small`` factory and a watch on TrainingJobs; afterwards every
    job of the namespace is released and the operator stopped."""
    proc = OperatorProcess(env, workdir, ["--cluster=small", "--inventory=factory",
                                          "--status-interval=1", *args], environ=environ)
    proc.start()
    watch = Watch(env, "trainingjobs")
    try:
        yield proc, watch
    finally:
        watch.close()
        try:
            env.kubectl("delete", "inferenceservices", "--all", f"-n={NS}", "--wait=false",
                        check=False)
            release_all(env, NS, timeout=180)
        finally:
            proc.stop()


def _apply_jobs(env: KubeTestEnv, names: list[str], gpus: int = 1) -> None:
    docs = [training_job(n, NS, 1, gpus, expectedRuntimeSeconds=DAY) for n in names]
    env.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                      "items": docs}), timeout=300)


def _all_running(watch: Watch, names: list[str], timeout: float = 180.0) -> None:
    wait_for(lambda: all(watch.phase(NS, n) == "Running" for n in names), timeout,
             f"{len(names)} jobs Running", interval=0.2)


def _gauge(proc: OperatorProcess, name: str) -> float:
    samples = proc.samples(name)
    assert samples, f"{name} not exported"
    return samples[0][1]


class MeterAges:
    """Checked on every watch event: how long each running object's meters have gone
    unchanged in what the API server shows (``energyJoules`` of a running job grows)."""

    def __init__(self) -> None:
        self.changed: dict[tuple[str, str], tuple[float, Any]] = {}
        self.oldest = 0.0
        self.armed_after = float("inf")

    def __call__(self, objects: dict[tuple[str, str], dict[str, Any]]) -> str | None:
        now = time.monotonic()
        for key, obj in objects.items():
            status = obj.get("status") or {}
            if status.get("phase") != "Running":
                continue
            energy = status.get("energyJoules")
            seen = self.changed.get(key)
            if seen is None or seen[1] != energy:
                self.changed[key] = (now, energy)
            elif now >= self.armed_after:
                self.oldest = max(self.oldest, now - seen[0])
        return None


def test_status_writes_stay_within_the_budget_and_meters_within_their_bound(
        aifactory_installed: KubeTestEnv, namespace: str, tmp_path: Path) -> None:
    """200 running jobs, a budget of 10 meter writes per second: the API server sees about
    10 status PATCHes per second (not 200 per refresh), every running job's meters still
    move, and none waits longer than max(interval, 200 / 10) = 20 s."""
    env, budget, jobs = aifactory_installed, 10.0, 200
    ages = MeterAges()
    names = [f"meter-{i:03d}" for i in range(jobs)]
    with _operator(env, tmp_path, f"--status-writes-per-second={budget:g}") as (proc, watch):
        watch.invariants.append(ages)
        _apply_jobs(env, names)
        _all_running(watch, names)
        ages.armed_after = time.monotonic() + 2 * jobs / budget  # every job had its turn
        time.sleep(2.0)
        before, started = _patches(env), time.monotonic()
        wait_for(lambda: time.monotonic() >= ages.armed_after + 10.0, 120, "the window",
                 interval=1.0)
        writes, seconds = _patches(env) - before, time.monotonic() - started
        rate = writes / seconds
        print(f"\n{jobs} running, budget {budget:g}/s: {writes:.0f} status PATCHes in "
              f"{seconds:.1f} s = {rate:.1f}/s; oldest meters {ages.oldest:.1f} s")
        assert rate <= budget * 1.25 + 1.0, \
            f"{rate:.1f} status PATCH/s with a budget of {budget:g}/s"
        assert rate >= budget * 0.5, f"only {rate:.1f} meter writes/s: the budget idles"
        bound = max(1.0, jobs / budget)
        assert ages.oldest <= bound + 10.0, \
            f"a running job's meters went {ages.oldest:.1f} s unchanged (bound {bound:g} s)"
        lag = _gauge(proc, "aifactory_operator_status_meter_lag_seconds")
        assert lag <= bound + 5.0, f"the operator reports meters {lag:.1f} s old"
        assert not watch.violations


def test_a_phase_change_overtakes_a_full_meter_backlog(
        aifactory_installed: KubeTestEnv, namespace: str, tmp_path: Path) -> None:
    """Every meter write takes a second (a slow API server) and the budget lets 150 running
    jobs queue theirs every second: the meter lane is full. A new job's Running status still
    lands within seconds; behind the backlog, six writers would need 25 s or more."""
    env, jobs = aifactory_installed, 150
    names = [f"busy-{i:03d}" for i in range(jobs)]
    with _operator(env, tmp_path, "--status-writes-per-second=1000",
                   environ={"AIFACTORY_TEST_METER_WRITE_DELAY_SECONDS": "1.0"}
                   ) as (proc, watch):
        _apply_jobs(env, names)
        _all_running(watch, names)
        wait_for(lambda: _gauge(proc, "aifactory_operator_status_backlog") >= 100, 60,
                 "a meter backlog of 100 writes", interval=0.5)
        started = time.monotonic()
        env.apply(training_job("urgent", NS, 1, 8, expectedRuntimeSeconds=DAY))
        watch.wait_phase(NS, "urgent", ["Running"], timeout=60)
        took = watch.first[(NS, "urgent")]["Running"] - started
        backlog = _gauge(proc, "aifactory_operator_status_backlog")
        print(f"\nmeter backlog {backlog:.0f}: the new job was Running after {took:.2f} s")
        assert took <= 10.0, f"a phase change waited {took:.1f} s behind meter writes"
        assert backlog >= 50, "the backlog drained: the test did not test the lane"


def _events(env: KubeTestEnv) -> list[dict[str, Any]]:
    return list(json.loads(env.kubectl("get", "events", f"-n={NS}", "-o", "json").stdout)
                ["items"])


def test_events_are_aggregated_not_lost_under_a_burst(
        aifactory_installed: KubeTestEnv, namespace: str, tmp_path: Path) -> None:
    """200 jobs of 2 GPUs on 256 GPUs: up to 128 are placed (fewer if another module left
    work behind), the rest wait. Every job has its Event on the API server (Admitted, or why
    it waits: InsufficientCapacity), none is dropped;
    an InferenceService scaled up and down again has one Admitted Event per replica
    placement, counted up, not a new Event each time."""
    env = aifactory_installed
    names = [f"ev-{i:03d}" for i in range(200)]
    with _operator(env, tmp_path) as (proc, watch):
        _apply_jobs(env, names, gpus=2)

        def settled() -> bool:  # every job placed or waiting, the factory full
            phases = [watch.phase(NS, n) for n in names]
            return all(p in ("Running", "Queued") for p in phases) and \
                "Running" in phases and "Queued" in phases

        wait_for(settled, 180, "the 200 jobs placed or waiting", interval=0.3)
        running = {n for n in names if watch.phase(NS, n) == "Running"}

        def every_job_has_its_event() -> bool:
            named = {e["involvedObject"]["name"] for e in _events(env)}
            return all(n in named for n in names)

        wait_for(every_job_has_its_event, 120, "an Event for every job", interval=1.0)
        reasons: dict[str, set[str]] = {}
        for event in _events(env):
            reasons.setdefault(event["involvedObject"]["name"], set()).add(event["reason"])
        waits = set(WAIT_REASONS.values())
        missing = [n for n in names if not reasons.get(n, set()) &
                   ({"Admitted"} if n in running else waits)]
        assert not missing, f"no Admitted or wait Event for {missing[:5]}"
        assert _gauge(proc, "aifactory_operator_events_dropped_total") == 0

        release_all(env, NS, timeout=120)
        service = {"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
                   "metadata": {"name": "chat", "namespace": NS},
                   "spec": {"model": "tiny", "replicas": 1, "maxReplicas": 4,
                            "gpusPerReplica": 1}}
        env.apply(service)
        for replicas in (2, 1, 2, 1, 2):
            env.kubectl("scale", "inferenceservice/chat", f"--replicas={replicas}",
                        f"-n={NS}")
            wait_for(lambda r=replicas: _service_replicas(env) == r, 60,
                     f"chat at {replicas} replicas", interval=0.2)
        def admitted_r1() -> list[dict[str, Any]]:
            return [e for e in _events(env) if e["involvedObject"]["name"] == "chat"
                    and e["reason"] == "Admitted" and e["message"].startswith("replica r1")]

        wait_for(lambda: sum(e.get("count", 1) for e in admitted_r1()) >= 3, 60,
                 "three placements of replica r1 counted", interval=0.5)
        events = admitted_r1()
        counts = sorted(e.get("count", 1) for e in events)
        print(f"\nreplica r1 placed 3 times: {len(events)} Event(s), counts {counts}")
        assert len(events) < 3 and max(counts) >= 2, \
            f"identical Events were posted anew, not counted up: counts {counts}"
        wait_for(lambda: _gauge(proc, "aifactory_operator_events_aggregated_total") >= 2, 30,
                 "the operator to count the aggregation", interval=0.5)


def _service_replicas(env: KubeTestEnv) -> int:
    out = env.kubectl("get", "inferenceservice/chat", f"-n={NS}", "-o",
                      "jsonpath={.status.replicas}", check=False).stdout.strip()
    return int(out) if out.isdigit() else -1

