"""Built-in worker programs for demos on a Ray cluster without real training code.

``aifactory run --backend ray`` runs the sample manifests' gangs with these instead of the
``aifactory_examples`` modules the manifests name (they are not part of this package):
``train`` pretends to train for ``AIFACTORY_DEMO_SECONDS`` seconds, reporting progress and
writing a checkpoint every quarter (and resumes from the latest one after a restart);
``serve`` is an inference handler factory that echoes each request.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DEMO_SECONDS_ENV", "serve", "train"]

DEMO_SECONDS_ENV = "AIFACTORY_DEMO_SECONDS"


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
