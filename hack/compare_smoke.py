"""Compare two sets of benchmark smoke results, ignoring what the machine decides.

A refactor must not change a single placement: run every scenario's smoke slice before and
after into two folders, then compare the JSON they wrote, field by field, leaving out wall
and decision times, memory and the output paths (NaN equals NaN):

    for m in fragmentation gangs power replay scale; do
        python -m benchmarks.$m --smoke --json BEFORE/$m.json; done   # at the old commit
    ... the same into AFTER/ ...
    python hack/compare_smoke.py BEFORE AFTER

Prints the differences per scenario and exits 1 if there is any.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

SCENARIOS = ("fragmentation", "gangs", "power", "replay", "scale")
# Keys whose values are timings, memory or paths: they differ from run to run.
IGNORED = ("json_path", "_seconds", "rss", "decision", "wall", "machine", "elapsed", "_ms",
           "latency", "p99", "p50", "place_s", "cycle_s", "timing", "took")


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            if any(word in key for word in IGNORED):
                continue
            if key not in a or key not in b:
                out.append(f"{path}/{key}: on one side only")
            else:
                out += differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and (
            (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)):
        return []
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main(argv: list[str]) -> int:
    before, after = Path(argv[0]), Path(argv[1])
    total = 0
    for name in SCENARIOS:
        old, new = before / f"{name}.json", after / f"{name}.json"
        if not (old.exists() and new.exists()):
            print(f"{name}: missing on one side")
            total += 1
            continue
        found = differences(json.loads(old.read_text()), json.loads(new.read_text()))
        print(f"{name}: {len(found)} differences")
        for line in found[:20]:
            print("  " + line)
        total += len(found)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
