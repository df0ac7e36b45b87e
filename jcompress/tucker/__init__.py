"""Tensor-network compression of attention projections (issue #18): TT-matrix (MPO) and
Tucker leaves, data-free variants ``tt`` and ``tucker``.

Importing this package registers its leaf types (``jcompress.tucker.TTLinear``,
``jcompress.tucker.TuckerLinear``); import it before reading a checkpoint that holds them.
"""

from jcompress.tucker.compress import DEFAULT_LAYERS, TuckerConfig, Variant, compress
from jcompress.tucker.report import ProjectionReport, TuckerReport
from jcompress.tucker.tucker_core import TTLinear, TuckerLinear, tt_linear, tucker_linear

__all__ = [
    "DEFAULT_LAYERS",
    "ProjectionReport",
    "TTLinear",
    "TuckerConfig",
    "TuckerLinear",
    "TuckerReport",
    "Variant",
    "compress",
    "tt_linear",
    "tucker_linear",
]
