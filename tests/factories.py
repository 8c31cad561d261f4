"""Small hand-built factories for tests, with their topology drawn in the test modules."""

from __future__ import annotations

from aifactory.controller.core.spec import JobSpec
from aifactory.controller.core.state import ClusterState
from aifactory.controller.core.topology import (
    BLOCK_LABEL,
    RACK_LABEL,
    LevelSpec,
    NodeInfo,
    Topology,
)
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
