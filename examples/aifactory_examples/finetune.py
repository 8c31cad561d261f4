"""Fine-tuning (``aifactory_examples.finetune:main``): the train example's model, started from
a pretrained checkpoint, trained on a new task.

``PRETRAINED`` names a checkpoint of ``aifactory_examples.train`` (a ``step-*.pt`` file from
its checkpoint directory): its weights are the starting point (not its optimizer or step).
Without it the model starts from a fresh initialisation, and says so in its log. A restart
resumes from the job's own latest checkpoint, which wins over ``PRETRAINED``.

Environment as for ``train`` (``STEPS`` default 500, 20 with ``AIFACTORY_FAST=1``; ``LR``
0.001), plus ``PRETRAINED``.
"""

from __future__ import annotations

import os
from typing import Any

from aifactory_examples import settings
from aifactory_examples.training import FitConfig, Regression, Session, fit, mlp, require_torch

__all__ = ["FULL_STEPS", "main"]

FULL_STEPS = 500
LR = 0.001
TASK_SEED = 1  # a different teacher than train's


def main(ctx: Any) -> None:
    cfg = FitConfig.from_env(FULL_STEPS, LR)
    torch = require_torch(__name__)
    pretrained = os.environ.get("PRETRAINED") or None
    if pretrained is not None and ctx.rank == 0 and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"environment variable PRETRAINED: no checkpoint file at "
                                f"{pretrained} (name a step-*.pt of aifactory_examples.train)")
    with Session(ctx, __name__) as session:
        model = mlp(torch, hidden=settings.env_int("HIDDEN", 128))
        resume = session.load_latest(ctx)
        if resume is None and pretrained is not None:
            start = session.load(pretrained)
            assert start is not None
            model.load_state_dict(start["model"])
            if ctx.rank == 0:
                print(f"{__name__}: starting from {pretrained} (step {start['step']}, "
                      f"loss {start['loss']:.4f} on its own task)", flush=True)
        elif resume is None and ctx.rank == 0:
            print(f"{__name__}: no PRETRAINED checkpoint given: starting from a fresh "
                  "initialisation", flush=True)
        fit(ctx, session, model, Regression(torch, task_seed=TASK_SEED), cfg, resume=resume)
