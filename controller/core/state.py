"""Usage of a factory over its frozen topology: who holds which GPU, and how many watts.

``ClusterState`` is the per-cycle snapshot the scheduler works on: the static tree is shared,
the usage arrays are copied by ``clone()`` (a few hundred microseconds at 100,000 GPUs).
Free capacity of every domain at every level is kept incrementally as a histogram of node
free-GPU counts per GPU model, so "how many 4-GPU workers fit in rack r3" is O(GPUs per node),
independent of the rack's size; the plain free-GPU count of a domain is an O(1) counter.

Nodes are also grouped into *classes*: nodes of one GPU model whose GPUs have the same free
milli-GPU values, the same free CPU and memory and the same kind (``(model, sorted free
milli per GPU, free CPU milli, free memory MiB, kind)``, CPU and memory -1 where not
tracked; kind as in ``Topology.kinds``: model, CPU and memory capacity). Two nodes
of a class are interchangeable for work that fits on one node, so a fragmentation-aware
search (``controller.placement.fragmentation``) scores each class once instead of each node.

CPU and memory: a node whose inventory gives them (``NodeInfo.cpu_milli``/``memory_mib``)
hosts a worker only while its free CPU and memory cover the worker's request, as the
kube-scheduler's NodeResourcesFit does; a node that does not give them never runs out.
Domain capacity counts (histograms) stay GPU-only and are then upper bounds: the node-level
choices check CPU and memory exactly (``ClusterState.host_room``).

Power: every GPU in scope of a budget counts at its idle draw when unallocated and at the
owning job's estimate when allocated; allocation adds the difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from aifactory.controller.core.errors import InvariantError
from aifactory.controller.core.topology import Domain, NodeInfo, Topology
from aifactory.controller.core.units import MILLI_PER_GPU

__all__ = ["BudgetIndex", "ClusterState", "NodeClass", "Placement", "WorkerSlot"]


# A node class: (GPU model index, free milli-GPU of each GPU sorted high to low,
# free CPU milli-cores, free memory MiB (each -1 where the node does not track it),
# node kind (``Topology.kinds``)).
NodeClass = tuple[int, tuple[int, ...], int, int, int]

# Free CPU/memory of a node that does not track them: never the binding limit.
UNTRACKED = 1 << 62


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """One worker of a gang: its node, the global indices of its GPUs, the share of each,
    and the CPU (milli-cores) and memory (MiB) it holds on the node."""

    node: int
    gpus: tuple[int, ...]
    milli: int = MILLI_PER_GPU
    cpu_milli: int = 0
    memory_mib: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a gang runs. ``watts_per_gpu`` is the estimated draw above idle, per whole GPU."""

    job: str
    slots: tuple[WorkerSlot, ...]
    watts_per_gpu: float = 0.0
    complete: bool = True

    @property
    def nodes(self) -> tuple[int, ...]:
        return tuple(sorted({s.node for s in self.slots}))

    @property
    def gpu_count(self) -> int:
        return sum(len(s.gpus) for s in self.slots)

    @property
    def gpu_equivalents(self) -> float:
        return sum(len(s.gpus) * s.milli / MILLI_PER_GPU for s in self.slots)

    def domains_at(self, topo: Topology, level: int) -> tuple[int, ...]:
        """Distinct domain indices at ``level`` the gang touches (its span there)."""
        return tuple(sorted({topo.ancestor(s.node, level) for s in self.slots}))


