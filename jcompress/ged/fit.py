"""GED "compress then separate" on two activation sets: fit, permutation test, held-out
separation, and the per-layer table.

The pipeline (Cohen 2022's two-stage procedure):

1. covariances ``S`` (signal condition) and ``R`` (reference condition), centered per condition
   (never formed as ``[D, D]`` matrices: every product with them goes through the samples);
2. PCA on ``(S + R) / 2``: keep the fewest components ``P [D, K]`` whose cumulative explained
   variance reaches ``variance_threshold`` (picked on the host: ``K`` sets every later shape).
   No ``[D, D]`` eigh for the usual sizes: fewer samples than neurons go through the
   ``[N, N]`` Gram matrix of the stacked centered samples, more by subspace iteration with
   products through those samples (:func:`_pooled_pca`);
3. in the ``K``-dim space, shrink ``R~ = (1 - g) R + g mean(eig R) I`` and solve
   ``S w = lambda R~ w`` (:func:`~jcompress.ged.ged_core.ged_core`);
4. back-project: filters ``F = P W [D, K]``, maps ``A = S F [D, K]`` (Haufe et al. 2014's
   activation pattern ``Sigma F (F^T Sigma F)^-1`` with ``Sigma = S``: inside the PCA space
   ``F^T S F = diag(lambda)``, so this is the pattern up to a per-column scale), per-sample
   scores ``(X - mu) F`` with ``mu`` the mean of the two condition means.

With the count from the threshold, step 2 needs host syncs (the component count, the
iteration's convergence); steps 3-4 are jitted, with ``K`` static. With a fixed
``GEDConfig.n_components`` no step syncs (the Gram or full eigh, never the iteration), so
:func:`fit` traces under ``jax.jit`` / ``jax.vmap``. :func:`jcompress.ged.analyze` captures
model activations and calls :func:`fit_layers` on them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError
from jcompress.ged import ged_core as core
from jcompress.ged.config import LEDOIT_WOLF, GEDConfig

__all__ = [
    "GEDResult",
    "CVResult",
    "LayerTable",
    "THRESHOLD_TOL",
    "n_components_for_threshold",
    "fit",
    "permutation_test",
    "cross_validate",
    "fit_layers",
]

_HI = jax.lax.Precision.HIGHEST
_DEFAULT = GEDConfig()

THRESHOLD_TOL = 1e-6
"""A cumulative explained-variance fraction within this of ``variance_threshold`` counts as
reaching it. The fractions are summed in float64 on the host, but the PCA eigenvalues carry the
rounding of the (float32) eigh, ~1e-7 relative; without the tolerance a spectrum built to hit
the threshold exactly could need one more component on some platforms."""


# --------------------------------------------------------------------------- result types


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=[
        "eigenvalues",
        "filters",
        "maps",
        "scores_s",
        "scores_r",
        "eigvecs",
        "basis",
        "offset",
        "pca_eigenvalues",
        "explained",
        "shrinkage",
        "rank_r_before",
        "rank_r_after",
        "swapped",
    ],
    meta_fields=["n_components"],
)
@dataclasses.dataclass(frozen=True)
class GEDResult:
    """One GED fit of a signal condition S against a reference condition R.

    Invariants (K = ``n_components``, ``R~`` the shrunk reduced reference covariance):
    ``eigvecs^T R~ eigvecs = I``, ``filters = basis @ eigvecs``, each map's largest-|.| entry
    is positive (filters, eigvecs and scores share that sign), eigenvalues decrease.

    Attributes:
      eigenvalues: ``[K]`` generalized eigenvalues (variance ratio S / R~ of each component).
      filters: ``[D, K]`` spatial filters in neuron space (``P W``).
      maps: ``[D, K]`` activation patterns ``S_full @ filters`` (see the module docstring).
      scores_s: ``[N_S, K]`` component scores of the signal samples, ``(X_s - offset) F``.
      scores_r: ``[N_R, K]`` component scores of the reference samples.
      eigvecs: ``[K, K]`` generalized eigenvectors ``W`` in the PCA space.
      basis: ``[D, K]`` the kept principal components ``P`` (orthonormal columns).
      offset: ``[D]`` mean of the two condition means, subtracted before scoring.
      pca_eigenvalues: ``[D]`` eigenvalues of ``(S + R) / 2``, decreasing (0 past the rank,
        and past the computed block when the PCA ran by subspace iteration).
      explained: ``[D]`` explained-variance fraction of each principal component (of the
        exact total variance).
      shrinkage: ``[]`` the shrinkage ``g`` used (the Ledoit-Wolf estimate where asked).
      rank_r_before: ``[]`` numerical rank of the reduced ``R`` before shrinkage.
      rank_r_after: ``[]`` numerical rank of ``R~``.
      swapped: the same fit with the roles exchanged (R as signal, S as reference; its
        ``scores_s`` are then the R samples), or ``None``.
      n_components: ``K`` (static).
    """

    eigenvalues: jax.Array
    filters: jax.Array
    maps: jax.Array
    scores_s: jax.Array
    scores_r: jax.Array
    eigvecs: jax.Array
    basis: jax.Array
    offset: jax.Array
    pca_eigenvalues: jax.Array
    explained: jax.Array
    shrinkage: jax.Array
    rank_r_before: jax.Array
    rank_r_after: jax.Array
    swapped: GEDResult | None
    n_components: int

    def to_json(self, top: int = 10) -> dict[str, Any]:
        """A JSON-able summary: sizes, ranks, shrinkage, the leading eigenvalues."""
        ev = np.asarray(self.eigenvalues, np.float64)
        out = {
            "n_neurons": int(self.filters.shape[0]),
            "n_samples_s": int(self.scores_s.shape[0]),
            "n_samples_r": int(self.scores_r.shape[0]),
            "n_components": int(self.n_components),
            "explained": float(np.sum(np.asarray(self.explained)[: self.n_components])),
            "shrinkage": float(self.shrinkage),
            "rank_r_before": int(self.rank_r_before),
            "rank_r_after": int(self.rank_r_after),
            "eigenvalues": [float(v) for v in ev[:top]],
        }
        if self.swapped is not None:
            out["swapped"] = self.swapped.to_json(top)
        return out


@dataclasses.dataclass(frozen=True)
class CVResult:
    """Held-out separation on the top filter, per fold and averaged.

    ``accuracy`` is that of a threshold at the midpoint of the two training class means of the
    top component's score (the side of S decided by the training means). ``cohens_d`` is that of
    the held-out scores, S minus R, oriented so that positive means the training direction held.
    """

    accuracy: float
    cohens_d: float
    fold_accuracy: tuple[float, ...]
    fold_cohens_d: tuple[float, ...]
    fold_sizes: tuple[int, ...]
    scores_s: np.ndarray  # [N_S] held-out top-component scores (each sample once)
    scores_r: np.ndarray  # [N_R]

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "cohens_d": self.cohens_d,
            "fold_accuracy": list(self.fold_accuracy),
            "fold_cohens_d": list(self.fold_cohens_d),
            "fold_sizes": list(self.fold_sizes),
        }


@dataclasses.dataclass(frozen=True)
class LayerTable:
    """Per-layer summary of :func:`fit_layers` (arrays of length ``L``) and the fits."""

    top_eigenvalue: np.ndarray
    p_value: np.ndarray
    accuracy: np.ndarray
    cohens_d: np.ndarray
    n_components: np.ndarray
    results: tuple[GEDResult, ...]
    nulls: tuple[np.ndarray, ...]
    cvs: tuple[CVResult, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": [
                {
                    "layer": i,
                    "top_eigenvalue": float(self.top_eigenvalue[i]),
                    "p_value": float(self.p_value[i]),
                    "accuracy": float(self.accuracy[i]),
                    "cohens_d": float(self.cohens_d[i]),
                    "n_components": int(self.n_components[i]),
                }
                for i in range(len(self.top_eigenvalue))
            ]
        }


# --------------------------------------------------------------------------- component count


def n_components_for_threshold(pca_eigenvalues, threshold: float, *, total=None) -> int:
    """The fewest leading components whose cumulative explained variance is ``>= threshold``
    (within :data:`THRESHOLD_TOL`). ``pca_eigenvalues [D]`` decreasing; negatives count as 0;
    ``total`` is the total variance (default: their sum; give it when only the leading
    eigenvalues were computed)."""
    ev = np.clip(np.asarray(pca_eigenvalues, np.float64), 0.0, None)
    total = ev.sum() if total is None else float(total)
    if not total > 0:
        raise UserError("GED: the activations have zero variance (all samples identical)")
    frac = np.cumsum(ev) / total
    return int(min(np.sum(frac < threshold - THRESHOLD_TOL) + 1, ev.size))


# --------------------------------------------------------------------------- jitted stages


def _traced(*xs) -> bool:
    """Whether any of ``xs`` is a tracer (inside ``jit`` / ``vmap``): no host checks then."""
    return any(isinstance(x, jax.core.Tracer) for x in xs)


_all_finite = jax.jit(lambda x: jnp.all(jnp.isfinite(x)))  # one program per shape, not two


def _check_inputs(
    acts_s, acts_r, *, batched: bool = False, finite: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Shapes (and, with ``finite``, no NaN / inf: one device reduction per shape; off for
    subsets of inputs already checked, such as cross-validation folds)."""
    nd = 3 if batched else 2
    shape = "[L, N, D]" if batched else "[N, D]"
    xs, xr = jnp.asarray(acts_s), jnp.asarray(acts_r)
    for name, x in (("acts_s", xs), ("acts_r", xr)):
        if x.ndim != nd:
            raise UserError(f"GED: {name} must be {shape}, got shape {tuple(x.shape)}")
        if x.shape[-2] < 2:
            raise UserError(f"GED: {name} needs at least 2 samples, got {x.shape[-2]}")
    if xs.shape[-1] != xr.shape[-1] or xs.shape[:-2] != xr.shape[:-2]:
        raise UserError(
            f"GED: acts_s {tuple(xs.shape)} and acts_r {tuple(xr.shape)} disagree "
            "(same layers and neurons needed)"
        )
    for name, x in (("acts_s", xs), ("acts_r", xr)) if finite else ():
        if not _traced(x) and not bool(_all_finite(x)):
            raise UserError(f"GED: {name} holds NaN or infinite values")
    return xs, xr


