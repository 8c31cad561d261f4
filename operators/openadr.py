"""The operator's OpenADR 2.0b virtual end node (VEN): a utility's demand-response events as
``GridEvent`` values, through OpenLEADR's client (``pip install 'aifactory[grid]'``).

``grid_event_from_oadr`` is pure: one event dict (as OpenLEADR's ``on_event`` handler gets
it) becomes one GridEvent per signal interval, ``[]`` (cancelled or over: drop the event
id), or a reason naming what is wrong. Supported signals: ``SIMPLE`` (level 0-3),
``LOAD_CONTROL``/``x-loadControlCapacity`` (fraction of normal draw -> percent) and
``LOAD_DISPATCH``/``setpoint`` (W, kW or MW with an SI scale -> watts). An event with any
other signal is refused whole (opt out), so a half-understood request is never obeyed.

``OpenADRVen`` runs OpenLEADR's client in the caller's asyncio loop (``ThreadedVen``: in a
thread of its own). It opts in or out of each event, reports what the site can still shed
(a ``TELEMETRY_USAGE`` report, custom measurement ``sheddablePower`` in W, "Derived"
readings, resource ``site``: the only report kinds OpenLEADR's VTN side requests), and says
once when the VTN stops answering (``on_problem``) and once when it answers again
(``on_recovered``). Credentials are file paths (a mounted Secret); only paths are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from aifactory.controller.power.grid import DEFAULT_LEVEL_PERCENT, GridEvent

__all__ = ["NOT_FOR_US", "NotForThisSite", "OpenADRVen", "ThreadedVen", "grid_event_from_oadr",
           "guarded", "iso_utc"]

log = logging.getLogger("aifactory.openadr")
NOT_FOR_US = "not for this site"
_UNIT_WATTS = {"W": 1.0, "kW": 1e3, "MW": 1e6}
_SCALE = {None: 1.0, "none": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9}
_SUPPORTED = ("SIMPLE level, LOAD_CONTROL x-loadControlCapacity, LOAD_DISPATCH setpoint")


class NotForThisSite(str):
    """A reason that is no problem: the event targets other VENs or resources (opt out)."""


def _ts(value: object) -> float | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    return None


def _secs(value: object) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def iso_utc(t: float) -> str:
    """Epoch seconds as an RFC 3339 time in UTC, to the second (for logs and messages)."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _named(targets: object, key: str) -> set[str]:
    if not isinstance(targets, list):
        return set()
    return {str(t[key]) for t in targets if isinstance(t, Mapping) and t.get(key)}


