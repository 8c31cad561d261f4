"""``aifactory simulate --serve-metrics PORT``: a simulated factory running in real time.

The simulation advances with the wall clock (times ``--speed``) while ``/metrics`` is served
from another thread, so Prometheus and Grafana can watch a factory without GPUs. A lock
keeps the scrape thread and the pacing loop apart: the pacing loop holds it while it moves
the simulation, a scrape holds it while it takes a snapshot. ``--duration`` (wall seconds)
bounds a run for tests and demos; without it the factory runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aifactory.controller.core.errors import SpecError

if TYPE_CHECKING:
    from aifactory.controller.inputs.factory import FactorySpec
    from aifactory.controller.inputs.workload import Arrival
    from aifactory.controller.runtime.measurements import SimResult
    from aifactory.controller.sim.simulation import Simulation
    from aifactory.controller.sim.timeseries import TimeSeriesSampler

__all__ = ["add_simulate_arguments", "sampler_for", "serve_from_args", "serve_simulation"]


def add_simulate_arguments(sim: argparse.ArgumentParser) -> None:
    """The metrics and time-series options of ``aifactory simulate``."""
    sim.add_argument("--serve-metrics", type=int, default=None, metavar="PORT",
                     help="run the factory in real time and serve Prometheus metrics on "
                          "PORT (0: any free port)")
    sim.add_argument("--metrics-host", default="0.0.0.0",
                     help="address to serve metrics on (default 0.0.0.0)")
    sim.add_argument("--speed", type=float, default=1.0,
                     help="with --serve-metrics: simulated seconds per wall second "
                          "(default 1: real time)")
    sim.add_argument("--duration", type=float, default=None,
                     help="with --serve-metrics: stop after this many wall seconds "
                          "(default: run until Ctrl-C)")
    sim.add_argument("--node-metrics", action="store_true",
                     help="with --serve-metrics: node-level series only, no per-GPU series "
                          "(for very large factories)")
    sim.add_argument("--sample-seconds", type=float, default=None,
                     help="record a time series every N simulated seconds into --json "
                          "(for aifactory report)")


def sampler_for(sim: Simulation, args: argparse.Namespace) -> TimeSeriesSampler | None:
    """A sampler on ``sim`` when ``--sample-seconds`` was given."""
    if getattr(args, "sample_seconds", None) is None:
        return None
    from aifactory.controller.sim.timeseries import TimeSeriesSampler

    return TimeSeriesSampler(sim, args.sample_seconds)


def serve_simulation(sim: Simulation, port: int, host: str = "0.0.0.0", *,
                     speed: float = 1.0, duration: float | None = None,
                     per_gpu: bool = True, tick_seconds: float = 0.2,
                     stop: threading.Event | None = None,
                     log: Callable[[str], None] = print) -> SimResult:
    """Run ``sim`` against the wall clock, serving its metrics, until ``duration`` wall
    seconds passed, ``stop`` is set, or Ctrl-C."""
    if not speed > 0:
        raise SpecError("--speed", f"must be > 0 simulated seconds per wall second, got "
                        f"{speed}")
    if duration is not None and not duration > 0:
        raise SpecError("--duration", f"must be > 0 wall seconds, got {duration}")
    from aifactory.controller.observe.exporter import start_metrics_server

    lock = threading.Lock()
    stop = stop or threading.Event()
    server = start_metrics_server(sim, port, host, lock=lock, per_gpu=per_gpu,
                                  services=sim.scaler)
    log(f"serving metrics on {server.url} (speed {speed:g}x, "
        f"{'until Ctrl-C' if duration is None else f'for {duration:g} s'})")
    wall_start = time.monotonic()
    sim_start = sim.now
    try:
        while not stop.is_set():
            elapsed = time.monotonic() - wall_start
            if duration is not None and elapsed >= duration:
                break
            with lock:
                sim.advance_to(sim_start + elapsed * speed)
            stop.wait(tick_seconds)
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.close()
    with lock:
        return sim.result()


def serve_from_args(args: argparse.Namespace, factory: FactorySpec,
                    arrivals: Sequence[Arrival], policy: str, console: Any,
                    workload: Path) -> int:
    """``aifactory simulate --serve-metrics``: serve, then print the run's results."""
    from aifactory.controller.sim.simulation import Simulation

    sim = Simulation(factory, policy, seed=args.seed)
    if args.traffic:
        from aifactory.controller.cli.traffic import attach_traffic

        attach_traffic(sim, args, workload)
    sim.submit_all(arrivals)
    res = serve_simulation(sim, args.serve_metrics, args.metrics_host, speed=args.speed,
                           duration=args.duration, per_gpu=not args.node_metrics,
                           log=console.print)
    row = res.to_dict()
    console.print(f"ran {row['simulated_seconds']:.0f} simulated seconds: "
                  f"{row['jobs_completed']} jobs completed, "
                  f"{row['energy_joules'] / 3.6e6:,.1f} kWh")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"results": [row]}, indent=2) + "\n")
    return 0
