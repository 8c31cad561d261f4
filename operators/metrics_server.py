"""The operator's metrics port (default 9402, the container port named ``metrics``): the
factory exporter and the operator's own counters on one ``/metrics``.

``serve_metrics(engine, port)`` starts ``controller.observe.exporter.start_metrics_server`` over
the engine's control plane with the engine's lock, so a scrape snapshots the plane only
between engine passes (the engine waits for a scrape without blocking its event loop), and
with ``OperatorCollector`` as an extra collector: ``aifactory_operator_*`` (engine passes,
cycles, status patches, Events, jobs by phase, GPUs) from a dict the engine replaces whole
(``Engine.snapshot``). When the engine rebuilds its plane (nodes joined the Ray cluster) the
exporter follows it.

``--telemetry`` picks where GPU power and energy come from (``choose``):

* ``auto``: the backend's own telemetry. The simulated factory's GPUs are simulated, so its
  own power model is the measurement (NVML on the operator's machine would describe other
  GPUs); the Ray backend reads NVML on every Ray node through a small actor, and falls back
  to the power model where NVML gives nothing (logged, and shown as
  ``aifactory_telemetry_source_info{source="model",requested="auto"}``);
* ``nvml``: NVML: on the Ray nodes with ``--backend ray``, on this machine with
  ``--backend sim``; the power model where it cannot run (logged, and shown);
* ``model``: the power model over the GPUs jobs hold;
* ``sim``: the simulated backend's telemetry (``--backend sim`` only).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.errors import SpecError
from aifactory.controller.observe.exporter import (
    DEFAULT_METRICS_PORT,
    MetricsServer,
    start_metrics_server,
)
from aifactory.controller.observe.snapshot import PlaneObserver, TelemetryChoice, choose_telemetry
from aifactory.controller.observe.telemetry import ModelTelemetry

if TYPE_CHECKING:
    from aifactory.controller.runtime.controlplane import ControlPlane
    from aifactory.operators.engine import Engine

__all__ = ["DEFAULT_METRICS_PORT", "OPERATOR_METRICS", "TELEMETRY_CHOICES", "OperatorCollector",
           "choose", "serve_metrics"]

log = logging.getLogger(__name__)
TELEMETRY_CHOICES = ("auto", "nvml", "model", "sim")

COUNTERS = (
    ("iterations", "aifactory_operator_engine_iterations", "Engine passes."),
    ("iteration_seconds_total", "aifactory_operator_engine_busy_seconds",
     "Seconds the engine spent in its passes (requests, cycle, publish)."),
    ("cycles", "aifactory_operator_scheduling_cycles", "Scheduling cycles run."),
    ("status_patches", "aifactory_operator_status_patches", "Status patches written."),
    ("status_patches_change", "aifactory_operator_status_change_patches",
     "Status patches that changed phase, placement or conditions (written at once)."),
    ("status_patches_meter", "aifactory_operator_status_meter_patches",
     "Status patches that only refreshed meters or words (within the write budget)."),
    ("status_patch_errors", "aifactory_operator_status_patch_errors",
     "Status patches that failed (retried unless the object is gone)."),
    ("events_posted", "aifactory_operator_events_posted", "Kubernetes Events posted."),
    ("events_aggregated", "aifactory_operator_events_aggregated",
     "Event occurrences counted up on an Event (waiting to be posted, or posted and then "
     "patched) instead of becoming a new Event."),
    ("events_dropped", "aifactory_operator_events_dropped",
     "Events dropped because the backlog was full."),
    ("loop_errors", "aifactory_operator_engine_errors",
     "Engine passes that raised (logged; the operator continues)."),
    ("node_failures", "aifactory_operator_node_failures",
     "GPU nodes found failed from their Node objects (deleted, NoExecute-tainted, GPUs lost, "
     "or NotReady past the grace period)."),
    ("hot_swaps", "aifactory_operator_hot_swaps",
     "Gangs repaired by moving only the workers on failed nodes to spare nodes."),
    ("fenced_writes", "aifactory_operator_fenced_writes",
     "Times a status write was held back because this replica's leader Lease was not "
     "renewed in time (sent once it is; gone with the process if the Lease is lost)."),
)


GAUGES = (
    ("meter_lag_seconds", "aifactory_operator_status_meter_lag_seconds",
     "Seconds the longest-waiting object has waited for its meters in status to be "
     "refreshed (bounded by max(--status-interval, objects waiting / the write budget))."),
    ("meter_waiting", "aifactory_operator_status_meter_waiting",
     "Objects whose meters or words in status wait for the write budget."),
    ("status_backlog", "aifactory_operator_status_backlog",
     "Status patches queued and not yet sent."),
    ("event_backlog", "aifactory_operator_event_backlog", "Events queued and not yet sent."),
)


# Every family OperatorCollector yields: (name, type, labels), as docs/metrics.md lists them.
OPERATOR_METRICS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    *((f"{name}_total", "counter", ()) for _, name, _ in COUNTERS),
    ("aifactory_operator_jobs", "gauge", ("phase",)),
    ("aifactory_operator_gpus", "gauge", ("state",)),
    *((name, "gauge", ()) for _, name, _ in GAUGES),
    ("aifactory_grid_actions_total", "counter", ("kind",)),
    ("aifactory_grid_lost_gpu_seconds_total", "counter", ("tier",)),
    ("aifactory_grid_shed_watts", "gauge", ("budget",)),
    ("aifactory_grid_short_watts", "gauge", ("budget",)),
    ("aifactory_grid_overrun_watts", "gauge", ("budget",)),
    ("aifactory_grid_sheddable_watts", "gauge", ()),
    ("aifactory_grid_events", "gauge", ()),
    ("aifactory_grid_caps_unhonoured", "gauge", ()),
    ("aifactory_grid_signal_problem", "gauge", ()),
    ("aifactory_ray_nodes_unmatched", "gauge", ("reason",)),
)


class OperatorCollector(Collector):
    """Reads ``engine.snapshot`` (a dict the engine replaces whole, never half-written).
    Labels are bounded: job phase (four values) and GPU state (two)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        snap: dict[str, Any] = self.engine.snapshot
        counters = snap.get("counters", {})
        for key, name, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(counters.get(key, 0.0)))
        jobs = GaugeMetricFamily("aifactory_operator_jobs", "Gangs the engine holds, by "
                                 "phase (finished ones until their retention ends).",
                                 labels=["phase"])
        for phase, count in sorted(snap.get("phases", {}).items()):
            jobs.add_metric([phase], count)
        yield jobs
        gpus = GaugeMetricFamily("aifactory_operator_gpus", "GPUs of the inventory by state.",
                                 labels=["state"])
        gpus.add_metric(["allocated"], snap.get("gpus_allocated", 0.0))
        gpus.add_metric(["total"], snap.get("gpus_total", 0.0))
        yield gpus
        gauges = snap.get("gauges", {})
        for key, name, doc in GAUGES:
            yield GaugeMetricFamily(name, doc, value=float(gauges.get(key, 0.0)))
        yield from _grid_families(snap.get("grid", {}))
        unmatched = snap.get("ray_nodes_unmatched")
        if unmatched is not None:  # --backend ray with the Nodes as its directory
            family = GaugeMetricFamily(
                "aifactory_ray_nodes_unmatched", "Ray nodes and GPU Nodes left out of the "
                "inventory because they could not be joined, by reason.", labels=["reason"])
            for reason, n in sorted(unmatched.items()):
                family.add_metric([reason], float(n))
            yield family