def grid_event_from_oadr(event: Mapping[str, Any], *, now: float, budgets: tuple[str, ...] = (),
                         levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT,
                         ven_ids: Collection[str] = (), resource_ids: Collection[str] = (),
                         max_skew_seconds: float = 300.0) -> list[GridEvent] | str:
    """One GridEvent per interval of each signal (``<eventID>#<uid>``; with several signals
    ``<eventID>#<signalID>#<uid>``), from that interval's start to its end (None: duration 0,
    until cancelled); intervals already over at ``now`` are left out. ``[]``: cancelled or
    completed. A ``str``: why not; a ``NotForThisSite`` when the targets name VENs or
    resources and none is ours (``ven_ids``, ``resource_ids``)."""
    desc = event.get("event_descriptor")
    if not isinstance(desc, Mapping) or not desc.get("event_id"):
        return "event without event_descriptor.event_id"
    eid = str(desc["event_id"])
    if str(desc.get("event_status", "")).lower() in ("cancelled", "completed"):
        return []
    targets = event.get("targets")
    vens, resources = _named(targets, "ven_id"), _named(targets, "resource_id")
    if (vens or resources) and not (vens & set(ven_ids) or resources & set(resource_ids)):
        return NotForThisSite(f"event {eid}: {NOT_FOR_US} (targets VENs {sorted(vens)}, "
                              f"resources {sorted(resources)})")
    created = _ts(desc.get("created_date_time"))
    if created is not None and created - now > max_skew_seconds:
        return (f"event {eid}: created_date_time {iso_utc(created)} is {created - now:.0f} s "
                f"ahead of our clock (more than {max_skew_seconds:g} s): clock skew between the "
                "VTN and this site; check NTP on both")
    period = event.get("active_period")
    if not isinstance(period, Mapping):
        return f"event {eid}: active_period missing"
    start, duration = _ts(period.get("dtstart")), _secs(period.get("duration"))
    if start is None:
        return f"event {eid}: active_period.dtstart missing"
    if duration is None or duration < 0:
        return f"event {eid}: active_period.duration missing or negative"
    event_end = start + duration if duration else None
    signals = event.get("event_signals")
    if isinstance(signals, Mapping):  # OpenLEADR sometimes nests the list once more
        signals = signals.get("event_signals")
    if not isinstance(signals, list) or not signals:
        return f"event {eid}: event_signals missing"
    out: list[GridEvent] = []
    for sig in signals:
        name, kind = str(sig.get("signal_name")), str(sig.get("signal_type"))
        where = f"event {eid}: signal {name!r}"
        if name in ("SIMPLE", "simple") and kind == "level":
            field, factor = "level", 1.0
        elif name == "LOAD_CONTROL" and kind == "x-loadControlCapacity":
            field, factor = "percent", 100.0
        elif name == "LOAD_DISPATCH" and kind == "setpoint":
            m = sig.get("measurement")
            unit = m.get("unit") if isinstance(m, Mapping) else None
            scale = m.get("scale") if isinstance(m, Mapping) else None
            if unit not in _UNIT_WATTS or scale not in _SCALE:
                return f"{where}: measurement unit {unit!r} scale {scale!r} is not W/kW/MW"
            field, factor = "watts", _UNIT_WATTS[unit] * _SCALE[scale]
        else:
            return f"{where} of type {kind!r} is not supported (only {_SUPPORTED})"
        intervals = sig.get("intervals")
        if not isinstance(intervals, list) or not intervals:
            return f"{where} has no intervals"
        at = start
        for i, iv in enumerate(intervals):
            uid = iv.get("uid", i)
            iv_start = _ts(iv.get("dtstart"))
            iv_start = at if iv_start is None else iv_start  # 2.0b: offsets from dtstart
            length = _secs(iv.get("duration"))
            if length is None or length < 0:
                return f"{where} interval {uid}: duration missing or negative"
            iv_end = iv_start + length if length else event_end
            at = iv_end if iv_end is not None else at
            payload = iv.get("signal_payload")
            if (not isinstance(payload, int | float) or isinstance(payload, bool)
                    or not math.isfinite(payload)):
                return f"{where} interval {uid}: signal_payload missing or not a number"
            if field == "level" and (payload != int(payload) or int(payload) not in levels):
                return f"{where} interval {uid}: level {payload:g} not one of {sorted(levels)}"
            if field == "percent" and not 0.0 <= payload <= 1.0:
                return f"{where} interval {uid}: capacity {payload:g} is not a fraction 0-1"
            if field == "watts" and payload < 0:
                return f"{where} interval {uid}: setpoint {payload:g} is negative"
            if iv_end is not None and iv_end <= now:
                continue
            gid = f"{eid}#{sig.get('signal_id')}#{uid}" if len(signals) > 1 else f"{eid}#{uid}"
            value: dict[str, Any] = {field: int(payload) if field == "level"
                                     else float(payload) * factor}
            out.append(GridEvent(id=gid, start=iv_start, end=iv_end, budgets=budgets,
                                 signal_at=now, source="openadr", **value))
    return out


def guarded(fn: Callable[..., object] | None, *args: object) -> None:
    """A callback of ours must never reach OpenLEADR (it would opt out of every event)."""
    if fn is not None:
        try:
            fn(*args)
        except Exception:
            log.exception("OpenADR callback %s failed", getattr(fn, "__name__", fn))


