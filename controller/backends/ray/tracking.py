"""What the Ray backend knows of each gang it runs, how it learns it, and the status it reads.

Status comes from polling the workers (``WorkerReport``): a worker that fails, whose actor
dies or whose node leaves the cluster fails the gang, which the control plane requeues from
its checkpoint directory (``<checkpoint_root>/<namespace>/<name>``, the same for every
attempt). A runtime environment Ray cannot set up fails the job for good
(``WorkloadStatus.fatal_reason``). ``TrackedGang`` is the backend's record of one gang;
``poll_workers`` brings the reports in and ``gang_status`` reads a ``WorkloadStatus`` from them.
Finished, failed and stopped gangs leave nothing behind (``release_gang``): actors are killed
and the placement group is removed; a command job's output is kept for ``gang_logs``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import RuntimeEnvSetupError
from ray.util.placement_group import PlacementGroup, remove_placement_group

from aifactory.controller.backends.base import WorkloadPhase, WorkloadStatus
from aifactory.controller.backends.ray.gang import WorkerPlan, WorkerReport, pg_name
from aifactory.controller.backends.ray.runtime_env import SETUP_FAILED, setup_failure_message
from aifactory.controller.core.spec import JobSpec

__all__ = ["CALL_TIMEOUT_SECONDS", "TrackedGang", "gang_logs", "gang_status", "poll_workers",
           "release_gang"]

CALL_TIMEOUT_SECONDS = 5.0  # a remote call to a worker that should answer at once


@dataclass(slots=True)
class TrackedGang:
    """One gang the backend launched or adopted: its placement group, workers and reports."""

    spec: JobSpec
    pg: PlacementGroup
    actors: list[Any]
    plans: list[WorkerPlan]
    node_ids: list[str]
    started_at: float
    ready_ref: Any = None
    ready_at: float | None = None
    reports: dict[int, WorkerReport] = field(default_factory=dict)
    pending: dict[int, Any] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    setup_failed: dict[int, str] = field(default_factory=dict)  # RuntimeEnvSetupError
    final: WorkloadStatus | None = None
    logs: dict[int, str] = field(default_factory=dict)
    capped: bool = False  # GPU limits set by set_power_cap (reset at teardown)

    @property
    def job(self) -> str:
        return self.spec.key


def poll_workers(active: Sequence[TrackedGang], alive_ids: Collection[str],
                 clock: Callable[[], float]) -> None:
    """One poll of the ``active`` gangs: note placement groups that became ready, take the
    workers' reports that arrive within 0.2 s, and mark workers whose actor died, whose
    runtime environment failed or whose node is not in ``alive_ids``."""
    refs: dict[Any, tuple[TrackedGang, int]] = {}
    for gang in active:
        if gang.ready_at is None and (gang.pg.wait(timeout_seconds=0)
                                      if gang.ready_ref is None
                                      else ray.wait([gang.ready_ref], timeout=0)[0]):
            gang.ready_at = clock()
        for rank, actor in enumerate(gang.actors):
            if rank in gang.lost or rank in gang.setup_failed:
                continue
            if rank not in gang.pending:
                gang.pending[rank] = actor.poll.remote()
            refs[gang.pending[rank]] = (gang, rank)
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.2)
    for ref in ready:
        gang, rank = refs[ref]
        gang.pending.pop(rank, None)
        try:
            gang.reports[rank] = ray.get(ref)
        except RuntimeEnvSetupError as exc:  # the job's code or packages never arrived
            gang.setup_failed[rank] = setup_failure_message(
                exc, f"worker {rank} on {gang.plans[rank].node}")
        except Exception as exc:  # the actor died: RayActorError, ActorDiedError, ...
            gang.lost[rank] = (f"worker {rank} on {gang.plans[rank].node} lost: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    for gang in active:
        for rank, node_id in enumerate(gang.node_ids):
            if node_id not in alive_ids and rank not in gang.lost:
                gang.lost[rank] = (f"worker {rank} lost: node {gang.plans[rank].node} "
                                   "left the Ray cluster")


def gang_status(gang: TrackedGang, now: float, *, energy_joules: float,
                start_timeout_seconds: float, stopped: bool = False) -> WorkloadStatus:
    """The gang's status from its workers' last reports: failed (stopped, runtime
    environment not set up, a worker lost or failed, placement group not ready after
    ``start_timeout_seconds``), succeeded, running, else starting."""
    reports = [gang.reports[r] for r in sorted(gang.reports)]
    world = len(gang.plans)
    progress = min((r.progress for r in reports), default=0.0) if len(reports) == world \
        else 0.0
    checkpoints = [r.checkpoint_at for r in reports if r.checkpoint_at is not None]
    base = WorkloadStatus(
        job=gang.job, phase=WorkloadPhase.STARTING, progress=progress,
        started_at=gang.started_at,
        last_checkpoint_at=max(checkpoints) if checkpoints else None,
        message="starting", energy_joules=energy_joules)
    failed = [r for r in reports if r.phase == "failed"]
    if stopped:
        return replace(base, phase=WorkloadPhase.FAILED, finished_at=now, message="stopped")
    if gang.setup_failed:
        return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                       message=gang.setup_failed[min(gang.setup_failed)],
                       retryable=False, fatal_reason=SETUP_FAILED)
    if gang.lost:
        return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                       message=gang.lost[min(gang.lost)],
                       lost_nodes=tuple(sorted({gang.plans[r].node for r in gang.lost})))
    if failed:
        return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                       message=failed[0].message,
                       retryable=all(r.retryable for r in failed))
    if gang.ready_at is None and now - gang.started_at > start_timeout_seconds:
        nodes = sorted({p.node for p in gang.plans})
        return replace(base, phase=WorkloadPhase.FAILED, finished_at=now,
                       message=f"placement group {pg_name(gang.job)} not ready after "
                               f"{start_timeout_seconds:g} s (pinned to "
                               f"{', '.join(nodes)})")
    if len(reports) == world and all(r.phase == "succeeded" for r in reports):
        end = max((r.finished_at or now) for r in reports)
        return replace(base, phase=WorkloadPhase.SUCCEEDED, finished_at=end,
                       message="all workers finished")
    if len(reports) == world and all(r.phase in ("running", "succeeded")
                                     for r in reports):
        endpoints = [r.endpoint for r in reports if r.endpoint]
        return replace(base, phase=WorkloadPhase.RUNNING,
                       message=f"serving at {', '.join(endpoints)}" if endpoints
                       else "running")
    return base


def release_gang(gang: TrackedGang) -> None:
    """Stop the gang's workers (keeping a command job's output), kill them and remove its
    placement group: nothing of it is left on Ray."""
    live = [(r, a) for r, a in enumerate(gang.actors)
            if r not in gang.lost and r not in gang.setup_failed]
    stops = [a.stop.remote() for _, a in live]
    if stops:
        ray.wait(stops, num_returns=len(stops), timeout=2.0)
    if gang.spec.runtime.command:
        for rank, actor in live:  # by rank: a lost worker leaves a gap, not a shift
            with contextlib.suppress(Exception):
                gang.logs[rank] = ray.get(actor.logs.remote(0), timeout=2.0)
    for actor in gang.actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    if gang.pg is not None:
        with contextlib.suppress(Exception):
            remove_placement_group(gang.pg)
    gang.actors = []
    gang.pg = None  # type: ignore[assignment]
    gang.pending.clear()


def gang_logs(gang: TrackedGang, lines: int) -> str:
    """The last ``lines`` of each worker's output (all with 0), rank by rank: kept at
    teardown, else asked of the worker."""
    parts: list[str] = []
    for rank in range(len(gang.plans)):
        text = gang.logs.get(rank)
        if text is None and rank < len(gang.actors) and rank not in gang.lost:
            try:
                text = ray.get(gang.actors[rank].logs.remote(lines),
                               timeout=CALL_TIMEOUT_SECONDS)
            except Exception:
                text = None
        if text:
            kept = text.splitlines()[-lines:] if lines > 0 else text.splitlines()
            parts.append(f"== worker {rank} ==\n" + "\n".join(kept))
    return "\n".join(parts)
