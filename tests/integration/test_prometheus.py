"""The exporter scraped by a real Prometheus, and every shipped dashboard query against it.

A simulated factory runs as ``aifactory simulate --serve-metrics`` (a subprocess, 20x real
time); a real Prometheus scrapes it every second. Then, through Prometheus's HTTP API:
every metric of the catalogue has series; GPU power lies between idle and the power limit;
energy counters only go up; job energy adds up to the energy of the GPUs the jobs hold;
and every PromQL expression of every dashboard in deploy/grafana/dashboards returns data.

The factory (256 H200 in 2 blocks x 2 racks x 8 nodes) and its jobs:

    alpha/pretrain   64 GPUs (8 x 8, one rack), runs the whole test      queue research
    beta/chat         3-6 x 2 GPUs (autoscaled inference replicas under a diurnal request
                      rate, --traffic), run until stopped                 queue serving
    delta/finetune   16 GPUs, 120 simulated seconds: done after ~6 s      queue research
    gamma/giant     192 GPUs: never fits while pretrain runs, so it waits queue research
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aifactory.controller.observe.families import METRICS
from aifactory.controller.power.model import profile_for
from tests.integration.prometheus_env import (
    PrometheusNotFoundError,
    PrometheusServer,
    ensure_prometheus,
    free_port,
)

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
SPEED = 20.0
WINDOW = "15s"  # what $__rate_interval and $__range become: >= 10 scrapes at 1 s

FACTORY = """
apiVersion: aifactory.io/v1alpha1
kind: SimulatedFactory
metadata: {name: it-factory}
spec:
  levels: [block, rack, node]
  nodeGroups:
  - {gpuModel: H200, gpusPerNode: 8, blocks: 2, racksPerBlock: 2, nodesPerRack: 8,
     namePrefix: h200}
  queues:
  - {name: research, nominalGPUs: 256, cohort: all}
  - {name: serving, nominalGPUs: 64, cohort: all}
  powerBudgets:
  - {name: factory, watts: 150000}
  - {name: rack-b0-r0, watts: 40000, selector: {aifactory.io/rack: b0-r0}}
