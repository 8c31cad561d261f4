"""A utility's grid event over OpenADR 3, end to end: a real OpenADR 3.1 VTN (the `openadr`
crate's, built by ``hack/install-openadr3-vtn.sh``) on loopback, the operator on the real API
server as its VEN, simulated GPUs on four Node objects::

    rack oa3-r0: oa3-r0-a, oa3-r0-b, oa3-r0-c, oa3-r0-d   (8 H200 each)

The utility (business logic, with its own OAuth2 client) creates a program and our VEN object
(venName ``site-a``, granted target ``north-feeder``). Four TrainingJobs of 8 GPUs, one per
flexibility tier 0-3, run under a PowerBudget of 26 kW. The utility publishes an
``IMPORT_CAPACITY_LIMIT`` of 13 KW targeted at ``north-feeder``: the budget's limit drops to
13 kW, flexible jobs are capped and paused (tier 0 never, checked on every watch event), and
what the site can still shed reaches the VTN as a report. An event for another feeder is never
seen; an event with a payload we do not obey is named in the budget's ``gridSignal`` while the
limit holds, and the problem clears when it is deleted. Deleting the capacity event restores
every job. Stopping the VTN is said in ``gridSignal`` and the limit is kept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.k8s_env import KubeTestEnv
from tests.integration.openadr3_env import VEN_ID, VEN_SECRET, Vtn, vtn_binary
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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

NS = "oa3-events"
RACK = "oa3-r0"
NODES = [f"{RACK}-{x}" for x in "abcd"]
BUDGET = "oa3-site"
BASE_WATTS = 26_000
PROGRAM, VEN, FEEDER = "grid-dr", "site-a", "north-feeder"


@pytest.fixture(scope="module")
def vtn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vtn]:
    server = Vtn(vtn_binary(), tmp_path_factory.mktemp("vtn") / "vtn.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def program_id(vtn: Vtn) -> str:
    """The utility's program and our VEN object, granted the feeder's target."""
    pid = str(vtn.call("POST", "/programs", {"programName": PROGRAM})["id"])
    vtn.call("POST", "/vens", {"objectType": "BL_VEN_REQUEST", "clientID": VEN_ID,
                               "venName": VEN, "targets": [FEEDER]})
    return pid


@pytest.fixture(scope="module")
def operator(aifactory_installed: KubeTestEnv, tmp_path_factory: pytest.TempPathFactory,
             vtn: Vtn, program_id: str) -> Iterator[OperatorProcess]:
    creds = tmp_path_factory.mktemp("oa3-secret")  # as a mounted Secret would be
    (creds / "client-id").write_text(VEN_ID)
    (creds / "client-secret").write_text(VEN_SECRET)
    with operator_on_nodes(aifactory_installed, tmp_path_factory.mktemp("oa3"), NS,
                           [gpu_node(n, RACK) for n in NODES],
                           args=[f"--openadr3-vtn-url={vtn.url}", f"--openadr3-ven-name={VEN}",
                                 f"--openadr3-program={PROGRAM}", "--openadr3-poll-seconds=1",
                                 f"--openadr-credentials={creds}",
                                 f"--openadr-budgets={BUDGET}"]) as proc:
        yield proc
    aifactory_installed.kubectl("delete", "powerbudget", BUDGET, "--ignore-not-found",
                                check=False)


def _budget(env: KubeTestEnv) -> dict[str, Any]:
    return budget_status(env, BUDGET)


def _capped(watch: Watch, tier: int) -> bool:
    return any(c["type"] == "PowerCapped" and c["status"] == "True"
               for c in watch.status(NS, f"tier-{tier}").get("conditions") or [])


def _touched(env: KubeTestEnv, tier: int) -> bool:
    return any(e.startswith(("PowerCapped:", "Paused:"))
               for e in object_events(env, NS, f"tier-{tier}"))


def test_an_openadr3_capacity_limit_caps_and_pauses_by_tier_and_everything_comes_back(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, vtn: Vtn,
        program_id: str) -> None:
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
        wait_for(lambda: _budget(env).get("limitWatts") == BASE_WATTS, 30, "the base limit")
        assert _budget(env).get("gridSignal") == "", _budget(env)

        other = vtn.event(program_id, "south", "SIMPLE", 3, None, ["south-feeder"])
        event = vtn.event(program_id, "peak", "IMPORT_CAPACITY_LIMIT", 13, "KW", [FEEDER])
        wait_for(lambda: _budget(env).get("limitWatts") == BASE_WATTS // 2, 30,
                 "the budget to drop to the 13 kW capacity limit")
        wait_for(lambda: _budget(env).get("shedWatts", 0) > 0, 30, "load to be shed")
        status = _budget(env)
        assert event in status["limitCause"] and "13,000 W" in status["limitCause"], status
        assert status["shortWatts"] == 0 and status["gridSignal"] == "", status
        wait_for(lambda: _touched(env, 3), 30, "the tier-3 job to be capped or paused")
        assert not _touched(env, 0)
        touched = [t for t in range(1, 4) if _touched(env, t)]
        words = [e for t in touched for e in object_events(env, NS, f"tier-{t}")
                 if e.startswith(("PowerCapped:", "Paused:"))]
        assert all(f"grid event {event}" in w for w in words), words
        # What the site could still shed, reported on the event to the utility (in KW).
        wait_for(lambda: any(v > 0 for v in vtn.reports(event)), 30,
                 "sheddable power reported to the VTN")
        assert vtn.reports(other) == []  # never seen: another feeder's event
        assert other not in json.dumps(_budget(env))

        # An event we cannot obey: named in the budget's status, the limit kept; deleted,
        # the problem goes.
        bad = vtn.event(program_id, "tariff", "PRICE", 0.31, "KWH", [FEEDER])
        wait_for(lambda: bad in _budget(env).get("gridSignal", ""), 30,
                 "the problem in the budget's status")
        status = _budget(env)
        assert "payload type 'PRICE' is not supported" in status["gridSignal"], status
        assert status["limitWatts"] == BASE_WATTS // 2
        wait_for(lambda: operator.samples("aifactory_grid_signal_problem") == [({}, 1.0)], 30,
                 "aifactory_grid_signal_problem to be 1")
        vtn.call("DELETE", f"/events/{bad}")
        wait_for(lambda: _budget(env).get("gridSignal") == "", 30, "the problem to clear")

        vtn.call("DELETE", f"/events/{event}")
        wait_for(lambda: _budget(env).get("limitWatts") == BASE_WATTS, 30,
                 "the limit to come back")
        for tier in range(4):
            watch.wait_phase(NS, f"tier-{tier}", ["Running"], timeout=60)
        wait_for(lambda: not any(_capped(watch, t) for t in range(4)), 30, "every cap restored")
        for tier in touched:
            events = object_events(env, NS, f"tier-{tier}")
            if any(e.startswith("Paused:") for e in events):
                assert any(e.startswith("Resumed:") for e in events), events
                assert (watch.status(NS, f"tier-{tier}").get("restarts") or 0) == 0
        assert watch.violations == [], watch.violations[:3]
    finally:
        watch.close()


def test_a_vtn_that_goes_away_is_said_and_the_budget_is_kept(
        aifactory_installed: KubeTestEnv, operator: OperatorProcess, vtn: Vtn) -> None:
    """After the test above: the VTN stops; the budget's status says so (naming the VTN) and
    its limit stays as it was."""
    env = aifactory_installed
    before = _budget(env)["limitWatts"]
    vtn.stop()
    wait_for(lambda: "unreachable" in _budget(env).get("gridSignal", ""), 30,
             "the outage in the budget's status")
    status = _budget(env)
    assert vtn.url in status["gridSignal"] and status["limitWatts"] == before, status
    assert "OpenADR 3:" in operator.log_tail(200)
