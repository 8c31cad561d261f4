"""Our policy: topology-aware gang placement, where one gang goes or why it cannot go now.

__all__ = ["TopologyAwarePolicy", "place_topology_aware"]

The rule: place the gang inside one domain at the lowest level possible, choosing the
tightest such domain (BestFit, fewest free GPUs, ties broken by domain id); a required level
is never crossed, and a gang crosses a preferred level only when nothing fits below it.
Inside the chosen domain, a split across children first takes the children with most room
(fewest domains spanned) and gives the remainder to the tightest child that holds it, as
Kueue's TAS BestFit does; at node level the tightest nodes go first, so whole free nodes and
racks stay whole for big gangs. Work that fits one node goes where it adds least
fragmentation for the workload mix seen so far (FGD). Fractional requests pack onto already
shared GPUs first.

Everything here is pure: it reads a ``ClusterState`` (and a ``WorkloadMix`` it never
changes) and returns a ``Placement`` or an ``Unplaced`` with a reason a person can act on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import Domain
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.placement.base import GroupCount
from aifactory.controller.placement.explain import explain_unplaced
from aifactory.controller.placement.fragmentation import (
    FragmentationScorer,
    WorkloadMix,
    ranked_nodes,
)
from aifactory.controller.placement.request import (
    PlacementRequest,
    Unplaced,
    add_pending,
    materialize,
    node_power_ok,
    node_workers,
    share_slot,
)


def place_topology_aware(state: ClusterState, req: PlacementRequest,
                         group_count: Callable[[Domain], int] | None = None,
                         scorer: FragmentationScorer | None = None) -> Placement | Unplaced:
    """Our placement: lowest level, tightest domain, whole nodes and racks kept whole.

    Work that fits on one node goes to the node where it adds least fragmentation for the
    workload ``scorer`` has seen (``controller.placement.fragmentation``; without a scorer every
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
        watts = req.watts_per_gpu * milli / MILLI_PER_GPU
    else:
        gpus, milli = req.total_gpus, MILLI_PER_GPU
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
    watts = req.watts_per_gpu * m / MILLI_PER_GPU
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
    whole = replace(req, workers=1, gpus_per_worker=1, milli=MILLI_PER_GPU,
                    watts_per_gpu=req.watts_per_gpu * m / MILLI_PER_GPU)
    got = place_topology_aware(state, whole, group_count)
    if isinstance(got, Unplaced):
        return explain_unplaced(state, req)
    slot = got.slots[0]
    return Placement(req.job, (share_slot(req, slot.node, slot.gpus[0]),), req.watts_per_gpu)


@dataclass(slots=True)
class TopologyAwarePolicy:
    """Ours. With ``fragmentation_aware`` it scores one-node placements by FGD's
    fragmentation measure (``controller.placement.fragmentation``) for the workload mix its
    caller learns (``learn``, each job once) and passes in; without, one-node work is plain
    BestFit. Given no mix, the request alone is taken as the workload (a first job)."""

    name: str = "aifactory"
    gang: bool = True
    power_aware: bool = True
    fragmentation_aware: bool = True
    # Delay scheduling for locality (see scheduling.cycle._Cycle.locality): seconds a
    # multi-node gang waits for one rack (or block) before it may span more; 0 turns it off.
    # 600 s: on the Lingjun gang benchmark 300 s let gangs spread on the busiest seed
    # (92.8 % in one rack) and the spread gangs then fragmented racks for the gangs behind
    # them; 600 s kept >= 95 % in one rack on every seed with a lower p95 wait
    # (benchmarks/README.md).
    locality_wait_seconds: float = 600.0

    def learn(self, mix: WorkloadMix, req: PlacementRequest, host_tracked: bool) -> None:
        if not self.fragmentation_aware:
            return
        # CPU and memory enter the shape only where nodes track them.
        cpu, memory = (req.cpu_milli, req.memory_mib) if host_tracked else (0, 0)
        if req.fractional:
            mix.observe(req.job, (1, req.milli, req.models, cpu, memory))
        else:
            mix.observe(req.job, (req.gpus_per_worker, MILLI_PER_GPU, req.models, cpu, memory),
                        req.workers)

    def place(self, state: ClusterState, req: PlacementRequest,
              group_count: GroupCount | None = None,
              mix: WorkloadMix | None = None) -> Placement | Unplaced:
        if not self.fragmentation_aware:
            return place_topology_aware(state, req, group_count, _NEUTRAL)
        if mix is None:
            mix = WorkloadMix()
            self.learn(mix, req, state.host_tracked)
        return place_topology_aware(state, req, group_count, mix.scorer())
