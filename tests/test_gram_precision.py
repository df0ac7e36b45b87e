"""Precision of the streamed per-head Gram route (``jcompress.calibration.GroupedGram`` +
``eigen_core.host_bases``) in the spectrum's tail.

Oracle: ``numpy.linalg.svd`` in float64 of the raw (float32) features, stacked, per head.
Features with a steep spectrum (singular values over ~3.5 decades, like the K features of the
trained models) make a float32 Gram lose the tail: its absolute error is ~``eps32 * s_max^2``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jcompress.calibration import GroupedGram
from jcompress.eigen_attention import eigen_core as core

HEADS, D, T = 2, 16, 256


def _features(n: int, seed: int = 0) -> np.ndarray:
    """``[n, T, HEADS * D]`` float32 features whose per-head singular values span 10^-3.5."""
    rng = np.random.default_rng(seed)
    s = np.logspace(0, -3.5, D)
    out = np.empty((n * T, HEADS, D))
    for h in range(HEADS):
        q, _ = np.linalg.qr(rng.standard_normal((D, D)))
        out[:, h] = (rng.standard_normal((n * T, D)) * s) @ q.T
    return out.reshape(n, T, HEADS * D).astype(np.float32)


def _oracle(x: np.ndarray, avg_dim: int) -> np.ndarray:
    """Per-head float64 singular values of the stacked group means: ``[HEADS, D]``."""
    n = (x.shape[0] // avg_dim) * avg_dim
    g = x[:n].astype(np.float64).reshape(-1, avg_dim, T, HEADS * D).mean(1)
    g = g.reshape(-1, HEADS, D)
    return np.stack([np.linalg.svd(g[:, h], compute_uv=False) for h in range(HEADS)])


def _streamed(x: np.ndarray, avg_dim: int, dtype: str, split: int) -> np.ndarray:
    acc = GroupedGram(n=x.shape[0], avg_dim=avg_dim, heads=HEADS, dtype=dtype)
    acc.add((jnp.asarray(x[:split]),), split)  # groups straddle the two batches
    acc.add((jnp.asarray(x[split:]),), x.shape[0] - split)
    assert acc.gram.dtype == np.dtype(dtype)
    return core.host_bases(acc.gram)[1]


@pytest.mark.parametrize("avg_dim,split", [(1, 3), (2, 3)])
def test_float64_gram_tail_matches_float64_svd(avg_dim, split):
    x = _features(8)
    ref = _oracle(x, avg_dim)
    rel64 = np.abs(_streamed(x, avg_dim, "float64", split) - ref) / ref
    assert rel64.max() < 1e-6, rel64.max()
    # the float32 route misses the tail by orders of magnitude more (what float64 fixes)
    rel32 = np.abs(_streamed(x, avg_dim, "float32", split) - ref) / ref
    assert rel32[:, -4:].max() > 100 * rel64.max()
    assert rel32[:, -4:].max() > 1e-5


def test_host_bases_are_sorted_orthonormal_and_sign_fixed():
    x = _features(2, seed=1).reshape(-1, HEADS, D).astype(np.float64)
    g = np.einsum("nhd,nhe->hde", x, x)
    u, s = core.host_bases(g)
    assert u.dtype == s.dtype == np.float64
    assert np.all(np.diff(s, axis=1) <= 0)
    for h in range(HEADS):
        np.testing.assert_allclose(u[h].T @ u[h], np.eye(D), atol=1e-12)
        np.testing.assert_allclose(u[h] @ np.diag(s[h] ** 2) @ u[h].T, g[h], rtol=1e-10,
                                   atol=1e-12 * np.abs(g[h]).max())  # fmt: skip
        col = u[h][np.argmax(np.abs(u[h]), axis=0), np.arange(D)]
        assert np.all(col > 0)
        # the right singular vectors of the features, up to sign
        vt = np.linalg.svd(x[:, h], full_matrices=False)[2]
        np.testing.assert_allclose(np.abs(vt[:8] @ u[h][:, :8]), np.eye(8), atol=1e-8)


def test_gram_dtype_is_validated():
    with pytest.raises(ValueError, match="dtype"):
        GroupedGram(n=4, avg_dim=1, heads=2, dtype="float16")
