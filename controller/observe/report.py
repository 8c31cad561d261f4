"""Pictures of a run: power against the budget, utilization per rack, queues, energy, cost.

``write_report(series, prefix)`` draws one ``TimeSeries`` (from a simulation or from
Prometheus) as four panels in one PNG, and writes a self-contained HTML page around it (the
PNG embedded as base64, plus a table of the per-queue totals), so a report can be mailed or
attached to an issue as one file. matplotlib is an optional dependency (``aifactory[report]``)
and runs on its Agg backend: no display needed.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from aifactory.controller.core.errors import AifactoryError
from aifactory.controller.power.model import JOULES_PER_KWH
from aifactory.controller.sim.timeseries import TimeSeries, Totals

__all__ = ["render_html", "render_png", "write_report"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise AifactoryError("aifactory report needs matplotlib: pip install "
                             "'aifactory[report]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _time_axis(times: tuple[float, ...]) -> tuple[list[float], str]:
    if not times:
        return [], "time"
    start = times[0]
    span = times[-1] - start
    if span >= 2 * 86400:
        return [(t - start) / 86400 for t in times], "days since start"
    if span >= 2 * 3600:
        return [(t - start) / 3600 for t in times], "hours since start"
    return [(t - start) / 60 for t in times], "minutes since start"


def render_png(series: TimeSeries, dpi: int = 110) -> bytes:
    """The four panels as PNG bytes."""
    plt = _pyplot()
    x, xlabel = _time_axis(series.times)
    rows = 3 if series.services else 2
    fig, axes = plt.subplots(rows, 2, figsize=(14, 4.75 * rows), constrained_layout=True)
    fig.suptitle(series.title or "aifactory report", fontsize=14, fontweight="bold")
    _power(axes[0][0], series, x, xlabel)
    _heatmap(fig, axes[0][1], series, x, xlabel)
    _queues(axes[1][0], series, x, xlabel)
    _totals(axes[1][1], series)
    if series.services:
        _replicas(axes[2][0], series, x, xlabel)
        _service_watts(axes[2][1], series, x, xlabel)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def _power(ax: Any, series: TimeSeries, x: list[float], xlabel: str) -> None:
    ax.set_title("Power draw against the budgets")
    ax.plot(x, [w / 1000 for w in series.power_watts], color="black", linewidth=2,
            label="factory draw (GPUs + node base)", drawstyle="steps-post")
    colours = ["tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:pink"]
    if series.tier_draw and len(series.tier_draw[0]) == len(x):
        ax.stackplot(x, *[[w / 1000 for w in t] for t in series.tier_draw], step="post",
                     alpha=0.45, colors=["#1b9e77", "#7570b3", "#d95f02", "#e7298a"],
                     labels=[f"GPU draw above idle, tier {t}" for t in range(4)])
    t0 = series.times[0] if series.times else 0.0
    unit = (series.times[-1] - t0) / (x[-1] - x[0]) if len(x) > 1 and x[-1] != x[0] else 1.0
    for i, (ident, start, end) in enumerate(series.grid_events):
        ax.axvspan((start - t0) / unit, (end - t0) / unit, color="grey", alpha=0.15,
                   label="grid event" if i == 0 else None)
        ax.annotate(ident, ((start - t0) / unit, 0), fontsize=7, rotation=90, va="bottom")
    for i, b in enumerate(series.budgets):
        colour = colours[i % len(colours)]
        if b.name != "factory" and len(series.budgets) > 1:
            ax.plot(x, [w / 1000 for w in b.draw_watts], color=colour, linewidth=1.2,
                    label=f"{b.name} draw", drawstyle="steps-post")
        if b.limits_watts and len(b.limits_watts) == len(x):
            ax.plot(x, [w / 1000 for w in b.limits_watts], color=colour, linestyle="--",
                    linewidth=1.4, drawstyle="steps-post",
                    label=f"{b.name} limit (base {b.limit_watts / 1000:,.0f} kW)")
        elif not math.isnan(b.limit_watts):
            ax.axhline(b.limit_watts / 1000, color=colour, linestyle="--", linewidth=1.2,
                       label=f"{b.name} budget {b.limit_watts / 1000:,.0f} kW")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("kW")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _heatmap(fig: Any, ax: Any, series: TimeSeries, x: list[float], xlabel: str) -> None:
    ax.set_title("GPU utilization per rack")
    if not series.racks or not x:
        ax.text(0.5, 0.5, "no rack data", ha="center", va="center")
        return
    right = x[-1] if len(x) > 1 and x[-1] > x[0] else x[0] + 1
    image = ax.imshow(series.rack_utilization, aspect="auto", interpolation="nearest",
                      cmap="viridis", vmin=0.0, vmax=1.0, origin="upper",
                      extent=(x[0], right, len(series.racks) - 0.5, -0.5))
    step = max(1, len(series.racks) // 24)
    ticks = list(range(0, len(series.racks), step))
    ax.set_yticks(ticks, [series.racks[i] for i in ticks], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rack")
    fig.colorbar(image, ax=ax, label="mean GPU utilization")


def _queues(ax: Any, series: TimeSeries, x: list[float], xlabel: str) -> None:
    ax.set_title("Queue depth and GPUs in use")
    held = ax.twinx()
    for i, queue in enumerate(series.queues):
        colour = f"C{i % 10}"
        ax.plot(x, series.queue_pending[i], color=colour, linewidth=2,
                drawstyle="steps-post", label=f"{queue}: pending jobs")
        if i < len(series.queue_gpus):
            held.plot(x, series.queue_gpus[i], color=colour, linewidth=1, linestyle=":",
                      drawstyle="steps-post", label=f"{queue}: GPUs held")
    _twin_axes(ax, held, xlabel, "pending jobs", "GPUs held (dotted)", "center right", 8)
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _replicas(ax: Any, series: TimeSeries, x: list[float], xlabel: str) -> None:
    """Each service's replicas (wanted solid, serving dotted) against its request rate."""
    ax.set_title("Inference replicas following load")
    rate_ax = ax.twinx()
    for i, name in enumerate(series.services):
        colour = f"C{i % 10}"
        ax.plot(x, series.service_desired[i], color=colour, linewidth=2,
                drawstyle="steps-post", label=f"{name}: replicas wanted")
        ax.plot(x, series.service_ready[i], color=colour, linewidth=1, linestyle=":",
                drawstyle="steps-post", label=f"{name}: replicas serving")
        rate_ax.plot(x, series.service_rate[i], color=colour, linewidth=1, alpha=0.5,
                     label=f"{name}: requests/s")
    _twin_axes(ax, rate_ax, xlabel, "replicas", "requests per second (thin)", "upper left", 7)