_pooled_factor = jax.jit(core.pooled_factor_core, static_argnames=("center",))


@jax.jit
def _dual_pca(y):
    return (*core.pca_dual_core(y), jnp.sum(y * y))


@jax.jit
def _full_pca(y):
    """``(evals [D], vecs [D, D], total)`` from ``Y^T Y`` (the total in the same program)."""
    c = jnp.matmul(y.T, y, precision=_HI)
    return (*core.pca_core(0.5 * (c + c.T)), jnp.sum(y * y))


_total = jax.jit(lambda y: jnp.sum(y * y))
_subspace = jax.jit(core.subspace_core, static_argnames=("steps",))

ITERATIVE_MIN_D = 256
"""With at least as many samples as neurons and ``D >=`` this, the PCA runs by block subspace
iteration on the stacked samples (:func:`~jcompress.ged.ged_core.subspace_core`) instead of
forming the ``[D, D]`` covariance and a full eigh; below it (or when the iteration does not
settle) the covariance and its full eigh."""
_BLOCK, _OVERSAMPLE, _STEPS, _ROUNDS = 64, 16, 4, 30


def _iterative_pca(y, total: float, threshold: float, seed: int = 0):
    """Top principal components of ``Y^T Y`` (``y [N, D]``, never formed) until the kept ones
    (and the next) have converged: Ritz residuals ``<= 1e3 eps * theta_1``. The block starts
    at 64 columns (+16 oversampling) and doubles while the threshold needs more; past
    ``D / 3`` columns, or if the iteration stalls, the full eigh answers instead.

    Returns ``(evals [D], vecs [D, b])`` with ``evals`` zero past the computed block, or
    ``None`` (use the full eigh)."""
    d, dtype = y.shape[1], y.dtype
    tol = 1e3 * float(jnp.finfo(dtype).eps)
    b = _BLOCK + _OVERSAMPLE
    q = jax.random.normal(jax.random.key(seed), (d, b), dtype)
    while 3 * b <= d:
        for _ in range(_ROUNDS):
            w, v, res = _subspace(y, q, _STEPS)
            wn, rn = np.asarray(w, np.float64), np.asarray(res, np.float64)
            reach = np.cumsum(wn) / total >= threshold - THRESHOLD_TOL
            q = v
            if not reach[: b - _OVERSAMPLE].any():
                break  # the block cannot hold the kept components: grow it
            k = int(np.argmax(reach)) + 1
            if np.all(rn[: k + 1] <= tol * wn[0]):
                return jnp.zeros((d,), dtype).at[:b].set(w), v
        else:
            return None
        extra = jax.random.normal(jax.random.key(seed + b), (d, b), dtype)
        q, b = jnp.concatenate([q, extra], axis=1), 2 * b
    return None


