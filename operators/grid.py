"""The operator's side of grid events: PowerBudget schedules, a utility's events (OpenADR),
and the curtailment controller stepped on the engine's loop.

``GridLink`` is owned by the engine and touched only from its loop: PowerBudget objects give
it each budget's base and ``spec.schedule``; the OpenADR VEN (``operators.openadr`` for 2.0b,
``operators.openadr3`` for 3) gives it events (through engine requests, so nothing changes
under a pass); every pass steps the controller at most once per ``period_seconds`` (at once
when something changed), before the scheduling cycle, so admission sees the new limits in the
same pass. What it did shows in
PowerBudget status (``budget_status``), job conditions and Events (``PowerCapped``,
``Paused``, ``Resumed``) and the ``aifactory_grid_*`` metrics (``snapshot``). Inactive, with
no schedule and no event, it costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from aifactory.controller.core.spec import PowerBudgetSpec
from aifactory.controller.power.grid import DEFAULT_LEVEL_PERCENT, BudgetWindow, GridEvent
from aifactory.controller.runtime.controlplane import ControlPlane
from aifactory.controller.runtime.curtailment import CurtailmentController
from aifactory.operators.openadr import OpenADRVen
from aifactory.operators.openadr3 import OpenADR3Ven

__all__ = ["GridLink", "GridOptions", "GridVen"]

log = logging.getLogger(__name__)
OPENADR = "openadr"


class GridVen(Protocol):
    """A utility's signal source run by the operator: the OpenADR 2.0b or 3 VEN."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class GridOptions:
    """``--grid-*``, ``--openadr-*`` and ``--openadr3-*`` options (see ``operators.main``);
    ``vtn_url`` (2.0b) and ``oa3_url`` (3) exclude each other."""

    def __init__(self, strategy: str = "flexible",
                 levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT,
                 period_seconds: float = 1.0, vtn_url: str | None = None,
                 ven_name: str = "aifactory", credentials_dir: str | None = None,
                 budgets: tuple[str, ...] = (), oa3_url: str | None = None,
                 oa3_ven_name: str = "aifactory", oa3_programs: tuple[str, ...] = (),
                 oa3_targets: tuple[str, ...] = (), oa3_token_url: str | None = None,
                 oa3_poll_seconds: float = 10.0) -> None:
        if vtn_url and oa3_url:
            raise ValueError("--openadr-vtn-url (OpenADR 2.0b) and --openadr3-vtn-url "
                             "(OpenADR 3) exclude each other: the site is a VEN of one VTN")
        self.strategy = strategy
        self.levels = dict(levels)
        self.period_seconds = period_seconds
        self.vtn_url = vtn_url
        self.ven_name = ven_name
        self.credentials_dir = credentials_dir
        self.budgets = budgets
        self.oa3_url = oa3_url
        self.oa3_ven_name = oa3_ven_name
        self.oa3_programs = oa3_programs
        self.oa3_targets = oa3_targets
        self.oa3_token_url = oa3_token_url
        self.oa3_poll_seconds = oa3_poll_seconds