"""


def _training(ns: str, name: str, workers: int, queue: str, priority: int, runtime: float,
              required: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"workers": workers, "gpusPerWorker": 8, "queue": queue,
                            "priority": priority, "expectedRuntimeSeconds": runtime,
                            "runtime": {"entrypoint": "examples.train:main"}}
    if required:
        spec["topology"] = {"required": required}
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


JOBS = [
    _training("alpha", "pretrain", 8, "research", 100, 1e7, required="rack"),
    {"apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
     "metadata": {"name": "chat", "namespace": "beta"},
     "spec": {"model": "m", "gpusPerReplica": 2, "replicas": 3, "minReplicas": 3,
              "maxReplicas": 6, "autoscaling": {"targetInFlightRequests": 4},
              "queue": "serving",
              "priority": 200, "runtime": {"command": ["serve"]}}},
    _training("delta", "finetune", 2, "research", 50, 120),
    _training("gamma", "giant", 24, "research", 10, 3600),
]


@dataclass
class Live:
    prom: PrometheusServer
    exporter_url: str


def _prometheus_binary() -> str:
    try:
        return ensure_prometheus()
    except PrometheusNotFoundError as exc:
        if os.environ.get("AIFACTORY_REQUIRE_INTEGRATION"):
            pytest.fail(f"AIFACTORY_REQUIRE_INTEGRATION is set but {exc}", pytrace=False)
        pytest.skip(str(exc))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGINT)  # the CLI closes its server on Ctrl-C
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    binary = _prometheus_binary()
    work = tmp_path_factory.mktemp("factory")
    (work / "factory.yaml").write_text(FACTORY)
    jobs = work / "jobs"
    jobs.mkdir()
    for doc in JOBS:
        (jobs / f"{doc['metadata']['namespace']}-{doc['metadata']['name']}.yaml").write_text(
            json.dumps(doc))
    port = free_port()
    log = (work / "exporter.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "aifactory.controller.cli.main", "simulate",
         "--cluster", str(work / "factory.yaml"), "--workload", str(jobs),
         "--serve-metrics", str(port), "--metrics-host", "127.0.0.1",
         "--speed", str(SPEED), "--duration", "600", "--no-progress",
         "--traffic", "diurnal"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"exporter did not start: "
                                f"{(work / 'exporter.log').read_text()[-2000:]}")
                time.sleep(0.2)
        with PrometheusServer(binary, [f"127.0.0.1:{port}"]) as prom:
            # Enough scrapes for rate() over WINDOW, and the fine-tune done.
            got = prom.wait_for("count_over_time(aifactory_factory_power_watts[1m]) >= 16",
                                timeout=60)
            assert got, f"Prometheus did not scrape the exporter: {prom.log_tail()}"
            yield Live(prom, url)
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- series


def test_the_exporter_serves_metrics_and_refuses_other_paths(live: Live) -> None:
    with urllib.request.urlopen(live.exporter_url, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert b"aifactory_gpu_power_watts{" in resp.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(live.exporter_url.replace("/metrics", "/nope"), timeout=10)
    assert err.value.code == 404
    err.value.close()
    up = live.prom.value('up{job="aifactory"}')
    assert up == 1.0


@pytest.mark.parametrize("renderer", ["fast", "client"])
def test_start_metrics_server_serves_a_plane_in_node_mode(renderer: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from aifactory.controller.inputs.factory import load_factory
    from aifactory.controller.observe.exporter import start_metrics_server
    from aifactory.controller.sim.simulation import Simulation

    sim = Simulation(load_factory("small"))
    with start_metrics_server(sim, 0, "127.0.0.1", per_gpu=False,
                              renderer=renderer) as server, \
            urllib.request.urlopen(server.url, timeout=10) as resp:
        text = resp.read().decode()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "aifactory_node_power_watts" in names
    assert not any(n.startswith("aifactory_gpu_") for n in names)


@pytest.mark.parametrize("metric", [m.name for m in METRICS], ids=lambda n: n)
def test_every_catalogued_metric_has_series_in_prometheus(live: Live, metric: str) -> None:
    kind = next(m.kind for m in METRICS if m.name == metric)
    name = f"{metric}_bucket" if kind == "histogram" else metric
    assert live.prom.query(f'count({{__name__="{name}"}})'), f"no series of {name}"


def test_gpu_power_lies_between_idle_and_the_power_limit(live: Live) -> None:
    prom = live.prom
    idle = profile_for("H200").idle_power_watts()
    assert prom.value("count(aifactory_gpu_power_watts)") == 256
    assert prom.value("min(aifactory_gpu_power_watts)") >= idle - 1e-6
    assert prom.value("max(aifactory_gpu_power_watts)") > idle  # the jobs draw more
    assert prom.query("aifactory_gpu_power_watts > aifactory_gpu_power_limit_watts") == []
    # the node series are the GPU series summed
    gpus = prom.value("sum(aifactory_gpu_power_watts)")
    assert prom.value("sum(aifactory_node_power_watts)") == pytest.approx(gpus, rel=1e-9)
    assert prom.value('aifactory_power_draw_watts{budget="factory"}') == pytest.approx(
        prom.value("aifactory_factory_power_watts"), rel=1e-9)
    # admission never lets a budget's estimate exceed it
    assert prom.query("aifactory_power_budget_allocated_watts > aifactory_power_budget_watts"
                      ) == []
    assert prom.value('aifactory_telemetry_source_info{source="simulated"}') == 1


def test_energy_counters_only_increase(live: Live) -> None:
    prom = live.prom
    now = time.time()
    before = prom.value("aifactory_factory_energy_joules_total", now - 5)
    after = prom.value("aifactory_factory_energy_joules_total", now)
    assert after > before
    assert prom.query(f"increase(aifactory_gpu_energy_joules_total[{WINDOW}]) <= 0") == []
    assert prom.value("sum(resets(aifactory_gpu_energy_joules_total[1m]))") == 0
    assert prom.value("sum(resets(aifactory_job_energy_joules_total[1m]))") == 0
    assert prom.value("sum(resets(aifactory_job_cost_dollars_total[1m]))") == 0


def test_job_energy_adds_up_to_the_energy_of_the_gpus_they_hold(live: Live) -> None:
    prom = live.prom
    done = prom.wait_for('aifactory_job_phase{job_name="finetune",phase="Succeeded"} == 1',
                         timeout=60)
    assert done, "delta/finetune never succeeded"
    time.sleep(1.5)  # ownership is stable from here on: compare increases over 4 s
    t1 = time.time()
    time.sleep(4)
    t2 = time.time()
    jobs = "sum(aifactory_job_energy_joules_total)"
    held = 'sum(aifactory_gpu_energy_joules_total{job_name!=""})'
    job_delta = prom.value(jobs, t2) - prom.value(jobs, t1)
    gpu_delta = prom.value(held, t2) - prom.value(held, t1)
    assert gpu_delta > 0
    assert abs(job_delta - gpu_delta) <= 0.01 * gpu_delta, (job_delta, gpu_delta)


def test_the_waiting_gang_shows_in_queue_depth(live: Live) -> None:
    prom = live.prom
    assert prom.value('aifactory_queue_pending_jobs{queue="research",priority="10"}') == 1
    assert prom.value('aifactory_queue_pending_gpus{queue="research"}') == 192
    assert prom.value('aifactory_job_phase{job_name="giant",phase="Queued"}') == 1
    assert prom.value('aifactory_scheduling_attempts_total{result="waiting"}') > 0


# --------------------------------------------------------------------------- dashboards


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _substitute(expr: str, values: dict[str, str]) -> str:
    fixed = {"__rate_interval": WINDOW, "__range": WINDOW, "__interval": "2s",
             **values}
    for name, value in sorted(fixed.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"[[{name}]]", value)
        expr = re.sub(rf"\${re.escape(name)}\b", value.replace("\\", r"\\"), expr)
    return expr


def _resolve_variables(prom: PrometheusServer, board: dict[str, Any]) -> dict[str, str]:
    """Values Grafana would pick: each query variable's first value, in order."""
    values: dict[str, str] = {}
    for var in board["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        assert var["type"] == "query", f"unexpected variable type {var['type']}"
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", _substitute(query, values))
        assert m, f"variable {var['name']}: unsupported query {query}"
        found = sorted(prom.label_values(m.group(2), m.group(1)))
        assert found, f"variable {var['name']}: {query} has no values"
        values[var["name"]] = found[0]
    return values


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_dashboard_query_returns_data(live: Live, path: Path) -> None:
    board = json.loads(path.read_text())
    values = _resolve_variables(live.prom, board)
    empty: list[str] = []
    checked = 0
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            expr = _substitute(target["expr"], values)
            assert "$" not in expr, f"unsubstituted variable in {expr}"
            result = live.prom.query(expr)
            finite = [r for r in result if math.isfinite(float(r["value"][1]))]
            checked += 1
            if not finite:
                empty.append(f"{panel['title']!r}: {expr} -> {result[:2]}")
    assert checked >= 5
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


# --------------------------------------------------------------------------- report


def test_the_shipped_prometheus_config_is_valid() -> None:
    promtool = Path(ensure_prometheus()).with_name("promtool")
    if not promtool.exists():
        pytest.skip("promtool is not installed next to prometheus")
    done = subprocess.run([str(promtool), "check", "config",
                           str(REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_report_draws_a_live_factory_from_prometheus(live: Live, tmp_path: Path) -> None:
    from aifactory.controller.cli.main import main
    from aifactory.controller.observe.promquery import series_from_prometheus

    end = time.time()
    series = series_from_prometheus(live.prom.url, end - 20, end, 1.0)
    assert any(math.isfinite(p) and p > 0 for p in series.power_watts)
    assert set(series.queues) == {"research", "serving"}
    assert {t.name for t in series.namespace_totals} >= {"alpha", "beta", "delta"}
    assert len(series.racks) == 4
    assert main(["report", "--prometheus", live.prom.url, "--last", "20",
                 "--out", str(tmp_path / "live")]) == 0
    assert (tmp_path / "live.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in (tmp_path / "live.html").read_text()
