"""A utility's grid event, end to end: OpenLEADR's real VTN on loopback, the operator on the
real API server as its VEN, simulated GPUs on four Node objects::

    rack grid-r0: grid-r0-a, grid-r0-b, grid-r0-c, grid-r0-d   (8 H200 each)

Four TrainingJobs of 8 GPUs, one per flexibility tier 0-3, under a PowerBudget of 26 kW on
the rack. The VTN sends a capacity event (50 % of normal): the budget's limit drops to 13 kW,
the operator caps and pauses the flexible jobs (never tier 0) until the modelled draw is
under it, reports what it can still shed, and says so in status and Events. A malformed event
is refused (opt out) with a clear problem in the budget's status, and the last good limit is
kept. When the event is cancelled, caps are restored and paused jobs run again.
Every watch event is checked: the tier-0 job is never capped, paused or requeued.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openleadr")

from openleadr import OpenADRServer

from tests.integration.k8s_env import KubeTestEnv, free_port
from tests.integration.operator_env import (
    GROUP_VERSION,
    OperatorProcess,
    Watch,
    budget_status,
    gpu_node,
    object_events,
    operator_on_nodes,
    tier0_untouched,
    training_job,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")]

NS = "grid-events"
RACK = "grid-r0"
NODES = [f"{RACK}-{x}" for x in "abcd"]
BUDGET = "grid-site"
BASE_WATTS = 26_000
VEN_ID, REG_ID = "ven-grid", "reg-grid"


class Vtn:
    """OpenLEADR's VTN in a thread of its own, with what it saw."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opts: dict[str, str] = {}
        self.reports: list[float] = []
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self._start)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            got = fn(*args)
            return await got if asyncio.iscoroutine(got) else got
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    async def _start(self) -> None:
        vtn = OpenADRServer(vtn_id="UtilityVTN", http_host="127.0.0.1", http_port=self.port,
                            requested_poll_freq=timedelta(seconds=1),
                            ven_lookup=lambda ven_id: {"ven_id": VEN_ID, "ven_name": "site-a",
                                                       "registration_id": REG_ID})

        def register_report(ven_id: str, resource_id: str, measurement: str, unit: str,
                            scale: str, min_sampling_interval: timedelta,
                            max_sampling_interval: timedelta) -> Any:
            if measurement == "sheddablePower":
                def got(values: list[tuple[datetime, float]]) -> None:
                    self.reports.extend(v for _, v in values)
                return got, min_sampling_interval
            return None

        vtn.add_handler("on_create_party_registration", lambda payload: (VEN_ID, REG_ID))
        vtn.add_handler("on_register_report", register_report)
        await vtn.run()
        self.server = vtn

    def event(self, signal: str, signal_type: str, payload: float, minutes: int = 30) -> str:
        intervals = [{"dtstart": datetime.now(UTC), "duration": timedelta(minutes=minutes),
                      "signal_payload": payload}]
        def opted(ven_id: str, event_id: str, opt_type: str) -> None:
            self.opts[event_id] = opt_type

        return str(self.call(lambda: self.server.add_event(
            VEN_ID, signal, signal_type, intervals, callback=opted)))

    def cancel(self, event_id: str) -> None:
        self.call(lambda: self.server.cancel_event(VEN_ID, event_id))

    def stop(self) -> None:
        try:
            if self.server is not None:
                self.call(self.server.stop)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()


@pytest.fixture(scope="module")
def vtn() -> Iterator[Vtn]:
    server = Vtn(free_port())
    yield server
    server.stop()


@pytest.fixture(scope="module")
def operator(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory,
             vtn: Vtn) -> Iterator[OperatorProcess]:
    url = f"http://127.0.0.1:{vtn.port}/OpenADR2/Simple/2.0b"
    with operator_on_nodes(aifactory_installed, tmp_path_factory.mktemp("grid"), NS,
                           [gpu_node(n, RACK) for n in NODES],
                           args=[f"--openadr-vtn-url={url}", "--openadr-ven-name=site-a",
                                 f"--openadr-budgets={BUDGET}"]) as proc:
        yield proc
    aifactory_installed.kubectl("delete", "powerbudget", BUDGET, "--ignore-not-found",
                                check=False)


def _budget(env: KubeTestEnv) -> dict[str, Any]:
    return budget_status(env, BUDGET)


def _conditions(watch: Watch, name: str) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in watch.status(NS, name).get("conditions") or []}


