"""Where the shared measurements and public traces live, found without configuration.

The repository is checked out as ``<somewhere>/main`` (or a worktree beside it) with the
read-only ``shared/`` folder next to it, so the default is ``<repo root>/../shared``.
``AIFACTORY_SHARED`` overrides that, for an installed package or a copy elsewhere. Nothing
here reads the files; loaders in ``controller.inputs.traces`` and ``controller.power.fit`` do.
"""

from __future__ import annotations

import os
from pathlib import Path

from aifactory.controller.core.errors import InputFileError

__all__ = ["SHARED_ENV", "shared_dir", "shared_path"]

SHARED_ENV = "AIFACTORY_SHARED"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path | None:
    """The shared data folder, or None where this checkout has none.

    ``$AIFACTORY_SHARED`` wins when set (and None is returned if it names no folder, rather
    than silently falling back); otherwise ``<repo root>/../shared``.
    """
    override = os.environ.get(SHARED_ENV)
    if override:
        path = Path(override).expanduser()
        return path if path.is_dir() else None
    default = _REPO_ROOT.parent / "shared"
    return default if default.is_dir() else None


def shared_path(*parts: str) -> Path:
    """A path under the shared folder, e.g. ``shared_path("data", "h200_power_samples.csv")``.

    Raises InputFileError naming where it looked when the folder or the file is missing.
    """
    base = shared_dir()
    if base is None:
        where = os.environ.get(SHARED_ENV) or str(_REPO_ROOT.parent / "shared")
        raise InputFileError(where, f"shared data folder not found (set ${SHARED_ENV} to the "
                             "folder that holds data/ and traces/)")
    path = base.joinpath(*parts)
    if not path.exists():
        raise InputFileError(str(path), "no such file in the shared data folder")
    return path
