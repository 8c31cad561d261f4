"""Which backend runs the placed work: ``--backend sim`` now, ``--backend ray`` when present.

``make_backend`` is the one switch. The simulated backend runs the work inside the operator
process on the core's clock (wall time x ``--sim-speed``). The Ray backend lives in
``controller/backends/ray_backend.py`` (its own issue); it plugs in by exposing
``connect_backend(address: str | None, clock) -> ClusterBackend``. Without it,
``--backend ray`` fails at start with a message that says so.

``reattach`` is the other half of restart recovery: after the control plane ``adopt``s a
job at the placement its status records, the backend must be running it again. A backend
that can find its work again (Ray's detached actors) exposes ``reattach(spec, placement,
started_at)``. The simulated factory lives inside the operator process, so its work died
with the old process; it is relaunched on the same GPUs with the work done since
``started_at`` credited, which is what the GPUs would have done meanwhile.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

from controller.backends.base import ClusterBackend
from controller.backends.simulated import SimulatedBackend, default_utilization, speed_under_cap
from controller.errors import AifactoryError
from controller.power import profile_for
from controller.spec import JobSpec
from controller.state import Placement
from controller.topology import NodeInfo, Topology

__all__ = ["BACKENDS", "RAY_MODULE", "BackendError", "check_backend", "make_backend", "reattach"]

BACKENDS = ("sim", "ray")
RAY_MODULE = "controller.backends.ray_backend"


class BackendError(AifactoryError):
    """The chosen backend cannot be started."""


def check_backend(name: str) -> None:
    """Fail early, without connecting, if ``name`` cannot be used."""
    if name == "sim":
        return
    if name != "ray":
        raise BackendError(f"--backend: unknown backend {name!r}; valid backends are "
                           f"{', '.join(BACKENDS)}")
    _ray_connect()


def _ray_connect() -> Callable[..., ClusterBackend]:
    try:
        module = importlib.import_module(RAY_MODULE)
    except ImportError as exc:
        raise BackendError(
            f"--backend ray: the Ray backend ({RAY_MODULE.replace('.', '/')}.py) is not "
            f"available in this build ({exc}); use --backend sim, or install the 'ray' "
            "extra with a build that has the Ray backend") from exc
    connect = getattr(module, "connect_backend", None)
    if connect is None:
        raise BackendError(f"--backend ray: {RAY_MODULE} has no connect_backend(address, "
                           "clock); it cannot be used by the operator yet")
    return connect  # type: ignore[no-any-return]


def make_backend(name: str, topo: Topology | None, clock: Callable[[], float],
                 ray_address: str | None = None) -> ClusterBackend:
    """The backend called ``name``. ``topo`` is required for ``sim`` (its nodes, in the
    topology's order, so GPU indices agree with placements)."""
    if name == "sim":
        if topo is None:
            raise BackendError("--backend sim needs an inventory")
        return SimulatedBackend(topo.nodes, clock)
    if name == "ray":
        return _ray_connect()(ray_address, clock)
    raise BackendError(f"--backend: unknown backend {name!r}; valid backends are "
                       f"{', '.join(BACKENDS)}")


def backend_nodes(backend: ClusterBackend) -> Sequence[NodeInfo]:
    """The nodes a backend reports (used when it, not the cluster, is the inventory)."""
    return backend.inventory()


def reattach(backend: ClusterBackend, spec: JobSpec, placement: Placement, started_at: float,
             now: float) -> None:
    """Make the backend run an adopted job again, without restarting its progress."""
    hook = getattr(backend, "reattach", None)
    if hook is not None:
        hook(spec, placement, started_at)
        return
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
