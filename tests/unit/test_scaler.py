"""The autoscaler acting on a control plane: HPA-like behaviour, power awareness, counters,
and a simulated day where replicas and watts follow a diurnal request rate."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from aifactory.controller.backends.base import ReplicaLoad
from aifactory.controller.core.errors import InputFileError
from aifactory.controller.core.spec import JobKind, JobSpec, PowerBudgetSpec
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.runtime.autoscale import AutoscalePolicy, replica_changes
from aifactory.controller.runtime.scaler import Autoscaler, replicas_of
from aifactory.controller.sim.simulation import Simulation
from aifactory.controller.sim.timeseries import TimeSeries, TimeSeriesSampler
from aifactory.controller.sim.traffic import (
    DAY,
    TrafficModel,
    diurnal,
    load_curve_csv,
    traffic_for,
)
from tests.factories import grid_nodes

SERVICE = JobSpec("chat", kind=JobKind.INFERENCE, namespace="serving", workers=2,
                  gpus_per_worker=1, group="serving/chat", expected_utilization=0.6)


class SetLoad:
    """A fake load source for fast tests: each ready replica has ``per_replica`` in flight
    (``total`` spread evenly when set)."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.total: float = 0.0
        self.served = 0.0

    def replica_load(self, job: str) -> ReplicaLoad | None:
        ready = [r for r in replicas_of(self.sim, "serving/chat") if r.placement]
        if not ready:
            return None
        return ReplicaLoad(self.total / len(ready), self.served)


def _sim(budget_watts: float | None = None) -> Simulation:
    factory = factory_from_nodes("t", grid_nodes(1, 2, 2))  # 32 H200 in 2 racks
    if budget_watts is not None:
        factory = replace(factory, power_budgets=(PowerBudgetSpec("site", budget_watts),))
    return Simulation(factory)


def _start(sim: Simulation, policy: AutoscalePolicy) -> tuple[Autoscaler, SetLoad]:
    load = SetLoad(sim)
    scaler = Autoscaler(sim, load)
    replicas = scaler.track(SERVICE, policy)
    add, _ = replica_changes(replace(SERVICE, workers=replicas), [], replicas)
    for spec in add:
        sim.submit(spec)
    sim.cycle(force=True)
    return scaler, load


def _tick(sim: Simulation, scaler: Autoscaler, seconds: float = 15.0) -> int:
    sim.advance_to(sim.now + seconds)
    scaler.step()
    sim.cycle(force=True)
    desired = scaler.desired("serving/chat")
    assert desired is not None
    return desired


def test_scale_up_at_once_doubling_at_most_then_down_only_after_the_window() -> None:
    sim = _sim()
    policy = AutoscalePolicy(1, 16, target_in_flight=4, scale_down_stabilization_seconds=300)
    scaler, load = _start(sim, policy)
    load.total = 40.0  # wants 10 replicas
    assert _tick(sim, scaler) == 4  # 2 -> 4: doubling at most
    assert _tick(sim, scaler) == 8
    assert _tick(sim, scaler) == 10
    assert len([r for r in replicas_of(sim, "serving/chat") if r.placement]) == 10
    load.total = 4.0  # wants 1: held for 300 s by the recommendations of 10
    held = [_tick(sim, scaler) for _ in range(19)]  # 285 s
    assert held == [10] * 19, held
    view = scaler.view("serving/chat")
    assert view is not None and view.desired == 10
    after = [_tick(sim, scaler) for _ in range(3)]
    assert after[-1] == 1, after
    assert [r.spec.name for r in replicas_of(sim, "serving/chat")] == ["chat:r0"]


def test_no_flapping_under_load_that_wobbles_around_the_target() -> None:
    sim = _sim()
    policy = AutoscalePolicy(1, 16, target_in_flight=4)  # the 300 s window
    scaler, load = _start(sim, policy)
    load.total = 16.0
    _tick(sim, scaler)
    settled = len(scaler.changes)
    for i in range(80):  # 20 minutes of load swinging 12-20 (a 283 s period) around 16
        load.total = 16.0 + 4.0 * math.sin(i / 3.0)
        _tick(sim, scaler)
    downs = [c for c in scaler.changes[settled:] if c.replicas_to < c.replicas_from]
    ups = [c for c in scaler.changes[settled:] if c.replicas_to > c.replicas_from]
    # Up to the peak's need once, and never down again while the swings recur inside
    # the window.
    assert len(ups) <= 1 and downs == [], scaler.changes[settled:]


def test_bounds_hold_and_no_ready_replica_keeps_the_count() -> None:
    sim = _sim()
    policy = AutoscalePolicy(2, 5, target_in_flight=1)
    scaler, load = _start(sim, policy)
    load.total = 1000.0
    for _ in range(5):
        got = _tick(sim, scaler)
    assert got == 5
    sim2 = _sim()
    scaler2 = Autoscaler(sim2, None)
    assert scaler2.track(SERVICE, policy) == 2
    assert scaler2.step(force=True) == []  # nothing ready reports: keep


