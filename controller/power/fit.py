"""Fit a GPU power curve to measured (utilization, watts) samples.

The simulated factory's power numbers are only as good as the curve behind them, so the H200
profile in ``controller.power.model`` is not copied from a spec sheet: it is this fit, run over the
two real H200 runs in ``../shared/data`` (see its README), rounded to 0.1 W. A unit test
re-runs the fit and fails if the shipped constants drift from it.

The model is a hinge, ``P(u) = min(active_idle + slope * u, saturation)``, because that is
what the hardware shows: draw rises about linearly with NVML utilization until the power
limit makes the clocks drop, then stays flat. The fit has two least-squares stages:

1. ``saturation`` is the mean draw of the full-load samples (utilization >= 95 %), i.e. the
   least-squares constant for the flat part. Fitting it jointly with the slope instead lets
   one low bursty phase (75 % duty at 632 W in the second run) pull it 16 W under the
   measured 691 W full-load draw, and a budget that underestimates peak draw is the unsafe
   direction.
2. ``active_idle`` and ``slope`` minimise the squared error of the hinge with that
   saturation over every steady sample that holds a CUDA context. The knee is searched
   exactly (closed form per interval between distinct utilizations, plus the breakpoints).

No-context samples (driver loaded, no process: SM clock parked at 345 MHz) give
``idle_watts``, the draw of a GPU nobody has allocated. Transients are dropped: the first
``SETTLE_SECONDS`` of every phase, when NVML utilization (averaged over its own window) and
power (averaged over about 1 s) still describe the previous phase.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from aifactory.controller.core.errors import InputFileError, SpecError

__all__ = [
    "FULL_LOAD_UTILIZATION",
    "SETTLE_SECONDS",
    "PowerCurveFit",
    "PowerSample",
    "describe_fit",
    "fit_power_curve",
    "load_h200_samples",
    "no_context_idle_watts",
]

FULL_LOAD_UTILIZATION = 0.95
SETTLE_SECONDS = 2.0
_NO_CONTEXT_MAX_SM_MHZ = 1000  # parked clock is 345 MHz; a held context boosts to 1980 MHz
_SAMPLES_FILE = "h200_power_samples.csv"
_CURVE_FILE = "h200_power_curve_samples.csv"
_PHASES_FILE = "h200_power_curve_phases.txt"
_SMI_TIME = "%Y/%m/%d %H:%M:%S.%f"


@dataclass(frozen=True, slots=True)
class PowerSample:
    """One steady power reading: utilization 0..1, draw in watts, whether a context was held."""

    utilization: float
    watts: float
    context: bool = True


class PowerCurveFit(NamedTuple):
    """Result of ``fit_power_curve``; unpacks as the 5-tuple the constants are made from."""

    active_idle_watts: float
    watts_per_utilization: float
    saturation_watts: float
    rmse_watts: float
    max_abs_error_watts: float

    def power_watts(self, utilization: float) -> float:
        """The fitted curve at ``utilization`` (0..1, not clamped)."""
        return min(self.active_idle_watts + self.watts_per_utilization * utilization,
                   self.saturation_watts)


def no_context_idle_watts(samples: Iterable[PowerSample]) -> float:
    """Mean draw of the samples taken with no CUDA context (the unallocated-GPU draw)."""
    watts = [s.watts for s in samples if not s.context]
    if not watts:
        raise SpecError("samples", "need at least one sample with no CUDA context")
    return math.fsum(watts) / len(watts)


def fit_power_curve(samples: Iterable[PowerSample]) -> PowerCurveFit:
    """Least-squares hinge fit over the context-holding samples (see the module docstring).

    Returns ``(active_idle_watts, watts_per_utilization, saturation_watts, rmse_watts,
    max_abs_error_watts)``; the errors are over the samples used.
    """
    active = sorted((s.utilization, s.watts) for s in samples if s.context)
    full = [w for u, w in active if u >= FULL_LOAD_UTILIZATION]
    if not full:
        raise SpecError("samples", f"need samples at >= {FULL_LOAD_UTILIZATION:.0%} "
                        "utilization to fit the saturation draw")
    saturation = math.fsum(full) / len(full)
    utils = [u for u, _ in active]
    ys = [w - saturation for _, w in active]
    # Prefix sums over samples sorted by utilization; samples below the knee are a prefix.
    s_u, s_uu, s_y, s_uy = [0.0], [0.0], [0.0], [0.0]
    for u, y in zip(utils, ys, strict=True):
        s_u.append(s_u[-1] + u)
        s_uu.append(s_uu[-1] + u * u)
        s_y.append(s_y[-1] + y)
        s_uy.append(s_uy[-1] + u * y)
    total_yy = math.fsum(y * y for y in ys)

    def sse_at(knee: float) -> tuple[float, float]:
        """(SSE, slope) of the best hinge with its knee at ``knee``."""
        k = bisect.bisect_left(utils, knee)
        sxx = s_uu[k] - 2 * knee * s_u[k] + k * knee * knee
        if sxx <= 0:
            return total_yy, 0.0
        sxy = s_uy[k] - knee * s_y[k]
        return total_yy - sxy * sxy / sxx, sxy / sxx

    distinct = sorted(set(utils))
    if len(distinct) < 2:
        raise SpecError("samples", "need context-holding samples at more than one utilization")
    candidates = [u for u in distinct if u > distinct[0]]
    for i in range(1, len(distinct)):
        # Stationary point with the first i distinct utilizations below the knee: the free
        # line through them meets the saturation at (saturation - a) / b.
        k = bisect.bisect_left(utils, distinct[i])
        if k < 2:
            continue
        n = float(k)
        var = s_uu[k] - s_u[k] * s_u[k] / n
        if var <= 0:
            continue
        slope = (s_uy[k] - s_u[k] * s_y[k] / n) / var
        intercept_y = (s_y[k] - slope * s_u[k]) / n  # line of y = w - saturation
        if slope > 0:
            knee = -intercept_y / slope
            if distinct[i - 1] < knee <= distinct[i]:
                candidates.append(knee)
    _, best_slope, best_knee = min((*sse_at(c), c) for c in candidates)
    active_idle = saturation - best_slope * best_knee
    fit = PowerCurveFit(active_idle, best_slope, saturation, 0.0, 0.0)
    errors = [fit.power_watts(u) - w for u, w in active]
    return fit._replace(
        rmse_watts=math.sqrt(math.fsum(e * e for e in errors) / len(errors)),
        max_abs_error_watts=max(abs(e) for e in errors),
    )


# --------------------------------------------------------------------------- loading


def _open_rows(path: Path) -> list[list[str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return [row for row in csv.reader(handle) if row]
    except OSError as exc:
        raise InputFileError(str(path), f"cannot read: {exc.strerror or exc}") from exc


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputFileError(str(path), f"expected a number, got {text.strip()!r}", line, column)
    return value


def _nvml_samples(path: Path) -> list[PowerSample]:
    """Run 1: NVML every 100 ms, one ``phase`` column (init = no context)."""
    rows = _open_rows(path)
    header = [h.strip() for h in rows[0]] if rows else []
    missing = [c for c in ("t", "phase", "power_w", "util_gpu") if c not in header]
    if missing:
        raise InputFileError(str(path), f"missing columns: {', '.join(missing)}", 1)
    col = {name: header.index(name) for name in ("t", "phase", "power_w", "util_gpu")}
    phase_start: dict[str, float] = {}
    out: list[PowerSample] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputFileError(str(path), f"expected {len(header)} fields, got {len(row)}",
                                 line)
        t = _number(path, line, "t", row[col["t"]])
        phase = row[col["phase"]].strip()
        start = phase_start.setdefault(phase, t)
        watts = _number(path, line, "power_w", row[col["power_w"]])
        util = _number(path, line, "util_gpu", row[col["util_gpu"]]) / 100.0
        if phase == "init":
            out.append(PowerSample(util, watts, context=False))
        elif t >= start + SETTLE_SECONDS:
            out.append(PowerSample(util, watts, context=True))
    return out


def _smi_time(path: Path, line: int, column: str, text: str) -> float:
    try:
        return datetime.strptime(text.strip(), _SMI_TIME).timestamp()
    except ValueError as exc:
        raise InputFileError(str(path), f"expected a time like 2026/11/26 03:01:24.265, got "
                             f"{text.strip()!r}", line, column) from exc


def _smi_samples(path: Path, phases_path: Path) -> list[PowerSample]:
    """Run 2: nvidia-smi every 250 ms; duty phases are time windows in the phases file."""
    windows: list[tuple[float, float]] = []
    starts: dict[str, float] = {}
    try:
        phase_lines = phases_path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputFileError(str(phases_path), f"cannot read: {exc.strerror or exc}") from exc
    for line, text in enumerate(phase_lines, start=1):
        parts = text.split()
        if len(parts) == 4 and parts[0] in ("start", "end"):
            when = _smi_time(phases_path, line, "time", f"{parts[2]} {parts[3]}")
            if parts[0] == "start":
                starts[parts[1]] = when
            elif parts[1] in starts:
                windows.append((starts.pop(parts[1]), when))
    if not windows:
        raise InputFileError(str(phases_path), "no 'start <duty> <time>' / 'end' pairs found")
    rows = _open_rows(path)
    header = [h.strip() for h in rows[0]] if rows else []
    needed = ("timestamp", "power.draw [W]", "utilization.gpu [%]", "clocks.current.sm [MHz]")
    missing = [c for c in needed if c not in header]
    if missing:
        raise InputFileError(str(path), f"missing columns: {', '.join(missing)}", 1)
    t_col, w_col, u_col, c_col = (header.index(c) for c in needed)
    first_phase = min(start for start, _ in windows)
    out: list[PowerSample] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InputFileError(str(path), f"expected {len(header)} fields, got {len(row)}",
                                 line)
        t = _smi_time(path, line, "timestamp", row[t_col])
        watts = _number(path, line, "power.draw [W]", row[w_col])
        util = _number(path, line, "utilization.gpu [%]", row[u_col]) / 100.0
        clock = _number(path, line, "clocks.current.sm [MHz]", row[c_col])
        if t < first_phase and clock < _NO_CONTEXT_MAX_SM_MHZ:
            out.append(PowerSample(util, watts, context=False))
        elif any(start + SETTLE_SECONDS <= t < end for start, end in windows):
            out.append(PowerSample(util, watts, context=True))
    return out


def load_h200_samples(data_dir: Path | str) -> list[PowerSample]:
    """Steady samples of both H200 runs in ``data_dir`` (the shared ``data/`` folder)."""
    base = Path(data_dir)
    return [*_nvml_samples(base / _SAMPLES_FILE),
            *_smi_samples(base / _CURVE_FILE, base / _PHASES_FILE)]


def describe_fit(fit: PowerCurveFit, idle_watts: float,
                 samples: Sequence[PowerSample]) -> str:
    """One line for logs and commit messages."""
    return (f"idle {idle_watts:.1f} W, active idle {fit.active_idle_watts:.1f} W, "
            f"slope {fit.watts_per_utilization:.1f} W/unit, saturation "
            f"{fit.saturation_watts:.1f} W; rmse {fit.rmse_watts:.1f} W, max "
            f"{fit.max_abs_error_watts:.1f} W over {sum(s.context for s in samples)} samples")
