"""Tensor-network compression of attention projections (issue #18): TT-matrix (MPO) and
Tucker leaves (data-free variants ``tt`` and ``tucker``), and the data-aware ``tucker_mps``
(Kronecker output bases learned by HOOI from streamed calibration outputs; see
:mod:`jcompress.tucker.mps`).

Importing this package registers its leaf types (``jcompress.tucker.TTLinear``,
``jcompress.tucker.TuckerLinear``); reading a checkpoint that holds them imports it on demand.
"""

from jcompress.tucker.compress import (
    DEFAULT_LAYERS,
    TuckerConfig,
    Variant,
    check_fits,
    compress,
)
from jcompress.tucker.report import ProjectionReport, TuckerReport
from jcompress.tucker.tucker_core import (
    TTLinear,
    TuckerLinear,
    kron_basis,
    tt_linear,
    tucker_linear,
)

__all__ = [
    "DEFAULT_LAYERS",
    "ProjectionReport",
    "TTLinear",
    "TuckerConfig",
    "TuckerLinear",
    "TuckerReport",
    "Variant",
    "check_fits",
    "compress",
    "kron_basis",
    "tt_linear",
    "tucker_linear",
]
