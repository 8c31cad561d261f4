"""OpenADR 3 events as ``GridEvent`` values, and the report the VEN files back: pure.

``grid_events_from_oa3`` reads one event object as a VTN's ``GET /events`` returns it (3.1 and
3.0.1: string targets or ``{type, values}`` targets alike) and gives one GridEvent per interval
payload, ``[]`` (every interval over: drop the event id), or a reason naming what is wrong (a
``NotForThisSite`` when its targets name others). Supported payload types, from the
Definitions' enumerations: ``SIMPLE`` (level 0-3, mapped by ``--grid-levels``),
``IMPORT_CAPACITY_LIMIT`` and ``DISPATCH_SETPOINT`` (power: ``KW`` unless the event's or the
program's ``payloadDescriptors`` say ``W``, ``MW`` or ``PERCENT`` of the base limit). An event
with any other payload type is refused whole, so a half-understood request is never obeyed.

Timing follows the User Guide: ``event.intervalPeriod`` gives the default start and duration;
an interval's own ``intervalPeriod`` overrides it; an interval without a start follows the one
before it. Start ``0001-01-01`` is "now" (taken as the event's creation); a duration of
``P9999Y``, ``PT0S`` or none is "until cancelled" (the event disappears from the VTN).

``report_body`` is what the site can still shed, as a ``LOAD_SHED_DELTA_AVAILABLE`` report
(``KW``, ``DIRECT_READ``, resource ``site``) on one event.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aifactory.controller.power.grid import DEFAULT_LEVEL_PERCENT, GridEvent
from aifactory.operators.openadr import NOT_FOR_US, NotForThisSite, iso_utc

__all__ = ["REPORT_PAYLOAD", "SUPPORTED", "grid_events_from_oa3", "parse_duration",
           "parse_time", "report_body", "target_terms"]

SUPPORTED = ("SIMPLE", "IMPORT_CAPACITY_LIMIT", "DISPATCH_SETPOINT")
REPORT_PAYLOAD = "LOAD_SHED_DELTA_AVAILABLE"
_POWER_UNITS = {"W": 1.0, "KW": 1e3, "MW": 1e6}
_FOREVER_YEARS = 9999
_NOW_YEAR = 1  # "0001-01-01": now
_DURATION = re.compile(r"^(-?)P(?=\d|T\d)(?:(\d+)Y)?(?:(\d+)M)?(?:(\d+)([DW]))?"
                       r"(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?$")


def parse_duration(text: object) -> float | None:
    """ISO 8601 duration -> seconds (``math.inf`` for ``P9999Y``; a year 365 days, a month
    30); None when it is not one."""
    if not isinstance(text, str):
        return None
    m = _DURATION.match(text)
    if m is None:
        return None
    sign, years, months, days, unit, hours, minutes, seconds = m.groups()
    if years and int(years) >= _FOREVER_YEARS:
        return math.inf
    total = ((int(years or 0) * 365 + int(months or 0) * 30) * 86_400
             + int(days or 0) * (7 if unit == "W" else 1) * 86_400
             + int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0))
    return -total if sign else total


def parse_time(text: object) -> datetime | None:
    """RFC 3339 date-time (or a bare date) -> an aware datetime; None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def target_terms(targets: object) -> set[str]:
    """An object's targets as plain terms: 3.1 strings, or 3.0.1 ``{type, values}`` maps."""
    if not isinstance(targets, list):
        return set()
    out: set[str] = set()
    for t in targets:
        if isinstance(t, str) and t:
            out.add(t)
        elif isinstance(t, Mapping) and isinstance(t.get("values"), list):
            out.update(str(v) for v in t["values"] if v not in (None, ""))
    return out


def _units(descriptors: Sequence[object]) -> dict[str, str]:
    """payloadType -> units, from ``payloadDescriptors`` (the first wins)."""
    out: dict[str, str] = {}
    for d in descriptors:
        if isinstance(d, Mapping) and isinstance(d.get("payloadType"), str):
            units = d.get("units")
            if isinstance(units, str) and units:
                out.setdefault(d["payloadType"], units.upper())
    return out


