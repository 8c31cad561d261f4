"""``aifactory operator`` flags: what each backend accepts, and where GPU telemetry comes from.

Nothing here starts kopf or Ray: flags are checked before either starts, and telemetry is
chosen over a control plane built in memory (16 simulated GPUs).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.errors import SpecError
from aifactory.controller.inputs.factory import factory_from_nodes
from aifactory.controller.observe.telemetry import BackendTelemetry, ModelTelemetry
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators.main import options_from, parser
from aifactory.operators.metrics_server import choose
from aifactory.operators.session import BackendError, _check_reachable
from tests.factories import RecordingBackend, grid_nodes

NODES = grid_nodes(1, 1, 2)


@dataclass(frozen=True)
class Refused:
    id: str
    argv: tuple[str, ...]
    error: str


REFUSED = [
    Refused("ray without a cluster says how to name one", ("--backend=ray",),
            "--backend ray needs a Ray cluster: --ray-address HOST:PORT (or $RAY_ADDRESS), "
            "or --ray-local"),
    Refused("a local cluster and an address exclude each other",
            ("--backend=ray", "--ray-local", "--ray-address=h:1"),
            "--ray-local starts its own cluster; drop --ray-address"),
    Refused("ray has no simulated telemetry",
            ("--backend=ray", "--ray-local", "--telemetry=sim"),
            "--telemetry sim reads the simulated backend"),
    Refused("a local Ray cluster of 32 raylets is too big",
            ("--backend=ray", "--ray-local", "--cluster=small"),
            "32 nodes is too many (at most 16)"),
    Refused("a Ray cluster is its own inventory",
            ("--backend=ray", "--ray-address=h:1", "--inventory=nodes"),
            "--inventory applies to --backend sim"),
    Refused("ray flags need the ray backend", ("--ray-local",),
            "apply to --backend ray only"),
    Refused("container images are a Ray cluster's", ("--ray-container-images",),
            "--ray-topology and --ray-prestart-per-node apply to --backend ray only"),
    Refused("the Ray topology source needs the ray backend", ("--ray-topology=nodes",),
            "--ray-topology and --ray-prestart-per-node apply to --backend ray only"),
    Refused("a local Ray cluster's simulated nodes have no Kubernetes Nodes",
            ("--backend=ray", "--ray-local", "--ray-topology=nodes"),
            "--ray-topology nodes joins Ray nodes to Kubernetes Nodes; the simulated nodes "
            "of --ray-local have none"),
    Refused("pre-started workers need the ray backend", ("--ray-prestart-per-node=4",),
            "--ray-topology and --ray-prestart-per-node apply to --backend ray only"),
    Refused("sim speed is for the simulated backend",
            ("--backend=ray", "--ray-local", "--sim-speed=2"),
            "--sim-speed applies to --backend sim only"),
    Refused("one VTN: OpenADR 2.0b and 3 exclude each other",
            ("--openadr-vtn-url=http://a/OpenADR2/Simple/2.0b", "--openadr3-vtn-url=http://b"),
            "--openadr-vtn-url (OpenADR 2.0b) and --openadr3-vtn-url (OpenADR 3) exclude "
            "each other"),
    Refused("OpenADR 3 needs the OAuth2 client's files", ("--openadr3-vtn-url=http://b",),
            "needs --openadr-credentials DIR holding the OAuth2 client's files client-id and "
            "client-secret (a mounted Secret); missing: client-id, client-secret"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_flags_that_cannot_work_are_refused_before_start(
        case: Refused, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(BackendError) as err:
        options_from(parser().parse_args(list(case.argv)))
    assert case.error in str(err.value)


def test_openadr3_flags_reach_the_grid_options(tmp_path: Path) -> None:
    creds = tmp_path
    (creds / "client-id").write_text("ven-1")
    bad = ["--openadr3-vtn-url=http://vtn/openadr3/3.1.0", f"--openadr-credentials={creds}"]
    with pytest.raises(BackendError, match="missing: client-secret"):
        options_from(parser().parse_args(bad))
    (creds / "client-secret").write_text("s3cret")
    grid = options_from(parser().parse_args([
        *bad, "--openadr3-program=dr, peak", "--openadr3-targets=north",
        "--openadr3-ven-name=site-a", "--openadr3-poll-seconds=2",
        "--openadr-budgets=site"])).grid
    assert (grid.oa3_url, grid.oa3_programs, grid.oa3_targets, grid.oa3_ven_name,
            grid.oa3_poll_seconds, grid.budgets, grid.vtn_url) == (
        "http://vtn/openadr3/3.1.0", ("dr", "peak"), ("north",), "site-a", 2.0, ("site",),
        None)


def test_ray_options_follow_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    remote = options_from(parser().parse_args(["--backend=ray", "--telemetry=model"]))
    assert (remote.ray.address, remote.ray.local, remote.ray.cpus_per_worker) == \
        ("head:6379", False, 1.0)
    assert remote.ray.telemetry == "model" and remote.metrics_port == 9402
    assert remote.ray.topology == "auto"
    pinned = options_from(parser().parse_args(["--backend=ray", "--ray-topology=nodes"]))
    assert pinned.ray.topology == "nodes"
    assert remote.ray.prestart_per_node == 2
    assert options_from(parser().parse_args(["--backend=ray", "--ray-prestart-per-node=0"])
                        ).ray.prestart_per_node == 0
    local = options_from(parser().parse_args(["--backend=ray", "--ray-local",
                                              "--node-metrics"]))
    assert (local.ray.address, local.ray.local, local.ray.cpus_per_worker) == \
        (None, True, 0.05)
    assert local.ray.telemetry == "auto" and not local.per_gpu_metrics
    assert not remote.ray.container_images
    podman = options_from(parser().parse_args(["--backend=ray", "--ray-container-images"]))
    assert podman.ray.container_images


def test_an_unreachable_ray_address_fails_fast_with_what_to_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[tuple[str, int]] = []

    def refuse(address: tuple[str, int], timeout: float) -> socket.socket:
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(BackendError, match="cannot reach the Ray cluster at head:6379 "
                                           r"\(\[Errno 111\] Connection refused\)"):
        _check_reachable("head:6379")
    _check_reachable("ray://head:10001")  # other address forms are Ray's to check
    assert tried == [("head", 6379)]


def _plane(backend: object | None = None) -> ControlPlane:
    factory = replace(factory_from_nodes("t", NODES), queues=())
    topo = factory.topology()
    return ControlPlane(factory, backend or SimulatedBackend(topo.nodes, lambda: 0.0),  # type: ignore[arg-type]
                        clock=lambda: 0.0, topology=topo)


@dataclass(frozen=True)
class Source:
    id: str
    flag: str
    simulated: bool
    kind: type
    name: str


SOURCES = [
    Source("auto on the simulated factory is its own telemetry", "auto", True,
           BackendTelemetry, "simulated"),
    Source("sim is the simulated factory's telemetry", "sim", True, BackendTelemetry,
           "simulated"),
    Source("model is the power model", "model", True, ModelTelemetry, "model"),
    Source("auto on Ray is the backend's own (NVML on its nodes, else the model)", "auto",
           False, BackendTelemetry, "backend"),
    Source("nvml on Ray is the backend's own too", "nvml", False, BackendTelemetry,
           "backend"),
]


@pytest.mark.parametrize("case", SOURCES, ids=lambda c: c.id)
def test_telemetry_flag_picks_the_source(case: Source) -> None:
    cp = _plane(None if case.simulated else RecordingBackend())
    choice = choose(cp, case.flag)
    assert isinstance(choice.source, case.kind)
    assert (choice.source.name, choice.requested) == (case.name, case.flag)


def test_nvml_that_cannot_run_falls_back_to_the_model_and_says_so() -> None:
    choice = choose(_plane(), "nvml")  # no NVIDIA driver on the test machine
    assert isinstance(choice.source, ModelTelemetry) and choice.requested == "nvml"
    assert "NVML unavailable" in choice.fallback_reason


def test_backend_telemetry_is_named_after_what_the_backend_reports() -> None:
    source = BackendTelemetry(RecordingBackend(), "backend")  # type: ignore[arg-type]
    source.read()
    assert source.name == "model"


def test_sim_telemetry_on_another_backend_is_an_error() -> None:
    with pytest.raises(SpecError, match="sim reads the simulated backend"):
        choose(_plane(RecordingBackend()), "sim")