def _pooled_pca(xs, xr, center: bool, threshold: float):
    """Stage 1: PCA of the mean of the two condition covariances, from the stacked
    (centered, scaled) samples ``Y`` with ``Y^T Y = (S + R) / 2``; no ``[D, D]`` eigh:
    with fewer samples than neurons (the usual case for sentence sets) through the ``[N, N]``
    Gram matrix (exact, :func:`~jcompress.ged.ged_core.pca_dual_core`), otherwise by subspace
    iteration with products ``Y^T (Y Q)`` (:func:`_iterative_pca`; ``Y^T Y`` is never formed)
    for ``D >= ITERATIVE_MIN_D``.

    Returns ``(evals [D], vecs [D, b], total)``: eigenvalues (decreasing, zero past what was
    computed), orthonormal eigenvectors, and the exact total variance ``tr((S + R) / 2)``."""
    y = _pooled_factor(xs, xr, center)
    n, d = y.shape
    if n < d:
        evals, vecs, total = _dual_pca(y)
        return evals, vecs, total
    if d < ITERATIVE_MIN_D:
        return _full_pca(y)
    total = _total(y)
    out = _iterative_pca(y, float(total), threshold) if float(total) > 0 else None
    return (*out, total) if out is not None else _full_pca(y)


@dataclasses.dataclass(frozen=True)
class _Opts:
    """The settings that change a compiled program (static jit argument); the shrinkage value
    and the seed travel as traced arrays so that sweeping them does not recompile."""

    center: bool
    ledoit_wolf: bool

    @staticmethod
    def of(config: GEDConfig) -> _Opts:
        return _Opts(center=config.center, ledoit_wolf=config.shrinkage == LEDOIT_WOLF)


