"""A crash while status writes lag: recovery needs no trust in status that lags.

The operator runs the simulated backend 60x faster than real time, and every status write is
held back 0.25 s first (the ``AIFACTORY_TEST_STATUS_WRITE_DELAY_SECONDS`` failpoint), so its
picture runs seconds ahead of the API server's while 40 short gangs come and go on 64 GPUs.
It is SIGKILLed in the middle of that and started again.

The writes are ordered so that a job is shown holding GPUs only after the release of the
job that held them before is written. So, on every watch event, before and after the crash,
no GPU is shown held by two Running jobs; recovery finds no conflicting claims to arbitrate;
and a job the API server showed Running when the operator died is adopted where it ran, with
the start it had (it is not run again), while the others finish in turn.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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
NS = "status-lag"
JOBS = [f"lag-{i:02d}" for i in range(40)]


@pytest.fixture
def lagging(aifactory_installed: KubeTestEnv, tmp_path: Path) -> Iterator[OperatorProcess]:
    env = aifactory_installed
    ensure_namespace(env, NS)
    proc = OperatorProcess(env, tmp_path, [f"--cluster={FACTORY}", "--inventory=factory",
                                           "--sim-speed=60", "--status-interval=1"],
                           environ={"AIFACTORY_TEST_STATUS_WRITE_DELAY_SECONDS": "0.25"})
    try:
        yield proc
    finally:
        proc.environ.pop("AIFACTORY_TEST_STATUS_WRITE_DELAY_SECONDS", None)
        try:
            if not proc.alive():
                proc.start()
            release_all(env, NS)
        finally:
            proc.stop()
            strip_finalizers(env, NS)  # whatever the operator could not release


def test_a_crash_while_status_lags_loses_nothing_and_reruns_nothing(
        aifactory_installed: KubeTestEnv, lagging: OperatorProcess) -> None:
    env = aifactory_installed
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    try:
        lagging.start()
        for name in JOBS:  # 4 simulated minutes each: 4 s of wall time
            env.apply(training_job(name, NS, workers=1, gpus_per_worker=8,
                                   expectedRuntimeSeconds=240))

        def turning_over() -> bool:  # some finished, some shown running, writes behind
            phases = [watch.phase(NS, n) for n in JOBS]
            return phases.count("Succeeded") >= 4 and phases.count("Running") >= 3

        wait_for(turning_over, 90, "jobs to turn over", interval=0.02)
        lagging.kill()  # SIGKILL while writes lag behind the operator's picture
        killed = time.monotonic()
        shown_running = {n: watch.status(NS, n).get("startedAt") for n in JOBS
                         if watch.phase(NS, n) == "Running"}
        lagging.environ.pop("AIFACTORY_TEST_STATUS_WRITE_DELAY_SECONDS")
        lagging.start()
        assert shown_running
        wait_for(lambda: all(watch.phase(NS, n) == "Succeeded" for n in JOBS), 180,
                 "every job to finish")
        log = lagging.log_tail(400)
        assert "0 placement conflicts" in log, log
        for name, started in shown_running.items():
            status = watch.status(NS, name)
            assert status.get("startedAt") == started, (name, started, status)  # adopted
            assert status.get("restarts", 0) == 0, (name, status)
        assert watch.violations == [], watch.violations[:3]
        print(f"\nrecovered {time.monotonic() - killed:.1f} s after the kill; "
              f"{len(shown_running)} jobs shown Running at the kill were adopted, not rerun; "
              f"invariant checked on {watch.events} watch events: 0 violations")
    finally:
        watch.close()
