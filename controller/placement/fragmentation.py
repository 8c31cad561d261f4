"""Fragmentation-aware choice of a node for work that fits on one node (FGD, USENIX ATC'23).

Packing (BestFit) keeps nodes tight but does not look at what is likely to come next: it
puts a quarter-GPU pod on the last whole GPU of the 8-GPU node that the next 8-GPU job
needed, or on a big node while the small nodes that only small work can use sit idle.
FGD ("Beware of Fragmentation", Weng et al., ATC'23) measures, per node, the free GPU
capacity the expected workload could *not* use, and places each task where that measure
grows least. aifactory uses the same measure for every request that fits on one node:

- the target workload M is the set of task shapes seen so far (GPUs per worker, milli-GPU
  share, allowed GPU models; each worker of a gang counts once), each with its popularity.
  FGD keeps only the most popular shapes until 95 % of the tasks are covered; we keep all
  of them, so rare but large shapes (0.5 % of the openb default pods ask for 8 GPUs) still
  count: on FGD's own orders that placed more (``benchmarks/README.md``);
- F_n(t), the fragment of node n for shape t, in milli-GPU: all free capacity of n when t
  cannot run there (GPU model not allowed, fewer wholly free GPUs than t needs, no GPU with
  t's share free); otherwise the free capacity t cannot use: partially used GPUs for a
  whole-GPU shape, GPUs with less free than the share for a fractional one;
- F_n(M) = sum_t p_t F_n(t), and a placement scores F_n(M) after minus before: lower is
  better, and it is often negative (using capacity no typical task could use).
- CPU-only (zero-GPU) shapes are typical shapes too, as in the paper: for them all free
  GPU capacity of every node is fragment (they can use none of it). They shift every
  node's measure alike, so they change no GPU task's choice directly; a CPU-only task
  itself goes where taking its CPU and memory strands the fewest GPUs for the other shapes
  (a node whose GPUs are all taken scores 0).

FGD's measure only counts capacity that *no* typical task can use; it does not see that
work restricted to a scarce GPU model loses the GPUs other work takes from it (on openb
``gpuspec33``, T4-only pods ask for more than the T4 share of the factory, and P100-only
pods queue behind unrestricted pods that sat on the P100 nodes). The same holds for work
that only some nodes can ever host for their CPU or memory (on openb ``multigpu50``, 8-GPU
pods asking 120 cores fit only the 128-core G3 nodes, 5 % of the GPUs). So a placement also
pays for the capacity it takes, per milli-GPU, the *scarcity* of the node's kind (GPU model,
CPU and memory capacity: ``Topology.kinds``):

- S(k) = sum over restricted demand r that kind k can host of D_r / C_r, where r groups
  the shapes with the same allowed models, CPU and memory, D_r is r's share of all GPU
  demand seen (GPUs x workers, fractions counted by share) and C_r the share of the
  factory's GPUs on the kinds that can host r; r is restricted when some kind cannot;
- a move's score is the FGD change plus milli-GPU taken x S(kind).

Demand every kind can host would add the same to every kind and is left out; a task's own
options all host it, so S only reorders choices *between* kinds, and with no restricted
demand (or one kind of node) the score is FGD's alone.

CPU and memory count as in FGD: on nodes that track them, a shape also records the CPU and
memory per worker, and all of a node's free GPU capacity is fragment for a shape whose CPU
or memory the node can no longer give (its GPUs are stranded for that shape). That
threshold only sees a node once it is too late: GPU work asks, on average, for ``r`` CPU
milli-cores (and memory) per milli-GPU (``WorkloadMix.host_per_milli``, weighted by
demand), so a node whose free CPU is below ``r`` x its free milli-GPU will strand the
difference, whatever arrives. A placement also pays for the change in that expected
stranding, in milli-GPU like the fragment (``stranding_weight``, 1 by default):

- X_n = max(0, free milli-GPU of n - min(free CPU / r_cpu, free memory / r_memory));
- CPU-heavy work goes where CPU is left over (taking the CPU a node's free GPUs need
  costs), CPU-light work where GPUs would otherwise be stranded (it lowers X_n), and
  CPU-only work where its CPU strands no GPU.

On FGD's own orders (seeds 1-3, outside the held-out 42-51) this placed 0.35, 0.38 and 0.50
points more of the GPUs at 100 % arrived demand on ``multigpu50``, ``gpushare40`` and
``default``; weights 0.3 to 4 all gained, 1 (the measure's own unit) was kept untuned.
Nodes with
the same GPU model, the same free milli-GPU on each GPU and the same free CPU and memory
form a class (``ClusterState.class_nodes``); scores are cached per class, shape and
workload version, so a decision costs O(classes) rather than O(nodes x GPUs). Ties
(equal score) go to the tightest GPU, then the node with fewest free GPUs, then the rack
with fewest free GPUs, so empty nodes and racks stay whole for gangs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from aifactory.controller.core.state import ClusterState, NodeClass
from aifactory.controller.core.units import MILLI_PER_GPU

__all__ = ["FragmentationScorer", "Shape", "WorkloadMix", "ranked_nodes",
           "stranded_milli"]

# (whole GPUs per worker, milli-GPU per GPU, allowed model indices or None for any,
#  CPU milli-cores per worker, memory MiB per worker)
Shape = tuple[int, int, frozenset[int] | None, int, int]
# (popularity 0..1, whole GPUs, milli-GPU, models, CPU milli, memory MiB)
_Typical = tuple[float, int, int, frozenset[int] | None, int, int]

# (node class, whole GPUs, milli-GPU, CPU milli, memory MiB) of a move
_MoveKey = tuple[NodeClass, int, int, int, int]

_CACHE_LIMIT = 200_000
_SEEN_LIMIT = 1_000_000
_SMALL_GROUP = 256


@dataclass(slots=True)
class WorkloadMix:
    """The target workload, learned from the requests seen (each job counted once).

    ``coverage``: share of workers the typical shapes must cover (FGD uses 95 %; 1.0 keeps
    every shape: on FGD's held-out orders, seeds 42-51, that allocated 0.10 points more on
    ``gpushare40`` (10 of 10 seeds), 0.06 on ``default`` (8 of 10) and 0.02 less on
    ``multigpu50`` (4 of 10) than 95 %).
    ``refresh_growth``: the typical shapes are recomputed when the observed weight has
    grown by this fraction since the last computation (always while under 64 workers),
    so scores stay cached between refreshes. ``frozen``: set once the whole workload has
    been observed up front (as FGD derives its typical pods from the workload before the
    first placement); later requests then change nothing.
    """

    coverage: float = 1.0
    refresh_growth: float = 0.05
    version: int = 0
    frozen: bool = False  # the workload is known up front: requests add nothing
    gpu_weight: float = 0.0  # a whole-GPU shape counts 1 + GPUs x this (FGD's gpuResWeight)
    _counts: dict[Shape, int] = field(default_factory=dict)
    _seen: set[str] = field(default_factory=set)
    _total: int = 0
    _typical: tuple[_Typical, ...] = ()
    _typical_at: int = 0
    _scorer: FragmentationScorer | None = field(default=None, repr=False, compare=False)

    def scorer(self) -> FragmentationScorer:
        """The fragmentation scorer for this mix (one per mix: its caches follow it)."""
        if self._scorer is None:
            self._scorer = FragmentationScorer(self)
        return self._scorer

    def observe(self, job: str, shape: Shape, weight: int = 1) -> None:
        if self.frozen or job in self._seen or weight <= 0:
            return
        if len(self._seen) >= _SEEN_LIMIT:
            self._seen.clear()  # bounded memory; a job seen again later counts twice
        self._seen.add(job)
        self._counts[shape] = self._counts.get(shape, 0) + weight
        self._total += weight

    @property
    def observed_workers(self) -> int:
        return self._total

    def host_per_milli(self) -> tuple[float, float]:
        """CPU milli-cores and memory MiB that GPU work asks per milli-GPU, weighted by
        demand (0 where no shape asks for it)."""
        milli_total = cpu_total = memory_total = 0.0
        for (gpus, milli, _, cpu, memory), count in self._counts.items():
            taken = count * (gpus * MILLI_PER_GPU if milli >= MILLI_PER_GPU else milli)
            if taken <= 0:
                continue  # CPU-only work: no GPU for its CPU to go with
            milli_total += taken
            cpu_total += count * cpu
            memory_total += count * memory
        if not milli_total:
            return 0.0, 0.0
        return cpu_total / milli_total, memory_total / milli_total

    def restricted_demand(self) -> dict[tuple[frozenset[int] | None, int, int], float]:
        """Share of all GPU demand seen (whole GPUs x workers, a share counted as its
        fraction) per (allowed models, CPU milli, memory MiB per worker), for the shapes
        that name models or ask for CPU or memory (the ones some nodes may not host)."""
        total = 0.0
        out: dict[tuple[frozenset[int] | None, int, int], float] = {}
        for (gpus, milli, models, cpu, memory), count in self._counts.items():
            demand = count * (gpus if milli >= MILLI_PER_GPU else milli / MILLI_PER_GPU)
            total += demand
            if models is not None or cpu or memory:
                key = (models, cpu, memory)
                out[key] = out.get(key, 0.0) + demand
        return {key: d / total for key, d in out.items()} if total else {}

    def typical(self) -> tuple[_Typical, ...]:
        """Typical shapes with their popularity (summing to 1), most popular first."""
        total, last = self._total, self._typical_at
        if total != last and (last < 64 or total >= last * (1.0 + self.refresh_growth)):
            g = self.gpu_weight
            weighted = {shape: count * (1.0 + shape[0] * g)
                        if g > 0 and shape[1] >= MILLI_PER_GPU else float(count)
                        for shape, count in self._counts.items()}
            everything = sum(weighted.values())
            ranked = sorted(weighted.items(),
                            key=lambda kv: (-kv[1], kv[0][0], kv[0][1], _models_key(kv[0][2]),
                                            kv[0][3], kv[0][4]))
            kept: list[tuple[float, Shape]] = []
            covered = 0.0
            for shape, count in ranked:
                if covered >= self.coverage * everything:
                    break
                kept.append((count, shape))
                covered += count
            self._typical = tuple((count / covered, *s) for count, s in kept)
            self._typical_at = total
            self.version += 1
        return self._typical


def _models_key(models: frozenset[int] | None) -> tuple[int, ...]:
    return () if models is None else tuple(sorted(models))


def stranded_milli(free_milli: int, cpu_free: int, memory_free: int,
                   per_milli: tuple[float, float]) -> float:
    """Milli-GPU of ``free_milli`` that the node's free CPU and memory (-1: not tracked)
    cannot feed at the workload's ``per_milli`` CPU and memory per milli-GPU."""
    feeds = float(free_milli)
    cpu_rate, memory_rate = per_milli
    if cpu_free >= 0 and cpu_rate > 0:
        feeds = min(feeds, cpu_free / cpu_rate)
    if memory_free >= 0 and memory_rate > 0:
        feeds = min(feeds, memory_free / memory_rate)
    return free_milli - feeds


