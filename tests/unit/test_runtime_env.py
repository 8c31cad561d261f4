"""A job's code on the workers: ``spec.runtime.workingDir``/``pip``/``image`` parsed, refused
with the field's name, mapped to Ray's ``runtime_env``, and a runtime environment that cannot
be set up failing the job for good (no restarts), with its reason on the job's condition.

The engine tests run on the factory (16 GPUs)::

    factory
    └── b0: b0-r0 (n-b0-r0-00, n-b0-r0-01), 8 GPUs each
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest

from aifactory.controller.backends.base import RuntimeRefusal, WorkloadPhase, WorkloadStatus
from aifactory.controller.backends.ray.runtime_env import (
    IMAGE_UNSUPPORTED,
    SETUP_FAILED,
    image_refusal,
    needs_own_worker_process,
    ray_runtime_env,
    setup_failure_message,
)
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import (
    WORKING_DIR_ARCHIVES,
    WORKING_DIR_SCHEMES,
    JobSpec,
    Runtime,
    job_from_manifest,
)
from aifactory.controller.core.state import Placement
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane, JobPhase
from aifactory.operators.books import EngineOptions
from aifactory.operators.engine import Engine
from tests.factories import grid_nodes
from tests.unit.test_operator_engine import FakeKube, ManualClock, _job, _reasons, _status

NODES = grid_nodes(1, 1, 2)


def manifest(runtime: dict[str, Any], kind: str = "TrainingJob") -> dict[str, Any]:
    spec: dict[str, Any] = {"runtime": runtime}
    spec.update({"workers": 2} if kind == "TrainingJob" else {"model": "m"})
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": kind,
            "metadata": {"name": "j", "namespace": "ns"}, "spec": spec}


# --------------------------------------------------------------------------- parsing

ACCEPTED = [
    "https://example.com/code/train.zip",
    "http://127.0.0.1:8000/train.zip",
    "s3://bucket/path/code.tar.gz",
    "gs://bucket/code.tgz",
    "file:///shared/code/train.tar.xz",
    "https://example.com/code.zip?token=abc",
]


@pytest.mark.parametrize("uri", ACCEPTED)
@pytest.mark.parametrize("kind", ["TrainingJob", "InferenceService"])
def test_a_working_dir_ray_can_fetch_and_pip_requirements_are_kept(uri: str, kind: str) -> None:
    job = job_from_manifest(manifest({"entrypoint": "train:main", "workingDir": uri,
                                      "pip": ["torch==2.5.1", "requests>=2; python_version>'3'"]},
                                     kind))
    assert job.runtime.working_dir == uri
    assert job.runtime.pip == ("torch==2.5.1", "requests>=2; python_version>'3'")


@dataclass(frozen=True, slots=True)
class Refused:
    id: str
    runtime: dict[str, Any]
    field: str
    words: str


REFUSED = [
    Refused("a folder is not an archive", {"workingDir": "https://example.com/code/"},
            "spec.runtime.workingDir", "must be a URI to a .zip, .tar.gz, .tgz, .tar.xz"),
    Refused("ftp is not a scheme Ray fetches", {"workingDir": "ftp://example.com/c.zip"},
            "spec.runtime.workingDir", "with scheme https, http, s3, gs"),
    Refused("a local path is not a URI", {"workingDir": "/home/me/code.zip"},
            "spec.runtime.workingDir", "e.g. 'https://example.com/code/train.zip'"),
    Refused("a URI over 2048 characters", {"workingDir": "https://e.com/" + "a" * 2040 + ".zip"},
            "spec.runtime.workingDir", "at most 2048 characters"),
    Refused("pip is a list", {"pip": "torch"}, "spec.runtime.pip", "must be of type list"),
    Refused("a pip option is not a requirement", {"pip": ["--index-url=https://x"]},
            "spec.runtime.pip[0]", "not an option"),
    Refused("a blank requirement", {"pip": ["torch", " "]}, "spec.runtime.pip[1]",
            "one pip requirement string"),
    Refused("a requirement with a newline", {"pip": ["torch\n--index-url=x"]},
            "spec.runtime.pip[0]", "one pip requirement string"),
    Refused("65 requirements", {"pip": [f"p{i}" for i in range(65)]}, "spec.runtime.pip",
            "at most 64 requirements"),
    Refused("an image runs alone", {"image": "ghcr.io/x/y:1", "pip": ["torch"]},
            "spec.runtime.image", "cannot be combined with workingDir or pip"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_bad_code_sources_are_refused_naming_the_field(case: Refused) -> None:
    with pytest.raises(SpecError) as err:
        job_from_manifest(manifest({"entrypoint": "train:main", **case.runtime}))
    assert err.value.field == case.field
    assert case.words in str(err.value)


def test_what_the_spec_accepts_is_what_ray_accepts() -> None:
    """Our schemes are Ray's remote protocols, and Ray's own validator takes every URI we
    accept (and refuses a folder we refuse)."""
    pytest.importorskip("ray")
    from ray._common.runtime_env_uri import Protocol
    from ray._private.runtime_env.validation import parse_and_validate_working_dir

    assert set(WORKING_DIR_SCHEMES) == {p.value for p in Protocol.remote_protocols()}
    for uri in ACCEPTED + [f"https://e.com/c{ext}" for ext in WORKING_DIR_ARCHIVES]:
        assert parse_and_validate_working_dir(uri) == uri
    with pytest.raises(ValueError):
        parse_and_validate_working_dir("https://example.com/code/")


# --------------------------------------------------------------------------- mapping

def test_runtime_maps_to_rays_runtime_env() -> None:
    code = Runtime(entrypoint="train:main", working_dir="https://e.com/c.zip",
                   pip=("torch==2.5.1",), env=(("A", "1"),))
    assert ray_runtime_env(code, setup_timeout_seconds=120) == {
        "working_dir": "https://e.com/c.zip", "pip": ["torch==2.5.1"],
        "config": {"setup_timeout_seconds": 120}}
    assert ray_runtime_env(Runtime(image="ghcr.io/x/y:1")) == {"image_uri": "ghcr.io/x/y:1"}
    # env is set by the worker itself; code the nodes already have needs no runtime_env
    assert ray_runtime_env(Runtime(entrypoint="m:f", env=(("A", "1"),)),
                           setup_timeout_seconds=120) == {}


def test_only_jobs_without_their_own_code_may_use_pooled_workers() -> None:
    plain = JobSpec("a", runtime=Runtime(entrypoint="m:f"))
    assert not needs_own_worker_process(plain)
    for runtime in (Runtime(entrypoint="m:f", working_dir="https://e.com/c.zip"),
                    Runtime(entrypoint="m:f", pip=("torch",)), Runtime(image="x:1")):
        assert needs_own_worker_process(replace(plain, runtime=runtime))


def test_an_image_on_a_cluster_without_containers_is_refused_saying_what_to_do() -> None:
    job = JobSpec("a", runtime=Runtime(entrypoint="m:f", image="ghcr.io/x/y:1"))
    why = image_refusal(job, container_images=False)
    assert why is not None
    assert why.startswith("runtime.image ghcr.io/x/y:1 is not used: this Ray cluster does "
                          "not run container images; start the operator with "
                          "--ray-container-images where the Ray nodes have podman")
    assert image_refusal(job, container_images=True) is None
    assert image_refusal(JobSpec("b"), container_images=False) is None


def test_rays_setup_error_becomes_one_line_with_its_cause() -> None:
    error = RuntimeError("Failed to set up runtime environment.\nTraceback (most recent):\n"
                         "  File x\nrequests.exceptions.HTTPError: 404 Client Error: File "
                         "not found for url: http://127.0.0.1:1/missing.zip\n")
    assert setup_failure_message(error, "worker 0 on n1") == (
        "worker 0 on n1: runtime environment setup failed: requests.exceptions.HTTPError: "
        "404 Client Error: File not found for url: http://127.0.0.1:1/missing.zip")


# --------------------------------------------------------------------------- failing for good

class BrokenRuntimes(SimulatedBackend):
    """The simulated backend, except that a job with a ``workingDir`` fails as a Ray gang
    whose runtime environment cannot be set up does."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(factory_from_nodes("t", NODES).topology().nodes, clock)
        self.broken: set[str] = set()

    def launch(self, spec: JobSpec, placement: Placement, work_done: float = 0.0) -> None:
        super().launch(spec, placement, work_done)
        if spec.runtime.working_dir is not None:
            self.broken.add(spec.key)

    def changed_jobs(self) -> list[str]:
        return sorted(set(super().changed_jobs()) | self.broken)

    def status(self, job: str) -> WorkloadStatus | None:
        status = super().status(job)
        if status is None or job not in self.broken:
            return status
        return replace(status, phase=WorkloadPhase.FAILED, retryable=False,
                       fatal_reason=SETUP_FAILED,
                       message="worker 0 on n-b0-r0-00: runtime environment setup failed: "
                               "HTTPError: 404")


