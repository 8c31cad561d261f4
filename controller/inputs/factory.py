"""The simulated factory: a YAML file a user writes, turned into nodes, queues and budgets.

Benchmarks, the simulator and the CLI all need the same thing: "this many GPUs of this model,
in these racks and blocks, with these queues and power budgets". ``SimulatedFactory`` YAML
says it in a few lines and nodes are generated from it, so a 100,000-GPU factory loads in
well under a second. Real inventories load too: ``load_factory`` accepts an openb node list
or spot-GPU node list (racks assigned by ``controller.inputs.traces.assign_racks``) or a Lingjun
``topo.csv``, and bare built-in names (``small``, ``100k``, ``nvl72``) from ``controller/data``
(kept identical to ``deploy/clusters`` by a unit test).

Generated labels: block ``b<i>`` (numbered across node groups, so every rack value
``b<i>-r<j>`` is unique), rack ``b<i>-r<j>``, hostname ``<prefix>-b<i>-r<j>-n<k>``, GPU
feature discovery product and count, and ``nvidia.com/gpu.clique`` ``b<i>-r<j>-nvl<m>`` when a
group has rack-scale NVLink domains. Errors name the field path and, for files, the file and
line: ``small.yaml:9: spec.nodeGroups[0].gpusPerNode: must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from aifactory.controller.core.errors import InputFileError, SpecError, SpecFileError
from aifactory.controller.core.gpus import canonical_model, gpu_model_name, known_models
from aifactory.controller.core.spec import (
    API_VERSION,
    DEFAULT_QUEUE,
    PowerBudgetSpec,
    QueueSpec,
    cpu_milli_of,
    memory_mib_of,
)
from aifactory.controller.core.topology import (
    BLOCK_LABEL,
    CLIQUE_LABEL,
    DEFAULT_LEVELS,
    GPU_COUNT_LABEL,
    GPU_PRODUCT_LABEL,
    HOSTNAME_LABEL,
    NODE_LEVEL,
    RACK_LABEL,
    ZONE_LABEL,
    LevelSpec,
    NodeInfo,
    Topology,
    nvlink_levels,
)
from aifactory.controller.inputs._csv import read_header
from aifactory.controller.inputs._yaml import YamlDocument, line_of, parse_yaml
from aifactory.controller.inputs.traces import (
    assign_racks,
    load_openb_nodes,
    load_spot_nodes,
    load_topology_csv,
)
from aifactory.controller.power.model import CostModel, profile_for

__all__ = [
    "BUILTIN_FACTORIES",
    "DEFAULT_FACTORY",
    "FACTORY_KIND",
    "LEVEL_LABELS",
    "FactorySpec",
    "builtin_factory_text",
    "factory_from_nodes",
    "load_factory",
    "parse_factory",
]

FACTORY_KIND = "SimulatedFactory"
DEFAULT_FACTORY = "small"
BUILTIN_FACTORIES = ("small", "100k", "nvl72")
LEVEL_LABELS: dict[str, str] = {
    "zone": ZONE_LABEL, "block": BLOCK_LABEL, "rack": RACK_LABEL, "nvlink": CLIQUE_LABEL,
    NODE_LEVEL: HOSTNAME_LABEL,
}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_GROUP_FIELDS = ("gpuModel", "gpusPerNode", "blocks", "racksPerBlock", "nodesPerRack",
                 "nvlinkDomainsPerRack", "namePrefix", "cpuPerNode", "memoryPerNode")


@dataclass(frozen=True, slots=True)
class FactorySpec:
    """A whole factory: its topology levels, nodes, queues, power budgets and prices."""

    name: str
    levels: tuple[LevelSpec, ...]
    nodes: tuple[NodeInfo, ...]
    queues: tuple[QueueSpec, ...]
    power_budgets: tuple[PowerBudgetSpec, ...]
    cost: CostModel
    base_watts_per_node: float = 0.0
    source: str = ""

    @property
    def total_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def host_tracked(self) -> bool:
        """Does the inventory give any node's CPU or memory (then they are scheduled)?"""
        return any(n.cpu_milli or n.memory_mib for n in self.nodes)

    def gpus_only(self) -> FactorySpec:
        """The same factory with CPU and memory left untracked: GPUs alone are scheduled."""
        return replace(self, nodes=tuple(replace(n, cpu_milli=0, memory_mib=0)
                                         for n in self.nodes))

    def topology(self) -> Topology:
        return Topology.build(self.nodes, self.levels)

    def peak_watts(self) -> float:
        """Draw with every GPU at full load (uncapped) plus the per-node base."""
        return math.fsum(n.gpus * profile_for(n.gpu_model).peak_watts + self.base_watts_per_node
                         for n in self.nodes)

    def idle_watts(self) -> float:
        """Draw with every GPU unallocated plus the per-node base."""
        return math.fsum(n.gpus * profile_for(n.gpu_model).idle_power_watts()
                         + self.base_watts_per_node for n in self.nodes)


