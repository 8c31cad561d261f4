"""Telemetry sources: NVML against a fake ``pynvml`` module, the power model, attribution.

There is no GPU on the machines that run these tests, so ``NvmlTelemetry`` is exercised
against ``FakeNvml``: a stand-in module with the nvidia-ml-py functions it calls, returning
what NVML returns (milliwatts, millijoules, percent) and counting the calls.
"""

from __future__ import annotations

import logging
import math
import sys
import types
from collections import Counter
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from aifactory.controller.backends.base import GPUReading, TelemetrySnapshot
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement, WorkerSlot
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.observe.exporter import FactoryCollector
from aifactory.controller.observe.snapshot import PlaneObserver, choose_telemetry
from aifactory.controller.observe.telemetry import (
    EnergyAttributor,
    ModelTelemetry,
    NvmlTelemetry,
    TelemetryUnavailableError,
)
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import default_utilization
from aifactory.controller.sim.simulation import Simulation
from tests.factories import grid, grid_nodes


class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """The parts of pynvml that NvmlTelemetry uses, for ``gpus`` GPUs."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: int = 2, init_error: str | None = None,
                 energy_supported: bool = True) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.energy_supported = energy_supported
        self.power_mw = [300_000 + 100_000 * i for i in range(gpus)]
        self.energy_mj = [1_000_000 * (i + 1) for i in range(gpus)]
        self.failing: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.shutdown = False

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.failing:
            raise FakeNVMLError(f"{name}: Not Supported")

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA H200"

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._call("power")
        return self.power_mw[h]

    def nvmlDeviceGetUtilizationRates(self, h: int) -> types.SimpleNamespace:
        self._call("utilization")
        return types.SimpleNamespace(gpu=75, memory=30)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> types.SimpleNamespace:
        self._call("memory")
        return types.SimpleNamespace(used=40 * 2**30, total=141 * 2**30, free=101 * 2**30)

    def nvmlDeviceGetTemperature(self, h: int, kind: int) -> int:
        assert kind == self.NVML_TEMPERATURE_GPU
        return 55

    def nvmlDeviceGetClockInfo(self, h: int, kind: int) -> int:
        assert kind == self.NVML_CLOCK_SM
        return 1980

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return 700_000

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        self._call("energy")
        if not self.energy_supported:
            raise FakeNVMLError("Not Supported")
        return self.energy_mj[h]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _module(fake: FakeNvml) -> types.ModuleType:
    """``fake`` as an importable module object, as ``import pynvml`` would return."""
    module = types.ModuleType("pynvml")
    for name in dir(fake):
        if name.startswith("nvml") or name.startswith("NVML"):
            setattr(module, name, getattr(fake, name))
    return module


# --------------------------------------------------------------------------- NVML


def test_nvml_readings_are_in_base_units(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", _module(fake))
    source = NvmlTelemetry(node="gpu-host-1", clock=Clock())
    first = source.read().gpus[0]
    assert (first.node, first.index, first.model) == ("gpu-host-1", 0, "H200")
    assert first.power_watts == 300.0
    assert first.energy_joules == 1000.0
    assert first.utilization == 0.75
    assert first.memory_used_bytes == 40 * 2**30
    assert first.memory_total_bytes == 141 * 2**30
    assert (first.temperature_celsius, first.sm_clock_mhz) == (55.0, 1980.0)
    assert first.power_limit_watts == 700.0
    source.close()
    assert fake.shutdown


def test_the_energy_counter_is_read_seldom_and_power_every_time() -> None:
    fake = FakeNvml(gpus=2)
    clock = Clock()
    source = NvmlTelemetry(node="h", nvml=fake, clock=clock, energy_interval_seconds=30.0)
    for _ in range(10):  # every second for 10 s
        source.read()
        clock.now += 1.0
    assert fake.calls["power"] == 20
    assert fake.calls["energy"] == 2  # once per GPU, at the first read
    clock.now = 30.0
    source.read()
    assert fake.calls["energy"] == 4
    assert source.energy_counter_reads == 4


def test_between_counter_reads_energy_integrates_the_sampled_power() -> None:
    fake = FakeNvml(gpus=1)
    clock = Clock()
    source = NvmlTelemetry(node="h", nvml=fake, clock=clock, energy_interval_seconds=60.0)
    assert source.read().gpus[0].energy_joules == 1000.0
    clock.now = 2.0
    fake.power_mw[0] = 500_000  # 300 W -> 500 W: the trapezoid gives 800 J over 2 s
    assert source.read().gpus[0].energy_joules == pytest.approx(1800.0)


def test_the_exported_counter_never_goes_back_when_the_hardware_reads_lower() -> None:
    fake = FakeNvml(gpus=1)
    clock = Clock()
    source = NvmlTelemetry(node="h", nvml=fake, clock=clock, energy_interval_seconds=10.0)
    source.read()
    clock.now = 9.0
    estimated = 1000.0 + 300.0 * 9.0  # exported from the integral of power
    assert source.read().gpus[0].energy_joules == pytest.approx(estimated)
    clock.now = 10.0
    fake.energy_mj[0] = int((estimated - 100.0) * 1000)  # the hardware reads lower
    assert source.read().gpus[0].energy_joules == pytest.approx(estimated)
    clock.now = 20.0
    fake.energy_mj[0] = int((estimated + 3000.0) * 1000)
    assert source.read().gpus[0].energy_joules == pytest.approx(estimated + 3000.0)


def test_a_gpu_without_an_energy_counter_integrates_power_only() -> None:
    fake = FakeNvml(gpus=1, energy_supported=False)
    clock = Clock()
    source = NvmlTelemetry(node="h", nvml=fake, clock=clock, energy_interval_seconds=1.0)
    source.read()
    clock.now = 5.0
    assert source.read().gpus[0].energy_joules == pytest.approx(300.0 * 5)
    assert fake.calls["energy"] == 1  # not asked again once it said Not Supported


def test_a_failing_call_gives_nan_and_the_rest_still_reads() -> None:
    fake = FakeNvml(gpus=1)
    fake.failing = {"utilization", "memory"}
    reading = NvmlTelemetry(node="h", nvml=fake, clock=Clock()).read().gpus[0]
    assert math.isnan(reading.utilization)
    assert reading.memory_used_bytes == 0
    assert reading.power_watts == 300.0


@dataclass(frozen=True)
class Broken:
    id: str
    fake: FakeNvml | None
    message: str


BROKEN = [
    Broken("no driver library", FakeNvml(init_error="NVML Shared Library Not Found"),
           "driver library could not start (NVML Shared Library Not Found)"),
    Broken("a driver but no GPU", FakeNvml(gpus=0), "the driver sees no GPU here"),
    Broken("nvidia-ml-py not installed", None, "nvidia-ml-py is not installed"),
]


@pytest.mark.parametrize("case", BROKEN, ids=lambda c: c.id)
def test_nvml_says_clearly_why_it_is_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                 case: Broken) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None if case.fake is None
                        else _module(case.fake))
    with pytest.raises(TelemetryUnavailableError, match="NVML unavailable") as err:
        NvmlTelemetry(node="h")
    assert case.message in str(err.value)


def test_without_nvml_the_exporter_falls_back_to_the_model_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    sim = Simulation(factory_from_nodes("t", grid_nodes(1, 1, 2)))
    with caplog.at_level(logging.WARNING, logger="aifactory.telemetry"):
        choice = choose_telemetry(sim, "nvml")
    assert choice.source.name == "model"
    assert "nvidia-ml-py is not installed" in choice.fallback_reason
    assert "falls back to the power model" in caplog.text
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FactoryCollector(PlaneObserver(sim, choice)))
    assert reg.get_sample_value("aifactory_telemetry_source_info",
                                {"source": "model", "requested": "nvml"}) == 1


def test_an_unknown_source_is_refused_with_the_valid_ones() -> None:
    sim = Simulation(factory_from_nodes("t", grid_nodes(1, 1, 1)))
    with pytest.raises(ValueError, match="valid sources are auto, backend, nvml, model"):
        choose_telemetry(sim, "dcgm")


# --------------------------------------------------------------------------- model


def test_the_model_draws_idle_power_unheld_and_the_curve_for_jobs() -> None:
    #   one rack, 2 nodes x 8 GPUs; a capped 4-GPU job on node 0
    topo = grid(1, 1, 2)
    spec = JobSpec(name="j", workers=1, gpus_per_worker=4, power_cap_watts_per_gpu=400.0)
    placement = Placement("default/j", (WorkerSlot(0, (0, 1, 2, 3)),))
    clock = Clock()
    source = ModelTelemetry(topo, lambda: [(spec, placement)], clock)
    profile = profile_for("H200")
    first = source.read()
    held = profile.power_watts(default_utilization(spec), 400.0)
    assert [r.power_watts for r in first.gpus[:5]] == [held] * 4 + [profile.idle_power_watts()]
    assert first.gpus[0].power_limit_watts == 400.0
    assert first.gpus[0].jobs == ("default/j",)
    clock.now = 10.0
    second = source.read()
    assert second.gpus[0].energy_joules == pytest.approx(held * 10)
    assert second.gpus[8].energy_joules == pytest.approx(profile.idle_power_watts() * 10)


# --------------------------------------------------------------------------- attribution


def _snap(energies: dict[tuple[str, int], float]) -> TelemetrySnapshot:
    return TelemetrySnapshot(0.0, "test", tuple(
        GPUReading(node, idx, "H200", 0.0, joules, 0.0, 0, 0, 0.0, 0.0, 700.0)
        for (node, idx), joules in energies.items()))


@dataclass(frozen=True)
class Split:
    id: str
    owners: dict[tuple[str, int], list[tuple[str, int]]]
    expected: dict[str, float]
    unattributed: float


SPLITS = [
    Split("a whole GPU's increase goes to its job", {("n", 0): [("a", 1000)]},
          {"a": 100.0}, 100.0),
    Split("a shared GPU splits by milli share",
          {("n", 0): [("a", 250), ("b", 750)], ("n", 1): [("b", 1000)]},
          {"a": 25.0, "b": 175.0}, 0.0),
    Split("a half-used GPU gives all of it to its one holder", {("n", 0): [("a", 500)]},
          {"a": 100.0}, 100.0),
]


@pytest.mark.parametrize("case", SPLITS, ids=lambda c: c.id)
def test_energy_goes_to_the_jobs_that_held_the_gpu(case: Split) -> None:
    attributor = EnergyAttributor()
    attributor.update(_snap({("n", 0): 1000.0, ("n", 1): 5000.0}), case.owners)
    # ownership changes now; the increase below still belongs to the previous holders
    attributor.update(_snap({("n", 0): 1100.0, ("n", 1): 5100.0}), {})
    assert attributor.job_joules == pytest.approx(case.expected)
    assert attributor.unattributed_joules == pytest.approx(case.unattributed)
