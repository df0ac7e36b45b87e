"""Generalized eigendecomposition (GED) math on single problems; batching is ``jax.vmap``.

GED contrasts two conditions: a signal covariance ``S`` and a reference covariance ``R``. The
generalized eigenvectors of ``S w = lambda R w`` are the spatial filters that maximise the
Rayleigh quotient ``w^T S w / w^T R w``; ``lambda`` is that ratio. On transformer activations
(``D`` = thousands of neurons, a few hundred samples) ``R`` is rank-deficient, so the problem
is solved "compress then separate": PCA on the mean of the two covariances keeps the fewest
components reaching a variance threshold, and ``R`` is shrunk towards a scaled identity in that
reduced space before the GED.

Every function here takes plain arrays (no paths, no pytrees, no host syncs) so it can be
jitted and vmapped; the pipeline that picks the data-dependent number of components on the
host lives in :mod:`jcompress.ged.fit`. Signs are fixed so that each column's largest-magnitude
entry is positive (``svd_flip`` convention), which makes filters deterministic.

References:
  Cohen, "A tutorial on generalized eigendecomposition for denoising, contrast enhancement,
  and dimension reduction in multichannel electrophysiology", NeuroImage 247 (2022).
  Haufe et al., "On the interpretation of weight vectors of linear models in multivariate
  neuroimaging", NeuroImage 87 (2014).
  Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices",
  J. Multivariate Analysis 88 (2004).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "covariance_core",
    "pca_core",
    "pooled_factor_core",
    "pca_dual_core",
    "subspace_core",
    "ledoit_wolf_core",
    "shrink_core",
    "rank_core",
    "ged_core",
    "top_eigenvalue_core",
    "flip_signs_core",
    "cohens_d_core",
]

_HI = jax.lax.Precision.HIGHEST


def _float(x: jax.Array) -> jax.Array:
    """``x`` as float32, or float64 where it already is (x64 mode)."""
    return x.astype(jnp.result_type(x.dtype, jnp.float32))


def covariance_core(x: jax.Array, center: bool = True) -> jax.Array:
    """Sample covariance ``Xc^T Xc / (N - 1)`` of ``x [N, D] -> [D, D]``.

    With ``center=False`` it is the second-moment matrix ``X^T X / N`` (a mean difference
    between conditions then counts as signal).
    """
    x = _float(x)
    n = x.shape[0]
    if center:
        x = x - jnp.mean(x, axis=0, keepdims=True)
        denom = max(n - 1, 1)
    else:
        denom = max(n, 1)
    return jnp.matmul(x.T, x, precision=_HI) / denom


def flip_signs_core(u: jax.Array) -> jax.Array:
    """``[D, K] -> [K]`` signs (+-1) that make each column's largest-|.| entry positive."""
    idx = jnp.argmax(jnp.abs(u), axis=0)
    signs = jnp.sign(u[idx, jnp.arange(u.shape[1])])
    return jnp.where(signs == 0, 1.0, signs).astype(u.dtype)


