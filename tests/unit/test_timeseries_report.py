"""The simulation's time series, and the report drawn from it.

A hand-checkable run on 2 racks x 2 nodes x 8 H200 (32 GPUs):

    factory
    ├── r0: n-b0-r0-00, n-b0-r0-01
    └── r1: n-b0-r1-00, n-b0-r1-01

    t=0    a (16 GPUs, 100 s) starts; b (32 GPUs, 50 s) waits for the whole factory
    t=100  a ends, b starts
    t=150  b ends
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aifactory.controller.cli.main import main
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.inputs.workload import Arrival
from aifactory.controller.observe.report import write_report
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import default_utilization
from aifactory.controller.sim.simulation import Simulation
from aifactory.controller.sim.timeseries import TimeSeries, TimeSeriesSampler
from tests.factories import grid_nodes

A = JobSpec(name="a", workers=2, gpus_per_worker=8)
B = JobSpec(name="b", workers=4, gpus_per_worker=8, namespace="other")


def _run(interval: float = 10.0, max_points: int = 4000) -> TimeSeries:
    sim = Simulation(factory_from_nodes("t", grid_nodes(1, 2, 2)))
    sampler = TimeSeriesSampler(sim, interval, max_points)
    sim.submit_all([Arrival(A, 0.0, 100.0), Arrival(B, 0.0, 50.0)])
    sim.run()
    return sampler.series("test")


@pytest.fixture(scope="module")
def series() -> TimeSeries:
    return _run()


def test_samples_fall_on_the_grid_until_the_run_ends(series: TimeSeries) -> None:
    assert series.times == tuple(float(t) for t in range(0, 151, 10))


def test_power_is_idle_plus_what_the_running_job_adds(series: TimeSeries) -> None:
    h200 = profile_for("H200")
    idle = 32 * h200.idle_power_watts()
    per_gpu = h200.power_watts(default_utilization(A)) - h200.idle_power_watts()
    at = dict(zip(series.times, series.power_watts, strict=True))
    assert at[0.0] == pytest.approx(idle + 16 * per_gpu)
    assert at[90.0] == pytest.approx(idle + 16 * per_gpu)
    assert at[100.0] == pytest.approx(idle + 32 * per_gpu)
    assert at[150.0] == pytest.approx(idle)


def test_queue_depth_and_held_gpus_follow_the_waiting_gang(series: TimeSeries) -> None:
    assert series.queues == ("default",)
    pending = dict(zip(series.times, series.queue_pending[0], strict=True))
    held = dict(zip(series.times, series.queue_gpus[0], strict=True))
    assert [pending[t] for t in (0.0, 90.0, 100.0, 150.0)] == [1, 1, 0, 0]
    assert [held[t] for t in (0.0, 90.0, 100.0, 150.0)] == [16, 16, 32, 0]


def test_rack_utilization_is_the_job_utilization_where_it_runs(series: TimeSeries) -> None:
    util = default_utilization(A)
    first = [column[0] for column in series.rack_utilization]
    assert sorted(first) == pytest.approx([0.0, util])  # a fills exactly one rack
    assert [column[10] for column in series.rack_utilization] == pytest.approx([util, util])


def test_totals_split_energy_by_queue_and_namespace(series: TimeSeries) -> None:
    assert [t.name for t in series.namespace_totals] == ["default", "other"]
    by_ns = {t.name: t for t in series.namespace_totals}
    assert by_ns["default"].gpu_hours == pytest.approx(16 * 100 / 3600)
    assert by_ns["other"].gpu_hours == pytest.approx(32 * 50 / 3600)
    assert series.totals[0].energy_joules == pytest.approx(
        sum(t.energy_joules for t in series.namespace_totals))


def test_a_long_run_coarsens_its_grid_instead_of_growing() -> None:
    coarse = _run(interval=1.0, max_points=16)
    assert len(coarse.times) <= 18
    steps = {b - a for a, b in zip(coarse.times, coarse.times[1:], strict=False)}
    assert min(steps) > 1.0


def test_the_series_survives_json(series: TimeSeries) -> None:
    assert TimeSeries.from_dict(json.loads(json.dumps(series.to_dict()))) == series


def test_a_series_without_times_is_refused_by_name() -> None:
    with pytest.raises(SpecError, match=r"timeseries\.times: is required"):
        TimeSeries.from_dict({"power_watts": []})


def test_the_report_is_a_png_and_a_page_that_embeds_it(series: TimeSeries,
                                                       tmp_path: Path) -> None:
    png, page = write_report(series, tmp_path / "r")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert "data:image/png;base64," in html
    assert "<td>other</td>" in html


def test_simulate_json_feeds_report_input(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run.json"
    assert main(["simulate", "--json", str(run), "--sample-seconds", "600",
                 "--no-progress"]) == 0
    doc = json.loads(run.read_text())
    series = doc["results"][0]["timeseries"]
    assert series["times"][:2] == [0.0, 600.0]
    assert main(["report", "--input", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep.png").exists() and (tmp_path / "rep.html").exists()
    del doc["results"][0]["timeseries"]
    run.write_text(json.dumps(doc))
    assert main(["report", "--input", str(run), "--out", str(tmp_path / "x")]) == 2
    assert "no time series" in capsys.readouterr().err


def test_a_grid_event_run_records_the_moving_limit_and_the_draw_per_tier(
        tmp_path: Path) -> None:
    events = tmp_path / "events.yaml"
    events.write_text("events:\n- {id: peak, start: 900, durationSeconds: 3600, "
                      "percent: 50, budgets: [factory]}\n")
    run = tmp_path / "run.json"
    assert main(["simulate", "--json", str(run), "--sample-seconds", "300", "--no-progress",
                 "--grid-events", str(events)]) == 0
    doc = json.loads(run.read_text())["results"][0]
    series = TimeSeries.from_dict(doc["timeseries"])
    factory = next(b for b in series.budgets if b.name == "factory")
    during = [lim for t, lim in zip(series.times, factory.limits_watts, strict=True)
              if 900 <= t < 4500]
    after = [lim for t, lim in zip(series.times, factory.limits_watts, strict=True)
             if t >= 4500]
    assert set(during) == {factory.limit_watts / 2} and set(after) == {factory.limit_watts}
    assert series.grid_events == (("peak", 900.0, 4500.0),)
    assert len(series.tier_draw) == 4 and max(series.tier_draw[0]) > 0
    assert doc["grid"]["actions"]["pause"] >= 1  # the tier-3 sample job
    assert main(["report", "--input", str(run), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
