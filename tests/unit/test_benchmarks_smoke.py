"""Every benchmark scenario, run on a small slice (``--smoke``), so the scripts keep working.

The full runs (``python -m benchmarks.<scenario>``, numbers in ``benchmarks/README.md``)
take from minutes to an hour and are not part of the suite. These need the public traces
in ``../shared``: skipped where a checkout has none, failed under
AIFACTORY_REQUIRE_INTEGRATION=1 (``tests.shared_data``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import fragmentation, gangs, power, replay, scale
from benchmarks.common import POLICIES
from tests.shared_data import needs_shared

pytestmark = needs_shared


def smoke(module: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
          ) -> dict[str, Any]:
    out = tmp_path / "out.json"
    assert module.main(["--smoke", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| policy |" in printed  # a markdown table was printed
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["machine"]["cpus"] >= 1
    return data


def test_fragmentation_fill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = smoke(fragmentation, tmp_path, capsys)
    assert {r["policy"] for r in data["runs"]} == set(POLICIES)
    for run in data["runs"]:
        for point in run["points"]:
            assert 0.0 <= point["allocation_rate"] <= 1.0
            assert point["unallocated_gpus"] == pytest.approx(
                data["gpus"] * (1 - point["allocation_rate"]))
    fgd = data["summary"]["fgd/multigpu50"]
    ours = fgd["aifactory"]["unallocated"]["1.0"]["mean"]
    # GPU sharing and packing beat a random spread and a scheduler without sharing.
    assert ours < fgd["random"]["unallocated"]["1.0"]["mean"]
    assert ours < fgd["kueue-bestfit"]["unallocated"]["1.0"]["mean"]


def test_time_replay(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = smoke(replay, tmp_path, capsys)
    assert {(r["variant"], r["policy"]) for r in data["runs"]} == {
        (v, p) for v in ("real", "stress") for p in POLICIES}
    for run in data["runs"]:
        assert len(run["allocation_series"]) == replay.SAMPLES + 1
        assert run["queue_wait_seconds_p95"] >= 0.0
    ours = [r for r in data["runs"] if r["policy"] == "aifactory"]
    assert all(r["jobs_never_placed"] == 0 for r in ours)


def test_gangs_on_the_lingjun_topology(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = smoke(gangs, tmp_path, capsys)
    assert len(data["runs"]) == 2 * len(POLICIES)
    ours = data["summary"]["aifactory"]
    assert ours["single_rack_fraction"]["mean"] >= 0.95
    assert ours["gangs_never_placed"]["mean"] == 0
    assert data["workloads"][0]["size_median"] == 1


def test_power_capped_factory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = smoke(power, tmp_path, capsys)
    block = data["summary"]["0.30"]
    for row in ("aifactory", power.CAPPING, power.STATIC):
        assert block[row]["power_budget_exceeded_seconds"]["max"] == 0.0
        assert block[row]["budget_peak_ratio"]["max"] <= 1.0 + 1e-9
    # The baselines ignore power: their overruns are measured, not prevented.
    assert max(block[p]["power_budget_exceeded_seconds"]["max"]
               for p in POLICIES if p != "aifactory") > 0.0
    # Work against the static cap is paired by seed; the static cap against itself is 0.
    assert block[power.STATIC]["work_vs_static_percent"]["mean"] == 0.0
    assert block[power.STATIC]["work_vs_static_percent"]["n"] == 2
    # The tables can be printed again from the JSON without simulating.
    assert power.main(["--from-json", str(tmp_path / "out.json")]) == 0
    assert "work vs static cap, same seed" in capsys.readouterr().out


def test_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = smoke(scale, tmp_path, capsys)
    assert {(r["policy"], r["gang_gpus"]) for r in data["latency"]} == {
        (p, g) for p in POLICIES for g in (8, 64)}
    for row in data["latency"]:
        assert row["samples"] >= 1 and row["place_p99_ms"] >= row["place_p50_ms"] > 0.0
    for row in data["replay"]:
        assert row["jobs"] == 300 and row["jobs_completed"] == 300
        assert row["peak_rss_mib"] > 0.0
