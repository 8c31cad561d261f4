"""Gangs a previous operator left running on Ray: found by name, adopted or removed.

Placement groups and actors are detached so they outlive the operator, and a restarted
operator finds them by name (the backend's ``adoptable``/``adopt``) instead of launching
twins. A placement group of ours named ``aifactory/<namespace>/<name>`` whose workers all
say what they run is an ``AdoptableGang``; one that nobody adopts (its job was deleted while
the operator was down, or it is relaunched) is removed with its workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import (
    get_placement_group,
    placement_group_table,
    remove_placement_group,
)

from aifactory.controller.backends.ray.gang import WorkerPlan, job_of_pg, pg_name
from aifactory.controller.backends.ray.pool import GangWorkers
from aifactory.controller.backends.ray.tracking import CALL_TIMEOUT_SECONDS

__all__ = ["AdoptableGang", "GangFinder", "plans_of"]

_ACTIVE_PG_STATES = ("PENDING", "CREATED", "RESCHEDULING")


@dataclass(frozen=True, slots=True)
class AdoptableGang:
    """A gang found running on Ray (by its placement group's name) with its workers' plans."""

    job: str
    plans: tuple[WorkerPlan, ...]
    started_at: float
    attempt: int

    @property
    def slots(self) -> tuple[tuple[str, tuple[int, ...], int], ...]:
        return tuple((p.node, p.local_gpus, p.milli) for p in self.plans)


def plans_of(actors: list[Any] | None) -> list[WorkerPlan] | None:
    """What each of a gang's workers runs; None if any is missing, silent or idle."""
    if actors is None:
        return None
    try:
        plans: list[WorkerPlan | None] = ray.get([a.describe.remote() for a in actors],
                                                 timeout=CALL_TIMEOUT_SECONDS)
    except Exception:
        return None
    return None if None in plans else plans  # type: ignore[return-value]


class GangFinder:
    """Finds the gangs of ours running in Ray ``namespace`` and remembers the workers the
    last search found, for adopting them."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._found: GangWorkers | None = None  # the workers adoptable() found, for adopt

    def adoptable(self, tracked: Container[str]) -> list[AdoptableGang]:
        """Gangs of ours running on Ray whose job is not in ``tracked``, found by
        placement-group name; their workers say where they run."""
        found: list[AdoptableGang] = []
        workers = self._found = GangWorkers(self.namespace)
        for info in placement_group_table().values():
            job = job_of_pg(str(info.get("name", "")))
            if job is None or job in tracked or info.get("state") not in _ACTIVE_PG_STATES:
                continue
            plans = plans_of(workers.of(job, len(info.get("bundles") or {})))
            if plans is None:
                continue
            found.append(AdoptableGang(job, tuple(plans), min(p.started_at for p in plans),
                                       max(p.attempt for p in plans)))
        return found

    def workers_of(self, gang: AdoptableGang) -> list[Any] | None:
        """The found gang's workers, rank by rank; None if they are gone since."""
        return (self._found or GangWorkers(self.namespace)).of(gang.job, len(gang.plans))

    def remove_leftovers(self, job: str) -> None:
        """Remove a placement group (and its workers) of ``job`` the backend does not track,
        left by an earlier operator that nobody adopted."""
        try:
            pg = get_placement_group(pg_name(job))
        except ValueError:
            return
        info = placement_group_table(pg)
        for actor in GangWorkers(self.namespace).any_of(job, len(info.get("bundles") or {})):
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        remove_placement_group(pg)
