"""A small real PyTorch program for the Ray backend: DDP over gloo on CPU, checkpoint, resume.

It reads only the environment the backend provides (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT`` through ``init_method="env://"``) and the worker context
(checkpoint directory, latest checkpoint, ``report``). ``FAIL_AT_STEP`` makes rank 1 of the
first attempt raise once, so the test sees the gang fail, get requeued and resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def train(ctx: Any) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    total = int(os.environ.get("STEPS", "12"))
    every = int(os.environ.get("CHECKPOINT_EVERY", "4"))
    fail_at = int(os.environ.get("FAIL_AT_STEP", "-1"))
    out = Path(ctx.checkpoint_dir)
    dist.init_process_group("gloo", init_method="env://")
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 1)
        ddp = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        start = 0
        if ctx.latest_checkpoint:
            state = torch.load(ctx.latest_checkpoint, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
        losses: list[float] = []
        for step in range(start, total):
            gen = torch.Generator().manual_seed(1000 * step + ctx.rank)
            x = torch.randn(32, 8, generator=gen)
            y = x.sum(dim=1, keepdim=True)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
            if ctx.attempt == 0 and ctx.rank == 1 and step == fail_at:
                raise RuntimeError(f"injected failure at step {step}")
            done = step + 1
            if done % every == 0 and ctx.rank == 0:
                path = out / f"model-{done}.pt"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "step": done}, path)
                ctx.report(progress=done / total, checkpoint=str(path))
            else:
                ctx.report(progress=done / total)
        weights = torch.cat([p.detach().flatten() for p in model.parameters()])
        (out / f"result-{ctx.attempt}-{ctx.rank}.json").write_text(json.dumps({
            "start": start, "losses": losses, "weights": weights.tolist(),
            "world_size": dist.get_world_size(), "backend": dist.get_backend()}))
    finally:
        dist.destroy_process_group()
