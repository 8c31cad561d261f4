"""OpenADR events (as OpenLEADR's client hands them to ``on_event``) as GridEvents: pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from aifactory.controller.power.grid import GridEvent
from aifactory.operators.openadr import NotForThisSite, grid_event_from_oadr

T0 = datetime(2026, 7, 1, 17, 0, tzinfo=UTC)
NOW = T0.timestamp() - 60.0  # a minute before the event starts


def event(signals: list[dict[str, Any]], *, eid: str = "ev1", status: str = "far",
          minutes: int = 30, targets: list[dict[str, str]] | None = None,
          created: datetime | None = None) -> dict[str, Any]:
    """The shape OpenLEADR's parser gives (checked against create_message/parse_message)."""
    return {
        "event_descriptor": {"event_id": eid, "modification_number": 0, "priority": 0,
                             "market_context": "http://utility/dr", "event_status": status,
                             "created_date_time": created or T0 - timedelta(hours=1),
                             "test_event": False},
        "active_period": {"dtstart": T0, "duration": timedelta(minutes=minutes)},
        "event_signals": signals,
        "targets": targets if targets is not None else [{"ven_id": "ven-1"}],
        "response_required": "always",
    }


def signal(name: str, kind: str, *payloads: float, minutes: int = 30, sid: str = "s1",
           **extra: Any) -> dict[str, Any]:
    step = timedelta(minutes=minutes)
    return {"signal_name": name, "signal_type": kind, "signal_id": sid,
            "intervals": [{"dtstart": T0 + i * step, "duration": step, "signal_payload": p,
                           "uid": i} for i, p in enumerate(payloads)], **extra}


def convert(ev: dict[str, Any], **kw: Any) -> list[GridEvent] | str:
    kw.setdefault("now", NOW)
    kw.setdefault("budgets", ("site",))
    return grid_event_from_oadr(ev, ven_ids=("ven-1",), resource_ids=("site",), **kw)


def test_simple_level_covers_the_active_period() -> None:
    out = convert(event([signal("SIMPLE", "level", 2)]))
    assert out == [GridEvent(id="ev1#0", start=T0.timestamp(), end=T0.timestamp() + 1800,
                             level=2, budgets=("site",), signal_at=NOW, source="openadr")]
    assert out[0].limit(1000.0) == 750.0


def test_capacity_fraction_is_a_percent() -> None:
    [ev] = convert(event([signal("LOAD_CONTROL", "x-loadControlCapacity", 0.8)]))
    assert ev.percent == pytest.approx(80.0) and ev.watts is None and ev.level is None


@pytest.mark.parametrize(("unit", "scale", "watts"),
                         [("W", "k", 250_000.0), ("kW", "none", 250_000.0), ("W", None, 250.0)])
def test_dispatch_setpoint_in_watts(unit: str, scale: str | None, watts: float) -> None:
    m = {"name": "powerReal", "description": "RealPower", "unit": unit, "scale": scale}
    [ev] = convert(event([signal("LOAD_DISPATCH", "setpoint", 250, measurement=m)]))
    assert ev.watts == watts


def test_one_grid_event_per_interval_and_finished_intervals_dropped() -> None:
    ev = event([signal("SIMPLE", "level", 1, 3, 2, minutes=10)])
    out = convert(ev)
    assert isinstance(out, list)
    assert [(g.id, g.level, g.start - T0.timestamp(), g.end - T0.timestamp())  # type: ignore[operator]
            for g in out] == [("ev1#0", 1, 0, 600), ("ev1#1", 3, 600, 1200),
                              ("ev1#2", 2, 1200, 1800)]
    later = convert(ev, now=T0.timestamp() + 700)
    assert isinstance(later, list) and [g.id for g in later] == ["ev1#1", "ev1#2"]


def test_intervals_without_dtstart_follow_each_other() -> None:
    sig = signal("SIMPLE", "level", 1, 2, minutes=15)
    for iv in sig["intervals"]:
        del iv["dtstart"]
    out = convert(event([sig]))
    assert isinstance(out, list) and [g.start - T0.timestamp() for g in out] == [0, 900]


def test_two_signals_get_distinct_ids() -> None:
    out = convert(event([signal("SIMPLE", "level", 1, sid="a"),
                         signal("LOAD_CONTROL", "x-loadControlCapacity", 0.5, sid="b")]))
    assert isinstance(out, list) and [g.id for g in out] == ["ev1#a#0", "ev1#b#0"]


def test_open_ended_event_has_no_end() -> None:
    [ev] = convert(event([signal("SIMPLE", "level", 3, minutes=0)], minutes=0))
    assert ev.end is None and ev.active(NOW + 10**6)


@pytest.mark.parametrize("status", ["cancelled", "completed"])
def test_cancelled_or_completed_is_empty(status: str) -> None:
    assert convert(event([signal("SIMPLE", "level", 2)], status=status)) == []


@pytest.mark.parametrize("targets", [[{"ven_id": "other-ven"}], [{"resource_id": "plant-9"}]])
def test_other_targets_are_not_for_us(targets: list[dict[str, str]]) -> None:
    out = convert(event([signal("SIMPLE", "level", 2)], targets=targets))
    assert isinstance(out, NotForThisSite) and "not for this site" in out


@pytest.mark.parametrize("targets", [[{"group_id": "north"}], [],
                                     [{"ven_id": "other"}, {"resource_id": "site"}]])
def test_groups_no_targets_or_one_of_ours_are_for_us(targets: list[dict[str, str]]) -> None:
    assert isinstance(convert(event([signal("SIMPLE", "level", 2)], targets=targets)), list)