def test_a_grid_event_caps_and_pauses_by_tier_and_everything_comes_back(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, vtn: Vtn,
        tmp_path: Path) -> None:
    env = aifactory_installed
    env.apply({"apiVersion": GROUP_VERSION, "kind": "PowerBudget",
               "metadata": {"name": BUDGET},
               "spec": {"watts": BASE_WATTS,
                        "nodeSelector": {"matchLabels": {"aifactory.io/rack": RACK}}}})
    watch = Watch(env, "trainingjobs")
    watch.invariants.append(tier0_untouched(NS))
    try:
        for tier in range(4):
            env.apply(training_job(f"tier-{tier}", NS, workers=1, gpus_per_worker=8,
                                   flexibility=tier, expectedRuntimeSeconds=7200,
                                   checkpointIntervalSeconds=60))
        for tier in range(4):
            watch.wait_phase(NS, f"tier-{tier}", ["Running"], timeout=60)
        before = _budget(env)
        assert before.get("limitWatts") == BASE_WATTS, before

        event = vtn.event("LOAD_CONTROL", "x-loadControlCapacity", 0.5)
        wait_for(lambda: _budget(env).get("limitWatts") == BASE_WATTS // 2, 30,
                 "the budget to drop to 50 %")
        wait_for(lambda: vtn.opts.get(event) == "optIn", 30, "our opt-in at the VTN")
        wait_for(lambda: _budget(env).get("shedWatts", 0) > 0, 30, "load to be shed")
        status = _budget(env)
        assert event in status["limitCause"] and status["shortWatts"] == 0, status
        assert status["estimatedWatts"] <= status["limitWatts"] or status["shedWatts"] > 0
        # The most flexible job gave first; tier 0 never.
        wait_for(lambda: any(e.startswith(("PowerCapped:", "Paused:"))
                             for e in object_events(env, NS, "tier-3")), 30,
                 "the tier-3 job to be capped or paused")
        assert not any(e.startswith(("PowerCapped:", "Paused:"))
                       for e in object_events(env, NS, "tier-0"))
        touched = [t for t in range(1, 4) if any(
            e.startswith(("PowerCapped:", "Paused:")) for e in object_events(env, NS,
                                                                           f"tier-{t}"))]
        assert 3 in touched
        words = [e for t in touched for e in object_events(env, NS, f"tier-{t}")
                 if e.startswith(("PowerCapped:", "Paused:"))]
        assert all(f"grid event {event}" in w for w in words), words
        # What the site could still shed (the tier-1 job), reported to the utility.
        wait_for(lambda: any(r > 0 for r in vtn.reports), 30,
                 "sheddable watts reported to the VTN")
        metrics = operator.metrics()
        assert "aifactory_grid_actions_total" in metrics
        assert operator.samples("aifactory_grid_lost_gpu_seconds_total", tier="0") == [
            ({"tier": "0"}, 0.0)]

        # A malformed event: refused, named in the budget's status, the limit kept.
        bad = vtn.event("ELECTRICITY_PRICE", "price", 0.31)
        wait_for(lambda: vtn.opts.get(bad) == "optOut", 30, "the opt-out")
        wait_for(lambda: bad in _budget(env).get("gridSignal", ""), 30,
                 "the problem in the budget's status")
        assert _budget(env)["limitWatts"] == BASE_WATTS // 2

        vtn.cancel(event)
        wait_for(lambda: _budget(env).get("limitWatts") == BASE_WATTS, 30,
                 "the limit to come back")
        for tier in range(4):
            watch.wait_phase(NS, f"tier-{tier}", ["Running"], timeout=60)
        wait_for(lambda: all(_conditions(watch, f"tier-{t}").get("PowerCapped", {})
                             .get("status") != "True" for t in range(4)), 30,
                 "every cap restored")
        for tier in touched:
            events = object_events(env, NS, f"tier-{tier}")
            if any(e.startswith("Paused:") for e in events):
                assert any(e.startswith("Resumed:") for e in events), events
                assert (watch.status(NS, f"tier-{tier}").get("restarts") or 0) == 0
        assert watch.violations == [], watch.violations[:3]
    finally:
        watch.close()


def test_a_budget_schedule_window_lowers_the_limit_then_lets_go(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess) -> None:
    """After the test above (four jobs running under the budget): a one-off window of
    the PowerBudget's own ``spec.schedule`` lowers it to 60 % for 15 s; a malformed window
    is refused by the API server naming the field."""
    env = aifactory_installed
    bad = env.kubectl("patch", "powerbudget", BUDGET, "--type=merge", "-p", json.dumps(
        {"spec": {"schedule": [{"start": "17:00", "end": "18:00", "daily": True,
                                "watts": 1000, "percent": 50}]}}), check=False)
    assert bad.returncode != 0 and "exactly one of watts or percent" in bad.stderr, bad.stderr
    start = datetime.now(UTC) - timedelta(seconds=1)
    end = start + timedelta(seconds=16)
    env.kubectl("patch", "powerbudget", BUDGET, "--type=merge", "-p", json.dumps(
        {"spec": {"schedule": [{"start": start.isoformat().replace("+00:00", "Z"),
                                "end": end.isoformat().replace("+00:00", "Z"),
                                "percent": 60}]}}))
    wait_for(lambda: _budget(env).get("limitWatts") == round(BASE_WATTS * 0.6), 15,
             "the scheduled window to lower the limit")
    assert _budget(env)["limitCause"] == "schedule"
    wait_for(lambda: _budget(env).get("limitWatts") == BASE_WATTS, 40,
             "the window to end")
    assert _budget(env)["limitCause"] == ""
