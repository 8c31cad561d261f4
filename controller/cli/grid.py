"""``--grid-events`` for ``aifactory simulate`` and ``aifactory report``: the curtailment
controller over a file of a utility's events, stepped by the simulation."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["attach_grid"]


def attach_grid(sim: Any, args: argparse.Namespace) -> Any:
    """The curtailment controller over ``--grid-events``, stepped by the simulation."""
    from aifactory.controller.inputs.grid_events import load_grid_events
    from aifactory.controller.runtime.curtailment import CurtailmentController

    names = [b.name for b in sim.factory.power_budgets]
    grid = CurtailmentController(sim, strategy=args.grid_strategy)
    grid.set_events("file", load_grid_events(args.grid_events, names))
    sim.attach_grid(grid)
    return grid
