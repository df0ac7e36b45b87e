"""SpargeAttn for JAX models: per-head tuned block-sparse attention.

``block_sparse`` is one more implementation of the decoder's attention seam
(:mod:`jcompress.models.attention`), registered when this package is imported::

    import jcompress, jcompress.sparge as sparge
    p = sparge.SpargeParams.create(cfg.num_layers, cfg.num_heads)   # untuned defaults
    logits = jcompress.forward(cfg, params, ids, attention="block_sparse", attention_state=p)

Tuned thresholds come from :func:`jcompress.sparge.tune` (``jcompress sparge tune``).

References:
  Zhang et al., "SpargeAttn: Accurate Sparse Attention Accelerating Any Model Inference",
  ICML 2025, arXiv:2502.18137; thu-ml/SpargeAttn (its tuning guide).
"""

from jcompress.sparge._core import Selection, select
from jcompress.sparge.api import BlockSparse, SpargeStats, attention, block_mask
from jcompress.sparge.params import DEFAULTS, SpargeParams, load_params, save_params

__all__ = [
    "DEFAULTS",
    "BlockSparse",
    "Selection",
    "SpargeParams",
    "SpargeStats",
    "attention",
    "block_mask",
    "load_params",
    "save_params",
    "select",
]
