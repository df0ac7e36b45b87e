"""EigenAttention: low-rank K/Q/V projections from per-head bases of calibration activations.

References:
  Saxena et al., "EigenAttention: Attention in Low-Rank Space for KV Cache Compression",
  arXiv:2408.05646.
"""

from jcompress.eigen_attention.compress import EigenAttentionConfig, compress, family_defaults
from jcompress.eigen_attention.report import EigenReport, LayerReport

__all__ = ["EigenAttentionConfig", "EigenReport", "LayerReport", "compress", "family_defaults"]
