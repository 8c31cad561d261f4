"""What many tests build: small hand-made factories (their topology drawn in the test
modules), a scheduling cycle applied as the control plane applies it, a scheduler config,
running jobs, and a backend that only records what it is asked to launch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aifactory.controller.backends.base import TelemetrySnapshot
from aifactory.controller.core.spec import JobSpec, QueueSpec
from aifactory.controller.core.state import ClusterState, Placement, WorkerSlot
from aifactory.controller.core.topology import (
    BLOCK_LABEL,
    RACK_LABEL,
    LevelSpec,
    NodeInfo,
    Topology,
)
from aifactory.controller.placement.base import PlacementPolicy
from aifactory.controller.placement.registry import make_policy
from aifactory.controller.scheduling.cycle import schedule
from aifactory.controller.scheduling.cycle_io import (
    CycleResult,
    QueuedJob,
    RunningJob,
    SchedulerConfig,
)


def grid_nodes(blocks: int, racks: int, nodes: int, gpus: int = 8, model: str = "H200",
               prefix: str = "n") -> list[NodeInfo]:
    """``blocks x racks x nodes`` nodes named ``n-b0-r1-02`` with block/rack labels."""
    out = []
    for b in range(blocks):
        for r in range(racks):
            for n in range(nodes):
                out.append(NodeInfo(f"{prefix}-b{b}-r{r}-{n:02d}", gpus, model,
                                    ((BLOCK_LABEL, f"b{b}"), (RACK_LABEL, f"b{b}-r{r}"))))
    return out


def grid(blocks: int, racks: int, nodes: int, gpus: int = 8, model: str = "H200",
         levels: tuple[LevelSpec, ...] | None = None) -> Topology:
    nodes_ = grid_nodes(blocks, racks, nodes, gpus, model)
    return Topology.build(nodes_) if levels is None else Topology.build(nodes_, levels)


def run_cycle(state: ClusterState, spec: JobSpec, running: dict[str, RunningJob], now: float,
              config: SchedulerConfig) -> CycleResult:
    """One scheduling cycle for ``spec`` alone, applied as the control plane applies it:
    victims released, partial placements replaced, admissions allocated and running."""
    result = schedule(state, [QueuedJob(spec, now, int(now))], list(running.values()), now,
                      config)
    for pre in result.preempted:
        state.release(pre.victim)
        del running[pre.victim]
    for key, part in result.partial.items():
        state.release(key)
        state.allocate(part)
    for adm in result.admitted:
        if adm.job not in state.allocations:
            state.allocate(adm.placement)  # raises if anything would be overcommitted
        running[adm.job] = RunningJob(spec, adm.placement, now, now)
    return result


# --------------------------------------------------------------------------- scheduling


def scheduler_config(topo: Topology, policy: PlacementPolicy | None = None,
                     queues: tuple[QueueSpec, ...] = (), **kw: Any) -> SchedulerConfig:
    """A cycle's configuration on ``topo`` with our policy, no power estimate and
    ``queues``; ``kw`` sets any other field."""
    return SchedulerConfig(policy=policy or make_policy("aifactory"), empty=ClusterState(topo),
                           watts_per_gpu=lambda s: 0.0, queues=queues, **kw)


def running_job(state: ClusterState, spec: JobSpec, node: str, gpus: int,
                started: float = 0.0, checkpoint: float = 0.0,
                watts: float = 0.0) -> RunningJob:
    """``spec`` running on ``gpus`` free GPUs of ``node`` (allocated in ``state``)."""
    n = state.topo.node_index[node]
    placement = Placement(spec.key, (WorkerSlot(n, state.free_gpu_indices(n, gpus)),), watts)
    state.allocate(placement)
    return RunningJob(spec, placement, started, checkpoint)


# --------------------------------------------------------------------------- backends


class RecordingBackend:
    """A cluster backend that runs nothing: its inventory is ``nodes`` (a list a test may
    grow, as Ray's grows when a node joins), and it records the jobs launched on it. It is
    not the simulated backend, as Ray's is not."""

    def __init__(self, nodes: Sequence[NodeInfo] = (),
                 launched: list[str] | None = None) -> None:
        self.nodes = list(nodes)
        self.launched = [] if launched is None else launched

    def inventory(self) -> list[NodeInfo]:
        return list(self.nodes)

    def launch(self, spec: JobSpec, placement: Placement, *, work_done: float = 0.0) -> None:
        self.launched.append(spec.key)

    def stop(self, job: str) -> None:
        pass

    def status(self, job: str) -> None:
        return None

    def telemetry(self) -> TelemetrySnapshot:
        return TelemetrySnapshot(0.0, "model", ())  # as a backend on the power model reports
