"""Where the torch tests find PyTorch: ``hack/install-torch.sh`` installs it into a folder
outside the repository (``~/.cache/aifactory/torch``, or ``$AIFACTORY_TORCH_SITE``), handed to
Ray workers through PYTHONPATH, so the rest of the suite never needs it. Without it a test
skips, unless AIFACTORY_REQUIRE_INTEGRATION is set (CI), where that fails."""

from __future__ import annotations

import os

import pytest


def torch_site() -> str:
    site = os.environ.get("AIFACTORY_TORCH_SITE") or os.path.expanduser(
        "~/.cache/aifactory/torch")
    if not os.path.isdir(os.path.join(site, "torch")):
        why = f"torch is not installed at {site} (run hack/install-torch.sh)"
        if os.environ.get("AIFACTORY_REQUIRE_INTEGRATION"):
            pytest.fail(f"AIFACTORY_REQUIRE_INTEGRATION is set but {why}", pytrace=False)
        pytest.skip(why)
    return os.path.realpath(site)
