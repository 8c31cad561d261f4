"""The API server and etcd restart under a running operator: it reconnects, re-lists, and
converges without duplicates.

Restarting kube-apiserver (same port, same etcd) and etcd (same data) is what a control-plane
upgrade does; the session's API server is back whole afterwards for the modules after this
one. The operator runs with a 30 s lease (renew deadline 21 s) so a restart shorter than that
does not cost it its leadership; a watch checks on every event that no GPU is shown held
twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    ensure_namespace,
    release_all,
    strip_finalizers,
    training_job,
    wait_for,
)
from tests.integration.test_operator_ha import no_gpu_held_twice

pytestmark = pytest.mark.integration

FACTORY = Path(__file__).parent / "data" / "factory-64.yaml"
NS = "outages"


def _apply_when_served(env: KubeTestEnv, manifest: dict[str, Any]) -> None:
    """Apply once the restarted API server takes it (admission and CRD discovery come back
    a moment after it answers reads)."""
    def applied() -> bool:
        return env.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest),
                           check=False).returncode == 0

    wait_for(applied, 60, f"the API server to accept {manifest['metadata']}", interval=0.5)


def _served(env: KubeTestEnv) -> bool:
    return env.kubectl("get", "trainingjobs", f"-n={NS}", check=False,
                       timeout=10).returncode == 0


def test_the_operator_rides_through_api_server_and_etcd_restarts(
        aifactory_installed: KubeTestEnv, tmp_path: Path) -> None:
    env = aifactory_installed
    ensure_namespace(env, NS)
    operator = OperatorProcess(env, tmp_path, [f"--cluster={FACTORY}", "--inventory=factory",
                                               "--status-interval=1", "--lease-seconds=30"])
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    try:
        operator.start()
        for i in range(3):
            env.apply(training_job(f"before-{i}", NS, workers=1, gpus_per_worker=8,
                                   expectedRuntimeSeconds=3600))
        for i in range(3):
            watch.wait_phase(NS, f"before-{i}", ["Running"], timeout=30)

        env.restart_apiserver()
        wait_for(lambda: _served(env), 60, "the API server to serve again", interval=0.5)
        _apply_when_served(env, training_job("after-apiserver", NS, workers=2,
                                             gpus_per_worker=8, expectedRuntimeSeconds=3600))
        watch.wait_phase(NS, "after-apiserver", ["Running"], timeout=60)

        env.restart_etcd()
        wait_for(lambda: _served(env), 60, "etcd to be back behind the API server",
                 interval=0.5)
        _apply_when_served(env, training_job("after-etcd", NS, workers=1, gpus_per_worker=8,
                                             expectedRuntimeSeconds=3600))
        watch.wait_phase(NS, "after-etcd", ["Running"], timeout=60)

        assert operator.alive(), operator.log_tail()
        names = [f"before-{i}" for i in range(3)] + ["after-apiserver", "after-etcd"]
        listed = json.loads(env.kubectl("get", "trainingjobs", f"-n={NS}", "-o",
                                        "json").stdout)["items"]
        assert sorted(j["metadata"]["name"] for j in listed) == sorted(names)
        for job in listed:  # each placed once, where it was (nothing launched twice)
            status = job["status"]
            assert status["phase"] == "Running" and status.get("restarts", 0) == 0, status
        used = sum(j["status"]["gpus"] for j in listed)
        assert used == 3 * 8 + 16 + 8
        assert watch.violations == [], watch.violations[:3]
    finally:
        watch.close()
        try:
            wait_for(lambda: _served(env), 60, "the API server", interval=0.5)
            release_all(env, NS)
        finally:
            operator.stop()
            strip_finalizers(env, NS)  # whatever the operator could not release
