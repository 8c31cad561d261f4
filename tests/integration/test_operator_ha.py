"""Two operator replicas on a real API server: one Lease, one leader, no double placement.

Both run as the operator's ServiceAccount (its RBAC, Leases included) with distinct
identities, on the 64-GPU factory of ``data/factory-64.yaml`` (8 nodes x 8 GPUs). A watch on
TrainingJobs checks on every event, not only at the end, that no GPU is shown held by two
Running jobs and that no node is shown holding more GPUs than it has.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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

pytestmark = pytest.mark.integration

FACTORY = Path(__file__).parent / "data" / "factory-64.yaml"
NODE_GPUS = 8
LEASE = "aifactory-operator"


def no_gpu_held_twice(objects: dict[tuple[str, str], dict[str, Any]]) -> str | None:
    """The invariant of any LIST: each GPU slot at most once among Running jobs, and no node
    over its GPUs."""
    held: Counter[tuple[str, int]] = Counter()
    for obj in objects.values():
        status = obj.get("status") or {}
        if status.get("phase") != "Running":
            continue
        for worker in (status.get("placement") or {}).get("workers") or []:
            for gpu in worker["gpus"]:
                held[(worker["node"], gpu)] += 1
    twice = sorted(slot for slot, count in held.items() if count > 1)
    if twice:
        return f"GPU slots shown held by two Running jobs: {twice}"
    per_node = Counter(node for node, _ in held)
    over = {node: n for node, n in per_node.items() if n > NODE_GPUS}
    return f"nodes shown holding more GPUs than they have: {over}" if over else None


def holder(env: KubeTestEnv) -> str:
    out = env.kubectl("get", "lease", LEASE, "-n=aifactory-system", "-o", "json",
                      check=False)
    if out.returncode != 0:
        return ""
    return str((json.loads(out.stdout).get("spec") or {}).get("holderIdentity") or "")


@pytest.fixture
def pair(aifactory_installed: KubeTestEnv, tmp_path: Path
         ) -> Iterator[tuple[OperatorProcess, OperatorProcess]]:
    env = aifactory_installed
    args = [f"--cluster={FACTORY}", "--inventory=factory", "--status-interval=1"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = OperatorProcess(env, tmp_path / "a", [*args, "--leader-identity=replica-a"])
    second = OperatorProcess(env, tmp_path / "b", [*args, "--leader-identity=replica-b"])
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


def test_the_standby_takes_over_a_killed_leader_without_double_placement(
        aifactory_installed: KubeTestEnv, pair: tuple[OperatorProcess, OperatorProcess]
        ) -> None:
    env = aifactory_installed
    first, second = pair
    ns = "ha-failover"
    ensure_namespace(env, ns)
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    try:
        first.start()
        second.start(leading=False)
        assert holder(env) == "replica-a"
        assert not second.leading()  # a standby: healthy, waiting for the Lease
        # A burst larger than the factory (112 GPUs asked of 64): some wait, so the new
        # leader must rebuild who holds what before it places the rest.
        names = [f"j{i:02d}" for i in range(28)]
        for i, name in enumerate(names):
            env.apply(training_job(name, ns, workers=1, gpus_per_worker=(1, 2, 4, 8)[i % 4],
                                   expectedRuntimeSeconds=3600))
            if i == 14:
                wait_for(lambda: sum(watch.phase(ns, n) == "Running" for n in names) >= 4,
                         60, "the first admissions")
                first.kill()  # SIGKILL mid-burst: nothing flushed, the Lease not given up
                killed = time.monotonic()
        wait_for(second.leading, 60, "the standby to take over")
        took_over = time.monotonic() - killed
        assert holder(env) == "replica-b"
        print(f"\nfailover: the standby leads {took_over:.1f} s after SIGKILL of the leader")
        assert took_over < 30  # default timings: ~10-12 s (a 10 s lease, 2 s retries)
        wait_for(lambda: all(watch.phase(ns, n) in ("Running", "Queued") for n in names),
                 90, "every job to have a phase")
        running = [n for n in names if watch.phase(ns, n) == "Running"]
        used = sum(watch.status(ns, n)["gpus"] for n in running)
        assert 0 < used <= 64
        assert watch.violations == [], watch.violations[:3]
        print(f"invariant checked on {watch.events} watch events: "
              f"{len(watch.violations)} violations")
    finally:
        watch.close()
        try:
            release_all(env, ns)
        finally:
            strip_finalizers(env, ns)  # whatever the operators could not release


def test_a_leader_that_lost_its_lease_stops_writing_and_exits(
        aifactory_installed: KubeTestEnv, pair: tuple[OperatorProcess, OperatorProcess]
        ) -> None:
    """Fencing: a leader frozen past its lease (a long GC pause, a stalled node) finds the
    Lease taken when it wakes; it must write nothing more and exit, while the new leader
    carries on."""
    env = aifactory_installed
    first, second = pair
    ns = "ha-fence"
    ensure_namespace(env, ns)
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(no_gpu_held_twice)
    try:
        first.start()
        second.start(leading=False)
        env.apply(training_job("before", ns, workers=1, gpus_per_worker=8,
                               expectedRuntimeSeconds=3600))
        watch.wait_phase(ns, "before", ["Running"], timeout=30)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGSTOP)
        wait_for(second.leading, 60, "the standby to take over from the frozen leader")
        env.apply(training_job("after", ns, workers=1, gpus_per_worker=8,
                               expectedRuntimeSeconds=3600))
        watch.wait_phase(ns, "after", ["Running"], timeout=30)
        first.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: first.proc is not None and first.proc.poll() is not None, 30,
                 "the old leader to notice and exit")
        assert first.proc.returncode == 3, first.log_tail()
        assert "lost the leader lease" in first.log_tail()
        assert second.alive()
        assert watch.violations == [], watch.violations[:3]
    finally:
        if first.proc is not None and first.proc.poll() is None:
            first.proc.send_signal(signal.SIGCONT)
        watch.close()
        try:
            release_all(env, ns)
        finally:
            strip_finalizers(env, ns)  # whatever the operators could not release
