"""Grid events from a file, for ``aifactory simulate --grid-events``.

::

    events:
    - id: peak-2025-07-14          # as the utility names it
      start: 7200                  # seconds after the replay starts
      durationSeconds: 10800       # or end: 18000; neither: until the replay ends
      percent: 75                  # or watts: 3.0e6, or level: 0-3 (OpenADR SIMPLE)
      budgets: [factory]           # PowerBudgets it lowers (left out: every budget)
      signalAt: 7170               # when the signal came (default: start)

Errors name the file, the line and the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from aifactory.controller.core.errors import InputFileError, SpecError, SpecFileError
from aifactory.controller.inputs._yaml import line_of, parse_yaml
from aifactory.controller.power.grid import GridEvent

__all__ = ["grid_events_from_data", "load_grid_events"]


def load_grid_events(path: str | Path, budgets: Sequence[str]) -> list[GridEvent]:
    """The events of a grid-event file (see the module), checked against ``budgets``."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(name, f"cannot read: {exc}") from exc
    doc = parse_yaml(text, name)
    try:
        return grid_events_from_data(doc.data, budgets)
    except SpecError as exc:
        raise SpecFileError(name, exc.field, exc.message, line_of(doc.tree, exc.field)) \
            from exc


def _number(raw: Mapping[str, Any], key: str, path: str, low: float = 0.0,
            high: float = math.inf) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not low <= value <= high:
        raise SpecError(f"{path}.{key}", f"must be a number from {low:g} to {high:g}, "
                        f"got {value!r}")
    return float(value)


def grid_events_from_data(data: Any, budgets: Sequence[str]) -> list[GridEvent]:
    if not isinstance(data, Mapping) or not isinstance(data.get("events"), list):
        raise SpecError("events", "must be a list of grid events, e.g. events: [{id: peak, "
                        "start: 7200, durationSeconds: 10800, percent: 75}]")
    out: list[GridEvent] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["events"]):
        path = f"events[{i}]"
        if not isinstance(raw, Mapping):
            raise SpecError(path, f"must be a mapping with id, start and percent, watts or "
                            f"level, got {raw!r}")
        ident = raw.get("id")
        if not isinstance(ident, str) or not ident:
            raise SpecError(f"{path}.id", "is required: the event's name, e.g. peak-1")
        if ident in seen:
            raise SpecError(f"{path}.id", f"{ident!r} is used twice")
        seen.add(ident)
        start = _number(raw, "start", path)
        if start is None:
            raise SpecError(f"{path}.start", "is required: seconds after the replay starts")
        end = _number(raw, "end", path)
        duration = _number(raw, "durationSeconds", path)
        if end is not None and duration is not None:
            raise SpecError(f"{path}.durationSeconds", "give end or durationSeconds, not both")
        if duration is not None:
            end = start + duration
        if end is not None and end <= start:
            raise SpecError(f"{path}.end", f"must be after start ({start:g}), got {end:g}")
        given = {k: raw.get(k) for k in ("percent", "watts", "level") if raw.get(k) is not None}
        if len(given) != 1:
            raise SpecError(f"{path}.percent", "give exactly one of percent (of the base "
                            "limit, 0-100), watts, or level (0-3)")
        level = raw.get("level")
        if level is not None and (isinstance(level, bool) or level not in (0, 1, 2, 3)):
            raise SpecError(f"{path}.level", f"must be 0, 1, 2 or 3, got {level!r}")
        names = raw.get("budgets") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise SpecError(f"{path}.budgets", "must be a list of PowerBudget names")
        unknown = [n for n in names if n not in budgets]
        if unknown or not budgets:
            raise SpecError(f"{path}.budgets", f"{unknown or 'the event'} names no power "
                            f"budget of the factory; it has "
                            f"{', '.join(budgets) or 'none (add powerBudgets to it)'}")
        signal = _number(raw, "signalAt", path)
        out.append(GridEvent(
            id=ident, start=start, end=end, percent=_number(raw, "percent", path, 0, 100),
            watts=_number(raw, "watts", path), level=level, budgets=tuple(names),
            signal_at=start if signal is None else signal, source="file"))
    return out
