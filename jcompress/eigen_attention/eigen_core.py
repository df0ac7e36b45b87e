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
import numpy as np

from jcompress.calibration.gram import head_gram as _calibration_head_gram

__all__ = [
    "gram_core",
    "basis_core",
    "basis_from_features_core",
    "spectrum_fraction_core",
    "count_below_core",
    "head_gram",
    "head_bases",
    "host_bases",
    "RANK_TOL",
    "cumulative_fractions",
    "head_counts_below",
    "rank_for_threshold",
]

RANK_TOL = 1e-9
"""A cumulative fraction within this of the threshold counts as reaching it (float64 sums).

The rank rule compares cumulative sums of singular-value fractions with a threshold; in float32
the last sum lands at ``1 +- 2e-7``, so at threshold 1.0 a head counted ``D - 1`` or ``D``
components by rounding noise. :func:`cumulative_fractions` sums in float64 and pins the last
sum to exactly 1, and the comparison is ``cum < threshold - RANK_TOL``, so no threshold on
the walk's grid is decided by rounding."""


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


def host_bases(grams) -> tuple[np.ndarray, np.ndarray]:
    """:data:`head_bases` in float64 on the host (``numpy.linalg.eigh``; what ``compress``
    uses): ``[heads, D, D]`` Gram matrices (any float dtype, widened to float64) ->
    ``(u [heads, D, D], s [heads, D])`` float64, columns by decreasing singular value, signs
    as :func:`basis_core` (largest-|.| entry of each column positive).

    A ``[D, D]`` eigendecomposition per head is cheap next to the calibration passes, and on
    the host it costs no compilation and keeps the spectrum's tail at float64 accuracy (the
    float32 ``eigh`` loses ~``eps32 * lambda_max`` absolute in every eigenvalue).
    """
    g = np.asarray(grams, np.float64)
    g = 0.5 * (g + np.swapaxes(g, -1, -2))
    w, v = np.linalg.eigh(g)
    w, v = w[..., ::-1], v[..., ::-1]
    idx = np.argmax(np.abs(v), axis=-2)  # [heads, D]: row of each column's largest |entry|
    signs = np.sign(np.take_along_axis(v, idx[..., None, :], axis=-2))
    v = v * np.where(signs == 0, 1.0, signs)
    return v, np.sqrt(np.maximum(w, 0.0))


def cumulative_fractions(s) -> np.ndarray:
    """Cumulative fractions of the sum of singular values, per head, in float64 on the host.

    Args:
      s: ``[heads, D]`` singular values (or any positive multiple of them, e.g. their
        fractions): each row is normalised by its own float64 sum.

    Returns:
      ``[heads, D]`` float64, non-decreasing along ``D``; the last entry of every row with a
      non-zero sum is exactly 1.0 (an all-zero row gives zeros).
    """
    s = np.maximum(np.asarray(s, np.float64), 0.0)
    if s.ndim == 1:
        s = s[None]
    cum = np.cumsum(s, axis=-1)
    total = cum[..., -1:]
    out = np.where(total > 0, cum / np.where(total > 0, total, 1.0), 0.0)
    out[..., -1] = np.where(total[..., 0] > 0, 1.0, 0.0)
    return out


def head_counts_below(s, threshold: float) -> np.ndarray:
    """Per head, the number of leading components whose cumulative fraction is strictly below
    ``threshold`` (``cum < threshold - RANK_TOL`` in float64): ``[heads, D] -> [heads]`` int."""
    return np.sum(cumulative_fractions(s) < threshold - RANK_TOL, axis=-1)


def rank_for_threshold(fracs, threshold: float) -> int:
    """The reference rank rule: the largest, over heads, count of components whose cumulative
    fraction is below ``threshold`` (at least 1, at most ``D``), decided in float64
    (:func:`cumulative_fractions`, :data:`RANK_TOL`).

    Args:
      fracs: ``[heads, D]`` singular values or their fractions (rows are renormalised).
      threshold: the threshold; above 1 every component counts (``D``).

    Returns:
      The per-head rank every head keeps (a Python ``int``).
    """
    counts = head_counts_below(fracs, threshold)
    return max(int(np.max(counts)), 1)
