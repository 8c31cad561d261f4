"""Pre-started workers: a few idle ``GangWorker`` actors on every GPU node, for fast starts.

A gang starts when its slowest worker runs, and starting a Ray worker process (Python, Ray's
core worker, our modules) costs about a second of CPU; eight of them at once on a loaded
node took seconds. So the backend keeps ``per_node`` idle workers started on every live
GPU node and gives them to gangs at launch; the pool is topped up again once no gang is
starting, so new processes never compete with a gang's start.

What still holds with a pooled worker:

* Where: each pooled actor is pinned to its node (``NodeAffinitySchedulingStrategy``, not
  soft) and only takes slots on that node.
* What it holds: a Ray actor cannot join a placement group after it was created, so it asks
  Ray for nothing itself (``num_cpus=0``, no GPUs); the gang's placement group still
  reserves every bundle on the node our scheduler chose, and the worker starts the program
  only once that group is placed. ``CUDA_VISIBLE_DEVICES`` is the placement's GPUs.
* One job per process: a pooled worker runs one worker of one gang and is killed with it,
  like any worker; nothing of a job (environment, CUDA context, imported modules, threads)
  can reach another. The pool starts a fresh process in its place.
* Restarts: pooled workers are detached and named ``aifactory/_pool/<node>/<token>``; a
  restarted operator finds a gang's workers by asking each pooled worker what it runs
  (``GangWorkers``), and stops idle ones and ones whose gang has no placement group left.
* Jobs that need a worker process of their own (a Ray ``runtime_env``: image, workingDir,
  pip) never use the pool (``runtime_env.needs_own_worker_process``); they get workers
  created inside their bundles as before.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aifactory.controller.backends.ray.gang import (
    POOL_PREFIX,
    RayNode,
    WorkerPlan,
    pg_name,
    pool_actor_name,
    worker_actor_name,
)

__all__ = ["GangWorkers", "WorkerPool", "stray_workers"]

_ANSWER_SECONDS = 5.0
_Answer = WorkerPlan | Exception | None  # a pooled worker's describe(): busy, silent, idle
_ACTIVE_PG_STATES = ("PENDING", "CREATED", "RESCHEDULING")


@dataclass(slots=True)
class _Idle:
    handle: Any
    name: str
    ready: Any  # describe() of the new actor: resolved once its process runs
    up: bool = False


class WorkerPool:
    """``per_node`` idle pre-started workers on each live GPU node (``fill``), handed out by
    ``take`` and never taken back. ``worker_cls`` is ``ray.remote(GangWorker)``."""

    def __init__(self, worker_cls: Any, namespace: str, per_node: int) -> None:
        if per_node < 1:
            raise ValueError(f"per_node must be >= 1, got {per_node}")
        self.per_node = per_node
        self._cls = worker_cls
        self._namespace = namespace
        self._idle: dict[str, list[_Idle]] = {}  # Ray node id -> idle workers
        self._cleaned = False

    def fill(self, nodes: Sequence[RayNode]) -> None:
        """Start workers until every live node has ``per_node`` idle ones; forget those on
        nodes that left and those whose process died. The first call also stops pooled
        workers an earlier operator left idle or orphaned (``stray_workers``)."""
        if not self._cleaned:
            self._cleaned = True
            for handle in stray_workers(self._namespace):
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)
        alive = {n.node_id for n in nodes}
        for node_id in [k for k in self._idle if k not in alive]:
            self._kill(self._idle.pop(node_id))
        self._check()
        for node in nodes:
            idle = self._idle.setdefault(node.node_id, [])
            while len(idle) < self.per_node:
                idle.append(self._start(node))

    def take(self, node: RayNode) -> Any:
        """An idle worker on ``node`` (one already running first), else one started now."""
        self._check()
        idle = self._idle.get(node.node_id, [])
        for i, worker in enumerate(idle):
            if worker.up:
                return idle.pop(i).handle
        return (idle.pop(0) if idle else self._start(node)).handle

    def warm(self) -> bool:
        """Every idle worker's process runs (a benchmark waits for this between runs)."""
        self._check()
        return all(w.up for idle in self._idle.values() for w in idle)

    def size(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> None:
        """Stop the idle workers (taken ones go with their gangs)."""
        for idle in self._idle.values():
            self._kill(idle)
        self._idle.clear()

    def _start(self, node: RayNode) -> _Idle:
        name = pool_actor_name(node.info.name, uuid.uuid4().hex[:12])
        handle = self._cls.options(
            name=name, namespace=self._namespace, lifetime="detached", num_cpus=0,
            num_gpus=0, max_concurrency=16, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote()
        return _Idle(handle, name, handle.describe.remote())

    def _check(self) -> None:
        """Mark workers whose process came up; drop those that died before use."""
        waiting = {w.ready: w for idle in self._idle.values() for w in idle if not w.up}
        if not waiting:
            return
        done, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
        dead: set[str] = set()
        for ref in done:
            try:
                ray.get(ref)
                waiting[ref].up = True
            except Exception:  # the process died (its node left, out of memory...)
                dead.add(waiting[ref].name)
        if dead:
            for node_id, idle in self._idle.items():
                self._idle[node_id] = [w for w in idle if w.name not in dead]

    @staticmethod
    def _kill(workers: Iterable[_Idle]) -> None:
        for worker in workers:
            with contextlib.suppress(Exception):
                ray.kill(worker.handle, no_restart=True)


def _pooled(namespace: str) -> list[tuple[Any, _Answer]]:
    """Every pooled worker in ``namespace`` and what it says it runs (None: idle; an
    exception: it did not answer)."""
    handles = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != namespace or \
                not str(entry.get("name", "")).startswith(POOL_PREFIX):
            continue
        with contextlib.suppress(ValueError):  # gone since listed
            handles.append(ray.get_actor(entry["name"], namespace=namespace))
    refs: list[Any] = [h.describe.remote() for h in handles]
    done: list[Any] = ray.wait(refs, num_returns=len(refs), timeout=_ANSWER_SECONDS)[0] \
        if refs else []
    found: list[tuple[Any, _Answer]] = []
    for handle, ref in zip(handles, refs, strict=True):
        answer: _Answer = TimeoutError("no answer")
        if ref in done:
            try:
                answer = ray.get(ref)
            except Exception as exc:
                answer = exc
        found.append((handle, answer))
    return found


def stray_workers(namespace: str) -> list[Any]:
    """Pooled workers nobody will use: idle or silent ones (their pool died with an earlier
    operator), and busy ones whose gang's placement group is gone."""
    active = {str(v.get("name")) for v in placement_group_table().values()
              if v.get("state") in _ACTIVE_PG_STATES}
    return [h for h, plan in _pooled(namespace)
            if not isinstance(plan, WorkerPlan) or pg_name(plan.job) not in active]


class GangWorkers:
    """A gang's worker actors, found by name after a restart: ``aifactory/<job>/w<rank>``
    for workers created in their bundles, else the pooled workers that say they run the
    job (all pooled workers are asked once, on the first lookup that needs them)."""

    def __init__(self, namespace: str) -> None:
        self._namespace = namespace
        self._pooled: dict[str, dict[int, Any]] | None = None

    def of(self, job: str, world: int) -> list[Any] | None:
        """The ``world`` workers of ``job`` in rank order, or None if any is missing."""
        try:
            return [ray.get_actor(worker_actor_name(job, r), namespace=self._namespace)
                    for r in range(world)]
        except ValueError:
            pass
        ranks = self._by_job().get(job, {})
        if sorted(ranks) != list(range(world)):
            return None
        return [ranks[r] for r in range(world)]

    def any_of(self, job: str, world: int) -> list[Any]:
        """Every worker of ``job`` still there, named or pooled (to stop them)."""
        named = []
        for r in range(world):
            with contextlib.suppress(ValueError):
                named.append(ray.get_actor(worker_actor_name(job, r),
                                           namespace=self._namespace))
        return named + list(self._by_job().get(job, {}).values())

    def jobs(self) -> dict[str, dict[int, Any]]:
        """Pooled workers that run a job: by job and rank."""
        return dict(self._by_job())

    def _by_job(self) -> dict[str, dict[int, Any]]:
        if self._pooled is None:
            self._pooled = {}
            for handle, plan in _pooled(self._namespace):
                if isinstance(plan, WorkerPlan):
                    self._pooled.setdefault(plan.job, {})[plan.rank] = handle
        return self._pooled
