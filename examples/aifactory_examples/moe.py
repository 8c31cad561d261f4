"""A tiny mixture-of-experts model trained with DDP, run as a command:
``python -m aifactory_examples.moe --steps 1000``.

The layer routes every input to one of ``--experts`` small MLPs by a learned softmax gate
(top-1, Switch-Transformer style), scales the expert's output by its gate probability, and
adds the Switch load-balancing loss (experts x sum of token share x mean gate probability)
so the gate spreads its inputs. An expert that gets no input in a step gets no gradient,
hence DDP's ``find_unused_parameters``.

As a command it learns who it is from the environment the worker sets and reports by
printing ``AIFACTORY_REPORT`` lines (``aifactory_examples.context``); it checkpoints and
resumes like ``train``, and SIGTERM (the worker's stop) makes it save and exit. Run by hand
it is one process checkpointing into ``./checkpoints``. ``AIFACTORY_FAST=1`` cuts
``--steps`` (and ``STEPS`` overrides it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from aifactory_examples.context import CommandContext
from aifactory_examples.training import (
    INPUT_DIM,
    FitConfig,
    Regression,
    Session,
    TorchMissing,
    fit,
    require_torch,
)

__all__ = ["build_moe", "main"]

TASK_SEED = 2
AUX_WEIGHT = 0.01


def build_moe(torch: Any, experts: int, dim: int = INPUT_DIM, hidden: int = 64,
              seed: int = 0) -> Any:
    """The model: an input projection, the routed experts, a linear head."""
    nn = torch.nn

    class MixtureOfExperts(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(dim, dim)
            self.gate = nn.Linear(dim, experts)
            self.experts = nn.ModuleList(
                nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                for _ in range(experts))
            self.head = nn.Linear(dim, 1)
            self.aux_loss = torch.zeros(())

        def forward(self, x: Any) -> Any:
            h = torch.nn.functional.gelu(self.inp(x))
            probs = torch.softmax(self.gate(h), dim=-1)
            top = probs.argmax(dim=-1)
            mixed = torch.zeros_like(h)
            for e, expert in enumerate(self.experts):
                chosen = top == e
                if bool(chosen.any()):
                    mixed[chosen] = expert(h[chosen]) * probs[chosen, e].unsqueeze(-1)
            share = torch.bincount(top, minlength=experts).float() / top.numel()
            self.aux_loss = experts * torch.sum(share * probs.mean(dim=0))
            return self.head(h + mixed)

    torch.manual_seed(seed)
    return MixtureOfExperts()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train a tiny mixture-of-experts model")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--experts", type=int, default=4, help="number of experts")
    parser.add_argument("--lr", type=float, default=0.003, help="learning rate")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.experts < 1:
        parser.error("--steps and --experts must be >= 1")
    ctx = CommandContext()
    ctx.stop_on_sigterm()
    cfg = FitConfig.from_env(args.steps, args.lr, find_unused_parameters=True)
    try:
        torch = require_torch("aifactory_examples.moe")
    except TorchMissing as exc:
        print(exc, flush=True)  # the last line is the worker's failure message
        return 2
    with Session(ctx, "aifactory_examples.moe") as session:
        model = build_moe(torch, args.experts)
        fit(ctx, session, model, Regression(torch, task_seed=TASK_SEED), cfg,
            resume=session.load_latest(ctx), extra_loss=lambda: AUX_WEIGHT * model.aux_loss)
    return 0


if __name__ == "__main__":
    sys.exit(main())
