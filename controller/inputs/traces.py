"""Public GPU-cluster traces as factories and workloads (see ``../shared/traces/README.md``).

Benchmarks should run on real inventories and real arrival streams, not only on invented
ones. This module turns them into the core's own types: ``NodeInfo`` for node lists and
network topologies, ``JobSpec`` (wrapped in ``TraceJob`` with arrival and duration) for the
Alibaba "openb" pod lists. Inputs are checked once, here, and every rejection names the file,
the 1-based line and the column, e.g. ``pods.csv:17 column 'num_gpu': expected an integer
0-8, got 'x'``.

Decisions a reader should know about:

- openb pods with ``num_gpu == 0`` are CPU-only (counted in
  ``OpenbPodTrace.cpu_only_pods``). With ``host_resources`` they are zero-GPU jobs
  (``JobSpec.cpu_only``) asking for their CPU and memory, as FGD's simulator schedules
  them; GPUs alone (the default) leaves them out, as they would ask for nothing.
- CPU and memory (``cpu_milli``, ``memory_mib`` of nodes and pods) are read only when asked
  (``host_resources=True``): then nodes track them and each pod asks for its own, as in
  FGD's simulator; by default the scheduler sees GPUs only.
- QoS becomes priority: LS and Guaranteed 100, Burstable 50, BE 0 (files with no qos column:
  0 for every pod). Higher runs first and may preempt lower.
- A pod's duration is ``deletion_time - creation_time``; the scheduler never sees it
  (``expected_runtime_seconds`` stays None), only the simulator does.
- The openb node list has no racks. ``assign_racks`` invents homogeneous ones;
  ``overlay_topology`` borrows the real Lingjun Clos fabric (``topo.csv``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import DEFAULT_QUEUE, JobKind, JobSpec
from aifactory.controller.core.topology import (
    BLOCK_LABEL,
    GPU_COUNT_LABEL,
    GPU_PRODUCT_LABEL,
    HOSTNAME_LABEL,
    RACK_LABEL,
    NodeInfo,
)
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.inputs._csv import CsvTable, read_csv

__all__ = [
    "CPU_ONLY_MODEL",
    "HOST_ID_LABEL",
    "OPENB_NAMESPACE",
    "QOS_PRIORITY",
    "SPINE_LABEL",
    "OpenbPodTrace",
    "TraceJob",
    "assign_racks",
    "load_openb_nodes",
    "load_openb_pods",
    "load_spot_nodes",
    "load_topology_csv",
    "overlay_topology",
    "read_openb_pods",
]

HOST_ID_LABEL = "aifactory.io/host-id"
SPINE_LABEL = "aifactory.io/spine"
OPENB_NAMESPACE = "openb"
CPU_ONLY_MODEL = "none"
MAX_GPUS_PER_POD = 8
MAX_GPUS_PER_NODE = 72
MAX_HOST_MILLI = 100_000_000  # 100,000 cores
MAX_HOST_MIB = 1 << 40
QOS_PRIORITY: dict[str, int] = {"LS": 100, "Guaranteed": 100, "Burstable": 50, "BE": 0}


@dataclass(frozen=True, slots=True)
class TraceJob:
    """A job from a trace: what it asks for, when it arrives and how long it really runs.

    ``arrival_seconds`` is None in traces without timestamps (fill-until-full experiments);
    ``duration_seconds`` is None when the trace does not say when the job ended.
    """

    spec: JobSpec
    arrival_seconds: float | None
    duration_seconds: float | None


@dataclass(frozen=True, slots=True)
class OpenbPodTrace:
    """An openb pod list: its jobs in file order and how many of its pods are CPU-only
    (in ``jobs`` with CPU and memory scheduled, left out with GPUs alone)."""

    path: str
    jobs: tuple[TraceJob, ...]
    cpu_only_pods: int
    has_timestamps: bool


# --------------------------------------------------------------------------- helpers


def _node(name: str, gpus: int, model: str, extra: Iterable[tuple[str, str]] = (),
          cpu_milli: int = 0, memory_mib: int = 0) -> NodeInfo:
    labels = {HOSTNAME_LABEL: name, GPU_COUNT_LABEL: str(gpus)}
    if gpus > 0:
        labels[GPU_PRODUCT_LABEL] = model
    labels.update(extra)
    return NodeInfo(name=name, gpus=gpus, gpu_model=model, labels=tuple(sorted(labels.items())),
                    cpu_milli=cpu_milli, memory_mib=memory_mib)


def _relabel(node: NodeInfo, updates: dict[str, str]) -> NodeInfo:
    labels = dict(node.labels)
    labels.update(updates)
    return replace(node, labels=tuple(sorted(labels.items())))


def _first_seen(table: CsvTable, seen: dict[str, int], key: str, line: int,
                column: str, what: str) -> None:
    if key in seen:
        raise table.error(f"duplicate {what} {key!r} (first on line {seen[key]})", line, column)
    seen[key] = line


def _grouped_by_model(nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    """Same (model, GPUs per node) together, as fleets are racked; file order within."""
    return sorted(nodes, key=lambda n: (n.gpu_model, -n.gpus))


# --------------------------------------------------------------------------- node lists


def load_openb_nodes(path: str | Path, include_cpu_only: bool = False,
                     host_resources: bool = False) -> list[NodeInfo]:
    """Nodes of an openb node list (``sn,cpu_milli,memory_mib,gpu,model``), in file order.

    Nodes without GPUs are left out unless ``include_cpu_only`` (their model is ``none``).
    With ``host_resources`` each node tracks its ``cpu_milli`` and ``memory_mib``.
    The list has no rack labels; pass the result to ``assign_racks`` or
    ``overlay_topology``.
    """
    table = read_csv(path, ("sn", "gpu", "model") + (
        ("cpu_milli", "memory_mib") if host_resources else ()))
    nodes: list[NodeInfo] = []
    seen: dict[str, int] = {}
    for line, row in table.rows:
        name = table.text(line, "sn", row["sn"])
        _first_seen(table, seen, name, line, "sn", "node")
        gpus = table.integer(line, "gpu", row["gpu"], 0, MAX_GPUS_PER_NODE)
        model = row["model"].strip()
        if gpus > 0 and not model:
            raise table.error("a node with gpu > 0 needs a GPU model", line, "model")
        cpu = memory = 0
        if host_resources:
            cpu = table.integer(line, "cpu_milli", row["cpu_milli"], 1, MAX_HOST_MILLI)
            memory = table.integer(line, "memory_mib", row["memory_mib"], 1, MAX_HOST_MIB)
        if gpus > 0 or include_cpu_only:
            nodes.append(_node(name, gpus, model or CPU_ONLY_MODEL, cpu_milli=cpu,
                               memory_mib=memory))
    return nodes


def load_spot_nodes(path: str | Path, include_cpu_only: bool = False) -> list[NodeInfo]:
    """Nodes of the spot-GPU trace (``gpu_model,gpu_capacity_num,cpu_num,node_name``).

    Numeric node names become ``spot-node-<n>`` so they are valid, readable host names.
    """
    table = read_csv(path, ("gpu_model", "gpu_capacity_num", "node_name"))
    nodes: list[NodeInfo] = []
    seen: dict[str, int] = {}
    for line, row in table.rows:
        raw = table.text(line, "node_name", row["node_name"])
        name = f"spot-node-{raw}" if raw.isdigit() else raw
        _first_seen(table, seen, name, line, "node_name", "node")
        gpus = table.integer(line, "gpu_capacity_num", row["gpu_capacity_num"], 0,
                             MAX_GPUS_PER_NODE)
        model = row["gpu_model"].strip()
        if gpus > 0 and not model:
            raise table.error("a node with GPUs needs a GPU model", line, "gpu_model")
        if gpus > 0 or include_cpu_only:
            nodes.append(_node(name, gpus, model or CPU_ONLY_MODEL))
    return nodes


def assign_racks(nodes: Sequence[NodeInfo], nodes_per_rack: int = 8,
                 racks_per_block: int = 16) -> list[NodeInfo]:
    """Give rack-less nodes deterministic racks ``b<i>-r<j>`` and blocks ``b<i>``.

    Nodes of the same (model, GPUs per node) are racked together and a rack never mixes
    them, like a real fleet bought and installed in batches: groups in order of model name
    (more GPUs per node first), nodes in input order within a group. Racks fill
    ``nodes_per_rack`` nodes (a group's last rack may be short), blocks ``racks_per_block``
    racks in order. Returns the nodes in that order with the labels set (existing
    rack/block labels are replaced).
    """
    if nodes_per_rack < 1:
        raise SpecError("nodes_per_rack", f"must be an integer >= 1, got {nodes_per_rack}")
    if racks_per_block < 1:
        raise SpecError("racks_per_block", f"must be an integer >= 1, got {racks_per_block}")
    out: list[NodeInfo] = []
    rack = -1
    in_rack = nodes_per_rack
    group: tuple[str, int] | None = None
    for node in _grouped_by_model(nodes):
        if in_rack == nodes_per_rack or (node.gpu_model, node.gpus) != group:
            rack += 1
            in_rack = 0
            group = (node.gpu_model, node.gpus)
        block = rack // racks_per_block
        out.append(_relabel(node, {BLOCK_LABEL: f"b{block}",
                                   RACK_LABEL: f"b{block}-r{rack % racks_per_block}"}))
        in_rack += 1
    return out


# --------------------------------------------------------------------------- topology


def _tor_groups(path: str | Path) -> tuple[CsvTable, list[tuple[str, str, str, list[str]]]]:
    """(DSW, PSW, ASW, host ids) per ToR group, groups in order of first appearance."""
    table = read_csv(path, ("ip", "DSW", "PSW", "ASW"))
    groups: dict[tuple[str, str], tuple[str, str, str, list[str]]] = {}
    seen: dict[str, int] = {}
    for line, row in table.rows:
        host = table.text(line, "ip", row["ip"])
        _first_seen(table, seen, host, line, "ip", "host")
        dsw = table.text(line, "DSW", row["DSW"])
        psw = table.text(line, "PSW", row["PSW"])
        asw = table.text(line, "ASW", row["ASW"])
        entry = groups.setdefault((psw, asw), (dsw, psw, asw, []))
        if entry[0] != dsw:
            raise table.error(f"ToR {psw}-{asw} is under DSW {entry[0]!r} on an earlier line, "
                              f"got {dsw!r}", line, "DSW")
        entry[3].append(host)
    if not groups:
        raise table.error("no hosts: expected one line per host after the header", 2)
    return table, list(groups.values())


def load_topology_csv(path: str | Path, gpus_per_node: int = 8,
                      gpu_model: str = "H100") -> list[NodeInfo]:
    """One node per host of a Lingjun ``topo.csv`` (``ip,DSW,PSW,ASW``), in file order.

    Nodes are named ``host-000``, ``host-001``... (the hashed ip is kept as label
    ``aifactory.io/host-id``). Rack = ``<PSW>-<ASW>`` (ASW names repeat under different
    PSWs), block = PSW, spine = DSW. GPUs per host are not in the file: an assumption.
    """
    if gpus_per_node < 1:
        raise SpecError("gpus_per_node", f"must be an integer >= 1, got {gpus_per_node}")
    table, groups = _tor_groups(path)
    where = {host: (dsw, psw, asw) for dsw, psw, asw, hosts in groups for host in hosts}
    hosts = [row["ip"].strip() for _, row in table.rows]
    width = max(3, len(str(len(hosts) - 1)))
    nodes = []
    for i, host in enumerate(hosts):
        dsw, psw, asw = where[host]
        nodes.append(_node(f"host-{i:0{width}d}", gpus_per_node, gpu_model, (
            (BLOCK_LABEL, psw), (RACK_LABEL, f"{psw}-{asw}"), (SPINE_LABEL, dsw),
            (HOST_ID_LABEL, host))))
    return nodes


def overlay_topology(nodes: Sequence[NodeInfo], topo_csv_path: str | Path,
                     group_models: bool = True) -> list[NodeInfo]:
    """Put rack-less nodes onto the real ToR groups of a Lingjun ``topo.csv``.

    Host slots are taken ToR group by ToR group (groups in order of first appearance in the
    file, hosts in file order), and node ``i`` gets slot ``i``: rack ``<PSW>-<ASW>``, block
    PSW, and the slot's host id. With ``group_models`` (the default) nodes are first ordered
    as ``assign_racks`` does, so a rack mostly holds one model. With more nodes than hosts
    the fabric is reused: pass ``k`` (k >= 1) gets suffix ``-x<k>`` on its rack and block
    labels, a copy of the fabric beside the first, so racks never exceed their real size.
    """
    _, groups = _tor_groups(topo_csv_path)
    slots = [(dsw, psw, asw, host) for dsw, psw, asw, hosts in groups for host in hosts]
    ordered = _grouped_by_model(nodes) if group_models else list(nodes)
    out = []
    for i, node in enumerate(ordered):
        dsw, psw, asw, host = slots[i % len(slots)]
        copy = i // len(slots)
        suffix = f"-x{copy}" if copy else ""
        out.append(_relabel(node, {BLOCK_LABEL: f"{psw}{suffix}",
                                   RACK_LABEL: f"{psw}-{asw}{suffix}",
                                   SPINE_LABEL: dsw, HOST_ID_LABEL: host}))
    return out


# --------------------------------------------------------------------------- pods


def _pod_models(text: str) -> tuple[str, ...]:
    models: list[str] = []
    for part in text.split("|"):
        model = part.strip()
        if model and model not in models:
            models.append(model)
    return tuple(models)


def read_openb_pods(path: str | Path, host_resources: bool = False) -> OpenbPodTrace:
    """Every pod of an openb pod list to schedule, in file order, with the CPU-only count
    (CPU-only pods are jobs only with ``host_resources``).

    Works for every variant: default, gpuspec*, gpushare* (with qos and timestamps) and
    multigpu* (``name,cpu_milli,memory_mib,num_gpu,gpu_milli`` only). With
    ``host_resources`` each job asks for its pod's ``cpu_milli`` and ``memory_mib``.
    """
    table = read_csv(path, ("name", "num_gpu", "gpu_milli") + (
        ("cpu_milli", "memory_mib") if host_resources else ()))
    timed = table.has("creation_time")
    jobs: list[TraceJob] = []
    seen: dict[str, int] = {}
    cpu_only = 0
    valid_qos = ", ".join(QOS_PRIORITY)
    for line, row in table.rows:
        name = table.text(line, "name", row["name"])
        _first_seen(table, seen, name, line, "name", "pod")
        gpus = table.integer(line, "num_gpu", row["num_gpu"], 0, MAX_GPUS_PER_POD)
        milli = table.integer(line, "gpu_milli", row["gpu_milli"], 0, MILLI_PER_GPU)
        priority = 0
        if table.has("qos") and row["qos"].strip():
            qos = row["qos"].strip()
            if qos not in QOS_PRIORITY:
                raise table.error(f"expected one of {valid_qos}, got {qos!r}", line, "qos")
            priority = QOS_PRIORITY[qos]
        created = table.number(line, "creation_time", row["creation_time"]) if timed else None
        deleted = (table.number(line, "deletion_time", row["deletion_time"])
                   if table.has("deletion_time") else None)
        if table.has("scheduled_time"):
            table.number(line, "scheduled_time", row["scheduled_time"])
        if created is not None and deleted is not None and deleted < created:
            raise table.error(f"must be >= creation_time ({created:g}), got {deleted:g}", line,
                              "deletion_time")
        cpu = memory = 0
        if host_resources:
            cpu = table.integer(line, "cpu_milli", row["cpu_milli"], 0, MAX_HOST_MILLI)
            memory = table.integer(line, "memory_mib", row["memory_mib"], 0, MAX_HOST_MIB)
        if gpus == 0:
            cpu_only += 1
            if not cpu and not memory:
                continue  # GPUs only, or a pod that asks for nothing: nothing to schedule
            milli = MILLI_PER_GPU  # a zero-GPU worker (JobSpec.cpu_only)
        elif milli == 0:
            raise table.error("expected 1-1000 for a pod with num_gpu >= 1, got 0", line,
                              "gpu_milli")
        if gpus > 1 and milli != MILLI_PER_GPU:
            raise table.error(f"must be {MILLI_PER_GPU} when num_gpu > 1 (only a single GPU "
                              f"is shared), got {milli}", line, "gpu_milli")
        spec = JobSpec(
            name=name,
            workers=1,
            gpus_per_worker=gpus,
            gpu_milli=milli,
            namespace=OPENB_NAMESPACE,
            kind=JobKind.TRAINING,
            gpu_models=_pod_models(row["gpu_spec"]) if gpus and table.has("gpu_spec") else (),
            queue=DEFAULT_QUEUE,
            priority=priority,
            expected_runtime_seconds=None,
            cpu_milli=cpu,
            memory_mib=memory,
        )
        duration = deleted - created if created is not None and deleted is not None else None
        jobs.append(TraceJob(spec, created, duration))
    return OpenbPodTrace(table.path, tuple(jobs), cpu_only, timed)


def load_openb_pods(path: str | Path, host_resources: bool = False) -> list[TraceJob]:
    """The pods of an openb pod list to schedule (CPU-only pods only with
    ``host_resources``; see ``read_openb_pods``)."""
    return list(read_openb_pods(path, host_resources).jobs)
