"""Worker programs the Ray integration tests run (``module:function`` entrypoints).

They run inside Ray worker actors, which import this module through the driver's working
directory (Ray adds it to the workers' ``sys.path``). Each writes what it saw to small JSON
files in its checkpoint directory so the test can check it from outside.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR",
            "MASTER_PORT", "CUDA_VISIBLE_DEVICES", "AIFACTORY_CHECKPOINT_DIR")


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def _process_started() -> float:
    """When this process started (epoch seconds, from /proc: the local cluster is Linux)."""
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def where(ctx: Any) -> None:
    """Record the node, process and environment this worker got, then hold for
    ``HOLD_SECONDS``."""
    info = {"rank": ctx.rank, "attempt": ctx.attempt,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(), "process_started": _process_started(),
            "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    _write(Path(ctx.checkpoint_dir) / f"where-{ctx.attempt}-{ctx.rank}.json", info)
    ctx.report(progress=0.5)
    end = time.monotonic() + float(os.environ.get("HOLD_SECONDS", "0"))
    while time.monotonic() < end and not ctx.should_stop:
        time.sleep(0.05)


def steps(ctx: Any) -> None:
    """A training loop of ``STEPS`` steps that checkpoints every ``CHECKPOINT_EVERY`` steps
    and resumes from the latest checkpoint of an earlier attempt."""
    total = int(os.environ.get("STEPS", "20"))
    every = int(os.environ.get("CHECKPOINT_EVERY", "5"))
    step_seconds = float(os.environ.get("STEP_SECONDS", "0.1"))
    start = 0
    if ctx.latest_checkpoint:
        start = int(json.loads(Path(ctx.latest_checkpoint).read_text())["step"])
    out = Path(ctx.checkpoint_dir)
    _write(out / f"start-{ctx.attempt}-{ctx.rank}.json",
           {"start": start, "node_id": ray.get_runtime_context().get_node_id()})
    for step in range(start, total):
        if ctx.should_stop:
            return
        time.sleep(step_seconds)
        done = step + 1
        if done % every == 0 and ctx.rank == 0:
            path = out / f"ckpt-{done}.json"
            _write(path, {"step": done})
            ctx.report(progress=done / total, checkpoint=str(path))
        else:
            ctx.report(progress=done / total)


def slow_echo(ctx: Any) -> Any:
    """An inference handler factory: each request takes ``DELAY_SECONDS``."""
    delay = float(os.environ.get("DELAY_SECONDS", "1.0"))

    def handle(body: bytes) -> bytes:
        time.sleep(delay)
        return b"rank%d:" % ctx.rank + body

    return handle
