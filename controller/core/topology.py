"""The static shape of a factory: a frozen tree of topology domains over GPU nodes.

Like kueue's ``topologyTree``, the tree is built once per inventory generation and shared
read-only by every scheduling snapshot; usage lives in ``controller.core.state``. Levels are
configurable (default ``block > rack > node``); a node is the NVLink domain of its own GPUs,
and a rack-scale NVLink domain (NVL72) is one more level, e.g. ``block > rack > nvlink > node``.

Domain ids are tuples of level values from the top (``("b1", "r3", "node-7")``) and break
every tie, so placement is deterministic. Nodes are stored sorted by their domain id, which
makes every domain a contiguous range of nodes and GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.gpus import gpu_model_name

__all__ = [
    "BLOCK_LABEL",
    "CLIQUE_LABEL",
    "DEFAULT_LEVELS",
    "GPU_COUNT_LABEL",
    "GPU_PRESENT_LABEL",
    "GPU_PRODUCT_LABEL",
    "HOSTNAME_LABEL",
    "NODE_LEVEL",
    "RACK_LABEL",
    "ZONE_LABEL",
    "Domain",
    "LevelSpec",
    "NodeInfo",
    "Topology",
    "nvlink_levels",
]

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
CLIQUE_LABEL = "nvidia.com/gpu.clique"
ZONE_LABEL = "topology.kubernetes.io/zone"
BLOCK_LABEL = "aifactory.io/block"
RACK_LABEL = "aifactory.io/rack"
HOSTNAME_LABEL = "kubernetes.io/hostname"
NODE_LEVEL = "node"
ROOT_NAME = "factory"


@dataclass(frozen=True, slots=True)
class LevelSpec:
    """One topology level and the node label that names a node's domain at that level."""

    name: str
    node_label: str


DEFAULT_LEVELS: tuple[LevelSpec, ...] = (
    LevelSpec("block", BLOCK_LABEL),
    LevelSpec("rack", RACK_LABEL),
    LevelSpec(NODE_LEVEL, HOSTNAME_LABEL),
)