class GridLink:
    """Budgets that follow schedules and grid events, for one engine (see the module)."""

    def __init__(self, cp: ControlPlane, options: GridOptions | None = None,
                 to_wall: Callable[[float], float] | None = None) -> None:
        self.options = options = options or GridOptions()
        self.controller = CurtailmentController(cp, strategy=options.strategy,
                                                levels=options.levels, to_wall=to_wall)
        self._events: dict[str, list[GridEvent]] = {}  # utility event id -> its intervals
        self.problem = ""  # the grid signal's latest problem; "" while all is well
        self.sheddable_watts = 0.0  # as of the last snapshot (what the VEN reports)
        self._dirty = False
        self._next = 0.0

    # ----------------------------------------------------------------- inputs

    def rebind(self, cp: ControlPlane) -> None:
        """The engine replaced its plane (a grown inventory)."""
        self.controller.rebind(cp)
        self._dirty = True

    def budgets_changed(self, budgets: Sequence[PowerBudgetSpec],
                        windows: Mapping[str, Sequence[BudgetWindow]]) -> None:
        self.controller.set_base({b.name: b.watts for b in budgets})
        for name in {*self.controller.windows, *windows}:
            self.controller.set_windows(name, windows.get(name, ()))
        self._dirty = True

    def set_windows(self, budget: str, windows: Sequence[BudgetWindow]) -> None:
        """A PowerBudget's ``spec.schedule`` (start-up)."""
        self.controller.set_windows(budget, windows)
        self._dirty = True

    def event(self, event_id: str, events: Sequence[GridEvent]) -> None:
        """A utility event arrived, changed (its intervals), or ended (``events`` empty)."""
        if events:
            self._events[event_id] = list(events)
            log.info("grid event %s: %s", event_id, "; ".join(
                f"{e.describe()} from {e.start:.0f} to {e.end}" for e in events))
        elif self._events.pop(event_id, None) is not None:
            log.info("grid event %s is over or cancelled", event_id)
        self.controller.set_events(OPENADR, [e for evs in self._events.values() for e in evs])
        self._dirty = True

    def set_problem(self, text: str) -> None:
        if text != self.problem:
            if text:
                log.warning("grid signal: %s (the last good budgets are kept)", text)
            else:
                log.info("grid signal: working again")
        self.problem = text

    # ----------------------------------------------------------------- the loop

    @property
    def active(self) -> bool:
        c = self.controller
        return bool(c.events or any(c.windows.values()) or c.capped or c.paused or
                    any(lim.cause for lim in c.limits.values()))

    def step(self, mono: float) -> bool:
        """Step the controller if it is due (or something changed); True if it ran."""
        if not self._dirty and mono < self._next:
            return False
        self._next = mono + self.options.period_seconds
        if not self._dirty and not self.active:
            return False
        self._dirty = False
        self.controller.step()
        return True

    # ----------------------------------------------------------------- what it shows

    def budget_status(self) -> dict[str, dict[str, Any]]:
        """Extra PowerBudget status fields per budget name."""
        c = self.controller
        out: dict[str, dict[str, Any]] = {}
        for name, lim in c.limits.items():
            out[name] = {"baseWatts": round(c.base.get(name, lim.watts)),
                         "limitCause": lim.cause or "",
                         "shedWatts": round(c.account.shed_watts.get(name, 0.0)),
                         "shortWatts": round(c.account.short_watts.get(name, 0.0)),
                         "gridSignal": self.problem}
            over = c.account.overrun_watts.get(name, 0.0)
            if over > 0:
                out[name]["message"] = (
                    f"measured draw stayed {over:,.0f} W over the lowered limit after the "
                    "caps settled; shedding that much more")
            elif lim.cause and c.account.short_watts.get(name, 0.0) > 0:
                out[name]["message"] = (
                    f"{c.account.short_watts[name]:,.0f} W over {lim.cause} with every "
                    "flexible job capped or paused (tier 0 is never touched)")
        return out

    def open_ven(self, on_events: Callable[[str, list[GridEvent]], None],
                 on_problem: Callable[[str], None]) -> GridVen | None:
        """The OpenADR VEN ``--openadr-vtn-url`` or ``--openadr3-vtn-url`` asks for (not
        started), or None."""
        opts = self.options
        def secret(name: str) -> str | None:
            if not opts.credentials_dir:
                return None
            path = os.path.join(opts.credentials_dir, name)
            return path if os.path.isfile(path) else None

        if opts.oa3_url:
            log.info("OpenADR 3 VEN %s of %s, programs %s (credentials: %s)",
                     opts.oa3_ven_name, opts.oa3_url, list(opts.oa3_programs) or "all",
                     opts.credentials_dir or "none")
            where = opts.credentials_dir or "(no --openadr-credentials)"
            return OpenADR3Ven(opts.oa3_url, opts.oa3_ven_name, on_events, on_problem,
                               lambda: self.sheddable_watts, budgets=opts.budgets,
                               levels=opts.levels, on_recovered=lambda: on_problem(""),
                               client_id_file=secret("client-id") or f"{where}/client-id",
                               client_secret_file=(secret("client-secret")
                                                   or f"{where}/client-secret"),
                               ca_file=secret("ca.crt"), programs=opts.oa3_programs,
                               targets=opts.oa3_targets, token_url=opts.oa3_token_url,
                               poll_seconds=opts.oa3_poll_seconds,
                               report_seconds=max(opts.oa3_poll_seconds, 10.0))
        if not opts.vtn_url:
            return None
        log.info("OpenADR VEN %s of %s (credentials: %s)", opts.ven_name, opts.vtn_url,
                 opts.credentials_dir or "none")
        return OpenADRVen(opts.vtn_url, opts.ven_name, on_events, on_problem,
                          lambda: self.sheddable_watts, budgets=opts.budgets,
                          levels=opts.levels, on_recovered=lambda: on_problem(""),
                          cert=secret("tls.crt"), key=secret("tls.key"),
                          ca_file=secret("ca.crt"), vtn_fingerprint=secret("vtn-fingerprint"))

    def snapshot(self) -> dict[str, Any]:
        """Numbers for the metrics thread (a new dict each time), taken at each status
        refresh; also what the site could still shed, which the VEN reports to the
        utility at any time (so worked out with a VTN configured even with no event)."""
        if self.options.vtn_url or self.options.oa3_url or self.active:
            self.sheddable_watts = self.controller.sheddable_watts()
        acc = self.controller.account
        return {"actions": dict(acc.actions),
                "lost_gpu_seconds": {str(t): s for t, s in acc.lost_gpu_seconds.items()},
                "shed_watts": dict(acc.shed_watts), "short_watts": dict(acc.short_watts),
                "overrun_watts": dict(acc.overrun_watts),
                "unhonoured": float(len(acc.unhonoured)),
                "signal_problem": 1.0 if self.problem else 0.0,
                "events": float(len(self._events)),
                "sheddable_watts": self.sheddable_watts}
