"""CPU and memory beside GPUs: accounting, placement by every policy, reasons, FGD.

Factory used below (one block, one rack per node kind, CPU in cores):

              factory (24 GPUs)
             /                 \\
     rack lean                  rack fat
     lean-0  lean-1             fat-0
     8 GPUs, 32 cores, 256 GiB  8 GPUs, 128 cores, 1 TiB
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aifactory.controller.core.errors import InvariantError
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.core.topology import BLOCK_LABEL, RACK_LABEL, NodeInfo, Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.inputs.traces import load_openb_nodes, read_openb_pods
from aifactory.controller.placement.explain import static_check
from aifactory.controller.placement.fragmentation import (
    FragmentationScorer,
    WorkloadMix,
    fragment_milli,
    stranded_milli,
)
from aifactory.controller.placement.registry import POLICY_NAMES, make_policy
from aifactory.controller.placement.request import PlacementRequest, Unplaced
from aifactory.controller.placement.topology_aware import place_topology_aware
from aifactory.controller.scheduling.cycle import schedule
from aifactory.controller.scheduling.cycle_io import QueuedJob, RunningJob, SchedulerConfig
from tests.factories import run_cycle

CORE = 1000
GIB = 1024


def host_topology() -> Topology:
    nodes = [NodeInfo(f"lean-{i}", 8, "H100", ((BLOCK_LABEL, "b0"), (RACK_LABEL, "lean")),
                      cpu_milli=32 * CORE, memory_mib=256 * GIB) for i in range(2)]
    nodes.append(NodeInfo("fat-0", 8, "H100", ((BLOCK_LABEL, "b0"), (RACK_LABEL, "fat")),
                          cpu_milli=128 * CORE, memory_mib=1024 * GIB))
    return Topology.build(nodes)


TOPO = host_topology()
LEAN0, LEAN1, FAT = (TOPO.node_index[n] for n in ("lean-0", "lean-1", "fat-0"))


def request(spec: JobSpec) -> PlacementRequest:
    req = PlacementRequest.resolve(spec, TOPO)
    assert isinstance(req, PlacementRequest)
    return req


def test_topology_groups_nodes_into_kinds_by_model_cpu_and_memory() -> None:
    assert sorted(TOPO.kinds) == [(0, 32 * CORE, 256 * GIB, 16), (0, 128 * CORE, 1024 * GIB, 8)]
    assert TOPO.node_kind[LEAN0] == TOPO.node_kind[LEAN1] != TOPO.node_kind[FAT]


def test_cpu_and_memory_are_taken_given_back_and_never_overcommitted() -> None:
    state = ClusterState(TOPO)
    gpus = tuple(TOPO.gpu_range(LEAN0))
    twin = state.clone()
    state.allocate(Placement("a", (WorkerSlot(LEAN0, gpus[:2], MILLI_PER_GPU, 20 * CORE,
                                                100 * GIB),)))
    assert (state.cpu_free[LEAN0], state.memory_free[LEAN0]) == (12 * CORE, 156 * GIB)
    assert state.node_class[LEAN0][2:4] == (12 * CORE, 156 * GIB)
    assert twin.cpu_free[LEAN0] == 32 * CORE  # the clone keeps its own books
    assert state.host_room(LEAN0, 6 * CORE, 0) == 2
    with pytest.raises(InvariantError, match="lean-0"):
        state.allocate(Placement("b", (WorkerSlot(LEAN0, gpus[2:3], MILLI_PER_GPU, 13 * CORE),)))
    assert state.cpu_free[LEAN0] == 12 * CORE and "b" not in state.allocations
    state.check_consistency()
    state.release("a")
    assert (state.cpu_free[LEAN0], state.memory_free[LEAN0]) == (32 * CORE, 256 * GIB)
    state.check_consistency()


def test_nodes_without_cpu_figures_never_run_out() -> None:
    topo = Topology.build([NodeInfo("plain", 8, "H100")])
    state = ClusterState(topo)
    assert not state.host_tracked
    req = PlacementRequest.resolve(JobSpec("j", gpus_per_worker=8, cpu_milli=10 ** 6), topo)
    assert isinstance(req, PlacementRequest)
    got = place_topology_aware(state, req)
    assert isinstance(got, Placement)
    state.allocate(got)
    assert state.node_class[0][2:4] == (-1, -1)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_skips_nodes_whose_cpu_is_gone(policy: str) -> None:
    # lean-0 and lean-1 have all 8 GPUs free but only 4 cores left; fat-0 has room.
    state = ClusterState(TOPO)
    for n in (LEAN0, LEAN1):
        state.allocate(Placement(f"cpu-hog-{n}", (WorkerSlot(n, (), MILLI_PER_GPU, 28 * CORE),)))
    for spec in (JobSpec("whole", gpus_per_worker=2, cpu_milli=8 * CORE),
                 JobSpec("share", gpu_milli=300, cpu_milli=8 * CORE),
                 JobSpec("gang", workers=2, gpus_per_worker=4, cpu_milli=8 * CORE)):
        got = make_policy(policy, seed=1).place(state, request(spec))
        assert isinstance(got, Placement), (spec.name, got)
        assert got.nodes == (FAT,), spec.name
        assert all(s.cpu_milli == 8 * CORE for s in got.slots)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_a_gang_splits_where_cpu_allows(policy: str) -> None:
    # Each node's CPU holds one worker of 20 cores: three workers need all three nodes.
    state = ClusterState(TOPO)
    state.allocate(Placement("hog", (WorkerSlot(FAT, (), MILLI_PER_GPU, 100 * CORE),)))
    got = make_policy(policy, seed=1).place(
        state, request(JobSpec("g", workers=3, gpus_per_worker=2, cpu_milli=20 * CORE)))
    assert isinstance(got, Placement) and got.complete, got
    assert got.nodes == tuple(sorted((LEAN0, LEAN1, FAT)))
    state.allocate(got)
    state.check_consistency()


def test_the_reason_names_cpu_when_gpus_are_free_but_cpu_is_not() -> None:
    state = ClusterState(TOPO)
    for n, cores in ((LEAN0, 30), (LEAN1, 30), (FAT, 100)):
        state.allocate(Placement(f"hog-{n}", (WorkerSlot(n, (), MILLI_PER_GPU, cores * CORE),)))
    got = place_topology_aware(state, request(JobSpec("j", gpus_per_worker=1,
                                                      cpu_milli=40 * CORE)))
    assert isinstance(got, Unplaced) and not got.permanent
    assert "CPU or memory" in got.reason and "40000m CPU" in got.reason


def test_a_worker_bigger_than_any_node_is_refused_for_good() -> None:
    never = static_check(ClusterState(TOPO), request(JobSpec("j", gpus_per_worker=1,
                                                             memory_mib=2048 * GIB)))
    assert never is not None and never.permanent
    assert "2097152 MiB memory" in never.reason and "1048576 MiB" in never.reason
    assert static_check(ClusterState(TOPO), request(JobSpec("k", cpu_milli=100 * CORE))) \
        is None


def test_gpus_a_typical_task_cannot_get_cpu_for_are_fragment() -> None:
    # One typical shape: 1 GPU with 16 cores. A node with 2 free GPUs and 8 free cores
    # strands both GPUs for it; with 16 free cores, none.
    typical = ((1.0, 1, MILLI_PER_GPU, None, 16 * CORE, 0),)
    assert fragment_milli(0, (MILLI_PER_GPU, MILLI_PER_GPU), typical, 8 * CORE, -1) == 2000
    assert fragment_milli(0, (MILLI_PER_GPU, MILLI_PER_GPU), typical, 16 * CORE, -1) == 0
    assert fragment_milli(0, (MILLI_PER_GPU, MILLI_PER_GPU), typical, -1, -1) == 0  # not tracked


def test_work_that_fits_anywhere_keeps_off_the_nodes_cpu_heavy_work_needs() -> None:
    # Typical work: 8-GPU tasks of 100 cores (only fat-0 hosts them) and 1-GPU tasks of
    # 4 cores. FGD alone sees every empty node alike for a 1-GPU task; the scarcity of
    # the fat kind sends it to a lean node.
    mix = WorkloadMix()
    for i in range(4):
        mix.observe(f"big-{i}", (8, MILLI_PER_GPU, None, 100 * CORE, 0))
    for i in range(16):
        mix.observe(f"small-{i}", (1, MILLI_PER_GPU, None, 4 * CORE, 0))
    scorer = FragmentationScorer(mix)
    scorer.bind(TOPO.kinds)
    fat_kind = TOPO.node_kind[FAT]
    # 32 of 48 GPUs of demand asks for the fat kind, which holds 8 of 24 GPUs.
    assert scorer.scarcity()[fat_kind] == pytest.approx((32 / 48) / (8 / 24))
    state = ClusterState(TOPO)
    state.allocate(Placement("busy", (WorkerSlot(LEAN0, tuple(TOPO.gpu_range(LEAN0))[:4]),)))
    state.allocate(Placement("busy2", (WorkerSlot(FAT, tuple(TOPO.gpu_range(FAT))[:4]),)))
    small = request(JobSpec("j", gpus_per_worker=1, cpu_milli=4 * CORE))
    got = place_topology_aware(state, small, None, scorer)
    assert isinstance(got, Placement) and got.nodes == (LEAN0,)
    # Without scarcity both half-used nodes score the same and the tie goes to the node
    # in the tighter rack, fat-0's.
    scorer.scarcity_weight = 0.0
    scorer.bind(())
    # The stranding term alone also sends it to lean-0: at the mix's 9.7 cores per GPU,
    # lean-0's 32 free cores cannot feed its 4 free GPUs, and a 4-core task eases that.
    got = place_topology_aware(state, small, None, scorer)
    assert isinstance(got, Placement) and got.nodes == (LEAN0,)
    blind = FragmentationScorer(mix, scarcity_weight=0.0, stranding_weight=0.0)
    got = place_topology_aware(state, small, None, blind)
    assert isinstance(got, Placement) and got.nodes == (FAT,)


def test_stranded_gpus_are_those_the_free_cpu_and_memory_cannot_feed() -> None:
    # 4 cores and 16 GiB per GPU: 4 free GPUs with 8 free cores feed only 2 GPUs.
    per_milli = (4 * CORE / MILLI_PER_GPU, 16 * GIB / MILLI_PER_GPU)
    assert stranded_milli(4000, 8 * CORE, 1024 * GIB, per_milli) == pytest.approx(2000)
    assert stranded_milli(4000, 64 * CORE, 32 * GIB, per_milli) == pytest.approx(2000)
    assert stranded_milli(4000, 64 * CORE, 1024 * GIB, per_milli) == 0
    assert stranded_milli(4000, -1, -1, per_milli) == 0  # not tracked
    assert stranded_milli(4000, 0, 0, (0.0, 0.0)) == 0  # the workload asks for neither


def test_cpu_heavy_work_goes_where_cpu_is_left_and_light_work_where_gpus_would_strand() -> None:
    # Typical work: 1-GPU tasks of 4 cores (4 milli-cores per milli-GPU). lean-0 keeps 4
    # GPUs and 14 cores (enough for 3.5 of them), lean-1 4 GPUs and 28 cores.
    mix = WorkloadMix()
    for i in range(16):
        mix.observe(f"t-{i}", (1, MILLI_PER_GPU, None, 4 * CORE, 0))
    scorer = FragmentationScorer(mix, scarcity_weight=0.0)
    state = ClusterState(TOPO)
    for node, cores in ((LEAN0, 18), (LEAN1, 4)):
        state.allocate(Placement(f"busy-{node}", (WorkerSlot(
            node, tuple(TOPO.gpu_range(node))[:4], cpu_milli=cores * CORE),)))
    heavy = request(JobSpec("heavy", gpus_per_worker=1, cpu_milli=8 * CORE))
    light = request(JobSpec("light", gpus_per_worker=1, cpu_milli=0))
    # On lean-0 the heavy task would leave 6 cores for 3 GPUs (FGD's threshold still sees
    # a typical task fit there); lean-1 has CPU to spare.
    got = place_topology_aware(state, heavy, None, scorer)
    assert isinstance(got, Placement) and got.nodes == (LEAN1,)
    # The light task uses a GPU lean-0 could not have fed anyway.
    got = place_topology_aware(state, light, None, scorer)
    assert isinstance(got, Placement) and got.nodes == (LEAN0,)
    # Without the term both lean nodes score 0 and the heavy task goes to the first.
    blind = FragmentationScorer(mix, scarcity_weight=0.0, stranding_weight=0.0)
    got = place_topology_aware(state, heavy, None, blind)
    assert isinstance(got, Placement) and got.nodes == (LEAN0,)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_a_job_asking_less_cpu_is_not_held_back_by_one_that_asked_too_much(policy: str) -> None:
    # Same GPU shape in one cycle: the first asks more CPU than any node has free, the
    # second none. A failure remembered by GPU shape alone would hold the second back.
    state = ClusterState(TOPO)
    config = SchedulerConfig(policy=make_policy(policy, seed=1), empty=ClusterState(TOPO),
                             watts_per_gpu=lambda spec: 0.0)
    for n in (LEAN0, LEAN1, FAT):
        state.allocate(Placement(f"hog-{n}", (WorkerSlot(n, (), MILLI_PER_GPU, 30 * CORE),)))
    jobs = [QueuedJob(JobSpec("big", gpus_per_worker=2, cpu_milli=120 * CORE), 0.0, 0),
            QueuedJob(JobSpec("small", gpus_per_worker=2), 0.0, 1)]
    result = schedule(state, jobs, [], 0.0, config)
    assert [a.job for a in result.admitted] == ["default/small"]
    assert "default/big" in result.waiting


jobs = st.builds(
    lambda w, g, milli, cpu, mem: JobSpec(
        "x", workers=w if milli == MILLI_PER_GPU else 1,
        gpus_per_worker=g if milli == MILLI_PER_GPU else 1,
        gpu_milli=milli, cpu_milli=cpu * CORE, memory_mib=mem * GIB),
    st.integers(1, 4), st.sampled_from([1, 2, 4, 8]),
    st.sampled_from([MILLI_PER_GPU, MILLI_PER_GPU, 250, 500]), st.sampled_from([0, 2, 8, 16, 40]),
    st.sampled_from([0, 16, 64, 300]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(jobs, st.booleans()), min_size=1, max_size=20),
       st.sampled_from(POLICY_NAMES))
def test_no_policy_overcommits_cpu_or_memory(steps: list[tuple[JobSpec, bool]],
                                             policy: str) -> None:
    state = ClusterState(TOPO)
    config = SchedulerConfig(policy=make_policy(policy, seed=1), empty=ClusterState(TOPO),
                             watts_per_gpu=lambda spec: 0.0)
    running: dict[str, RunningJob] = {}
    for i, (job, finish_one) in enumerate(steps):
        spec = JobSpec(f"j{i}", workers=job.workers, gpus_per_worker=job.gpus_per_worker,
                       gpu_milli=job.gpu_milli, cpu_milli=job.cpu_milli,
                       memory_mib=job.memory_mib)
        run_cycle(state, spec, running, float(i), config)  # allocating raises on overcommit
        for n in range(len(TOPO.nodes)):
            assert state.cpu_free[n] >= 0 and state.memory_free[n] >= 0
        state.check_consistency()
        if finish_one and running:
            key = sorted(running)[0]
            state.release(key)
            del running[key]


@settings(max_examples=60, deadline=None)
@given(jobs)
def test_work_the_empty_factory_can_host_is_placed_there(job: JobSpec) -> None:
    empty = ClusterState(TOPO)
    req = request(job)
    never = static_check(empty, req)
    got = make_policy("aifactory").place(empty, req)
    assert (never is None) == isinstance(got, Placement), (never, got)


def test_openb_lists_give_cpu_and_memory_when_asked() -> None:
    from benchmarks.common import openb_path

    nodes = load_openb_nodes(openb_path("openb_node_list_gpu_node.csv"), host_resources=True)
    assert all(n.cpu_milli > 0 and n.memory_mib > 0 for n in nodes)
    assert load_openb_nodes(openb_path("openb_node_list_gpu_node.csv"))[0].cpu_milli == 0
    pods = read_openb_pods(openb_path("openb_pod_list_multigpu50.csv"), host_resources=True)
    first = pods.jobs[0].spec
    assert (first.cpu_milli, first.memory_mib) == (12000, 16384)


# ---------------------------------------------------------------- manifests and factories


def _training(**extra: object) -> dict[str, object]:
    return {"apiVersion": "aifactory.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": "t"}, "spec": {"workers": 2, **extra}}


@pytest.mark.parametrize(("cpu", "memory", "expected"), [
    (4, "64Gi", (4000, 65536)), ("2.5", "512Mi", (2500, 512)), ("500m", "1G", (500, 954)),
    (None, None, (0, 0))])
def test_cpu_and_memory_per_worker_are_kubernetes_quantities(
        cpu: object, memory: object, expected: tuple[int, int]) -> None:
    from aifactory.controller.core.spec import job_from_manifest

    extra = {k: v for k, v in (("cpuPerWorker", cpu), ("memoryPerWorker", memory)) if v}
    spec = job_from_manifest(_training(**extra))
    assert (spec.cpu_milli, spec.memory_mib) == expected


@pytest.mark.parametrize(("field", "value"), [("cpuPerWorker", "lots"),
                                              ("memoryPerWorker", "64 gigs"),
                                              ("cpuPerWorker", True)])
def test_a_bad_quantity_names_the_field(field: str, value: object) -> None:
    from aifactory.controller.core.errors import SpecError
    from aifactory.controller.core.spec import job_from_manifest

    with pytest.raises(SpecError, match=rf"spec\.{field}.*quantity"):
        job_from_manifest(_training(**{field: value}))


def test_inference_replicas_ask_per_replica() -> None:
    from aifactory.controller.core.spec import jobs_from_manifest

    replicas = jobs_from_manifest({
        "apiVersion": "aifactory.io/v1alpha1", "kind": "InferenceService",
        "metadata": {"name": "s"}, "spec": {"model": "m", "minReplicas": 2,
                                            "cpuPerReplica": 8, "memoryPerReplica": "32Gi"}})
    assert [(r.cpu_milli, r.memory_mib) for r in replicas] == [(8000, 32768)] * 2


FACTORY_YAML = """
apiVersion: aifactory.io/v1alpha1
kind: SimulatedFactory
metadata:
  name: cpu