def _gamma_arg(config: GEDConfig) -> jax.Array:
    return jnp.asarray(0.0 if config.shrinkage == LEDOIT_WOLF else config.shrinkage)


def _gamma(z_ref, opts: _Opts, gamma):
    if opts.ledoit_wolf:
        return core.ledoit_wolf_core(z_ref)
    return jnp.asarray(gamma, z_ref.dtype)


def _cov_times(x, f, center: bool):
    """``cov(x) @ f`` (:func:`~jcompress.ged.ged_core.covariance_core` normalisation) without
    the ``[D, D]`` covariance: ``Xc^T (Xc f) / (N - 1)``."""
    n = x.shape[0]
    if center:
        x = x - jnp.mean(x, axis=0, keepdims=True)
    xf = jnp.matmul(x, f, precision=_HI)
    return jnp.matmul(x.T, xf, precision=_HI) / (max(n - 1, 1) if center else max(n, 1))


def _separate(x_sig, x_ref, p, offset, opts: _Opts, gamma):
    """Stage 2 for one direction: reduce, shrink, GED, back-project, fix signs."""
    z_sig = jnp.matmul(x_sig, p, precision=_HI)
    z_ref = jnp.matmul(x_ref, p, precision=_HI)
    s = core.covariance_core(z_sig, opts.center)
    r = core.covariance_core(z_ref, opts.center)
    s, r = 0.5 * (s + s.T), 0.5 * (r + r.T)
    g = _gamma(z_ref, opts, gamma)
    r_shrunk = core.shrink_core(r, g)
    lam, w = core.ged_core(s, r_shrunk)
    filters = jnp.matmul(p, w, precision=_HI)
    maps = _cov_times(x_sig, filters, opts.center)
    sign = core.flip_signs_core(maps)
    w, filters, maps = w * sign, filters * sign, maps * sign
    score = lambda x: jnp.matmul(x - offset, filters, precision=_HI)  # noqa: E731
    return dict(
        eigenvalues=lam,
        filters=filters,
        maps=maps,
        scores_s=score(x_sig),
        scores_r=score(x_ref),
        eigvecs=w,
        shrinkage=g,
        rank_r_before=core.rank_core(r),
        rank_r_after=core.rank_core(r_shrunk),
    )


@functools.partial(jax.jit, static_argnames=("k", "opts", "swap"))
def _reduced_fit(xs, xr, evals, vecs, total, gamma, k: int, opts: _Opts, swap: bool):
    p = vecs[:, :k]
    xs, xr = xs.astype(p.dtype), xr.astype(p.dtype)
    offset = 0.5 * (jnp.mean(xs, axis=0) + jnp.mean(xr, axis=0))
    common = dict(
        basis=p,
        offset=offset,
        pca_eigenvalues=evals,
        explained=evals / jnp.where(total > 0, total, 1.0),
        n_components=k,
    )
    main = _separate(xs, xr, p, offset, opts, gamma)
    swapped = None
    if swap:
        swapped = GEDResult(**_separate(xr, xs, p, offset, opts, gamma), **common, swapped=None)
    return GEDResult(**main, **common, swapped=swapped)


