"""OpenADR 3 events (as a VTN's ``GET /events`` returns them) as GridEvents, and the report the
VEN files: pure."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aifactory.controller.power.grid import GridEvent
from aifactory.operators.openadr import NotForThisSite
from aifactory.operators.openadr3_events import (
    grid_events_from_oa3,
    parse_duration,
    report_body,
    target_terms,
)

T0 = datetime(2026, 7, 1, 17, 0, tzinfo=UTC)
NOW = T0.timestamp() - 60.0  # a minute before the event starts
S = T0.timestamp()


def rfc(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def event(*intervals: dict[str, Any], eid: str = "evt-1", start: str | None = rfc(T0),
          duration: str | None = "PT30M", targets: list[Any] | None = None,
          created: datetime | None = None, units: dict[str, str] | None = None
          ) -> dict[str, Any]:
    period = {k: v for k, v in (("start", start), ("duration", duration)) if v is not None}
    out: dict[str, Any] = {
        "id": eid, "objectType": "EVENT", "programID": "prg-1", "eventName": "peak",
        "createdDateTime": rfc(created or T0 - timedelta(hours=1)),
        "modificationDateTime": rfc(T0 - timedelta(hours=1)),
        "intervalPeriod": period, "intervals": list(intervals),
    }
    if targets is not None:
        out["targets"] = targets
    if units:
        out["payloadDescriptors"] = [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR",
                                      "payloadType": k, "units": u} for k, u in units.items()]
    return out


def iv(iid: int, kind: str, *values: Any, **period: str) -> dict[str, Any]:
    out: dict[str, Any] = {"id": iid, "payloads": [{"type": kind, "values": list(values)}]}
    if period:
        out["intervalPeriod"] = period
    return out


def convert(ev: dict[str, Any], **kw: Any) -> list[GridEvent] | str:
    kw.setdefault("now", NOW)
    kw.setdefault("budgets", ("site",))
    kw.setdefault("names", ("site-a", "north"))
    return grid_events_from_oa3(ev, **kw)


def test_simple_level_covers_the_event_period() -> None:
    out = convert(event(iv(0, "SIMPLE", 2)))
    assert out == [GridEvent(id="evt-1#0", start=S, end=S + 1800, level=2, budgets=("site",),
                             signal_at=NOW, source="openadr")]
    assert out[0].limit(1000.0) == 750.0


@pytest.mark.parametrize(("units", "field", "value"), [
    (None, "watts", 13_000.0),  # KW when nothing says otherwise
    ({"IMPORT_CAPACITY_LIMIT": "KW"}, "watts", 13_000.0),
    ({"IMPORT_CAPACITY_LIMIT": "W"}, "watts", 13.0),
    ({"IMPORT_CAPACITY_LIMIT": "MW"}, "watts", 13e6),
    ({"IMPORT_CAPACITY_LIMIT": "PERCENT"}, "percent", 13.0),
], ids=["kilowatts by default", "kilowatts", "watts", "megawatts", "percent of the base"])
def test_capacity_limit_in_the_units_its_descriptor_names(
        units: dict[str, str] | None, field: str, value: float) -> None:
    [ev] = convert(event(iv(0, "IMPORT_CAPACITY_LIMIT", 13), units=units))
    assert getattr(ev, field) == pytest.approx(value)


def test_the_programs_descriptor_applies_when_the_event_has_none() -> None:
    program = [{"objectType": "EVENT_PAYLOAD_DESCRIPTOR", "payloadType": "DISPATCH_SETPOINT",
                "units": "W"}]
    [ev] = convert(event(iv(0, "DISPATCH_SETPOINT", 9000)), program_descriptors=program)
    assert ev.watts == 9000.0


def test_intervals_without_a_start_follow_each_other_and_ended_ones_are_left_out() -> None:
    ev = event(iv(0, "SIMPLE", 1), iv(1, "SIMPLE", 3), iv(2, "SIMPLE", 2, duration="PT1H"))
    out = convert(ev)
    assert [(e.id, e.start, e.end, e.level) for e in out] == [
        ("evt-1#0", S, S + 1800, 1), ("evt-1#1", S + 1800, S + 3600, 3),
        ("evt-1#2", S + 3600, S + 7200, 2)]
    later = convert(ev, now=S + 2000)
    assert [e.id for e in later] == ["evt-1#1", "evt-1#2"]
    assert convert(ev, now=S + 7200) == []  # over: drop it


def test_an_intervals_own_period_overrides_the_events() -> None:
    at = rfc(T0 + timedelta(hours=2))
    [ev] = convert(event(iv(5, "SIMPLE", 1, start=at, duration="PT15M"), start=None,
                         duration=None))
    assert (ev.id, ev.start, ev.end) == ("evt-1#5", S + 7200, S + 7200 + 900)


@pytest.mark.parametrize("duration", ["P9999Y", "PT0S", None],
                         ids=["infinity", "zero", "none"])
def test_open_ended_durations_last_until_the_event_goes(duration: str | None) -> None:
    [ev] = convert(event(iv(0, "SIMPLE", 1), duration=duration))
    assert ev.end is None and ev.active(S + 10 * 86_400)


def test_start_0001_means_now_taken_as_the_events_creation() -> None:
    created = T0 - timedelta(minutes=5)
    [ev] = convert(event(iv(0, "SIMPLE", 1), start="0001-01-01T00:00:00Z", created=created))
    assert ev.start == created.timestamp() and ev.active(NOW)


def test_several_payloads_in_an_interval_each_become_an_event() -> None:
    both = {"id": 0, "payloads": [{"type": "SIMPLE", "values": [1]},
                                  {"type": "IMPORT_CAPACITY_LIMIT", "values": [20]}]}
    out = convert(event(both))
    assert isinstance(out, list)
    assert [(e.id, e.level, e.watts) for e in out] == [
        ("evt-1#0#SIMPLE", 1, None), ("evt-1#0#IMPORT_CAPACITY_LIMIT", None, 20_000.0)]


@pytest.mark.parametrize("targets", [["north"], [{"type": "VEN_NAME", "values": ["site-a"]}],
                                     None, []],
                         ids=["3.1 string target", "3.0.1 valuesMap target", "untargeted",
                              "empty targets"])
def test_targets_naming_us_or_none_are_ours(targets: list[Any] | None) -> None:
    assert isinstance(convert(event(iv(0, "SIMPLE", 1), targets=targets)), list)


def test_targets_naming_only_others_are_not_for_this_site_and_no_problem() -> None:
    out = convert(event(iv(0, "SIMPLE", 1), targets=["south", {"type": "GROUP",
                                                                "values": ["west"]}]))
    assert isinstance(out, NotForThisSite) and "not for this site" in out
    assert "south" in out and "west" in out


@pytest.mark.parametrize(("ev", "named"), [
    ({"intervals": []}, "without an id"),
    (event(iv(0, "PRICE", 0.31)), "payload type 'PRICE' is not supported (only SIMPLE, "
                                  "IMPORT_CAPACITY_LIMIT, DISPATCH_SETPOINT)"),
    (event(iv(0, "SIMPLE", 1), iv(1, "PRICE", 0.3)), "interval 1: payload type 'PRICE'"),
    (event(iv(0, "SIMPLE", 7)), "SIMPLE level 7 not one of [0, 1, 2, 3]"),
    (event(iv(0, "SIMPLE", 1.5)), "SIMPLE level 1.5"),
    (event(iv(0, "SIMPLE", "high")), "SIMPLE values must be one number"),
    (event(iv(0, "SIMPLE", 1, 2)), "SIMPLE values must be one number"),
    (event(iv(0, "SIMPLE", True)), "SIMPLE values must be one number"),
    (event(iv(0, "IMPORT_CAPACITY_LIMIT", -5)), "IMPORT_CAPACITY_LIMIT -5 KW is negative"),
    (event(iv(0, "IMPORT_CAPACITY_LIMIT", 5), units={"IMPORT_CAPACITY_LIMIT": "KWH"}),
     "units 'KWH' are not power (KW, W, MW) or PERCENT"),
    (event(iv(0, "IMPORT_CAPACITY_LIMIT", 150), units={"IMPORT_CAPACITY_LIMIT": "PERCENT"}),
     "150 % is over 100"),
    (event(iv(0, "SIMPLE", 1), duration="half an hour"), "duration 'half an hour' is not"),
    (event(iv(0, "SIMPLE", 1), duration="-PT1H"), "duration '-PT1H' is not a non-negative"),
    (event(iv(0, "SIMPLE", 1), start="tomorrow"), "start 'tomorrow' is not an RFC 3339"),
    (event(iv(0, "SIMPLE", 1), start=None), "interval 0: intervalPeriod.start missing"),
    (event(), "intervals missing"),
    (event({"id": 0, "payloads": []}), "interval 0: payloads missing"),
    (event(iv(0, "SIMPLE", 1), created=T0 + timedelta(hours=2)), "clock skew"),
], ids=["no id", "unknown payload type", "one bad interval refuses the whole event",
        "level out of range", "fractional level", "string value", "two values",
        "boolean value", "negative capacity", "energy units", "percent over 100",
        "duration not ISO 8601", "negative duration", "start not a time", "no start anywhere",
        "no intervals", "no payloads", "created in the future"])
def test_malformed_events_are_refused_naming_the_field(ev: dict[str, Any], named: str) -> None:
    out = convert(ev)
    assert isinstance(out, str) and not isinstance(out, NotForThisSite), out
    assert named in out, out
    if ev.get("id"):
        assert out.startswith("event evt-1 (peak)")


@pytest.mark.parametrize(("text", "seconds"), [
    ("PT1H", 3600.0), ("PT30M", 1800.0), ("PT1.5S", 1.5), ("P1D", 86_400.0),
    ("P1W", 604_800.0), ("P1DT2H", 93_600.0), ("PT0S", 0.0), ("P9999Y", math.inf),
    ("1 hour", None), ("P", None), ("PT", None), (3600, None)])
def test_iso_8601_durations(text: object, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


def test_target_terms_read_both_shapes() -> None:
    assert target_terms(["a", {"type": "GROUP", "values": ["b", "c"]}, 7, ""]) == {"a", "b",
                                                                                     "c"}
    assert target_terms(None) == set()


def test_the_report_carries_sheddable_kilowatts_on_the_event() -> None:
    body = report_body(event(iv(0, "SIMPLE", 1)), "site-a", 4321.0, S, 10.0)
    assert body["eventID"] == "evt-1" and body["clientName"] == "site-a"
    assert body["payloadDescriptors"][0]["payloadType"] == "LOAD_SHED_DELTA_AVAILABLE"
    assert body["payloadDescriptors"][0]["units"] == "KW"
    [res] = body["resources"]
    assert res["resourceName"] == "site" and res["intervalPeriod"]["duration"] == "PT10S"
    assert res["intervals"][0]["payloads"] == [{"type": "LOAD_SHED_DELTA_AVAILABLE",
                                                "values": [4.321]}]
