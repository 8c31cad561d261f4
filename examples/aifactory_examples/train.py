"""Distributed training (``aifactory_examples.train:main``): PyTorch DDP on synthetic data.

Every worker of the gang joins one process group (gloo on CPU, NCCL on GPUs), trains a small
MLP on a synthetic regression task (``training.Regression``), checkpoints every
``CHECKPOINT_EVERY`` steps through ``ctx.report(checkpoint=...)``, and on a restart resumes
from ``ctx.latest_checkpoint``: same weights, same optimizer state, same next batch, so the
loss continues where it was. It reports progress and loss every step and stops, after a last
checkpoint, when ``ctx.should_stop``.

Environment: ``STEPS`` (default 2000; 80 with ``AIFACTORY_FAST=1``), ``CHECKPOINT_EVERY``
(a tenth of the steps), ``LR`` (0.003), ``BATCH`` (64), ``HIDDEN`` (128 units),
``FAIL_AT_STEP`` (the last rank of the first attempt raises once at that step),
``AIFACTORY_DIST_BACKEND`` (gloo or nccl). The loss of every step is in
``losses.jsonl`` in the checkpoint directory.
"""

from __future__ import annotations

from typing import Any

from aifactory_examples import settings
from aifactory_examples.training import FitConfig, Regression, Session, fit, mlp, require_torch

__all__ = ["FULL_STEPS", "main"]

FULL_STEPS = 2000
LR = 0.003


def main(ctx: Any) -> None:
    cfg = FitConfig.from_env(FULL_STEPS, LR)
    torch = require_torch(__name__)
    with Session(ctx, __name__) as session:
        model = mlp(torch, hidden=settings.env_int("HIDDEN", 128))
        fit(ctx, session, model, Regression(torch), cfg, resume=session.load_latest(ctx))
