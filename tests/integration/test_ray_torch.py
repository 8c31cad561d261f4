"""End to end: real PyTorch DDP (gloo, CPU) across 2 Ray workers placed by our scheduler,
running the shipped training example (``aifactory_examples.train``).

torch comes from ``hack/install-torch.sh`` (a folder outside the repo, handed to the workers
through PYTHONPATH), so the rest of the suite never needs it. Without it the test skips,
unless AIFACTORY_REQUIRE_INTEGRATION is set (CI), where that fails.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from aifactory.controller.backends.ray.backend import RayBackend  # noqa: E402
from aifactory.controller.core.spec import JobSpec, Runtime  # noqa: E402
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase  # noqa: E402
from tests.integration.ray_env import leftovers, wait_for  # noqa: E402
from tests.integration.torch_env import torch_site  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.torch]


@pytest.fixture
def backend(ray_cluster: Any, tmp_path: Path) -> Iterator[RayBackend]:
    b = RayBackend(checkpoint_root=str(tmp_path), cpus_per_worker=0.1,
                   start_timeout_seconds=60, poll_interval_seconds=0.1)
    yield b
    b.close()
    wait_for(lambda: None, lambda: not leftovers(), timeout=10, what="cleanup")


def test_ddp_training_checkpoints_and_resumes_after_an_injected_failure(
        backend: RayBackend, tmp_path: Path) -> None:
    site = torch_site()
    spec = JobSpec(
        name="ddp", namespace="it", workers=2, gpus_per_worker=4, restart_limit=1,
        runtime=Runtime(entrypoint="aifactory_examples.train:main", env=(
            ("PYTHONPATH", site), ("STEPS", "12"), ("CHECKPOINT_EVERY", "4"),
            ("FAIL_AT_STEP", "6"), ("OMP_NUM_THREADS", "1"))))
    cp = ControlPlane(backend.factory("it"), backend, topology=backend.topology)
    submitted = time.monotonic()
    cp.submit(spec)
    wait_for(cp.step, lambda: cp.jobs[spec.key].done, timeout=150, what="DDP job to finish")
    rec = cp.jobs[spec.key]
    assert rec.phase == JobPhase.SUCCEEDED, rec.failed_reason
    assert rec.restarts == 1
    assert any("injected failure at step 6" in line for line in rec.history)
    folder = tmp_path / "it" / "ddp"
    results = [json.loads((folder / f"result-1-{r}.json").read_text()) for r in (0, 1)]
    assert [r["start"] for r in results] == [4, 4]  # resumed from the step-4 checkpoint
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]  # DDP kept them in sync
    assert {r["world_size"] for r in results} == {2} and results[0]["backend"] == "gloo"
    assert [r["steps_done"] for r in results] == [12, 12]
    losses = [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]
    loss_at = {(e["attempt"], e["step"]): e["loss"] for e in losses}
    # the resumed attempt's first step is the step the first attempt also ran from the same
    # weights and batch: the same loss, not the untrained one
    assert loss_at[(1, 4)] == pytest.approx(loss_at[(0, 4)], rel=1e-5)
    assert results[0]["loss"] < loss_at[(0, 0)]
    print(f"ddp job: {time.monotonic() - submitted:.1f} s from submission to success")
