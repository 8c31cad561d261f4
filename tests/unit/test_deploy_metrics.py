"""The shipped dashboards, scrape configs and metrics docs agree with the exporter.

Whether each dashboard query returns data is checked against a real Prometheus in
tests/integration/test_prometheus.py; here: the files are what hack/dashboards.py makes,
use the datasource variable, name only metrics that exist, and docs/metrics.md lists
exactly the exported metrics with their types and labels.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from aifactory.controller.observe.families import METRICS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
KNOWN = {m.name for m in METRICS}
HISTOGRAMS = {m.name for m in METRICS if m.kind == "histogram"}


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("dashboards", ROOT / "hack" /
                                                  "dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))
    return out


def test_three_dashboards_are_shipped_and_up_to_date() -> None:
    rendered = _generator().rendered()
    assert [p.name for p in BOARDS] == sorted(rendered)
    for path in BOARDS:
        assert path.read_text() == rendered[path.name], \
            f"{path.name} is stale: run python hack/dashboards.py"


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.name)
def test_dashboards_use_the_datasource_variable_and_known_metrics(path: Path) -> None:
    board = json.loads(path.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert len({p["id"] for p in _panels(board["panels"])}) == len(_panels(board["panels"]))
    for panel in _panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            for name in re.findall(r"\baifactory_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in KNOWN or (base in HISTOGRAMS and name != base), \
                    f"{panel['title']}: unknown metric {name}"


def test_the_overview_covers_power_energy_cost_utilization_queues_fragmentation() -> None:
    board = json.loads((DEPLOY / "grafana" / "dashboards" /
                        "aifactory-overview.json").read_text())
    exprs = " ".join(t["expr"] for p in _panels(board["panels"]) for t in p.get("targets", []))
    for metric in ("aifactory_power_draw_watts", "aifactory_power_budget_watts",
                   "aifactory_factory_energy_joules_total", "aifactory_job_cost_dollars_total",
                   "aifactory_node_utilization_ratio", "aifactory_queue_allocated_gpus",
                   "aifactory_topology_largest_free_gpus"):
        assert metric in exprs


def _doc_rows() -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        m = re.match(r"^\| `(aifactory_\w+)` \| (\w+) \| ([^|]*) \|", line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} listed twice"
            rows[m.group(1)] = (m.group(2), m.group(3).strip())
    return rows


def _listed(labels: str) -> tuple[str, ...]:
    return tuple(a or f"<{b}>" for a, b in re.findall(r"`(\w+)`|\*(levels)\*", labels))


def test_docs_list_every_metric_with_its_type_and_labels() -> None:
    from aifactory.operators.metrics_server import OPERATOR_METRICS

    rows = _doc_rows()
    assert set(rows) == KNOWN | {name for name, _, _ in OPERATOR_METRICS}
    for m in METRICS:
        kind, labels = rows[m.name]
        assert kind == m.kind, m.name
        assert _listed(labels) == m.labels, m.name
    for name, kind, label_names in OPERATOR_METRICS:
        assert rows[name][0] == kind, name
        assert _listed(rows[name][1]) == label_names, name


def test_prometheus_config_scrapes_the_default_metrics_port() -> None:
    from aifactory.controller.observe.exporter import DEFAULT_METRICS_PORT

    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "aifactory"
    assert job["static_configs"][0]["targets"] == [f"localhost:{DEFAULT_METRICS_PORT}"]


def _operator_manifests() -> tuple[dict[str, Any], dict[str, Any]]:
    docs = list(yaml.safe_load_all((ROOT / "manifests" / "operator.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    return deployment, service


def test_the_operator_serves_metrics_where_the_monitors_and_prometheus_look() -> None:
    from aifactory.controller.observe.exporter import DEFAULT_METRICS_PORT
    from aifactory.operators.main import parser

    deployment, service = _operator_manifests()
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == DEFAULT_METRICS_PORT
    assert parser().parse_args([]).metrics_port == DEFAULT_METRICS_PORT
    assert f"--metrics-port={DEFAULT_METRICS_PORT}" in container["args"]
    assert f"--health-port={ports['health']}" in container["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert f"EXPOSE {ports['health']} {DEFAULT_METRICS_PORT}" in \
        (DEPLOY / "Dockerfile").read_text()
    namespace = deployment["metadata"]["namespace"]
    assert service["metadata"]["namespace"] == namespace
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "metrics" and port["port"] == DEFAULT_METRICS_PORT

    monitor = yaml.safe_load((DEPLOY / "prometheus" / "servicemonitor.yaml").read_text())
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [namespace]
    pods = yaml.safe_load((DEPLOY / "prometheus" / "podmonitor.yaml").read_text())
    assert pods["kind"] == "PodMonitor"
    assert pods["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pods["spec"]["namespaceSelector"]["matchNames"] == [namespace]
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_grafana_provisioning_and_the_kustomization_name_the_dashboards() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" /
                               "aifactory.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" /
                             "prometheus.yaml").read_text())
    assert source["datasources"][0]["type"] == "prometheus"
    kustomize = yaml.safe_load((DEPLOY / "grafana" / "kustomization.yaml").read_text())
    files = kustomize["configMapGenerator"][0]["files"]
    assert sorted(Path(f).name for f in files) == [p.name for p in BOARDS]
