"""Writes that leave the engine: status patches and Events, sent by a few asyncio tasks.

Status writes are coalesced per object (the latest status wins; a status that was
superseded before it was sent is never sent) and never run two at a time for one object,
so they land in order. They go out in two lanes: **changes** (phase, placement,
conditions) and **meters** (energy, power, cost, GPU-hours, the words of a message). A
writer always takes a change first, so no backlog of meter refreshes can delay a phase
change; a meter write superseded by a change moves to the change lane. How many meter
writes enter the meter lane is the engine's write budget (``aifactory.operators.publish``).
A write that fails for a transient reason (no answer, 409, 429, 5xx) is retried unless a
newer status replaced it; 404 means the object is gone.

Events are aggregated as client-go's recorder does (``aifactory.operators.events``): an
Event already posted is counted up with a PATCH, one still waiting counts up in place, and
under back-pressure the oldest Event that is not a phase change is dropped first (counted).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from aifactory.operators.events import EventBook, EventKey, PendingEvent
from aifactory.operators.kube import KubeClient, KubeError, ObjectRef

__all__ = ["MAX_EVENT_BACKLOG", "Outbox", "StatusKey"]

log = logging.getLogger(__name__)
MAX_EVENT_BACKLOG = 5000
EVENT_BATCH = 16
FENCE_WAIT_SECONDS = 0.1
WRITE_DELAY_ENV = "AIFACTORY_TEST_STATUS_WRITE_DELAY_SECONDS"
METER_DELAY_ENV = "AIFACTORY_TEST_METER_WRITE_DELAY_SECONDS"
StatusKey = tuple[str, str, str]  # kind, namespace ("" if cluster-scoped), name


class Outbox:
    """Pending status patches and Events, and the tasks that send them."""

    def __init__(self, kube: KubeClient, stats: dict[str, float], writers: int = 16,
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
        # The same for meter writes alone: a slow API server's meter backlog, which a
        # phase change must overtake.
        self.meter_delay_seconds = float(os.environ.get(METER_DELAY_ENV) or 0.0)
        self._status: dict[StatusKey, Mapping[str, Any]] = {}
        self._change: set[StatusKey] = set()  # queued keys whose write is a change
        self._lanes: tuple[collections.deque[StatusKey], collections.deque[StatusKey]] = \
            (collections.deque(), collections.deque())  # changes, meters
        self._status_wake = asyncio.Event()
        self._in_flight: set[StatusKey] = set()
        self.events = EventBook(MAX_EVENT_BACKLOG)
        self._event_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for i in range(self.writers):
            self._tasks.append(asyncio.create_task(self._status_writer(),
                                                   name=f"aifactory-status-{i}"))
        self._tasks.append(asyncio.create_task(self._event_writer(), name="aifactory-events"))

    @property
    def pending(self) -> bool:
        return bool(self._status or self._in_flight or len(self.events))

    @property
    def status_backlog(self) -> int:
        """Status writes queued and not yet sent."""
        return len(self._status)

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
        """Events not yet posted (phase changes first), oldest first."""
        return [(e.ref, e.type, e.reason, e.message) for e in self.events.pending()]

    def put_status(self, key: StatusKey, status: Mapping[str, Any],
                   change: bool = True) -> None:
        """Queue ``status`` for ``key``; ``change`` False: only meters or words changed."""
        queued = key in self._status
        self._status[key] = status
        if change and key not in self._change:
            self._change.add(key)
            if key not in self._in_flight:
                self._lanes[0].append(key)
        elif not queued and not change and key not in self._in_flight:
            self._lanes[1].append(key)
        self._status_wake.set()

    def put_event(self, ref: ObjectRef, type_: str, reason: str, message: str,
                  phase_change: bool = True) -> None:
        dropped, merged = self.events.dropped, self.events.merged
        self.events.add(ref, type_, reason, message, time.time(), phase_change)
        self.stats["events_dropped"] += self.events.dropped - dropped
        self.stats["events_aggregated"] += self.events.merged - merged
        self._event_wake.set()

    def _next_key(self) -> StatusKey | None:
        """The next key to write: changes first; stale lane entries are skipped."""
        for lane in self._lanes:
            while lane:
                key = lane.popleft()
                if key in self._status and key not in self._in_flight:
                    return key
        return None

    async def _status_writer(self) -> None:
        while True:
            key = self._next_key()
            if key is None:
                self._status_wake.clear()
                await self._status_wake.wait()
                continue
            if not self.may_write():
                # The lease was not renewed in time (a standby may take it over soon): hold
                # every write until it is renewed, or until this replica stops for having
                # lost it (they go with the process). Never dropped while we may lead again:
                # a starved renewal thread under load would otherwise lose statuses.
                self.stats["fenced_writes"] += 1
                self._lanes[0 if key in self._change else 1].appendleft(key)
                await asyncio.sleep(FENCE_WAIT_SECONDS)
                continue
            status = self._status.pop(key)
            change = key in self._change
            self._change.discard(key)
            self._in_flight.add(key)
            kind, namespace, name = key
            try:
                delay = self.write_delay_seconds + (0.0 if change else self.meter_delay_seconds)
                if delay:
                    await asyncio.sleep(delay)
                await self.kube.patch_status(kind, namespace or None, name, status)
                self.stats["status_patches"] += 1
                self.stats["status_patches_change" if change else "status_patches_meter"] += 1
                self.on_written(key, status)
            except KubeError as exc:
                self.stats["status_patch_errors"] += 1
                if exc.status in (0, 409, 429) or exc.status >= 500:
                    if key not in self._status:  # retry unless superseded
                        self._status[key] = status
                        if change:
                            self._change.add(key)
                    await asyncio.sleep(1.0)
                elif exc.status == 404:  # deleted meanwhile: it holds nothing
                    self.on_written(key, None)
                else:
                    log.error("status of %s %s/%s rejected: %s", kind, namespace, name, exc)
            finally:
                self._in_flight.discard(key)
                if key in self._status:  # a newer status (or a retry) waits: its lane
                    self._lanes[0 if key in self._change else 1].append(key)
                    self._status_wake.set()

    async def _event_writer(self) -> None:
        while True:
            await self._event_wake.wait()
            self._event_wake.clear()
            while len(self.events):
                batch = self.events.take(EVENT_BATCH)
                await asyncio.gather(*(self._send_event(key, event) for key, event in batch))

    async def _send_event(self, key: EventKey, event: PendingEvent) -> None:
        try:
            if event.name:
                try:
                    await self.kube.patch_event(event.ref.get("namespace") or "default",
                                                event.name, event.message, event.count,
                                                event.last_seen)
                    self.events.sent(key, event, event.name)
                    self.stats["events_patched"] += 1
                    return
                except KubeError as exc:
                    if exc.status != 404:
                        raise
                    self.events.lost(key)  # expired by the API server: post it anew
            name = await self.kube.post_event(event.ref, event.type, event.reason,
                                              event.message, event.count, event.first_seen,
                                              event.last_seen)
            self.events.sent(key, event, name)
            self.stats["events_posted"] += 1
        except KubeError as exc:
            self.stats["event_errors"] += 1
            log.debug("event not posted: %s", exc)
