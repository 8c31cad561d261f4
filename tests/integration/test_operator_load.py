"""Load: 300 TrainingJobs applied at once all finish, and no GPU is ever given to two jobs.

The operator runs the built-in ``small`` factory (256 simulated H200s) at ``--sim-speed 60``
(a simulated minute per wall second). The 300 jobs ask for 2,130 GPUs in all, in gangs
of 1 to 32 GPUs with 1-4 simulated minutes of work each, so GPUs are handed from job to job
several times over. Nothing preempts (equal priorities) and nothing fails, so each job runs
exactly once and its status keeps the GPUs it ran on, ``startedAt`` and ``completionTime``:
two jobs that used one GPU must not overlap in time. The timings are printed (``-s``).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    ensure_namespace,
    training_job,
    wait_for,
)

pytestmark = pytest.mark.integration

NS = "load"
JOBS = 300
SPEED = 60
# (workers, GPUs per worker), cycled: mostly small jobs, some multi-node gangs.
SHAPES = [(1, 1), (1, 2), (1, 4), (1, 8), (1, 1), (2, 8), (1, 2), (4, 8), (1, 4), (1, 1)]


def _jobs() -> list[dict[str, Any]]:
    shapes = itertools.cycle(SHAPES)
    docs = []
    for i in range(JOBS):
        workers, gpus = next(shapes)
        docs.append(training_job(f"load-{i:03d}", NS, workers, gpus,
                                 expectedRuntimeSeconds=60 + 60 * (i % 4)))
    return docs


@pytest.fixture
def operator(aifactory_installed: KubeTestEnv, tmp_path: Path) -> Iterator[OperatorProcess]:
    ensure_namespace(aifactory_installed, NS)
    proc = OperatorProcess(aifactory_installed, tmp_path,
                           ["--cluster=small", "--inventory=factory", f"--sim-speed={SPEED}",
                            "--status-interval=5"])
    proc.start()
    try:
        yield proc
    finally:
        env = aifactory_installed
        try:
            # kubectl's own --wait checks objects one by one (a minute for 300); poll instead.
            env.kubectl("delete", "trainingjobs", "--all", f"-n={NS}", "--wait=false",
                        check=False)
            wait_for(lambda: not env.kubectl("get", "trainingjobs", f"-n={NS}",
                                             "-o=name").stdout,
                     60, "the load jobs to be gone", interval=0.5)
        finally:
            proc.stop()


def _seconds(stamp: str) -> float:
    from aifactory.operators.translate import parse_time

    value = parse_time(stamp)
    assert value is not None, stamp
    return value


def test_300_jobs_applied_at_once_all_finish_without_double_booking(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> None:
    env = aifactory_installed
    docs = _jobs()
    names = [(NS, d["metadata"]["name"]) for d in docs]
    watch = Watch(env, "trainingjobs")
    try:
        started = time.monotonic()
        env.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), timeout=300)
        applied = time.monotonic()
        # Placed = seen Running, or already Succeeded when the Running status was superseded
        # before it was written (writes are coalesced per object).
        def placed_at(key: tuple[str, str]) -> float | None:
            seen = watch.first.get(key, {})
            times = [seen[p] for p in ("Running", "Succeeded", "Failed") if p in seen]
            return min(times) if times else None

        wait_for(lambda: all(placed_at(k) is not None for k in names), 240,
                 "every job to have been placed", interval=0.2)
        placed = max(t for k in names if (t := placed_at(k)) is not None)
        wait_for(lambda: all(watch.phase(*k) in ("Succeeded", "Failed") for k in names), 240,
                 "every job to finish", interval=0.2)
        finished = time.monotonic()
        statuses = {k: watch.status(*k) for k in names}
    finally:
        watch.close()
    print(f"\n300 jobs: kubectl apply {applied - started:.1f} s; all placed "
          f"{placed - started:.1f} s after apply began; all finished {finished - started:.1f} s")
    assert {s["phase"] for s in statuses.values()} == {"Succeeded"}
    assert all(s["restarts"] == 0 and s["preemptions"] == 0 for s in statuses.values())
    demand = sum(w * g for w, g in itertools.islice(itertools.cycle(SHAPES), JOBS))
    assert demand > 8 * 256  # the factory is handed round several times over
    runs: dict[tuple[str, int], list[tuple[float, float, str]]] = {}
    for (_, name), status in statuses.items():
        start, end = _seconds(status["startedAt"]), _seconds(status["completionTime"])
        assert end > start, name
        gpus = [(w["node"], g) for w in status["placement"]["workers"] for g in w["gpus"]]
        assert len(gpus) == len(set(gpus)) == status["gpus"], name
        for gpu in gpus:
            runs.setdefault(gpu, []).append((start, end, name))
    assert len(runs) <= 256
    assert max(len(intervals) for intervals in runs.values()) >= 2  # GPUs were reused
    for gpu, intervals in runs.items():
        intervals.sort()
        for (_, end, first), (start, _, second) in itertools.pairwise(intervals):
            assert start >= end, f"GPU {gpu} held by {first} until {end} and by {second} " \
                                 f"from {start}"
    assert operator.alive()
