"""The XLA backend optimization level of the test processes (``conftest.py``) and of the few
compute-bound checks that run in a subprocess at a higher one (:func:`optimized_env`)."""

from __future__ import annotations

import os
import re

# the suite's level: its programs are tiny and many (compile-bound); the bench dry run and the
# multi-device subprocesses ask for it even where the caller set another level
SUITE_LEVEL = 0
# whole passes over real text (perplexity baselines, the README's examples): compute-bound
OPTIMIZED_LEVEL = 1

_LEVEL = re.compile(r"--xla_backend_optimization_level=\S*")


def with_level(flags: str, level: int) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with its backend optimization level set to
    ``level`` (any level it named is replaced)."""
    rest = _LEVEL.sub("", flags).split()
    return " ".join([*rest, f"--xla_backend_optimization_level={level}"])


def compile_bound_flags(flags: str) -> str:
    """``flags`` at :data:`SUITE_LEVEL`: for a subprocess that compiles much and runs little."""
    return with_level(flags, SUITE_LEVEL)


def optimized_env() -> dict[str, str]:
    """This process's environment with ``XLA_FLAGS`` at :data:`OPTIMIZED_LEVEL`: for a
    subprocess whose time goes into running programs rather than compiling them."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = with_level(env.get("XLA_FLAGS", ""), OPTIMIZED_LEVEL)
    return env
