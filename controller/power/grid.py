"""Power budgets that move with time and with the grid: schedules, grid events, tiers.

A PowerBudget has a base limit in watts. Two things can lower it for a while:

- its ``schedule``: windows (absolute, or recurring daily at a time of day) that set the
  limit to some watts or a percent of the base, e.g. "17:00-20:00 daily at 80 %";
- grid events: a utility's demand-response signal (OpenADR, or a file for the simulator)
  that caps the budget from ``start`` to ``end`` as watts, a percent, or a simple level 0-3
  mapped to configured percents.

The limit at any moment is the lowest of the base and everything active then. Pure: the
caller passes the time. Jobs say how much slowdown they accept during an event with a
flexibility tier (``FLEX_SLOWDOWN``); tier 0 is never touched.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from aifactory.controller.core.errors import SpecError

__all__ = [
    "DEFAULT_LEVEL_PERCENT",
    "FLEX_SLOWDOWN",
    "MAX_TIER",
    "BudgetLimit",
    "BudgetWindow",
    "GridEvent",
    "effective_limit",
    "next_change",
    "parse_time_of_day",
]

# Slowdown a job of each tier accepts during a grid event (fraction of its speed).
FLEX_SLOWDOWN: Mapping[int, float] = {0: 0.0, 1: 0.10, 2: 0.25, 3: 0.50}
MAX_TIER = 3
# OpenADR SIMPLE levels 0-3 (normal, moderate, high, special) as percent of the base limit.
DEFAULT_LEVEL_PERCENT: Mapping[int, float] = {0: 100.0, 1: 90.0, 2: 75.0, 3: 50.0}
DAY = 86_400.0


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    """One window of a PowerBudget's schedule. ``daily``: ``start``/``end`` are seconds
    after midnight (``end`` < ``start`` wraps past midnight) in the budget's time zone,
    already shifted to UTC by ``utc_offset_seconds`` of the day it applies; else epoch
    seconds. Exactly one of ``watts`` and ``percent`` is set."""

    start: float
    end: float
    watts: float | None = None
    percent: float | None = None
    daily: bool = False
    utc_offset_seconds: float = 0.0
    time_zone: str | None = None  # IANA name (daylight saving followed); None: the offset

    def local_seconds(self, t: float) -> float:
        """Seconds after local midnight at epoch ``t``."""
        if self.time_zone is None:
            return (t + self.utc_offset_seconds) % DAY
        at = dt.datetime.fromtimestamp(t, ZoneInfo(self.time_zone))
        return at.hour * 3600 + at.minute * 60 + at.second + at.microsecond / 1e6

    def active(self, t: float) -> bool:
        if not self.daily:
            return self.start <= t < self.end
        local = self.local_seconds(t)
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def limit(self, base_watts: float) -> float:
        if self.watts is not None:
            return self.watts
        assert self.percent is not None
        return base_watts * self.percent / 100.0


@dataclass(frozen=True, slots=True)
class GridEvent:
    """A utility's request to lower draw. ``budgets`` empty: every budget. Exactly one of
    ``watts``, ``percent`` and ``level`` is set. ``signal_at`` is when it arrived (the
    ramp is measured from it); ``end`` None: until cancelled."""

    id: str
    start: float
    end: float | None
    watts: float | None = None
    percent: float | None = None
    level: int | None = None
    budgets: tuple[str, ...] = ()
    signal_at: float | None = None
    source: str = "file"

    def active(self, t: float) -> bool:
        return self.start <= t and (self.end is None or t < self.end)

    def applies_to(self, budget: str) -> bool:
        return not self.budgets or budget in self.budgets

    def limit(self, base_watts: float,
              levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT) -> float:
        if self.watts is not None:
            return self.watts
        if self.percent is not None:
            return base_watts * self.percent / 100.0
        assert self.level is not None
        return base_watts * levels.get(self.level, 100.0) / 100.0

    def describe(self) -> str:
        if self.watts is not None:
            what = f"{self.watts:,.0f} W"
        elif self.percent is not None:
            what = f"{self.percent:g} % of the base limit"
        else:
            what = f"level {self.level}"
        return f"grid event {self.id} ({what})"


@dataclass(frozen=True, slots=True)
class BudgetLimit:
    """A budget's limit at one moment and what set it (``cause`` None: the base)."""

    watts: float
    cause: str | None = None
    event: GridEvent | None = None


def effective_limit(name: str, base_watts: float, windows: Sequence[BudgetWindow],
                    events: Iterable[GridEvent], t: float,
                    levels: Mapping[int, float] = DEFAULT_LEVEL_PERCENT) -> BudgetLimit:
    """The lowest of the base limit, the schedule's active windows and the active grid
    events for this budget at ``t``."""
    best = BudgetLimit(base_watts)
    for w in windows:
        if w.active(t):
            watts = w.limit(base_watts)
            if watts < best.watts:
                best = BudgetLimit(watts, "schedule")
    for ev in events:
        if ev.applies_to(name) and ev.active(t):
            watts = ev.limit(base_watts, levels)
            if watts < best.watts:
                best = BudgetLimit(watts, ev.describe(), ev)
    return best


def next_change(windows: Sequence[BudgetWindow], events: Iterable[GridEvent],
                t: float) -> float | None:
    """The first moment after ``t`` when a window or event starts or ends (for virtual
    time: the simulator wakes then)."""
    out: list[float] = []
    for w in windows:
        if w.daily:
            for edge in (w.start, w.end):
                day0 = t - w.local_seconds(t)
                at = day0 + edge
                out.append(at if at > t else at + DAY)
        else:
            out.extend(x for x in (w.start, w.end) if x > t)
    for ev in events:
        out.extend(x for x in (ev.start, ev.end) if x is not None and x > t)
    return min(out) if out else None


def parse_time_of_day(text: str, path: str) -> float:
    """``HH:MM`` or ``HH:MM:SS`` as seconds after midnight; SpecError naming ``path``."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        h, m = int(parts[0]), int(parts[1])
        s = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        raise SpecError(path, f"{text!r} is not a time of day; write HH:MM, e.g. 17:30"
                        ) from None
    if not (0 <= h <= 24 and 0 <= m < 60 and 0 <= s < 60) or (h == 24 and (m or s)):
        raise SpecError(path, f"{text!r} is not a time of day between 00:00 and 24:00")
    return float(h * 3600 + m * 60 + s)
