"""Topology-aware gang placement: where one gang goes, or why it cannot go anywhere now.

The rule (our policy, ``topology``): place the gang inside one domain at the lowest level
possible, choosing the tightest such domain (BestFit, fewest free GPUs, ties broken by domain
id); a required level is never crossed, and a gang crosses a preferred level only when nothing
fits below it. Inside the chosen domain, a split across children first takes the children with
most room (fewest domains spanned) and gives the remainder to the tightest child that holds it,
as Kueue's TAS BestFit does; at node level the tightest nodes go first, so whole free nodes and
racks stay whole for big gangs. Fractional requests pack onto already shared GPUs first.

Everything here is pure: it reads a ``ClusterState`` and returns a ``Placement`` or an
``Unplaced`` with a reason a person can act on. Nothing is mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from controller.fragmentation import FragmentationScorer, ranked_nodes
from controller.spec import JobSpec
from controller.state import MILLI, ClusterState, Placement, WorkerSlot
from controller.topology import NODE_LEVEL, Domain, Topology

__all__ = [
    "PlacementRequest",
    "Unplaced",
    "explain_unplaced",
    "host_capacity",
    "materialize",
    "place_topology_aware",
    "static_check",
]


@dataclass(frozen=True, slots=True)
class Unplaced:
    """A gang that cannot be placed now (or ever, when ``permanent``), and why."""

    reason: str
    permanent: bool = False
    power_limited: bool = False


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    """A JobSpec resolved against one topology: level and model names turned into indices."""

    job: str
    workers: int
    gpus_per_worker: int
    milli: int
    models: frozenset[int] | None
    model_names: tuple[str, ...]
    required_level: int | None
    preferred_level: int | None
    spread_level: int | None
    watts_per_gpu: float
    avoid_nodes: frozenset[int] = frozenset()
    spread_cap: int = 1
    cpu_milli: int = 0  # per worker; 0 asks for none
    memory_mib: int = 0

    @property
    def host(self) -> bool:
        """Does each worker ask for CPU or memory as well as GPUs?"""
        return self.cpu_milli > 0 or self.memory_mib > 0

    def host_text(self) -> str:
        parts = ([f"{self.cpu_milli}m CPU"] if self.cpu_milli else []) + (
            [f"{self.memory_mib} MiB memory"] if self.memory_mib else [])
        return " and ".join(parts)

    @property
    def total_gpus(self) -> int:
        return self.workers * self.gpus_per_worker

    @property
    def fractional(self) -> bool:
        return self.milli < MILLI

    def describe(self) -> str:
        """``gang of 96 GPUs`` / ``1 GPU worker`` / ``0.46-GPU share``, for reasons."""
        if self.fractional:
            return f"{self.milli / MILLI:.2f}-GPU share"
        if self.workers == 1:
            return f"{self.gpus_per_worker}-GPU worker"
        return f"gang of {self.total_gpus} GPUs ({self.workers} x {self.gpus_per_worker})"

    @staticmethod
    def resolve(spec: JobSpec, topo: Topology, watts_per_gpu: float = 0.0,
                avoid_nodes: frozenset[int] = frozenset()) -> PlacementRequest | Unplaced:
        """Resolve names; unknown levels or models give a permanent Unplaced with the fix."""
        levels = topo.level_names

        def level(name: str | None, field: str) -> int | Unplaced | None:
            if name is None:
                return None
            if name not in levels:
                return Unplaced(f"{field}: unknown topology level {name!r}; valid levels are "
                                f"{', '.join(levels)}", permanent=True)
            return levels.index(name)

        required = level(spec.required_level, "spec.topology.required")
        preferred = level(spec.preferred_level, "spec.topology.preferred")
        spread = level(spec.spread_level, "spec.topology.spreadAcross") \
            if spec.spread_level in levels or spec.spread_level is None else None
        for value in (required, preferred, spread):
            if isinstance(value, Unplaced):
                return value
        assert not isinstance(required, Unplaced) and not isinstance(preferred, Unplaced)
        assert not isinstance(spread, Unplaced)
        if required is not None and preferred is not None and preferred < required:
            return Unplaced(f"spec.topology.preferred: level {spec.preferred_level!r} is above "
                            f"the required level {spec.required_level!r}; prefer a level at or "
                            "below the required one", permanent=True)
        models: frozenset[int] | None = None
        if spec.gpu_models:
            known = {m: i for i, m in enumerate(topo.models)}
            models = frozenset(known[m] for m in spec.gpu_models if m in known)
            if not models:
                return Unplaced(f"spec.gpuModel: no {'|'.join(spec.gpu_models)} nodes in the "
                                f"factory; models present: {', '.join(topo.models)}",
                                permanent=True)
        if spread is not None and required is not None and spread <= required:
            spread = None
        return PlacementRequest(
            job=spec.key, workers=spec.workers, gpus_per_worker=spec.gpus_per_worker,
            milli=spec.gpu_milli, models=models, model_names=spec.gpu_models,
            required_level=required, preferred_level=preferred, spread_level=spread,
            watts_per_gpu=watts_per_gpu, avoid_nodes=avoid_nodes,
            spread_cap=-(-spec.group_size // max(1, min(spec.spread_min_domains,
                                                         spec.group_size))),
            cpu_milli=spec.cpu_milli, memory_mib=spec.memory_mib)


# --------------------------------------------------------------------------- helpers


def materialize(state: ClusterState, req: PlacementRequest,
                workers_per_node: Sequence[tuple[int, int]]) -> Placement:
    """Turn ``(node, workers)`` pairs into a Placement with concrete GPU indices."""
    slots: list[WorkerSlot] = []
    g = req.gpus_per_worker
    for node, count in workers_per_node:
        gpus = state.free_gpu_indices(node, count * g)
        for w in range(count):
            slots.append(WorkerSlot(node, gpus[w * g:(w + 1) * g], MILLI, req.cpu_milli,
                                    req.memory_mib))
    return Placement(req.job, tuple(slots), req.watts_per_gpu)


def share_slot(req: PlacementRequest, node: int, gpu: int) -> WorkerSlot:
    """The one slot of a fractional request: ``req.milli`` of ``gpu`` on ``node``."""
    return WorkerSlot(node, (gpu,), req.milli, req.cpu_milli, req.memory_mib)


def node_workers(state: ClusterState, req: PlacementRequest, node: int) -> int:
    """Workers of ``req`` the node holds now, on GPUs, CPU and memory (model not checked)."""
    if req.fractional:
        cls = state.node_class[node][1]
        room = 1 if cls and cls[0] >= req.milli else 0
    else:
        room = state.node_free[node] // req.gpus_per_worker
    return min(room, state.host_room(node, req.cpu_milli, req.memory_mib)) if req.host \
        else room


def host_capacity(state: ClusterState, req: PlacementRequest, dom: Domain) -> int:
    """Workers of ``req`` the domain holds now, CPU and memory included: O(nodes)."""
    models = req.models
    node_model = state.topo.node_model
    return sum(node_workers(state, req, n) for n in range(dom.node_start, dom.node_end)
               if models is None or node_model[n] in models)


def node_power_ok(state: ClusterState, node: int, watts: float,
                  pending: dict[int, float]) -> bool:
    """Would adding ``watts`` on ``node`` keep every budget covering it within its limit?"""
    for b in state.budgets.node_budgets[node]:
        if state.budget_watts[b] + pending.get(b, 0.0) + watts > state.budgets.limits[b] + 1e-6:
            return False
    return True


def add_pending(state: ClusterState, node: int, watts: float, pending: dict[int, float]) -> None:
    for b in state.budgets.node_budgets[node]:
        pending[b] = pending.get(b, 0.0) + watts


def _level_name(topo: Topology, level: int) -> str:
    return "factory" if level < 0 else topo.levels[level].name


def static_check(empty: ClusterState, req: PlacementRequest) -> Unplaced | None:
    """Reasons a gang can never fit this factory, judged on the empty factory."""
    topo = empty.topo
    what = req.describe()
    model_txt = f"{'|'.join(req.model_names)} " if req.model_names else ""
    if req.fractional:
        if empty.free_gpus(topo.root, req.models) == 0:
            return Unplaced(f"{what} fits nowhere: the factory has no {model_txt}GPUs",
                            permanent=True)
        if req.host and host_capacity(empty, req, topo.root) == 0:
            return _host_never(empty, req, model_txt)
        return None
    largest = empty.largest_node_free(topo.root, req.models)
    if req.gpus_per_worker > largest:
        return Unplaced(f"worker of {req.gpus_per_worker} GPUs fits no node: the largest "
                        f"{model_txt}node has {largest} GPUs", permanent=True)
    total = empty.free_gpus(topo.root, req.models)
    if empty.worker_capacity(topo.root, req.gpus_per_worker, req.models) < req.workers:
        return Unplaced(f"{what} exceeds the factory: {total} {model_txt}GPUs in total",
                        permanent=True)
    if req.host and host_capacity(empty, req, topo.root) < req.workers:
        return _host_never(empty, req, model_txt)
    if req.required_level is not None:
        doms = topo.domains[req.required_level]
        best = max(doms, key=lambda d: empty.free_gpus(d, req.models))
        if max(empty.worker_capacity(d, req.gpus_per_worker, req.models) for d in doms) \
                < req.workers:
            name = _level_name(topo, req.required_level)
            return Unplaced(f"{name}-required {what} fits no {name}: the largest {name} has "
                            f"{empty.free_gpus(best, req.models)} {model_txt}GPUs",
                            permanent=True)
    return None


def _host_never(empty: ClusterState, req: PlacementRequest, model_txt: str) -> Unplaced:
    g = 1 if req.fractional else req.gpus_per_worker
    nodes = [n for n in range(len(empty.topo.nodes)) if empty.node_free[n] >= g
             and (req.models is None or empty.topo.node_model[n] in req.models)]
    cpu = max((empty.cpu_free[n] for n in nodes), default=0)
    memory = max((empty.memory_free[n] for n in nodes), default=0)
    have = ", ".join(
        ([f"{cpu}m CPU"] if req.cpu_milli else []) + ([f"{memory} MiB"] if req.memory_mib
                                                       else []))
    return Unplaced(f"{req.describe()} asking {req.host_text()} per worker fits no "
                    f"{model_txt}node with {g} GPUs: the most such a node has is {have}",
                    permanent=True)


def _host_reason(state: ClusterState, req: PlacementRequest, dom: Domain,
                 model_txt: str) -> Unplaced | None:
    """GPUs have room for the gang in ``dom`` but CPU or memory does not, if so."""
    if not req.host:
        return None
    room = host_capacity(state, req, dom)
    if room >= req.workers:
        return None
    return Unplaced(f"{req.describe()} waits: {model_txt}GPUs are free but CPU or memory is "
                    f"not; the nodes hold only {room} workers asking {req.host_text()} each")


def explain_unplaced(state: ClusterState, req: PlacementRequest) -> Unplaced:
    """Why the gang does not fit right now, in words a person can act on."""
    topo = state.topo
    what = req.describe()
    model_txt = f"{'|'.join(req.model_names)} " if req.model_names else ""
    if req.fractional:
        if state.partial_by_free or state.free_gpus(topo.root, req.models):
            host = _host_reason(state, req, topo.root, model_txt)
            if host is not None:
                return host
        return Unplaced(f"{what} waits: no {model_txt}GPU has {req.milli} milli-GPU free")
    need_watts = req.total_gpus * req.watts_per_gpu
    g = req.gpus_per_worker
    if req.required_level is not None:
        name = _level_name(topo, req.required_level)
        doms = topo.domains[req.required_level]
        best = max(doms, key=lambda d: (state.worker_capacity(d, g, req.models),
                                        state.free_gpus(d, req.models)))
        free = state.free_gpus(best, req.models)
        cap = state.worker_capacity(best, g, req.models)
        if cap >= req.workers:
            return _host_reason(state, req, best, model_txt) or _power_reason(
                state, best, need_watts, what)
        text = (f"{name}-required {what} fits no {name}: largest free {name} has {free} free "
                f"{model_txt}GPUs")
        if free >= req.total_gpus:
            text += f" but room for only {cap} workers of {g} GPUs"
        return Unplaced(text)
    free = state.free_gpus(topo.root, req.models)
    cap = state.worker_capacity(topo.root, g, req.models)
    if cap >= req.workers:
        return _host_reason(state, req, topo.root, model_txt) or _power_reason(
            state, topo.root, need_watts, what)
    if free >= req.total_gpus:
        return Unplaced(f"{what} waits: {free} {model_txt}GPUs are free but fragmented; "
                        f"room for only {cap} workers of {g} GPUs")
    return Unplaced(f"{what} waits: {free} of {state.free_gpus(topo.root, None)} free GPUs "
                    f"are {model_txt}GPUs; needs {req.total_gpus}" if req.model_names else
                    f"{what} waits: {free} GPUs free in the factory, needs {req.total_gpus}")


def _power_reason(state: ClusterState, dom: Domain, need: float, what: str) -> Unplaced:
    budgets = state.budgets
    worst = None
    for b in range(len(budgets.names)):
        head = state.power_headroom(b)
        if worst is None or head < worst[0]:
            worst = (head, b)
    if worst is None:
        return Unplaced(f"{what} waits: capacity exists but no placement satisfied the "
                        "constraints")
    head, b = worst
    return Unplaced(f"{what} waits on power: budget {budgets.names[b]} "
                    f"({budgets.limits[b]:.0f} W) has {max(head, 0.0):.0f} W headroom; the "
                    f"gang needs {need:.0f} W more", power_limited=True)


# --------------------------------------------------------------------------- our policy


def place_topology_aware(state: ClusterState, req: PlacementRequest,
                         group_count: Callable[[Domain], int] | None = None,
                         scorer: FragmentationScorer | None = None) -> Placement | Unplaced:
    """Our placement: lowest level, tightest domain, whole nodes and racks kept whole.

    Work that fits on one node goes to the node where it adds least fragmentation for the
    workload ``scorer`` has seen (``controller.fragmentation``; without a scorer every
    node scores the same), ties to the tightest GPU, node and rack.
    ``group_count`` (for inference replicas) counts the replicas of the same service in a
    domain at ``req.spread_level``; the least-loaded domain there is chosen first.
    """
    topo = state.topo
    spreading = req.spread_level is not None and group_count is not None
    one_node_tried = False
    if not spreading and (req.fractional or req.total_gpus <= topo.max_node_gpus):
        single = _place_on_one_node(state, req, scorer or _NEUTRAL)
        if single is not None:
            return single
        if req.fractional or req.workers == 1:
            return explain_unplaced(state, req)
        one_node_tried = True
    if req.fractional:
        return _place_fraction(state, req, group_count)
    w, g = req.workers, req.gpus_per_worker
    need_watts = w * g * req.watts_per_gpu

    def fits(dom: Domain) -> bool:
        return (state.worker_capacity(dom, g, req.models) >= w
                and state.domain_power_headroom(dom) + 1e-6 >= need_watts)

    top = req.required_level if req.required_level is not None else -1
    frontier = [topo.root] if top < 0 else [d for d in topo.domains[top] if fits(d)]
    frontier = [d for d in frontier if fits(d)]
    level = top
    if req.spread_level is not None and group_count is not None:
        spread = req.spread_level
        while level < spread and frontier:
            frontier = [c for d in frontier for c in topo.children_of(d) if fits(c)]
            level += 1
        if frontier:
            # Spread for availability, but pack within the bound so other domains stay
            # whole: any domain under the per-domain cap qualifies; failing that, the least
            # loaded ones.
            under = [d for d in frontier if group_count(d) < req.spread_cap]
            if under:
                frontier = under
            else:
                low = min(group_count(d) for d in frontier)
                frontier = [d for d in frontier if group_count(d) == low]
    if not frontier:
        return explain_unplaced(state, req)
    node_level = topo.node_level
    while level + 1 < node_level:
        deeper = [c for d in frontier for c in topo.children_of(d) if fits(c)]
        if not deeper:
            break
        frontier = deeper
        level += 1
    if level + 1 == node_level and w * g <= topo.max_node_gpus and not one_node_tried:
        single = _single_node(state, req, frontier)
        if single is not None:
            return single
    def tightest(d: Domain) -> tuple[int, tuple[str, ...]]:
        return state.free_gpus(d, req.models), d.id

    # GPU counts are exact, so the tightest domain that fits is the one. With CPU and
    # memory asked too they are upper bounds: the next tightest is tried after it, then
    # their parents, up to the required level (or the root).
    ordered = sorted(frontier, key=tightest) if req.host else [min(frontier, key=tightest)]
    while True:
        for chosen in ordered:
            pending: dict[int, float] = {}
            assignment = _assign(state, req, chosen, w, pending)
            if assignment is not None:
                return materialize(state, req, assignment)
        if not req.host or ordered[0].level <= top:
            return explain_unplaced(state, req)
        parents = {d.parent: topo.domains[d.level - 1][d.parent] if d.level > 0 else topo.root
                   for d in ordered}
        ordered = sorted(parents.values(), key=tightest)


_NEUTRAL = FragmentationScorer()  # an empty workload: every node scores 0


def _place_on_one_node(state: ClusterState, req: PlacementRequest,
                       scorer: FragmentationScorer) -> Placement | None:
    """The whole request on the single node that fragments least, or None."""
    if req.fractional:
        gpus, milli = 1, req.milli
        watts = req.watts_per_gpu * milli / MILLI
    else:
        gpus, milli = req.total_gpus, MILLI
        watts = gpus * req.watts_per_gpu
    if watts > 0 and state.domain_power_headroom(state.topo.root) + 1e-6 < watts:
        return None
    for node, free in ranked_nodes(state, gpus, milli, req.models, scorer,
                                   req.cpu_milli * req.workers, req.memory_mib * req.workers):
        if node in req.avoid_nodes or not node_power_ok(state, node, watts, {}):
            continue
        if not req.fractional:
            return materialize(state, req, [(node, req.workers)])
        for g in state.topo.gpu_range(node):
            if state.gpu_free_milli(g) == free:
                return Placement(req.job, (share_slot(req, node, g),), req.watts_per_gpu)
    return None


def _single_node(state: ClusterState, req: PlacementRequest,
                 parents: list[Domain]) -> Placement | None:
    """The tightest single node for the whole gang among the parents' nodes, if any."""
    need = req.workers * req.gpus_per_worker
    watts = need * req.watts_per_gpu
    ranked: list[tuple[int, int, tuple[str, ...], Domain]] = []
    for d in parents:
        f = state.has_node_with_free(d, need, req.models)
        if f is not None:
            ranked.append((f, state.free_gpus(d, req.models), d.id, d))
    ranked.sort(key=lambda item: item[:3])
    topo = state.topo
    for _, _, _, d in ranked:
        candidates = [
            n for n in range(d.node_start, d.node_end)
            if state.node_free[n] >= need and n not in req.avoid_nodes
            and (req.models is None or topo.node_model[n] in req.models)
            and (not req.host or state.host_room(n, req.cpu_milli, req.memory_mib)
                 >= req.workers)]
        candidates.sort(key=lambda n: (state.node_free[n], n))
        for n in candidates:
            if node_power_ok(state, n, watts, {}):
                return materialize(state, req, [(n, req.workers)])
    return None