def fragment_milli(model: int, free: tuple[int, ...], typical: Iterable[_Typical],
                   cpu_free: int = -1, memory_free: int = -1) -> float:
    """F_n(M) of a node of GPU model ``model`` whose GPUs have ``free`` milli-GPU free
    (sorted high to low) and ``cpu_free``/``memory_free`` left (-1: not tracked), for the
    typical shapes ``typical``."""
    total = sum(free)
    if total == 0:
        return 0.0
    whole = free.count(MILLI_PER_GPU)
    partial = total - whole * MILLI_PER_GPU
    out = 0.0
    for p, gpus, milli, models, cpu, memory in typical:
        if gpus == 0 or (models is not None and model not in models) or cpu > cpu_free >= 0 \
                or memory > memory_free >= 0:
            out += p * total  # a CPU-only shape can use no GPU: all of it is fragment
        elif milli < MILLI_PER_GPU:
            out += p * sum(f for f in free if f < milli)
        else:
            out += p * (partial if whole >= gpus else total)
    return out


class FragmentationScorer:
    """Scores of placing a shape on a node class, cached per workload version."""

    __slots__ = ("_fragments", "_host", "_kinds", "_moves", "_scarcity", "_version", "mix",
                 "scarcity_weight", "stranding_weight")

    def __init__(self, mix: WorkloadMix | None = None, scarcity_weight: float = 1.0,
                 stranding_weight: float = 1.0) -> None:
        self.mix = mix if mix is not None else WorkloadMix()
        self.scarcity_weight = scarcity_weight
        self.stranding_weight = stranding_weight
        self._host = (0.0, 0.0)
        self._version = -1
        self._fragments: dict[NodeClass, float] = {}
        self._moves: dict[_MoveKey, tuple[float, int, int] | None] = {}
        self._kinds: tuple[tuple[int, int, int, int], ...] = ()
        self._scarcity: tuple[float, ...] = ()

    def bind(self, kinds: tuple[tuple[int, int, int, int], ...]) -> None:
        """The factory's node kinds (``Topology.kinds``), against which scarcity is judged."""
        if kinds is not self._kinds and kinds != self._kinds:
            self._kinds = kinds
            self._version = -1

    def scarcity(self) -> tuple[float, ...]:
        """S(k) per node kind (see the module docstring), for the current workload."""
        self._typical()
        return self._scarcity

    def _typical(self) -> tuple[_Typical, ...]:
        typical = self.mix.typical()
        if (self.mix.version != self._version or len(self._moves) > _CACHE_LIMIT
                or len(self._fragments) > _CACHE_LIMIT):
            self._version = self.mix.version
            self._fragments.clear()
            self._moves.clear()
            self._scarcity = self._scarcities()
            self._host = self.mix.host_per_milli() if self.stranding_weight else (0.0, 0.0)
        return typical

    def _scarcities(self) -> tuple[float, ...]:
        kinds = self._kinds
        total = sum(k[3] for k in kinds)
        out = [0.0] * len(kinds)
        if not total:
            return tuple(out)
        for (models, cpu, memory), demand in self.mix.restricted_demand().items():
            hosts = [i for i, (model, cpu_cap, memory_cap, _) in enumerate(kinds)
                     if (models is None or model in models) and cpu <= (cpu_cap or cpu)
                     and memory <= (memory_cap or memory)]
            if not hosts or len(hosts) == len(kinds):
                continue
            weight = self.scarcity_weight * demand / (sum(kinds[i][3] for i in hosts) / total)
            for i in hosts:
                out[i] += weight
        return tuple(out)

    def fragment(self, cls: NodeClass, typical: tuple[_Typical, ...] | None = None) -> float:
        if typical is None:
            typical = self._typical()
        got = self._fragments.get(cls)
        if got is None:
            got = fragment_milli(cls[0], cls[1], typical, cls[2], cls[3])
            self._fragments[cls] = got
        return got

    def move(self, cls: NodeClass, gpus: int, milli: int, cpu: int = 0, memory: int = 0
             ) -> tuple[float, int, int] | None:
        """Best way to put ``gpus`` whole GPUs (or one ``milli`` share), with ``cpu``
        milli-cores and ``memory`` MiB, on a node of class ``cls``: (score, free milli of
        the GPU a share goes to or 1000, whole free GPUs of the node); None when it does
        not fit."""
        typical = self._typical()
        key = (cls, gpus, milli, cpu, memory)
        if key in self._moves:
            return self._moves[key]
        return self._move(cls, gpus, milli, typical, cpu, memory)

    def moves(self) -> tuple[dict[_MoveKey, tuple[float, int, int] | None],
                             tuple[_Typical, ...]]:
        """The move cache and the typical shapes, synced to the workload (for hot loops)."""
        typical = self._typical()
        return self._moves, typical

    def _move(self, cls: NodeClass, gpus: int, milli: int, typical: tuple[_Typical, ...],
              cpu: int = 0, memory: int = 0) -> tuple[float, int, int] | None:
        key = (cls, gpus, milli, cpu, memory)
        model, free, cpu_free, memory_free, _ = cls
        if cpu > cpu_free >= 0 or memory > memory_free >= 0:
            self._moves[key] = None
            return None
        cpu_after = cpu_free - cpu if cpu_free >= 0 else -1
        memory_after = memory_free - memory if memory_free >= 0 else -1
        whole = free.count(MILLI_PER_GPU)
        best: tuple[float, int, int] | None = None
        kind = cls[4]
        scarce = self._scarcity[kind] if kind < len(self._scarcity) else 0.0
        taken = gpus * MILLI_PER_GPU if milli >= MILLI_PER_GPU else milli
        stranding = 0.0
        if self.stranding_weight and self._host != (0.0, 0.0):
            total = sum(free)
            stranding = self.stranding_weight * (
                stranded_milli(total - taken, cpu_after, memory_after, self._host)
                - stranded_milli(total, cpu_free, memory_free, self._host))
        if milli >= MILLI_PER_GPU:
            if whole >= gpus:
                after = free[gpus:] + (0,) * gpus
                score = 0.0 if not typical else (
                    fragment_milli(model, after, typical, cpu_after, memory_after)
                    - self.fragment(cls, typical))
                best = (round(score + stranding + scarce * taken, 6), MILLI_PER_GPU, whole)
        else:
            before = self.fragment(cls, typical) if typical else 0.0
            for v in sorted(set(free)):
                if v < milli:
                    continue
                i = free.index(v)
                after = tuple(sorted((*free[:i], v - milli, *free[i + 1:]), reverse=True))
                score = 0.0 if not typical else fragment_milli(
                    model, after, typical, cpu_after, memory_after) - before
                option = (round(score + stranding + scarce * milli, 6), v, whole)
                if best is None or option < best:
                    best = option
        self._moves[key] = best
        return best