def _number(values: object) -> float | None:
    if not isinstance(values, list) or len(values) != 1:
        return None
    v = values[0]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def grid_events_from_oa3(event: Mapping[str, Any], *, now: float,
                         budgets: tuple[str, ...] = (),
                         levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT,
                         names: Collection[str] = (),
                         program_descriptors: Sequence[object] = (),
                         max_skew_seconds: float = 300.0) -> list[GridEvent] | str:
    """One GridEvent per interval payload (``<id>#<interval id>``; with several payloads in
    an interval ``<id>#<interval id>#<type>``); intervals over at ``now`` are left out.
    ``names``: this VEN's name and target terms (an event targeting none of them is not
    ours). A ``str``: why not (see the module)."""
    eid = event.get("id")
    if not isinstance(eid, str) or not eid:
        return "event without an id"
    where = f"event {eid}" + (f" ({event['eventName']})" if event.get("eventName") else "")
    terms = target_terms(event.get("targets"))
    if terms and names and not terms & set(names):
        return NotForThisSite(f"{where}: {NOT_FOR_US} (targets {sorted(terms)})")
    created_at = parse_time(event.get("createdDateTime"))
    created = created_at.timestamp() if created_at else None
    if created is not None and created - now > max_skew_seconds:
        return (f"{where}: createdDateTime {iso_utc(created)} is {created - now:.0f} s ahead "
                f"of our clock (more than {max_skew_seconds:g} s): clock skew between the "
                "VTN and this site; check NTP on both")
    descriptors = event.get("payloadDescriptors") or []
    if not isinstance(descriptors, list):
        return f"{where}: payloadDescriptors is not a list"
    units = {**_units(program_descriptors), **_units(descriptors)}
    period = event.get("intervalPeriod")
    default: Mapping[str, Any] = period if isinstance(period, Mapping) else {}
    intervals = event.get("intervals")
    if not isinstance(intervals, list) or not intervals:
        return f"{where}: intervals missing"
    out: list[GridEvent] = []
    at: float | None = None  # where the next interval starts if it names no start
    for i, iv in enumerate(intervals):
        if not isinstance(iv, Mapping):
            return f"{where}: interval {i} is not an object"
        iid = iv.get("id", i)
        period = iv.get("intervalPeriod")
        own: Mapping[str, Any] = period if isinstance(period, Mapping) else {}
        start_text = own.get("start", default.get("start") if at is None else None)
        if start_text is None and at is None:
            return f"{where} interval {iid}: intervalPeriod.start missing (on it or the event)"
        if start_text is not None:
            start_at = parse_time(start_text)
            if start_at is None:
                return f"{where} interval {iid}: start {start_text!r} is not an RFC 3339 time"
            start = (created if created is not None else now) if start_at.year == _NOW_YEAR \
                else start_at.timestamp()
        else:
            assert at is not None
            start = at
        dur_text = own.get("duration", default.get("duration"))
        length = 0.0 if dur_text is None else parse_duration(dur_text)
        if length is None or length < 0:
            return (f"{where} interval {iid}: duration {dur_text!r} is not a non-negative "
                    "ISO 8601 duration such as PT1H")
        end = None if length in (0.0, math.inf) else start + length
        at = end if end is not None else start
        payloads = iv.get("payloads")
        if not isinstance(payloads, list) or not payloads:
            return f"{where} interval {iid}: payloads missing"
        for p in payloads:
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind not in SUPPORTED:
                return (f"{where} interval {iid}: payload type {kind!r} is not supported "
                        f"(only {', '.join(SUPPORTED)})")
            value = _number(p.get("values"))
            if value is None:
                return f"{where} interval {iid}: {kind} values must be one number"
            field: dict[str, Any]
            if kind == "SIMPLE":
                if value != int(value) or int(value) not in levels:
                    return f"{where} interval {iid}: SIMPLE level {value:g} not one of " \
                           f"{sorted(levels)}"
                field = {"level": int(value)}
            else:
                unit = units.get(kind, "KW")
                if value < 0:
                    return f"{where} interval {iid}: {kind} {value:g} {unit} is negative"
                if unit == "PERCENT":
                    if value > 100:
                        return f"{where} interval {iid}: {kind} {value:g} % is over 100"
                    field = {"percent": value}
                elif unit in _POWER_UNITS:
                    field = {"watts": value * _POWER_UNITS[unit]}
                else:
                    return (f"{where} interval {iid}: {kind} units {unit!r} are not power "
                            f"(KW, W, MW) or PERCENT")
            if end is not None and end <= now:
                continue
            gid = f"{eid}#{iid}" + (f"#{kind}" if len(payloads) > 1 else "")
            out.append(GridEvent(id=gid, start=start, end=end, budgets=budgets,
                                 signal_at=now, source="openadr", **field))
    return out


def report_body(event: Mapping[str, Any], client_name: str, watts: float, now: float,
                period_seconds: float, resource: str = "site") -> dict[str, Any]:
    """A report on ``event``: what the site can still shed (``watts``, sent in KW) over the
    ``period_seconds`` starting at ``now``."""
    return {
        "programID": event.get("programID"), "eventID": event["id"], "clientName": client_name,
        "reportName": f"{client_name} sheddable power",
        "payloadDescriptors": [{"objectType": "REPORT_PAYLOAD_DESCRIPTOR",
                                "payloadType": REPORT_PAYLOAD, "readingType": "DIRECT_READ",
                                "units": "KW"}],
        "resources": [{"resourceName": resource,
                       "intervalPeriod": {"start": iso_utc(now),
                                          "duration": f"PT{max(1, round(period_seconds))}S"},
                       "intervals": [{"id": 0, "payloads": [
                           {"type": REPORT_PAYLOAD, "values": [round(watts / 1e3, 3)]}]}]}],
    }
