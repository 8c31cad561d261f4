"""How many replicas an InferenceService should run, from the requests its replicas hold.

A pure function in the Kubernetes HPA manner: ``desired = ceil(in_flight / target)`` where
``target`` is ``spec.autoscaling.targetInFlightRequests`` per replica, no change while the
load per replica is within ``tolerance`` of the target, clamped to ``[minReplicas,
maxReplicas]``, a scale-up at once but at most doubling the replicas (``max_step_up``
replicas when set), and a scale-down held to the highest recommendation of the last
``scale_down_stabilization_seconds`` (HPA's stabilization window, 300 s by default: the
caller, ``controller.runtime.scaler``, keeps the recent recommendations). Replicas are
gangs named ``<service>:r<i>`` (``controller.core.spec.replica_name``); ``replica_changes``
says which to submit and which to stop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import JobKind, JobSpec, replica_name, replica_parts

__all__ = ["DEFAULT_STABILIZATION_SECONDS", "AutoscalePolicy", "ScaleDecision", "decide",
           "policy_from_manifest", "replica_changes"]

DEFAULT_STABILIZATION_SECONDS = 300.0  # the HPA's scale-down stabilization window


@dataclass(frozen=True, slots=True)
class AutoscalePolicy:
    """Bounds and target of one service. ``target_in_flight`` is per replica (> 0);
    ``max_step_up`` None doubles at most (from 0: one)."""

    min_replicas: int
    max_replicas: int
    target_in_flight: float
    tolerance: float = 0.1
    max_step_up: int | None = None
    scale_down_stabilization_seconds: float = DEFAULT_STABILIZATION_SECONDS

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise SpecError("spec.minReplicas", "must be >= 1 with spec.autoscaling: "
                            "replicas follow the load that running replicas report, so from "
                            f"zero nothing would bring one back; got {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise SpecError("spec.minReplicas/maxReplicas", "need minReplicas <= "
                            f"maxReplicas, got {self.min_replicas}/{self.max_replicas}")
        if not self.target_in_flight > 0:
            raise SpecError("spec.autoscaling.targetInFlightRequests",
                            f"must be a number > 0, got {self.target_in_flight}")
        if not self.scale_down_stabilization_seconds >= 0:
            raise SpecError("spec.autoscaling.scaleDownStabilizationSeconds",
                            "must be a number of seconds >= 0, got "
                            f"{self.scale_down_stabilization_seconds}")


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """``replicas`` to run now; ``recommendation`` is what the load alone asks for (within
    bounds), which the caller keeps for the stabilization window."""

    replicas: int
    reason: str
    recommendation: int = 0


def decide(policy: AutoscalePolicy, current: int, in_flight: Sequence[float],
           recent: Sequence[int] = ()) -> ScaleDecision:
    """Replicas to run given ``current`` replicas and the in-flight count of each ready one.

    ``recent`` are earlier recommendations inside the stabilization window: a scale-down
    goes no lower than the highest of them."""
    lo, hi = policy.min_replicas, policy.max_replicas
    total = sum(max(0.0, n) for n in in_flight)
    ready = len(in_flight)
    if ready == 0:
        want = min(hi, max(lo, current))
        return ScaleDecision(want, f"no ready replica reports load: keep {want}", want)
    per_replica = total / ready
    ratio = per_replica / policy.target_in_flight
    load = (f"{total:g} requests in flight over {ready} replicas, target "
            f"{policy.target_in_flight:g} per replica")
    if abs(ratio - 1.0) <= policy.tolerance:
        want = min(hi, max(lo, current))
        return ScaleDecision(want, f"{load}: within {policy.tolerance:.0%} of target, "
                             f"keep {want}", want)
    raw = min(hi, max(lo, math.ceil(total / policy.target_in_flight - 1e-9)))
    want = raw
    if want > current:
        step = policy.max_step_up if policy.max_step_up is not None else max(current, 1)
        want = min(want, current + step)
    held = ""
    if want < current and recent:
        floor = min(current, max(recent))
        if floor > want:
            want, held = floor, (f" (held at {floor} by a recommendation of the last "
                                 f"{policy.scale_down_stabilization_seconds:g} s)")
    want = min(hi, max(lo, want))
    verb = "scale up" if want > current else "scale down" if want < current else "keep"
    return ScaleDecision(want, f"{load}: {verb} {current} -> {want}{held}", raw)


def replica_changes(service: JobSpec, running: Sequence[str], desired: int
                    ) -> tuple[list[JobSpec], list[str]]:
    """Replica specs to submit (lowest free indices first) and replica names to stop
    (highest indices first) to go from ``running`` (replica job names) to ``desired``.

    ``service`` is the InferenceService spec: replicas are named after its ``name`` and
    grouped under its ``group`` (default: its key)."""
    name = service.name
    indexed = sorted((parts[1], n) for n in running
                     if (parts := replica_parts(n)) is not None and parts[0] == name)
    have = len(indexed)
    if desired > have:
        used = {i for i, _ in indexed}
        free = (i for i in range(desired + have + 1) if i not in used)
        group = service.group or service.key
        add = [replace(service, name=replica_name(name, next(free)), workers=1, group=group,
                       group_size=desired) for _ in range(desired - have)]
        return add, []
    return [], [n for _, n in indexed[desired:][::-1]]


def policy_from_manifest(doc: Mapping[str, Any]) -> AutoscalePolicy | None:
    """The autoscaling policy of an InferenceService manifest (None without
    ``spec.autoscaling.targetInFlightRequests`` or for other kinds)."""
    if doc.get("kind") != JobKind.INFERENCE.value:
        return None
    spec = doc.get("spec")
    if not isinstance(spec, Mapping):
        return None
    auto = spec.get("autoscaling")
    if not isinstance(auto, Mapping) or auto.get("targetInFlightRequests") is None:
        return None
    target = auto["targetInFlightRequests"]
    if isinstance(target, bool) or not isinstance(target, int | float):
        raise SpecError("spec.autoscaling.targetInFlightRequests",
                        f"must be a number > 0, got {target!r}")
    lo = spec.get("minReplicas", 1)
    hi = spec.get("maxReplicas", max(lo, 1) if isinstance(lo, int) else 1)
    if not isinstance(lo, int) or not isinstance(hi, int):
        raise SpecError("spec.minReplicas/maxReplicas", "must be integers")
    window = auto.get("scaleDownStabilizationSeconds", DEFAULT_STABILIZATION_SECONDS)
    if isinstance(window, bool) or not isinstance(window, int | float):
        raise SpecError("spec.autoscaling.scaleDownStabilizationSeconds",
                        f"must be a number of seconds >= 0, got {window!r}")
    return AutoscalePolicy(lo, hi, float(target),
                           scale_down_stabilization_seconds=float(window))
