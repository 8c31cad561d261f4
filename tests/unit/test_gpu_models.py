"""GPU model names agree on every path: a factory YAML, a trace, Node labels, a manifest.

Before the names were spelled once (``controller.core.gpus``), only the operator turned
``NVIDIA-H200`` (GPU Feature Discovery's product label) into ``H200``: ``aifactory simulate``
kept a job's ``gpuModel: NVIDIA-H200`` as written, found no such nodes and failed the job
for good, while the operator placed it.
"""

from __future__ import annotations

from typing import Any

import pytest

from aifactory.controller.core.gpus import (
    GENERIC_MODEL,
    KNOWN_MODELS,
    canonical_model,
    gpu_model_name,
    known_models,
)
from aifactory.controller.core.spec import JobSpec, job_from_manifest
from aifactory.controller.core.topology import GPU_PRODUCT_LABEL, NodeInfo
from aifactory.controller.inputs.factory import load_factory
from aifactory.controller.power.model import profile_for
from aifactory.controller.sim.simulation import Simulation
from aifactory.operators.inventory import nodes_from_objects
from aifactory.operators.translate import TRAINING_KIND, job_spec_from_manifest


def manifest(model: str) -> dict[str, Any]:
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": TRAINING_KIND,
            "metadata": {"name": "pinned", "namespace": "team-a"},
            "spec": {"workers": 2, "gpusPerWorker": 8, "gpuModel": model,
                     "expectedRuntimeSeconds": 60}}


@pytest.mark.parametrize(("written", "name"), [
    pytest.param("H200", "H200", id="the canonical name"),
    pytest.param("NVIDIA-H200", "H200", id="a GPU Feature Discovery product label"),
    pytest.param("NVIDIA H200", "H200", id="an nvidia-smi name"),
    pytest.param("nvidia-h100-80gb-hbm3", "H100", id="any case"),
    pytest.param("G3", "G3", id="an undisclosed trace model stays itself"),
    pytest.param("Z9000", "Z9000", id="an unknown model is kept as written"),
])
def test_every_spelling_of_a_model_gets_one_name(written: str, name: str) -> None:
    assert gpu_model_name(written) == name
    assert NodeInfo("n0", 8, written).gpu_model == name
    assert JobSpec("j", gpu_models=(written,)).gpu_models == (name,)


def test_the_simulator_and_the_operator_read_a_manifest_alike() -> None:
    doc = manifest("NVIDIA-H200")
    assert job_from_manifest(doc) == job_spec_from_manifest(doc, TRAINING_KIND)
    assert job_from_manifest(doc).gpu_models == ("H200",)


def test_a_job_naming_the_product_label_runs_in_the_simulator() -> None:
    sim = Simulation(load_factory("small"))  # 32 nodes x 8 H200
    spec = job_from_manifest(manifest("NVIDIA-H200"))
    sim.submit_at(spec, 0.0, runtime_seconds=60.0)
    result = sim.run()
    rec = sim.jobs[spec.key]
    assert rec.succeeded, rec.failed_reason or rec.reason
    assert (result.jobs_completed, result.jobs_failed) == (1, 0)


def test_nodes_from_labels_and_from_a_factory_name_the_same_model() -> None:
    (labelled,) = nodes_from_objects([{
        "metadata": {"name": "gpu-0", "labels": {GPU_PRODUCT_LABEL: "NVIDIA-H200"}},
        "status": {"allocatable": {"nvidia.com/gpu": "8"}}}])
    assert labelled.gpu_model == load_factory("small").nodes[0].gpu_model == "H200"


def test_undisclosed_models_stay_distinct_but_share_the_generic_power_profile() -> None:
    assert gpu_model_name("G2") != gpu_model_name("G3")
    assert canonical_model("G2") == canonical_model("GPU-series-1") == GENERIC_MODEL
    assert profile_for("G2").model == GENERIC_MODEL


def test_every_known_model_has_a_power_profile() -> None:
    assert set(known_models()) == set(KNOWN_MODELS)
    for model in KNOWN_MODELS:
        assert profile_for(model, strict=True).model == model
