"""EigenAttention math on single matrices; batching over heads is ``jax.vmap``.

Bases come from the Gram matrix ``G = X^T X`` of (uncentred) features ``X: [N, D]``: its
eigenvectors are the right singular vectors of ``X`` and ``sqrt(eigenvalues)`` its singular
values, so streaming ``G`` over calibration batches gives the SVD of the stacked features
without storing them. Signs are fixed so that each basis vector's largest-magnitude entry is
positive (``svd_flip`` convention), which makes bases deterministic.

References:
  Saxena et al., "EigenAttention: Attention in Low-Rank Space for KV Cache Compression",
  arXiv:2408.05646 (reference code: github.com/UtkarshSaxena1/EigenAttn).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jcompress.calibration.gram import head_gram as _calibration_head_gram

__all__ = [
    "gram_core",
    "basis_core",
    "basis_from_features_core",
    "spectrum_fraction_core",
    "count_below_core",
    "head_gram",
    "head_bases",
    "rank_for_threshold",
]


def gram_core(x: jax.Array) -> jax.Array:
    """``X^T X`` in float32: ``[N, D] -> [D, D]``."""
    x = x.astype(jnp.float32)
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)


def _flip_signs(u: jax.Array) -> jax.Array:
    """Make the largest-|.| entry of each column positive. ``u: [D, K]``."""
    idx = jnp.argmax(jnp.abs(u), axis=0)
    signs = jnp.sign(u[idx, jnp.arange(u.shape[1])])
    return u * jnp.where(signs == 0, 1.0, signs)[None, :]


def basis_core(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Basis and singular values from a Gram matrix.

    Args:
      gram: ``[D, D]`` symmetric PSD ``X^T X``.

    Returns:
      ``(u, s)``: ``u [D, D]`` orthonormal columns sorted by decreasing singular value,
      ``s [D]`` the singular values ``sqrt(max(eigenvalue, 0))`` of ``X``, decreasing.
    """
    w, v = jnp.linalg.eigh(gram.astype(jnp.float32))
    w, v = w[::-1], v[:, ::-1]
    return _flip_signs(v), jnp.sqrt(jnp.maximum(w, 0.0))


def basis_from_features_core(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The SVD route: right singular vectors and singular values of ``x [N, D]`` (test oracle
    for the Gram route; needs all features in memory)."""
    _, s, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=True)
    d = x.shape[1]
    s = jnp.zeros((d,), jnp.float32).at[: s.shape[0]].set(s)
    return _flip_signs(vt.T), s


def spectrum_fraction_core(s: jax.Array) -> jax.Array:
    """``s / sum(s)``: the reference ranks components by the fraction of the *sum of singular
    values* (not of squared singular values / energy). ``[D] -> [D]``."""
    total = jnp.sum(s)
    return jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 0.0)


def count_below_core(frac: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """Number of leading components whose cumulative fraction is strictly below ``threshold``."""
    return jnp.sum(jnp.cumsum(frac) < threshold)


head_gram = _calibration_head_gram
"""Per-head Gram matrices ``x [..., heads * D] -> [heads, D, D]`` (float32): the shared
:func:`jcompress.calibration.head_gram`, which ``compress`` streams batch by batch through
:class:`jcompress.calibration.GroupedGram`."""


head_bases = jax.jit(jax.vmap(basis_core))
"""``[heads, D, D]`` Gram matrices -> ``(u [heads, D, D], s [heads, D])``, all heads at once."""


def rank_for_threshold(fracs: jax.Array, threshold: float) -> int:
    """The reference rank rule: the largest, over heads, count of components whose cumulative
    fraction is below ``threshold`` (at least 1). ``fracs: [heads, D]``."""
    counts = jax.vmap(count_below_core, in_axes=(0, None))(fracs, threshold)
    return max(int(jnp.max(counts)), 1)
