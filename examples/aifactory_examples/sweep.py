"""A learning-rate sweep (``aifactory_examples.sweep:main``): the train example's model trained
once per learning rate, one trial after another, and the best one reported.

Each trial checkpoints like ``train`` (its files prefixed ``lr<k>-``), and every checkpoint
carries the trials finished so far, so a restart skips them and resumes the current trial
from its last step. The job's progress runs over all trials; at the end rank 0 writes
``sweep.json`` (every learning rate and its final loss) and reports ``best_lr`` and
``best_loss``.

Environment: ``LRS`` (comma-separated, default ``0.01,0.003,0.001``), ``STEPS`` per trial
(default 600; 24 with ``AIFACTORY_FAST=1``), and the rest as for ``train``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from aifactory_examples import settings
from aifactory_examples.training import FitConfig, Regression, Session, fit, mlp, require_torch

__all__ = ["DEFAULT_LRS", "FULL_STEPS", "learning_rates", "main"]

FULL_STEPS = 600
DEFAULT_LRS = (0.01, 0.003, 0.001)


def learning_rates() -> tuple[float, ...]:
    raw = os.environ.get("LRS", "")
    if not raw.strip():
        return DEFAULT_LRS
    try:
        rates = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ValueError(f"environment variable LRS: expected comma-separated numbers, "
                         f"got {raw!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"environment variable LRS: every rate must be > 0, got {raw!r}")
    return rates


def main(ctx: Any) -> None:
    rates = learning_rates()
    base = FitConfig.from_env(FULL_STEPS, rates[0])
    torch = require_torch(__name__)
    with Session(ctx, __name__) as session:
        task = Regression(torch)
        state = session.load_latest(ctx)
        results: list[dict[str, float]] = list(state["results"]) if state else []
        first = int(state["trial"]) if state else 0
        for k, lr in enumerate(rates):
            if k < first:
                continue
            cfg = replace(base, lr=lr, tag=f"lr{k}-",
                          progress_span=(k / len(rates), (k + 1) / len(rates)))
            model = mlp(torch, hidden=settings.env_int("HIDDEN", 128))
            done = fit(ctx, session, model, task, cfg,
                       resume=state if state is not None and int(state["trial"]) == k else None,
                       extra_state={"trial": k, "results": list(results)})
            if done.stopped:
                return
            results.append({"lr": lr, "loss": done.loss})
            state = None
        best = min(results, key=lambda r: r["loss"])
        if ctx.rank == 0:
            (Path(ctx.checkpoint_dir) / "sweep.json").write_text(
                json.dumps({"results": results, "best": best}, indent=1))
            print(f"{__name__}: best lr {best['lr']:g} (loss {best['loss']:.4f})", flush=True)
        ctx.report(progress=1.0, best_lr=best["lr"], best_loss=best["loss"])
