"""The CRDs on a real API server: they install, samples apply, invalid input is refused.

No operator runs here: this is what the API server itself enforces from the OpenAPI schemas
and CEL rules in ``manifests/crds/``. Each file in ``tests/integration/invalid/`` is one
manifest with ``# expect:`` lines; the server's refusal must contain every one (they name
the field).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.k8s_env import REPO_ROOT, KubeTestEnv
from tests.integration.operator_env import ensure_namespace, training_job, wait_for

pytestmark = pytest.mark.integration

INVALID_DIR = Path(__file__).parent / "invalid"
INVALID = sorted(INVALID_DIR.glob("*.yaml"))
SAMPLES = REPO_ROOT / "manifests" / "samples"
KINDS = {"trainingjobs": ("TrainingJob", "tj"), "inferenceservices": ("InferenceService", "isvc"),
         "gpuqueues": ("GPUQueue", "gq"), "powerbudgets": ("PowerBudget", "pb")}


def _expectations(path: Path) -> list[str]:
    return [line.removeprefix("# expect:").strip() for line in path.read_text().splitlines()
            if line.startswith("# expect:")]


def test_the_corpus_is_large_enough_and_every_file_says_what_it_expects() -> None:
    assert len(INVALID) >= 30
    for path in INVALID:
        assert _expectations(path), f"{path.name} has no '# expect:' line"
        assert len(list(yaml.safe_load_all(path.read_text()))) == 1, path.name


@pytest.mark.parametrize("plural", sorted(KINDS))
def test_crd_has_short_name_category_status_and_printer_columns(
        aifactory_installed: KubeTestEnv, plural: str) -> None:
    crd = json.loads(aifactory_installed.kubectl(
        "get", "crd", f"{plural}.aifactory.io", "-o", "json").stdout)
    kind, short = KINDS[plural]
    assert crd["spec"]["names"]["kind"] == kind
    assert short in crd["spec"]["names"]["shortNames"]
    assert "aifactory" in crd["spec"]["names"]["categories"]
    version = crd["spec"]["versions"][0]
    assert "status" in version["subresources"]
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    if plural == "trainingjobs":
        assert {"Phase", "GPUs", "Span", "Queue", "Power(W)", "Energy(kWh)", "Age"} <= columns
    if plural == "inferenceservices":
        assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


def test_every_sample_applies(aifactory_installed: KubeTestEnv) -> None:
    env = aifactory_installed
    docs = [d for f in sorted(SAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
            if d]
    kinds = {d["kind"] for d in docs}
    assert {"TrainingJob", "InferenceService", "GPUQueue", "PowerBudget"} <= kinds
    try:
        out = env.kubectl("apply", "-f", str(SAMPLES)).stdout
        for doc in docs:
            assert f"{doc['kind'].lower()}/{doc['metadata']['name']}" in out.replace(
                ".aifactory.io", ""), out
        listed = env.kubectl("get", "aifactory", "-A", "-o", "name").stdout.split()
        ours = [d for d in docs if d["apiVersion"].startswith("aifactory.io/")]
        assert len(listed) == len(ours), listed
    finally:
        # No operator runs in this module, so nothing holds a finalizer: deletes are final.
        for doc in reversed(docs):
            if doc["kind"] != "Namespace":
                ns = doc["metadata"].get("namespace")
                env.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"],
                            *([f"-n={ns}"] if ns else []), "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def corpus_namespace(aifactory_installed: KubeTestEnv) -> Iterator[str]:
    """``invalid-corpus``, granted the queues default and corpus-capped (maxPriority 10);
    the GPUQueue goes afterwards (other modules run with no GPUQueue)."""
    env = aifactory_installed
    ensure_namespace(env, "invalid-corpus", queues="default, corpus-capped")
    env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "GPUQueue",
               "metadata": {"name": "corpus-capped"},
               "spec": {"nominalGPUs": 8, "maxPriority": 10}})
    yield "invalid-corpus"
    env.kubectl("delete", "gpuqueue", "corpus-capped", "--ignore-not-found", check=False)


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
def test_invalid_manifest_is_rejected_naming_the_field(
        aifactory_installed: KubeTestEnv, corpus_namespace: str, path: Path) -> None:
    expectations = _expectations(path)

    def refused() -> subprocess.CompletedProcess[str] | None:
        # The admission policies see a new Namespace or GPUQueue a moment after it is made.
        result = aifactory_installed.kubectl("apply", "--dry-run=server", "-f", str(path),
                                             check=False)
        if result.returncode != 0 and all(e in result.stderr for e in expectations):
            return result
        return None

    try:
        wait_for(refused, 30, f"{path.name} to be refused", interval=0.2)
    except AssertionError:
        result = aifactory_installed.kubectl("apply", "--dry-run=server", "-f", str(path),
                                             check=False)
        assert result.returncode != 0, f"{path.name} was accepted:\n{result.stdout}"
        for expected in expectations:
            assert expected in result.stderr, \
                f"{path.name}: {expected!r} not in:\n{result.stderr}"


def test_trainingjob_spec_is_immutable(aifactory_installed: KubeTestEnv) -> None:
    env = aifactory_installed
    ensure_namespace(env, "crd-immutable")
    env.apply(training_job("fixed", "crd-immutable", workers=2))
    try:
        changed = env.kubectl("apply", "-f", "-", check=False, input=yaml.safe_dump(
            training_job("fixed", "crd-immutable", workers=4)))
        assert changed.returncode != 0
        assert "spec: Invalid value" in changed.stderr and "immutable" in changed.stderr
    finally:
        env.kubectl("delete", "trainingjob", "fixed", "-n=crd-immutable", check=False)


def test_inference_service_scales_within_its_bounds(aifactory_installed: KubeTestEnv) -> None:
    env = aifactory_installed
    ensure_namespace(env, "crd-scale")
    env.apply({"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
               "metadata": {"name": "svc", "namespace": "crd-scale"},
               "spec": {"model": "m", "minReplicas": 1, "maxReplicas": 4, "replicas": 2}})
    try:
        env.kubectl("scale", "inferenceservice", "svc", "-n=crd-scale", "--replicas=4")
        replicas = env.kubectl("get", "isvc", "svc", "-n=crd-scale", "-o",
                               "jsonpath={.spec.replicas}").stdout
        assert replicas == "4"
        too_many = env.kubectl("scale", "isvc", "svc", "-n=crd-scale", "--replicas=5",
                               check=False)
        assert too_many.returncode != 0
        assert "spec.replicas" in too_many.stderr and "maxReplicas" in too_many.stderr
    finally:
        env.kubectl("delete", "isvc", "svc", "-n=crd-scale", check=False)
