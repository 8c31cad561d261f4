"""``make demo`` installs only the base dependencies: ``aifactory simulate`` must run without
Ray, kopf, the Kubernetes client or matplotlib (a module that imports one of them at the top
and is reached from the CLI breaks the first command of the README)."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("ray", "kopf", "kubernetes", "matplotlib", "pynvml", "torch")

PROGRAM = f"""
import sys
for name in {OPTIONAL!r}:
    sys.modules[name] = None  # importing it now raises ImportError
from aifactory.controller.cli.main import main
sys.exit(main(["simulate", "--no-progress"]))
"""


def test_simulate_runs_on_the_base_install_alone() -> None:
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "aifactory simulate" in done.stdout
