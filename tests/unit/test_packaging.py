"""What the distribution installs: ``aifactory.controller`` and ``aifactory.operators``, never
generic top-level ``controller``/``operators`` modules, and every subpackage of both; beside
them the example workloads the samples name, as ``aifactory_examples``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _package_dirs() -> set[str]:
    return {"aifactory." + str(p.parent.relative_to(ROOT)).replace("/", ".")
            for top in ("controller", "operators") for p in (ROOT / top).rglob("__init__.py")}


def test_every_subpackage_is_listed_for_the_build() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    assert _package_dirs() <= listed, "add new subpackages to [tool.setuptools] packages"


@pytest.mark.timeout(300)
def test_the_wheel_holds_only_the_aifactory_namespace(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300,
        check=False, env={"PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore::UserWarning",
                          "PIP_DISABLE_PIP_VERSION_CHECK": "1", "HOME": str(tmp_path)})
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("aifactory-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"aifactory", "aifactory_examples",
                    next(t for t in tops if t.endswith(".dist-info"))}
    assert "aifactory/__init__.py" not in names  # a namespace others cannot collide with
    for module in ("controller/core/spec.py", "controller/data/small.yaml",
                   "controller/py.typed", "operators/main.py"):
        assert f"aifactory/{module}" in names
    for module in ("train.py", "serve.py", "corpus.txt", "py.typed"):
        assert f"aifactory_examples/{module}" in names