# --------------------------------------------------------------------------- field helpers


def _check_keys(raw: Mapping[str, Any], path: str, allowed: Sequence[str]) -> None:
    for key in raw:
        if key not in allowed:
            raise SpecError(f"{path}.{key}", f"unknown field; valid fields are "
                            f"{', '.join(allowed)}")


def _mapping(raw: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise SpecError(path, f"must be a mapping, got {raw!r}")
    return raw


def _list(raw: Any, path: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise SpecError(path, f"must be a list, got {raw!r}")
    return raw


def _str(raw: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = raw.get(key)
    value = default if value is None else value
    if not isinstance(value, str) or not value.strip():
        what = "is required" if value is None else f"must be a non-empty string, got {value!r}"
        raise SpecError(f"{path}.{key}", what)
    return value.strip()


def _int(raw: Mapping[str, Any], key: str, path: str, default: int | None = None,
         minimum: int = 1, maximum: int | None = None) -> int:
    value = raw.get(key)
    value = default if value is None else value
    if value is None:
        raise SpecError(f"{path}.{key}", f"is required (an integer >= {minimum})")
    bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        raise SpecError(f"{path}.{key}", f"must be an integer {bound}, got {value!r}")
    return value


def _number(raw: Mapping[str, Any], key: str, path: str, default: float | None = None,
            positive: bool = False) -> float:
    value = raw.get(key)
    value = default if value is None else value
    bound = "> 0" if positive else ">= 0"
    if value is None:
        raise SpecError(f"{path}.{key}", f"is required (a number {bound})")
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0 or (positive and value == 0)):
        raise SpecError(f"{path}.{key}", f"must be a number {bound}, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- parsing


def _levels(raw: Any, nvlink: bool) -> tuple[LevelSpec, ...]:
    if raw is None:
        return nvlink_levels() if nvlink else DEFAULT_LEVELS
    levels: list[LevelSpec] = []
    for i, item in enumerate(_list(raw, "spec.levels")):
        path = f"spec.levels[{i}]"
        if isinstance(item, str):
            if item not in LEVEL_LABELS:
                raise SpecError(path, f"unknown level {item!r}; built-in levels are "
                                f"{', '.join(LEVEL_LABELS)} (or give {{name, nodeLabel}})")
            levels.append(LevelSpec(item, LEVEL_LABELS[item]))
        else:
            entry = _mapping(item, path)
            _check_keys(entry, path, ("name", "nodeLabel"))
            levels.append(LevelSpec(_str(entry, "name", path), _str(entry, "nodeLabel", path)))
    names = [lv.name for lv in levels]
    if not levels or names[-1] != NODE_LEVEL:
        raise SpecError("spec.levels", f"the last level must be {NODE_LEVEL!r}, got {names}")
    if len(set(names)) != len(names):
        raise SpecError("spec.levels", f"level names must be unique, got {names}")
    return tuple(levels)


def _group_nodes(raw: Any, index: int, first_block: int) -> tuple[list[NodeInfo], int, bool]:
    """Nodes of one node group, the number of blocks it used, and whether it has NVLink."""
    path = f"spec.nodeGroups[{index}]"
    group = _mapping(raw, path)
    _check_keys(group, path, _GROUP_FIELDS)
    written = _str(group, "gpuModel", path)
    model = gpu_model_name(written)
    if canonical_model(written) is None:
        raise SpecError(f"{path}.gpuModel", f"unknown GPU model {written!r}; known models are "
                        f"{', '.join(known_models())}")
    gpus = _int(group, "gpusPerNode", path)
    # What pods may request besides GPUs (Kubernetes quantities); left out: not tracked.
    cpu = 0 if group.get("cpuPerNode") is None else cpu_milli_of(group["cpuPerNode"],
                                                                 f"{path}.cpuPerNode")
    memory = 0 if group.get("memoryPerNode") is None else memory_mib_of(
        group["memoryPerNode"], f"{path}.memoryPerNode")
    blocks = _int(group, "blocks", path, default=1)
    racks = _int(group, "racksPerBlock", path, default=1)
    per_rack = _int(group, "nodesPerRack", path)
    domains = group.get("nvlinkDomainsPerRack")
    if domains is not None:
        domains = _int(group, "nvlinkDomainsPerRack", path, maximum=per_rack)
        if per_rack % domains:
            raise SpecError(f"{path}.nvlinkDomainsPerRack", f"must divide nodesPerRack "
                            f"({per_rack}) evenly, got {domains}")
    prefix = _str(group, "namePrefix", path, default=model.lower())
    if not _NAME.match(prefix):
        raise SpecError(f"{path}.namePrefix", "must be lower-case letters, digits and '-' "
                        f"(a DNS label), got {prefix!r}")
    width = max(2, len(str(per_rack - 1)))
    per_domain = per_rack // domains if domains else 0
    nodes: list[NodeInfo] = []
    for b in range(first_block, first_block + blocks):
        for r in range(racks):
            rack = f"b{b}-r{r}"
            for n in range(per_rack):
                name = f"{prefix}-{rack}-n{n:0{width}d}"
                labels = {BLOCK_LABEL: f"b{b}", RACK_LABEL: rack, HOSTNAME_LABEL: name,
                          GPU_PRODUCT_LABEL: model, GPU_COUNT_LABEL: str(gpus)}
                if per_domain:
                    labels[CLIQUE_LABEL] = f"{rack}-nvl{n // per_domain}"
                nodes.append(NodeInfo(name, gpus, model, tuple(sorted(labels.items())), cpu,
                                      memory))
    return nodes, blocks, bool(domains)


def _queues(raw: Any, total_gpus: int) -> tuple[QueueSpec, ...]:
    if raw is None:
        return (QueueSpec(DEFAULT_QUEUE, float(total_gpus)),)
    queues: list[QueueSpec] = []
    first: dict[str, int] = {}
    for i, item in enumerate(_list(raw, "spec.queues")):
        path = f"spec.queues[{i}]"
        entry = _mapping(item, path)
        _check_keys(entry, path, ("name", "nominalGPUs", "borrowingLimitGPUs", "cohort",
                                  "weight"))
        name = _str(entry, "name", path)
        if name in first:
            raise SpecError(f"{path}.name", f"duplicate queue name {name!r} (also "
                            f"spec.queues[{first[name]}])")
        first[name] = i
        borrow = entry.get("borrowingLimitGPUs")
        cohort = entry.get("cohort")
        queues.append(QueueSpec(
            name=name,
            nominal_gpus=_number(entry, "nominalGPUs", path),
            borrowing_limit_gpus=None if borrow is None else _number(
                entry, "borrowingLimitGPUs", path),
            cohort=None if cohort is None else _str(entry, "cohort", path),
            weight=_number(entry, "weight", path, default=1.0, positive=True),
        ))
    return tuple(queues)


def _budgets(raw: Any, nodes: Sequence[NodeInfo]) -> tuple[PowerBudgetSpec, ...]:
    budgets: list[PowerBudgetSpec] = []
    first: dict[str, int] = {}
    for i, item in enumerate(_list(raw, "spec.powerBudgets")):
        path = f"spec.powerBudgets[{i}]"
        entry = _mapping(item, path)
        _check_keys(entry, path, ("name", "watts", "selector"))
        name = _str(entry, "name", path)
        if name in first:
            raise SpecError(f"{path}.name", f"duplicate power budget name {name!r} (also "
                            f"spec.powerBudgets[{first[name]}])")
        first[name] = i
        watts = _number(entry, "watts", path, positive=True)
        selector: dict[str, str] = {}
        for key, value in _mapping(entry.get("selector") or {}, f"{path}.selector").items():
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(
                    value, str | int):
                raise SpecError(f"{path}.selector", f"must map label names to label values, "
                                f"got {key!r}: {value!r}")
            selector[key] = str(value)
        if selector and not any(all(n.label(k) == v for k, v in selector.items())
                                for n in nodes):
            example = nodes[0].label(RACK_LABEL) if nodes else None
            raise SpecError(f"{path}.selector", f"matches no node: {selector}" + (
                f" (rack labels look like {RACK_LABEL}: {example})" if example else ""))
        budgets.append(PowerBudgetSpec(name, watts, tuple(sorted(selector.items()))))
    return tuple(budgets)


def _cost(raw: Any) -> CostModel:
    if raw is None:
        return CostModel()
    entry = _mapping(raw, "spec.cost")
    _check_keys(entry, "spec.cost", ("electricityDollarsPerKWh", "hardwareDollarsPerGPUHour"))
    defaults = CostModel()
    return CostModel(
        electricity_dollars_per_kwh=_number(entry, "electricityDollarsPerKWh", "spec.cost",
                                            default=defaults.electricity_dollars_per_kwh),
        hardware_dollars_per_gpu_hour=_number(entry, "hardwareDollarsPerGPUHour", "spec.cost",
                                              default=defaults.hardware_dollars_per_gpu_hour),
    )


def parse_factory(doc: Any, source: str = "") -> FactorySpec:
    """Validate a SimulatedFactory document (already parsed YAML) and generate its nodes."""
    top = _mapping(doc, "(document)")
    if top.get("apiVersion") != API_VERSION:
        raise SpecError("apiVersion", f"must be {API_VERSION!r}, got {top.get('apiVersion')!r}")
    if top.get("kind") != FACTORY_KIND:
        raise SpecError("kind", f"must be {FACTORY_KIND!r}, got {top.get('kind')!r}")
    name = _str(_mapping(top.get("metadata"), "metadata"), "name", "metadata")
    spec = _mapping(top.get("spec"), "spec")
    _check_keys(spec, "spec", ("levels", "nodeGroups", "queues", "powerBudgets", "cost",
                               "baseWattsPerNode"))
    groups = _list(spec.get("nodeGroups"), "spec.nodeGroups")
    if not groups:
        raise SpecError("spec.nodeGroups", "is required: a list of {gpuModel, gpusPerNode, "
                        "blocks, racksPerBlock, nodesPerRack}")
    nodes: list[NodeInfo] = []
    block = 0
    nvlink = False
    for i, group in enumerate(groups):
        group_nodes, blocks, has_nvlink = _group_nodes(group, i, block)
        nodes.extend(group_nodes)
        block += blocks
        nvlink = nvlink or has_nvlink
    return FactorySpec(
        name=name,
        levels=_levels(spec.get("levels"), nvlink),
        nodes=tuple(nodes),
        queues=_queues(spec.get("queues"), sum(n.gpus for n in nodes)),
        power_budgets=_budgets(spec.get("powerBudgets"), nodes),
        cost=_cost(spec.get("cost")),
        base_watts_per_node=_number(spec, "baseWattsPerNode", "spec", default=0.0),
        source=source,
    )


# --------------------------------------------------------------------------- loading


def factory_from_nodes(name: str, nodes: Sequence[NodeInfo], source: str = "") -> FactorySpec:
    """A factory over given nodes: default levels (``block > rack > nvlink > node`` when any
    node carries an NVLink clique label, as GB200 NVL72 nodes do), one ``default`` queue, no
    budgets."""
    total = sum(n.gpus for n in nodes)
    levels = nvlink_levels() if any(n.label(CLIQUE_LABEL) for n in nodes) else DEFAULT_LEVELS
    return FactorySpec(name=name, levels=levels, nodes=tuple(nodes),
                       queues=(QueueSpec(DEFAULT_QUEUE, float(total)),), power_budgets=(),
                       cost=CostModel(), source=source)


def builtin_factory_text(name: str) -> str:
    """The YAML of a built-in factory (package data ``controller/data/<name>.yaml``)."""
    if name not in BUILTIN_FACTORIES:
        raise SpecError("factory", f"unknown built-in factory {name!r}; built-in factories "
                        f"are {', '.join(BUILTIN_FACTORIES)}")
    data = resources.files("aifactory.controller").joinpath("data").joinpath(f"{name}.yaml")
    return data.read_text(encoding="utf-8")


def _from_yaml_text(text: str, source: str) -> FactorySpec:
    document: YamlDocument = parse_yaml(text, source)
    try:
        return parse_factory(document.data, source)
    except SpecFileError:
        raise
    except SpecError as exc:
        raise SpecFileError(source, exc.field, exc.message,
                            line_of(document.tree, exc.field)) from exc


def _from_csv(path: Path) -> FactorySpec:
    header = set(read_header(path))
    if {"ip", "DSW", "PSW", "ASW"} <= header:
        nodes = load_topology_csv(path)
    elif {"sn", "gpu", "model"} <= header:
        # The openb node list gives each node's CPU and memory: they are scheduled too.
        nodes = assign_racks(load_openb_nodes(
            path, host_resources={"cpu_milli", "memory_mib"} <= header))
    elif {"gpu_model", "gpu_capacity_num", "node_name"} <= header:
        nodes = assign_racks(load_spot_nodes(path))
    else:
        raise InputFileError(str(path), "unrecognised CSV header: expected an openb node list "
                             "(sn,cpu_milli,memory_mib,gpu,model), a spot-GPU node list "
                             "(gpu_model,gpu_capacity_num,cpu_num,node_name) or a Lingjun "
                             "topo.csv (ip,DSW,PSW,ASW)", 1)
    if not nodes:
        raise InputFileError(str(path), "no GPU nodes in the file")
    return factory_from_nodes(path.stem, nodes, str(path))


def load_factory(path_or_name: str | Path = DEFAULT_FACTORY) -> FactorySpec:
    """A factory from a SimulatedFactory YAML, a node-list/topology CSV, or a built-in name.

    A bare name (``small``, ``100k``, ``nvl72``) is a built-in unless a file of that name
    exists. Spec errors from a file are ``SpecFileError`` (both a SpecError and an
    InputFileError) naming the file, line and field.
    """
    path = Path(path_or_name)
    text_name = str(path_or_name)
    if text_name in BUILTIN_FACTORIES and not path.is_file():
        return _from_yaml_text(builtin_factory_text(text_name), f"{text_name}.yaml (built-in)")
    if not path.is_file():
        hint = "" if path.suffix else f"; built-in factories are {', '.join(BUILTIN_FACTORIES)}"
        raise InputFileError(text_name, f"no such file{hint}")
    if path.suffix.lower() == ".csv":
        return _from_csv(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(text_name, f"cannot read: {exc}") from exc
    return _from_yaml_text(text, text_name)