def _assign(state: ClusterState, req: PlacementRequest, dom: Domain, workers: int,
            pending: dict[int, float]) -> list[tuple[int, int]] | None:
    """Distribute ``workers`` inside ``dom``: one child if one holds them, else a split."""
    topo = state.topo
    g = req.gpus_per_worker
    if dom.level == topo.node_level:
        n = dom.node_start
        watts = workers * g * req.watts_per_gpu
        if n in req.avoid_nodes or not node_power_ok(state, n, watts, pending) or (
                req.host and state.host_room(n, req.cpu_milli, req.memory_mib) < workers):
            return None
        add_pending(state, n, watts, pending)
        return [(n, workers)]
    at_nodes = dom.level + 1 == topo.node_level
    cap = {}
    for c in topo.children_of(dom):
        k = state.worker_capacity(c, g, req.models)
        if k > 0 and at_nodes and req.host:
            k = min(k, state.host_room(c.node_start, req.cpu_milli, req.memory_mib))
        if k > 0:
            cap[c.index] = k
    kids = [c for c in topo.children_of(dom) if c.index in cap]
    holders = [c for c in kids if cap[c.index] >= workers]
    if holders:
        holders.sort(key=lambda c: (state.free_gpus(c, req.models), c.id))
        for c in holders:
            trial = dict(pending)
            got = _assign(state, req, c, workers, trial)
            if got is not None:
                pending.clear()
                pending.update(trial)
                return got
    if kids and kids[0].level == topo.node_level:
        order = sorted(kids, key=lambda c: (state.node_free[c.node_start], c.id))
    else:
        order = sorted(kids, key=lambda c: (-cap[c.index], c.id))
    out: list[tuple[int, int]] = []
    remaining = workers
    taken: list[Domain] = []
    for c in order:
        if remaining <= 0:
            break
        share = min(cap[c.index], remaining)
        trial = dict(pending)
        got = _assign_partial(state, req, c, share, trial)
        if not got:
            continue
        placed = sum(k for _, k in got)
        pending.clear()
        pending.update(trial)
        out.extend(got)
        taken.append(c)
        remaining -= placed
    return out if remaining <= 0 else None


