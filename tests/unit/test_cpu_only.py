"""Zero-GPU (CPU-only) workers: specs, placement by every policy, reasons, FGD, traces.

Factory used below (one block, one rack per node kind, CPU in cores):

              factory (24 GPUs)
             /                 \\
     rack lean                  rack fat
     lean-0  lean-1             fat-0
     8 GPUs, 32 cores, 256 GiB  8 GPUs, 128 cores, 1 TiB
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aifactory.controller.cli.main import main
from aifactory.controller.core.errors import SpecError
from aifactory.controller.core.spec import API_VERSION, JobSpec, jobs_from_manifest
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.core.topology import BLOCK_LABEL, RACK_LABEL, NodeInfo, Topology
from aifactory.controller.core.units import MILLI_PER_GPU
from aifactory.controller.inputs.traces import read_openb_pods
from aifactory.controller.placement.explain import explain_unplaced, static_check
from aifactory.controller.placement.fragmentation import (
    WorkloadMix,
    fragment_milli,
)
from aifactory.controller.placement.registry import POLICY_NAMES, make_policy
from aifactory.controller.placement.request import PlacementRequest, Unplaced, node_workers
from aifactory.controller.placement.topology_aware import TopologyAwarePolicy
from aifactory.controller.sim.fill import fill
from tests.unit.test_traces import OPENB, trace

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


def cpu_job(name: str = "c", workers: int = 1, cores: int = 8) -> JobSpec:
    return JobSpec(name, workers=workers, gpus_per_worker=0, cpu_milli=cores * CORE,
                   memory_mib=GIB)


def manifest(kind: str, spec: dict[str, object]) -> dict[str, object]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "x"}, "spec": spec}


# --------------------------------------------------------------------------- specs


def test_a_training_job_with_zero_gpus_and_cpu_is_a_cpu_only_job() -> None:
    (job,) = jobs_from_manifest(manifest("TrainingJob", {
        "workers": 2, "gpusPerWorker": 0, "cpuPerWorker": "4"}))
    assert job.cpu_only and job.total_gpus == 0 and job.gpu_equivalents == 0.0
    assert (job.cpu_milli, job.workers) == (4000, 2)


@pytest.mark.parametrize(("kind", "spec", "field"), [
    ("TrainingJob", {"workers": 1, "gpusPerWorker": 0}, "spec.gpusPerWorker"),
    ("InferenceService", {"model": "m", "gpusPerReplica": 0}, "spec.gpusPerReplica"),
    ("InferenceService", {"model": "m", "gpusPerReplica": 0, "gpuMilliPerReplica": 500,
                          "cpuPerReplica": 2}, "spec.gpuMilliPerReplica"),
], ids=["training asking nothing", "inference asking nothing", "a share of no GPU"])
def test_a_zero_gpu_worker_that_asks_for_nothing_is_refused_naming_the_field(
        kind: str, spec: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as err:
        jobs_from_manifest(manifest(kind, spec))
    assert err.value.field == field


def test_a_cpu_only_inference_replica_is_accepted() -> None:
    replicas = jobs_from_manifest(manifest("InferenceService", {
        "model": "m", "gpusPerReplica": 0, "memoryPerReplica": "8Gi", "replicas": 2,
        "maxReplicas": 2}))
    assert [r.cpu_only for r in replicas] == [True, True]


# --------------------------------------------------------------------------- placement


def test_node_workers_counts_cpu_only_workers_by_cpu_and_memory() -> None:
    # Used to raise ZeroDivisionError (a worker of 0 GPUs).
    state = ClusterState(TOPO)
    assert node_workers(state, request(cpu_job(cores=10)), LEAN0) == 3
    assert node_workers(state, request(cpu_job(cores=10)), FAT) == 12
    assert state.worker_capacity(TOPO.root, 0) >= 10 ** 9  # GPUs never bind


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_places_cpu_only_work_on_cpu_and_takes_no_gpu(policy: str) -> None:
    state = ClusterState(TOPO)
    got = make_policy(policy, seed=1).place(state, request(cpu_job(cores=100)))
    assert isinstance(got, Placement), got
    assert got.nodes == (FAT,) and got.gpu_count == 0
    state.allocate(got)
    assert state.cpu_free[FAT] == 28 * CORE and state.free_whole_gpus == 24
    state.check_consistency()


@pytest.mark.parametrize("policy", [p for p in POLICY_NAMES if p != "per-pod"])
def test_a_cpu_only_gang_splits_over_nodes_where_cpu_allows(policy: str) -> None:
    # 3 workers of 30 cores: one fits each lean node, the third goes to fat-0.
    state = ClusterState(TOPO)
    state.allocate(Placement("hog", (WorkerSlot(FAT, (), MILLI_PER_GPU, 98 * CORE),)))
    got = make_policy(policy, seed=1).place(state, request(cpu_job("g", 3, 30)))
    assert isinstance(got, Placement) and got.complete, got
    assert got.nodes == tuple(sorted((LEAN0, LEAN1, FAT)))
    state.allocate(got)
    state.check_consistency()


def test_cpu_only_work_that_fits_nowhere_now_says_how_much_cpu_is_free() -> None:
    state = ClusterState(TOPO)
    got = make_policy("aifactory").place(state, request(cpu_job(cores=200)))
    assert isinstance(got, Unplaced)
    assert got.reason == ("CPU-only worker waits: no node has 200000m CPU and 1024 MiB memory "
                          "free; the most free on one node is 128000m CPU, 1048576 MiB memory "
                          "(room for 0 of 1 workers)")
    never = static_check(ClusterState(TOPO), request(cpu_job(cores=200)))
    assert never is not None and never.permanent
    assert never.reason.startswith("CPU-only worker asking 200000m CPU and 1024 MiB memory "
                                   "per worker fits no node: the most such a node has is "
                                   "128000m CPU, 1048576 MiB")
    assert explain_unplaced(state, request(cpu_job(cores=20))).reason.startswith(
        "CPU-only worker waits: CPU and memory for")


# --------------------------------------------------------------------------- FGD


def test_fgd_counts_every_free_gpu_as_fragment_for_a_cpu_only_shape() -> None:
    # FGD (ATC'23): a task asking no GPU can use none; the node's free GPUs are fragment.
    free = (1000, 1000, 400)
    cpu_only = ((1.0, 0, MILLI_PER_GPU, None, 4000, 0),)
    assert fragment_milli(0, free, cpu_only, 64_000, -1) == 2400
    half = ((0.5, 0, MILLI_PER_GPU, None, 4000, 0), (0.5, 1, MILLI_PER_GPU, None, 0, 0))
    assert fragment_milli(0, free, half, 64_000, -1) == 0.5 * 2400 + 0.5 * 400


def test_fgd_puts_cpu_only_work_where_taking_cpu_strands_no_gpus() -> None:
    # lean-0 has its GPUs taken; lean-1 and fat-0 are idle. The typical GPU task asks 24
    # cores per GPU: 10 cores taken on lean-1 would strand its GPUs for it.
    state = ClusterState(TOPO)
    state.allocate(Placement("full", (WorkerSlot(LEAN0, tuple(TOPO.gpu_range(LEAN0)),
                                                 MILLI_PER_GPU, 8 * CORE),)))
    policy = TopologyAwarePolicy()
    mix = WorkloadMix()
    for i in range(20):
        policy.learn(mix, request(JobSpec(f"g{i}", cpu_milli=24 * CORE)), True)
    got = policy.place(state, request(cpu_job(cores=10)), None, mix)
    assert isinstance(got, Placement) and got.nodes == (LEAN0,)


# --------------------------------------------------------------------------- traces, fill


def test_openb_cpu_only_pods_are_zero_gpu_jobs_when_cpu_is_scheduled() -> None:
    loaded = read_openb_pods(trace(OPENB, "openb_pod_list_default.csv"), host_resources=True)
    cpu_only = [j.spec for j in loaded.jobs if j.spec.cpu_only]
    assert (len(loaded.jobs), len(cpu_only), loaded.cpu_only_pods) == (8152, 1088, 1088)
    assert all(s.cpu_milli > 0 and s.gpu_equivalents == 0 and not s.gpu_models
               for s in cpu_only)
    gpus_only = read_openb_pods(trace(OPENB, "openb_pod_list_default.csv"))
    assert (len(gpus_only.jobs), gpus_only.cpu_only_pods) == (7064, 1088)


def test_fill_schedules_cpu_only_pods_and_they_add_no_gpu_demand() -> None:
    state = ClusterState(TOPO)
    jobs = [cpu_job("c0", cores=100), JobSpec("g0", gpus_per_worker=8, cpu_milli=8 * CORE),
            cpu_job("c1", cores=30), JobSpec("g1", gpus_per_worker=8, cpu_milli=8 * CORE),
            JobSpec("g2", gpus_per_worker=8, cpu_milli=30 * CORE)]
    result = fill(state, jobs, make_policy("aifactory"), checkpoints=(1.0,))
    assert (result.jobs_placed, result.jobs_failed) == (4, 1)
    assert result.final_allocation_rate == pytest.approx(16 / 24)
    state.check_consistency()


# --------------------------------------------------------------------------- simulate


NODES_CSV = """sn,cpu_milli,memory_mib,gpu,model
n0,16000,65536,2,T4
n1,16000,65536,2,T4
"""
# Two CPU-only pods take 12 cores each: a node with one keeps 4 cores, too few for the
# 8-core GPU pods, so with CPU scheduled one node's GPUs are stranded.
PODS_CSV = """name,cpu_milli,memory_mib,num_gpu,gpu_milli
p0,12000,1024,0,0
p1,12000,1024,0,0
p2,8000,1024,2,1000
p3,8000,1024,2,1000
"""


@pytest.mark.parametrize(("flags", "placed", "failed", "line"), [
    ((), 2, 2, "4 jobs (2 CPU-only), mode fill; GPUs, CPU and memory scheduled"),
    (("--gpus-only",), 2, 0, "2 jobs, mode fill; GPUs scheduled (--gpus-only)"),
], ids=["CPU and memory scheduled from the node list", "--gpus-only"])
def test_simulate_schedules_cpu_and_memory_when_the_inventory_gives_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: tuple[str, ...],
        placed: int, failed: int, line: str) -> None:
    (tmp_path / "nodes.csv").write_text(NODES_CSV)
    (tmp_path / "pods.csv").write_text(PODS_CSV)
    out = tmp_path / "r.json"
    assert main(["simulate", "--cluster", str(tmp_path / "nodes.csv"), "--workload",
                 str(tmp_path / "pods.csv"), "--mode", "fill", "--no-progress", "--json",
                 str(out), *flags]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert (row["jobs_placed"], row["jobs_failed"]) == (placed, failed)
    assert line in " ".join(capsys.readouterr().out.split())
