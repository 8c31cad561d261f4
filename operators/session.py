"""Which backend runs the placed work: ``--backend sim`` or ``--backend ray``.

``open_backend`` is the one switch; it returns a ``BackendSession``: the backend, the
factory its inventory makes (Ray: the cluster's GPU nodes; sim: chosen by the operator), how
to rebuild that factory when nodes join, and how to let go of it at shutdown.

* ``sim`` runs the work inside the operator process on the core's clock (wall time x
  ``--sim-speed``). Its work dies with the process, so restart recovery relaunches an
  adopted job on its recorded GPUs with the work done since ``started_at`` credited, which
  is what the GPUs would have done meanwhile (``reattach``).
* ``ray`` is ``aifactory.controller.backends.ray.backend`` (imported only here, lazily: the operator
  never imports ``ray`` itself). It connects to ``--ray-address``/``$RAY_ADDRESS``, or with
  ``--ray-local`` starts a local Ray cluster of simulated GPU nodes for demos. On
  Kubernetes the Ray nodes take their topology from the Nodes they name
  (``--ray-topology``, ``operators.raynodes``). Its gangs are
  detached placement groups and actors that outlive the operator, so restart recovery
  adopts the gangs it finds by name (``gang_adopter``) instead of launching twins, and
  shutting down only disconnects (``RayBackend.disconnect``).
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aifactory.controller.backends.base import AdoptsGangs, ClusterBackend
from aifactory.controller.backends.directory import NodeDirectory
from aifactory.controller.backends.simulated import SimulatedBackend
from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import Placement
from aifactory.controller.core.topology import NodeInfo, Topology
from aifactory.controller.inputs.factory import FactorySpec
from aifactory.controller.power.model import profile_for
from aifactory.controller.power.utilisation import default_utilization, speed_under_cap

__all__ = ["BACKENDS", "RAY_MODULE", "RAY_TOPOLOGIES", "BackendError", "BackendSession",
           "RayOptions", "check_backend", "gang_adopter", "open_backend", "reattach"]

BACKENDS = ("sim", "ray")
RAY_TOPOLOGIES = ("auto", "nodes", "ray")
RAY_MODULE = "aifactory.controller.backends.ray.backend"


class BackendError(AifactoryError):
    """The chosen backend cannot be started."""


@dataclass(frozen=True, slots=True)
class RayOptions:
    """How ``--backend ray`` reaches its cluster and runs workers."""

    address: str | None = None  # None: $RAY_ADDRESS
    local: bool = False  # start a local cluster of simulated GPU nodes instead
    local_nodes: tuple[NodeInfo, ...] = ()  # () : 4 nodes x 8 H200 in 2 racks
    cpus_per_worker: float = 1.0
    prestart_per_node: int = 2  # idle workers kept started per GPU node (0: none)
    telemetry: str = "auto"  # the backend's GPU power: auto (NVML on each node, else model)
    container_images: bool = False  # nodes run runtime.image (podman): Ray's image_uri
    # Where the Ray nodes' topology comes from: nodes (the Kubernetes Nodes they name), ray
    # (their own labels), auto (nodes when the API server lists a GPU Node, else ray).
    topology: str = "auto"


@dataclass(slots=True)
class BackendSession:
    """A started backend. ``factory``/``topology``: the inventory the backend reports
    (None for sim, whose inventory the operator chooses); ``rebuild_factory``: a factory
    over the current inventory when nodes join (None: it never grows beneath us)."""

    backend: ClusterBackend
    factory: FactorySpec | None = None
    topology: Topology | None = None
    rebuild_factory: Callable[[], FactorySpec] | None = None
    close: Callable[[], None] = lambda: None


def _ray_module() -> Any:
    # Ray's core worker would take SIGTERM for its crash handler and die on it; kopf owns
    # SIGTERM here (flush status writes, disconnect, stop a --ray-local cluster). Read by
    # ray when it is first imported.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        return importlib.import_module(RAY_MODULE)
    except ImportError as exc:
        raise BackendError(
            f"--backend ray: the Ray backend cannot be imported ({exc}); install the 'ray' "
            "extra (pip install 'aifactory[ray]') or use --backend sim") from exc


def check_backend(name: str) -> None:
    """Fail early, without connecting, if ``name`` cannot be used."""
    if name not in BACKENDS:
        raise BackendError(f"--backend: unknown backend {name!r}; valid backends are "
                           f"{', '.join(BACKENDS)}")
    if name == "ray":
        _ray_module()


def open_backend(name: str, topo: Topology | None, clock: Callable[[], float],
                 ray: RayOptions | None = None,
                 directory: NodeDirectory | None = None) -> BackendSession:
    """Start the backend called ``name``. ``topo`` is required for ``sim`` (its nodes, in
    the topology's order, so GPU indices agree with placements). ``directory``: where the
    Ray nodes' names and topology come from (the Kubernetes Nodes), else their labels."""
    if name == "sim":
        if topo is None:
            raise BackendError("--backend sim needs an inventory")
        return BackendSession(SimulatedBackend(topo.nodes, clock))
    if name != "ray":
        raise BackendError(f"--backend: unknown backend {name!r}; valid backends are "
                           f"{', '.join(BACKENDS)}")
    ray = ray or RayOptions()
    module = _ray_module()
    if not ray.local:
        _check_reachable(ray.address or os.environ.get("RAY_ADDRESS") or "")
    # ray.init makes SIGTERM sys.exit(15) at once; kopf's handler (a graceful stop) must stay.
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        backend = module.make_ray_backend(
            ray.address, local=ray.local, local_nodes=ray.local_nodes or None, clock=clock,
            cpus_per_worker=ray.cpus_per_worker, prestart_per_node=ray.prestart_per_node,
            telemetry=ray.telemetry, container_images=ray.container_images,
            directory=directory)
    except AifactoryError:
        raise
    except Exception as exc:  # ray.init: ConnectionError, TimeoutError, RuntimeError...
        where = "a local Ray cluster" if ray.local else (ray.address or "$RAY_ADDRESS")
        raise BackendError(f"--backend ray: cannot connect to {where}: "
                           f"{type(exc).__name__}: {exc}") from exc
    finally:
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    try:
        factory = backend.factory("ray")
    except Exception:
        backend.disconnect()
        raise
    return BackendSession(backend, factory, backend.topology,
                          rebuild_factory=lambda: backend.factory("ray"),
                          close=backend.disconnect)


def _check_reachable(address: str, timeout_seconds: float = 10.0) -> None:
    """A ``HOST:PORT`` Ray address must accept a TCP connection: ``ray.init`` would wait
    for an unreachable GCS forever, and the operator with it."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in host:
        return  # ray://, auto, ...: left to Ray
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout_seconds).close()
    except OSError as exc:
        raise BackendError(f"--backend ray: cannot reach the Ray cluster at {address} "
                           f"({exc}); is the Ray head running, and is its GCS port "
                           "(default 6379) open to the operator?") from exc


def gang_adopter(backend: ClusterBackend) -> AdoptsGangs[Any] | None:
    """The backend, if it can find its running gangs again after a restart (Ray)."""
    return backend if isinstance(backend, AdoptsGangs) else None


def reattach(backend: ClusterBackend, spec: JobSpec, placement: Placement, started_at: float,
             now: float) -> None:
    """Make a backend that lost its work with the old process (sim) run an adopted job
    again, without restarting its progress."""
    if isinstance(backend, SimulatedBackend):
        elapsed = max(0.0, now - started_at)
        speed = 1.0
        if placement.slots:
            model = backend.all_nodes()[placement.slots[0].node].gpu_model
            speed = speed_under_cap(profile_for(model), default_utilization(spec),
                                    spec.power_cap_watts_per_gpu)
        backend.launch(spec, placement, work_done=elapsed * speed)
        return
    backend.launch(spec, placement)

