"""Fixed-bucket histograms the control plane fills as it goes, for the Prometheus exporter.

Queue waits and scheduling decision times are observed once each, when they happen; a
scrape then reads the bucket counts in O(buckets) instead of re-sorting every wait ever
seen. The counts are cumulative the way Prometheus wants them (``le`` upper bounds, a final
``+Inf``), and nothing here imports ``prometheus_client``: the exporter turns them into
histogram families.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "DECISION_BUCKETS_SECONDS",
    "QUEUE_WAIT_BUCKETS_SECONDS",
    "Histogram",
    "HistogramCounts",
    "LabelledHistogram",
]

# Queue waits: a second to a day.
QUEUE_WAIT_BUCKETS_SECONDS: tuple[float, ...] = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
# One placement decision: ten microseconds to ten seconds.
DECISION_BUCKETS_SECONDS: tuple[float, ...] = (
    1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0)


@dataclass(frozen=True, slots=True)
class HistogramCounts:
    """A read-only copy: ``cumulative[i]`` observations were <= ``bounds[i]``; the last
    bound is ``+inf`` and its count equals ``count``."""

    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    sum: float
    count: int


class Histogram:
    """Counts per bucket plus sum and count; ``observe`` is O(log buckets)."""

    __slots__ = ("_counts", "bounds", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        ordered = tuple(float(b) for b in bounds)
        if not ordered or any(b >= c for b, c in itertools.pairwise(ordered)):
            raise ValueError(f"histogram bounds must be a non-empty increasing sequence, "
                             f"got {list(bounds)}")
        self.bounds = ordered
        self._counts = [0] * (len(ordered) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def observe_all(self, values: Iterable[float]) -> None:
        for value in values:
            self.observe(value)

    def counts(self) -> HistogramCounts:
        running = 0
        cumulative: list[int] = []
        for c in self._counts:
            running += c
            cumulative.append(running)
        return HistogramCounts((*self.bounds, math.inf), tuple(cumulative), self.sum,
                               self.count)


class LabelledHistogram:
    """One ``Histogram`` per label value (a queue name), all with the same bounds."""

    __slots__ = ("bounds", "by_label")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.by_label: dict[str, Histogram] = {}

    def observe(self, label: str, value: float) -> None:
        hist = self.by_label.get(label)
        if hist is None:
            hist = self.by_label[label] = Histogram(self.bounds)
        hist.observe(value)

    def counts(self) -> dict[str, HistogramCounts]:
        return {label: h.counts() for label, h in sorted(self.by_label.items())}