def _engine(clock: ManualClock) -> Engine:
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    cp = ControlPlane(factory, BrokenRuntimes(clock), clock=clock, topology=topo)
    return Engine(cp, FakeKube(), clock, EngineOptions())  # type: ignore[arg-type]


def test_a_runtime_env_that_cannot_be_set_up_fails_the_job_without_restarts() -> None:
    clock = ManualClock()
    engine = _engine(clock)
    engine.apply_job("TrainingJob", _job("a", restartLimit=5, runtime={
        "entrypoint": "train:main", "workingDir": "https://e.com/missing.zip"}))
    engine.iterate()
    clock.t += 1
    engine.iterate()
    rec = engine.cp.jobs["ns/a"]
    assert rec.phase == JobPhase.FAILED and rec.restarts == 0
    status = _status(engine, "a")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == SETUP_FAILED
    assert "runtime environment setup failed: HTTPError: 404" in failed["message"]
    assert "Restarting" not in _reasons(engine)
    assert engine.cp.state.free_gpus(engine.cp.topo.root) == 16


def test_an_inference_service_whose_replicas_cannot_start_says_why() -> None:
    """A service restarts its replicas a million times; a broken runtime_env must not."""
    clock = ManualClock()
    engine = _engine(clock)
    body = _job("svc", runtime={"entrypoint": "serve:handler",
                                "workingDir": "https://e.com/missing.zip"})
    body["kind"] = "InferenceService"
    body["spec"] = {"model": "m", "replicas": 1, "gpusPerReplica": 1,
                    "runtime": body["spec"]["runtime"]}
    engine.apply_job("InferenceService", body)
    engine.iterate()
    clock.t += 1
    engine.iterate()
    status = _status(engine, "svc", kind="InferenceService")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == SETUP_FAILED



