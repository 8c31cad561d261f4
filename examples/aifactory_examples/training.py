"""The pieces every PyTorch example shares: the process group, a synthetic task, a small
model, and one training loop that checkpoints, resumes and reports.

* ``Session`` joins the gang's process group (``env://``: ``MASTER_ADDR``/``MASTER_PORT``,
  set by the worker): NCCL on a GPU when CUDA is available, else gloo on CPU
  (``AIFACTORY_DIST_BACKEND`` overrides). ``CUDA_VISIBLE_DEVICES`` holds this worker's GPUs,
  so its device is ``cuda:0``.
* ``Regression`` is the data: inputs drawn per (step, rank) from a seeded generator and
  targets from a fixed random teacher network, so there is nothing to download, the loss
  starts near 1 and falls, and a resumed run sees exactly the batches it would have seen.
* ``fit`` trains with DDP, all-reducing the loss and a stop flag every step (every rank stops
  at the same step), saves ``{model, opt, step, loss}`` every ``checkpoint_every`` steps
  (rank 0; reported with ``ctx.report(checkpoint=...)``), resumes from a loaded checkpoint,
  appends ``{attempt, tag, step, loss}`` to ``losses.jsonl`` in the checkpoint directory and
  writes ``result-<attempt>-<rank>.json`` at the end. ``FAIL_AT_STEP`` makes the last rank of
  the first attempt raise once at that step (a failure to recover from, for tests and demos).

torch is imported only inside these functions, so the package imports without it and a
worker without torch fails with ``TorchMissing``, which says what to install.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory_examples import settings

__all__ = ["FitConfig", "FitResult", "Regression", "Session", "TorchMissing", "fit", "mlp",
           "require_torch"]

DIST_BACKEND_ENV = "AIFACTORY_DIST_BACKEND"
INPUT_DIM = 32
KEEP_CHECKPOINTS = 3


class TorchMissing(ModuleNotFoundError):
    """The training examples need PyTorch on the worker and it is not importable there."""


def require_torch(example: str) -> Any:
    """``import torch``, or ``TorchMissing`` naming what to install and how."""
    try:
        import torch
    except ImportError as exc:
        raise TorchMissing(
            f"{example} needs PyTorch on the worker, and `import torch` failed ({exc}). "
            "Install torch into the workers' Python (`pip install torch`, or add it to "
            "spec.runtime.pip / the worker image); for `aifactory run` on a local cluster, "
            "run `hack/install-torch.sh` and pass `--pythonpath ~/.cache/aifactory/torch` "
            "(or set AIFACTORY_WORKER_PYTHONPATH)") from exc
    return torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Session:
    """This worker's membership of the gang's process group, and its device."""

    def __init__(self, ctx: Any, example: str) -> None:
        torch = require_torch(example)
        import torch.distributed as dist

        self.torch = torch
        self.dist = dist
        self.rank = int(ctx.rank)
        self.world_size = int(ctx.world_size)
        chosen = os.environ.get(DIST_BACKEND_ENV, "")
        if chosen not in ("", "gloo", "nccl"):
            raise ValueError(f"environment variable {DIST_BACKEND_ENV}: expected gloo or "
                             f"nccl, got {chosen!r}")
        cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        self.backend = chosen or ("nccl" if cuda and dist.is_nccl_available() else "gloo")
        if self.backend == "nccl":
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            if "OMP_NUM_THREADS" not in os.environ:
                torch.set_num_threads(1)  # many small workers share the machine's cores
        if self.world_size == 1 and "MASTER_ADDR" not in os.environ:  # run by hand
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(self.backend, init_method="env://", rank=self.rank,
                                world_size=self.world_size)

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load_latest(self, ctx: Any) -> dict[str, Any] | None:
        """The latest checkpoint of an earlier attempt of this job, or None."""
        return self.load(ctx.latest_checkpoint if self.rank == 0 else None)

    def load(self, path: str | None) -> dict[str, Any] | None:
        """Rank 0 reads the checkpoint at ``path`` (None: there is none) and sends it to every
        rank, so the others need not see rank 0's filesystem (call on every rank)."""
        box: list[Any] = [None]
        if self.rank == 0 and path:
            box[0] = self.torch.load(path, map_location="cpu", weights_only=True)
        if self.world_size > 1:
            self.dist.broadcast_object_list(box, src=0)
        state: dict[str, Any] | None = box[0]
        return state


class Regression:
    """Targets from a fixed random two-layer teacher (seeded by ``task_seed``), scaled to unit
    variance; inputs drawn per (step, rank) so every batch is reproducible."""

    def __init__(self, torch: Any, task_seed: int = 0, dim: int = INPUT_DIM) -> None:
        self.torch = torch
        self.dim = dim
        gen = torch.Generator().manual_seed(task_seed)
        self.w1 = torch.randn(dim, 64, generator=gen) / math.sqrt(dim)
        self.w2 = torch.randn(64, 1, generator=gen) / math.sqrt(64)
        probe = torch.randn(4096, dim, generator=gen)
        self.scale = 1.0 / float(self._teacher(probe).std())

    def _teacher(self, x: Any) -> Any:
        return self.torch.tanh(x @ self.w1) @ self.w2

    def batch(self, step: int, rank: int, size: int, seed: int = 0) -> tuple[Any, Any]:
        gen = self.torch.Generator().manual_seed((seed * 1_000_003 + step) * 1009 + rank)
        x = self.torch.randn(size, self.dim, generator=gen)
        return x, self._teacher(x) * self.scale


