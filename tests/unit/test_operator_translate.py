"""The operator's pure translations: manifests to specs, placements to status and back,
conditions, inventory from Node objects. No cluster, no kopf event loop."""

from __future__ import annotations

from typing import Any

import pytest

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.placements import placement_span
from aifactory.controller.core.spec import replica_index, replica_jobs
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.operators.inventory import choose_factory, nodes_from_objects
from aifactory.operators.status import Conditions
from aifactory.operators.translate import (
    budget_from_manifest,
    format_time,
    job_spec_from_manifest,
    parse_time,
    placement_from_status,
    placement_workers,
    queue_from_manifest,
)
from tests.factories import grid

#   factory
#   ├── b0: b0-r0 (n-b0-r0-00, -01), b0-r1 (n-b0-r1-00, -01)
#   └── b1: b1-r0 (...),             b1-r1 (...)        8 GPUs per node
TOPO = grid(2, 2, 2)


def _job(spec: dict[str, Any], kind: str = "TrainingJob") -> dict[str, Any]:
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": kind,
            "metadata": {"name": "j", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": spec}


def test_gpu_feature_discovery_model_names_are_canonical() -> None:
    spec = job_spec_from_manifest(_job({"workers": 1, "gpuModel": "NVIDIA-H200|H100"}),
                                  "TrainingJob")
    assert spec.gpu_models == ("H200", "H100")


def test_kind_must_match() -> None:
    with pytest.raises(SpecError, match="kind: must be 'InferenceService'"):
        job_spec_from_manifest(_job({"workers": 1}), "InferenceService")


def test_replicas_are_keyed_apart_from_training_jobs() -> None:
    service = job_spec_from_manifest(_job({"model": "m", "maxReplicas": 3, "replicas": 3},
                                          "InferenceService"), "InferenceService")
    replicas = replica_jobs(service)
    assert [r.key for r in replicas] == ["ns/j:r0", "ns/j:r1", "ns/j:r2"]
    assert {r.group for r in replicas} == {"ns/j"}
    assert {r.group_size for r in replicas} == {3}
    assert [replica_index(r.key) for r in replicas] == [0, 1, 2]
    assert replica_index("ns/j-r0") is None  # a TrainingJob named like a replica


@pytest.mark.parametrize(("doc", "expected"), [
    pytest.param({"metadata": {"name": "gold"}, "spec": {"nominalGPUs": 64,
                  "borrowingLimitGPUs": 8, "cohort": "c", "weight": 2}},
                 ("gold", 64.0, 8.0, "c", 2.0), id="a full queue"),
    pytest.param({"metadata": {"name": "q"}, "spec": {"nominalGPUs": 0}},
                 ("q", 0.0, None, None, 1.0), id="defaults: unlimited borrowing, weight 1"),
])
def test_queue_from_manifest(doc: dict[str, Any], expected: tuple[Any, ...]) -> None:
    q = queue_from_manifest(doc)
    assert (q.name, q.nominal_gpus, q.borrowing_limit_gpus, q.cohort, q.weight) == expected


@pytest.mark.parametrize(("spec", "field"), [
    pytest.param({}, "spec.nominalGPUs", id="nominal GPUs are required"),
    pytest.param({"nominalGPUs": -1}, "spec.nominalGPUs", id="nominal GPUs are not negative"),
    pytest.param({"nominalGPUs": 1, "weight": 0}, "spec.weight", id="weight is positive"),
    pytest.param({"nominalGPUs": 1, "defaultFlexibility": 4}, "spec.defaultFlexibility",
                 id="a flexibility tier is 0-3"),
])
def test_invalid_queue_names_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        queue_from_manifest({"metadata": {"name": "q"}, "spec": spec})
    assert err.value.field == field


def test_a_queue_sets_the_flexibility_of_jobs_that_name_none() -> None:
    q = queue_from_manifest({"metadata": {"name": "batch"}, "spec": {
        "nominalGPUs": 8, "defaultFlexibility": 2}})
    assert q.default_flexibility == 2
    job = job_spec_from_manifest(_job({"workers": 1, "flexibility": 3}), "TrainingJob")
    assert job.flexibility == 3
    assert job_spec_from_manifest(_job({"workers": 1}), "TrainingJob").flexibility is None
    with pytest.raises(SpecError) as err:
        job_spec_from_manifest(_job({"workers": 1, "flexibility": 5}), "TrainingJob")
    assert err.value.field == "spec.flexibility" and "tier 0-3" in str(err.value)


def test_power_budget_selector() -> None:
    budget = budget_from_manifest({"metadata": {"name": "r"}, "spec": {
        "watts": 4000, "nodeSelector": {"matchLabels": {"aifactory.io/rack": "b0-r0"}}}})
    assert (budget.name, budget.watts, budget.selector) == (
        "r", 4000.0, (("aifactory.io/rack", "b0-r0"),))
    with pytest.raises(SpecError, match=r"spec\.watts"):
        budget_from_manifest({"metadata": {"name": "r"}, "spec": {"watts": 0}})


def test_placement_survives_the_round_trip_through_status() -> None:
    first = TOPO.gpu_start[2]
    placement = Placement("ns/j", (WorkerSlot(2, (first + 3, first + 4)),
                                   WorkerSlot(3, (TOPO.gpu_start[3],), 500)), 612.5)
    workers = placement_workers(placement, TOPO)
    assert workers == [{"node": "n-b0-r1-00", "gpus": [3, 4]},
                       {"node": "n-b0-r1-01", "gpus": [0], "milli": 500}]
    assert placement_from_status("ns/j", workers, TOPO, 612.5) == placement


@pytest.mark.parametrize(("workers", "field"), [
    pytest.param([{"node": "gone", "gpus": [0]}], "status.placement.workers[0].node",
                 id="a node that left the inventory"),
    pytest.param([{"node": "n-b0-r0-00", "gpus": [8]}], "status.placement.workers[0].gpus",
                 id="a GPU index past the node's GPUs"),
    pytest.param([{"node": "n-b0-r0-00", "gpus": [1, 1]}], "status.placement.workers[0].gpus",
                 id="one GPU twice"),
    pytest.param([{"node": "n-b0-r0-00", "gpus": [1], "milli": 0}],
                 "status.placement.workers[0].milli", id="a zero share"),
    pytest.param([], "status.placement.workers", id="no workers"),
])
def test_a_recorded_placement_that_cannot_be_rebuilt_is_refused(
        workers: list[dict[str, Any]], field: str) -> None:
    with pytest.raises(SpecError) as err:
        placement_from_status("ns/j", workers, TOPO, 0.0)
    assert err.value.field == field


@pytest.mark.parametrize(("nodes", "levels", "text"), [
    pytest.param([0], {"block": 1, "rack": 1, "node": 1}, "node n-b0-r0-00", id="one node"),
    pytest.param([0, 1], {"block": 1, "rack": 1, "node": 2}, "rack b0-r0", id="one rack"),
    pytest.param([0, 2], {"block": 1, "rack": 2, "node": 2}, "block b0", id="one block"),
    pytest.param([0, 7], {"block": 2, "rack": 2, "node": 2}, "2 blocks", id="two blocks"),
])
def test_span_names_the_smallest_domain_holding_the_gang(
        nodes: list[int], levels: dict[str, int], text: str) -> None:
    placement = Placement("j", tuple(WorkerSlot(n, (TOPO.gpu_start[n],)) for n in nodes))
    assert placement_span([placement], TOPO) == (levels, text)


def test_times_round_trip_to_the_microsecond() -> None:
    stamp = format_time(1_790_000_000.123456)
    assert stamp == "2026-09-21T14:13:20.123456Z"
    assert parse_time(stamp) == pytest.approx(1_790_000_000.123456, abs=1e-6)
    assert parse_time("not a time") is None and parse_time(None) is None


def test_condition_transition_time_moves_only_when_the_status_flips() -> None:
    conds = Conditions()
    assert conds.set("Queued", True, "InsufficientCapacity", "a", generation=1, now="t1")
    assert conds.set("Queued", True, "PowerBudgetExceeded", "b", generation=1, now="t2")
    assert conds.items["Queued"]["lastTransitionTime"] == "t1"
    assert not conds.set("Queued", True, "PowerBudgetExceeded", "b", generation=1, now="t3")
    assert conds.set("Queued", False, "Admitted", "c", generation=1, now="t4")
    assert conds.items["Queued"]["lastTransitionTime"] == "t4"
    assert not conds.clear("Preempted", "Readmitted", "x", generation=1, now="t5")
    assert [c["type"] for c in conds.as_list()] == ["Queued"]


def _node(name: str, labels: dict[str, str], allocatable: str | None = None,
          unschedulable: bool = False) -> dict[str, Any]:
    node: dict[str, Any] = {"metadata": {"name": name, "labels": labels},
                            "spec": {"unschedulable": unschedulable}}
    if allocatable is not None:
        node["status"] = {"allocatable": {"nvidia.com/gpu": allocatable}}
    return node


def test_gpu_nodes_come_from_allocatable_or_the_count_label() -> None:
    rack = {"aifactory.io/rack": "r1", "nvidia.com/gpu.product": "NVIDIA-H200"}
    nodes = nodes_from_objects([
        _node("real", rack, allocatable="8"),
        _node("kind", {**rack, "nvidia.com/gpu.count": "4"}),
        _node("cpu", {}),
        _node("cordoned", rack, allocatable="8", unschedulable=True),
        _node("broken", {**rack, "nvidia.com/gpu.count": "eight"}),
    ])
    # A cordoned node stays in the inventory (its running work is kept; nothing new lands
    # there: operators.nodes).
    assert [(n.name, n.gpus, n.gpu_model) for n in nodes] == [
        ("cordoned", 8, "H200"), ("kind", 4, "H200"), ("real", 8, "H200")]


def test_auto_inventory_falls_back_to_the_factory_spec() -> None:
    assert choose_factory("auto", [_node("cpu", {})], "small").total_gpus == 256
    cluster = choose_factory("auto", [_node("g", {"nvidia.com/gpu.clique": "c1"}, "8")],
                             "small")
    assert cluster.total_gpus == 8
    assert [lv.name for lv in cluster.levels] == ["block", "rack", "nvlink", "node"]
    with pytest.raises(SpecError, match="--inventory nodes"):
        choose_factory("nodes", [_node("cpu", {})], "small")