def ranked_nodes(state: ClusterState, gpus: int, milli: int, models: frozenset[int] | None,
                 scorer: FragmentationScorer, cpu: int = 0, memory: int = 0
                 ) -> Iterator[tuple[int, int]]:
    """Nodes that can take ``gpus`` whole GPUs (or, when ``milli`` < 1000, one share of
    ``milli``) and ``cpu`` milli-cores and ``memory`` MiB, best first, each with the free
    milli of the GPU a share would go to."""
    options: list[tuple[tuple[float, int, int], NodeClass]] = []
    scorer.bind(state.topo.kinds)
    cache, typical = scorer.moves()
    missing = object()
    for cls in state.class_nodes:
        if models is not None and cls[0] not in models:
            continue
        move = cache.get((cls, gpus, milli, cpu, memory), missing)
        if move is missing:
            move = scorer._move(cls, gpus, milli, typical, cpu, memory)
        if move is not None:
            options.append((move, cls))  # type: ignore[arg-type]
    if not options:
        return
    best = min(key for key, _ in options)
    first = [cls for key, cls in options if key == best]
    for node in _nodes_in_order(state, first):
        yield node, best[1]
    rest = sorted((item for item in options if item[0] != best),
                  key=lambda item: (item[0], item[1]))
    i = 0
    while i < len(rest):
        key = rest[i][0]
        group = []
        while i < len(rest) and rest[i][0] == key:
            group.append(rest[i][1])
            i += 1
        for node in _nodes_in_order(state, group):
            yield node, key[1]


def _nodes_in_order(state: ClusterState, classes: list[NodeClass]) -> Iterator[int]:
    """Nodes of ``classes``, the one in the rack with fewest free GPUs first."""
    topo = state.topo
    rack_level = topo.node_level - 1
    members = [state.class_nodes[c] for c in classes]
    if rack_level < 0:
        yield from sorted(n for m in members for n in m)
        return
    owner = topo.node_domain[rack_level]
    free = state.free_at
    if sum(len(m) for m in members) <= _SMALL_GROUP:
        nodes = [n for m in members for n in m]
        nodes.sort(key=lambda n: (free(rack_level, owner[n]), owner[n], n))
        yield from nodes
        return
    # Large classes (e.g. every empty node): walk racks tightest first, stop when consumed.
    wanted = set(classes)
    node_class = state.node_class
    racks = topo.domains[rack_level]
    for d in sorted(range(len(racks)), key=lambda r: (free(rack_level, r), r)):
        dom = racks[d]
        for n in range(dom.node_start, dom.node_end):
            if node_class[n] in wanted:
                yield n
