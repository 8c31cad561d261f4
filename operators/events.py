"""Kubernetes Events, aggregated the way client-go's event recorder does it.

An operator that places thousands of jobs says the same things many times: the same
object waits for the same reason, a service's replicas are admitted one after another.
Posting each as a new Event floods the API server and etcd, and a bounded backlog then
drops what matters. So, as client-go's ``EventCorrelator`` does:

* **dedupe**: an Event identical to one already posted (same object, type, reason and
  message) is not posted again; the existing Event's ``count`` and ``lastTimestamp`` are
  patched. One still waiting to be posted just counts up (no call at all);
* **aggregate**: when one object posts more than ``SIMILAR_LIMIT`` Events of the same type
  and reason with different messages within ``SIMILAR_WINDOW_SECONDS``, the rest are combined
  into one Event, ``(combined from similar events): <latest message>``, whose count grows;
* **back-pressure**: the backlog of distinct Events waiting to be posted is bounded; past the
  bound the oldest Event that is not a phase change (Admitted, Running, Succeeded, Failed,
  Preempted, ...) goes first; phase changes go only past ten times the bound. Dropped
  Events are counted, never silently lost.

This module is pure bookkeeping (no I/O); ``aifactory.operators.outbox`` posts and patches.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "COMBINED_PREFIX",
    "SIMILAR_LIMIT",
    "SIMILAR_WINDOW_SECONDS",
    "EventBook",
    "EventKey",
    "PendingEvent",
]

SIMILAR_LIMIT = 10
PHASE_BACKLOG_FACTOR = 10
SIMILAR_WINDOW_SECONDS = 600.0
COMBINED_PREFIX = "(combined from similar events): "
EventKey = tuple[str, str, str, str, str]  # object uid (or kind/ns/name), type, reason, message


@dataclass(slots=True, eq=False)
class PendingEvent:
    """One Event to post (``name`` empty) or to patch (``name``: the Event posted before)."""

    ref: Mapping[str, str]
    type: str
    reason: str
    message: str
    phase_change: bool
    count: int
    first_seen: float  # wall seconds
    last_seen: float
    name: str = ""  # the Event object's name once posted


@dataclass(slots=True)
class _Posted:
    name: str
    count: int
    first_seen: float
    last_seen: float


class EventBook:
    """Which Events wait to go out, and which went out (for counting up instead)."""

    def __init__(self, max_backlog: int = 5000, max_remembered: int = 4096) -> None:
        self.max_backlog = max_backlog
        self.max_remembered = max_remembered
        # Waiting to go out, in arrival order: phase changes, and everything else.
        self._phase: collections.OrderedDict[EventKey, PendingEvent] = collections.OrderedDict()
        self._other: collections.OrderedDict[EventKey, PendingEvent] = collections.OrderedDict()
        self._posted: collections.OrderedDict[EventKey, _Posted] = collections.OrderedDict()
        # (object, type, reason) -> times of distinct messages seen in the window
        self._similar: collections.OrderedDict[tuple[str, str, str], list[float]] = \
            collections.OrderedDict()
        self.dropped = 0
        self.merged = 0

    def __len__(self) -> int:
        return len(self._phase) + len(self._other)

    def pending(self) -> list[PendingEvent]:
        """Events waiting to go out, phase changes first, oldest first."""
        return [*self._phase.values(), *self._other.values()]

    def _lane(self, phase_change: bool) -> collections.OrderedDict[EventKey, PendingEvent]:
        return self._phase if phase_change else self._other

    def add(self, ref: Mapping[str, str], type_: str, reason: str, message: str,
            now: float, phase_change: bool = True) -> None:
        """Record one occurrence of an Event."""
        obj = ref.get("uid") or f"{ref.get('kind')}/{ref.get('namespace')}/{ref.get('name')}"
        key: EventKey = (obj, type_, reason, message, "")
        lane = self._lane(phase_change)
        # A new message: aggregate once this object says too many similar things.
        if key not in lane and key not in self._posted and \
                self._similar_count(obj, type_, reason, now) >= SIMILAR_LIMIT:
            message = COMBINED_PREFIX + message
            key = (obj, type_, reason, "", "combined")
        event = lane.get(key)
        if event is not None:  # not posted yet: count up in place
            event.count += 1
            event.last_seen = now
            event.message = message
            self.merged += 1
            return
        posted = self._posted.get(key)
        if posted is not None:  # posted before: patch its count
            self._posted.move_to_end(key)
            event = PendingEvent(ref, type_, reason, message, phase_change, posted.count + 1,
                                 posted.first_seen, now, posted.name)
            self.merged += 1
        else:
            event = PendingEvent(ref, type_, reason, message, phase_change, 1, now, now)
        lane[key] = event
        self._shed()

    def _similar_count(self, obj: str, type_: str, reason: str, now: float) -> int:
        group = (obj, type_, reason)
        times = [t for t in self._similar.get(group, ()) if now - t < SIMILAR_WINDOW_SECONDS]
        times.append(now)
        self._similar[group] = times
        self._similar.move_to_end(group)
        while len(self._similar) > self.max_remembered:
            self._similar.popitem(last=False)
        return len(times) - 1

    def _shed(self) -> None:
        """Keep the backlog bounded: past ``max_backlog`` the oldest Event that is not a
        phase change goes; phase changes go only past ``PHASE_BACKLOG_FACTOR`` times that
        (a factory admitting 20,000 jobs at once tells each owner, a few MB held)."""
        while len(self) > self.max_backlog and self._other:
            self._other.popitem(last=False)
            self.dropped += 1
        while len(self._phase) > self.max_backlog * PHASE_BACKLOG_FACTOR:
            self._phase.popitem(last=False)
            self.dropped += 1

    def take(self, limit: int) -> list[tuple[EventKey, PendingEvent]]:
        """Up to ``limit`` Events to send now, phase changes first, oldest first."""
        out: list[tuple[EventKey, PendingEvent]] = []
        for lane in (self._phase, self._other):
            while lane and len(out) < limit:
                out.append(lane.popitem(last=False))
        return out

    def sent(self, key: EventKey, event: PendingEvent, name: str) -> None:
        """``event`` landed as the Event object ``name``."""
        self._posted[key] = _Posted(name, event.count, event.first_seen, event.last_seen)
        self._posted.move_to_end(key)
        while len(self._posted) > self.max_remembered:
            self._posted.popitem(last=False)

    def lost(self, key: EventKey) -> None:
        """A patch found its Event gone (expired by the API server's TTL): post anew."""
        self._posted.pop(key, None)
