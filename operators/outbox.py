"""Writes that leave the engine: status patches and Events, sent by a few asyncio tasks.

Status writes are coalesced per object (the latest status wins; a status that was
superseded before it was sent is never sent) and never run two at a time for one object,
so they land in order. A write that fails for a transient reason (no answer, 409, 429, 5xx)
is retried unless a newer status replaced it; 404 means the object is gone. Events go out
in small concurrent batches; if the API server falls far behind, the oldest are dropped
(counted), never the engine blocked.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from aifactory.operators.kube import KubeClient, KubeError, ObjectRef

__all__ = ["MAX_EVENT_BACKLOG", "Outbox", "StatusKey"]

log = logging.getLogger(__name__)
MAX_EVENT_BACKLOG = 5000
WRITE_DELAY_ENV = "AIFACTORY_TEST_STATUS_WRITE_DELAY_SECONDS"
StatusKey = tuple[str, str, str]  # kind, namespace ("" if cluster-scoped), name


class Outbox:
    """Pending status patches and Events, and the tasks that send them."""

    def __init__(self, kube: KubeClient, stats: dict[str, float], writers: int = 6,
                 may_write: Callable[[], bool] | None = None,
                 on_written: Callable[[StatusKey, Mapping[str, Any] | None], None] | None
                 = None) -> None:
        self.kube = kube
        self.stats = stats
        self.writers = writers
        # The leader-election fence: status (placements) is written only while it says
        # True; a replica that lost its lease writes nothing and is about to exit.
        self.may_write = may_write or (lambda: True)
        # Told of every status that landed (None: the object is gone), for the claims.
        self.on_written = on_written or (lambda key, status: None)
        # Fault injection for tests: every status write waits this long first, so the
        # operator's picture runs ahead of the API server's (a crash in that lag must lose
        # nothing). Never set in production.
        self.write_delay_seconds = float(os.environ.get(WRITE_DELAY_ENV) or 0.0)
        self._status: dict[StatusKey, Mapping[str, Any]] = {}
        self._ready: asyncio.Queue[StatusKey] = asyncio.Queue()
        self._in_flight: set[StatusKey] = set()
        self._events: collections.deque[tuple[ObjectRef, str, str, str]] = collections.deque()
        self._event_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for i in range(self.writers):
            self._tasks.append(asyncio.create_task(self._status_writer(),
                                                   name=f"aifactory-status-{i}"))
        self._tasks.append(asyncio.create_task(self._event_writer(), name="aifactory-events"))

    @property
    def pending(self) -> bool:
        return bool(self._status or self._in_flight or self._events)

    async def close(self, flush_seconds: float) -> None:
        """Give pending writes ``flush_seconds`` to land, then stop the writers."""
        deadline = time.monotonic() + flush_seconds
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def queued_status(self, key: StatusKey) -> Mapping[str, Any] | None:
        """The status waiting to be written for ``key`` (None if none waits)."""
        return self._status.get(key)

    def queued_statuses(self) -> list[tuple[StatusKey, Mapping[str, Any]]]:
        """Every status waiting to be written."""
        return list(self._status.items())

    def queued_events(self) -> list[tuple[ObjectRef, str, str, str]]:
        """Events not yet posted, oldest first."""
        return list(self._events)

    def put_status(self, key: StatusKey, status: Mapping[str, Any]) -> None:
        fresh = key not in self._status
        self._status[key] = status
        if fresh and key not in self._in_flight:
            self._ready.put_nowait(key)

    def put_event(self, ref: ObjectRef, type_: str, reason: str, message: str) -> None:
        if len(self._events) >= MAX_EVENT_BACKLOG:
            self._events.popleft()
            self.stats["events_dropped"] += 1
        self._events.append((ref, type_, reason, message))
        self._event_wake.set()

    async def _status_writer(self) -> None:
        while True:
            key = await self._ready.get()
            status = self._status.pop(key, None)
            if status is None:
                continue
            if not self.may_write():
                self.stats["fenced_writes"] += 1
                continue
            self._in_flight.add(key)
            kind, namespace, name = key
            try:
                if self.write_delay_seconds:
                    await asyncio.sleep(self.write_delay_seconds)
                await self.kube.patch_status(kind, namespace or None, name, status)
                self.stats["status_patches"] += 1
                self.on_written(key, status)
            except KubeError as exc:
                self.stats["status_patch_errors"] += 1
                if exc.status in (0, 409, 429) or exc.status >= 500:
                    self._status.setdefault(key, status)  # retry unless superseded
                    await asyncio.sleep(1.0)
                elif exc.status == 404:  # deleted meanwhile: it holds nothing
                    self.on_written(key, None)
                else:
                    log.error("status of %s %s/%s rejected: %s", kind, namespace, name, exc)
            finally:
                self._in_flight.discard(key)
                if key in self._status:
                    self._ready.put_nowait(key)

    async def _event_writer(self) -> None:
        while True:
            await self._event_wake.wait()
            self._event_wake.clear()
            while self._events:
                batch = [self._events.popleft() for _ in range(min(8, len(self._events)))]
                results = await asyncio.gather(
                    *(self.kube.post_event(ref, type_, reason, message)
                      for ref, type_, reason, message in batch), return_exceptions=True)
                for result in results:
                    if isinstance(result, BaseException):
                        self.stats["event_errors"] += 1
                        log.debug("event not posted: %s", result)
                    else:
                        self.stats["events_posted"] += 1
