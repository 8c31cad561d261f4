"""Writes the Grafana dashboards in deploy/grafana/dashboards/ (run after editing this file).

    python hack/dashboards.py          # rewrite the JSON files
    python hack/dashboards.py --check  # exit 1 if they differ from what this file makes

Three dashboards, each with a ``datasource`` variable so they import into any Grafana and
provision unchanged: the factory overview (power against budgets, energy, cost,
utilization, GPUs by queue, fragmentation per level), a per-job drill-down, and scheduler
health. Every PromQL expression here is run against a real Prometheus by
tests/integration/test_prometheus.py and must return data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job_namespace="$job_namespace", job_name="$job_name"'


def target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto",
            "range": True, "refId": ref}


class Board:
    """Lays panels out left to right, 24 columns wide."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def add(self, kind: str, title: str, targets: list[tuple[str, str]], w: int = 12,
            h: int = 8, unit: str = "short", description: str = "",
            **options: Any) -> None:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        refs = "ABCDEFGH"
        panel: dict[str, Any] = {
            "id": len(self.panels) + 1, "type": kind, "title": title,
            "description": description, "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [target(e, legend, refs[i]) for i, (e, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": {"unit": unit, **options.pop("defaults", {})},
                            "overrides": []},
            "options": options.pop("panel_options", {}),
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"].setdefault("custom", {})
            panel["fieldConfig"]["defaults"]["custom"].update(options.pop("custom", {}))
            panel["options"].setdefault("legend", {"displayMode": "list",
                                                   "placement": "bottom", "showLegend": True})
            panel["options"].setdefault("tooltip", {"mode": "multi", "sort": "desc"})
        if kind == "table":
            for t in panel["targets"]:
                t.update({"instant": True, "range": False, "format": "table"})
        if kind in ("stat", "bargauge", "gauge"):
            panel["options"].setdefault("reduceOptions", {"calcs": ["lastNotNull"],
                                                          "fields": "", "values": False})
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title,
                            "collapsed": False, "panels": [],
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}})
        self.y += 1


def datasource_var() -> dict[str, Any]:
    return {"name": "datasource", "label": "Data source", "type": "datasource",
            "query": "prometheus", "current": {}, "hide": 0, "refresh": 1, "regex": "",
            "includeAll": False, "multi": False, "options": []}


def query_var(name: str, label: str, query: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query", "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "current": {}, "hide": 0, "refresh": 2, "sort": 1, "regex": "",
            "includeAll": False, "multi": False, "options": []}


def dashboard(uid: str, title: str, description: str, board: Board,
              variables: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["aifactory"], "timezone": "browser", "editable": True,
        "graphTooltip": 1, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"}, "timepicker": {},
        "annotations": {"list": []}, "links": [
            {"title": "aifactory", "type": "dashboards", "tags": ["aifactory"],
             "asDropdown": True, "includeVars": False, "keepTime": True}],
        "templating": {"list": [datasource_var(), *variables]},
        "panels": board.panels,
    }


