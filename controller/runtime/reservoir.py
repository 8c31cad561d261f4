"""A bounded sample of a stream of numbers: exact count and mean, percentiles from a sample.

A control plane that runs for months (the operator) observes a queue wait for every job it
starts and a decision time for every placement it makes; a list of them all grows without
end. ``Reservoir`` keeps every value until it holds ``capacity`` of them, then a uniform
random sample of all values seen (Vitter's algorithm R, seeded, so the same stream gives
the same sample). A simulation smaller than ``capacity`` is therefore measured exactly, as
before; a longer run gets percentiles estimated from ``capacity`` values, while the count,
the sum and the mean stay exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

__all__ = ["DEFAULT_CAPACITY", "Reservoir"]

DEFAULT_CAPACITY = 100_000  # ~3 MB of floats; percentiles within ~0.3 % rank of the truth


class Reservoir:
    """Values of a stream, at most ``capacity`` of them kept. Iterating yields the kept
    sample; ``len()`` is the number of values seen."""

    __slots__ = ("_rng", "_values", "capacity", "count", "total")

    def __init__(self, capacity: int = DEFAULT_CAPACITY, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 value, got {capacity}")
        self.capacity = capacity
        self.count = 0
        self.total = 0.0
        self._values: list[float] = []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if len(self._values) < self.capacity:
            self._values.append(value)
            return
        slot = self._rng.randrange(self.count)
        if slot < self.capacity:
            self._values[slot] = value

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.add(value)

    @property
    def sampled(self) -> bool:
        """True once values were dropped: percentiles are estimates from then on."""
        return self.count > len(self._values)

    @property
    def mean(self) -> float:
        """Mean of every value seen (0.0 for none); summed in order while nothing was
        dropped, so it equals ``sum(values) / len(values)`` of the full list."""
        if not self.count:
            return 0.0
        if not self.sampled:
            return sum(self._values) / len(self._values)
        return self.total / self.count

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[float]:
        return iter(self._values)
