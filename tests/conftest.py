"""Shared fixtures: paths into ../shared/data and the two trained models."""

from __future__ import annotations

import os
from pathlib import Path

# One OpenBLAS thread: XLA:CPU runs LAPACK custom calls (eigh, qr inside vmap-ed while loops)
# from several of its own threads at once, and OpenBLAS's thread pool under such concurrent
# callers was seen to deadlock (a vmap-ed HOOI blocked at 0% CPU) on the 2-core CI machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Under pytest-xdist (the README's `-n 2` on 2 cores) each worker computes on one thread: two
# multi-threaded workers (XLA's Eigen pool, torch's OpenMP) on two cores spend their time
# spinning against each other. Subprocesses the tests start inherit it. Results do not depend
# on it (thread partitioning splits outputs, not reductions); tests never check wall time.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        ).strip()

# The suite is compile-bound (tiny shapes, thousands of distinct programs): LLVM at -O1 cuts
# XLA:CPU compile time by a third (quiet machine, the attention oracle cases: 30.4 CPU s at the
# default level, 20.2 at -O1, 14.6 at -O0). -O0 was tried for the whole suite and lost: its
# code runs about 2x slower, so the real-model tests (whole WikiText-2 perplexity, the
# README's examples) cost more than the compile time saved. Results may differ from the
# default level in the last bit; tests compare with tolerances, never bit-exactly across
# programs. Subprocesses inherit the flag.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1"
    ).strip()

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