class OpenADRVen:
    """OpenLEADR's client, its events handed to ``on_events(event_id, grid_events)`` (``[]``:
    cancelled or over; drop that id). ``on_problem(reason)``: a refused event or the VTN
    unreachable (once per outage); ``on_recovered()``: the VTN answers again. Callbacks run
    in the loop that runs the VEN. Files: ``cert``/``key`` (client TLS and message signing,
    together, with ``ca_file`` for the VTN's certificate), ``vtn_fingerprint`` (a file holding
    the VTN certificate's fingerprint; incoming messages are checked against it)."""

    def __init__(self, vtn_url: str, ven_name: str,
                 on_events: Callable[[str, list[GridEvent]], None],
                 on_problem: Callable[[str], None], sheddable_watts: Callable[[], float], *,
                 budgets: tuple[str, ...] = (),
                 levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT,
                 opt_in: Callable[[GridEvent], bool] | None = None,
                 on_recovered: Callable[[], None] | None = None,
                 cert: str | None = None, key: str | None = None, ca_file: str | None = None,
                 vtn_fingerprint: str | None = None, resource_id: str = "site",
                 report_seconds: float = 10.0, retry_seconds: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        for what, path in (("cert", cert), ("key", key), ("ca_file", ca_file),
                           ("vtn_fingerprint", vtn_fingerprint)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"OpenADR {what} file {path} does not exist")
        if not (cert is None) == (key is None) == (ca_file is None):
            raise ValueError("OpenADR cert, key and ca_file go together (OpenLEADR's TLS)")
        self.fingerprint: str | None = None
        if vtn_fingerprint is not None:
            with open(vtn_fingerprint, encoding="utf-8") as f:
                self.fingerprint = f.read().strip() or None
            if self.fingerprint is None:
                raise ValueError(f"OpenADR vtn_fingerprint file {vtn_fingerprint} is empty")
        self.vtn_url, self.ven_name = vtn_url, ven_name
        self._on_events, self._on_problem, self._on_recovered = on_events, on_problem, on_recovered
        self._sheddable, self._opt_in, self._clock = sheddable_watts, opt_in, clock
        self._budgets, self._levels, self._resource_id = budgets, levels, resource_id
        self._files = (cert, key, ca_file)
        self._report_seconds, self._retry_seconds = report_seconds, retry_seconds
        self.ven_id: str | None = None
        self.down_since: float | None = None
        self.events: dict[str, list[GridEvent]] = {}  # the last good GridEvents per event id
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Registers (retrying every ``retry_seconds`` while the VTN cannot be reached) and
        polls, in a task of the running loop; returns at once."""
        if self._task is not None:
            raise RuntimeError("OpenADRVen already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="openadr-ven")

    async def stop(self) -> None:
        """Stops polling, reporting and retrying, and closes the HTTP session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await _close(client)

    async def _run(self) -> None:
        while True:
            client = self._client = self._make_client()
            try:
                await client.run()
            except Exception as exc:  # OpenLEADR raises on some replies it cannot use
                log.warning("OpenADR registration with %s failed: %s", self.vtn_url, exc)
            if client.registration_id and client.scheduler.running:
                self.ven_id = client.ven_id
                self._reachable()
                # OpenLEADR stops polling by itself when a re-registration the VTN asked
                # for fails, or the VTN cancels our registration; then register afresh.
                while (client.registration_id and client.scheduler.running
                       and client.scheduler.get_jobs()):
                    await asyncio.sleep(self._retry_seconds)
                state, why = "lost our registration", "registering again"
            elif client.heard:
                state, why = "refused our registration", "or its reply was unusable"
            else:
                state, why = "unreachable", "registration: no reply"
            await _close(client)
            self._down(state, why)
            await asyncio.sleep(self._retry_seconds)

    def _make_client(self) -> Any:
        from openleadr import OpenADRClient, objects  # the `grid` extra

        cert, key, ca_file = self._files
        client = OpenADRClient(ven_name=self.ven_name, vtn_url=self.vtn_url, ven_id=self.ven_id,
                               cert=cert, key=key, ca_file=ca_file, show_fingerprint=False,
                               vtn_fingerprint=self.fingerprint)
        client.add_handler("on_event", self._handle)
        client.add_handler("on_update_event", self._handle)
        period = timedelta(seconds=self._report_seconds)
        client.add_report(callback=self._sheddable_now, resource_id=self._resource_id,
                          measurement="sheddablePower", unit="W", reading_type="Derived",
                          report_name="TELEMETRY_USAGE", report_duration=period,
                          sampling_rate=objects.SamplingRate(
                              min_period=period, max_period=timedelta(hours=1)))
        # A poll OpenLEADR could not use (no connection, HTTP error, timeout, a reply that
        # fails validation) comes back from ``poll()`` as (None, {}); it only logs it and
        # polls again. So ``poll`` is wrapped on this instance (``_poll``, run by the
        # scheduler, calls ``self.poll()``); the hook says whether any reply came at all.
        client.heard = False
        original = client.poll

        async def poll() -> Any:
            try:
                result = await original()
            except Exception:
                result = (None, {})
            if result[0] is None:
                self._down("unreachable", "polls get no usable reply")
            else:
                self._reachable()
            return result

        def heard(_xml: str) -> None:
            client.heard = True

        client.poll = poll
        client.add_hook("after_receive_xml", heard)
        return client

    def _sheddable_now(self) -> float:
        try:
            return float(self._sheddable())
        except Exception:
            log.exception("sheddable_watts failed; this report is skipped")
            raise

    def _down(self, state: str, why: str) -> None:
        if self.down_since is None:
            self.down_since = self._clock()
            msg = f"VTN at {self.vtn_url} {state} since {iso_utc(self.down_since)} ({why})"
            log.warning(msg)
            guarded(self._on_problem, msg)

    def _reachable(self) -> None:
        if self.down_since is not None:
            self.down_since = None
            log.info("VTN at %s answers again", self.vtn_url)
            guarded(self._on_recovered)

    async def _handle(self, event: Mapping[str, Any]) -> str:
        ours = tuple(x for x in (self._client.ven_id if self._client else None,
                                 self.ven_id, self.ven_name) if x)
        result = grid_event_from_oadr(event, now=self._clock(), budgets=self._budgets,
                                      levels=self._levels, ven_ids=ours,
                                      resource_ids=(self._resource_id,))
        if isinstance(result, NotForThisSite):
            log.info("%s; opting out", result)
            return "optOut"
        if isinstance(result, str):
            log.warning("OpenADR %s; opting out", result)
            guarded(self._on_problem, result)
            return "optOut"
        eid = str(event["event_descriptor"]["event_id"])
        try:
            agreed = self._opt_in is None or all(self._opt_in(ev) for ev in result)
        except Exception:
            log.exception("OpenADR opt_in policy failed on event %s; opting out", eid)
            agreed = False
        if agreed:
            opt = "optIn"
        else:
            log.info("OpenADR event %s: opting out by policy", eid)
            result, opt = [], "optOut"
        if result:
            self.events[eid] = result
        else:
            self.events.pop(eid, None)
        guarded(self._on_events, eid, result)
        return opt


async def _close(client: Any) -> None:
    if client.scheduler.running:
        client.scheduler.shutdown(wait=False)  # cancels the poll and report jobs in flight
    if client.report_queue_task is not None:
        client.report_queue_task.cancel()
    if client.client_session is not None and not client.client_session.closed:
        await client.client_session.close()
    await asyncio.sleep(0)


class ThreadedVen:
    """An OpenADRVen in a thread with its own event loop, for callers without asyncio. Its
    callbacks run in that thread. ``stop`` stops the VEN, ends the loop and joins the thread."""

    def __init__(self, ven: OpenADRVen) -> None:
        self.ven = ven
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        ready = threading.Event()
        loop = self._loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.ven.start())
                loop.call_soon(ready.set)
                loop.run_forever()
                loop.run_until_complete(self.ven.stop())
                rest = asyncio.all_tasks(loop)
                for task in rest:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            finally:
                loop.close()
                ready.set()

        self._thread = threading.Thread(target=main, name="openadr-ven", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"OpenADR VEN thread did not start within {timeout:g} s")

    def stop(self, timeout: float = 15.0) -> None:
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"OpenADR VEN thread did not stop within {timeout:g} s")
        self._thread = self._loop = None
