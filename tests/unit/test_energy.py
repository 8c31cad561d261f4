"""Energy without GPUs (the power model meter) and its attribution to jobs."""

from __future__ import annotations

import pytest

from aifactory.controller.backends.energy import EnergyLedger, ModelMeter, Owner
from aifactory.controller.power.model import profile_for


def test_the_model_meter_integrates_idle_and_busy_power() -> None:
    meter = ModelMeter()
    meter.ensure_node("n0", 2, "H200", now=0.0)
    profile = profile_for("H200")
    meter.assign([("n0", 0)], Owner("a/job", utilization=1.0), now=10.0)
    sample = meter.sample(now=20.0)
    idle, busy = profile.idle_power_watts(), profile.power_watts(1.0)
    assert sample[("n0", 0)][1] == pytest.approx(10 * idle + 10 * busy)
    assert sample[("n0", 1)][1] == pytest.approx(20 * idle)
    meter.release("a/job", now=20.0)
    assert meter.sample(now=20.0)[("n0", 0)][0] == pytest.approx(idle)


def test_the_ledger_splits_each_gpus_energy_by_share() -> None:
    ledger = EnergyLedger()
    owners = {("n0", 0): {"a": 500, "b": 500}, ("n0", 1): {"a": 1000}}
    ledger.observe({("n0", 0): 100.0, ("n0", 1): 50.0}, owners)
    ledger.observe({("n0", 0): 200.0, ("n0", 1): 80.0, ("n0", 2): 5.0}, owners)
    assert ledger.joules("a") == pytest.approx(50 + 30)
    assert ledger.joules("b") == pytest.approx(50)
    ledger.observe({("n0", 0): 10.0}, owners)  # counter reset: nothing booked
    assert ledger.joules("b") == pytest.approx(50)
