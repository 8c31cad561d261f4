"""Our OpenADR 3 VEN (``operators.openadr3``) alone against a real OpenADR 3.1 VTN on loopback
(``openadr3_env``), no Kubernetes: event changes, a bad update that keeps the last good form,
bad credentials, and a VTN restart (its tokens no longer valid: a 401, then a fresh token).

Each test runs its own VTN and VEN, polls every 0.2 s, waits on conditions with deadlines, and
stops both (the VTN by its PID).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aifactory.controller.power.grid import GridEvent
from aifactory.operators.openadr3 import OpenADR3Ven
from tests.integration.openadr3_env import VEN_ID, VEN_SECRET, Vtn, vtn_binary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

WAIT = 30.0


@dataclass
class Seen:
    calls: list[tuple[str, list[GridEvent]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    recovered: int = 0


@pytest.fixture
def vtn(tmp_path: Path) -> Iterator[Vtn]:
    server = Vtn(vtn_binary(), tmp_path / "vtn.log")
    try:
        yield server
    finally:
        server.stop()


def make_ven(vtn: Vtn, tmp_path: Path, seen: Seen, secret: str = VEN_SECRET,
             **kw: Any) -> OpenADR3Ven:
    (tmp_path / "client-id").write_text(VEN_ID)
    (tmp_path / "client-secret").write_text(secret)

    def recovered() -> None:
        seen.recovered += 1

    return OpenADR3Ven(vtn.url, "site-a", lambda eid, evs: seen.calls.append((eid, evs)),
                       seen.problems.append, lambda: 2500.0, on_recovered=recovered,
                       client_id_file=str(tmp_path / "client-id"),
                       client_secret_file=str(tmp_path / "client-secret"),
                       programs=("grid-dr",), budgets=("site",), poll_seconds=0.2,
                       report_seconds=0.2, **kw)


async def until(what: str, cond: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def program(vtn: Vtn) -> str:
    pid = str(vtn.call("POST", "/programs", {"programName": "grid-dr"})["id"])
    vtn.call("POST", "/vens", {"objectType": "BL_VEN_REQUEST", "clientID": VEN_ID,
                               "venName": "site-a", "targets": ["north"]})
    return pid


def test_events_change_a_bad_update_keeps_the_last_good_and_a_delete_drops(
        vtn: Vtn, tmp_path: Path) -> None:
    pid = program(vtn)
    seen = Seen()
    ven = make_ven(vtn, tmp_path, seen)

    async def run() -> None:
        await ven.start()
        try:
            eid = vtn.event(pid, "peak", "SIMPLE", 2, None, ["north"])
            await until("the event", lambda: bool(seen.calls))
            [(got_id, [ev])] = seen.calls
            assert (got_id, ev.level, ev.budgets, ev.end is not None) == (eid, 2, ("site",),
                                                                         True)
            await until("a report on it", lambda: vtn.reports(eid) == [2.5])
            vtn.event(pid, "peak", "IMPORT_CAPACITY_LIMIT", 400, "W", ["north"], event_id=eid)
            await until("the change", lambda: len(seen.calls) == 2)
            assert seen.calls[-1][1][0].watts == 400.0
            vtn.event(pid, "peak", "GHG", 0.4, None, ["north"], event_id=eid)  # bad update
            await until("the problem", lambda: bool(seen.problems))
            assert "payload type 'GHG' is not supported" in seen.problems[0]
            assert ven.events[eid][0].watts == 400.0 and len(seen.calls) == 2  # kept
            vtn.call("DELETE", f"/events/{eid}")
            await until("the drop", lambda: seen.calls[-1] == (eid, []))
            await until("the problem to go", lambda: ven.problem == "")
            assert seen.recovered == 1 and len(seen.problems) == 1 and ven.events == {}
        finally:
            await ven.stop()

    asyncio.run(run())


def test_refused_credentials_are_one_problem_naming_them(vtn: Vtn, tmp_path: Path) -> None:
    program(vtn)
    seen = Seen()
    ven = make_ven(vtn, tmp_path, seen, secret="wrong")

    async def run() -> None:
        await ven.start()
        try:
            await until("the problem", lambda: bool(seen.problems))
            await asyncio.sleep(1.0)  # five more polls: still one problem
        finally:
            await ven.stop()

    asyncio.run(run())
    assert len(seen.problems) == 1, seen.problems
    assert "refused our client credentials" in seen.problems[0]
    assert "check client-id and client-secret" in seen.problems[0]
    assert "wrong" not in seen.problems[0]  # the secret is never said


def test_a_vtn_restart_is_one_problem_then_a_fresh_token(vtn: Vtn, tmp_path: Path) -> None:
    pid = program(vtn)
    seen = Seen()
    ven = make_ven(vtn, tmp_path, seen)

    async def run() -> Vtn:
        await ven.start()
        try:
            vtn.event(pid, "peak", "SIMPLE", 3, None, ["north"])
            await until("the event", lambda: bool(ven.events))
            vtn.stop()
            await until("the outage", lambda: bool(seen.problems))
            await asyncio.sleep(0.6)  # a few polls more
            assert len(seen.problems) == 1 and "unreachable" in seen.problems[0]
            assert ven.events  # the last good events are kept while it is away
            # The same address, nothing stored, a new signing key: our token is refused.
            again = Vtn(vtn_binary(), tmp_path / "vtn2.log", port=vtn.port)
            try:
                again_pid = program(again)
                await until("recovery", lambda: seen.recovered == 1)
                await until("the old event to go", lambda: not ven.events)
                again.event(again_pid, "peak-2", "SIMPLE", 1, None, ["north"])
                await until("the new event", lambda: bool(ven.events))
            except BaseException:
                again.stop()
                raise
            return again
        finally:
            await ven.stop()

    again = asyncio.run(run())
    again.stop()
    assert len(seen.problems) == 1
