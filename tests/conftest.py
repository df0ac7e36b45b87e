"""Shared fixtures: paths into ../shared/data and the two trained models."""

from __future__ import annotations

import os
from pathlib import Path

# One OpenBLAS thread: XLA:CPU runs LAPACK custom calls (eigh, qr inside vmap-ed while loops)
# from several of its own threads at once, and OpenBLAS's thread pool under such concurrent
# callers was seen to deadlock (a vmap-ed HOOI blocked at 0% CPU) on the 2-core CI machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JCOMPRESS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA} (set JCOMPRESS_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama_dir(shared_data) -> Path:
    return shared_data / "models" / "llama-1m"


@pytest.fixture(scope="session")
def opt_dir(shared_data) -> Path:
    return shared_data / "models" / "opt-1m"
