"""A job's code on the workers: ``spec.runtime`` as Ray's ``runtime_env``, as plain values.

``runtime.workingDir`` becomes ``working_dir`` (Ray fetches the archive on every node, unpacks
it, makes it the worker's working directory and puts it on ``sys.path`` and ``PYTHONPATH``:
an entrypoint ``module:function`` imports from it, a command such as ``[python, train.py]``
runs in it); ``runtime.pip`` becomes ``pip`` (a virtualenv per node that inherits the
node's packages, so the worker itself still imports); ``runtime.image`` becomes ``image_uri``
where the cluster runs container images (podman on every node; the image must hold Ray and
aifactory at the cluster's versions). Ray runs an image alone, so the spec refuses an image
with a workingDir or pip.

An image on a cluster that runs none is refused, not ignored: the job fails with
``RuntimeImageUnsupported`` at submission (``RayBackend.runtime_refusal``), never placed, so
it neither holds GPUs nor preempts anyone. Running it in the cluster's own image
would run other code than the user built (other packages, most often an ImportError after
the GPUs were taken), and report it as their job; failing says what to change (start the
operator with ``--ray-container-images`` where nodes have podman, or drop the image).

A runtime environment Ray cannot set up (a workingDir it cannot fetch, a pip install that
fails, a setup past its timeout) reaches the gang as ``RuntimeEnvSetupError`` when it is
polled; the job fails with ``RuntimeEnvSetupFailed`` and Ray's last line of error, without a
restart: Ray already retried the setup, and a wrong URI or requirement does not heal. The
same spec re-applied (delete and create) tries again.

A worker with a runtime environment runs in its own Ray worker process (Ray starts one per
distinct ``runtime_env``), so it can never take a pre-started or pooled worker:
``needs_own_worker_process``. No Ray import here, so it is unit-tested pure.
"""

from __future__ import annotations

from typing import Any

from aifactory.controller.core.spec import JobSpec, Runtime

__all__ = [
    "CONTAINER_IMAGES_FLAG",
    "IMAGE_UNSUPPORTED",
    "SETUP_FAILED",
    "image_refusal",
    "needs_own_worker_process",
    "ray_runtime_env",
    "setup_failure_message",
]

IMAGE_UNSUPPORTED = "RuntimeImageUnsupported"  # the job's Failed condition reason
SETUP_FAILED = "RuntimeEnvSetupFailed"
CONTAINER_IMAGES_FLAG = "--ray-container-images"


def ray_runtime_env(runtime: Runtime, *, setup_timeout_seconds: float | None = None
                    ) -> dict[str, Any]:
    """The ``runtime_env`` every worker of the job gets; ``{}`` when the job brings no code
    of its own (it runs with what the nodes have). ``setup_timeout_seconds`` bounds Ray's
    setup (fetch, unpack, pip install, image pull; Ray's default is 600 s)."""
    env: dict[str, Any] = {}
    if runtime.image is not None:
        env["image_uri"] = runtime.image
    if runtime.working_dir is not None:
        env["working_dir"] = runtime.working_dir
    if runtime.pip:
        env["pip"] = list(runtime.pip)
    if env and setup_timeout_seconds is not None:
        env["config"] = {"setup_timeout_seconds": max(1, round(setup_timeout_seconds))}
    return env


def needs_own_worker_process(spec: JobSpec) -> bool:
    """True when the job's workers need a Ray worker process of their own (a runtime_env:
    image, workingDir or pip), so no pooled or pre-started worker can serve them."""
    return bool(ray_runtime_env(spec.runtime))


def image_refusal(spec: JobSpec, container_images: bool) -> str | None:
    """Why the job cannot run on a cluster that runs no container images, or None."""
    if spec.runtime.image is None or container_images:
        return None
    return (f"runtime.image {spec.runtime.image} is not used: this Ray cluster does not run "
            f"container images; start the operator with {CONTAINER_IMAGES_FLAG} where the "
            "Ray nodes have podman, or drop runtime.image and bring the code with "
            "runtime.workingDir and runtime.pip")


def setup_failure_message(error: BaseException, worker: str) -> str:
    """Ray's ``RuntimeEnvSetupError`` in one line: who failed and Ray's last line of the
    error (the underlying exception: connection refused, HTTP 404, pip's error)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    cause = lines[-1] if lines else type(error).__name__
    return f"{worker}: runtime environment setup failed: {cause[-500:]}"