def _grid_families(grid: dict[str, Any]) -> Iterator[Any]:
    """``aifactory_grid_*``: what grid-event curtailment did (``operators.grid``)."""
    actions = CounterMetricFamily(
        "aifactory_grid_actions", "Curtailment actions by kind: cap (a running job's power "
        "cap lowered in place), pause (checkpointed and held), restore, resume.",
        labels=["kind"])
    for kind, n in sorted(grid.get("actions", {}).items()):
        actions.add_metric([kind], float(n))
    yield actions
    lost = CounterMetricFamily(
        "aifactory_grid_lost_gpu_seconds", "GPU-seconds of work lost to grid events by "
        "flexibility tier: slowdown under caps, time paused, work since the last checkpoint "
        "at a pause.", labels=["tier"])
    for tier, s in sorted(grid.get("lost_gpu_seconds", {}).items()):
        lost.add_metric([tier], float(s))
    yield lost
    for key, name, doc in (
            ("shed_watts", "aifactory_grid_shed_watts",
             "Watts shed below a budget's uncapped draw by caps and pauses."),
            ("short_watts", "aifactory_grid_short_watts",
             "Watts still over a lowered budget with every flexible job capped or paused."),
            ("overrun_watts", "aifactory_grid_overrun_watts",
             "Measured watts over a lowered budget after the actions settled (escalated).")):
        family = GaugeMetricFamily(name, doc, labels=["budget"])
        for budget, watts in sorted(grid.get(key, {}).items()):
            family.add_metric([budget], float(watts))
        yield family
    for key, name, doc in (
            ("sheddable_watts", "aifactory_grid_sheddable_watts",
             "Watts the site could still shed without tier 0 (reported to the utility)."),
            ("events", "aifactory_grid_events", "Grid events the OpenADR VEN holds."),
            ("unhonoured", "aifactory_grid_caps_unhonoured",
             "Jobs whose GPUs draw more than the cap curtailment set (closed loop)."),
            ("signal_problem", "aifactory_grid_signal_problem",
             "1 while the grid signal source has a problem (malformed event, VTN "
             "unreachable); the last good budgets are kept.")):
        yield GaugeMetricFamily(name, doc, value=float(grid.get(key, 0.0)))