def mlp(torch: Any, dim: int = INPUT_DIM, hidden: int = 128, seed: int = 0) -> Any:
    """The small model: two hidden layers of ``hidden`` units (same weights on every rank)."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                         nn.GELU(), nn.Linear(hidden, 1))


@dataclass(frozen=True, slots=True)
class FitConfig:
    """One run of the loop. ``tag`` prefixes its files (a sweep's trials); ``progress_span``
    is the share of the job's progress this run covers."""

    steps: int
    checkpoint_every: int
    lr: float
    batch: int = 64
    data_seed: int = 0
    fail_at_step: int = -1
    tag: str = ""
    progress_span: tuple[float, float] = (0.0, 1.0)
    find_unused_parameters: bool = False

    @classmethod
    def from_env(cls, full_steps: int, lr: float, **fields: Any) -> FitConfig:
        """``STEPS`` (default ``full_steps``, cut by ``AIFACTORY_FAST``),
        ``CHECKPOINT_EVERY`` (default a tenth of the steps), ``LR``, ``BATCH``,
        ``FAIL_AT_STEP``."""
        steps = settings.env_int("STEPS", settings.steps(full_steps))
        if steps < 1:
            raise ValueError(f"environment variable STEPS: must be >= 1, got {steps}")
        every = settings.env_int("CHECKPOINT_EVERY", max(1, steps // 10))
        if every < 1:
            raise ValueError(f"environment variable CHECKPOINT_EVERY: must be >= 1, got {every}")
        return cls(steps=steps, checkpoint_every=every, lr=settings.env_float("LR", lr),
                   batch=settings.env_int("BATCH", 64),
                   fail_at_step=settings.env_int("FAIL_AT_STEP", -1), **fields)


@dataclass(frozen=True, slots=True)
class FitResult:
    start: int
    steps_done: int
    loss: float
    stopped: bool


def _weights_digest(model: Any) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(json.dumps(p.detach().cpu().flatten().tolist()).encode())
    return digest.hexdigest()


def _save(torch: Any, state: dict[str, Any], path: Path, saved: list[Path]) -> str:
    """Write a checkpoint atomically and keep only the last ``KEEP_CHECKPOINTS`` of this run."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    saved.append(path)
    while len(saved) > KEEP_CHECKPOINTS:
        saved.pop(0).unlink(missing_ok=True)
    return str(path)


def fit(ctx: Any, session: Session, model: Any, task: Regression, cfg: FitConfig, *,
        resume: dict[str, Any] | None = None, extra_state: dict[str, Any] | None = None,
        extra_loss: Callable[[], Any] | None = None) -> FitResult:
    """Train ``model`` on ``task`` for ``cfg.steps`` steps (from ``resume``'s step if given);
    ``extra_state`` goes into every checkpoint, ``extra_loss()`` is added to the loss."""
    torch = session.torch
    from torch.nn.parallel import DistributedDataParallel

    model.to(session.device)
    ddp = DistributedDataParallel(
        model, device_ids=[0] if session.device.type == "cuda" else None,
        find_unused_parameters=cfg.find_unused_parameters)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    start, loss_value = 0, math.nan
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["opt"])
        start, loss_value = int(resume["step"]), float(resume["loss"])
    out = Path(ctx.checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    low, high = cfg.progress_span
    log = (out / "losses.jsonl").open("a", encoding="utf-8") if session.rank == 0 else None
    saved: list[Path] = []
    first_loss: float | None = None
    stopped = False
    step = start
    try:
        for step in range(start, cfg.steps):
            x, y = task.batch(step, session.rank, cfg.batch, cfg.data_seed)
            x, y = x.to(session.device), y.to(session.device)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            total = loss + extra_loss() if extra_loss is not None else loss
            opt.zero_grad()
            total.backward()
            opt.step()
            if ctx.attempt == 0 and step == cfg.fail_at_step and \
                    session.rank == session.world_size - 1:
                raise RuntimeError(f"injected failure at step {step} (FAIL_AT_STEP)")
            flags = torch.stack([loss.detach(), torch.tensor(
                1.0 if ctx.should_stop else 0.0, device=session.device)])
            session.dist.all_reduce(flags)
            loss_value = float(flags[0]) / session.world_size
            first_loss = loss_value if first_loss is None else first_loss
            stopped = float(flags[1]) > 0
            done = step + 1
            if log is not None:
                log.write(json.dumps({"attempt": ctx.attempt, "tag": cfg.tag, "step": step,
                                      "loss": loss_value}) + "\n")
                log.flush()
            progress = low + (high - low) * done / cfg.steps
            checkpoint = None
            if session.rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps
                                      or stopped):
                state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": done,
                         "loss": loss_value, "tag": cfg.tag, **(extra_state or {})}
                checkpoint = _save(torch, state, out / f"{cfg.tag}step-{done:06d}.pt", saved)
            ctx.report(progress=progress, checkpoint=checkpoint, loss=loss_value)
            if stopped:
                break
    finally:
        if log is not None:
            log.close()
    done = step + 1 if cfg.steps > start else start
    (out / f"{cfg.tag}result-{ctx.attempt}-{session.rank}.json").write_text(json.dumps({
        "start": start, "steps_done": done, "first_loss": first_loss, "loss": loss_value,
        "weights_sha256": _weights_digest(model), "world_size": session.world_size,
        "backend": session.backend, "device": str(session.device), "stopped": stopped}))
    return FitResult(start=start, steps_done=done, loss=loss_value, stopped=stopped)
