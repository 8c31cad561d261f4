"""Every metric aifactory exports, and a fast Prometheus text rendering of them.

``METRICS`` is the catalogue (name, type, labels, meaning); ``docs/metrics.md`` lists the
same names and a unit test keeps the two in step. ``build_families(snapshot)`` turns a
``FactorySnapshot`` into ``Family`` values: plain rows of label values and numbers. Two
renderings read those rows, so they cannot disagree:

* ``controller.observe.exporter.FactoryCollector`` makes ``prometheus_client`` metric families of
  them (for any registry, and for tests with ``get_sample_value``);
* ``TextRenderer`` writes the Prometheus text format (0.0.4) directly. ``prometheus_client``'s
  ``generate_latest`` spends about 9 us per sample on this machine, so a 10,000-GPU factory
  (about 90,000 samples) would take most of a second; this renderer formats each label set
  once per scrape and reuses it for every per-GPU family. A unit test parses both outputs and
  checks they hold the same samples.

Nothing here imports ``prometheus_client``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from aifactory.controller.core.histogram import HistogramCounts
from aifactory.controller.observe.snapshot import FactorySnapshot

__all__ = ["METRICS", "Family", "MetricDef", "TextRenderer", "build_families"]

GPU = ("node", "gpu", "<levels>", "model", "job_namespace", "job_name")
NODE = ("node", "<levels>", "model")
JOB = ("job_namespace", "job_name", "queue")
SERVICE = ("service_namespace", "service_name")  # an InferenceService (not "service":
# the label kube-prometheus adds to every target of a ServiceMonitor)


@dataclass(frozen=True, slots=True)
class MetricDef:
    """One exported metric. ``<levels>`` in ``labels`` stands for the topology levels above
    the node: always ``block`` and ``rack`` (empty when the factory has no such level), then
    any other level the factory defines (``nvlink``, ``zone``)."""

    name: str
    kind: str  # gauge | counter | histogram
    labels: tuple[str, ...]
    help: str


def _m(name: str, kind: str, labels: Sequence[str], help_: str) -> MetricDef:
    return MetricDef(name, kind, tuple(labels), help_)


METRICS: tuple[MetricDef, ...] = (
    # per GPU
    _m("aifactory_gpu_power_watts", "gauge", GPU, "Power draw of the GPU now."),
    _m("aifactory_gpu_energy_joules_total", "counter", GPU,
       "Energy the GPU used (the NVML total-energy counter on real GPUs); rate() is power."),
    _m("aifactory_gpu_utilization_ratio", "gauge", GPU, "GPU utilization, 0 to 1."),
    _m("aifactory_gpu_memory_used_bytes", "gauge", GPU, "GPU memory in use."),
    _m("aifactory_gpu_memory_total_bytes", "gauge", GPU, "GPU memory installed."),
    _m("aifactory_gpu_temperature_celsius", "gauge", GPU, "GPU temperature."),
    _m("aifactory_gpu_sm_clock_hertz", "gauge", GPU, "Streaming-multiprocessor clock."),
    _m("aifactory_gpu_power_limit_watts", "gauge", GPU, "Power limit the GPU enforces."),
    # per node
    _m("aifactory_node_gpus", "gauge", NODE, "GPUs on the node."),
    _m("aifactory_node_gpus_allocated", "gauge", NODE,
       "GPUs of the node held by a job (or fenced after a failure)."),
    _m("aifactory_node_power_watts", "gauge", NODE, "Power draw of the node's GPUs."),
    _m("aifactory_node_energy_joules_total", "counter", NODE, "Energy of the node's GPUs."),
    _m("aifactory_node_utilization_ratio", "gauge", NODE,
       "Mean utilization of the node's GPUs, 0 to 1."),
    _m("aifactory_node_memory_used_bytes", "gauge", NODE, "GPU memory in use on the node."),
    _m("aifactory_node_temperature_celsius", "gauge", NODE, "Hottest GPU on the node."),
    _m("aifactory_node_power_limit_watts", "gauge", NODE,
       "Sum of the power limits of the node's GPUs."),
    # factory, power budgets, topology
    _m("aifactory_factory_power_watts", "gauge", (),
       "Power draw of every GPU plus the per-node base power."),
    _m("aifactory_factory_energy_joules_total", "counter", (), "Energy of every GPU."),
    _m("aifactory_power_budget_watts", "gauge", ("budget",), "Limit of a PowerBudget."),
    _m("aifactory_power_draw_watts", "gauge", ("budget",),
       "Measured draw of the GPUs in a PowerBudget's scope plus their nodes' base power."),
    _m("aifactory_power_budget_allocated_watts", "gauge", ("budget",),
       "Draw that admission counts against a PowerBudget: idle GPUs at idle power, GPUs of "
       "admitted jobs at the job's estimate."),
    _m("aifactory_power_budget_exceeded_seconds_total", "counter", (),
       "Seconds during which some PowerBudget's modelled draw was above its limit."),
    _m("aifactory_domain_gpus", "gauge", ("level", "domain"),
       "GPUs in a topology domain (level factory, block, rack, ...)."),
    _m("aifactory_domain_gpus_allocated", "gauge", ("level", "domain"),
       "GPUs of a topology domain held by a job (or fenced after a failure)."),
    _m("aifactory_topology_largest_free_gpus", "gauge", ("level",),
       "Free GPUs in the emptiest domain of a level: the biggest gang that level can still "
       "take whole (fragmentation)."),
    _m("aifactory_topology_domains", "gauge", ("level",), "Domains at a topology level."),
    _m("aifactory_topology_domains_free", "gauge", ("level",),
       "Domains at a level with every GPU free."),
    _m("aifactory_telemetry_source_info", "gauge", ("source", "requested"),
       "Where GPU telemetry comes from: simulated, nvml or model (the power model, used when "
       "NVML is unavailable); requested is what was asked for."),
    # queues
    _m("aifactory_queue_pending_jobs", "gauge", ("queue", "priority"),
       "Jobs waiting in a queue, per priority."),
    _m("aifactory_queue_pending_gpus", "gauge", ("queue",), "GPUs the waiting jobs ask for."),
    _m("aifactory_queue_allocated_gpus", "gauge", ("queue",),
       "GPUs held by a queue's running jobs."),
    _m("aifactory_queue_nominal_gpus", "gauge", ("queue",), "A queue's nominal GPU quota."),
    _m("aifactory_jobs", "gauge", ("queue", "phase"),
       "Jobs the control plane knows, per phase (Queued, Running, Succeeded, Failed)."),
    _m("aifactory_job_queue_wait_seconds", "histogram", ("queue",),
       "Time from submission to a job's first start."),
    # jobs
    _m("aifactory_job_gpus", "gauge", JOB, "GPUs a job holds now (fractions count)."),
    _m("aifactory_job_energy_joules_total", "counter", JOB,
       "Energy of the GPUs a job held, split by share, over every run of the job."),
    _m("aifactory_job_cost_dollars_total", "counter", JOB,
       "Electricity for the job's energy plus amortized hardware for its GPU-hours."),
    _m("aifactory_job_gpu_seconds_total", "counter", JOB, "GPU-seconds a job has held."),
    _m("aifactory_job_restarts_total", "counter", JOB,
       "Times a job restarted from a checkpoint after a failure."),
    _m("aifactory_job_preemptions_total", "counter", JOB, "Times a job was preempted."),
    _m("aifactory_job_phase", "gauge", (*JOB, "phase"),
       "1 for the job's phase (Queued, Running, Succeeded, Failed), 0 for the others."),
    # inference services
    _m("aifactory_inference_replicas", "gauge", (*SERVICE, "state"),
       "An InferenceService's replicas: desired (spec.replicas or the autoscaler's choice), "
       "placed (running) and ready (serving)."),
    _m("aifactory_inference_in_flight_requests", "gauge", SERVICE,
       "Requests in flight over the service's ready replicas."),
    _m("aifactory_inference_requests_total", "counter", SERVICE,
       "Requests the service's replicas answered; rate() is the request rate."),
    _m("aifactory_inference_request_seconds_total", "counter", SERVICE,
       "Seconds the answered requests took in all; divided by the requests' rate, the mean "
       "latency."),
    _m("aifactory_inference_scale_events_total", "counter",
       (*SERVICE, "direction"),
       "Autoscaler changes of the replica count, up or down."),
    # scheduler
    _m("aifactory_scheduling_attempts_total", "counter", ("result",),
       "Jobs considered by scheduling cycles: admitted, waiting (no room yet) or failed "
       "(can never run)."),
    _m("aifactory_scheduling_duration_seconds", "histogram", (),
       "Time of one placement decision."),
    _m("aifactory_scheduling_cycles_total", "counter", (), "Scheduling cycles run."),
    _m("aifactory_preemptions_total", "counter", (), "Jobs preempted."),
    _m("aifactory_restarts_total", "counter", (), "Job restarts after failures."),
    _m("aifactory_jobs_submitted_total", "counter", (), "Jobs submitted."),
    _m("aifactory_jobs_completed_total", "counter", (), "Jobs that succeeded."),
    _m("aifactory_jobs_failed_total", "counter", (), "Jobs that failed for good."),
)
_BY_NAME = {m.name: m for m in METRICS}
PHASES = ("Queued", "Running", "Succeeded", "Failed")


@dataclass(slots=True)
class Family:
    """Rows of one metric. Gauges and counters: ``rows[i]`` (label values in the order of
    ``labels``) has value ``values[i]``; families over the same things (every per-GPU
    family) share one ``rows`` list. Histograms: ``histograms``."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...]
    rows: list[tuple[str, ...]] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    histograms: list[tuple[tuple[str, ...], HistogramCounts]] = field(default_factory=list)

    @property
    def samples(self) -> list[tuple[tuple[str, ...], float]]:
        return list(zip(self.rows, self.values, strict=True))


