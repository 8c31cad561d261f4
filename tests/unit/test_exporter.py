"""The Prometheus collector, read through a private registry with ``get_sample_value``.

The default simulated factory (``small``: 2 blocks x 2 racks x 8 nodes x 8 H200) runs the
sample jobs for 3000 simulated seconds; every expected value below is read from the
simulation itself, never written down by hand.

    factory
    ├── b0: b0-r0 (8 nodes), b0-r1 (8 nodes)
    └── b1: b1-r0 (8 nodes), b1-r1 (8 nodes)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aifactory.controller.core.histogram import Histogram
from aifactory.controller.inputs.factory import load_factory
from aifactory.controller.inputs.workload import load_workload
from aifactory.controller.observe.exporter import FactoryCollector
from aifactory.controller.observe.families import METRICS, Family, TextRenderer, build_families
from aifactory.controller.observe.snapshot import PlaneObserver
from aifactory.controller.runtime.scaler import ServiceView
from aifactory.controller.sim.simulation import FailureEvent, Simulation

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"


def _run(until: float = 3000.0, failure: FailureEvent | None = None) -> Simulation:
    """The samples; their InferenceServices under a diurnal request rate, autoscaled."""
    import argparse

    from aifactory.controller.cli.traffic import attach_traffic

    sim = Simulation(load_factory("small"))
    attach_traffic(sim, argparse.Namespace(traffic="diurnal", traffic_hours=until / 3600),
                   SAMPLES)
    sim.submit_all(load_workload(SAMPLES))
    if failure is not None:
        sim.inject(failure)
    sim.run(until=until)
    return sim


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return _run()


@pytest.fixture(scope="module")
def registry(sim: Simulation) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FactoryCollector(PlaneObserver(sim, services=sim.scaler)))
    return reg


@dataclass(frozen=True)
class Case:
    id: str
    metric: str
    labels: dict[str, str]
    expected: Callable[[Simulation], float]


def _rack(sim: Simulation, name: str) -> float:
    lvl = sim.topo.level_index("rack")
    return next(d.gpus - sim.state.free_gpus(d) for d in sim.topo.domains[lvl]
                if d.name == name)


def _job(sim: Simulation, key: str) -> float:
    rec = sim.jobs[key]
    return rec.placement.gpu_equivalents if rec.placement is not None else 0.0


def _cost(sim: Simulation, key: str) -> float:
    joules = sim.sim_backend.job_energy_joules(key)
    return sim.factory.cost.cost_dollars(joules, sim.metrics.gpu_seconds(key, sim.now))


def _service(sim: Simulation, key: str) -> ServiceView:
    assert sim.scaler is not None
    view = sim.scaler.view(key)
    assert view is not None
    return view


CASES = [
    Case("a service's wanted replicas are the autoscaler's", "aifactory_inference_replicas",
         {"service_namespace": "serving", "service_name": "chat-70b", "state": "desired"},
         lambda s: _service(s, "serving/chat-70b").desired),
    Case("a service's ready replicas", "aifactory_inference_replicas",
         {"service_namespace": "serving", "service_name": "chat-70b", "state": "ready"},
         lambda s: _service(s, "serving/chat-70b").ready),
    Case("requests answered", "aifactory_inference_requests_total",
         {"service_namespace": "serving", "service_name": "chat-70b"},
         lambda s: _service(s, "serving/chat-70b").requests_total),
    Case("the factory has 256 GPUs", "aifactory_domain_gpus",
         {"level": "factory", "domain": "factory"}, lambda s: s.topo.total_gpus),
    Case("factory allocation is every GPU that is not free", "aifactory_domain_gpus_allocated",
         {"level": "factory", "domain": "factory"},
         lambda s: s.topo.total_gpus - s.state.free_whole_gpus),
    Case("rack b1-r0 allocation comes from the usage snapshot",
         "aifactory_domain_gpus_allocated", {"level": "rack", "domain": "b1-r0"},
         lambda s: _rack(s, "b1-r0")),
    Case("the largest free rack is the emptiest rack", "aifactory_topology_largest_free_gpus",
         {"level": "rack"},
         lambda s: max(s.state.free_gpus(d) for d in s.topo.domains[1])),
    Case("the largest free node is the emptiest node", "aifactory_topology_largest_free_gpus",
         {"level": "node"}, lambda s: max(s.state.node_free)),
    Case("a running gang holds its placement's GPUs", "aifactory_job_gpus",
         {"job_namespace": "research", "job_name": "llm-pretrain", "queue": "default"},
         lambda s: _job(s, "research/llm-pretrain")),
    Case("a fractional replica holds half a GPU", "aifactory_job_gpus",
         {"job_namespace": "serving", "job_name": "embeddings:r0", "queue": "default"},
         lambda s: _job(s, "serving/embeddings:r0")),
    Case("job energy is the backend's attribution", "aifactory_job_energy_joules_total",
         {"job_namespace": "research", "job_name": "llm-pretrain", "queue": "default"},
         lambda s: s.sim_backend.job_energy_joules("research/llm-pretrain")),
    Case("job cost is electricity plus GPU-hours", "aifactory_job_cost_dollars_total",
         {"job_namespace": "research", "job_name": "llm-pretrain", "queue": "default"},
         lambda s: _cost(s, "research/llm-pretrain")),
    Case("a finished job keeps its energy", "aifactory_job_energy_joules_total",
         {"job_namespace": "team-a", "job_name": "finetune-small", "queue": "default"},
         lambda s: s.sim_backend.job_energy_joules("team-a/finetune-small")),
    Case("admitted attempts are counted", "aifactory_scheduling_attempts_total",
         {"result": "admitted"}, lambda s: s.metrics.attempts["admitted"]),
    Case("waiting attempts are counted", "aifactory_scheduling_attempts_total",
         {"result": "waiting"}, lambda s: s.metrics.attempts["waiting"]),
    Case("every started job's wait is in the histogram", "aifactory_job_queue_wait_seconds_count",
         {"queue": "default"}, lambda s: len(s.metrics.waits)),
    Case("every placement decision is in the histogram",
         "aifactory_scheduling_duration_seconds_count", {},
         lambda s: len(s.metrics.decision_times)),
    Case("the rack budget's limit", "aifactory_power_budget_watts", {"budget": "rack-b0-r0"},
         lambda s: s.factory.power_budgets[1].watts),
    Case("the admission estimate of the factory budget",
         "aifactory_power_budget_allocated_watts", {"budget": "factory"},
         lambda s: s.state.budget_watts[0]),
    Case("factory power is every GPU's reading", "aifactory_factory_power_watts", {},
         lambda s: math.fsum(r.power_watts for r in s.backend.telemetry().gpus)),
    Case("submitted jobs", "aifactory_jobs_submitted_total", {}, lambda s: s.metrics.submitted),
    Case("running jobs per phase", "aifactory_jobs", {"queue": "default", "phase": "Running"},
         lambda s: sum(1 for r in s.jobs.values() if r.phase == "Running")),
    Case("the simulated source is named", "aifactory_telemetry_source_info",
         {"source": "simulated", "requested": "auto"}, lambda s: 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_collector_values_match_the_control_plane(sim: Simulation,
                                                  registry: CollectorRegistry,
                                                  case: Case) -> None:
    got = registry.get_sample_value(case.metric, case.labels)
    assert got is not None, f"no sample {case.metric}{case.labels}"
    assert got == pytest.approx(case.expected(sim), rel=1e-9, abs=1e-9)


def test_gpu_series_carry_topology_and_the_owning_job(sim: Simulation,
                                                      registry: CollectorRegistry) -> None:
    placement = sim.jobs["research/llm-pretrain"].placement
    assert placement is not None
    slot = placement.slots[0]
    node = sim.topo.nodes[slot.node]
    index = slot.gpus[0] - sim.topo.gpu_start[slot.node]
    reading = next(r for r in sim.backend.telemetry().gpus
                   if r.node == node.name and r.index == index)
    labels = {"node": node.name, "gpu": str(index),
              "block": node.label("aifactory.io/block") or "",
              "rack": node.label("aifactory.io/rack") or "", "model": "H200",
              "job_namespace": "research", "job_name": "llm-pretrain"}
    assert registry.get_sample_value("aifactory_gpu_power_watts", labels) == pytest.approx(
        reading.power_watts)
    assert registry.get_sample_value("aifactory_gpu_sm_clock_hertz", labels) == \
        reading.sm_clock_mhz * 1e6


def test_node_series_sum_the_gpu_series(registry: CollectorRegistry) -> None:
    def total(name: str) -> float:
        return sum(s.value for m in registry.collect() if m.name == name for s in m.samples)

    assert total("aifactory_node_power_watts") == pytest.approx(
        total("aifactory_gpu_power_watts"))
    assert total("aifactory_node_gpus") == 256


def test_node_level_mode_has_no_per_gpu_series(sim: Simulation) -> None:
    families = build_families(PlaneObserver(sim, per_gpu=False).snapshot())
    names = {f.name for f in families}
    assert not any(n.startswith("aifactory_gpu_") for n in names)
    node_power = next(f for f in families if f.name == "aifactory_node_power_watts")
    assert len(node_power.values) == 32


def test_every_catalogued_metric_is_built(sim: Simulation) -> None:
    families = {f.name: f for f in build_families(
        PlaneObserver(sim, services=sim.scaler).snapshot())}
    assert set(families) == {m.name for m in METRICS}
    for m in METRICS:
        fam = families[m.name]
        assert fam.values or fam.histograms, f"{m.name} has no samples"


def _parsed(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_fast_text_holds_the_same_samples_as_generate_latest(sim: Simulation) -> None:
    collector = FactoryCollector(PlaneObserver(sim))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    reference = _parsed(generate_latest(reg).decode())
    fast = _parsed(collector.render_text().decode())
    assert fast.keys() == reference.keys()
    assert len(fast) > 256 * 8
    for key, value in reference.items():
        assert fast[key] == pytest.approx(value, rel=1e-12), key


def test_the_renderer_escapes_labels_and_writes_special_values() -> None:
    fam = Family("aifactory_x", "gauge", "help with \\ and\nnewline", ("a", "b"),
                 rows=[('quo"te', "back\\slash"), ("new\nline", "ok")],
                 values=[math.nan, math.inf])
    hist = Histogram((1.0, 2.0))
    hist.observe_all([0.5, 1.5, 3.0])
    h = Family("aifactory_h_seconds", "histogram", "h", ("q",),
               histograms=[(("x",), hist.counts())])
    parsed = _parsed(TextRenderer().render([fam, h]).decode())
    assert math.isnan(parsed[("aifactory_x", frozenset({("a", 'quo"te'),
                                                         ("b", "back\\slash")}))])
    assert parsed[("aifactory_x", frozenset({("a", "new\nline"), ("b", "ok")}))] == math.inf
    assert parsed[("aifactory_h_seconds_bucket", frozenset({("q", "x"), ("le", "2.0")}))] == 2
    assert parsed[("aifactory_h_seconds_bucket", frozenset({("q", "x"), ("le", "+Inf")}))] == 3
    assert parsed[("aifactory_h_seconds_sum", frozenset({("q", "x")}))] == 5.0


def test_restarts_count_and_job_energy_survives_the_relaunch() -> None:
    before = _run(until=1000.0)
    key = "research/llm-pretrain"
    placement = before.jobs[key].placement
    assert placement is not None
    node = before.topo.nodes[placement.slots[0].node].name
    # 100 s after the failure: the relaunched run alone has used far less than the first.
    sim = _run(until=1100.0, failure=FailureEvent(1000.0, node, repair_after_seconds=60.0))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(FactoryCollector(PlaneObserver(sim)))
    labels = {"job_namespace": "research", "job_name": "llm-pretrain", "queue": "default"}
    assert sim.jobs[key].restarts >= 1
    assert sim.jobs[key].placement is not None, "the gang should run again"
    assert reg.get_sample_value("aifactory_job_restarts_total", labels) == \
        sim.jobs[key].restarts
    assert reg.get_sample_value("aifactory_restarts_total") == sim.metrics.restarts
    energy_at_failure = before.sim_backend.job_energy_joules(key)
    energy = reg.get_sample_value("aifactory_job_energy_joules_total", labels)
    assert energy is not None and energy > energy_at_failure


def test_a_scrape_never_lowers_a_job_energy_counter(sim: Simulation) -> None:
    observer = PlaneObserver(sim)
    first = {(j.namespace, j.name): j.energy_joules for j in observer.snapshot().jobs}
    second = {(j.namespace, j.name): j.energy_joules for j in observer.snapshot().jobs}
    assert all(second[k] >= first[k] for k in first)


def test_histogram_refuses_unordered_bounds() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram((2.0, 1.0))
