"""Trace loaders: real shared traces give the counts their README states; bad rows are named."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from aifactory.controller.core.errors import InputFileError, SpecError
from aifactory.controller.core.spec import JobKind
from aifactory.controller.core.topology import BLOCK_LABEL, RACK_LABEL, NodeInfo, Topology
from aifactory.controller.inputs.traces import (
    HOST_ID_LABEL,
    assign_racks,
    load_openb_nodes,
    load_openb_pods,
    load_spot_nodes,
    load_topology_csv,
    overlay_topology,
    read_openb_pods,
)
from tests.shared_data import SHARED, needs_shared

OPENB = "alibaba-clusterdata-gpu-v2023"
TOPO = ("alibaba-lingjun-dataset-2023", "topo.csv")

POD_HEADER = ("name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,"
              "creation_time,deletion_time,scheduled_time")
GOOD_POD = "openb-pod-{i:04d},6000,12288,1,1000,,LS,Running,{i},{j},{i}"


def trace(*parts: str) -> Path:
    assert SHARED is not None
    return SHARED / "traces" / Path(*parts)


# --------------------------------------------------------------------------- real traces


@needs_shared
def test_openb_gpu_node_list_has_1213_nodes_and_6212_gpus() -> None:
    nodes = load_openb_nodes(trace(OPENB, "openb_node_list_gpu_node.csv"))
    assert (len(nodes), sum(n.gpus for n in nodes)) == (1213, 6212)
    mix = Counter((n.gpu_model, n.gpus) for n in nodes)
    assert mix[("G2", 8)] == 549 and mix[("T4", 2)] == 387 and mix[("A10", 1)] == 2
    assert nodes[0].label("nvidia.com/gpu.product") == nodes[0].gpu_model
    assert nodes[0].label("kubernetes.io/hostname") == nodes[0].name


@needs_shared
def test_openb_all_node_list_keeps_cpu_only_nodes_only_when_asked() -> None:
    path = trace(OPENB, "openb_node_list_all_node.csv")
    assert len(load_openb_nodes(path)) == 1213
    everything = load_openb_nodes(path, include_cpu_only=True)
    assert len(everything) == 1523
    assert sum(1 for n in everything if n.gpus == 0) == 310


@needs_shared
def test_openb_default_pods_are_7064_gpu_pods_with_readme_durations() -> None:
    loaded = read_openb_pods(trace(OPENB, "openb_pod_list_default.csv"))
    jobs = loaded.jobs
    assert (len(jobs), loaded.cpu_only_pods, loaded.has_timestamps) == (7064, 1088, True)
    assert Counter(j.spec.gpus_per_worker for j in jobs) == {1: 6989, 2: 16, 4: 15, 8: 44}
    assert sum(1 for j in jobs if j.spec.is_fractional) == 3078
    durations = sorted(j.duration_seconds for j in jobs if j.duration_seconds is not None)
    assert len(durations) == 7064

    def quantile(q: float) -> float:
        return durations[math.ceil(q * len(durations)) - 1]

    assert (quantile(0.5), quantile(0.9), quantile(0.99)) == (545, 6260, 114036)
    arrivals = [j.arrival_seconds for j in jobs]
    assert arrivals == sorted(arrivals)  # type: ignore[type-var]
    first = jobs[1].spec  # openb-pod-0001,6000,12288,1,460,,LS,...
    assert (first.name, first.namespace, first.queue, first.kind) == (
        "openb-pod-0001", "openb", "default", JobKind.TRAINING)
    assert (first.workers, first.gpus_per_worker, first.gpu_milli) == (1, 1, 460)
    assert first.priority == 100 and first.expected_runtime_seconds is None


@needs_shared
def test_openb_multigpu50_has_no_timestamps_and_the_readme_counts() -> None:
    jobs = load_openb_pods(trace(OPENB, "openb_pod_list_multigpu50.csv"))
    assert len(jobs) == 9061 - 1088
    counts = Counter(j.spec.gpus_per_worker for j in jobs)
    assert (counts[2], counts[4], counts[8]) == (222, 206, 556)
    assert all(j.arrival_seconds is None and j.duration_seconds is None for j in jobs)
    assert all(j.spec.priority == 0 for j in jobs)


@needs_shared
def test_openb_gpuspec33_constrains_2388_pods_to_listed_models() -> None:
    jobs = load_openb_pods(trace(OPENB, "openb_pod_list_gpuspec33.csv"))
    constrained = [j for j in jobs if j.spec.gpu_models]
    assert len(constrained) == 2388
    assert ("V100M16", "V100M32") in {j.spec.gpu_models for j in constrained}


@needs_shared
@pytest.mark.parametrize("share", ["20", "40", "60", "80", "100"])
def test_openb_gpushare_variants_have_7064_single_gpu_or_fewer_pods(share: str) -> None:
    jobs = load_openb_pods(trace(OPENB, f"openb_pod_list_gpushare{share}.csv"))
    assert len(jobs) == 7064


@needs_shared
def test_lingjun_topology_is_847_hosts_in_119_racks_and_3_blocks() -> None:
    nodes = load_topology_csv(trace(*TOPO))
    assert len(nodes) == 847
    assert len({n.label(RACK_LABEL) for n in nodes}) == 119
    assert Counter(n.label(BLOCK_LABEL) for n in nodes) == {"P8": 179, "P12": 306, "P10": 362}
    assert nodes[0].name == "host-000" and nodes[-1].name == "host-846"
    assert len(nodes[0].label(HOST_ID_LABEL) or "") == 64
    rack_sizes = Counter(Counter(n.label(RACK_LABEL) for n in nodes).values())
    assert rack_sizes == {8: 68, 7: 23, 6: 15, 5: 7, 4: 2, 3: 1, 2: 3}
    topo = Topology.build(nodes)
    assert topo.describe() == "3 blocks > 119 racks > 847 nodes, 6776 GPUs (H100)"


@needs_shared
def test_spot_node_list_has_4278_nodes_and_10412_gpus() -> None:
    nodes = load_spot_nodes(trace("alibaba-clusterdata-spot-gpu-v2026", "node_info_df.csv"))
    assert (len(nodes), sum(n.gpus for n in nodes)) == (4278, 10412)
    assert nodes[0].name == "spot-node-0"


@needs_shared
def test_overlay_puts_openb_nodes_on_real_racks_without_overfilling_them() -> None:
    nodes = load_openb_nodes(trace(OPENB, "openb_node_list_gpu_node.csv"))
    placed = overlay_topology(nodes, trace(*TOPO))
    assert len(placed) == 1213 and {n.name for n in placed} == {n.name for n in nodes}
    sizes = Counter(n.label(RACK_LABEL) for n in placed)
    assert max(sizes.values()) == 8
    assert len(sizes) == 119 + len({n.label(RACK_LABEL) for n in placed[847:]})
    assert all((n.label(RACK_LABEL) or "").endswith("-x1") for n in placed[847:])
    assert Topology.build(placed).total_gpus == 6212


# --------------------------------------------------------------------------- racks
#
#   input (file order):  t0 T4x2, g0 G2x8, t1 T4x2, g1 G2x8, t2 T4x2, t3 T4x4
#   assign_racks(nodes_per_rack=2, racks_per_block=2):
#
#       b0: b0-r0 [g0 g1]  b0-r1 [t3]        (G2 first, then T4 x4 before T4 x2)
#       b1: b1-r0 [t0 t1]  b1-r1 [t2]


def _nodes(*spec: tuple[str, str, int]) -> list[NodeInfo]:
    return [NodeInfo(name, gpus, model) for name, model, gpus in spec]


INVENTORY = _nodes(("t0", "T4", 2), ("g0", "G2", 8), ("t1", "T4", 2), ("g1", "G2", 8),
                   ("t2", "T4", 2), ("t3", "T4", 4))


@pytest.mark.parametrize(("per_rack", "per_block", "expected"), [
    (2, 2, {"g0": "b0-r0", "g1": "b0-r0", "t3": "b0-r1", "t0": "b1-r0", "t1": "b1-r0",
            "t2": "b1-r1"}),
    (8, 1, {"g0": "b0-r0", "g1": "b0-r0", "t3": "b1-r0", "t0": "b2-r0", "t1": "b2-r0",
            "t2": "b2-r0"}),
    (1, 100, {"g0": "b0-r0", "g1": "b0-r1", "t3": "b0-r2", "t0": "b0-r3", "t1": "b0-r4",
              "t2": "b0-r5"}),
], ids=["two per rack: models never share a rack",
        "big racks still split at model boundaries",
        "one node per rack, all in one block"])
def test_assign_racks_groups_models(per_rack: int, per_block: int,
                                    expected: dict[str, str]) -> None:
    racked = assign_racks(INVENTORY, nodes_per_rack=per_rack, racks_per_block=per_block)
    assert {n.name: n.label(RACK_LABEL) for n in racked} == expected
    assert all((n.label(RACK_LABEL) or "").startswith(f"{n.label(BLOCK_LABEL)}-")
               for n in racked)
    assert racked == assign_racks(list(INVENTORY), per_rack, per_block)  # deterministic


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"nodes_per_rack": 0}, "nodes_per_rack"), ({"racks_per_block": 0}, "racks_per_block")],
    ids=["zero nodes per rack", "zero racks per block"])
def test_assign_racks_rejects_empty_racks(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(SpecError, match=f"{field}: must be an integer >= 1, got 0"):
        assign_racks(INVENTORY, **kwargs)


def test_overlay_cycles_the_fabric_with_a_suffix(tmp_path: Path) -> None:
    topo = tmp_path / "topo.csv"
    topo.write_text("ip,DSW,PSW,ASW\nh1,G6,P1,S1\nh2,G6,P2,S1\nh3,G6,P1,S1\n")
    placed = overlay_topology(_nodes(*[(f"n{i}", "H200", 8) for i in range(4)]), topo)
    assert [(n.label(BLOCK_LABEL), n.label(RACK_LABEL), n.label(HOST_ID_LABEL))
            for n in placed] == [("P1", "P1-S1", "h1"), ("P1", "P1-S1", "h3"),
                                 ("P2", "P2-S1", "h2"), ("P1-x1", "P1-S1-x1", "h1")]


# --------------------------------------------------------------------------- bad input


def _pods(tmp_path: Path, bad_row: str, at_line: int = 17,
          name: str = "openb_pod_list_default.csv") -> Path:
    rows = [GOOD_POD.format(i=i, j=i + 10) for i in range(at_line - 2)]
    path = tmp_path / name
    path.write_text("\n".join([POD_HEADER, *rows, bad_row]) + "\n")
    return path


@pytest.mark.parametrize(("row", "message"), [
    ("p,1,1,x,1000,,LS,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'num_gpu': expected an integer 0-8, got 'x'"),
    ("p,1,1,9,1000,,LS,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'num_gpu': expected an integer 0-8, got '9'"),
    ("p,1,1,1,1500,,LS,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'gpu_milli': expected an integer 0-1000, "
     "got '1500'"),
    ("p,1,1,2,500,,LS,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'gpu_milli': must be 1000 when num_gpu > 1"),
    ("p,1,1,1,0,,LS,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'gpu_milli': expected 1-1000 for a pod with "
     "num_gpu >= 1, got 0"),
    ("p,1,1,1,1000,,LS,Running,-5,1,0",
     "openb_pod_list_default.csv:17 column 'creation_time': expected a number >= 0, "
     "got '-5'"),
    ("p,1,1,1,1000,,LS,Running,nan,1,0",
     "openb_pod_list_default.csv:17 column 'creation_time': expected a number >= 0, "
     "got 'nan'"),
    ("p,1,1,1,1000,,LS,Running,100,50,100",
     "openb_pod_list_default.csv:17 column 'deletion_time': must be >= creation_time (100), "
     "got 50"),
    ("p,1,1,1,1000,,Gold,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'qos': expected one of LS, Guaranteed, "
     "Burstable, BE, got 'Gold'"),
    ("openb-pod-0003,1,1,1,1000,,LS,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'name': duplicate pod 'openb-pod-0003' "
     "(first on line 5)"),
    (",1,1,1,1000,,LS,Running,0,1,0",
     "openb_pod_list_default.csv:17 column 'name': must not be empty"),
    ("p,1,1,1,1000,,LS,Running,0,1",
     "openb_pod_list_default.csv:17: expected 11 fields, got 10"),
], ids=["a non-integer GPU count", "more than 8 GPUs", "more than a whole GPU in milli",
        "a GPU fraction on a multi-GPU pod", "a GPU pod asking for zero milli",
        "a negative creation time", "a creation time that is not a number",
        "deleted before created", "an unknown QoS class", "a pod name used twice",
        "an empty pod name", "a short row"])
def test_bad_pod_row_names_file_line_and_column(tmp_path: Path, row: str,
                                                message: str) -> None:
    path = _pods(tmp_path, row)
    with pytest.raises(InputFileError) as caught:
        load_openb_pods(path)
    assert str(caught.value).startswith(str(tmp_path / message.split(":")[0]))
    assert message in str(caught.value)
    assert caught.value.line == 17


def test_valid_small_pod_list_round_trips(tmp_path: Path) -> None:
    path = _pods(tmp_path, "p,1,1,0,0,,BE,Running,3,4,",
                 name="pods.csv")
    path.write_text(path.read_text() + "q,1,1,1,250,A10|T4|A10,Burstable,Pending,5,9,\n")
    loaded = read_openb_pods(path)
    assert loaded.cpu_only_pods == 1 and len(loaded.jobs) == 16
    last = loaded.jobs[-1]
    assert (last.spec.gpu_milli, last.spec.gpu_models, last.spec.priority) == (
        250, ("A10", "T4"), 50)
    assert (last.arrival_seconds, last.duration_seconds) == (5.0, 4.0)


@pytest.mark.parametrize(("content", "message"), [
    ("name,cpu_milli,memory_mib\np,1,1\n", "pods.csv:1: missing required columns: num_gpu, "
     "gpu_milli"),
    ("", "pods.csv:1: empty file"),
    ("name,num_gpu,gpu_milli\n\xff\xfe,1,1\n", "pods.csv: not a readable UTF-8 CSV file"),
], ids=["a header without the GPU columns", "an empty file", "bytes that are not UTF-8"])
def test_unreadable_pod_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "pods.csv"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(InputFileError, match=message):
        load_openb_pods(path)


def test_missing_file_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"absent\.csv: no such file"):
        load_openb_pods(tmp_path / "absent.csv")


@pytest.mark.parametrize(("loader", "content", "message"), [
    (load_openb_nodes, "sn,cpu_milli,memory_mib,gpu,model\nn1,1,1,abc,T4\n",
     "nodes.csv:2 column 'gpu': expected an integer 0-72, got 'abc'"),
    (load_openb_nodes, "sn,cpu_milli,memory_mib,gpu,model\nn1,1,1,2,\n",
     "nodes.csv:2 column 'model': a node with gpu > 0 needs a GPU model"),
    (load_openb_nodes, "sn,cpu_milli,memory_mib,gpu,model\nn1,1,1,2,T4\nn1,1,1,2,T4\n",
     "nodes.csv:3 column 'sn': duplicate node 'n1' (first on line 2)"),
    (load_topology_csv, "ip,DSW,PSW,ASW\nh1,G6,,S1\n",
     "nodes.csv:2 column 'PSW': must not be empty"),
    (load_topology_csv, "ip,DSW,PSW,ASW\nh1,G6,P1,S1\nh1,G6,P1,S2\n",
     "nodes.csv:3 column 'ip': duplicate host 'h1' (first on line 2)"),
    (load_topology_csv, "ip,DSW,PSW,ASW\n", "nodes.csv:2: no hosts"),
    (load_topology_csv, "ip,PSW,ASW\nh1,P1,S1\n", "nodes.csv:1: missing required columns: DSW"),
    (load_spot_nodes, "gpu_model,gpu_capacity_num,cpu_num,node_name\nA10,-1,8,0\n",
     "nodes.csv:2 column 'gpu_capacity_num': expected an integer 0-72, got '-1'"),
], ids=["a non-integer node GPU count", "a GPU node without a model", "a node listed twice",
        "a host without an aggregation switch", "a host listed twice",
        "a topology without hosts", "a topology without the core switch column",
        "a negative spot node GPU count"])
def test_bad_node_row_names_file_line_and_column(
        tmp_path: Path, loader: Callable[[Path], list[NodeInfo]], content: str,
        message: str) -> None:
    path = tmp_path / "nodes.csv"
    path.write_text(content)
    with pytest.raises(InputFileError) as caught:
        loader(path)
    assert message in str(caught.value)


def test_topology_assumes_gpus_per_host(tmp_path: Path) -> None:
    path = tmp_path / "topo.csv"
    path.write_text("ip,DSW,PSW,ASW\nh1,G6,P1,S1\n")
    (node,) = load_topology_csv(path, gpus_per_node=4, gpu_model="H200")
    assert (node.name, node.gpus, node.gpu_model) == ("host-000", 4, "H200")
    with pytest.raises(SpecError, match="gpus_per_node: must be an integer >= 1, got 0"):
        load_topology_csv(path, gpus_per_node=0)
