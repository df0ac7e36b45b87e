"""Pallas kernels, installed as ``jcompress.kernels``: one file per kernel holding its
``BlockSizes``, the Pallas kernel, a pure-jnp reference and a public wrapper with
``supports()`` and an XLA fallback. Kernels land with the methods that need them
(block-sparse attention for SpargeAttn, fused dequant-matmul for tokenwise precision)."""

__all__: list[str] = []
