"""The operator's own Prometheus metrics on ``--metrics-port`` (default 9090).

A custom Collector builds fresh families on each scrape, like client_python's process
collector, from a snapshot the engine publishes on its own thread (``Engine.snapshot``), so
the scrape thread never reads the control plane while it changes. Labels are bounded: job
phase (four values) and power-budget name (one per PowerBudget object). GPU telemetry
(per-GPU power and energy) is the exporter's job, not this module's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from operators.handlers import OperatorApp

__all__ = ["OperatorCollector", "serve_metrics"]

COUNTERS = (
    ("iterations", "aifactory_operator_engine_iterations", "Engine passes."),
    ("iteration_seconds_total", "aifactory_operator_engine_busy_seconds",
     "Seconds the engine spent in its passes (requests, cycle, publish)."),
    ("cycles", "aifactory_operator_scheduling_cycles", "Scheduling cycles run."),
    ("status_patches", "aifactory_operator_status_patches", "Status patches written."),
    ("status_patch_errors", "aifactory_operator_status_patch_errors",
     "Status patches that failed (retried unless the object is gone)."),
    ("events_posted", "aifactory_operator_events_posted", "Kubernetes Events posted."),
    ("events_dropped", "aifactory_operator_events_dropped",
     "Events dropped because the backlog was full."),
    ("loop_errors", "aifactory_operator_engine_errors",
     "Engine passes that raised (logged; the operator continues)."),
)


class OperatorCollector(Collector):
    """Reads ``app.engine.snapshot`` (a dict replaced whole by the engine)."""

    def __init__(self, app: OperatorApp) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        engine = self.app.engine
        snap: dict[str, Any] = engine.snapshot if engine is not None else {}
        counters = snap.get("counters", {})
        for key, name, doc in COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(counters.get(key, 0.0)))
        jobs = GaugeMetricFamily("aifactory_operator_jobs", "Gangs known to the scheduler by "
                                 "phase.", labels=["phase"])
        for phase, count in sorted(snap.get("phases", {}).items()):
            jobs.add_metric([phase], count)
        yield jobs
        gpus = GaugeMetricFamily("aifactory_operator_gpus", "GPUs of the inventory by state.",
                                 labels=["state"])
        gpus.add_metric(["allocated"], snap.get("gpus_allocated", 0.0))
        gpus.add_metric(["total"], snap.get("gpus_total", 0.0))
        yield gpus
        limit = GaugeMetricFamily("aifactory_power_budget_limit_watts",
                                  "Limit of each PowerBudget.", labels=["budget"])
        estimate = GaugeMetricFamily("aifactory_power_budget_estimated_watts",
                                     "Estimated draw admitted against each PowerBudget.",
                                     labels=["budget"])
        for name, (lim, est) in sorted(snap.get("budgets", {}).items()):
            limit.add_metric([name], lim)
            estimate.add_metric([name], est)
        yield limit
        yield estimate


def serve_metrics(app: OperatorApp, port: int) -> CollectorRegistry:
    """Start the /metrics HTTP server (a daemon thread) on ``port``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OperatorCollector(app))
    start_http_server(port, registry=registry)
    return registry
