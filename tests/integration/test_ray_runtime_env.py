"""A job's code reaches the Ray workers through ``spec.runtime`` (Ray's ``runtime_env``).

The session's Ray cluster (``ray_env``), a head without GPUs and::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01      (8 GPUs each)

The job's code lives only in a zip on a loopback HTTP server (``code_server``): its
entrypoint and its command write a token found nowhere else into the checkpoint directory.
A workingDir Ray cannot fetch fails the job with Ray's reason and no restart; an image on
this cluster (no container support) fails it before anything is started.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from aifactory.controller.backends.ray.backend import RayBackend  # noqa: E402
from aifactory.controller.backends.ray.runtime_env import (  # noqa: E402
    IMAGE_UNSUPPORTED,
    SETUP_FAILED,
)
from aifactory.controller.core.spec import JobKind, JobSpec, Runtime  # noqa: E402
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase  # noqa: E402
from tests.integration.code_server import CodeZip, code_zip, serve_folder  # noqa: E402
from tests.integration.ray_env import leftovers, wait_for  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(ray_cluster: Any, tmp_path: Path) -> Iterator[RayBackend]:
    b = RayBackend(checkpoint_root=str(tmp_path / "checkpoints"), cpus_per_worker=0.1,
                   serve_host="127.0.0.1", start_timeout_seconds=30, poll_interval_seconds=0.05,
                   runtime_env_setup_timeout_seconds=60)
    yield b
    b.close()
    left: list[str] = []
    end = time.monotonic() + 10
    while time.monotonic() < end:
        left = leftovers()
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"left on the cluster: {left}"


@pytest.fixture
def plane(backend: RayBackend) -> ControlPlane:
    return ControlPlane(backend.factory("it"), backend, "aifactory", topology=backend.topology)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    folder = tmp_path / "site"
    folder.mkdir()
    with serve_folder(folder) as url:
        yield folder, url


def _job(name: str, workers: int, runtime: Runtime, **kw: Any) -> JobSpec:
    return JobSpec(name=name, workers=workers, gpus_per_worker=1, namespace="it",
                   runtime=runtime, **kw)


def _done(cp: ControlPlane, *keys: str) -> bool:
    return all(cp.jobs[k].done for k in keys)


def _written(root: Path, job: JobSpec, prefix: str) -> list[dict[str, Any]]:
    folder = root / job.namespace / job.name
    return [json.loads((folder / f"{prefix}-{rank}.json").read_text())
            for rank in range(job.workers)]


def test_the_entrypoint_and_the_command_come_from_a_zip_over_http(
        plane: ControlPlane, backend: RayBackend, site: tuple[Path, str],
        tmp_path: Path) -> None:
    folder, url = site
    code: CodeZip = code_zip(folder, url)
    by_entrypoint = _job("zip-entry", 2, Runtime(entrypoint=code.entrypoint,
                                                 working_dir=code.url))
    by_command = _job("zip-command", 2, Runtime(command=(sys.executable, "run.py"),
                                                working_dir=code.url))
    plane.submit(by_entrypoint)
    plane.submit(by_command)
    wait_for(plane.step, lambda: _done(plane, by_entrypoint.key, by_command.key), timeout=90,
             what="both zipped jobs to finish")
    for spec in (by_entrypoint, by_command):
        rec = plane.jobs[spec.key]
        assert rec.phase == JobPhase.SUCCEEDED, (rec.failed_reason, backend.logs(spec.key))
    root = tmp_path / "checkpoints"
    for spec, prefix in ((by_entrypoint, "from-zip"), (by_command, "from-command")):
        seen = _written(root, spec, prefix)
        assert [s["token"] for s in seen] == [code.token] * spec.workers
        # Ray unpacked the zip (its one top-level folder stripped) as the working dir
        assert all("working_dir_files" in s["cwd"] for s in seen), seen
        assert not any(str(Path.cwd()) == s["cwd"] for s in seen)


def test_an_inference_replica_serves_with_the_handler_from_the_zip(
        plane: ControlPlane, backend: RayBackend, site: tuple[Path, str]) -> None:
    folder, url = site
    code = code_zip(folder, url)
    replica = JobSpec(name="zip-svc:r0", kind=JobKind.INFERENCE, namespace="it", workers=1,
                      gpus_per_worker=1, group="it/zip-svc", restart_limit=100,
                      runtime=Runtime(entrypoint=code.handler, working_dir=code.url))
    plane.submit(replica)
    wait_for(plane.step, lambda: bool(backend.endpoints(replica.key)), timeout=60,
             what="the replica to serve")
    (endpoint,) = backend.endpoints(replica.key)
    request = urllib.request.Request(endpoint, data=b"hello", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.read() == f"{code.token}:hello".encode()
    plane.cancel(replica.key)


def test_a_working_dir_ray_cannot_fetch_fails_the_job_with_rays_reason_and_no_restart(
        plane: ControlPlane, backend: RayBackend, site: tuple[Path, str]) -> None:
    _, url = site
    missing = _job("zip-missing", 2, Runtime(entrypoint="job:train",
                                             working_dir=f"{url}/not-there.zip"),
                   restart_limit=3)
    failed: list[str] = []
    plane.listeners.append(lambda reason, rec, message: failed.append(message)
                           if reason == "Failed" else None)
    started = time.monotonic()
    plane.submit(missing)
    wait_for(plane.step, lambda: _done(plane, missing.key), timeout=60,
             what="the job whose code cannot be fetched to fail")
    rec = plane.jobs[missing.key]
    assert rec.phase == JobPhase.FAILED and rec.restarts == 0, rec.history
    assert rec.fatal_reason == SETUP_FAILED
    assert "runtime environment setup failed" in (rec.failed_reason or "")
    assert "404" in (rec.failed_reason or "") and "not-there.zip" in (rec.failed_reason or "")
    assert failed == [rec.failed_reason]
    assert time.monotonic() - started < 60
    assert plane.state.free_gpus(plane.topo.root) == 32


def test_an_image_on_a_cluster_without_containers_fails_before_anything_starts(
        plane: ControlPlane, backend: RayBackend) -> None:
    from ray.util.placement_group import placement_group_table

    assert not backend.container_images
    imaged = _job("imaged", 1, Runtime(entrypoint="job:train", image="ghcr.io/example/t:1"))
    plane.submit(imaged)
    wait_for(plane.step, lambda: _done(plane, imaged.key), timeout=30,
             what="the job with an image to fail")
    rec = plane.jobs[imaged.key]
    assert rec.phase == JobPhase.FAILED and rec.restarts == 0
    assert rec.fatal_reason == IMAGE_UNSUPPORTED
    assert rec.failed_reason is not None and rec.failed_reason.startswith(
        "runtime.image ghcr.io/example/t:1 is not used: this Ray cluster does not run "
        "container images; start the operator with --ray-container-images")
    names = {str(v.get("name")) for v in placement_group_table().values()}
    assert f"aifactory/{imaged.key}" not in names  # never launched, not even briefly
