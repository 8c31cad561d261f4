"""Queue grants and priority caps, as the operator checks them before it places a job.

The API server refuses the same jobs at apply time with the same words (the admission
policies in manifests/admission.yaml; tests/integration/test_tenancy.py holds the two side by
side); these cases are the operator's own line, for clusters without the policies and for
grants revoked while a job waited.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.spec import QueueSpec
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.clock import WallClock
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators.books import EngineOptions
from aifactory.operators.engine import Engine
from aifactory.operators.tenancy import NamespaceGrant, priority_refusal
from tests.factories import grid_nodes

NODES = grid_nodes(1, 1, 2)


def grant(queues: str | None, default: str | None = None, name: str = "team-a"
          ) -> NamespaceGrant:
    annotations = {}
    if queues is not None:
        annotations["aifactory.io/queues"] = queues
    if default is not None:
        annotations["aifactory.io/default-queue"] = default
    return NamespaceGrant.from_namespace({"metadata": {"name": name,
                                                       "annotations": annotations}})


@pytest.mark.parametrize(("queues", "default", "named", "queue", "refusal"), [
    pytest.param("team-a, shared", None, "team-a", "team-a", None, id="a granted queue"),
    pytest.param("team-a, shared", None, None, "team-a", None,
                 id="no queue named: the first granted one"),
    pytest.param("team-a, shared", "shared", None, "shared", None,
                 id="no queue named: the namespace's default"),
    pytest.param("*", None, "anything", "anything", None, id="a wildcard grants every queue"),
    pytest.param("*", None, None, "default", None, id="a wildcard's default is 'default'"),
    pytest.param("team-a, shared", None, "team-b", "team-b",
                 "spec.queue: namespace team-a may not use queue team-b; its queues are "
                 "team-a, shared", id="another team's queue"),
    pytest.param(None, None, "default", "default",
                 "spec.queue: namespace team-a may not use queue default; it has no queues: "
                 "a cluster admin grants them with the annotation aifactory.io/queues on "
                 "the Namespace", id="a namespace granted nothing"),
])
def test_a_namespace_uses_only_the_queues_granted_to_it(
        queues: str | None, default: str | None, named: str | None, queue: str,
        refusal: str | None) -> None:
    g = grant(queues, default)
    assert g.queue_for(named) == queue
    assert g.queue_refusal(queue) == refusal


def test_a_priority_above_the_queues_cap_is_refused() -> None:
    capped = QueueSpec("team-a", 8, max_priority=100)
    assert priority_refusal(100, capped) is None
    assert priority_refusal(1_000_000, capped) == (
        "spec.priority: 1000000 is above the maximum priority 100 of queue team-a")
    assert priority_refusal(1_000_000, QueueSpec("open", 8)) is None
    assert priority_refusal(1_000_000, None) is None


class FakeKube:
    async def close(self) -> None:
        pass


def _engine(queues: tuple[QueueSpec, ...]) -> Engine:
    clock = WallClock()
    factory = replace(factory_from_nodes("t", NODES), queues=queues)
    topo = factory.topology()
    cp = ControlPlane(factory, SimulatedBackend(topo.nodes, clock), clock=clock, topology=topo)
    engine = Engine(cp, FakeKube(), clock, EngineOptions())  # type: ignore[arg-type]
    engine.namespaces = {}
    for name, queues_granted in (("team-a", "team-a"), ("team-b", "team-b")):
        engine.load_namespace({"metadata": {"name": name, "annotations": {
            "aifactory.io/queues": queues_granted}}})
    return engine


def _job(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}",
                         "generation": 1, "creationTimestamp": "2026-11-30T10:00:00Z"},
            "spec": {"workers": 1, "gpusPerWorker": 1, **spec}}


def _failed(engine: Engine, namespace: str, name: str) -> dict[str, Any] | None:
    status = engine.outbox.queued_status(("TrainingJob", namespace, name)) or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Failed"), None)


def test_the_operator_never_places_a_job_its_namespace_may_not_run() -> None:
    engine = _engine((QueueSpec("team-a", 8, max_priority=100), QueueSpec("team-b", 8)))
    engine.apply_job("TrainingJob", _job("sneaky", "team-a", queue="team-b"))
    engine.apply_job("TrainingJob", _job("inflated", "team-a", queue="team-a",
                                         priority=1_000_000))
    engine.apply_job("TrainingJob", _job("own", "team-a"))  # no queue: its default, team-a
    engine.apply_job("TrainingJob", _job("theirs", "team-b", queue="team-b", priority=900))
    engine.iterate()
    assert sorted(engine.cp.jobs) == ["team-a/own", "team-b/theirs"]
    assert engine.cp.jobs["team-a/own"].spec.queue == "team-a"
    assert engine.cp.jobs["team-b/theirs"].placement is not None  # the other team runs
    sneaky = _failed(engine, "team-a", "sneaky")
    assert sneaky is not None and sneaky["reason"] == "NotPermitted"
    assert sneaky["message"].startswith("spec.queue: namespace team-a may not use queue team-b")
    inflated = _failed(engine, "team-a", "inflated")
    assert inflated is not None and "above the maximum priority 100" in inflated["message"]


def test_without_the_right_to_read_namespaces_only_priority_caps_are_checked() -> None:
    engine = _engine((QueueSpec("team-a", 8, max_priority=100), QueueSpec("team-b", 8)))
    engine.namespaces = None  # the API server's admission policies hold the grants
    engine.apply_job("TrainingJob", _job("other", "team-a", queue="team-b"))
    engine.apply_job("TrainingJob", _job("inflated", "team-a", queue="team-a", priority=101))
    engine.iterate()
    assert list(engine.cp.jobs) == ["team-a/other"]
    assert _failed(engine, "team-a", "inflated") is not None