def test_a_scale_up_that_would_break_the_power_budget_waits_and_a_scale_down_frees_watts(
        ) -> None:
    # Room for about 4 replicas at their admission estimate above the idle factory.
    probe = _sim(budget_watts=1e9)
    limit = probe.state.budgets.baseline_watts[0] + 4.5 * (
        probe.config.watts_per_gpu(SERVICE) - _idle_per_gpu())
    sim = _sim(budget_watts=limit)
    policy = AutoscalePolicy(1, 8, target_in_flight=4)
    scaler, load = _start(sim, policy)
    load.total = 32.0  # wants 8
    _tick(sim, scaler)
    _tick(sim, scaler)
    view = scaler.view("serving/chat")
    assert view is not None and view.desired == 8
    assert 2 <= view.placed < 8, view
    assert "wait" in view.waiting and "power" in view.waiting.lower(), view.waiting
    drawn = sim.metrics.budget_actual[0]
    load.total = 4.0
    scaler.services["serving/chat"].recommendations.clear()  # no window: down at once
    _tick(sim, scaler)
    assert scaler.desired("serving/chat") == 1
    assert sim.metrics.budget_actual[0] < drawn  # freed in the same step
    assert len(replicas_of(sim, "serving/chat")) == 1


def _idle_per_gpu() -> float:
    from aifactory.controller.power.model import profile_for

    return profile_for("H200").idle_power_watts()


def test_request_counters_stay_monotonic_when_replicas_go() -> None:
    sim = _sim()
    policy = AutoscalePolicy(1, 4, target_in_flight=4, scale_down_stabilization_seconds=0)
    scaler, load = _start(sim, policy)
    load.total, load.served = 8.0, 100.0
    before = scaler.view("serving/chat")
    assert before is not None and before.requests_total == 200.0  # 2 replicas x 100
    load.total = 1.0
    _tick(sim, scaler)
    after = scaler.view("serving/chat")
    assert after is not None and after.ready == 1
    assert after.requests_total >= before.requests_total


def test_a_simulated_day_replicas_and_watts_follow_the_diurnal_rate() -> None:
    sim = _sim()
    policy = AutoscalePolicy(1, 12, target_in_flight=8)
    curve = diurnal(trough=0.1, peak_hour=14.0)
    model = TrafficModel(sim, {SERVICE.key: traffic_for(SERVICE, policy, curve)})
    scaler = Autoscaler(sim, model)
    sampler = TimeSeriesSampler(sim, 300.0)
    n = scaler.track(SERVICE, policy)
    for spec in replica_changes(replace(SERVICE, workers=n), [], n)[0]:
        sim.submit(spec)
    sim.attach_autoscaler(scaler, model, DAY)
    sim.run(DAY)
    series = TimeSeries.from_dict(sampler.series().to_dict())
    (i,) = [k for k, s in enumerate(series.services) if s == SERVICE.key]
    by_hour: dict[int, list[float]] = {}
    watts: dict[int, list[float]] = {}
    for t, d, w in zip(series.times, series.service_desired[i], series.service_watts[i],
                       strict=True):
        by_hour.setdefault(int(t // 3600) % 24, []).append(d)
        watts.setdefault(int(t // 3600) % 24, []).append(w)
    peak, night = max(by_hour[14]), max(by_hour[2])
    assert peak >= 0.7 * policy.max_replicas and night <= 3, (peak, night)
    assert min(watts[14]) > 2 * max(watts[2])
    ups = [c for c in scaler.changes if c.replicas_to > c.replicas_from]
    downs = [c for c in scaler.changes if c.replicas_to < c.replicas_from]
    assert ups and downs
    # No flapping: no scale-down within the stabilization window after a scale-up.
    for up in ups:
        assert not any(up.at < d.at < up.at + policy.scale_down_stabilization_seconds
                       for d in downs)


def test_load_curve_csv_reads_a_rate_and_names_bad_rows(tmp_path: Path) -> None:
    good = tmp_path / "rate.csv"
    good.write_text("seconds,requests_per_second\n0,10\n3600,40\n7200,20\n")
    curve = load_curve_csv(good)
    assert curve.at(0) == 0.25 and curve.at(3600) == 1.0 and curve.at(1800) == 0.625
    assert curve.at(10_000) == 0.5  # held after the last row
    bad = tmp_path / "bad.csv"
    bad.write_text("seconds,requests_per_second\n0,10\nten,3\n")
    with pytest.raises(InputFileError, match=r"bad.csv:3.*seconds,requests_per_second"):
        load_curve_csv(bad)
    with pytest.raises(InputFileError, match="no rows"):
        (tmp_path / "empty.csv").write_text("seconds,rps\n")
        load_curve_csv(tmp_path / "empty.csv")


def test_a_new_or_restarted_service_is_not_scaled_down_before_a_window() -> None:
    """As the HPA: the count tracking starts at counts as a recommendation (an operator
    restart forgot the window's recommendations, and must not drop replicas at once)."""
    sim = _sim()
    policy = AutoscalePolicy(1, 8, target_in_flight=4, scale_down_stabilization_seconds=60)
    load = SetLoad(sim)
    scaler = Autoscaler(sim, load)
    assert scaler.track(replace(SERVICE, workers=1), policy, start=6) == 6  # from status
    for spec in replica_changes(replace(SERVICE, workers=6), [], 6)[0]:
        sim.submit(spec)
    sim.cycle(force=True)
    load.total = 4.0  # wants 1
    assert [_tick(sim, scaler) for _ in range(3)] == [6, 6, 6]
    assert [_tick(sim, scaler, 20.0) for _ in range(2)][-1] == 1