def _check_pd(res: GEDResult, what: str) -> None:
    k = res.n_components
    after, before = int(res.rank_r_after), int(res.rank_r_before)
    # [K] values read on the host (a device check compiled one program per K)
    if after < k or not np.all(np.isfinite(np.asarray(res.eigenvalues))):
        raise UserError(
            f"GED: the {what} covariance is not positive definite in the {k}-dim PCA space "
            f"(rank {before} before shrinkage, {after} after, {k} needed): set "
            "GEDConfig.shrinkage > 0 (e.g. 0.01) or 'ledoit_wolf'"
        )


def _max_components(n_s: int, n_r: int, d: int, center: bool = True) -> int:
    """The most principal components ``n_s + n_r`` samples of ``d`` neurons can give: the
    rank bound of ``(S + R) / 2``, ``min(n_s + n_r - 2, d)`` centered (each condition's mean
    costs one), ``min(n_s + n_r, d)`` uncentered."""
    return min(n_s + n_r - (2 if center else 0), d)


def _check_data_rank(evals, k: int, n: int) -> None:
    """Concrete only: the pooled covariance has at least ``k`` nonzero eigenvalues (the
    :func:`~jcompress.ged.ged_core.pca_dual_core` tolerance, ``max * max(N, D) * eps``)."""
    ev = np.asarray(evals, np.float64)
    tol = ev[0] * max(n, ev.size) * float(jnp.finfo(evals.dtype).eps)
    rank = int(np.sum(ev > tol))
    if rank < k:
        raise UserError(
            f"GED: GEDConfig.n_components={k} but the activations span only {rank} "
            f"principal components: use n_components <= {rank}"
        )


def _fit_fixed(xs, xr, config: GEDConfig, swap: bool) -> GEDResult:
    """:func:`fit` with ``K = config.n_components``: traceable (no host sync on tracers)."""
    k = config.n_components
    (n_s, d), n_r = xs.shape, xr.shape[0]
    avail = _max_components(n_s, n_r, d, config.center)
    if k > avail:
        raise UserError(
            f"GED: GEDConfig.n_components={k} exceeds the {avail} components that "
            f"{n_s} + {n_r} samples of {d} neurons allow"
            + (" (centered: N_S + N_R - 2)" if config.center and avail < d else "")
        )
    y = _pooled_factor(xs, xr, config.center)
    n = y.shape[0]
    if n < d:
        evals, vecs, total = _dual_pca(y)
    else:
        evals, vecs, total = _full_pca(y)
    concrete = not _traced(xs, xr)
    if concrete:
        _check_data_rank(evals, k, n)
    res = _reduced_fit(xs, xr, evals, vecs, total, _gamma_arg(config), k, _Opts.of(config), swap)
    if concrete:
        _check_pd(res, "reference (acts_r)")
        if res.swapped is not None:
            _check_pd(res.swapped, "swapped reference (acts_s)")
    return res


@functools.partial(jax.jit, static_argnames=("config", "swap"))
def _vmapped_fixed_fit(xs, xr, config: GEDConfig, swap: bool) -> tuple[GEDResult, ...]:
    """Every layer's fixed-``K`` fit (``[L, N, D]`` inputs) in one vmapped call, returned
    per layer (split inside the program: indexing the stacked leaves op by op compiled one
    small program per leaf shape and layer)."""
    stacked = jax.vmap(lambda a, b: _fit_fixed(a, b, config, swap))(xs, xr)
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(xs.shape[0]))


def _fit(xs, xr, config: GEDConfig, swap: bool) -> GEDResult:
    """:func:`fit` on checked inputs."""
    if config.n_components is not None:
        return _fit_fixed(xs, xr, config, swap)
    if _traced(xs, xr):
        raise UserError(
            "GED: fit under jax.jit / jax.vmap needs a fixed GEDConfig.n_components "
            "(variance_threshold picks the count on the host)"
        )
    stats = _pooled_pca(xs, xr, config.center, config.variance_threshold)
    return _fit_stats(xs, xr, stats, config, swap)


def _fit_stats(xs, xr, stats, config: GEDConfig, swap: bool) -> GEDResult:
    evals, vecs, total = stats
    k = n_components_for_threshold(evals, config.variance_threshold, total=float(total))
    k = min(k, vecs.shape[1])
    res = _reduced_fit(xs, xr, evals, vecs, total, _gamma_arg(config), k, _Opts.of(config), swap)
    _check_pd(res, "reference (acts_r)")
    if res.swapped is not None:
        _check_pd(res.swapped, "swapped reference (acts_s)")
    return res


# --------------------------------------------------------------------------- public API


