"""The samples as written, on the session's real Ray cluster (4 nodes x 8 GPUs in 2 racks).

* The pre-training sample (``aifactory_examples.train:main``, 4 workers x 8 GPUs) runs through
  ``aifactory run --backend ray --fast``, the command a person types: real PyTorch DDP over
  gloo, one worker fails once (``--env FAIL_AT_STEP=20``), the gang is requeued and resumes
  from its checkpoint, so the loss continues from where it was instead of restarting.
* The mixture-of-experts sample's command (``python -m aifactory_examples.moe``) trains as a
  2-worker gang, reports through ``AIFACTORY_REPORT`` lines, fails once and resumes the same way.
* The chat sample's replicas (``python -m aifactory_examples.serve``, commands) serve real
  requests, and the backend sees each replica's requests in flight and served in all,
  through the report lines they print.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from aifactory.controller.backends.base import WorkloadPhase  # noqa: E402
from aifactory.controller.backends.ray.backend import RayBackend  # noqa: E402
from aifactory.controller.core.spec import JobSpec, Runtime  # noqa: E402
from aifactory.controller.inputs.workload import load_workload  # noqa: E402
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase  # noqa: E402
from tests.integration.ray_env import leftovers, wait_for  # noqa: E402
from tests.integration.torch_env import torch_site  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "manifests" / "samples"
FAIL_AT_STEP = 20


@pytest.mark.torch
@pytest.mark.timeout(600)
def test_the_training_sample_fails_once_under_aifactory_run_and_resumes_from_its_checkpoint(
        ray_cluster: Any, tmp_path: Path) -> None:
    site = torch_site()
    aifactory = Path(sys.executable).parent / "aifactory"
    started = time.monotonic()
    run = subprocess.run(
        [str(aifactory), "run", "--backend", "ray", "--address", ray_cluster.address,
         "--workload", str(SAMPLES / "trainingjob-llm-pretrain.yaml"), "--fast",
         "--pythonpath", site, "--env", f"FAIL_AT_STEP={FAIL_AT_STEP}",
         "--checkpoint-root", str(tmp_path), "--timeout", "400"],
        capture_output=True, text=True, timeout=500, check=False)
    took = time.monotonic() - started
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    row = next((line for line in run.stdout.splitlines() if "research/llm-pretrain" in line),
               "")
    assert "succeeded" in row, run.stdout[-3000:]

    folder = tmp_path / "research" / "llm-pretrain"
    log = [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]
    loss_at = {(e["attempt"], e["step"]): e["loss"] for e in log}
    assert {e["attempt"] for e in log} == {0, 1}  # failed once, ran again
    resumed = min(step for attempt, step in loss_at if attempt == 1)
    # --fast: 80 steps, a checkpoint every 8; the failure at step 20 leaves step 16's
    assert resumed == 16
    assert max(step for attempt, step in loss_at if attempt == 0) < FAIL_AT_STEP
    # the same weights and the same batch give the same loss at the resumed step: training
    # continued from the checkpoint, not from the untrained model
    assert loss_at[(1, resumed)] == pytest.approx(loss_at[(0, resumed)], rel=1e-4)
    assert loss_at[(1, resumed)] < 0.5 * loss_at[(0, 0)]
    assert loss_at[(1, 79)] < loss_at[(1, resumed)]
    results = [json.loads((folder / f"result-1-{rank}.json").read_text()) for rank in range(4)]
    assert {r["start"] for r in results} == {resumed}
    assert {r["world_size"] for r in results} == {4} and results[0]["backend"] == "gloo"
    assert len({r["weights_sha256"] for r in results}) == 1  # DDP kept the replicas equal
    wait_for(lambda: None, lambda: not leftovers(), timeout=30, what="cleanup")
    print(f"aifactory run: {took:.1f} s; loss {loss_at[(0, 0)]:.3f} at step 0, "
          f"{loss_at[(0, resumed)]:.4f} at step {resumed} before the failure and "
          f"{loss_at[(1, resumed)]:.4f} after it, {loss_at[(1, 79)]:.4f} at the end")


@pytest.fixture
def backend(ray_cluster: Any, tmp_path: Path) -> Iterator[RayBackend]:
    b = RayBackend(checkpoint_root=str(tmp_path), cpus_per_worker=0.1, serve_host="127.0.0.1",
                   start_timeout_seconds=60, poll_interval_seconds=0.1)
    yield b
    b.close()
    wait_for(lambda: None, lambda: not leftovers(), timeout=10, what="cleanup")


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _generate(url: str, i: int) -> str:
    body = json.dumps({"prompt": f"The scheduler {i}", "max_tokens": 200}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"),
                                timeout=30) as answer:
        text: str = json.loads(answer.read())["text"]
        return text


@pytest.mark.timeout(300)
def test_the_chat_samples_replicas_serve_and_report_their_requests(backend: RayBackend) -> None:
    specs = [a.spec for a in load_workload(SAMPLES / "inferenceservice-chat.yaml")]
    assert len(specs) == 4 and all(s.runtime.command for s in specs)
    cp = ControlPlane(backend.factory("it"), backend, topology=backend.topology)
    for spec in specs:
        cp.submit(spec)

    def running() -> bool:
        statuses = [backend.status(s.key) for s in specs]
        return all(st is not None and st.phase is WorkloadPhase.RUNNING for st in statuses)

    wait_for(cp.step, running, timeout=120, what="4 replicas running")
    urls = [backend.endpoints(s.key)[0] for s in specs]
    wait_for(lambda: None, lambda: all(_up(u) for u in urls), timeout=60, what="servers up")
    per_replica = 6
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(_generate, [u for u in urls for _ in range(per_replica)],
                              range(len(urls) * per_replica)))
    assert all(len(t) == 200 for t in texts)

    def counted() -> bool:
        reports = [r for s in specs for r in backend.workers(s.key)]
        return [(r.in_flight, r.requests_total) for r in reports] == \
            [(0, per_replica)] * len(specs)

    wait_for(cp.step, counted, timeout=30, what="every replica to report its requests")
    for spec in specs:
        cp.cancel(spec.key)


@pytest.mark.torch
@pytest.mark.timeout(300)
def test_the_moe_command_trains_as_a_gang_and_resumes_after_a_failure(
        backend: RayBackend, tmp_path: Path) -> None:
    site = torch_site()
    (sample,) = [a.spec for a in load_workload(SAMPLES / "trainingjob-rack-gang.yaml")]
    spec = JobSpec(name="moe", namespace="it", workers=2, gpus_per_worker=4, restart_limit=1,
                   runtime=Runtime(command=sample.runtime.command, env=(
                       ("PYTHONPATH", site), ("AIFACTORY_FAST", "1"),
                       ("FAIL_AT_STEP", "25"), ("OMP_NUM_THREADS", "1"))))
    cp = ControlPlane(backend.factory("it"), backend, topology=backend.topology)
    cp.submit(spec)
    wait_for(cp.step, lambda: cp.jobs[spec.key].done, timeout=240, what="the moe gang")
    rec = cp.jobs[spec.key]
    assert rec.phase == JobPhase.SUCCEEDED, rec.failed_reason
    assert rec.restarts == 1
    folder = tmp_path / "it" / "moe"
    log = [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]
    loss_at = {(e["attempt"], e["step"]): e["loss"] for e in log}
    resumed = min(step for attempt, step in loss_at if attempt == 1)
    assert resumed == 24  # --steps 1000 fast: 40 steps, a checkpoint every 4
    assert loss_at[(1, resumed)] == pytest.approx(loss_at[(0, resumed)], rel=1e-4)
    assert loss_at[(1, 39)] < loss_at[(0, 0)]
    assert (folder / "LATEST").read_text().strip().endswith("step-000040.pt")
