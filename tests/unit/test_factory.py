"""SimulatedFactory YAML, built-in factories and CSV inventories as factories."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from aifactory.controller.core.errors import InputFileError, SpecError, SpecFileError
from aifactory.controller.core.topology import BLOCK_LABEL, CLIQUE_LABEL, RACK_LABEL
from aifactory.controller.inputs.factory import BUILTIN_FACTORIES, load_factory, parse_factory
from tests.shared_data import SHARED, needs_shared

REPO = Path(__file__).resolve().parents[2]

#   A two-group factory, as the YAML below draws it:
#
#   factory
#   ├── b0 ── b0-r0 [h200-b0-r0-n00, n01]   b0-r1 [h200-b0-r1-n00, n01]   (H200 x8)
#   └── b1 ── b1-r0 [l40s-b1-r0-n00]        b1-r1 [l40s-b1-r1-n00]        (L40S x4)
TWO_GROUPS = """\
apiVersion: aifactory.io/v1alpha1
kind: SimulatedFactory
metadata: {name: two}
spec:
  nodeGroups:
  - gpuModel: NVIDIA-H200
    gpusPerNode: 8
    blocks: 1
    racksPerBlock: 2
    nodesPerRack: 2
    namePrefix: h200
  - gpuModel: L40S
    gpusPerNode: 4
    racksPerBlock: 2
    nodesPerRack: 1
  queues:
  - {name: default, nominalGPUs: 32, cohort: all}
  - {name: research, nominalGPUs: 8, borrowingLimitGPUs: 0, cohort: all, weight: 2}
  powerBudgets:
  - {name: factory, watts: 15000}
  - {name: h200-rack, watts: 9000, selector: {aifactory.io/rack: b0-r1}}
  cost: {electricityDollarsPerKWh: 0.2}
  baseWattsPerNode: 500
