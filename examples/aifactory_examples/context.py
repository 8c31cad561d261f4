"""The worker context for an example run as a command, and the report line it prints.

A ``module:function`` entrypoint gets the Ray worker's ``WorkerContext``. A command gets the
same facts through its environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``AIFACTORY_ATTEMPT``, ``AIFACTORY_CHECKPOINT_DIR``) and reports by printing one line per
report, ``AIFACTORY_REPORT {"progress": 0.5, "checkpoint": "path", "loss": 0.1}``, which the
worker parses (``in_flight`` and ``requests_total`` for inference replicas). ``CommandContext``
wraps both in the ``WorkerContext`` interface, so one training loop serves both forms; run by
hand, outside any worker, it is a single process of rank 0 checkpointing into
``./checkpoints``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["LATEST_FILE", "REPORT_PREFIX", "CommandContext", "print_report"]

# The worker's protocol (aifactory.controller.backends.ray.worker), repeated here so a
# command needs no Ray import to speak it; a unit test keeps the two equal.
REPORT_PREFIX = "AIFACTORY_REPORT "
LATEST_FILE = "LATEST"

_print_lock = threading.Lock()


def print_report(**fields: Any) -> None:
    """One report line on stdout (flushed: the worker reads it as it comes)."""
    line = REPORT_PREFIX + json.dumps(fields, separators=(",", ":"))
    with _print_lock:
        print(line, flush=True)


class CommandContext:
    """``WorkerContext`` for a command: who it is from the environment, reports as lines."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        self.env = env
        self.job = env.get("AIFACTORY_JOB", "local")
        self.rank = int(env.get("RANK", "0"))
        self.world_size = int(env.get("WORLD_SIZE", "1"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.attempt = int(env.get("AIFACTORY_ATTEMPT", "0"))
        self.checkpoint_dir = env.get("AIFACTORY_CHECKPOINT_DIR") or str(
            Path.cwd() / "checkpoints")
        Path(self.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()

    def stop_on_sigterm(self) -> None:
        """The worker stops a command with SIGTERM: make that ``should_stop`` (main thread)."""
        signal.signal(signal.SIGTERM, lambda _sig, _frame: self._stop.set())

    @property
    def should_stop(self) -> bool:
        return self._stop.is_set()

    @property
    def latest_checkpoint(self) -> str | None:
        try:
            text = (Path(self.checkpoint_dir) / LATEST_FILE).read_text(encoding="utf-8")
        except OSError:
            return None
        return text.strip() or None

    def report(self, progress: float | None = None, checkpoint: str | None = None,
               **metrics: float) -> None:
        """Print the report; rank 0 also records a checkpoint as the latest (as the worker
        does), so a command run by hand resumes too."""
        fields: dict[str, Any] = dict(metrics)
        if progress is not None:
            fields["progress"] = progress
        if checkpoint is not None:
            fields["checkpoint"] = checkpoint
            if self.rank == 0:
                latest = Path(self.checkpoint_dir) / LATEST_FILE
                tmp = latest.with_name(f"{LATEST_FILE}.{os.getpid()}.tmp")
                tmp.write_text(checkpoint + "\n", encoding="utf-8")
                os.replace(tmp, latest)
        print_report(**fields)