def test_clock_skew_is_refused() -> None:
    ev = event([signal("SIMPLE", "level", 2)], created=datetime.fromtimestamp(NOW + 900, UTC))
    out = convert(ev)
    assert isinstance(out, str) and "clock skew" in out and "ev1" in out
    assert isinstance(convert(ev, max_skew_seconds=1000), list)


def _without(path: str) -> dict[str, Any]:
    ev = event([signal("SIMPLE", "level", 2)])
    *parents, leaf = path.split(".")
    node: Any = ev
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    del node[leaf]
    return ev


@pytest.mark.parametrize(("path", "named"), [
    ("active_period.dtstart", "active_period.dtstart missing"),
    ("active_period.duration", "active_period.duration"),
    ("active_period", "active_period missing"),
    ("event_signals", "event_signals missing"),
    ("event_signals.0.intervals", "signal 'SIMPLE' has no intervals"),
    ("event_signals.0.intervals.0.signal_payload", "signal_payload"),
    ("event_signals.0.intervals.0.duration", "duration"),
    ("event_descriptor.event_id", "event_descriptor.event_id"),
])
def test_missing_fields_name_the_field(path: str, named: str) -> None:
    out = convert(_without(path))
    assert isinstance(out, str) and not isinstance(out, NotForThisSite)
    assert named in out
    if "event_id" not in path:
        assert out.startswith("event ev1: ")


@pytest.mark.parametrize(("sig", "named"), [
    (signal("ELECTRICITY_PRICE", "price", 0.3), "'ELECTRICITY_PRICE' of type 'price' is not"),
    (signal("LOAD_CONTROL", "x-loadControlLevelOffset", 1), "not supported"),
    (signal("SIMPLE", "level", 7), "level 7 not one of [0, 1, 2, 3]"),
    (signal("LOAD_CONTROL", "x-loadControlCapacity", 80), "not a fraction"),
    (signal("LOAD_DISPATCH", "setpoint", 5), "unit None"),
    (signal("LOAD_DISPATCH", "setpoint", 5, measurement={"unit": "A", "scale": "none"}),
     "unit 'A'"),
])
def test_unsupported_or_out_of_range_signals_are_refused(sig: dict[str, Any],
                                                         named: str) -> None:
    out = convert(event([sig]))
    assert isinstance(out, str) and named in out, out


def test_one_bad_signal_refuses_the_whole_event() -> None:
    out = convert(event([signal("SIMPLE", "level", 2, sid="a"),
                         signal("ELECTRICITY_PRICE", "price", 0.3, sid="b")]))
    assert isinstance(out, str) and "ELECTRICITY_PRICE" in out


def _ven(seen: dict[str, Any], **kw: Any) -> Any:
    from aifactory.operators.openadr import OpenADRVen

    seen.setdefault("calls", [])
    seen.setdefault("problems", [])
    return OpenADRVen("http://vtn/OpenADR2/Simple/2.0b", "ven-1",
                      lambda eid, evs: seen["calls"].append((eid, evs)),
                      seen["problems"].append, lambda: 0.0, clock=lambda: NOW,
                      resource_id="site", **kw)


def test_handler_opts_in_keeps_last_good_and_opts_out_of_bad(
        caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    seen: dict[str, Any] = {}
    ven = _ven(seen)
    good = event([signal("SIMPLE", "level", 2)])
    assert asyncio.run(ven._handle(good)) == "optIn"
    assert [eid for eid, _ in seen["calls"]] == ["ev1"] and list(ven.events) == ["ev1"]
    bad = event([signal("ELECTRICITY_PRICE", "price", 0.3)])  # a bad update of ev1
    with caplog.at_level("WARNING", logger="aifactory.openadr"):
        assert asyncio.run(ven._handle(bad)) == "optOut"
    assert len(seen["calls"]) == 1 and list(ven.events) == ["ev1"]
    assert seen["problems"] == [convert(bad)] and "ELECTRICITY_PRICE" in caplog.text
    other = event([signal("SIMPLE", "level", 2)], eid="ev2", targets=[{"ven_id": "x"}])
    assert asyncio.run(ven._handle(other)) == "optOut"
    assert len(seen["problems"]) == 1  # not for us is no problem
    assert asyncio.run(ven._handle(event([], status="cancelled"))) == "optIn"
    assert seen["calls"][-1] == ("ev1", []) and ven.events == {}


def test_policy_can_opt_out() -> None:
    import asyncio

    seen: dict[str, Any] = {}
    ven = _ven(seen, opt_in=lambda ev: ev.level is not None and ev.level < 3)
    assert asyncio.run(ven._handle(event([signal("SIMPLE", "level", 2)]))) == "optIn"
    assert asyncio.run(ven._handle(event([signal("SIMPLE", "level", 3)]))) == "optOut"
    assert seen["calls"][-1] == ("ev1", []) and ven.events == {}


def test_credentials_are_paths_checked_up_front(tmp_path: Any) -> None:
    f = tmp_path / "tls.key"
    f.write_text("-----BEGIN PRIVATE KEY----- not for logs")
    with pytest.raises(ValueError, match="go together"):
        _ven({}, cert=str(f))
    with pytest.raises(ValueError, match=f"cert file {tmp_path}/missing does not exist"):
        _ven({}, cert=str(tmp_path / "missing"), key=str(f), ca_file=str(f))
    fp = tmp_path / "fingerprint"
    fp.write_text("AA:BB:CC\n")
    assert _ven({}, cert=str(f), key=str(f), ca_file=str(f),
                vtn_fingerprint=str(fp)).fingerprint == "AA:BB:CC"
