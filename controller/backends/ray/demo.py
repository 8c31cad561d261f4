"""The demo cluster and two placeholder worker programs that need nothing but this package.

``DEMO_NODES`` is the local Ray cluster ``aifactory run`` starts without an address:
4 nodes x 8 simulated H200 in 2 racks of one block (this module imports no Ray, so the CLI
can name it without Ray installed).

The real workloads the samples run are ``aifactory_examples`` (``examples/``). These two are
for measuring the control plane rather than the work (``benchmarks/ray_pg_latency.py``) and
for a first job on a cluster whose workers have nothing installed: ``train`` sleeps for
``AIFACTORY_DEMO_SECONDS`` seconds, reporting progress and writing a checkpoint every quarter
(and resumes from the latest one after a restart); ``serve`` is an inference handler factory
that echoes each request.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aifactory.controller.core.topology import BLOCK_LABEL, GPU_PRODUCT_LABEL, RACK_LABEL, NodeInfo

__all__ = ["DEMO_NODES", "DEMO_SECONDS_ENV", "serve", "train"]

DEMO_SECONDS_ENV = "AIFACTORY_DEMO_SECONDS"

# The local demo cluster: 4 nodes x 8 H200 in 2 racks of one block.
DEMO_NODES = tuple(
    NodeInfo(f"h200-b0-r{r}-n{i:02d}", 8, "H200",
             ((BLOCK_LABEL, "b0"), (GPU_PRODUCT_LABEL, "H200"), (RACK_LABEL, f"b0-r{r}")))
    for r in range(2) for i in range(2))


def train(ctx: Any) -> None:
    seconds = float(os.environ.get(DEMO_SECONDS_ENV, "5"))
    steps = 20
    start = 0
    if ctx.latest_checkpoint:
        try:
            start = int(json.loads(Path(ctx.latest_checkpoint).read_text())["step"])
        except (OSError, ValueError, KeyError):
            start = 0
    for step in range(start, steps):
        if ctx.should_stop:
            return
        time.sleep(seconds / steps)
        done = step + 1
        if done % 5 == 0 and ctx.rank == 0:
            path = Path(ctx.checkpoint_dir) / f"demo-{done}.json"
            path.write_text(json.dumps({"step": done}))
            ctx.report(progress=done / steps, checkpoint=str(path))
        else:
            ctx.report(progress=done / steps)


def serve(ctx: Any) -> Callable[[bytes], bytes]:
    def handle(body: bytes) -> bytes:
        return body

    return handle
