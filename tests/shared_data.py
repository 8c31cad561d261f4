"""The public traces and measurements in ``../shared``, for the tests that read them.

``needs_shared`` marks a test (or, as ``pytestmark``, a module) that reads ``../shared``:
it is skipped in a checkout without it, but fails under ``AIFACTORY_REQUIRE_INTEGRATION=1``
(as in CI), so the H200 re-fit that guards the power constants, the trace loaders and the
benchmark smoke runs can never drop out of CI unseen.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aifactory.controller.inputs.datasets import shared_dir

__all__ = ["SHARED", "needs_shared", "require_shared"]

SHARED = shared_dir()


def require_shared() -> Path:
    """``../shared``; skips the test without it, or fails it where integration is required."""
    if SHARED is None:
        why = "../shared (traces and measurements) is not present"
        if os.environ.get("AIFACTORY_REQUIRE_INTEGRATION"):
            pytest.fail(f"AIFACTORY_REQUIRE_INTEGRATION is set but {why} "
                        "(or set $AIFACTORY_SHARED)", pytrace=False)
        pytest.skip(why)
    return SHARED


needs_shared = pytest.mark.usefixtures("shared_folder")