spec:
  nodeGroups:
  - gpuModel: H200
    gpusPerNode: 8
    racksPerBlock: 1
    nodesPerRack: 2
    cpuPerNode: 64
    memoryPerNode: 1Ti
"""


def test_a_factory_gives_node_cpu_and_the_scheduler_holds_jobs_to_it(tmp_path: object) -> None:
    from pathlib import Path

    from aifactory.controller.inputs.factory import load_factory

    path = Path(str(tmp_path)) / "cpu.yaml"
    path.write_text(FACTORY_YAML)
    topo = load_factory(path).topology()
    assert {(n.cpu_milli, n.memory_mib) for n in topo.nodes} == {(64000, 1024 * 1024)}
    state = ClusterState(topo)
    config = SchedulerConfig(policy=make_policy("aifactory"), empty=ClusterState(topo),
                             watts_per_gpu=lambda spec: 0.0)
    # Two jobs of 1 GPU and 40 cores: each node's CPU holds one, though GPUs are plenty.
    jobs = [QueuedJob(JobSpec(f"j{i}", gpus_per_worker=1, cpu_milli=40_000), 0.0, i)
            for i in range(3)]
    result = schedule(state, jobs, [], 0.0, config)
    assert len(result.admitted) == 2
    assert len({a.placement.nodes for a in result.admitted}) == 2
    assert "CPU or memory" in result.waiting["default/j2"]
