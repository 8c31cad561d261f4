"""Node health from Node objects: which nodes count as failed, which as cordoned, and the
engine failing the gangs on a failed node while a cordoned node keeps its work."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.clock import VirtualClock
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators.books import EngineOptions
from aifactory.operators.engine import Engine
from aifactory.operators.nodes import NodeBook
from tests.factories import grid_nodes

NODES = grid_nodes(1, 2, 2)  # n-b0-r0-00, n-b0-r0-01, n-b0-r1-00, n-b0-r1-01; 8 GPUs each


def node(name: str, ready: str | None = "True", taints: list[dict[str, str]] | None = None,
         gpus: str | None = "8", cordoned: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    if gpus is not None:
        status["allocatable"] = {"nvidia.com/gpu": gpus}
    return {"metadata": {"name": name},
            "spec": {"unschedulable": cordoned, "taints": taints or []}, "status": status}


@pytest.mark.parametrize(("body", "deleted", "elapsed", "failed", "cordoned"), [
    pytest.param(node("a"), False, 0.0, None, False, id="healthy"),
    pytest.param(node("a", ready=None), False, 0.0, None, False,
                 id="no Ready condition yet counts as ready"),
    pytest.param(node("a"), True, 0.0, "was deleted", False, id="deleted"),
    pytest.param(node("a", ready="False"), False, 10.0, None, False,
                 id="a NotReady blip shorter than the grace"),
    pytest.param(node("a", ready="Unknown"), False, 40.0, "has not been Ready for 40 s",
                 False, id="NotReady past the grace"),
    pytest.param(node("a", taints=[{"key": "nvidia.com/gpu.health", "effect": "NoExecute"}]),
                 False, 0.0, "tainted nvidia.com/gpu.health:NoExecute", False,
                 id="a GPU health taint"),
    pytest.param(node("a", taints=[{"key": "team", "effect": "NoSchedule"}]), False, 0.0,
                 None, False, id="a NoSchedule taint fails nothing"),
    pytest.param(node("a", gpus="6"), False, 0.0, "reports 6 allocatable nvidia.com/gpu of 8",
                 False, id="GPUs lost"),
    pytest.param(node("a", cordoned=True), False, 0.0, None, True, id="cordoned"),
])
def test_what_a_node_object_says(body: dict[str, Any], deleted: bool, elapsed: float,
                                 failed: str | None, cordoned: bool) -> None:
    book = NodeBook(grace_seconds=40.0)
    book.observe(body, deleted, now=100.0)
    book.observe(body, deleted, now=100.0 + elapsed)  # the NotReady start is kept
    bad, cordons = book.verdicts([("a", 8)], now=100.0 + elapsed)
    assert (failed is None) == ("a" not in bad)
    if failed is not None:
        assert failed in bad["a"]
    assert ("a" in cordons) is cordoned


def test_a_node_ready_again_is_healthy_and_the_notready_clock_restarts() -> None:
    book = NodeBook(grace_seconds=40.0)
    book.observe(node("a", ready="False"), False, now=0.0)
    book.observe(node("a"), False, now=30.0)
    book.observe(node("a", ready="False"), False, now=35.0)
    assert book.verdicts([("a", 8)], now=70.0) == ({}, set())  # 35 s NotReady, not 70


def _engine() -> tuple[Engine, VirtualClock]:
    clock = VirtualClock(1_790_000_000.0)
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    cp = ControlPlane(factory, SimulatedBackend(topo.nodes, clock), clock=clock, topology=topo)
    engine = Engine(cp, object(), clock, EngineOptions())  # type: ignore[arg-type]
    engine.node_book = NodeBook(grace_seconds=40.0, batch_seconds=0.0)
    return engine, clock


def _job(name: str, gpus: int) -> dict[str, Any]:
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}",
                         "generation": 1, "creationTimestamp": "2026-11-30T10:00:00Z"},
            "spec": {"workers": 1, "gpusPerWorker": gpus, "expectedRuntimeSeconds": 3600}}


def _nodes_of(engine: Engine, key: str) -> set[str]:
    rec = engine.cp.jobs[key]
    assert rec.placement is not None
    return {engine.cp.topo.nodes[s.node].name for s in rec.placement.slots}


def test_a_failed_nodes_gang_restarts_elsewhere_and_a_cordoned_node_keeps_its_work() -> None:
    engine, _ = _engine()
    engine.apply_job("TrainingJob", _job("a", 8))
    engine.apply_job("TrainingJob", _job("b", 8))
    engine.iterate()
    (where_a,), (where_b,) = _nodes_of(engine, "ns/a"), _nodes_of(engine, "ns/b")
    engine.apply_node(node(where_a), deleted=True)
    engine.apply_node(node(where_b, cordoned=True), deleted=False)
    engine.iterate()
    engine.iterate()
    rec_a = engine.cp.jobs["ns/a"]
    assert rec_a.restarts == 1
    assert any(f"node {where_a} was deleted" in line for line in rec_a.history)
    assert _nodes_of(engine, "ns/a") & {where_a, where_b} == set()  # elsewhere, not cordoned
    assert _nodes_of(engine, "ns/b") == {where_b}  # cordoned: keeps running
    engine.apply_job("TrainingJob", _job("c", 8))
    engine.iterate()
    assert _nodes_of(engine, "ns/c") & {where_a, where_b} == set()
    assert engine.stats["node_failures"] == 1
    assert where_a not in {r.node for r in engine.cp.backend.telemetry().gpus}
    assert any("was deleted" in message for *_, message in engine.outbox.queued_events())