def _twin_axes(ax: Any, other: Any, xlabel: str, left: str, right: str, loc: str,
               fontsize: int) -> None:
    """Labels, zero floors, a grid and one legend for a panel with a second y axis."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(left)
    other.set_ylabel(right)
    ax.set_ylim(bottom=0)
    other.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc=loc, fontsize=fontsize)


def _service_watts(ax: Any, series: TimeSeries, x: list[float], xlabel: str) -> None:
    ax.set_title("GPU power of each service's replicas")
    for i, name in enumerate(series.services):
        ax.plot(x, [w / 1000 for w in series.service_watts[i]], color=f"C{i % 10}",
                linewidth=1.5, drawstyle="steps-post", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("kW")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def _totals(ax: Any, series: TimeSeries) -> None:
    totals = series.totals
    ax.set_title("Energy and cost per queue")
    if len(totals) <= 1 and len(series.namespace_totals) > 1:
        only = f" (every job in queue {totals[0].name})" if totals else ""
        ax.set_title(f"Energy and cost per namespace{only}")
        totals = series.namespace_totals
    if not totals:
        ax.text(0.5, 0.5, "no per-queue totals", ha="center", va="center")
        return
    names = [t.name for t in totals]
    pos = list(range(len(names)))
    kwh = [t.energy_joules / JOULES_PER_KWH for t in totals]
    unit, scale = ("MWh", 1000.0) if max(kwh) >= 1000 else ("kWh", 1.0)
    energy = [v / scale for v in kwh]
    dollars = [t.cost_dollars for t in totals]
    bars = ax.bar([p - 0.2 for p in pos], energy, width=0.4, color="tab:green")
    cost_ax = ax.twinx()
    cost_bars = cost_ax.bar([p + 0.2 for p in pos], dollars, width=0.4, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in energy], fontsize=8)
    cost_ax.bar_label(cost_bars, labels=[f"${v:,.0f}" for v in dollars], fontsize=8)
    ax.set_xticks(pos, names)
    ax.set_ylabel(f"energy ({unit})")
    cost_ax.set_ylabel("cost ($, electricity + GPU-hours)")
    ax.set_ylim(0, max([*energy, 1e-09]) * 1.2)
    cost_ax.set_ylim(0, max([*dollars, 1e-09]) * 1.2)
    ax.legend([bars, cost_bars], [f"energy ({unit})", "cost ($)"], loc="upper left",
              fontsize=8)


def render_html(series: TimeSeries, png: bytes) -> str:
    """A page that needs nothing else: the PNG inline, totals and summary as tables."""
    title = html.escape(series.title or "aifactory report")
    def rows(totals: tuple[Totals, ...]) -> str:
        return "".join(
            f"<tr><td>{html.escape(t.name)}</td><td>{t.energy_joules / JOULES_PER_KWH:,.1f}"
            f"</td><td>{t.gpu_hours:,.1f}</td><td>{t.cost_dollars:,.2f}</td></tr>"
            for t in totals)

    head = "<th>energy (kWh)</th><th>GPU-hours</th><th>cost ($)</th></tr>"
    summary = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:,.4g}</td></tr>"
                      for k, v in series.summary.items())
    peak = max((w for w in series.power_watts if not math.isnan(w)), default=0.0)
    budgets = "".join(f"<li>{html.escape(b.name)}: {b.limit_watts / 1000:,.1f} kW</li>"
                      for b in series.budgets)
    data = base64.b64encode(png).decode()
    span = (series.times[-1] - series.times[0]) if len(series.times) > 1 else 0.0
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1600px}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;
text-align:right}}td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body>
<h1>{title}</h1>
<p>Source: {html.escape(series.source)}; {len(series.times)} samples over {span / 3600:,.2f} h;
peak draw {peak / 1000:,.1f} kW.</p>
<ul>{budgets}</ul>
<img alt="power, rack utilization, queue depth, energy and cost" src="data:image/png;base64,{data}">
<h2>Per queue</h2>
<table><tr><th>queue</th>{head}{rows(series.totals)}</table>
<h2>Per namespace</h2>
<table><tr><th>namespace</th>{head}{rows(series.namespace_totals)}</table>
<h2>Run</h2><table>{summary}</table>
</body></html>
"""


def write_report(series: TimeSeries, prefix: str | Path) -> tuple[Path, Path]:
    """Write ``prefix.png`` and ``prefix.html``; returns both paths."""
    base = Path(prefix)
    if base.suffix in (".png", ".html"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    png = render_png(series)
    png_path = base.with_name(base.name + ".png")
    html_path = base.with_name(base.name + ".html")
    png_path.write_bytes(png)
    html_path.write_text(render_html(series, png))
    return png_path, html_path