def overview() -> dict[str, Any]:
    b = Board()
    b.row("Power and energy")
    b.add("stat", "Factory draw", [("sum(aifactory_factory_power_watts)", "draw")], w=4, h=5,
          unit="watt")
    b.add("stat", "Headroom under the tightest budget",
          [("min(aifactory_power_budget_watts - aifactory_power_draw_watts)", "headroom")],
          w=4, h=5, unit="watt")
    b.add("stat", "Energy in range",
          [("sum(increase(aifactory_factory_energy_joules_total[$__range])) / 3.6e6", "kWh")],
          w=4, h=5, unit="kwatth")
    b.add("stat", "GPU utilization", [("avg(aifactory_node_utilization_ratio)", "mean")],
          w=4, h=5, unit="percentunit", defaults={"min": 0, "max": 1})
    b.add("stat", "GPUs allocated",
          [('sum(aifactory_domain_gpus_allocated{level="factory"}) / '
            'sum(aifactory_domain_gpus{level="factory"})', "allocated")],
          w=4, h=5, unit="percentunit", defaults={"min": 0, "max": 1})
    b.add("stat", "Telemetry source", [("aifactory_telemetry_source_info", "{{source}}")],
          w=4, h=5, unit="none",
          description="simulated, nvml, or model: the power model, used when NVML is "
                      "unavailable",
          panel_options={"textMode": "name", "colorMode": "none"})
    b.add("timeseries", "Power draw against budgets",
          [("aifactory_power_draw_watts", "{{budget}} draw"),
           ("aifactory_power_budget_watts", "{{budget}} budget"),
           ("aifactory_power_budget_allocated_watts", "{{budget}} admitted estimate")],
          w=12, h=9, unit="watt")
    b.add("timeseries", "Power by rack",
          [("sum by (rack) (aifactory_node_power_watts)", "{{rack}}")], w=12, h=9,
          unit="watt", custom={"stacking": {"mode": "normal", "group": "A"},
                               "fillOpacity": 20})
    b.add("timeseries", "Energy by queue (so far)",
          [("sum by (queue) (aifactory_job_energy_joules_total) / 3.6e6", "{{queue}}")],
          w=8, h=8, unit="kwatth")
    b.add("timeseries", "Cost by queue (so far)",
          [("sum by (queue) (aifactory_job_cost_dollars_total)", "{{queue}}")],
          w=8, h=8, unit="currencyUSD")
    b.add("timeseries", "Energy rate by block",
          [("sum by (block) (rate(aifactory_node_energy_joules_total[$__rate_interval]))",
            "{{block}}")], w=8, h=8, unit="watt",
          description="rate() of the energy counters; in a sped-up simulation this is "
                      "speed x the draw")
    b.row("GPUs")
    b.add("timeseries", "Utilization per rack",
          [("avg by (rack) (aifactory_node_utilization_ratio)", "{{rack}}")], w=12, h=8,
          unit="percentunit", defaults={"min": 0, "max": 1})
    b.add("timeseries", "GPUs allocated by queue",
          [("sum by (queue) (aifactory_queue_allocated_gpus)", "{{queue}}"),
           ('sum(aifactory_domain_gpus{level="factory"})', "factory GPUs")],
          w=12, h=8, custom={"stacking": {"mode": "normal", "group": "A"},
                             "fillOpacity": 25})
    b.add("bargauge", "Allocated share per rack",
          [('aifactory_domain_gpus_allocated{level="rack"} / '
            'aifactory_domain_gpus{level="rack"}', "{{domain}}")],
          w=8, h=8, unit="percentunit", defaults={"min": 0, "max": 1},
          panel_options={"orientation": "horizontal", "displayMode": "gradient"})
    b.add("timeseries", "Fragmentation: largest free block per level",
          [("aifactory_topology_largest_free_gpus", "{{level}}")], w=8, h=8,
          description="The biggest gang each level can still take whole.")
    b.add("timeseries", "Wholly free domains per level",
          [('aifactory_topology_domains_free{level!="factory"}', "{{level}}")], w=8, h=8)
    b.add("table", "Hottest nodes",
          [("topk(10, aifactory_node_temperature_celsius)", "{{node}}")], w=12, h=8,
          unit="celsius", panel_options={"showHeader": True})
    b.add("timeseries", "Queue depth by queue and priority",
          [("sum by (queue, priority) (aifactory_queue_pending_jobs)",
            "{{queue}} p{{priority}}")], w=12, h=8)
    b.row("Inference")
    svc = "service_namespace, service_name"
    name = "{{service_namespace}}/{{service_name}}"
    b.add("timeseries", "Replicas by service",
          [(f'sum by ({svc}) (aifactory_inference_replicas{{state="desired"}})',
            f"{name} wanted"),
           (f'sum by ({svc}) (aifactory_inference_replicas{{state="ready"}})',
            f"{name} ready")], w=8, h=8,
          description="Replicas the autoscaler (or spec.replicas) wants, and those serving")
    b.add("timeseries", "Requests in flight and request rate",
          [(f"sum by ({svc}) (aifactory_inference_in_flight_requests)", f"{name} in flight"),
           (f"sum by ({svc}) (rate(aifactory_inference_requests_total[$__rate_interval]))",
            f"{name} requests/s")], w=8, h=8)
    b.add("timeseries", "Mean request latency",
          [(f"sum by ({svc}) (rate(aifactory_inference_request_seconds_total"
            f"[$__rate_interval])) / sum by ({svc}) "
            f"(rate(aifactory_inference_requests_total[$__rate_interval]))", name)],
          w=8, h=8, unit="s")
    return dashboard("aifactory-overview", "aifactory / Factory overview",
                     "Power against budgets, energy, cost, utilization, GPUs by queue and "
                     "fragmentation of one AI factory.", b, [])