def pca_core(cov: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Principal components of a covariance matrix.

    Args:
      cov: ``[D, D]`` symmetric PSD.

    Returns:
      ``(evals [D], vecs [D, D])``: eigenvalues in decreasing order (negatives from rounding
      clipped to 0) and orthonormal eigenvectors as columns, signs fixed.
    """
    w, v = jnp.linalg.eigh(_float(cov))
    w, v = jnp.maximum(w[::-1], 0.0), v[:, ::-1]
    return w, v * flip_signs_core(v)[None, :]


def pooled_factor_core(xs: jax.Array, xr: jax.Array, center: bool = True) -> jax.Array:
    """``Y [N_S + N_R, D]`` with ``Y^T Y = (cov(xs) + cov(xr)) / 2`` (:func:`covariance_core`
    normalisation): each condition's rows (centered where asked) scaled by
    ``1 / sqrt(2 (N - 1))`` (``1 / sqrt(2 N)`` uncentered)."""

    def part(x):
        x = _float(x)
        n = x.shape[0]
        if center:
            return (x - jnp.mean(x, axis=0, keepdims=True)) / jnp.sqrt(2.0 * max(n - 1, 1))
        return x / jnp.sqrt(2.0 * max(n, 1))

    return jnp.concatenate([part(xs), part(xr)])


def pca_dual_core(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`pca_core` of ``Y^T Y`` through the ``[N, N]`` Gram matrix ``Y Y^T`` (for
    ``N < D``: ``O(N^2 D + N^3)`` instead of ``O(D^3)``).

    ``Y Y^T = U diag(w) U^T`` gives the nonzero eigenpairs of ``Y^T Y``: eigenvalues ``w``,
    eigenvectors ``Y^T U / sqrt(w)``. Eigenvalues at or below the numerical-rank tolerance
    (``max(w) * N * eps``) are set to 0 and their vectors to 0: they span no data.

    Args:
      y: ``[N, D]`` with ``N <= D``.

    Returns:
      ``(evals [D], vecs [D, N])``: ``evals`` decreasing, zero-padded to ``D``; ``vecs`` the
      matching orthonormal eigenvectors (zero columns past the rank), signs fixed.
    """
    y = _float(y)
    n, d = y.shape
    w, u = jnp.linalg.eigh(jnp.matmul(y, y.T, precision=_HI))
    w, u = w[::-1], u[:, ::-1]
    keep = w > jnp.max(jnp.abs(w)) * n * jnp.finfo(y.dtype).eps
    w = jnp.where(keep, w, 0.0)
    v = jnp.matmul(y.T, u, precision=_HI) / jnp.sqrt(jnp.where(keep, w, 1.0))[None, :]
    v = jnp.where(keep[None, :], v, 0.0)
    evals = jnp.zeros((d,), y.dtype).at[:n].set(w)
    return evals, v * flip_signs_core(v)[None, :]


def ledoit_wolf_core(x: jax.Array) -> jax.Array:
    """Ledoit-Wolf optimal shrinkage intensity in ``[0, 1]`` for the covariance of ``x [N, D]``
    towards ``mean(eig) * I`` (the same target as :func:`shrink_core`).

    With ``Sigma = Xc^T Xc / N``, ``mu = tr(Sigma) / D``: ``delta = ||Sigma - mu I||_F^2 / D``,
    ``beta = sum_i ||x_i x_i^T - Sigma||_F^2 / (N^2 D)``, ``gamma = min(beta, delta) / delta``.
    """
    x = _float(x)
    n, d = x.shape
    xc = x - jnp.mean(x, axis=0, keepdims=True)
    sigma = jnp.matmul(xc.T, xc, precision=_HI) / n
    mu = jnp.trace(sigma) / d
    delta = jnp.sum((sigma - mu * jnp.eye(d, dtype=x.dtype)) ** 2) / d
    sq = jnp.sum(xc**2, axis=1)  # ||x_i||^2
    # sum_i ||x_i x_i^T - Sigma||_F^2 = sum_i ||x_i||^4 - N ||Sigma||_F^2
    beta = (jnp.sum(sq**2) - n * jnp.sum(sigma**2)) / (n * n * d)
    beta = jnp.clip(beta, 0.0, delta)
    return jnp.where(delta > 0, beta / jnp.where(delta > 0, delta, 1.0), 0.0)


def shrink_core(r: jax.Array, gamma: float | jax.Array) -> jax.Array:
    """``(1 - gamma) R + gamma * mean(eig(R)) * I`` for ``r [K, K]``; ``mean(eig) = tr(R)/K``."""
    r = _float(jnp.asarray(r))
    k = r.shape[0]
    alpha = jnp.trace(r) / k
    return (1.0 - gamma) * r + gamma * alpha * jnp.eye(k, dtype=r.dtype)


def rank_core(m: jax.Array) -> jax.Array:
    """Numerical rank of a symmetric ``m [K, K]`` with numpy ``matrix_rank``'s tolerance
    ``s.max() * K * eps`` (``s = |eigenvalues|`` = singular values of a symmetric matrix)."""
    s = jnp.abs(jnp.linalg.eigvalsh(m))
    tol = jnp.max(s) * m.shape[0] * jnp.finfo(m.dtype).eps
    return jnp.sum(s > tol)


def _whiten(s: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(C, L)`` with ``L = chol(R)`` and ``C = L^-1 S L^-T`` (symmetrised)."""
    lo = jnp.linalg.cholesky(r)
    a = jax.scipy.linalg.solve_triangular(lo, s, lower=True)  # L^-1 S
    c = jax.scipy.linalg.solve_triangular(lo, a.T, lower=True)  # L^-1 (L^-1 S)^T = L^-1 S L^-T
    return 0.5 * (c + c.T), lo


def ged_core(s: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Solve ``S w = lambda R w`` by the Cholesky reduction.

    ``L = chol(R)``, ``C = L^-1 S L^-T``, ``C = V diag(lambda) V^T``, ``W = L^-T V``. ``R`` must
    be positive definite; otherwise the Cholesky factor is NaN and so is every output (the
    caller checks, see :func:`jcompress.ged.fit`).

    Args:
      s: ``[K, K]`` symmetric signal covariance.
      r: ``[K, K]`` symmetric positive-definite reference covariance.

    Returns:
      ``(evals [K], w [K, K])``: eigenvalues in decreasing order and eigenvectors as columns,
      ``R``-normalised (``W^T R W = I``, ``W^T S W = diag(evals)``). Signs are not fixed here
      (the pipeline fixes them on the neuron-space maps).
    """
    c, lo = _whiten(_float(s), _float(r))
    lam, v = jnp.linalg.eigh(c)
    lam, v = lam[::-1], v[:, ::-1]
    w = jax.scipy.linalg.solve_triangular(lo.T, v, lower=False)  # L^-T V
    return lam, w


def top_eigenvalue_core(s: jax.Array, r: jax.Array) -> jax.Array:
    """The largest generalized eigenvalue of ``S w = lambda R w`` (``R`` positive definite)."""
    c, _ = _whiten(_float(s), _float(r))
    return jnp.linalg.eigvalsh(c)[-1]


def cohens_d_core(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cohen's d of two samples ``a [N_a]``, ``b [N_b]``: ``(mean a - mean b) / pooled sd``."""
    na, nb = a.shape[0], b.shape[0]
    va, vb = jnp.var(a, ddof=1), jnp.var(b, ddof=1)
    pooled = jnp.sqrt(((na - 1) * va + (nb - 1) * vb) / max(na + nb - 2, 1))
    diff = jnp.mean(a) - jnp.mean(b)
    return jnp.where(pooled > 0, diff / jnp.where(pooled > 0, pooled, 1.0), 0.0)


def subspace_core(y: jax.Array, q: jax.Array, steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Leading eigenpairs of ``C = Y^T Y`` (``y [N, D]``) by block subspace iteration, without
    forming ``C``.

    ``steps`` products ``Q <- qr(Y^T (Y Q))`` from ``q [D, b]``, then Rayleigh-Ritz on the
    block: ``Q^T C Q = U diag(theta) U^T``, Ritz vectors ``V = Q U``. Costs ``O(N D b)`` per
    step instead of the ``O(N D^2)`` of the covariance plus the ``O(D^3)`` of a full ``eigh``;
    the caller checks the residuals and restarts from ``V`` until the pairs it needs have
    converged.

    Returns:
      ``(theta [b], v [D, b], resid [b])``: Ritz values decreasing (clipped at 0), Ritz vectors
      (orthonormal, signs fixed), residual norms ``||C v_i - theta_i v_i||``.
    """
    y = _float(y)
    q = q.astype(y.dtype)

    def apply(q):
        return jnp.matmul(y.T, jnp.matmul(y, q, precision=_HI), precision=_HI)

    def step(_, q):
        return jnp.linalg.qr(apply(q))[0]

    q = jax.lax.fori_loop(0, steps, step, jnp.linalg.qr(q)[0])
    cq = apply(q)
    t = jnp.matmul(q.T, cq, precision=_HI)
    w, u = jnp.linalg.eigh(0.5 * (t + t.T))
    w, u = w[::-1], u[:, ::-1]
    v = jnp.matmul(q, u, precision=_HI)
    resid = jnp.linalg.norm(jnp.matmul(cq, u, precision=_HI) - v * w[None, :], axis=0)
    return jnp.maximum(w, 0.0), v * flip_signs_core(v)[None, :], resid
