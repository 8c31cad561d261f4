"""Knobs the examples read from the environment, and the fast mode of ``aifactory run --fast``.

Every example's length is a number of steps; ``AIFACTORY_FAST=1`` divides it by
``FAST_DIVISOR`` (at least ``FAST_MIN_STEPS``) so a demo of all samples takes seconds, not
hours, and still trains, checkpoints and reports like the full run.
"""

from __future__ import annotations

import os

__all__ = ["FAST_ENV", "env_float", "env_int", "fast", "steps"]

FAST_ENV = "AIFACTORY_FAST"
FAST_DIVISOR = 25
FAST_MIN_STEPS = 20


def fast() -> bool:
    """True when ``AIFACTORY_FAST`` is set to something other than ``0``/empty."""
    return os.environ.get(FAST_ENV, "") not in ("", "0")


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, "
                         f"got {raw!r}") from None


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected a number, "
                         f"got {raw!r}") from None


def steps(full: int) -> int:
    """``full`` steps, or the fast demo's share of them."""
    if not fast():
        return full
    return max(FAST_MIN_STEPS, full // FAST_DIVISOR)
