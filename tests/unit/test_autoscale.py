"""The autoscaling decision for inference replicas (pure)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import JobKind, JobSpec, replica_parts
from aifactory.controller.runtime.autoscale import (
    AutoscalePolicy,
    decide,
    policy_from_manifest,
    replica_changes,
)

POLICY = AutoscalePolicy(min_replicas=2, max_replicas=8, target_in_flight=16)


@dataclass(frozen=True)
class Case:
    id: str
    current: int
    in_flight: tuple[int, ...]
    want: int
    recent: tuple[int, ...] = ()
    policy: AutoscalePolicy = POLICY


CASES = [
    Case("load at target keeps the replicas", 4, (16, 16, 16, 16), 4),
    Case("load within the 10% tolerance keeps the replicas", 4, (17, 17, 17, 17), 4),
    Case("twice the target doubles the replicas", 2, (32, 32), 4),
    Case("no load scales down to the minimum", 4, (0, 0, 0, 0), 2),
    Case("scale-up stops at the maximum", 4, (100, 100, 100, 100), 8),
    Case("a scale-down goes no lower than a recent recommendation", 6, (8,) * 6, 5,
         recent=(5, 4)),
    Case("a recent higher recommendation never scales up by itself", 4, (8,) * 4, 4,
         recent=(7,)),
    Case("no ready replica keeps the current count within bounds", 1, (), 2),
    Case("step limit caps a scale-up", 2, (100, 100), 4,
         policy=AutoscalePolicy(1, 10, 10, max_step_up=2)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    decision = decide(case.policy, case.current, case.in_flight, case.recent)
    assert decision.replicas == case.want, decision.reason


def test_the_reason_says_the_load_and_the_change() -> None:
    reason = decide(POLICY, 2, (32, 32)).reason
    assert reason == ("64 requests in flight over 2 replicas, target 16 per replica: "
                      "scale up 2 -> 4")


SERVICE = JobSpec("chat", kind=JobKind.INFERENCE, namespace="serving", group="chat")


def test_replica_changes_add_lowest_free_and_remove_highest() -> None:
    add, remove = replica_changes(SERVICE, ["chat:r0", "chat:r2"], 4)
    assert [s.name for s in add] == ["chat:r1", "chat:r3"] and remove == []
    assert all(s.workers == 1 and s.group == "chat" for s in add)
    add, remove = replica_changes(SERVICE, ["chat:r0", "chat:r1", "chat:r5", "other"], 1)
    assert add == [] and remove == ["chat:r5", "chat:r1"]
    assert replica_parts("chat:r12") == ("chat", 12) and replica_parts("chatty") is None


def test_policy_from_the_sample_manifest_shape() -> None:
    doc = {"kind": "InferenceService", "spec": {"minReplicas": 2, "maxReplicas": 8,
                                                "autoscaling": {"targetInFlightRequests": 16}}}
    assert policy_from_manifest(doc) == POLICY
    assert policy_from_manifest({"kind": "TrainingJob", "spec": {}}) is None
    assert policy_from_manifest({"kind": "InferenceService", "spec": {}}) is None
    with pytest.raises(SpecError, match="targetInFlightRequests"):
        policy_from_manifest({"kind": "InferenceService",
                              "spec": {"autoscaling": {"targetInFlightRequests": "lots"}}})
    with pytest.raises(SpecError, match="minReplicas"):
        AutoscalePolicy(3, 2, 1.0)