@dataclass(frozen=True, slots=True)
class BudgetIndex:
    """Static side of power budgets: limits, which budgets cover each node and domain.

    ``covering[l][d]`` lists the budgets that contain every node of domain ``d`` at level
    ``l`` (so a domain-level check is exact for them); ``node_budgets[n]`` every budget that
    contains node ``n``.
    """

    names: tuple[str, ...]
    limits: tuple[float, ...]
    node_budgets: tuple[tuple[int, ...], ...]
    covering: tuple[tuple[tuple[int, ...], ...], ...]
    root_covering: tuple[int, ...]
    baseline_watts: tuple[float, ...]

    @staticmethod
    def build(topo: Topology, budgets: Sequence[tuple[str, float, Mapping[str, str]]],
              idle_watts_per_gpu: Sequence[float], base_watts_per_node: float = 0.0
              ) -> BudgetIndex:
        """``budgets`` are (name, watts, selector); ``idle_watts_per_gpu`` per model index."""
        node_budgets: list[list[int]] = [[] for _ in topo.nodes]
        baseline: list[float] = []
        for b, (_, _, selector) in enumerate(budgets):
            watts = 0.0
            for n, node in enumerate(topo.nodes):
                if all(node.label(k) == v for k, v in selector.items()):
                    node_budgets[n].append(b)
                    watts += base_watts_per_node + node.gpus * idle_watts_per_gpu[
                        topo.node_model[n]]
            baseline.append(watts)
        covering: list[tuple[tuple[int, ...], ...]] = []
        for level_domains in topo.domains:
            per_level: list[tuple[int, ...]] = []
            for dom in level_domains:
                common = set(node_budgets[dom.node_start]) if dom.node_end > dom.node_start \
                    else set()
                for n in range(dom.node_start + 1, dom.node_end):
                    common &= set(node_budgets[n])
                    if not common:
                        break
                per_level.append(tuple(sorted(common)))
            covering.append(tuple(per_level))
        root = set(range(len(budgets)))
        for nb in node_budgets:
            root &= set(nb)
        return BudgetIndex(
            names=tuple(name for name, _, _ in budgets),
            limits=tuple(float(w) for _, w, _ in budgets),
            node_budgets=tuple(tuple(nb) for nb in node_budgets),
            covering=tuple(covering),
            root_covering=tuple(sorted(root)) if topo.nodes else (),
            baseline_watts=tuple(baseline),
        )

    @staticmethod
    def empty(topo: Topology) -> BudgetIndex:
        return BudgetIndex((), (), tuple(() for _ in topo.nodes),
                           tuple(tuple(() for _ in lvl) for lvl in topo.domains), (), ())

    def covering_of(self, dom: Domain) -> tuple[int, ...]:
        return self.root_covering if dom.level < 0 else self.covering[dom.level][dom.index]


