"""GPU power profiles, the H200 fit to real measurements, cost and energy integration."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aifactory.controller.core.errors import InputFileError, InvariantError, SpecError
from aifactory.controller.core.gpus import GENERIC_MODEL, known_models
from aifactory.controller.inputs.datasets import SHARED_ENV, shared_dir, shared_path
from aifactory.controller.power.fit import (
    PowerSample,
    fit_power_curve,
    load_h200_samples,
    no_context_idle_watts,
)
from aifactory.controller.power.model import (
    H200,
    CostModel,
    EnergyIntegrator,
    GPUPowerProfile,
    joules_to_kwh,
    kwh_to_joules,
    profile_for,
)
from tests.shared_data import SHARED, needs_shared

# --------------------------------------------------------------------------- the H200 fit

# Measured when this was written: rmse 20.5 W and max 82.6 W over 686 steady samples (the
# worst are the bursty 10 % duty phase and the 75 % duty phase of the second run, which
# draws 632 W at 75 % utilization where the first run draws 686 W at 82 %); against the
# per-phase means of h200_power_summary.json: mean abs error 3.8 W, max 7.7 W (duty_50).
SUMMARY_MEAN_ABS_ERROR_LIMIT_W = 5.0
SUMMARY_MAX_ABS_ERROR_LIMIT_W = 10.0


@pytest.fixture(scope="module")
def h200_samples() -> list[PowerSample]:
    assert SHARED is not None
    return load_h200_samples(SHARED / "data")


@needs_shared
def test_shipped_h200_constants_are_the_fit_of_the_shared_measurements(
        h200_samples: list[PowerSample]) -> None:
    fit = fit_power_curve(h200_samples)
    assert abs(H200.active_idle_watts - fit.active_idle_watts) < 1.0
    assert abs(H200.watts_per_utilization - fit.watts_per_utilization) < 1.0
    assert abs(H200.saturation_watts - fit.saturation_watts) < 1.0
    assert abs(H200.idle_watts - no_context_idle_watts(h200_samples)) < 1.0
    assert fit.rmse_watts < 25.0
    assert fit.max_abs_error_watts < 100.0


@needs_shared
def test_h200_curve_matches_the_per_phase_means_of_the_summary() -> None:
    assert SHARED is not None
    summary = json.loads((SHARED / "data" / "h200_power_summary.json").read_text())
    # cooldown is left out: its mean mixes the ramp down from 650 W with the idle tail.
    phases = {k: v for k, v in summary["phases"].items() if k != "cooldown"}
    errors = [abs(H200.power_watts(p["util_gpu_mean"] / 100) - p["power_w_mean"])
              for p in phases.values()]
    assert len(errors) == 5
    assert sum(errors) / len(errors) < SUMMARY_MEAN_ABS_ERROR_LIMIT_W
    assert max(errors) < SUMMARY_MAX_ABS_ERROR_LIMIT_W
    assert H200.power_limit_watts * 1000 == summary["power_limit_mw"]
    assert H200.min_power_limit_watts * 1000 == summary["power_limit_constraints_mw"][0]


@needs_shared
def test_loader_keeps_steady_samples_and_splits_off_the_no_context_ones(
        h200_samples: list[PowerSample]) -> None:
    no_context = [s for s in h200_samples if not s.context]
    assert 60 <= len(no_context) <= 70
    assert all(75 < s.watts < 90 and s.utilization == 0 for s in no_context)
    assert 600 <= sum(s.context for s in h200_samples) <= 750


@dataclass(frozen=True)
class Hinge:
    active_idle: float
    slope: float
    saturation: float


@pytest.mark.parametrize("truth", [
    Hinge(120.0, 800.0, 690.0),
    Hinge(50.0, 300.0, 300.0),
    Hinge(10.0, 80.0, 69.0),
], ids=["an H200-like curve is recovered exactly",
        "a knee at 83 % utilization is found",
        "a T4-sized curve is recovered exactly"])
def test_fit_recovers_a_noise_free_hinge(truth: Hinge) -> None:
    samples = [PowerSample(u / 100, min(truth.active_idle + truth.slope * u / 100,
                                        truth.saturation)) for u in range(0, 101)]
    samples.append(PowerSample(0.0, 9.0, context=False))
    fit = fit_power_curve(samples)
    assert fit.active_idle_watts == pytest.approx(truth.active_idle, abs=1e-6)
    assert fit.watts_per_utilization == pytest.approx(truth.slope, abs=1e-6)
    assert fit.saturation_watts == pytest.approx(truth.saturation, abs=1e-6)
    assert fit.rmse_watts == pytest.approx(0.0, abs=1e-6)
    active_idle, slope, saturation, rmse, worst = fit  # unpacks as a 5-tuple
    assert (active_idle, slope, saturation) == fit[:3] and worst >= rmse


@pytest.mark.parametrize(("samples", "message"), [
    ([PowerSample(0.1, 200.0), PowerSample(0.5, 500.0)], "need samples at >= 95% utilization"),
    ([PowerSample(1.0, 690.0)], "more than one utilization"),
], ids=["no full-load samples leave the saturation unknown",
        "samples at one utilization cannot give a slope"])
def test_fit_rejects_samples_that_cannot_determine_the_curve(
        samples: list[PowerSample], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        fit_power_curve(samples)


def test_idle_needs_no_context_samples() -> None:
    with pytest.raises(SpecError, match="no CUDA context"):
        no_context_idle_watts([PowerSample(0.0, 120.0)])


def test_loader_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"h200_power_samples\.csv: cannot read"):
        load_h200_samples(tmp_path)


def test_loader_names_file_line_and_column_of_a_bad_number(tmp_path: Path) -> None:
    (tmp_path / "h200_power_samples.csv").write_text(
        "t,phase,power_w,util_gpu\n1.0,init,80,0\n1.1,idle,abc,0\n")
    with pytest.raises(InputFileError,
                       match=r"h200_power_samples.csv:3 column 'power_w': expected a number"):
        load_h200_samples(tmp_path)


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize(("utilization", "cap", "watts"), [
    (0.0, None, 124.2),
    (0.5, None, 124.2 + 0.5 * 803.8),
    (1.0, None, 691.0),
    (1.7, None, 691.0),
    (-0.3, None, 124.2),
    (1.0, 400.0, 400.0),
    (1.0, 50.0, 200.0),
    (0.1, 300.0, 124.2 + 0.1 * 803.8),
    (1.0, 900.0, 691.0),
], ids=["no load draws the active idle power",
        "half load is on the line",
        "full load draws the saturation power",
        "utilization above 1 is clamped",
        "negative utilization is clamped",
        "a cap limits full-load draw",
        "a cap below the settable minimum is raised to 200 W",
        "a cap above the draw changes nothing",
        "a cap above the power limit changes nothing"])
def test_h200_power_at_utilization_and_cap(utilization: float, cap: float | None,
                                           watts: float) -> None:
    assert H200.power_watts(utilization, cap) == pytest.approx(watts)


def test_unallocated_gpu_draws_no_context_idle_power() -> None:
    assert H200.idle_power_watts() == H200.idle_watts == pytest.approx(79.1)
    assert H200.idle_power_watts() < H200.power_watts(0.0)


def test_nan_utilization_is_rejected() -> None:
    with pytest.raises(SpecError, match="utilization"):
        H200.power_watts(math.nan)


@given(st.floats(-1, 2), st.floats(-1, 2), st.one_of(st.none(), st.floats(0, 2000)))
def test_power_is_monotone_in_utilization_and_bounded(u1: float, u2: float,
                                                     cap: float | None) -> None:
    lo, hi = sorted((u1, u2))
    for model in known_models():
        p = profile_for(model)
        assert p.power_watts(lo, cap) <= p.power_watts(hi, cap) + 1e-9
        assert p.power_watts(hi, cap) <= p.power_limit_watts


SPELLINGS = [
    ("H200", "H200", 700.0),
    ("NVIDIA-H200", "H200", 700.0),
    ("NVIDIA H200", "H200", 700.0),
    ("nvidia-h100-80gb-hbm3", "H100", 700.0),
    ("NVIDIA-A100-SXM4-80GB", "A100", 400.0),
    ("A100-SXM4-80GB", "A100", 400.0),
    ("A800-SXM4-80GB", "A800", 400.0),
    ("NVIDIA-B200", "B200", 1000.0),
    ("NVIDIA-L40S", "L40S", 350.0),
    ("H800", "H800", 700.0),
    ("T4", "T4", 70.0),
    ("P100", "P100", 250.0),
    ("V100M16", "V100M16", 300.0),
    ("V100M32", "V100M32", 300.0),
    ("A10", "A10", 150.0),
    ("G2", GENERIC_MODEL, 300.0),
    ("GPU-series-1", GENERIC_MODEL, 300.0),
]


@pytest.mark.parametrize(("name", "model", "limit"), SPELLINGS, ids=[
    f"{name} is the {model} profile" for name, model, _ in SPELLINGS])
def test_profile_for_accepts_every_spelling(name: str, model: str, limit: float) -> None:
    profile = profile_for(name, strict=True)
    assert (profile.model, profile.power_limit_watts) == (model, limit)


def test_unknown_model_is_generic_unless_strict() -> None:
    assert profile_for("Z9000").model == GENERIC_MODEL
    with pytest.raises(SpecError, match=r"unknown GPU model 'Z9000'; known models are .*H200"):
        profile_for("Z9000", strict=True)


@pytest.mark.parametrize("model", known_models())
def test_every_profile_has_the_h200_shape(model: str) -> None:
    p = profile_for(model)
    assert 0.11 <= p.idle_watts / p.power_limit_watts <= 0.17
    assert p.idle_watts < p.active_idle_watts < p.saturation_watts <= p.power_limit_watts
    assert p.min_power_limit_watts < p.power_limit_watts
    assert p.peak_watts == p.saturation_watts
    assert p.source


@pytest.mark.parametrize(("changes", "field"), [
    ({"saturation_watts": 800.0}, "saturation_watts"),
    ({"idle_watts": 200.0}, "idle_watts"),
    ({"watts_per_utilization": -1.0}, "watts_per_utilization"),
    ({"min_power_limit_watts": 0.0}, "min_power_limit_watts"),
], ids=["saturation above the limit", "idle above active idle", "negative slope",
        "zero cap floor"])
def test_inconsistent_profile_names_the_field(changes: dict[str, float], field: str) -> None:
    values = {"model": "X", "idle_watts": 80.0, "active_idle_watts": 120.0,
              "power_limit_watts": 700.0, "watts_per_utilization": 800.0,
              "saturation_watts": 690.0, "min_power_limit_watts": 200.0, **changes}
    with pytest.raises(SpecError, match=rf"GPUPowerProfile\('X'\)\.{field}"):
        GPUPowerProfile(**values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- cost


@pytest.mark.parametrize(("energy_joules", "gpu_seconds", "dollars"), [
    (0.0, 0.0, 0.0),
    (3_600_000.0, 0.0, 0.10),
    (0.0, 3600.0, 2.00),
    (700.0 * 3600, 3600.0, 0.07 + 2.00),
], ids=["nothing costs nothing", "one kWh costs ten cents",
        "one GPU-hour costs two dollars", "an H200-hour at full power"])
def test_cost_of_energy_and_gpu_time(energy_joules: float, gpu_seconds: float,
                                     dollars: float) -> None:
    assert CostModel().cost_dollars(energy_joules, gpu_seconds) == pytest.approx(dollars)


def test_joules_and_kwh_convert_both_ways() -> None:
    assert joules_to_kwh(3_600_000.0) == 1.0
    assert kwh_to_joules(joules_to_kwh(12345.0)) == pytest.approx(12345.0)


def test_negative_price_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"CostModel\.electricity_dollars_per_kwh"):
        CostModel(electricity_dollars_per_kwh=-0.1)


# --------------------------------------------------------------------------- energy


@pytest.mark.parametrize(("steps", "now", "expected"), [
    ([], 10.0, {}),
    ([("gpu0", 100.0, 0.0)], 10.0, {"gpu0": 1000.0}),
    ([("gpu0", 100.0, 0.0), ("gpu0", 700.0, 5.0)], 10.0, {"gpu0": 500.0 + 3500.0}),
    ([("gpu0", 100.0, 0.0), ("gpu1", 200.0, 4.0), ("gpu0", 0.0, 6.0)], 10.0,
     {"gpu0": 600.0, "gpu1": 1200.0}),
], ids=["no keys, no energy", "constant power integrates to watts times seconds",
        "a change of power starts a new segment", "keys integrate independently"])
def test_energy_integrates_piecewise_constant_power(
        steps: list[tuple[str, float, float]], now: float, expected: dict[str, float]) -> None:
    energy: EnergyIntegrator[str] = EnergyIntegrator()
    for key, watts, at in steps:
        energy.set_power(key, watts, at)
    for key, joules in expected.items():
        assert energy.energy_joules(key, now) == pytest.approx(joules)
    assert energy.total_energy_joules(now) == pytest.approx(sum(expected.values()))
    assert energy.energy_joules("never-set", now) == 0.0


def test_time_going_backwards_is_a_bug() -> None:
    energy: EnergyIntegrator[str] = EnergyIntegrator()
    energy.set_power("gpu0", 100.0, 10.0)
    with pytest.raises(InvariantError, match="time went backwards"):
        energy.set_power("gpu0", 50.0, 9.0)


def test_negative_power_is_rejected() -> None:
    with pytest.raises(SpecError, match="watts"):
        EnergyIntegrator[str]().set_power("gpu0", -1.0, 0.0)


@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 1000), st.floats(0, 100)),
                max_size=40))
def test_total_energy_is_the_sum_of_keys_and_never_decreases(
        changes: list[tuple[int, float, float]]) -> None:
    energy: EnergyIntegrator[int] = EnergyIntegrator()
    now = 0.0
    previous_total = 0.0
    for key, watts, dt in changes:
        now += dt
        energy.set_power(key, watts, now)
        total = energy.total_energy_joules(now)
        assert total == pytest.approx(sum(energy.energy_joules(k, now) for k in energy),
                                      rel=1e-9, abs=1e-6)
        assert total >= previous_total - 1e-6
        previous_total = total
    assert energy.total_watts == pytest.approx(sum(energy.watts(k) for k in energy))


# --------------------------------------------------------------------------- shared data


def test_shared_dir_honours_the_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))
    assert shared_dir() == tmp_path
    with pytest.raises(InputFileError, match="no such file in the shared data folder"):
        shared_path("data", "missing.csv")
    monkeypatch.setenv(SHARED_ENV, str(tmp_path / "absent"))
    assert shared_dir() is None
    with pytest.raises(InputFileError, match="shared data folder not found"):
        shared_path("data")


@needs_shared
def test_shared_dir_defaults_to_the_folder_beside_the_repository(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SHARED_ENV, raising=False)
    repo_root = Path(__file__).resolve().parents[2]
    found = shared_dir()
    assert found is not None
    assert found.resolve() == (repo_root / ".." / "shared").resolve()
