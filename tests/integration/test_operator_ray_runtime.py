"""``spec.runtime`` through the whole path: the API server takes the new fields, the operator
(``--backend ray``, no ``--ray-container-images``) runs a job whose code is only in a zip on a
loopback HTTP server, and a job with an image gets ``Failed`` with reason
``RuntimeImageUnsupported`` and words that say what to do.

The session's Ray cluster (``ray_env``): a head without GPUs and four raylets, 8 GPUs each::

    block b0
    ├── rack b0-r0: n-b0-r0-00, n-b0-r0-01
    └── rack b0-r1: n-b0-r1-00, n-b0-r1-01
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.code_server import code_zip, serve_folder
from tests.integration.k8s_env import KubeTestEnv
from tests.integration.operator_env import (
    OperatorProcess,
    Watch,
    delete_all,
    ensure_namespace,
    strip_finalizers,
    training_job,
    wait_for,
)

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.integration

NS = "ray-code"


def _ours() -> list[str]:
    from tests.integration.ray_env import leftovers

    return [x for x in leftovers() if f"aifactory/{NS}/" in x]


@pytest.fixture
def operator(aifactory_installed: KubeTestEnv, ray_cluster: Any,
             tmp_path: Path) -> Iterator[OperatorProcess]:
    env = aifactory_installed
    ensure_namespace(env, NS)
    proc = OperatorProcess(
        env, tmp_path, ["--backend=ray", f"--ray-address={ray_cluster.address}",
                        "--ray-cpus-per-worker=0.1", "--status-interval=1"],
        environ={"AIFACTORY_CHECKPOINT_ROOT": str(tmp_path / "checkpoints")})
    try:
        yield proc
    finally:
        if proc.alive():
            env.kubectl("delete", "trainingjobs", "--all", f"-n={NS}", "--timeout=30s",
                        check=False)
        proc.stop()
        delete_all(env, NS)
        strip_finalizers(env, NS)
        wait_for(lambda: not _ours(), 15, "our gangs to go", interval=0.2)


def test_code_from_a_zip_runs_and_an_unsupported_image_gets_the_condition(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, tmp_path: Path) -> None:
    env = aifactory_installed
    site = tmp_path / "site"
    site.mkdir()
    jobs = Watch(env, "trainingjobs")
    try:
        with serve_folder(site) as url:
            code = code_zip(site, url)
            operator.start()
            env.apply(training_job("zipped", NS, workers=2, runtime={
                "entrypoint": code.entrypoint, "workingDir": code.url}))
            env.apply(training_job("imaged", NS, runtime={
                "entrypoint": "train:main", "image": "ghcr.io/example/train:1.0"}))

            done = jobs.wait_phase(NS, "zipped", ["Succeeded", "Failed"], timeout=90)
            assert done["phase"] == "Succeeded", done
            folder = tmp_path / "checkpoints" / NS / "zipped"
            seen = [json.loads((folder / f"from-zip-{r}.json").read_text()) for r in (0, 1)]
            assert [s["token"] for s in seen] == [code.token] * 2

            failed = jobs.wait_phase(NS, "imaged", ["Failed"], timeout=30)
            condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
            assert condition["reason"] == "RuntimeImageUnsupported", failed
            assert condition["message"].startswith(
                "runtime.image ghcr.io/example/train:1.0 is not used: this Ray cluster does "
                "not run container images; start the operator with --ray-container-images")
            assert failed.get("restarts", 0) == 0
            assert "RuntimeImageUnsupported" in env.kubectl(
                "get", "events", f"-n={NS}", "-o", "jsonpath={.items[*].reason}").stdout
    finally:
        jobs.close()
