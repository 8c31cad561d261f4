"""Grid-event files for ``aifactory simulate --grid-events``: good ones load, bad ones name
the file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifactory.controller.core.errors import SpecFileError
from aifactory.controller.inputs.grid_events import load_grid_events

GOOD = """events:
- id: peak-1
  start: 7200
  durationSeconds: 10800
  percent: 75
- id: fast
  start: 30
  signalAt: 0
  level: 2
  budgets: [factory]
"""


def test_a_file_of_events_loads(tmp_path: Path) -> None:
    path = tmp_path / "events.yaml"
    path.write_text(GOOD)
    peak, fast = load_grid_events(path, ["factory", "rack-b0-r0"])
    assert (peak.start, peak.end, peak.percent, peak.budgets) == (7200, 18000, 75, ())
    assert (fast.level, fast.end, fast.signal_at, fast.budgets) == (2, None, 0, ("factory",))


@pytest.mark.parametrize(("text", "field", "words"), [
    ("events: 3\n", "events", "must be a list"),
    ("events:\n- start: 1\n  percent: 50\n", "events[0].id", "is required"),
    ("events:\n- id: a\n  start: 10\n  end: 5\n  percent: 50\n", "events[0].end",
     "must be after start"),
    ("events:\n- id: a\n  start: 10\n  percent: 50\n  watts: 9\n", "events[0].percent",
     "exactly one of"),
    ("events:\n- id: a\n  start: 10\n  level: 7\n", "events[0].level", "0, 1, 2 or 3"),
    ("events:\n- id: a\n  start: 10\n  percent: 150\n", "events[0].percent", "0 to 100"),
    ("events:\n- id: a\n  start: 10\n  percent: 50\n  budgets: [nope]\n",
     "events[0].budgets", "has factory"),
])
def test_a_bad_event_names_its_field(tmp_path: Path, text: str, field: str,
                                     words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecFileError) as err:
        load_grid_events(path, ["factory"])
    assert err.value.field == field and words in str(err.value)
    assert str(path) in str(err.value)