def fit(acts_s, acts_r, *, config: GEDConfig = _DEFAULT, swap: bool = True) -> GEDResult:
    """Compress then separate: GED of ``acts_s`` (signal) against ``acts_r`` (reference).

    Args:
      acts_s: ``[N_S, D]`` activations of the signal condition (e.g. at "him" tokens).
      acts_r: ``[N_R, D]`` activations of the reference condition (e.g. at "her" tokens).
      config: :class:`GEDConfig` (threshold or fixed component count, shrinkage, centering).
      swap: also fit R against S (``result.swapped``).

    Returns:
      :class:`GEDResult`. Raises :class:`~jcompress.errors.UserError` on NaN / infinite
      activations, when ``config.n_components`` exceeds what the data span, and when the
      (shrunk) reference covariance is not positive definite in the PCA space.

    Pure, and jit-able with a fixed ``config.n_components`` (the config static or closed
    over): ``jax.jit(functools.partial(fit, config=GEDConfig(n_components=60)))``, and
    ``jax.vmap`` of that over layers of one shape. Traced inputs skip the host checks (the
    component-count bound, which needs only shapes, still raises): a non positive definite
    ``R~`` (e.g. ``shrinkage=0`` on rank-deficient data) then gives NaNs, not an error. With
    ``n_components=None`` the count is picked from ``variance_threshold`` on the host, which
    tracing cannot do (a clear error).

    Example::

      res = fit(him_acts, her_acts, config=GEDConfig(shrinkage=0.01))
      res.eigenvalues[0], res.maps[:, 0]      # the "him > her" component
      res.swapped.eigenvalues[0]              # "her > him"
    """
    xs, xr = _check_inputs(acts_s, acts_r)
    return _fit(xs, xr, config, swap)


def _top_reduced(zs, zr, opts: _Opts, gamma):
    """Top generalized eigenvalue from samples already in the PCA space ``[N, K]``."""
    s = core.covariance_core(zs, opts.center)
    r = core.covariance_core(zr, opts.center)
    return core.top_eigenvalue_core(s, core.shrink_core(r, _gamma(zr, opts, gamma)))


def _top_from_mask(m, z, zz, n_s: int, opts: _Opts, gamma):
    """:func:`_top_reduced` of the rows ``m == 1`` against the rest, from sufficient
    statistics: ``sum_{m} z_i z_i^T = m @ zz`` (a ``[B, N] @ [N, K^2]`` GEMM once vmapped; no
    gather). ``z`` is shifted by its pooled mean where centering (shift-invariant then), which
    keeps the float32 cancellation in ``sum z z^T - n mu mu^T`` small."""
    n, k = z.shape
    n_r = n - n_s
    ss = jnp.matmul(m, zz, precision=_HI).reshape(k, k)
    sr = jnp.sum(zz, axis=0).reshape(k, k) - ss
    if opts.center:
        a = jnp.matmul(m, z, precision=_HI)
        b = jnp.sum(z, axis=0) - a
        s = (ss - jnp.outer(a, a) / n_s) / max(n_s - 1, 1)
        r = (sr - jnp.outer(b, b) / n_r) / max(n_r - 1, 1)
    else:
        s, r = ss / n_s, sr / n_r
    s, r = 0.5 * (s + s.T), 0.5 * (r + r.T)
    return core.top_eigenvalue_core(s, core.shrink_core(r, gamma))


@functools.partial(jax.jit, static_argnames=("n_s", "n_perm", "opts", "batch", "moments"))
def _permutation_null(
    z, seed, gamma, n_s: int, n_perm: int, opts: _Opts, batch: int, moments: bool
):
    n = z.shape[0]
    keys = jax.random.split(jax.random.key(seed), n_perm)
    if moments:  # fixed shrinkage: every permutation from the [N, K^2] outer products
        if opts.center:
            z = z - jnp.mean(z, axis=0, keepdims=True)
        zz = (z[:, :, None] * z[:, None, :]).reshape(n, -1)
        gamma = jnp.asarray(gamma, z.dtype)

        def one(key):
            perm = jax.random.permutation(key, n)
            m = jnp.zeros((n,), z.dtype).at[perm[:n_s]].set(1.0)
            return _top_from_mask(m, z, zz, n_s, opts, gamma)

    else:  # Ledoit-Wolf needs the reference samples themselves

        def one(key):
            perm = jax.random.permutation(key, n)
            return _top_reduced(z[perm[:n_s]], z[perm[n_s:]], opts, gamma)

    observed = _top_reduced(z[:n_s], z[n_s:], opts, gamma)
    return observed, jax.lax.map(one, keys, batch_size=batch)


_MOMENTS_BYTES = 1 << 30  # the [N, K^2] outer products are kept below 1 GiB


