"""jcompress benchmarks: ``python -m bench [--quick] [--dry-run] [--only NAME] [--out FILE]``.

Every benchmark is one :func:`~bench.harness.register` entry (see ``bench/foundation.py``);
importing this package registers them all without importing jax or torch.
"""

# importing registers the rows; bench.eigen imports bench.foundation, whose rows come first
from bench import decode, decomp, eigen, foundation, ged, quant, quant_formats, sparge, tucker  # noqa: F401
from bench.harness import REGISTRY, Benchmark, Context, register

__all__ = ["REGISTRY", "Benchmark", "Context", "register"]

from bench import streaming  # noqa: E402, F401  (registers the layer-streaming row)