def nvlink_levels() -> tuple[LevelSpec, ...]:
    """Levels for rack-scale NVLink (GB200 NVL72 style): ``block > rack > nvlink > node``."""
    return (DEFAULT_LEVELS[0], DEFAULT_LEVELS[1], LevelSpec("nvlink", CLIQUE_LABEL),
            DEFAULT_LEVELS[2])


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A GPU node as an inventory reports it: name, GPU count and model, labels, and the
    CPU (milli-cores) and memory (MiB) pods may request there; 0 means not tracked (the
    node never runs out of it), as for inventories that list GPUs only."""

    name: str
    gpus: int
    gpu_model: str
    labels: tuple[tuple[str, str], ...] = ()
    cpu_milli: int = 0
    memory_mib: int = 0

    def __post_init__(self) -> None:
        # One name per GPU model whatever the inventory wrote (NVIDIA-H200 -> H200).
        object.__setattr__(self, "gpu_model", gpu_model_name(self.gpu_model))

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None

    @staticmethod
    def from_labels(name: str, labels: Mapping[str, str], gpus: int | None = None,
                    gpu_model: str | None = None) -> NodeInfo:
        """Build from Kubernetes-style labels (GPU feature discovery keys) when not given."""
        if gpus is None:
            raw = labels.get(GPU_COUNT_LABEL)
            if raw is None or not raw.isdigit():
                raise SpecError(f"node {name} label {GPU_COUNT_LABEL}",
                                f"must be a GPU count such as '8', got {raw!r}")
            gpus = int(raw)
        model = gpu_model or labels.get(GPU_PRODUCT_LABEL) or "unknown"
        return NodeInfo(name=name, gpus=gpus, gpu_model=model,
                        labels=tuple(sorted(labels.items())))


@dataclass(frozen=True, slots=True)
class Domain:
    """A topology domain: a contiguous range of nodes (and so of GPUs) under one id."""

    level: int
    index: int
    id: tuple[str, ...]
    parent: int
    children: tuple[int, ...]
    node_start: int
    node_end: int
    gpus: int

    @property
    def name(self) -> str:
        return self.id[-1] if self.id else ROOT_NAME


@dataclass(frozen=True, slots=True)
class Topology:
    """Frozen tree. ``levels[-1]`` is the node level; ``root`` spans the whole factory.

    ``domains[l]`` lists the domains of level ``l`` sorted by id; ``node_domain[l][n]`` is
    the index at level ``l`` of node ``n``'s domain (O(1) ancestor lookup).
    """

    levels: tuple[LevelSpec, ...]
    nodes: tuple[NodeInfo, ...]
    models: tuple[str, ...]
    node_model: tuple[int, ...]
    gpu_start: tuple[int, ...]
    domains: tuple[tuple[Domain, ...], ...]
    node_domain: tuple[tuple[int, ...], ...]
    root: Domain
    max_node_gpus: int
    node_index: Mapping[str, int] = field(repr=False)
    # Node kinds: nodes alike for what they could ever host, (GPU model index, CPU
    # milli-cores, memory MiB (0: not tracked), GPUs of all such nodes), and each node's kind.
    kinds: tuple[tuple[int, int, int, int], ...] = ()
    node_kind: tuple[int, ...] = ()

    # ----------------------------------------------------------------- construction

    @staticmethod
    def build(nodes: Iterable[NodeInfo],
              levels: Sequence[LevelSpec] = DEFAULT_LEVELS) -> Topology:
        """Build the tree from node descriptions.

        A node missing the label of a level becomes a domain of its own at that level
        (it shares no rack with anyone), so an unlabelled cluster still schedules.
        """
        levels = tuple(levels)
        if not levels or levels[-1].name != NODE_LEVEL:
            raise SpecError("levels", f"the last level must be {NODE_LEVEL!r}, got "
                            f"{[lv.name for lv in levels]}")
        names = [lv.name for lv in levels]
        if len(set(names)) != len(names):
            raise SpecError("levels", f"level names must be unique, got {names}")
        node_list = list(nodes)
        seen: set[str] = set()
        for node in node_list:
            if node.name in seen:
                raise SpecError(f"node {node.name}", "appears twice in the inventory")
            seen.add(node.name)
            if node.gpus < 0:
                raise SpecError(f"node {node.name}.gpus", f"must be >= 0, got {node.gpus}")

        def path_of(node: NodeInfo) -> tuple[str, ...]:
            parts: list[str] = []
            for lv in levels[:-1]:
                value = node.label(lv.node_label)
                parts.append(value if value else f"{lv.name}:{node.name}")
            parts.append(node.name)
            return tuple(parts)

        keyed = sorted(((path_of(n), n) for n in node_list), key=lambda item: item[0])
        ordered = tuple(n for _, n in keyed)
        paths = [p for p, _ in keyed]
        models = tuple(sorted({n.gpu_model for n in ordered}))
        model_index = {m: i for i, m in enumerate(models)}
        gpu_start: list[int] = []
        total = 0
        for n in ordered:
            gpu_start.append(total)
            total += n.gpus

        depth = len(levels)
        level_domains: list[list[Domain]] = []
        node_domain: list[list[int]] = []
        # Build level by level; a domain at level l is a maximal run of nodes sharing the
        # first l+1 path parts (contiguous because nodes are sorted by path).
        for lvl in range(depth):
            doms: list[Domain] = []
            owner: list[int] = [0] * len(ordered)
            start = 0
            while start < len(ordered):
                prefix = paths[start][: lvl + 1]
                end = start
                while end < len(ordered) and paths[end][: lvl + 1] == prefix:
                    owner[end] = len(doms)
                    end += 1
                parent = node_domain[lvl - 1][start] if lvl > 0 else -1
                gpus = sum(ordered[i].gpus for i in range(start, end))
                doms.append(Domain(lvl, len(doms), prefix, parent, (), start, end, gpus))
                start = end
            level_domains.append(doms)
            node_domain.append(owner)
        # Fill in children.
        for lvl in range(depth - 1):
            kids: list[list[int]] = [[] for _ in level_domains[lvl]]
            for child in level_domains[lvl + 1]:
                kids[child.parent].append(child.index)
            level_domains[lvl] = [
                Domain(d.level, d.index, d.id, d.parent, tuple(kids[d.index]), d.node_start,
                       d.node_end, d.gpus) for d in level_domains[lvl]
            ]
        root = Domain(-1, 0, (), -1, tuple(d.index for d in level_domains[0]), 0,
                      len(ordered), total)
        kind_index: dict[tuple[int, int, int], int] = {}
        kind_gpus: list[int] = []
        node_kind: list[int] = []
        for n in ordered:
            kind = (model_index[n.gpu_model], n.cpu_milli, n.memory_mib)
            k = kind_index.setdefault(kind, len(kind_index))
            if k == len(kind_gpus):
                kind_gpus.append(0)
            kind_gpus[k] += n.gpus
            node_kind.append(k)
        return Topology(
            levels=levels,
            nodes=ordered,
            models=models,
            node_model=tuple(model_index[n.gpu_model] for n in ordered),
            gpu_start=tuple(gpu_start),
            domains=tuple(tuple(d) for d in level_domains),
            node_domain=tuple(tuple(o) for o in node_domain),
            root=root,
            max_node_gpus=max((n.gpus for n in ordered), default=0),
            node_index={n.name: i for i, n in enumerate(ordered)},
            kinds=tuple((*kind, kind_gpus[k]) for kind, k in kind_index.items()),
            node_kind=tuple(node_kind),
        )

    # ----------------------------------------------------------------- queries

    @property
    def model_gpus(self) -> tuple[int, ...]:
        """GPUs of each model index in the factory (summed over its node kinds)."""
        out = [0] * len(self.models)
        for model, _, _, gpus in self.kinds:
            out[model] += gpus
        return tuple(out)

    @property
    def level_names(self) -> tuple[str, ...]:
        return tuple(lv.name for lv in self.levels)

    @property
    def node_level(self) -> int:
        return len(self.levels) - 1

    @property
    def total_gpus(self) -> int:
        return self.root.gpus

    def level_index(self, name: str, field_name: str = "level") -> int:
        """Index of a level by name; a clear error lists the valid names."""
        for i, lv in enumerate(self.levels):
            if lv.name == name:
                return i
        raise SpecError(field_name, f"unknown topology level {name!r}; valid levels are "
                        f"{', '.join(self.level_names)}")

    def domain(self, level: int, index: int) -> Domain:
        return self.root if level < 0 else self.domains[level][index]

    def children_of(self, dom: Domain) -> tuple[Domain, ...]:
        below = self.domains[dom.level + 1]
        return tuple(below[i] for i in dom.children)

    def ancestor(self, node: int, level: int) -> int:
        """Index at ``level`` of the domain holding node ``node`` (0 for the root)."""
        return 0 if level < 0 else self.node_domain[level][node]

    def gpu_range(self, node: int) -> range:
        start = self.gpu_start[node]
        return range(start, start + self.nodes[node].gpus)

    def node_of_gpu(self, gpu: int) -> int:
        """Node index holding global GPU index ``gpu`` (binary search over starts)."""
        lo, hi = 0, len(self.gpu_start) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.gpu_start[mid] <= gpu:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def describe(self) -> str:
        """One line a person can read: ``4 blocks > 16 racks > 128 nodes, 1024 GPUs (H200)``."""
        parts = [f"{len(self.domains[i])} {lv.name}s" for i, lv in enumerate(self.levels)]
        return f"{' > '.join(parts)}, {self.total_gpus} GPUs ({', '.join(self.models)})"
