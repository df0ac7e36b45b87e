"""jcompress benchmarks: ``python -m bench [--quick] [--dry-run] [--only NAME] [--out FILE]``.

Every benchmark is one :func:`~bench.harness.register` entry (see ``bench/foundation.py``);
importing this package registers them all without importing jax or torch.
"""

from bench import foundation  # noqa: F401  (registers the foundation rows)
from bench.harness import REGISTRY, Benchmark, Context, register

__all__ = ["REGISTRY", "Benchmark", "Context", "register"]