"""


def doc(text: str = TWO_GROUPS) -> dict[str, Any]:
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


# --------------------------------------------------------------------------- built-ins


def test_small_is_the_default_32_h200_nodes_in_4_racks() -> None:
    small = load_factory()
    assert small.name == "small"
    assert (len(small.nodes), small.total_gpus) == (32, 256)
    topo = small.topology()
    assert topo.describe() == "2 blocks > 4 racks > 32 nodes, 256 GPUs (H200)"
    assert [q.name for q in small.queues] == ["default"]
    factory, rack = small.power_budgets
    assert factory.selector == () and 0.80 <= factory.watts / small.peak_watts() <= 0.90
    assert rack.selector == ((RACK_LABEL, "b0-r0"),) and rack.watts == 40000
    assert small.cost.electricity_dollars_per_kwh == 0.10


def test_100k_has_100352_gpus_in_racks_that_fit_a_512_gpu_gang() -> None:
    big = load_factory("100k")
    assert big.total_gpus == 100_352
    racks = Counter(n.label(RACK_LABEL) for n in big.nodes)
    assert len(racks) == 14 * 14 and set(racks.values()) == {64}
    assert big.nodes[0].gpus * 64 >= 512
    assert len({n.name for n in big.nodes}) == len(big.nodes)


def test_nvl72_has_72_gpu_nvlink_domains_under_racks() -> None:
    nvl = load_factory("nvl72")
    assert [lv.name for lv in nvl.levels] == ["block", "rack", "nvlink", "node"]
    assert nvl.topology().describe() == "2 blocks > 4 racks > 4 nvlinks > 72 nodes, 288 GPUs (B200)"
    domains = Counter(n.label(CLIQUE_LABEL) for n in nvl.nodes)
    assert set(domains.values()) == {18} and nvl.nodes[0].gpus == 4


@pytest.mark.parametrize("name", BUILTIN_FACTORIES)
def test_package_copy_is_identical_to_deploy_clusters(name: str) -> None:
    deployed = REPO / "deploy" / "clusters" / f"{name}.yaml"
    packaged = REPO / "controller" / "data" / f"{name}.yaml"
    assert deployed.read_bytes() == packaged.read_bytes()
    assert not deployed.is_symlink() and not packaged.is_symlink()


def test_every_deployed_cluster_is_packaged() -> None:
    deployed = {p.name for p in (REPO / "deploy" / "clusters").glob("*.yaml")}
    packaged = {p.name for p in (REPO / "controller" / "data").glob("*.yaml")}
    assert deployed == packaged == {f"{n}.yaml" for n in BUILTIN_FACTORIES}


def test_a_path_to_a_deployed_cluster_loads_the_same_factory() -> None:
    by_path = load_factory(REPO / "deploy" / "clusters" / "small.yaml")
    assert by_path.nodes == load_factory("small").nodes


# --------------------------------------------------------------------------- parsing


def test_node_groups_get_globally_unique_blocks_and_racks() -> None:
    factory = parse_factory(doc())
    assert [n.name for n in factory.nodes] == [
        "h200-b0-r0-n00", "h200-b0-r0-n01", "h200-b0-r1-n00", "h200-b0-r1-n01",
        "l40s-b1-r0-n00", "l40s-b1-r1-n00"]
    assert [n.label(RACK_LABEL) for n in factory.nodes][::2] == ["b0-r0", "b0-r1", "b1-r0"]
    assert {n.gpu_model for n in factory.nodes} == {"H200", "L40S"}  # canonical names
    assert factory.nodes[0].label("nvidia.com/gpu.product") == "H200"
    assert factory.topology().describe() == (
        "2 blocks > 4 racks > 6 nodes, 40 GPUs (H200, L40S)")
    research = factory.queues[1]
    assert (research.borrowing_limit_gpus, research.cohort, research.weight) == (0, "all", 2)
    assert factory.cost.electricity_dollars_per_kwh == 0.2
    assert factory.cost.hardware_dollars_per_gpu_hour == 2.0
    assert factory.base_watts_per_node == 500
    assert factory.peak_watts() == pytest.approx(32 * 691.0 + 8 * 345.5 + 6 * 500)


def test_levels_default_to_nvlink_levels_when_a_group_has_domains() -> None:
    raw = doc()
    raw["spec"]["nodeGroups"][0]["nvlinkDomainsPerRack"] = 2
    factory = parse_factory(raw)
    assert [lv.name for lv in factory.levels] == ["block", "rack", "nvlink", "node"]
    assert factory.nodes[1].label(CLIQUE_LABEL) == "b0-r0-nvl1"


def test_levels_may_name_their_own_labels() -> None:
    raw = doc()
    raw["spec"]["levels"] = ["zone", {"name": "row", "nodeLabel": "example.com/row"}, "node"]
    assert [lv.node_label for lv in parse_factory(raw).levels] == [
        "topology.kubernetes.io/zone", "example.com/row", "kubernetes.io/hostname"]


def test_queues_default_to_one_queue_over_every_gpu() -> None:
    raw = doc()
    del raw["spec"]["queues"]
    (queue,) = parse_factory(raw).queues
    assert (queue.name, queue.nominal_gpus) == ("default", 40)


def _set(path: str, value: Any) -> Any:
    """A mutation of the TWO_GROUPS document: set ``a.b[0].c`` to ``value`` (None deletes)."""
    def mutate(raw: dict[str, Any]) -> None:
        parts = [int(p) if p.isdigit() else p for p in path.replace("[", ".").replace(
            "]", "").split(".")]
        target: Any = raw
        for part in parts[:-1]:
            target = target[part]
        if value is None:
            del target[parts[-1]]
        else:
            target[parts[-1]] = value
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (_set("spec.nodeGroups[0].gpusPerNode", 0),
     "spec.nodeGroups[0].gpusPerNode: must be an integer >= 1, got 0"),
    (_set("spec.nodeGroups[0].gpusPerNode", None),
     "spec.nodeGroups[0].gpusPerNode: is required (an integer >= 1)"),
    (_set("spec.nodeGroups[1].gpuModel", "Z9000"),
     "spec.nodeGroups[1].gpuModel: unknown GPU model 'Z9000'; known models are A10, A100,"),
    (_set("spec.nodeGroups[0].nvlinkDomainsPerRack", 3),
     "spec.nodeGroups[0].nvlinkDomainsPerRack: must be an integer between 1 and 2, got 3"),
    (_set("spec.nodeGroups[0].namePrefix", "H_200"),
     "spec.nodeGroups[0].namePrefix: must be lower-case letters, digits and '-'"),
    (_set("spec.nodeGroups[0].nodesPerRak", 2),
     "spec.nodeGroups[0].nodesPerRak: unknown field; valid fields are gpuModel,"),
    (_set("spec.nodeGroups", []), "spec.nodeGroups: is required"),
    (_set("spec.queues[1].name", "default"),
     "spec.queues[1].name: duplicate queue name 'default' (also spec.queues[0])"),
    (_set("spec.queues[0].nominalGPUs", -1),
     "spec.queues[0].nominalGPUs: must be a number >= 0, got -1"),
    (_set("spec.powerBudgets[0].watts", 0),
     "spec.powerBudgets[0].watts: must be a number > 0, got 0"),
    (_set("spec.powerBudgets[1].name", "factory"),
     "spec.powerBudgets[1].name: duplicate power budget name 'factory'"),
    (_set("spec.powerBudgets[1].selector", {"aifactory.io/rack": "r9"}),
     "spec.powerBudgets[1].selector: matches no node: {'aifactory.io/rack': 'r9'} (rack "
     "labels look like aifactory.io/rack: b0-r0)"),
    (_set("spec.cost.electricityDollarsPerKWh", "cheap"),
     "spec.cost.electricityDollarsPerKWh: must be a number >= 0, got 'cheap'"),
    (_set("spec.baseWattsPerNode", -5), "spec.baseWattsPerNode: must be a number >= 0"),
    (_set("spec.levels", ["block", "node", "rack"]),
     "spec.levels: the last level must be 'node', got ['block', 'node', 'rack']"),
    (_set("spec.levels", ["block", "shelf", "node"]),
     "spec.levels[1]: unknown level 'shelf'; built-in levels are zone, block, rack, nvlink, "
     "node"),
    (_set("apiVersion", "v1"), "apiVersion: must be 'aifactory.io/v1alpha1', got 'v1'"),
    (_set("kind", "Cluster"), "kind: must be 'SimulatedFactory', got 'Cluster'"),
    (_set("metadata", None), "metadata: must be a mapping, got None"),
], ids=["zero GPUs per node", "GPUs per node left out", "an unknown GPU model",
        "NVLink domains that do not divide a rack",
        "a name prefix that is not a DNS label", "a misspelt field",
        "no node groups", "two queues with one name", "a negative quota",
        "a power budget of zero watts", "two budgets with one name",
        "a selector that matches no node", "a price that is not a number",
        "a negative base power", "levels that do not end at node", "an unknown level name",
        "another API version", "another kind", "no metadata"])
def test_invalid_spec_names_the_field(mutate: Any, message: str) -> None:
    raw = doc()
    mutate(raw)
    with pytest.raises(SpecError) as caught:
        parse_factory(raw)
    assert message in str(caught.value)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize(("old", "new", "message"), [
    ("gpusPerNode: 8", "gpusPerNode: 0",
     "bad.yaml:7: spec.nodeGroups[0].gpusPerNode: must be an integer >= 1, got 0"),
    ("gpuModel: L40S", "gpuModel: L4", "bad.yaml:12: spec.nodeGroups[1].gpuModel: unknown GPU "
     "model 'L4'"),
    ("{name: factory, watts: 15000}", "{name: factory, watts: -1}",
     "bad.yaml:20: spec.powerBudgets[0].watts: must be a number > 0, got -1"),
    ("  - {name: research,", "  - {name: default,",
     "bad.yaml:18: spec.queues[1].name: duplicate queue name 'default'"),
    ("    nodesPerRack: 1\n", "",
     "bad.yaml:12: spec.nodeGroups[1].nodesPerRack: is required"),
    ("spec:\n", "spec: [\n", "bad.yaml:6: invalid YAML: expected the node content, but found "
     "'-' (column 3)"),
], ids=["zero GPUs per node, on its line", "an unknown model, on its line",
        "negative watts, on the budget's line", "a duplicate queue, on its line",
        "a missing field, on its group's first line", "broken YAML syntax"])
def test_yaml_file_errors_name_file_line_and_field(tmp_path: Path, old: str, new: str,
                                                   message: str) -> None:
    assert old in TWO_GROUPS
    path = tmp_path / "bad.yaml"
    path.write_text(TWO_GROUPS.replace(old, new, 1))
    with pytest.raises(InputFileError) as caught:
        load_factory(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_spec_file_error_is_both_a_spec_error_and_a_file_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(TWO_GROUPS.replace("gpusPerNode: 8", "gpusPerNode: 0"))
    with pytest.raises(SpecFileError) as caught:
        load_factory(path)
    error = caught.value
    assert isinstance(error, SpecError) and isinstance(error, InputFileError)
    assert (error.field, error.line, error.path) == ("spec.nodeGroups[0].gpusPerNode", 7,
                                                     str(path))


@pytest.mark.parametrize(("name", "message"), [
    ("huge", "huge: no such file; built-in factories are small, 100k, nvl72"),
    ("missing.yaml", "missing.yaml: no such file"),
], ids=["an unknown built-in name", "a missing YAML file"])
def test_missing_factory_is_named(name: str, message: str) -> None:
    with pytest.raises(InputFileError) as caught:
        load_factory(name)
    assert str(caught.value) == message


@pytest.mark.parametrize(("content", "gpus", "racks"), [
    ("sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,8,G2\nn1,1,1,2,T4\nn2,1,1,0,\n", 10, 2),
    ("ip,DSW,PSW,ASW\nh0,G6,P1,S1\nh1,G6,P1,S1\nh2,G6,P2,S1\n", 24, 2),
    ("gpu_model,gpu_capacity_num,cpu_num,node_name\nH800,8,96,0\nA10,1,32,1\n", 9, 2),
], ids=["an openb node list gets racks by model", "a Lingjun topology keeps its racks",
        "a spot-GPU node list gets racks by model"])
def test_csv_inventories_are_detected_by_header(tmp_path: Path, content: str, gpus: int,
                                                racks: int) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text(content)
    factory = load_factory(path)
    assert factory.name == "fleet" and factory.total_gpus == gpus
    assert len({n.label(RACK_LABEL) for n in factory.nodes}) == racks
    assert all(n.label(BLOCK_LABEL) for n in factory.nodes)
    assert [q.nominal_gpus for q in factory.queues] == [gpus]


def test_unknown_csv_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputFileError, match=r"other.csv:1: unrecognised CSV header"):
        load_factory(path)


@needs_shared
def test_real_inventories_load_as_factories() -> None:
    assert SHARED is not None
    openb = load_factory(SHARED / "traces" / "alibaba-clusterdata-gpu-v2023" /
                         "openb_node_list_gpu_node.csv")
    assert (len(openb.nodes), openb.total_gpus) == (1213, 6212)
    lingjun = load_factory(SHARED / "traces" / "alibaba-lingjun-dataset-2023" / "topo.csv")
    assert lingjun.topology().describe() == "3 blocks > 119 racks > 847 nodes, 6776 GPUs (H100)"


def test_yaml_in_the_docstring_example_shape_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "example.yaml"
    path.write_text(textwrap.dedent("""\
        apiVersion: aifactory.io/v1alpha1
        kind: SimulatedFactory
        metadata: {name: small}
        spec:
          levels: [block, rack, node]
          nodeGroups:
          - {gpuModel: H200, gpusPerNode: 8, blocks: 2, racksPerBlock: 2, nodesPerRack: 8,
             namePrefix: h200}
          queues: [{name: default, nominalGPUs: 256, borrowingLimitGPUs: null, cohort: null}]
          powerBudgets: [{name: factory, watts: 160000},
                         {name: rack-b0-r0, watts: 40000, selector: {aifactory.io/rack: b0-r0}}]
          cost: {electricityDollarsPerKWh: 0.10, hardwareDollarsPerGPUHour: 2.00}
          baseWattsPerNode: 0
        """))
    factory = load_factory(path)
    assert factory.total_gpus == 256 and factory.nodes[9].name == "h200-b0-r1-n01"