class NoContainers(BrokenRuntimes):
    """As a Ray cluster without container support: a job with an image is refused."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock)
        self.launched: list[str] = []

    def launch(self, spec: JobSpec, placement: Placement, work_done: float = 0.0) -> None:
        self.launched.append(spec.key)
        super().launch(spec, placement, work_done)

    def runtime_refusal(self, spec: JobSpec) -> RuntimeRefusal | None:
        why = image_refusal(spec, container_images=False)
        return None if why is None else RuntimeRefusal(IMAGE_UNSUPPORTED, why)


def test_an_image_the_cluster_cannot_run_fails_at_submission_and_preempts_no_one() -> None:
    """The factory is full of low-priority work; a high-priority job with an image would
    preempt it if it were placed. It is refused before placement instead."""
    clock = ManualClock()
    factory = replace(factory_from_nodes("t", NODES), queues=())
    backend = NoContainers(clock)
    cp = ControlPlane(factory, backend, clock=clock, topology=factory.topology())
    events: list[tuple[str, str]] = []
    cp.listeners.append(lambda reason, rec, message: events.append((reason, rec.spec.name)))
    low = JobSpec("low", workers=2, gpus_per_worker=8, priority=0)
    cp.submit(low)
    cp.step()
    imaged = JobSpec("imaged", workers=1, gpus_per_worker=8, priority=100,
                     runtime=Runtime(entrypoint="m:f", image="ghcr.io/x/y:1"))
    rec = cp.submit(imaged)
    cp.step()
    assert rec.phase == JobPhase.FAILED and rec.fatal_reason == IMAGE_UNSUPPORTED
    assert rec.failed_reason is not None and "--ray-container-images" in rec.failed_reason
    assert backend.launched == [low.key]
    assert cp.jobs[low.key].phase == JobPhase.RUNNING and cp.jobs[low.key].preemptions == 0
    assert ("Failed", "imaged") in events and ("Admitted", "imaged") not in events