def choose(cp: ControlPlane, telemetry: str) -> TelemetryChoice:
    """The telemetry source for ``--telemetry`` (see the module docstring)."""
    if telemetry not in TELEMETRY_CHOICES:
        raise SpecError("--telemetry", f"must be one of {', '.join(TELEMETRY_CHOICES)}, got "
                        f"{telemetry!r}")
    simulated = isinstance(cp.backend, SimulatedBackend)
    if telemetry == "sim" and not simulated:
        raise SpecError("--telemetry", "sim reads the simulated backend; with --backend ray "
                        "use auto (NVML on the Ray nodes, else the power model), nvml or model")
    if telemetry == "model":
        return choose_telemetry(cp, "model")
    if telemetry == "nvml" and simulated:
        return choose_telemetry(cp, "nvml")  # this machine's GPUs; the model if none (logged)
    return replace(choose_telemetry(cp, "backend"), requested=telemetry)


def serve_metrics(engine: Engine, port: int = DEFAULT_METRICS_PORT, host: str = "0.0.0.0",
                  *, telemetry: str = "auto", per_gpu: bool = True) -> MetricsServer:
    """Serve the exporter and the operator's counters on ``port`` (a daemon thread), until
    the engine stops."""
    with engine.lock:
        choice = choose(engine.cp, telemetry)
    source = choice.source.name
    log.info("metrics on :%d/metrics; GPU telemetry: %s (requested %s)", port,
             "the backend's own" if source == "backend" else source, telemetry)
    server = start_metrics_server(engine.cp, port, host, lock=engine.lock, per_gpu=per_gpu,
                                  telemetry=choice, extra=[OperatorCollector(engine)],
                                  services=engine.scaling.autoscaler)

    def follow(cp: ControlPlane) -> None:  # called by the engine, holding its lock
        old = server.collector.observer
        source = old.telemetry
        if isinstance(source.source, ModelTelemetry):  # models the old topology's GPUs
            source = choose(cp, telemetry)
        server.collector.observer = PlaneObserver(cp, source, per_gpu=old.per_gpu,
                                                  services=old.services)

    engine.on_plane_replaced.append(follow)
    engine.on_stop.append(server.close)
    return server