@jax.jit
def _project_pooled(xs, xr, basis):
    """Both conditions' samples in the PCA space, ``[N_S + N_R, K]``: one program (op by op,
    the concatenate, cast and product were three per shape)."""
    x = jnp.concatenate([xs, xr]).astype(basis.dtype)
    return jnp.matmul(x, basis, precision=_HI)


def _permutation_from_fit(xs, xr, res: GEDResult, config: GEDConfig, moments: bool = True):
    n_s = xs.shape[0]
    n_perm = config.n_permutations
    if n_perm == 0:
        return np.zeros((0,), np.float32), 1.0
    z = _project_pooled(xs, xr, res.basis)
    opts = _Opts.of(config)
    n, k = z.shape
    item = z.dtype.itemsize
    moments = moments and not opts.ledoit_wolf and n * k * k * item <= _MOMENTS_BYTES
    # one permutation holds a mask or a gathered copy of z and a few [K, K] matrices
    per = (2 * n if moments else 3 * z.size) * item + 8 * k * k * item
    batch = int(max(1, min(n_perm, (256 << 20) // per)))
    observed, null = _permutation_null(
        z, config.seed, _gamma_arg(config), n_s, n_perm, opts, batch, moments
    )
    null = np.asarray(null)
    p = (1.0 + np.sum(null >= np.asarray(observed))) / (1.0 + n_perm)
    return null, float(p)


def permutation_test(
    acts_s, acts_r, *, config: GEDConfig = _DEFAULT, result: GEDResult | None = None
) -> tuple[np.ndarray, float]:
    """Significance of the top generalized eigenvalue by shuffling condition labels.

    The PCA basis of the fit is held fixed (the PCA of the mean covariance is label-blind up to
    the per-condition centering) and each permutation refits the shrunk GED in that space; all
    permutations run in one jit call (``lax.map`` over chunks of a ``vmap``).

    Args:
      acts_s: ``[N_S, D]`` signal activations.
      acts_r: ``[N_R, D]`` reference activations.
      config: ``n_permutations`` and ``seed`` set the shuffles.
      result: ``fit(acts_s, acts_r, config=config)`` where already computed (its PCA basis is
        reused); ``None`` fits here.

    Returns:
      ``(null [n_permutations], p_value)`` with ``p = (1 + #(null >= observed)) / (1 + n)``.
    """
    xs, xr = _check_inputs(acts_s, acts_r)
    if result is None:
        result = fit(xs, xr, config=config, swap=False)
    elif result.basis.shape[0] != xs.shape[1] or result.scores_s.shape[0] != xs.shape[0]:
        raise UserError("GED: permutation_test(result=...) is a fit of other activations")
    return _permutation_from_fit(xs, xr, result, config)


def _folds(n: int, n_folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), n_folds)


@jax.jit
def _held_out(res: GEDResult, xs_test, xr_test):
    """One fold's held-out scores on the top filter and the two training score means, as one
    program (op by op, every fold shape compiled a dozen small programs)."""
    f, off = res.filters[:, 0], res.offset
    hs = (xs_test.astype(f.dtype) - off) @ f
    hr = (xr_test.astype(f.dtype) - off) @ f
    return hs, hr, jnp.mean(res.scores_s[:, 0]), jnp.mean(res.scores_r[:, 0])


_cohens_d = jax.jit(core.cohens_d_core)


def cross_validate(acts_s, acts_r, *, config: GEDConfig = _DEFAULT) -> CVResult:
    """Held-out separation of the two conditions along the top GED filter (stratified k-fold).

    Each fold refits the whole pipeline (PCA count included) on the training folds, puts a
    threshold at the midpoint of the two training class means of the top component's score
    (S on the side of its training mean), and scores the held-out samples.

    Args:
      acts_s: ``[N_S, D]``, acts_r: ``[N_R, D]`` with at least ``n_folds`` samples each.
      config: ``n_folds`` and ``seed`` set the split.

    Returns:
      :class:`CVResult` (mean and per-fold accuracy and Cohen's d).
    """
    xs, xr = _check_inputs(acts_s, acts_r)
    return _cross_validate(xs, xr, config)


def _cross_validate(xs, xr, config: GEDConfig) -> CVResult:
    """:func:`cross_validate` on checked inputs (the folds are not checked again)."""
    k = config.n_folds
    for name, x in (("acts_s", xs), ("acts_r", xr)):
        if x.shape[0] < k:
            raise UserError(f"GED: {name} has {x.shape[0]} samples, fewer than n_folds={k}")
    rng = np.random.default_rng(config.seed)
    fs, fr = _folds(xs.shape[0], k, rng), _folds(xr.shape[0], k, rng)
    held_s = np.zeros((xs.shape[0],), np.float64)
    held_r = np.zeros((xr.shape[0],), np.float64)
    accs, ds, sizes = [], [], []
    xs_host, xr_host = np.asarray(xs), np.asarray(xr)  # the folds are split on the host
    for ts, tr in zip(fs, fr, strict=True):
        ms, mr = np.ones(xs.shape[0], bool), np.ones(xr.shape[0], bool)
        ms[ts], mr[tr] = False, False
        train = _check_inputs(xs_host[ms], xr_host[mr], finite=False)
        res = _fit(*train, config, False)
        hs, hr, m_s, m_r = _held_out(res, xs_host[ts], xr_host[tr])
        m_s, m_r = float(m_s), float(m_r)
        thr, sign = 0.5 * (m_s + m_r), (1.0 if m_s >= m_r else -1.0)
        hs, hr = np.asarray(hs, np.float64), np.asarray(hr, np.float64)
        held_s[ts], held_r[tr] = hs, hr
        correct = np.sum(sign * (hs - thr) > 0) + np.sum(sign * (hr - thr) <= 0)
        accs.append(float(correct / (hs.size + hr.size)))
        ds.append(float(sign * _cohens_d(jnp.asarray(hs), jnp.asarray(hr))))
        sizes.append(int(hs.size + hr.size))
    return CVResult(
        accuracy=float(np.mean(accs)),
        cohens_d=float(np.mean(ds)),
        fold_accuracy=tuple(accs),
        fold_cohens_d=tuple(ds),
        fold_sizes=tuple(sizes),
        scores_s=held_s,
        scores_r=held_r,
    )


def fit_layers(
    acts_s,
    acts_r,
    *,
    config: GEDConfig = _DEFAULT,
    swap: bool = False,
    progress: bool = False,
) -> LayerTable:
    """:func:`fit`, :func:`permutation_test` and :func:`cross_validate` for every layer.

    With a fixed ``config.n_components`` every layer's fit has the same shapes, so all layers
    are fitted in one ``jax.vmap``-ed, jitted call (the positive-definiteness checks then run
    per layer on the results). Without it each layer keeps its own number of components
    ``K_l`` (jit caches one compilation per distinct ``K_l``; the PCA may iterate a
    data-dependent number of times), so the layers are fitted one after another. Permutation
    tests and held-out folds run per layer.

    Args:
      acts_s: ``[L, N_S, D]`` signal activations per layer.
      acts_r: ``[L, N_R, D]`` reference activations per layer.
      config: :class:`GEDConfig`.
      swap: also fit R against S in each layer's ``results[l].swapped``.
      progress: a tqdm bar over layers.

    Returns:
      :class:`LayerTable` (top eigenvalue, p-value, held-out accuracy and Cohen's d,
      component count per layer; the fits, permutation nulls and held-out results).
    """
    xs, xr = _check_inputs(acts_s, acts_r, batched=True)
    rows, results, nulls, cvs = [], [], [], []
    it = range(xs.shape[0])
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="GED", unit="layer", leave=False)
    per_layer = None
    if config.n_components is not None:  # one call over every layer: shapes agree
        per_layer = _vmapped_fixed_fit(xs, xr, config, swap)
    # each layer's samples sliced on the host (a device slice compiled once per layer) and
    # put back on the device once
    hs, hr = np.asarray(xs), np.asarray(xr)
    for layer in it:
        xl, rl = jnp.asarray(hs[layer]), jnp.asarray(hr[layer])
        if per_layer is None:
            res = _fit(xl, rl, config, swap)
        else:
            res = per_layer[layer]
            _check_pd(res, f"reference (acts_r) of layer {layer}")
            if res.swapped is not None:
                _check_pd(res.swapped, f"swapped reference (acts_s) of layer {layer}")
        # the stack was checked above: no per-layer checks again
        null, p = _permutation_from_fit(xl, rl, res, config)
        cv = _cross_validate(xl, rl, config)
        rows.append(
            (float(np.asarray(res.eigenvalues)[0]), p, cv.accuracy, cv.cohens_d, res.n_components)
        )
        results.append(res)
        nulls.append(null)
        cvs.append(cv)
    cols = list(zip(*rows, strict=True))
    return LayerTable(
        top_eigenvalue=np.asarray(cols[0]),
        p_value=np.asarray(cols[1]),
        accuracy=np.asarray(cols[2]),
        cohens_d=np.asarray(cols[3]),
        n_components=np.asarray(cols[4], np.int64),
        results=tuple(results),
        nulls=tuple(nulls),
        cvs=tuple(cvs),
    )
