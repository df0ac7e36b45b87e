"""Shared fixtures: paths into ../shared/data and the two trained models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from _xla_flags import SUITE_LEVEL

# The README's test command installs with `pip install --no-compile` (pip would byte-compile
# every installed file, ~110 s on 2 cores, most of them never imported). So the test processes
# write the .pyc of what they import, even where PYTHONDONTWRITEBYTECODE is set (without them
# every process, xdist workers and the CLI / bench subprocesses alike, would compile torch,
# transformers and jax from source again: ~15 s instead of ~6 s per import).
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

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

# The suite is compile-bound (tiny shapes, thousands of distinct programs), so its processes
# compile at -O0 (XLA:CPU's LLVM backend). Measured on 2 cores, -n 2: test_attention +
# test_tucker 342 CPU s at -O1 (the level the suite used before), 246 at -O0; the attention
# oracle cases 30.4 CPU s at the default level, 20.2 at -O1, 14.6 at -O0. -O0 code runs 2-3x
# slower, so the few compute-bound checks (the perplexity baselines over whole texts, the
# README's examples) run in subprocesses at -O1 (tests/_xla_flags.optimized_env): the whole
# WikiText-2 pass took 54 s at -O1 and 183 s at -O0. Results may differ between levels in the
# last bit; tests compare with tolerances, never bit-exactly across programs. An
# XLA_FLAGS level set by the caller is kept for the test processes (optimized_env still runs
# its subprocesses at -O1). Subprocesses inherit the flag.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_backend_optimization_level={SUITE_LEVEL}"
    ).strip()

# One persistent compilation cache for the whole run: the xdist workers and every subprocess
# the tests start (CLI, README examples, bench workers, the 8-device and two-process runs)
# inherit the directory, so a program compiled in one process is loaded, not compiled again,
# in the others. The process that creates the directory (the xdist controller, or the only
# pytest process) removes it at the end; nothing outside the run is read or kept.
# JCOMPRESS_TEST_JAX_CACHE=off turns it off.
_OWN_JAX_CACHE: str | None = None
if os.environ.get("JCOMPRESS_TEST_JAX_CACHE") != "off":
    if not os.environ.get("JCOMPRESS_TEST_JAX_CACHE"):
        import tempfile

        _OWN_JAX_CACHE = tempfile.mkdtemp(prefix="jcompress-test-jax-cache-")
        os.environ["JCOMPRESS_TEST_JAX_CACHE"] = _OWN_JAX_CACHE
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JCOMPRESS_TEST_JAX_CACHE"]
    # every program: the suite's are small and many, each compiled in a fraction of a second
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

# Through the environment, not jax.config, so the subprocesses lower the same programs (the
# precision is part of a program, hence of its cache key). XLA:CPU computes fp32 dots at full
# precision either way.
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import pytest  # noqa: E402

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


def pytest_unconfigure(config):
    if _OWN_JAX_CACHE is not None:
        import shutil

        shutil.rmtree(_OWN_JAX_CACHE, ignore_errors=True)


# Longest files first, so that the two xdist workers finish together (longest-processing-time
# first: the last file to start is a short one). CPU seconds per file on the 2-core CI machine
# (compile included; estimates after the 2026-12-01 trims); files not listed are short and
# keep their order after these. Only the schedule depends on it, never a result.
_FILE_SECONDS = {
    # one dry run of every bench row and sweep in one process (its longest test)
    "test_bench.py": 200,
    "test_sharding.py": 165,  # its 8-device subprocess and two processes
    "test_eigen_attention.py": 145,
    "test_attention.py": 130,
    "test_tucker.py": 130,
    "test_sparge.py": 115,
    "test_perplexity.py": 90,
    "test_tokenwise.py": 90,
    "test_ged.py": 80,
    "test_readme.py": 75,
    "test_cli.py": 67,
    "test_decomp.py": 52,
    "test_forward_features.py": 50,
    "test_compose.py": 38,
    "test_tucker_mps.py": 30,
    "test_latent_scores.py": 25,
    "test_families.py": 24,
    "test_quant_check.py": 24,
    "test_sparge_stream.py": 22,
    "test_quant_formats.py": 22,
    "test_quant_apply.py": 22,
}


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))  # stable: order kept


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    # xdist's loadfile scheduler orders files by their number of tests unless told not to;
    # the controller reads this option when it schedules, after every conftest is loaded.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
