"""Read a ``TimeSeries`` back from Prometheus, so ``aifactory report`` can draw a live factory.

Range queries over the exporter's series (``/api/v1/query_range``): factory power, each
PowerBudget's limit and measured draw, mean utilization per rack (from the node-level
series, so it works in node-aggregation mode too), pending jobs and held GPUs per queue; and
one instant query at the end for energy, cost and GPU-hours per queue so far. Plain urllib:
no client library.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.sim.timeseries import BudgetSeries, TimeSeries, Totals

__all__ = ["PrometheusError", "query", "query_range", "series_from_prometheus"]

MAX_POINTS = 11000  # Prometheus refuses more points per series


class PrometheusError(AifactoryError):
    """Prometheus could not be reached or refused a query; the message says which."""


def _get(base_url: str, path: str, params: dict[str, str], timeout: float) -> Any:
    url = f"{base_url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.load(resp)
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")[:300]
        raise PrometheusError(f"{url}: HTTP {exc.code}: {body}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrometheusError(f"cannot query Prometheus at {base_url}: {exc}") from exc
    if doc.get("status") != "success":
        raise PrometheusError(f"{url}: {doc.get('errorType')}: {doc.get('error')}")
    return doc["data"]


def query(base_url: str, expr: str, at: float | None = None,
          timeout: float = 30.0) -> list[dict[str, Any]]:
    """An instant query; the ``result`` list of the vector (or a one-element scalar)."""
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    data = _get(base_url, "/api/v1/query", params, timeout)
    if data.get("resultType") == "scalar":
        return [{"metric": {}, "value": data["result"]}]
    result: list[dict[str, Any]] = data.get("result", [])
    return result


def query_range(base_url: str, expr: str, start: float, end: float, step: float,
                timeout: float = 60.0) -> list[dict[str, Any]]:
    data = _get(base_url, "/api/v1/query_range",
                {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                 "step": f"{step:g}"}, timeout)
    result: list[dict[str, Any]] = data.get("result", [])
    return result


def _on_grid(values: Sequence[Sequence[Any]], times: Sequence[float]) -> tuple[float, ...]:
    at = {round(float(t), 3): float(v) for t, v in values}
    return tuple(at.get(round(t, 3), math.nan) for t in times)


def series_from_prometheus(base_url: str, start: float, end: float, step: float = 0.0,
                           title: str = "") -> TimeSeries:
    """Everything the report draws, between ``start`` and ``end`` (Unix seconds)."""
    if not end > start:
        raise AifactoryError(f"--start/--end: end ({end}) must be after start ({start})")
    step = step if step > 0 else max(1.0, (end - start) / 500)
    step = max(step, (end - start) / MAX_POINTS)
    count = int((end - start) // step) + 1
    times = tuple(start + i * step for i in range(count))

    def grid(expr: str) -> dict[str, tuple[float, ...]]:
        out: dict[str, tuple[float, ...]] = {}
        for item in query_range(base_url, expr, start, end, step):
            label = next(iter(item["metric"].values()), "")
            out[label] = _on_grid(item["values"], times)
        return out

    power = grid("sum(aifactory_factory_power_watts)").get("", tuple(math.nan for _ in times))
    limits = grid("max by (budget) (aifactory_power_budget_watts)")
    draws = grid("max by (budget) (aifactory_power_draw_watts)")
    budgets = tuple(
        BudgetSeries(name, _last(limits[name]), draws.get(name, tuple(math.nan for _ in times)))
        for name in sorted(limits))
    racks = grid('avg by (rack) (aifactory_node_utilization_ratio{rack!=""})')
    pending = grid("sum by (queue) (aifactory_queue_pending_jobs)")
    held = grid("sum by (queue) (aifactory_queue_allocated_gpus)")
    queues = tuple(sorted(set(pending) | set(held)))
    empty = tuple(0.0 for _ in times)
    totals = _totals(base_url, "queue", end)
    by_namespace = _totals(base_url, "job_namespace", end)
    if all(math.isnan(p) for p in power):
        raise PrometheusError(f"no aifactory_factory_power_watts in Prometheus at {base_url} "
                              f"between {start:.0f} and {end:.0f}: is it scraping the "
                              "aifactory exporter?")
    return TimeSeries(
        title=title or f"aifactory (Prometheus {base_url})", source="prometheus",
        times=times, power_watts=power, budgets=budgets, racks=tuple(sorted(racks)),
        rack_utilization=tuple(racks[r] for r in sorted(racks)), queues=queues,
        queue_pending=tuple(pending.get(q, empty) for q in queues),
        queue_gpus=tuple(held.get(q, empty) for q in queues),
        totals=totals, namespace_totals=by_namespace,
        summary={"seconds": end - start, "step_seconds": step})


def _totals(base_url: str, by: str, at: float) -> tuple[Totals, ...]:
    """Energy, cost and GPU-hours so far, summed by ``by`` (queue or job_namespace)."""
    sums: dict[str, list[float]] = {}
    for i, expr in enumerate((f"sum by ({by}) (aifactory_job_energy_joules_total)",
                              f"sum by ({by}) (aifactory_job_cost_dollars_total)",
                              f"sum by ({by}) (aifactory_job_gpu_seconds_total) / 3600")):
        for item in query(base_url, expr, at):
            name = item["metric"].get(by, "")
            sums.setdefault(name, [0.0, 0.0, 0.0])[i] = float(item["value"][1])
    return tuple(Totals(name, *sums[name]) for name in sorted(sums))


def _last(values: tuple[float, ...]) -> float:
    for v in reversed(values):
        if not math.isnan(v):
            return v
    return math.nan
