"""Our VEN against OpenLEADR's real VTN (``OpenADRServer``) on 127.0.0.1, no TLS, no signing.

The VTN asks for a poll every second. Each test runs its own VTN and VEN in one asyncio
loop, waits on conditions with deadlines (never fixed sleeps for outcomes), and stops both.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

pytest.importorskip("openleadr")

from openleadr import OpenADRServer, objects

from aifactory.controller.power.grid import GridEvent
from aifactory.operators.openadr import OpenADRVen, ThreadedVen

# OpenLEADR's VTN (test side only) keys its aiohttp app with a plain string.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")]

VEN_ID, REG_ID = "ven-1", "reg-1"
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def until(what: str, cond: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Seen:
    """What the VEN's callbacks and the VTN's handlers saw."""

    events: dict[str, list[GridEvent]] = field(default_factory=dict)
    calls: list[tuple[str, list[GridEvent]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    recovered: int = 0
    opts: dict[str, str] = field(default_factory=dict)
    reports: list[float] = field(default_factory=list)
    registered: int = 0
    accept: bool = True  # the VTN accepts (and knows) our VEN

    def on_events(self, eid: str, evs: list[GridEvent]) -> None:
        self.calls.append((eid, evs))
        if evs:
            self.events[eid] = evs
        else:
            self.events.pop(eid, None)

    def on_recovered(self) -> None:
        self.recovered += 1

    def opt(self, ven_id: str, event_id: str, opt_type: str) -> None:
        self.opts[event_id] = opt_type


def make_vtn(seen: Seen, port: int) -> Any:
    vtn = OpenADRServer(vtn_id="TestVTN", http_host="127.0.0.1", http_port=port,
                        requested_poll_freq=timedelta(seconds=1),
                        ven_lookup=lambda ven_id: {"ven_id": VEN_ID, "ven_name": "site-a",
                                                   "registration_id": REG_ID}
                        if seen.accept else None)

    def register(payload: dict[str, Any]) -> tuple[str, str] | bool:
        seen.registered += 1
        return (VEN_ID, REG_ID) if seen.accept else False

    def register_report(ven_id: str, resource_id: str, measurement: str, unit: str,
                        scale: str, min_sampling_interval: timedelta,
                        max_sampling_interval: timedelta) -> Any:
        if measurement == "sheddablePower" and resource_id == "site":
            def got(values: list[tuple[datetime, float]]) -> None:
                seen.reports.extend(v for _, v in values)
            return got, min_sampling_interval
        return None

    vtn.add_handler("on_create_party_registration", register)
    vtn.add_handler("on_register_report", register_report)
    return vtn


def make_ven(seen: Seen, port: int, **kw: Any) -> OpenADRVen:
    return OpenADRVen(f"http://127.0.0.1:{port}/OpenADR2/Simple/2.0b", "site-a",
                      seen.on_events, seen.problems.append, lambda: 12_500.0,
                      on_recovered=seen.on_recovered, budgets=("site",), report_seconds=1.0,
                      retry_seconds=0.5, **kw)


def now_interval(payload: float, minutes: int = 20) -> list[dict[str, Any]]:
    return [{"dtstart": datetime.now(UTC), "duration": timedelta(minutes=minutes),
             "signal_payload": payload}]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=100))


def test_events_opt_in_cancel_malformed_and_reports(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aifactory.openadr")
    seen, port = Seen(), free_port()

    async def scenario() -> None:
        vtn = make_vtn(seen, port)
        await vtn.run()
        ven = make_ven(seen, port)
        try:
            await ven.start()
            await until("registration", lambda: ven.ven_id == VEN_ID)
            simple = vtn.add_event(VEN_ID, "SIMPLE", "level", now_interval(2), callback=seen.opt)
            cap = vtn.add_event(VEN_ID, "LOAD_CONTROL", "x-loadControlCapacity",
                                now_interval(0.6), callback=seen.opt)
            dispatch = "dispatch-1"
            vtn.add_raw_event(VEN_ID, objects.Event(
                event_descriptor=objects.EventDescriptor(
                    event_id=dispatch, modification_number=0, market_context="http://u/dr",
                    event_status="far"),
                event_signals=[objects.EventSignal(
                    intervals=[objects.Interval(dtstart=datetime.now(UTC), uid=0,
                                                duration=timedelta(minutes=20),
                                                signal_payload=40.0)],
                    signal_name="LOAD_DISPATCH", signal_type="setpoint", signal_id="d",
                    measurement=objects.Measurement(
                        name="powerReal", description="RealPower", unit="W", scale="k",
                        power_attributes=objects.PowerAttributes()))],
                targets=[objects.Target(ven_id=VEN_ID)]), callback=seen.opt)
            await until("three events", lambda: {simple, cap, dispatch} <= set(seen.events))
            [s] = seen.events[simple]
            assert (s.id, s.level, s.budgets, s.source) == (f"{simple}#0", 2, ("site",),
                                                           "openadr")
            assert s.end is not None and s.end - s.start == pytest.approx(1200, abs=1)
            assert seen.events[cap][0].percent == pytest.approx(60.0)
            assert seen.events[dispatch][0].watts == pytest.approx(40_000.0)
            await until("opt-ins at the VTN", lambda: len(seen.opts) == 3)
            assert set(seen.opts.values()) == {"optIn"}

            await until("sheddable watts reported", lambda: len(seen.reports) >= 2)
            assert set(seen.reports) == {12_500.0}

            vtn.cancel_event(VEN_ID, simple)
            await until("the cancel", lambda: (simple, []) in seen.calls)
            assert simple not in seen.events and simple not in ven.events

            bad = vtn.add_event(VEN_ID, "ELECTRICITY_PRICE", "price", now_interval(0.31),
                                callback=seen.opt)
            await until("the opt-out", lambda: seen.opts.get(bad) == "optOut")
            assert [p for p in seen.problems if bad in p] == [
                f"event {bad}: signal 'ELECTRICITY_PRICE' of type 'price' is not supported "
                "(only SIMPLE level, LOAD_CONTROL x-loadControlCapacity, LOAD_DISPATCH "
                "setpoint)"]
            assert bad not in seen.events and set(ven.events) == {cap, dispatch}
            assert set(seen.events) == {cap, dispatch}
            assert any(bad in r.getMessage() for r in caplog.records
                       if r.levelno == logging.WARNING and r.name == "aifactory.openadr")
            assert not [p for p in seen.problems if "unreachable" in p]
        finally:
            await ven.stop()
            await vtn.stop()

    run(scenario)


def test_vtn_gone_is_one_problem_until_it_is_back() -> None:
    seen, port = Seen(), free_port()

    async def scenario() -> None:
        vtn = make_vtn(seen, port)
        await vtn.run()
        ven = make_ven(seen, port)
        try:
            await ven.start()
            await until("registration", lambda: ven.ven_id == VEN_ID)
            await vtn.stop()
            await until("the problem", lambda: bool(seen.problems))
            polls = asyncio.get_running_loop().time()
            await until("3 more polls", lambda: asyncio.get_running_loop().time() > polls + 3)
            assert len(seen.problems) == 1, seen.problems
            assert seen.problems[0].startswith(f"VTN at {ven.vtn_url} unreachable since ")
            assert ven.down_since is not None and seen.recovered == 0
            vtn = make_vtn(seen, port)
            await vtn.run()
            await until("the recovery", lambda: seen.recovered == 1)
            assert ven.down_since is None and len(seen.problems) == 1
        finally:
            await ven.stop()
            await vtn.stop()

    run(scenario)


def test_lost_registration_is_one_problem_then_registers_again() -> None:
    """The VTN forgets us: it asks for a re-registration and refuses it, so OpenLEADR stops
    polling by itself. The VEN says so once and registers again when the VTN accepts."""
    seen, port = Seen(), free_port()

    async def scenario() -> None:
        vtn = make_vtn(seen, port)
        await vtn.run()
        ven = make_ven(seen, port)
        try:
            await ven.start()
            await until("registration", lambda: seen.registered == 1 and ven.ven_id == VEN_ID)
            seen.accept = False
            await until("the problem", lambda: bool(seen.problems))
            await until("a refused fresh registration", lambda: seen.registered >= 4)
            assert len(seen.problems) == 1, seen.problems
            assert seen.problems[0].startswith(f"VTN at {ven.vtn_url} lost our registration")
            seen.accept = True
            await until("the recovery", lambda: seen.recovered == 1)
            eid = vtn.add_event(VEN_ID, "SIMPLE", "level", now_interval(3), callback=seen.opt)
            await until("an event after it", lambda: eid in seen.events)
            assert len(seen.problems) == 1
        finally:
            await ven.stop()
            await vtn.stop()

    run(scenario)


def test_vtn_down_at_start_then_up() -> None:
    seen, port = Seen(), free_port()

    async def scenario() -> None:
        ven = make_ven(seen, port)
        vtn = None
        try:
            await ven.start()
            await until("the problem", lambda: bool(seen.problems))
            await asyncio.sleep(1.5)  # some more registration attempts: still one problem
            assert len(seen.problems) == 1 and "registration: no reply" in seen.problems[0]
            vtn = make_vtn(seen, port)
            await vtn.run()
            await until("registration", lambda: ven.ven_id == VEN_ID and seen.recovered == 1)
        finally:
            await ven.stop()
            if vtn is not None:
                await vtn.stop()

    run(scenario)


def test_threaded_ven_gets_events_and_stops_its_thread() -> None:
    seen, port = Seen(), free_port()

    async def scenario() -> None:
        vtn = make_vtn(seen, port)
        await vtn.run()
        threaded = ThreadedVen(make_ven(seen, port))
        try:
            await asyncio.to_thread(threaded.start)
            await until("registration", lambda: seen.registered >= 1)
            await until("report registration", lambda: bool(vtn.registered_reports))
            eid = vtn.add_event(VEN_ID, "SIMPLE", "level", now_interval(1), callback=seen.opt)
            await until("the event", lambda: eid in seen.events)
            assert seen.events[eid][0].level == 1
            await until("the opt-in", lambda: seen.opts.get(eid) == "optIn")
        finally:
            thread = threaded._thread
            await asyncio.to_thread(threaded.stop)
            assert thread is not None and not thread.is_alive()
            await vtn.stop()

    run(scenario)
