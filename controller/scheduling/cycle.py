"""The scheduling cycle: ``schedule(state, pending, running, now, config) -> CycleResult``.

A pure function over a snapshot, written as kueue writes its cycle, in numbered phases:

1. heads: pending jobs ordered by priority, then submission order;
2. snapshot: a private clone of the usage, so nothing outside changes;
3. nominate: per job, the quota check, then a placement from the policy;
4. admit: take the GPUs in the snapshot; a job behind a blocked head is admitted only when
   it does not delay the head (EASY backfill against the head's reservation, using expected
   runtimes when given);
5. preempt: a blocked job may evict lower-priority jobs (or, to reclaim its nominal quota,
   jobs of its cohort that borrow); the victim set is the one that frees room while losing the
   least work since the victims' last checkpoints. Victims are requeued by the caller.

No I/O and no clock reads, except an optional injected ``clock`` that times decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState, Placement
from aifactory.controller.core.topology import Domain
from aifactory.controller.placement.base import GroupCount
from aifactory.controller.placement.explain import static_check
from aifactory.controller.placement.request import PlacementRequest, Unplaced
from aifactory.controller.scheduling.cycle_io import (
    Admission,
    CycleMemory,
    CycleResult,
    Preemption,
    QueuedJob,
    RunningJob,
    SchedulerConfig,
)
from aifactory.controller.scheduling.preemption import VictimIndex, cheapest_node_victims, may_fit
from aifactory.controller.scheduling.quota import QuotaBook

__all__ = ["schedule"]


def schedule(state: ClusterState, pending: Sequence[QueuedJob],
             running: Sequence[RunningJob] | Mapping[str, RunningJob],
             now: float, config: SchedulerConfig,
             clock: Callable[[], float] | None = None,
             queue_usage: Mapping[str, float] | None = None,
             memory: CycleMemory | None = None) -> CycleResult:
    """One scheduling cycle. ``state`` is not mutated.

    ``running`` may be given keyed by job (as the control plane keeps it), and
    ``queue_usage`` (GPUs held per queue by the running jobs) precomputed, so that a cycle
    does not rescan every running job. ``memory`` is what the caller keeps between its
    cycles (the workload mix learned so far, memoised verdicts); the cycle adds each job
    it nominates to the mix. Without it the cycle starts from an empty workload."""
    cycle = _Cycle(state, running, now, config, clock, queue_usage,
                   memory if memory is not None else CycleMemory())
    # Phase 1: heads.
    order = sorted(pending, key=lambda q: (-q.spec.priority, q.submitted_at, q.seq))
    for queued in order:
        cycle.nominate(queued)
    return CycleResult(tuple(cycle.admitted), tuple(cycle.preempted), cycle.waiting,
                       cycle.waiting_kind, cycle.failed, cycle.partial, tuple(cycle.timings))


class _Cycle:
    """Working memory of one cycle (phases 2-5)."""

    def __init__(self, state: ClusterState,
                 running: Sequence[RunningJob] | Mapping[str, RunningJob], now: float,
                 config: SchedulerConfig, clock: Callable[[], float] | None,
                 queue_usage: Mapping[str, float] | None, memory: CycleMemory) -> None:
        # Phase 2: snapshot.
        self.state = state.clone()
        self.now = now
        self.config = config
        self.memory = memory
        self.clock = clock
        self.running = dict(running) if isinstance(running, Mapping) else {
            r.spec.key: r for r in running}
        if queue_usage is None:
            usage: dict[str, float] = {}
            for r in self.running.values():
                usage[r.spec.queue] = usage.get(r.spec.queue, 0.0) + \
                    r.placement.gpu_equivalents
            queue_usage = usage
        self.quota = QuotaBook(config.queues, queue_usage)
        self.admitted: list[Admission] = []
        self.preempted: list[Preemption] = []
        self.waiting: dict[str, str] = {}
        self.waiting_kind: dict[str, str] = {}
        # Shapes that found no placement this cycle: capacity only shrinks within a cycle
        # (until a preemption frees some), so the same shape fails again; skip the search.
        self.failed_shapes: dict[tuple[object, ...], Unplaced] = {}
        self.failed: dict[str, str] = {}
        self.partial: dict[str, Placement] = {}
        self.timings: list[float] = []
        self.head: QueuedJob | None = None
        self.reservation: tuple[frozenset[int], float] | None = None
        self.reservation_done = False
        # Preemptions that found no victim set this cycle, by shape, priority and queue:
        # victims only become fewer until a preemption happens, so skip the same search.
        self.failed_preemptions: set[tuple[object, ...]] = set()
        self.preemption_searches = 0
        self._lowest_priority: int | None = None
        self._candidates: dict[tuple[int, str, bool], list[RunningJob]] = {}
        # id(candidate list) -> its VictimIndex; cleared with the candidate lists.
        self._victim_index: dict[int, VictimIndex] = {}
        self._groups: dict[str, list[int]] | None = None

    @property
    def groups(self) -> dict[str, list[int]]:
        """Nodes used by each replica group's running jobs (built on first use)."""
        if self._groups is None:
            self._groups = {}
            for r in self.running.values():
                if r.spec.group is not None:
                    self._groups.setdefault(r.spec.group, []).extend(
                        s.node for s in r.placement.slots)
        return self._groups

    # ----------------------------------------------------------------- phase 3: nominate

    def request(self, spec: JobSpec) -> PlacementRequest | Unplaced:
        policy = self.config.policy
        watts = self.config.watts_per_gpu(spec) if policy.power_aware else 0.0
        return PlacementRequest.resolve(spec, self.state.topo, watts)

    def resolved(self, spec: JobSpec) -> tuple[PlacementRequest | Unplaced, Unplaced | None]:
        """The job's request and why it can never fit (None if it can), memoized by key."""
        hit = self.memory.requests.get(spec.key)
        if hit is not None and hit[0] is spec:
            return hit[1], hit[2]
        req = self.request(spec)
        never = None if isinstance(req, Unplaced) else static_check(self.config.empty, req)
        self.memory.remember_request(spec, req, never)
        return req, never

    def nominate(self, queued: QueuedJob) -> None:
        spec = queued.spec
        req, never = self.resolved(spec)
        if isinstance(req, Unplaced):
            self.failed[spec.key] = req.reason
            return
        if never is not None:
            self.failed[spec.key] = never.reason
            return
        verdict = self.quota.check(spec.queue, spec.gpu_equivalents)
        if not verdict.ok:
            if verdict.permanent:
                self.failed[spec.key] = verdict.reason
                return
            if (self.config.preemption
                    and self.quota.within_nominal(spec.queue, spec.gpu_equivalents)
                    and self.preempt(queued, req)):
                return
            self.wait(spec.key, verdict.reason, "quota")
            return
        if not self.config.policy.gang and queued.partial is not None:
            self.continue_partial(queued, req)
            return
        local = self.locality(queued, req)
        got = self.place(req if local is None else local, spec)
        if local is not None and isinstance(got, Unplaced):
            spread = self.place(req, spec)
            if isinstance(spread, Placement):
                # It could start now across domains; it waits for one instead.
                assert local.required_level is not None
                name = self.state.topo.levels[local.required_level].name
                limit = self.config.policy.locality_wait_seconds
                self.wait(spec.key, f"{req.describe()} waits for one {name} (up to "
                          f"{limit:.0f} s after submission, then it may span {name}s): "
                          f"{got.reason}", "locality")
                return
            got = spread
        cap: float | None = None
        if isinstance(got, Unplaced) and got.power_limited:
            capped = self.capped(req, spec)
            if capped is not None:
                got, cap = capped
        if isinstance(got, Placement):
            if self.head is not None and not self.may_backfill(spec, got):
                self.wait(spec.key, f"{req.describe()} waits behind higher-priority "
                          f"{self.head.spec.key}: starting it now would delay that job",
                          "backfill")
                return
            self.admit(spec, got, backfilled=self.head is not None,
                       borrowing=verdict.borrowing, power_cap=cap)
            return
        if self.config.preemption and self.preempt(queued, req):
            return
        self.wait(spec.key, got.reason, "power" if got.power_limited else "capacity")
        # A job blocked on watts, not on GPUs, is not a head to reserve nodes for (as a job
        # blocked on quota is not): holding nodes back would not bring its start closer.
        if self.head is None and self.config.backfill and self.config.policy.gang \
                and not got.power_limited:
            self.head = queued

    def capped(self, req: PlacementRequest, spec: JobSpec) -> tuple[Placement, float] | None:
        """The gang under the highest power cap that lets it place now, if any."""
        caps = self.config.power_caps
        if caps is None or not self.config.policy.power_aware:
            return None
        for cap, watts in caps(spec):
            if watts >= req.watts_per_gpu:
                continue
            got = self.place(replace(req, watts_per_gpu=watts), spec)
            if isinstance(got, Placement):
                return got, cap
            if not got.power_limited:
                return None
        return None

    def locality(self, queued: QueuedJob, req: PlacementRequest) -> PlacementRequest | None:
        """Delay scheduling for locality: under a policy with ``locality_wait_seconds`` > 0,
        a multi-node gang without a required level is, for that long after submission,
        placed only inside one domain of the lowest level that could ever hold it (one
        rack, else one block); None when the rule does not apply (any more)."""
        limit = self.config.policy.locality_wait_seconds
        if (limit <= 0 or req.fractional or req.workers <= 1 or req.required_level is not None
                or self.now - queued.submitted_at >= limit):
            return None
        key = (req.workers, req.gpus_per_worker, req.models)
        levels = self.memory.levels
        if key not in levels:
            level = None
            empty = self.config.empty
            for lvl in range(empty.topo.node_level - 1, -1, -1):
                if any(empty.worker_capacity(d, req.gpus_per_worker, req.models) >= req.workers
                       for d in empty.topo.domains[lvl]):
                    level = lvl
                    break
            self.memory.remember_level(key, level)
        level = levels[key]
        if level is None or (level + 1 == self.state.topo.node_level
                             and req.total_gpus <= self.state.topo.max_node_gpus):
            return None
        return replace(req, required_level=level)

    def wait(self, key: str, reason: str, kind: str) -> None:
        self.waiting[key] = reason
        self.waiting_kind[key] = kind

    def policy_place(self, state: ClusterState, req: PlacementRequest,
                     group_count: GroupCount | None) -> Placement | Unplaced:
        """The policy's placement of ``req`` on ``state`` (this cycle's or a trial copy),
        with the job counted in the workload mix first (once per job)."""
        policy = self.config.policy
        policy.learn(self.memory.mix, req, state.host_tracked)
        return policy.place(state, req, group_count, self.memory.mix)

    def place(self, req: PlacementRequest, spec: JobSpec) -> Placement | Unplaced:
        shape = (req.workers, req.gpus_per_worker, req.milli, req.models,
                 req.required_level, req.preferred_level, req.watts_per_gpu, req.avoid_nodes,
                 req.cpu_milli, req.memory_mib)
        known = self.failed_shapes.get(shape)
        if known is not None and self.config.policy.gang:
            return known
        got = self._place(req, spec)
        if isinstance(got, Unplaced):
            self.failed_shapes[shape] = got
        return got

    def _place(self, req: PlacementRequest, spec: JobSpec) -> Placement | Unplaced:
        group_count = self.group_counter(spec)
        start = self.clock() if self.clock else 0.0
        got = self.policy_place(self.state, req, group_count)
        if self.clock:
            self.timings.append(self.clock() - start)
        if isinstance(got, Placement) and not self.config.policy.power_aware:
            got = replace(got, watts_per_gpu=self.config.watts_per_gpu(spec))
        if isinstance(got, Placement) and not got.complete:
            if not self.config.policy.gang:
                return got
            return Unplaced(f"{req.describe()} waits: no room for the whole gang")
        return got

    def group_counter(self, spec: JobSpec) -> Callable[[Domain], int] | None:
        if spec.group is None or spec.spread_level is None:
            return None
        nodes = self.groups.get(spec.group, [])

        def count(dom: Domain) -> int:
            return sum(1 for n in nodes if dom.node_start <= n < dom.node_end)
        return count

    def continue_partial(self, queued: QueuedJob, req: PlacementRequest) -> None:
        held = queued.partial
        assert held is not None
        missing = queued.spec.workers - len(held.slots)
        sub = replace(req, workers=missing)
        got = self.place(sub, queued.spec)
        if isinstance(got, Unplaced):
            self.wait(queued.spec.key, f"partially placed ({len(held.slots)} of "
                      f"{queued.spec.workers} workers): {got.reason}", "capacity")
            return
        self.state.release(held.job)
        merged = Placement(held.job, held.slots + got.slots, held.watts_per_gpu,
                           complete=len(held.slots) + len(got.slots) >= queued.spec.workers)
        self.state.allocate(merged)
        self.partial[queued.spec.key] = merged
        if merged.complete:
            self.quota.charge(queued.spec.queue, queued.spec.gpu_equivalents)
            self.admitted.append(Admission(queued.spec.key, merged))
        else:
            self.wait(queued.spec.key, f"partially placed ({len(merged.slots)} of "
                      f"{queued.spec.workers} workers)", "capacity")

    # ----------------------------------------------------------------- phase 4: admit

    def admit(self, spec: JobSpec, placement: Placement, backfilled: bool = False,
              borrowing: bool = False, power_cap: float | None = None) -> None:
        if not placement.complete:
            # Non-gang policy: the bound part holds its GPUs; the job waits for the rest.
            self.state.allocate(placement)
            self.partial[spec.key] = placement
            self.wait(spec.key, f"partially placed ({len(placement.slots)} of "
                      f"{spec.workers} workers)", "capacity")
            return
        self.state.allocate(placement)
        self.quota.charge(spec.queue, spec.gpu_equivalents)
        if borrowing or self.quota.borrowing(spec.queue):
            self.failed_preemptions.clear()  # this queue's jobs may now be reclaimed
            self._candidates.clear()
            self._victim_index.clear()
        if spec.group is not None:
            self.groups.setdefault(spec.group, []).extend(s.node for s in placement.slots)
        self.admitted.append(Admission(spec.key, placement, backfilled, borrowing, power_cap))

    def may_backfill(self, spec: JobSpec, placement: Placement) -> bool:
        """EASY backfill: fine if it ends before the head's start or avoids its nodes."""
        if not self.reservation_done:
            self.reservation = self.reserve()
            self.reservation_done = True
        if self.reservation is None:
            return True
        nodes, start_at = self.reservation
        runtime = spec.expected_runtime_seconds
        if runtime is not None and self.now + runtime <= start_at:
            return True
        return not any(s.node in nodes for s in placement.slots)

    def reserve(self) -> tuple[frozenset[int], float] | None:
        """Where and when the head could start if running jobs end as expected."""
        head = self.head
        assert head is not None
        req = self.request(head.spec)
        if isinstance(req, Unplaced):
            return None
        trial = self.state.clone()
        ending = sorted(self.running.values(), key=lambda r: (r.expected_end(), r.started_at))
        ending += [_as_running(a, self.now) for a in self.admitted]
        start_at = self.now
        for r in ending:
            if trial.release(r.spec.key) is None:
                continue
            start_at = max(start_at, r.expected_end())
            if trial.worker_capacity(trial.topo.root, req.gpus_per_worker,
                                     req.models) < req.workers:
                continue
            got = self.policy_place(trial, req, None)
            if isinstance(got, Placement):
                return frozenset(s.node for s in got.slots), start_at
        return None

    # ----------------------------------------------------------------- phase 5: preempt

    def preempt(self, queued: QueuedJob, req: PlacementRequest) -> bool:
        """Evict the cheapest victim set that lets ``queued`` place; True if it did."""
        spec = queued.spec
        reclaim = self.quota.enabled and self.quota.within_nominal(spec.queue,
                                                                   spec.gpu_equivalents)
        attempt = (req.workers, req.gpus_per_worker, req.milli, req.models,
                   req.required_level, req.preferred_level, req.avoid_nodes, spec.priority,
                   spec.queue, reclaim, req.cpu_milli, req.memory_mib)
        if attempt in self.failed_preemptions or \
                self.preemption_searches >= self.config.max_preemption_searches:
            return False
        self.preemption_searches += 1
        found = self._preempt(queued, req, reclaim)
        if not found:
            self.failed_preemptions.add(attempt)
        return found

    def _preempt(self, queued: QueuedJob, req: PlacementRequest, reclaim: bool) -> bool:
        spec = queued.spec
        if not reclaim:
            if self._lowest_priority is None:
                self._lowest_priority = min(
                    (r.spec.priority for r in self.running.values()), default=spec.priority)
            if spec.priority <= self._lowest_priority:
                return False  # nobody runs at a lower priority
        candidates = self.candidates(spec, reclaim)
        if not candidates:
            return False
        if req.fractional or (req.total_gpus <= self.state.topo.max_node_gpus
                              and req.spread_level is None):
            # One node must hold it, so only victims on one node can help.
            index = self._victim_index.get(id(candidates))
            if index is None:
                index = VictimIndex.build(candidates, self.now)
                self._victim_index[id(candidates)] = index
            one_node = cheapest_node_victims(self.state, req, index)
            if one_node is None:
                return False
            trial = self.state.clone()
            for v in one_node:
                trial.release(v.spec.key)  # type: ignore[attr-defined]
            got = self.policy_place(trial, req, None)
            if not (isinstance(got, Placement) and got.complete):
                return False
            if not self.config.policy.power_aware:
                got = replace(got, watts_per_gpu=self.config.watts_per_gpu(spec))
            self.evict(spec, list(one_node), got)  # type: ignore[arg-type]
            return True
        topo = self.state.topo
        level = req.required_level if req.required_level is not None else -1
        doms = list(topo.domains[level]) if level >= 0 else [topo.root]
        by_dom: dict[int, list[RunningJob]] = {}
        for r in candidates:
            for d in {topo.ancestor(s.node, level) for s in r.placement.slots}:
                by_dom.setdefault(d, []).append(r)
        ranked = sorted(
            (d for d in doms if d.index in by_dom),
            key=lambda d: -(self.state.free_gpus(d) + sum(
                r.placement.gpu_count for r in by_dom[d.index])))
        best: tuple[float, list[RunningJob], Placement] | None = None
        for dom in ranked[: self.config.max_preemption_domains]:
            victims = sorted(by_dom[dom.index],
                             key=lambda r: (r.lost_gpu_seconds(self.now), r.spec.priority,
                                            -r.started_at))
            found = self.victim_set(req, spec, victims, dom)
            if found is None:
                continue
            cost = sum(v.lost_gpu_seconds(self.now) for v in found[0])
            if best is None or cost < best[0]:
                best = (cost, found[0], found[1])
        if best is None:
            return False
        self.evict(spec, best[1], best[2])
        return True

    def candidates(self, spec: JobSpec, reclaim: bool) -> list[RunningJob]:
        """Running jobs ``spec`` may preempt: lower priority in its own queue (any job when
        no queues are configured), or, to reclaim nominal quota, borrowing jobs of its
        cohort. Across queues the queues' quotas decide, never the priority numbers that
        tenants choose. Cached per cycle until the running set or borrowing changes."""
        key = (spec.priority, spec.queue, reclaim)
        got = self._candidates.get(key)
        if got is not None:
            return got
        allocations = self.state.allocations
        quota = self.quota
        out = []
        for job, r in self.running.items():
            other = r.spec
            if job not in allocations:
                continue
            if (other.priority < spec.priority and (
                    not quota.enabled or other.queue == spec.queue)) or (
                    reclaim and other.queue != spec.queue
                    and quota.same_cohort(other.queue, spec.queue)
                    and quota.borrowing(other.queue)):
                out.append(r)
        self._candidates[key] = out
        return out

    def evict(self, spec: JobSpec, victims: list[RunningJob], placement: Placement) -> None:
        """Preempt ``victims`` and admit ``spec`` at ``placement`` in the snapshot."""
        self._candidates.clear()
        self._victim_index.clear()
        self.failed_shapes.clear()
        self.failed_preemptions.clear()
        for v in victims:
            self.state.release(v.spec.key)
            self.quota.charge(v.spec.queue, -v.placement.gpu_equivalents)
            del self.running[v.spec.key]
            why = "reclaims its queue's nominal quota" if v.spec.priority >= spec.priority \
                else f"has higher priority ({spec.priority} > {v.spec.priority})"
            self.preempted.append(Preemption(
                v.spec.key, spec.key, v.lost_gpu_seconds(self.now),
                f"preempted by {spec.key}, which {why}; requeued from its last checkpoint"))
        self.admit(spec, placement)

    def victim_set(self, req: PlacementRequest, spec: JobSpec, victims: list[RunningJob],
                   dom: Domain | None = None) -> tuple[list[RunningJob], Placement] | None:
        """The victims (a prefix of ``victims``, then minimized) that let ``req`` place.

        Nothing fitted before the victims in ``dom`` were released, so the gang can only
        land where they free room: the policy is asked only once ``dom`` has the capacity
        (a cheap necessary check), not after every single release."""
        trial = self.state.clone()
        dom = dom if dom is not None else trial.topo.root
        chosen: list[RunningJob] = []
        for v in victims:
            trial.release(v.spec.key)
            chosen.append(v)
            if not may_fit(trial, req, dom):
                continue
            got = self.policy_place(trial, req, None)
            if isinstance(got, Placement) and got.complete:
                break
        else:
            return None
        # Minimize: drop victims not needed, most expensive first.
        for v in sorted(chosen, key=lambda r: -r.lost_gpu_seconds(self.now)):
            if len(chosen) == 1:
                break
            trial.allocate(v.placement)
            if not may_fit(trial, req, dom):
                trial.release(v.spec.key)
                continue
            got2 = self.policy_place(trial, req, None)
            if isinstance(got2, Placement) and got2.complete:
                chosen = [c for c in chosen if c is not v]
            else:
                trial.release(v.spec.key)
        final = self.policy_place(trial, req, None)
        if not isinstance(final, Placement):
            return None
        if not self.config.policy.power_aware:
            final = replace(final, watts_per_gpu=self.config.watts_per_gpu(spec))
        return chosen, final


def _as_running(a: Admission, now: float) -> RunningJob:
    spec = JobSpec(name=a.job.split("/", 1)[-1], namespace=a.job.split("/", 1)[0])
    return RunningJob(spec, a.placement, now, now)
