"""InferenceService autoscaling in the operator, on a real API server under the operator's RBAC.

``aifactory operator --backend sim --sim-traffic FILE --autoscale-sync-seconds 1`` on the
64-GPU simulated factory; the test drives the load by rewriting FILE (``seconds,
relative_load``: 1.0 is the sized peak, 0.8 x maxReplicas x target requests in flight) and
reads what a user reads: status (desired, placed, ready replicas, in-flight requests, the
autoscaler's reason), ``Scaled`` Events, and the operator's metrics. Replicas never exceed
``maxReplicas``, never drop below ``minReplicas``, and a scale-down never comes before the
service's stabilization window, checked on every watch event. A second service whose scale-up
would break a PowerBudget waits with the budget named in status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    ensure_namespace,
    wait_for,
)

pytestmark = pytest.mark.integration

FACTORY = Path(__file__).parent / "data" / "factory-64.yaml"
NS = "autoscale"
WINDOW = 8  # scaleDownStabilizationSeconds of the test's service


def _load(path: Path, relative: float) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"seconds,relative_load\n0,{relative}\n")
    tmp.replace(path)  # atomic: the operator never reads half a file


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("traffic") / "load.csv"
    _load(path, 0.05)
    return path


@pytest.fixture(scope="module")
def operator(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory,
             traffic: Path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(aifactory_installed, tmp_path_factory.mktemp("operator"),
                           [f"--cluster={FACTORY}", "--inventory=factory",
                            "--status-interval=1", "--autoscale-sync-seconds=1",
                            f"--sim-traffic={traffic}"])
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def services(aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> Iterator[Watch]:
    ensure_namespace(aifactory_installed, NS)
    watch = Watch(aifactory_installed, "inferenceservices")
    yield watch
    watch.close()
    aifactory_installed.kubectl("delete", "inferenceservices", "--all", f"-n={NS}",
                                "--timeout=30s")


def _events(env: KubeTestEnv, name: str, reason: str) -> list[dict[str, Any]]:
    out = env.kubectl("get", "events", f"-n={NS}", "-o", "json",
                      f"--field-selector=involvedObject.name={name},reason={reason}").stdout
    return list(json.loads(out)["items"])


def test_replicas_follow_load_up_at_once_and_down_after_the_window(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, services: Watch,
        traffic: Path) -> None:
    env = aifactory_installed
    env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
               "metadata": {"name": "chat", "namespace": NS},
               "spec": {"model": "m", "gpusPerReplica": 1, "minReplicas": 1,
                        "maxReplicas": 8, "replicas": 2,
                        "autoscaling": {"targetInFlightRequests": 4,
                                        "scaleDownStabilizationSeconds": WINDOW}}})
    seen: list[tuple[float, int]] = []  # (monotonic, desiredReplicas) of every event

    def desired() -> int:
        status = services.status(NS, "chat")
        d = status.get("desiredReplicas")
        if d is not None:
            assert 1 <= d <= 8, status  # within bounds on every event we look at
            if not seen or seen[-1][1] != d:
                seen.append((time.monotonic(), d))
        return -1 if d is None else int(d)

    # Light load: down from 2 to the minimum, once the window has passed.
    wait_for(lambda: desired() == 1, 60, "scale down to minReplicas under light load")
    _load(traffic, 1.0)  # the sized peak: 0.8 x 8 x 4 = 25.6 in flight -> 7 replicas
    loaded = time.monotonic()
    status = wait_for(lambda: desired() >= 7 and services.status(NS, "chat").get(
        "readyReplicas", 0) >= 7 and services.status(NS, "chat"), 60,
        "scale up to the load and serve")
    up_seconds = time.monotonic() - loaded
    ups = [d for _, d in seen if _ > loaded]
    # Up at once, but at most doubling per step: 1 -> 2 -> 4 -> 7.
    steps = [b for a, b in zip([1, *ups], ups, strict=False) if b > a]
    assert all(b <= 2 * a for a, b in zip([1, *steps], steps, strict=False)), seen
    assert status["replicas"] >= 7 and status["inFlightRequests"] > 0
    assert status["endpoints"] == []  # simulated replicas serve nothing
    assert "scale up" in status["scaling"]
    assert _events(env, "chat", "Scaled"), "no Scaled Event"
    # A restarted operator resumes from the autoscaler's count in status, not spec.replicas
    # (2), and keeps autoscaling.
    peak = status["desiredReplicas"]
    operator.kill()
    operator.start()
    restarted = time.monotonic()
    while time.monotonic() - restarted < 5:
        assert desired() == peak, seen
        time.sleep(0.2)
    # Past the restarted autoscaler's first window (it may settle from the overshoot of 8
    # to the 7 the load needs), then the load goes.
    wait_for(lambda: time.monotonic() - restarted > WINDOW + 3 and desired() > 0, 30,
             "the first window after the restart")
    level = desired()
    _load(traffic, 0.0)
    dropped = time.monotonic()
    wait_for(lambda: desired() == 1, 90, "scale down after the stabilization window")
    first_down = next(t for t, d in seen if t > dropped and d < level)
    assert first_down - dropped >= WINDOW - 1.5, (first_down - dropped, seen)
    metrics = operator.metrics()
    assert 'aifactory_inference_replicas{service_namespace="autoscale",' \
           'service_name="chat",state="desired"} 1' in metrics
    assert "aifactory_inference_scale_events_total" in metrics
    print(f"autoscale reaction: load step to {status['readyReplicas']} ready replicas in "
          f"{up_seconds:.1f} s (sync 1 s); first scale-down "
          f"{first_down - dropped:.1f} s after the load dropped (window {WINDOW} s)")


def test_a_scale_up_over_the_power_budget_waits_with_the_reason(
        aifactory_installed: KubeTestEnv, services: Watch, traffic: Path) -> None:
    env = aifactory_installed
    env.kubectl("delete", "inferenceservices", "--all", f"-n={NS}", "--timeout=30s")
    _load(traffic, 0.0)
    budgets = Watch(env, "powerbudgets")
    try:
        env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "PowerBudget",
                   "metadata": {"name": "autoscale-all"}, "spec": {"watts": 10_000_000}})

        def estimated() -> int:
            return int(budgets.status("", "autoscale-all").get("estimatedWatts") or 0)

        idle = wait_for(estimated, 30, "the budget's estimate")
        env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
                   "metadata": {"name": "hungry", "namespace": NS},
                   "spec": {"model": "m", "gpusPerReplica": 8, "minReplicas": 1,
                            "maxReplicas": 4, "replicas": 1,
                            "autoscaling": {"targetInFlightRequests": 2}}})
        one = wait_for(lambda: (e := estimated()) > idle and e, 30, "one replica counted")
        per_replica = one - idle
        env.kubectl("patch", "powerbudget", "autoscale-all", "--type=merge",
                    "-p", json.dumps({"spec": {"watts": one + per_replica // 2}}))
        _load(traffic, 1.0)
        status = wait_for(lambda: (s := services.status(NS, "hungry")).get(
            "desiredReplicas", 0) >= 2 and "power" in str(s.get("message", "")).lower()
            and s, 60, "a scale-up waiting on the power budget")
        assert status["replicas"] == 1 < status["desiredReplicas"], status
        assert "autoscale-all" in status["message"], status["message"]
        waits = wait_for(lambda: [e for e in json.loads(env.kubectl(
            "get", "events", f"-n={NS}", "-o", "json",
            "--field-selector=involvedObject.name=hungry").stdout)["items"]
            if "autoscale-all" in e.get("message", "")], 30, "an Event naming the budget")
        assert waits[0]["type"] == "Normal"
        # Load gone: the waiting replicas go first and the one running stays.
        _load(traffic, 0.0)
    finally:
        budgets.close()
        env.kubectl("delete", "inferenceservice", "hungry", f"-n={NS}", "--timeout=30s")
        env.kubectl("delete", "powerbudget", "autoscale-all", "--timeout=30s")
