"""The grid-events benchmark's smoke slice (64 GPUs, a 20-minute event) keeps working."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import grid_events


def test_grid_events_smoke(tmp_path: Path) -> None:
    out = tmp_path / "grid.json"
    assert grid_events.main(["--smoke", "--factories", "default", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if "metrics" in r]
    assert {r["strategy"] for r in rows} == set(grid_events.STRATEGIES)
    for r in rows:
        m = r["metrics"]
        assert m["binds"] and m["seconds_over_after_start"] == 0
        if r["strategy"] == "flexible":
            assert m["lost_gpu_hours"]["0"] == 0
    assert (tmp_path / "grid.md").is_file()
