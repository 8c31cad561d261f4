"""``--traffic`` for ``aifactory simulate``: inference services follow a request-rate curve.

Every InferenceService of the workload gets traffic sized to it (``traffic_for``) on the
chosen curve (``diurnal`` or a CSV of ``seconds,requests_per_second``); those with
``spec.autoscaling`` are scaled by the autoscaler the operator runs, synced every 15 s of
virtual time, and the run lasts ``--traffic-hours``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_traffic_arguments", "attach_traffic"]


def add_traffic_arguments(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--traffic", default=None, metavar="diurnal|FILE",
                     help="drive every InferenceService with requests following a day "
                          "('diurnal') or a CSV of seconds,requests_per_second; replicas "
                          "autoscale where spec.autoscaling is set")
    sim.add_argument("--traffic-hours", type=float, default=24.0,
                     help="with --traffic: simulated hours to run (default 24)")


def attach_traffic(sim: Any, args: argparse.Namespace, workload: Path) -> Any:
    """The autoscaler over ``workload``'s InferenceServices on ``--traffic``, stepped by
    the simulation up to ``--traffic-hours``; returns the Autoscaler."""
    from aifactory.controller.core.errors import SpecError
    from aifactory.controller.core.spec import JobKind, job_from_manifest
    from aifactory.controller.inputs.workload import load_manifest_docs
    from aifactory.controller.runtime.autoscale import policy_from_manifest
    from aifactory.controller.runtime.scaler import Autoscaler
    from aifactory.controller.sim.traffic import (
        TrafficModel,
        diurnal,
        load_curve_csv,
        traffic_for,
    )

    if not args.traffic_hours > 0:
        raise SpecError("--traffic-hours", f"must be > 0, got {args.traffic_hours}")
    curve = diurnal() if args.traffic == "diurnal" else load_curve_csv(args.traffic)
    scaler_services = []
    traffic = {}
    for _, _, doc in load_manifest_docs(workload):
        if doc.get("kind") != JobKind.INFERENCE.value:
            continue
        service = job_from_manifest(doc)
        policy = policy_from_manifest(doc)
        scaler_services.append((service, policy))
        traffic[service.key] = traffic_for(service, policy, curve)
    model = TrafficModel(sim, traffic)
    scaler = Autoscaler(sim, model)
    for service, policy in scaler_services:
        scaler.track(service, policy)
    sim.attach_autoscaler(scaler, model, sim.now + args.traffic_hours * 3600.0)
    return scaler
