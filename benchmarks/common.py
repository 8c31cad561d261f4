"""What every scenario shares: inputs from ``../shared``, policies, statistics, output.

Each scenario is a module with ``main(argv) -> int`` that prints markdown tables (pasted
as-is into ``benchmarks/README.md``) and writes every number, per seed, to a JSON file.
``--smoke`` runs a small slice in seconds; the unit tests run every scenario that way so
the benchmarks keep working, the full runs are done by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory.controller.inputs.datasets import shared_path
from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.placement.registry import POLICY_NAMES, make_policy
from aifactory.controller.placement.topology_aware import TopologyAwarePolicy
from aifactory.controller.sim.simulation import Simulation

__all__ = [
    "OPENB",
    "POLICIES",
    "Stat",
    "base_parser",
    "machine",
    "markdown_table",
    "openb_path",
    "policy",
    "run_sampled",
    "stat",
    "write_json",
]

OPENB = ("traces", "alibaba-clusterdata-gpu-v2023")
POLICIES: tuple[str, ...] = POLICY_NAMES
# Ablations of ours: without the fragmentation-aware score (plain BestFit for one-node
# work), and without delay scheduling for locality (gangs spread as soon as they fit).
NO_FGD = "aifactory-nofgd"
NO_LOCALITY = "aifactory-nolocality"
ABLATIONS = (NO_FGD, NO_LOCALITY)


def openb_path(name: str) -> Path:
    """``openb_pod_list_default.csv`` or ``openb_node_list_gpu_node.csv`` in ../shared."""
    return shared_path(*OPENB, name)


def policy(name: str, seed: int = 0) -> PlacementPolicy:
    """A policy by name, plus the ablations of ours (``ABLATIONS``)."""
    if name == NO_FGD:
        return TopologyAwarePolicy(name=NO_FGD, fragmentation_aware=False)
    if name == NO_LOCALITY:
        return TopologyAwarePolicy(name=NO_LOCALITY, locality_wait_seconds=0.0)
    return make_policy(name, seed)


@dataclass(frozen=True, slots=True)
class Stat:
    """Mean and spread of one number over seeds (``sd`` 0 for a single run)."""

    mean: float
    sd: float
    low: float
    high: float
    n: int

    def fmt(self, spec: str = ".1f", scale: float = 1.0, unit: str = "") -> str:
        if math.isnan(self.mean):
            return "—"
        text = f"{self.mean * scale:{spec}}{unit}"
        if self.n > 1 and self.sd * scale >= 10 ** -6:
            text += f" ± {self.sd * scale:{spec}}"
        return text

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "sd": self.sd, "min": self.low, "max": self.high,
                "n": self.n}


def stat(values: Iterable[float]) -> Stat:
    data = [v for v in values if not math.isnan(v)]
    if not data:
        nan = float("nan")
        return Stat(nan, nan, nan, nan, 0)
    sd = statistics.stdev(data) if len(data) > 1 else 0.0
    return Stat(statistics.fmean(data), sd, min(data), max(data), len(data))


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "| " + " | ".join("---" if i == 0 else "---:" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU model and count, Python, load at start."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1m_at_start": load[0],
            "started_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def machine_line(info: dict[str, Any]) -> str:
    return (f"machine: {info['cpus']} x {info['cpu']}, Python {info['python']}, "
            f"1-min load {info['load_average_1m_at_start']:.2f} at start")


def base_parser(description: str, default_json: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="a small slice that runs in seconds (what the tests run)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds where randomness enters")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="comma-separated policies (default: all; ablations of ours: "
                             f"{', '.join(ABLATIONS)})")
    parser.add_argument("--json", dest="json_path", default=default_json,
                        help=f"where to write every number (default: {default_json})")
    return parser


def policy_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in (*POLICIES, *ABLATIONS):
            raise SystemExit(f"--policies: unknown policy {name!r}; valid: "
                             f"{', '.join((*POLICIES, *ABLATIONS))}")
    return names


def write_json(path: str, payload: dict[str, Any]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"\nwrote {target}")


def run_sampled(sim: Simulation, first: float, last: float, samples: int = 20
                ) -> dict[str, Any]:
    """Run a simulation to the end, sampling the allocation (GPUs requested by running
    jobs over all GPUs) at ``samples`` + 1 points of the window [first, last]."""
    total = sim.topo.total_gpus
    series: list[tuple[float, float]] = []
    start_integral = 0.0
    for i in range(samples + 1):
        t = first + (last - first) * i / samples
        sim.run(until=t)
        if i == 0:
            start_integral = sim.metrics.alloc_integral
        series.append((t - first, sim.metrics.alloc_now / total))
    window = sim.metrics.alloc_integral - start_integral
    result = sim.run()
    return {**result.to_dict(),
            "allocation_over_arrival_window": window / max(last - first, 1e-9) / total,
            "allocation_peak": max(v for _, v in series),
            "allocation_series": series}


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the seconds it took."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
