"""Every Python package in the source tree is declared in pyproject.toml (a package left out
installs in editable mode but is missing from a wheel)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_declared():
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(cfg["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "jcompress").rglob("__init__.py")
    }
    found |= {"jcompress.kernels"}  # kernels/ is installed as jcompress.kernels (package-dir)
    assert found <= declared, sorted(found - declared)