def job() -> dict[str, Any]:
    b = Board()
    b.add("stat", "Phase", [(f"aifactory_job_phase{{{JOB}}} == 1", "{{phase}}")], w=6, h=5,
          unit="none", panel_options={"textMode": "name", "colorMode": "none"})
    b.add("stat", "GPUs held", [(f"aifactory_job_gpus{{{JOB}}}", "GPUs")], w=6, h=5)
    b.add("stat", "Energy so far", [(f"aifactory_job_energy_joules_total{{{JOB}}} / 3.6e6",
                                     "kWh")], w=6, h=5, unit="kwatth")
    b.add("stat", "Cost so far", [(f"aifactory_job_cost_dollars_total{{{JOB}}}", "$")],
          w=6, h=5, unit="currencyUSD")
    b.add("timeseries", "Power of the job's GPUs",
          [(f"sum(aifactory_gpu_power_watts{{{JOB}}})", "draw"),
           (f"sum(rate(aifactory_job_energy_joules_total{{{JOB}}}[$__rate_interval]))",
            "rate of job energy")], w=12, h=8, unit="watt",
          description="GPU draw labelled with this job, and rate() of the job's energy "
                      "counter (speed x draw in a sped-up simulation)")
    b.add("timeseries", "Utilization per GPU",
          [(f"aifactory_gpu_utilization_ratio{{{JOB}}}", "{{node}}/{{gpu}}")], w=12, h=8,
          unit="percentunit", defaults={"min": 0, "max": 1})
    b.add("timeseries", "GPU temperature",
          [(f"max(aifactory_gpu_temperature_celsius{{{JOB}}})", "hottest"),
           (f"avg(aifactory_gpu_temperature_celsius{{{JOB}}})", "mean")], w=8, h=8,
          unit="celsius")
    b.add("timeseries", "GPU memory in use",
          [(f"sum(aifactory_gpu_memory_used_bytes{{{JOB}}})", "used")], w=8, h=8,
          unit="bytes")
    b.add("timeseries", "GPU-hours and restarts",
          [(f"aifactory_job_gpu_seconds_total{{{JOB}}} / 3600", "GPU-hours"),
           (f"aifactory_job_restarts_total{{{JOB}}}", "restarts"),
           (f"aifactory_job_preemptions_total{{{JOB}}}", "preemptions")], w=8, h=8)
    b.add("table", "Nodes and racks of the job",
          [(f"count by (node, rack, block) (aifactory_gpu_power_watts{{{JOB}}})", "")],
          w=24, h=7, panel_options={"showHeader": True})
    return dashboard("aifactory-job", "aifactory / Job",
                     "One job: phase, GPUs, power, energy, cost, where it runs.", b,
                     [query_var("job_namespace", "Namespace",
                                "label_values(aifactory_job_gpus, job_namespace)"),
                      query_var("job_name", "Job",
                                'label_values(aifactory_job_gpus{job_namespace='
                                '"$job_namespace"}, job_name)')])


def scheduler() -> dict[str, Any]:
    b = Board()
    b.add("timeseries", "Scheduling attempts by result",
          [("sum by (result) (rate(aifactory_scheduling_attempts_total[$__rate_interval]))",
            "{{result}}")], w=12, h=8, unit="ops")
    b.add("timeseries", "Placement decision time",
          [("histogram_quantile(0.5, sum by (le) (rate("
            "aifactory_scheduling_duration_seconds_bucket[$__rate_interval])))", "p50"),
           ("histogram_quantile(0.99, sum by (le) (rate("
            "aifactory_scheduling_duration_seconds_bucket[$__rate_interval])))", "p99")],
          w=12, h=8, unit="s")
    b.add("timeseries", "Jobs by phase", [("sum by (phase) (aifactory_jobs)", "{{phase}}")],
          w=8, h=8)
    b.add("timeseries", "Queue wait (all jobs so far)",
          [("histogram_quantile(0.95, sum by (le, queue) "
            "(aifactory_job_queue_wait_seconds_bucket))", "{{queue}} p95"),
           ("sum by (queue) (aifactory_job_queue_wait_seconds_sum) / "
            "sum by (queue) (aifactory_job_queue_wait_seconds_count)", "{{queue}} mean")],
          w=8, h=8, unit="s")
    b.add("timeseries", "GPUs waiting by queue",
          [("sum by (queue) (aifactory_queue_pending_gpus)", "{{queue}} pending"),
           ("sum by (queue) (aifactory_queue_nominal_gpus)", "{{queue}} nominal")], w=8, h=8)
    b.add("stat", "Preemptions in range",
          [("sum(increase(aifactory_preemptions_total[$__range]))", "preemptions")],
          w=4, h=5)
    b.add("stat", "Restarts in range",
          [("sum(increase(aifactory_restarts_total[$__range]))", "restarts")], w=4, h=5)
    b.add("stat", "Jobs completed in range",
          [("sum(increase(aifactory_jobs_completed_total[$__range]))", "completed")],
          w=4, h=5)
    b.add("stat", "Jobs failed in range",
          [("sum(increase(aifactory_jobs_failed_total[$__range]))", "failed")], w=4, h=5)
    b.add("stat", "Cycles per second",
          [("sum(rate(aifactory_scheduling_cycles_total[$__rate_interval]))", "cycles")],
          w=4, h=5, unit="ops")
    b.add("stat", "Seconds over a power budget",
          [("sum(aifactory_power_budget_exceeded_seconds_total)", "over")], w=4, h=5,
          unit="s")
    return dashboard("aifactory-scheduler", "aifactory / Scheduler health",
                     "Attempts, decision latency, queue waits, preemptions and restarts.",
                     b, [])


DASHBOARDS = {"aifactory-overview.json": overview, "aifactory-job.json": job,
              "aifactory-scheduler.json": scheduler}


def rendered() -> dict[str, str]:
    return {name: json.dumps(make(), indent=2) + "\n" for name, make in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    files = rendered()
    if "--check" in argv:
        stale = [n for n, text in files.items()
                 if not (OUT / n).exists() or (OUT / n).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python hack/dashboards.py")
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