def _assign_partial(state: ClusterState, req: PlacementRequest, dom: Domain, workers: int,
                    pending: dict[int, float]) -> list[tuple[int, int]]:
    """Place up to ``workers`` inside ``dom`` (power may allow fewer); tight nodes first."""
    full = _assign(state, req, dom, workers, pending)
    if full is not None:
        return full
    if not state.budgets.names and not req.host:
        return []
    # Power- or CPU/memory-limited: take node by node, as many workers as each allows.
    topo = state.topo
    g = req.gpus_per_worker
    out: list[tuple[int, int]] = []
    nodes = sorted(range(dom.node_start, dom.node_end), key=lambda n: (state.node_free[n], n))
    remaining = workers
    for n in nodes:
        if remaining <= 0:
            break
        if n in req.avoid_nodes or (req.models is not None
                                    and topo.node_model[n] not in req.models):
            continue
        k = min(node_workers(state, req, n), remaining)
        while k > 0 and not node_power_ok(state, n, k * g * req.watts_per_gpu, pending):
            k -= 1
        if k > 0:
            add_pending(state, n, k * g * req.watts_per_gpu, pending)
            out.append((n, k))
            remaining -= k
    return out


def _place_fraction(state: ClusterState, req: PlacementRequest,
                    group_count: Callable[[Domain], int] | None = None
                    ) -> Placement | Unplaced:
    """A fraction of one GPU: the shared GPU it fills most tightly, else a whole GPU.

    Replicas of a spread group skip shared GPUs in domains that already hold their cap."""
    topo = state.topo
    m = req.milli
    watts = req.watts_per_gpu * m / MILLI
    spread = req.spread_level if group_count is not None else None
    for free in sorted(f for f in state.partial_by_free if f >= m):
        best: tuple[int, int, int] | None = None
        for gpu in state.partial_by_free[free]:
            node = topo.node_of_gpu(gpu)
            if node in req.avoid_nodes or (req.models is not None
                                           and topo.node_model[node] not in req.models):
                continue
            if req.host and state.host_room(node, req.cpu_milli, req.memory_mib) < 1:
                continue
            if spread is not None and group_count is not None and group_count(
                    topo.domains[spread][topo.ancestor(node, spread)]) >= req.spread_cap:
                continue
            key = (state.node_free[node], gpu, node)
            if (best is None or key < best) and node_power_ok(state, node, watts, {}):
                best = key
        if best is not None:
            return Placement(req.job, (share_slot(req, best[2], best[1]),), req.watts_per_gpu)
    whole = replace(req, workers=1, gpus_per_worker=1, milli=MILLI,
                    watts_per_gpu=req.watts_per_gpu * m / MILLI)
    got = place_topology_aware(state, whole, group_count)
    if isinstance(got, Unplaced):
        return explain_unplaced(state, req)
    slot = got.slots[0]
    return Placement(req.job, (share_slot(req, slot.node, slot.gpus[0]),), req.watts_per_gpu)


def level_index_of(topo: Topology, name: str) -> int:
    return topo.level_names.index(name) if name != NODE_LEVEL else topo.node_level