def _labels(defn: MetricDef, levels: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for label in defn.labels:
        if label == "<levels>":
            out.extend(levels)
        else:
            out.append(label)
    return tuple(out)


def build_families(snap: FactorySnapshot) -> list[Family]:
    """Every family, freshly built from one snapshot (no state kept between scrapes)."""
    fams: dict[str, Family] = {}
    shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple per label set: the
    for defn in METRICS:                                  # renderer caches by identity
        if defn.name.startswith("aifactory_gpu_") and not snap.gpus:
            continue
        names = shared.get(defn.labels)
        if names is None:
            names = shared[defn.labels] = _labels(defn, snap.level_labels)
        fams[defn.name] = Family(defn.name, defn.kind, defn.help, names)

    def column(name: str, rows: list[tuple[str, ...]], values: list[float]) -> None:
        fam = fams[name]
        fam.rows = rows
        fam.values = values

    def add(name: str, labels: tuple[str, ...], value: float) -> None:
        fam = fams[name]
        fam.rows.append(labels)
        fam.values.append(value)

    gpus = snap.gpus
    if gpus:
        rows = list(snap.gpu_labels)
        column("aifactory_gpu_power_watts", rows, [r.power_watts for r in gpus])
        column("aifactory_gpu_energy_joules_total", rows, [r.energy_joules for r in gpus])
        column("aifactory_gpu_utilization_ratio", rows, [r.utilization for r in gpus])
        column("aifactory_gpu_memory_used_bytes", rows, [r.memory_used_bytes for r in gpus])
        column("aifactory_gpu_memory_total_bytes", rows,
               [r.memory_total_bytes for r in gpus])
        column("aifactory_gpu_temperature_celsius", rows,
               [r.temperature_celsius for r in gpus])
        column("aifactory_gpu_sm_clock_hertz", rows, [r.sm_clock_mhz * 1e6 for r in gpus])
        column("aifactory_gpu_power_limit_watts", rows, [r.power_limit_watts for r in gpus])
    nodes = snap.nodes
    rows = [n.labels for n in nodes]
    column("aifactory_node_gpus", rows, [n.gpus for n in nodes])
    column("aifactory_node_gpus_allocated", rows, [n.gpus_allocated for n in nodes])
    column("aifactory_node_power_watts", rows, [n.power_watts for n in nodes])
    column("aifactory_node_energy_joules_total", rows, [n.energy_joules for n in nodes])
    column("aifactory_node_utilization_ratio", rows, [n.utilization for n in nodes])
    column("aifactory_node_memory_used_bytes", rows, [n.memory_used_bytes for n in nodes])
    column("aifactory_node_temperature_celsius", rows,
           [n.temperature_celsius for n in nodes])
    column("aifactory_node_power_limit_watts", rows, [n.power_limit_watts for n in nodes])
    add("aifactory_factory_power_watts", (), snap.power_watts)
    add("aifactory_factory_energy_joules_total", (), snap.energy_joules)
    for b in snap.budgets:
        add("aifactory_power_budget_watts", (b.name,), b.limit_watts)
        add("aifactory_power_draw_watts", (b.name,), b.draw_watts)
        add("aifactory_power_budget_allocated_watts", (b.name,), b.allocated_watts)
    s = snap.scheduler
    add("aifactory_power_budget_exceeded_seconds_total", (), s.budget_exceeded_seconds)
    for d in snap.domains:
        add("aifactory_domain_gpus", (d.level, d.name), d.gpus)
        add("aifactory_domain_gpus_allocated", (d.level, d.name), d.gpus_allocated)
    for lv in snap.levels:
        add("aifactory_topology_largest_free_gpus", (lv.level,), lv.largest_free_gpus)
        add("aifactory_topology_domains", (lv.level,), lv.domains)
        add("aifactory_topology_domains_free", (lv.level,), lv.domains_fully_free)
    add("aifactory_telemetry_source_info", (snap.source, snap.requested_source), 1)
    for q in snap.queues:
        for prio, count in q.pending_jobs:
            add("aifactory_queue_pending_jobs", (q.name, prio), count)
        add("aifactory_queue_pending_gpus", (q.name,), q.pending_gpus)
        add("aifactory_queue_allocated_gpus", (q.name,), q.allocated_gpus)
        add("aifactory_queue_nominal_gpus", (q.name,), q.nominal_gpus)
        for phase, count in q.jobs_by_phase:
            add("aifactory_jobs", (q.name, phase), count)
        if q.wait is not None:
            fams["aifactory_job_queue_wait_seconds"].histograms.append(((q.name,), q.wait))
    jobs = snap.jobs
    rows = [(j.namespace, j.name, j.queue) for j in jobs]
    column("aifactory_job_gpus", rows, [j.gpus for j in jobs])
    column("aifactory_job_energy_joules_total", rows, [j.energy_joules for j in jobs])
    column("aifactory_job_cost_dollars_total", rows, [j.cost_dollars for j in jobs])
    column("aifactory_job_gpu_seconds_total", rows, [j.gpu_seconds for j in jobs])
    column("aifactory_job_restarts_total", rows, [j.restarts for j in jobs])
    column("aifactory_job_preemptions_total", rows, [j.preemptions for j in jobs])
    for j, lab in zip(jobs, rows, strict=True):
        for phase in PHASES:
            add("aifactory_job_phase", (*lab, phase), 1 if j.phase == phase else 0)
    for v in snap.services:
        svc = (v.namespace, v.name)
        for state, n in (("desired", v.desired), ("placed", v.placed), ("ready", v.ready)):
            add("aifactory_inference_replicas", (*svc, state), n)
        add("aifactory_inference_in_flight_requests", svc, v.in_flight)
        add("aifactory_inference_requests_total", svc, v.requests_total)
        add("aifactory_inference_request_seconds_total", svc, v.request_seconds_total)
        add("aifactory_inference_scale_events_total", (*svc, "up"), v.scale_ups)
        add("aifactory_inference_scale_events_total", (*svc, "down"), v.scale_downs)
    for result, count in s.attempts:
        add("aifactory_scheduling_attempts_total", (result,), count)
    fams["aifactory_scheduling_duration_seconds"].histograms.append(((), s.decisions))
    add("aifactory_scheduling_cycles_total", (), s.cycles)
    add("aifactory_preemptions_total", (), s.preemptions)
    add("aifactory_restarts_total", (), s.restarts)
    add("aifactory_jobs_submitted_total", (), s.jobs_submitted)
    add("aifactory_jobs_completed_total", (), s.jobs_completed)
    add("aifactory_jobs_failed_total", (), s.jobs_failed)
    return list(fams.values())


# --------------------------------------------------------------------------- text format


def format_value(value: float) -> str:
    """A sample value as the text format wants it (``+Inf``, ``NaN``, else shortest repr)."""
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if value != value:
        return "NaN"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")
    return value


class TextRenderer:
    """Prometheus text exposition (version 0.0.4) of ``Family`` rows.

    Families over the same things share one ``rows`` list (every per-GPU family has one row
    per GPU), so the label text of each row is formatted once per render and reused."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
    MAX_CACHED_LABEL_SETS = 1_000_000

    def __init__(self) -> None:
        # Label text by (label names, values), kept between renders: most rows (GPUs,
        # nodes) carry the same labels scrape after scrape.
        self._label_text: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}

    def _texts(self, names: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
        cache = self._label_text
        if len(cache) > self.MAX_CACHED_LABEL_SETS:
            cache.clear()
        texts: list[str] = []
        for row in rows:
            key = (names, row)
            text = cache.get(key)
            if text is None:
                text = cache[key] = _label_text(names, row)
            texts.append(text)
        return texts

    def render(self, families: Sequence[Family]) -> bytes:
        texts_of: dict[tuple[int, int], list[str]] = {}
        out: list[str] = []
        append = out.append
        for fam in families:
            help_ = fam.help.replace("\\", r"\\").replace("\n", r"\n")
            append(f"# HELP {fam.name} {help_}\n# TYPE {fam.name} {fam.kind}\n")
            if fam.kind == "histogram":
                for labels, counts in fam.histograms:
                    self._histogram(fam.name, fam.labels, labels, counts, out)
                continue
            key = (id(fam.labels), id(fam.rows))
            texts = texts_of.get(key)
            if texts is None:
                texts = texts_of[key] = self._texts(fam.labels, fam.rows)
            values = fam.values
            total = sum(values)
            if total - total == 0:  # every value finite: repr is the text format's number
                numbers = [repr(v) for v in values]
            else:
                numbers = [format_value(v) for v in values]
            name = fam.name
            append("".join([f"{name}{t} {v}\n" for t, v in zip(texts, numbers,
                                                                strict=True)]))
        return "".join(out).encode()

    @staticmethod
    def _histogram(name: str, names: tuple[str, ...], values: tuple[str, ...],
                   counts: HistogramCounts, out: list[str]) -> None:
        pairs = [f'{k}="{_escape(v)}"' for k, v in zip(names, values, strict=True)]
        head = ",".join(pairs)
        sep = "," if head else ""
        for bound, cumulative in zip(counts.bounds, counts.cumulative, strict=True):
            out.append(f'{name}_bucket{{{head}{sep}le="{format_value(bound)}"}} '
                       f"{cumulative}\n")
        tail = f"{{{head}}}" if head else ""
        out.append(f"{name}_sum{tail} {format_value(counts.sum)}\n")
        out.append(f"{name}_count{tail} {counts.count}\n")


def _label_text(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(names, values, strict=True))
    return f"{{{inner}}}"
