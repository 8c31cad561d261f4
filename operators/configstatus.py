"""Status of the cluster-scoped policy objects: GPUQueue usage and PowerBudget draw.

A GPUQueue's status says how many GPUs its running jobs hold (and how many of those are
borrowed from its cohort) and how many jobs run and wait. A PowerBudget's status says the
estimated draw the scheduler admits against, the measured draw of the GPUs in scope (from
the backend's telemetry), the headroom, and how many nodes the selector picks. Pure: reads
the control plane, writes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aifactory.controller.core.spec import PowerBudgetSpec, QueueSpec
from aifactory.controller.power.grid import BudgetWindow
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.operators.translate import QUEUE_KIND

__all__ = ["ConfigEntry", "config_statuses"]


@dataclass(slots=True)
class ConfigEntry:
    """A GPUQueue or PowerBudget the engine knows, with its status bookkeeping."""

    kind: str
    name: str
    uid: str
    generation: int
    spec: QueueSpec | PowerBudgetSpec | None
    invalid: str | None = None
    written: dict[str, Any] | None = None
    windows: tuple[BudgetWindow, ...] = ()  # a PowerBudget's spec.schedule


def _queue_usage(cp: ControlPlane) -> dict[str, tuple[float, int, int]]:
    """queue -> (GPUs held, running jobs, waiting jobs)."""
    usage: dict[str, tuple[float, int, int]] = {}
    for rec in cp.jobs.values():
        if rec.done:
            continue
        used, running, waiting = usage.get(rec.spec.queue, (0.0, 0, 0))
        if rec.placement is not None:
            usage[rec.spec.queue] = (used + rec.placement.gpu_equivalents, running + 1, waiting)
        else:
            usage[rec.spec.queue] = (used, running, waiting + 1)
    return usage


def config_statuses(cp: ControlPlane, configs: Iterable[ConfigEntry],
                    gpu_power: Sequence[float],
                    grid: Mapping[str, Mapping[str, Any]] | None = None,
                    ) -> list[tuple[ConfigEntry, dict[str, Any]]]:
    """The status dict of every GPUQueue and PowerBudget (``grid``: a budget's grid-event
    fields, ``operators.grid.GridLink.budget_status``)."""
    usage = _queue_usage(cp)
    state, topo = cp.state, cp.topo
    budgets = state.budgets
    out: list[tuple[ConfigEntry, dict[str, Any]]] = []
    for config in configs:
        status: dict[str, Any] = {"observedGeneration": config.generation,
                                  "message": config.invalid or ""}
        if config.kind == QUEUE_KIND:
            used, running, waiting = usage.get(config.name, (0.0, 0, 0))
            nominal = config.spec.nominal_gpus if isinstance(config.spec, QueueSpec) else 0.0
            status.update(usedGPUs=round(used, 3), borrowedGPUs=round(max(0.0, used - nominal), 3),
                          runningJobs=running, pendingJobs=waiting)
        elif isinstance(config.spec, PowerBudgetSpec) and config.name in budgets.names:
            b = budgets.names.index(config.name)
            nodes = [n for n in range(len(topo.nodes)) if b in budgets.node_budgets[n]]
            estimated = state.budget_watts[b]
            measured: float | None = None
            if gpu_power:
                measured = sum(gpu_power[g] for n in nodes for g in topo.gpu_range(n)) + \
                    cp.factory.base_watts_per_node * len(nodes)
            status.update(limitWatts=round(budgets.limits[b]), estimatedWatts=round(estimated),
                          measuredWatts=None if measured is None else round(measured),
                          headroomWatts=round(budgets.limits[b] - estimated), nodes=len(nodes))
            status.update((grid or {}).get(config.name, {}))
            if not nodes:
                status["message"] = ("the nodeSelector matches no node in the inventory; "
                                     "this budget limits nothing")
        out.append((config, status))
    return out