class ClusterState:
    """Mutable usage over a Topology. Cheap to ``clone()`` for a scheduling cycle."""

    __slots__ = ("_classes_owned", "_free", "_hist", "_node_level", "allocations",
                 "budget_watts", "budgets", "class_nodes", "cpu_free", "gpu_used_milli",
                 "host_tracked", "memory_free", "node_class", "node_free", "partial_by_free",
                 "topo", "used_milli_total", "width")

    def __init__(self, topo: Topology, budgets: BudgetIndex | None = None) -> None:
        self.topo = topo
        self.budgets = budgets or BudgetIndex.empty(topo)
        self.width = topo.max_node_gpus + 1
        self.gpu_used_milli: list[int] = [0] * topo.total_gpus
        self.used_milli_total = 0
        self.node_free: list[int] = [n.gpus for n in topo.nodes]
        # Free CPU milli-cores and memory MiB per node (UNTRACKED where not given).
        self.cpu_free: list[int] = [n.cpu_milli or UNTRACKED for n in topo.nodes]
        self.memory_free: list[int] = [n.memory_mib or UNTRACKED for n in topo.nodes]
        self.host_tracked = any(n.cpu_milli or n.memory_mib for n in topo.nodes)
        # GPUs shared by fractional jobs, bucketed by their free milli-GPU.
        self.partial_by_free: dict[int, set[int]] = {}
        self.allocations: dict[str, Placement] = {}
        self.budget_watts: list[float] = list(self.budgets.baseline_watts)
        # _hist[l][d][model * width + free] = nodes of that model with that many free GPUs,
        # for l in 0..node_level-1; index node_level holds the root's single histogram.
        size = len(topo.models) * self.width
        hist: list[list[list[int]]] = []
        for lvl in range(topo.node_level):
            hist.append([[0] * size for _ in topo.domains[lvl]])
        hist.append([[0] * size])
        self._hist = hist
        self._node_level = topo.node_level
        # _free[l][d]: whole free GPUs of domain d at level l (all models); [node_level][0]
        # is the root's.
        self._free: list[list[int]] = [[0] * len(topo.domains[lvl])
                                       for lvl in range(topo.node_level)] + [[0]]
        for n, node in enumerate(topo.nodes):
            self._bump(n, -1, node.gpus)
        self.node_class: list[NodeClass] = []
        self.class_nodes: dict[NodeClass, set[int]] = {}
        for n, node in enumerate(topo.nodes):
            key = (topo.node_model[n], (MILLI_PER_GPU,) * node.gpus, node.cpu_milli or -1,
                   node.memory_mib or -1, topo.node_kind[n])
            self.node_class.append(key)
            self.class_nodes.setdefault(key, set()).add(n)
        self._classes_owned = True

    # ----------------------------------------------------------------- snapshots

    def clone(self) -> ClusterState:
        twin = ClusterState.__new__(ClusterState)
        twin.topo = self.topo
        twin.budgets = self.budgets
        twin.width = self.width
        twin.gpu_used_milli = self.gpu_used_milli.copy()
        twin.used_milli_total = self.used_milli_total
        twin.node_free = self.node_free.copy()
        twin.cpu_free = self.cpu_free.copy()
        twin.memory_free = self.memory_free.copy()
        twin.host_tracked = self.host_tracked
        twin.partial_by_free = {k: set(v) for k, v in self.partial_by_free.items()}
        twin.allocations = dict(self.allocations)
        twin.budget_watts = self.budget_watts.copy()
        twin._hist = [[h.copy() for h in lvl] for lvl in self._hist]
        twin._node_level = self._node_level
        twin._free = [f.copy() for f in self._free]
        # Node classes are shared copy-on-write: most clones never change them.
        twin.node_class = self.node_class
        twin.class_nodes = self.class_nodes
        twin._classes_owned = self._classes_owned = False
        return twin

    # ----------------------------------------------------------------- capacity queries

    def _hist_of(self, dom: Domain) -> list[int]:
        if dom.level < 0:
            return self._hist[self._node_level][0]
        return self._hist[dom.level][dom.index]

    def free_gpus(self, dom: Domain, models: frozenset[int] | None = None) -> int:
        """Whole free GPUs in a domain, of the given model indices (all when None)."""
        if dom.level == self._node_level:
            n = dom.node_start
            ok = models is None or self.topo.node_model[n] in models
            return self.node_free[n] if ok else 0
        if models is None or len(models) == len(self.topo.models):
            return self._free[self._node_level][0] if dom.level < 0 \
                else self._free[dom.level][dom.index]
        hist = self._hist_of(dom)
        width = self.width
        total = 0
        for m in range(len(self.topo.models)) if models is None else models:
            base = m * width
            for free in range(1, width):
                total += hist[base + free] * free
        return total

    def free_at(self, level: int, index: int) -> int:
        """Whole free GPUs of domain ``index`` at ``level`` (< node level), any model: O(1)."""
        return self._free[level][index]

    def worker_capacity(self, dom: Domain, gpus_per_worker: int,
                        models: frozenset[int] | None = None) -> int:
        """How many workers of ``gpus_per_worker`` whole GPUs fit in the domain right now
        (``UNTRACKED``, i.e. no GPU limit, for zero-GPU workers: their CPU and memory
        bind, see ``host_room``)."""
        if gpus_per_worker <= 0:
            return UNTRACKED
        if dom.level == self._node_level:
            n = dom.node_start
            if models is not None and self.topo.node_model[n] not in models:
                return 0
            return self.node_free[n] // gpus_per_worker
        hist = self._hist_of(dom)
        width = self.width
        total = 0
        for m in range(len(self.topo.models)) if models is None else models:
            base = m * width
            for free in range(gpus_per_worker, width):
                count = hist[base + free]
                if count:
                    total += count * (free // gpus_per_worker)
        return total

    def has_node_with_free(self, dom: Domain, at_least: int,
                           models: frozenset[int] | None = None) -> int | None:
        """Smallest free count >= ``at_least`` of any node in the domain, or None."""
        if dom.level == self._node_level:
            n = dom.node_start
            ok = models is None or self.topo.node_model[n] in models
            return self.node_free[n] if ok and self.node_free[n] >= at_least else None
        hist = self._hist_of(dom)
        width = self.width
        best: int | None = None
        for m in range(len(self.topo.models)) if models is None else models:
            base = m * width
            for free in range(at_least, width if best is None else best):
                if hist[base + free]:
                    best = free
                    break
        return best

    def largest_node_free(self, dom: Domain, models: frozenset[int] | None = None) -> int:
        """Most whole free GPUs on any one node of the domain (of the given models)."""
        if dom.level == self._node_level:
            n = dom.node_start
            ok = models is None or self.topo.node_model[n] in models
            return self.node_free[n] if ok else 0
        hist = self._hist_of(dom)
        width = self.width
        best = 0
        for m in range(len(self.topo.models)) if models is None else models:
            base = m * width
            for free in range(width - 1, best, -1):
                if hist[base + free]:
                    best = free
                    break
        return best

    def node_count_with_free(self, dom: Domain, free: int,
                             models: frozenset[int] | None = None) -> int:
        if dom.level == self._node_level:
            n = dom.node_start
            ok = models is None or self.topo.node_model[n] in models
            return 1 if ok and self.node_free[n] == free else 0
        hist = self._hist_of(dom)
        return sum(hist[m * self.width + free]
                   for m in (range(len(self.topo.models)) if models is None else models))

    def gpu_free_milli(self, gpu: int) -> int:
        return MILLI_PER_GPU - self.gpu_used_milli[gpu]

    def host_room(self, node: int, cpu_milli: int, memory_mib: int) -> int:
        """How many workers asking ``cpu_milli`` and ``memory_mib`` each the node's free CPU
        and memory hold (a large number when they ask for none or it does not track them)."""
        room = UNTRACKED
        if cpu_milli > 0:
            room = self.cpu_free[node] // cpu_milli
        if memory_mib > 0:
            room = min(room, self.memory_free[node] // memory_mib)
        return room

    def power_headroom(self, budget: int) -> float:
        return self.budgets.limits[budget] - self.budget_watts[budget]

    def domain_power_headroom(self, dom: Domain) -> float:
        """Smallest headroom in watts among budgets covering the whole domain (inf if none)."""
        covering = self.budgets.covering_of(dom)
        if not covering:
            return float("inf")
        return min(self.budgets.limits[b] - self.budget_watts[b] for b in covering)

    @property
    def allocated_gpu_equivalents(self) -> float:
        return self.used_milli_total / MILLI_PER_GPU

    @property
    def free_whole_gpus(self) -> int:
        return sum(self.node_free)

    # ----------------------------------------------------------------- mutation

    def _bump(self, node: int, old_free: int, new_free: int) -> None:
        topo = self.topo
        base = topo.node_model[node] * self.width
        hist = self._hist
        node_level = self._node_level
        root = hist[node_level][0]
        gained = new_free - max(old_free, 0)
        if old_free >= 0:
            root[base + old_free] -= 1
        root[base + new_free] += 1
        self._free[node_level][0] += gained
        for lvl in range(node_level):
            d = topo.node_domain[lvl][node]
            h = hist[lvl][d]
            if old_free >= 0:
                h[base + old_free] -= 1
            h[base + new_free] += 1
            self._free[lvl][d] += gained

    def _recount_node(self, node: int) -> None:
        span = self.topo.gpu_range(node)
        used = self.gpu_used_milli[span.start:span.stop]
        free = used.count(0)
        old = self.node_free[node]
        if free != old:
            self.node_free[node] = free
            self._bump(node, old, free)
        cpu, memory = self.cpu_free[node], self.memory_free[node]
        key = (self.topo.node_model[node], tuple(sorted((MILLI_PER_GPU - u for u in used),
                                                        reverse=True)),
               cpu if cpu < UNTRACKED >> 1 else -1, memory if memory < UNTRACKED >> 1 else -1,
               self.topo.node_kind[node])
        old_key = self.node_class[node]
        if key != old_key:
            if not self._classes_owned:
                self.node_class = self.node_class.copy()
                self.class_nodes = {k: v.copy() for k, v in self.class_nodes.items()}
                self._classes_owned = True
            members = self.class_nodes[old_key]
            members.discard(node)
            if not members:
                del self.class_nodes[old_key]
            self.class_nodes.setdefault(key, set()).add(node)
            self.node_class[node] = key

    def allocate(self, placement: Placement) -> None:
        """Take the GPUs of a placement. Raises InvariantError if any is already taken."""
        if placement.job in self.allocations:
            raise InvariantError(f"job {placement.job} is already allocated")
        touched: set[int] = set()
        host: dict[int, tuple[int, int]] = {}
        for slot in placement.slots:
            for g in slot.gpus:
                used = self.gpu_used_milli[g] + slot.milli
                if used > MILLI_PER_GPU:
                    raise InvariantError(
                        f"GPU {g} on {self.topo.nodes[slot.node].name} would be "
                        f"{used}/{MILLI_PER_GPU} used by {placement.job}")
            touched.add(slot.node)
            if slot.cpu_milli or slot.memory_mib:
                cpu, memory = host.get(slot.node, (0, 0))
                host[slot.node] = (cpu + slot.cpu_milli, memory + slot.memory_mib)
        for n, (cpu, memory) in host.items():
            if cpu > self.cpu_free[n] or memory > self.memory_free[n]:
                raise InvariantError(
                    f"{placement.job} asks {cpu}m CPU and {memory} MiB on "
                    f"{self.topo.nodes[n].name}, which has {self.cpu_free[n]}m and "
                    f"{self.memory_free[n]} MiB free")
        for n, (cpu, memory) in host.items():
            self.cpu_free[n] -= cpu
            self.memory_free[n] -= memory
        for slot in placement.slots:
            for g in slot.gpus:
                self._set_used(g, self.gpu_used_milli[g] + slot.milli)
            self._add_watts(slot, placement.watts_per_gpu)
        for n in touched:
            self._recount_node(n)
        self.allocations[placement.job] = placement

    def release(self, job: str) -> Placement | None:
        """Give back a job's GPUs; returns its placement, or None if it held none."""
        placement = self.allocations.pop(job, None)
        if placement is None:
            return None
        touched: set[int] = set()
        for slot in placement.slots:
            for g in slot.gpus:
                if self.gpu_used_milli[g] < slot.milli:
                    raise InvariantError(f"GPU {g} usage fell below zero releasing {job}")
                self._set_used(g, self.gpu_used_milli[g] - slot.milli)
            self._add_watts(slot, -placement.watts_per_gpu)
            self.cpu_free[slot.node] += slot.cpu_milli
            self.memory_free[slot.node] += slot.memory_mib
            touched.add(slot.node)
        for n in touched:
            self._recount_node(n)
        return placement

    def _set_used(self, gpu: int, used: int) -> None:
        old = self.gpu_used_milli[gpu]
        if 0 < old < MILLI_PER_GPU:
            bucket = self.partial_by_free[MILLI_PER_GPU - old]
            bucket.discard(gpu)
            if not bucket:
                del self.partial_by_free[MILLI_PER_GPU - old]
        self.gpu_used_milli[gpu] = used
        self.used_milli_total += used - old
        if 0 < used < MILLI_PER_GPU:
            self.partial_by_free.setdefault(MILLI_PER_GPU - used, set()).add(gpu)

    def _add_watts(self, slot: WorkerSlot, watts_per_gpu: float) -> None:
        if not self.budgets.names:
            return
        delta = watts_per_gpu * len(slot.gpus) * slot.milli / MILLI_PER_GPU
        for b in self.budgets.node_budgets[slot.node]:
            self.budget_watts[b] += delta

    # ----------------------------------------------------------------- helpers

    def free_gpu_indices(self, node: int, count: int) -> tuple[int, ...]:
        """The first ``count`` wholly free GPUs of a node (lowest index first)."""
        if count <= 0:
            return ()
        out: list[int] = []
        for g in self.topo.gpu_range(node):
            if self.gpu_used_milli[g] == 0:
                out.append(g)
                if len(out) == count:
                    return tuple(out)
        raise InvariantError(f"node {self.topo.nodes[node].name} has fewer than {count} "
                             "free GPUs")

    def owners_by_gpu(self) -> dict[int, list[str]]:
        """GPU index -> jobs holding (a share of) it."""
        owners: dict[int, list[str]] = {}
        for job, placement in self.allocations.items():
            for slot in placement.slots:
                for g in slot.gpus:
                    owners.setdefault(g, []).append(job)
        return owners

    def check_consistency(self) -> None:
        """Recompute every derived count from the allocations; raise if anything drifted."""
        used = [0] * self.topo.total_gpus
        for placement in self.allocations.values():
            for slot in placement.slots:
                for g in slot.gpus:
                    used[g] += slot.milli
        if used != self.gpu_used_milli:
            raise InvariantError("per-GPU usage does not match the allocations")
        if any(u > MILLI_PER_GPU for u in used):
            raise InvariantError("a GPU is used more than once")
        fresh = ClusterState(self.topo, self.budgets)
        for placement in self.allocations.values():
            fresh.allocate(placement)
        if fresh.node_free != self.node_free or fresh._hist != self._hist \
                or fresh._free != self._free or fresh.cpu_free != self.cpu_free \
                or fresh.memory_free != self.memory_free:
            raise InvariantError("free-capacity counts drifted from the allocations")
        if fresh.node_class != self.node_class or fresh.class_nodes != self.class_nodes:
            raise InvariantError("node classes drifted from the allocations")
        for a, b in zip(fresh.budget_watts, self.budget_watts, strict=True):
            if abs(a - b) > 1e-6 * max(1.0, abs(a)):
                raise InvariantError("power estimates drifted from the allocations")


def nodes_of(topo: Topology, names: Iterable[str]) -> list[NodeInfo]:
    return [topo.nodes[topo.node_index[n]] for n in names]
