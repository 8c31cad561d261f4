"""Fixtures every test may use."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.shared_data import require_shared


@pytest.fixture(scope="session")
def shared_folder() -> Path:
    """``../shared``, or a skip (a failure under AIFACTORY_REQUIRE_INTEGRATION=1)."""
    return require_shared()
