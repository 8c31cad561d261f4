"""``aifactory report``: draw a run as a PNG and a self-contained HTML page.

Three inputs, one picture (``aifactory.controller.observe.report``):

* nothing but ``--cluster``/``--workload``/``--policy``: run the simulation here, sampling
  every ``--sample-seconds``;
* ``--input RUN.json``: what ``aifactory simulate --json RUN.json --sample-seconds N`` wrote;
* ``--prometheus URL``: range queries over a live factory's metrics (``--last`` seconds up to
  now, or ``--start``/``--end``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from aifactory.controller.cli.traffic import add_traffic_arguments
from aifactory.controller.core.errors import AifactoryError, InputFileError

__all__ = ["add_report_command", "run_report"]


def add_report_command(sub: Any) -> None:
    rep = sub.add_parser("report", help="draw a simulation run or a live factory as PNG "
                                        "and HTML")
    rep.add_argument("--input", default=None,
                     help="JSON from aifactory simulate --json PATH --sample-seconds N")
    rep.add_argument("--cluster", default="small", help="factory to simulate (default small)")
    rep.add_argument("--workload", default=None,
                     help="workload to simulate (default manifests/samples)")
    rep.add_argument("--policy", default=None,
                     help="policy to simulate, or the row of --input to draw")
    rep.add_argument("--sample-seconds", type=float, default=60.0,
                     help="sampling interval of a simulation in simulated seconds "
                          "(default 60)")
    rep.add_argument("--grid-events", default=None, metavar="FILE",
                     help="simulate with a utility's grid events (see aifactory simulate "
                          "--grid-events): the picture draws the limit over time, the events "
                          "and the GPU draw per flexibility tier")
    rep.add_argument("--grid-strategy", default="flexible",
                     choices=("flexible", "uniform", "pause-newest"))
    add_traffic_arguments(rep)
    rep.add_argument("--prometheus", default=None, metavar="URL",
                     help="read the series from Prometheus at URL instead")
    rep.add_argument("--start", type=float, default=None, help="with --prometheus: Unix "
                                                              "seconds")
    rep.add_argument("--end", type=float, default=None, help="with --prometheus: Unix "
                                                            "seconds (default now)")
    rep.add_argument("--last", type=float, default=3600.0,
                     help="with --prometheus and no --start: seconds before --end "
                          "(default 3600)")
    rep.add_argument("--step", type=float, default=0.0,
                     help="with --prometheus: query resolution in seconds (default: ~500 "
                          "points)")
    rep.add_argument("--title", default="", help="title of the picture")
    rep.add_argument("--out", default="aifactory-report",
                     help="output path prefix: writes PREFIX.png and PREFIX.html "
                          "(default aifactory-report)")


def _from_input(path: str, policy: str | None) -> Any:
    from aifactory.controller.sim.timeseries import TimeSeries

    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InputFileError(path, f"cannot read: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise InputFileError(path, f"invalid JSON: {exc.msg}", exc.lineno) from exc
    rows = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise InputFileError(path, 'expected {"results": [...]} as aifactory simulate '
                                   "--json writes")
    for row in rows:
        if not isinstance(row, dict) or "timeseries" not in row:
            continue
        if policy is None or row.get("policy") == policy:
            return TimeSeries.from_dict(row["timeseries"])
    which = f" for policy {policy!r}" if policy else ""
    raise InputFileError(path, f"no time series{which}: write one with aifactory simulate "
                               "--json PATH --sample-seconds 60")


def _simulate(args: argparse.Namespace) -> Any:
    from aifactory.controller.inputs.factory import load_factory
    from aifactory.controller.inputs.workload import (
        default_workload,
        load_workload,
    )
    from aifactory.controller.sim.simulation import Simulation
    from aifactory.controller.sim.timeseries import TimeSeriesSampler

    factory = load_factory(args.cluster)
    workload = Path(args.workload) if args.workload else default_workload()
    sim = Simulation(factory, args.policy or "aifactory")
    sampler = TimeSeriesSampler(sim, args.sample_seconds)
    if args.grid_events:
        from aifactory.controller.cli.grid import attach_grid

        attach_grid(sim, args)
    until = None
    if args.traffic:
        from aifactory.controller.cli.traffic import attach_traffic

        attach_traffic(sim, args, workload)
        until = sim.now + args.traffic_hours * 3600.0
    sim.submit_all(load_workload(workload))
    sim.run(until)
    name = workload.name if workload.name != "samples" else "sample jobs"
    return sampler.series(args.title or f"factory {factory.name}: {name}, policy "
                                        f"{sim.policy.name} (simulated)")


def run_report(args: argparse.Namespace) -> int:
    from aifactory.controller.observe.report import write_report

    if args.prometheus:
        from aifactory.controller.observe.promquery import series_from_prometheus

        end = args.end if args.end is not None else time.time()
        start = args.start if args.start is not None else end - args.last
        series = series_from_prometheus(args.prometheus, start, end, args.step, args.title)
    elif args.input:
        series = _from_input(args.input, args.policy)
    else:
        series = _simulate(args)
    if not series.times:
        raise AifactoryError("the run recorded no samples: nothing to draw")
    png, page = write_report(series, args.out)
    print(f"wrote {png} and {page}")
    return 0
