"""The GED rows: ``jcompress.ged.fit`` and its 1,000-permutation test against the numpy/scipy
pipeline of Cohen's GED tutorial and the seed (``np.cov``, a full ``np.linalg.eigh`` PCA of
the mean covariance, shrinkage, ``scipy.linalg.eigh(S, R~)``, filters and maps), on
GPT-2-MLP-sized random activations with a planted component: N = 2 x 2,000 (more samples than
neurons: jcompress's PCA by subspace iteration) and the seed's N < D shape (the Gram-matrix
PCA).

Heavy imports (jax, scipy, jcompress) happen inside the side functions, in the process being
measured.
"""

from __future__ import annotations

from typing import Any

from bench.harness import Context, median, register, time_calls

THRESHOLD, GAMMA = 0.99, 0.01


def _acts(d: int, n: int, seed: int = 0):
    """Two conditions ``[n, d]`` float32 shaped like MLP activations: a 64-dim latent subspace
    with a decaying spectrum plus small isotropic noise (so 99% of the variance needs roughly
    the seed's ~60 components), and a component planted in the signal condition."""
    import numpy as np

    rng = np.random.default_rng(seed)
    r = min(64, max(d // 2, 1))
    mix = rng.normal(size=(r, d)) / np.sqrt(d)
    scales = np.geomspace(3.0, 0.3, r)

    def cond():
        return (rng.normal(size=(n, r)) * scales) @ mix + 0.02 * rng.normal(size=(n, d))

    xs, xr = cond(), cond()
    u = mix[r // 2] / np.linalg.norm(mix[r // 2])
    xs += 1.5 * rng.normal(size=(n, 1)) * u
    return xs.astype(np.float32), xr.astype(np.float32)


# --------------------------------------------------------------------------- sides


def fit_jax(d: int, n: int, repeats: int) -> dict[str, Any]:
    """jcompress side: ``jcompress.ged.fit`` (one direction), float32, jit."""
    import jax
    import jax.numpy as jnp

    from jcompress.ged import GEDConfig, fit

    jnp.zeros(()).block_until_ready()
    xs, xr = (jnp.asarray(a) for a in _acts(d, n))
    cfg = GEDConfig(variance_threshold=THRESHOLD, shrinkage=GAMMA)
    first, times, res = time_calls(
        lambda: fit(xs, xr, config=cfg, swap=False), repeats, sync=jax.block_until_ready
    )
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "n_components": res.n_components,
        "top_eigenvalues": [float(v) for v in res.eigenvalues[:5]],
        "backend": jax.default_backend(),
    }


def _numpy_fit(xs, xr):
    """The tutorial's pipeline: ``np.cov``, PCA by ``np.linalg.eigh``, shrinkage,
    ``scipy.linalg.eigh(S, R~)``, filters and maps."""
    import numpy as np
    import scipy.linalg

    cs, cr = np.cov(xs, rowvar=False), np.cov(xr, rowvar=False)
    ev, vec = np.linalg.eigh((cs + cr) / 2)
    ev, vec = ev[::-1], vec[:, ::-1]
    k = int(np.argmax(np.cumsum(ev) / ev.sum() >= THRESHOLD)) + 1
    p = vec[:, :k]
    s, r = p.T @ cs @ p, p.T @ cr @ p
    rt = (1 - GAMMA) * r + GAMMA * np.mean(np.linalg.eigvalsh(r)) * np.eye(k)
    lam, w = scipy.linalg.eigh(s, rt)
    filters = p @ w[:, ::-1]
    maps = cs @ filters
    offset = (xs.mean(0) + xr.mean(0)) / 2
    return k, lam[::-1], p, maps, (xs - offset) @ filters, (xr - offset) @ filters


def fit_numpy(d: int, n: int, repeats: int) -> dict[str, Any]:
    """Baseline side: the tutorial's numpy/scipy pipeline (float64, as ``np.cov`` returns)."""
    xs, xr = _acts(d, n)
    first, times, out = time_calls(lambda: _numpy_fit(xs, xr), repeats)
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "n_components": out[0],
        "top_eigenvalues": [float(v) for v in out[1][:5]],
    }


def perm_jax(d: int, n: int, n_perm: int, repeats: int) -> dict[str, Any]:
    """jcompress side: ``permutation_test`` on a given fit (all permutations in one jit call;
    the fit itself is the other row and is not timed here)."""
    import jax
    import jax.numpy as jnp

    from jcompress.ged import GEDConfig, fit, permutation_test

    jnp.zeros(()).block_until_ready()
    xs, xr = (jnp.asarray(a) for a in _acts(d, n))
    cfg = GEDConfig(variance_threshold=THRESHOLD, shrinkage=GAMMA, n_permutations=n_perm)
    res = jax.block_until_ready(fit(xs, xr, config=cfg, swap=False))
    first, times, (null, p) = time_calls(
        lambda: permutation_test(xs, xr, config=cfg, result=res), repeats
    )
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "p_value": p,
        "null_p95": float(sorted(null)[int(0.95 * (len(null) - 1))]) if len(null) else None,
    }


def perm_numpy(d: int, n: int, n_perm: int, repeats: int) -> dict[str, Any]:
    """Baseline side: on the tutorial pipeline's fit (not timed), a Python loop over
    permutations in the same fixed PCA space (permute rows, ``np.cov``, shrink,
    ``scipy.linalg.eigh(S, R~, eigvals_only=True)``)."""
    import numpy as np
    import scipy.linalg

    xs, xr = _acts(d, n)
    k, lam, p, *_ = _numpy_fit(xs, xr)

    def run():
        z = np.concatenate([xs, xr]) @ p
        rng = np.random.default_rng(0)
        null = np.empty(n_perm)
        for i in range(n_perm):
            perm = rng.permutation(z.shape[0])
            s = np.cov(z[perm[:n]], rowvar=False)
            r = np.cov(z[perm[n:]], rowvar=False)
            rt = (1 - GAMMA) * r + GAMMA * np.trace(r) / k * np.eye(k)
            null[i] = scipy.linalg.eigh(s, rt, eigvals_only=True)[-1]
        return (1 + np.sum(null >= lam[0])) / (1 + n_perm), null

    first, times, (p, null) = time_calls(run, repeats)
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "p_value": float(p),
        "null_p95": float(np.percentile(null, 95)) if null.size else None,
    }


# --------------------------------------------------------------------------- rows


def _fit_row(ctx: Context, d: int, n: int, repeats: int) -> dict[str, Any]:
    """Both fit rows: the two sides at ``D = d``, ``N = 2 x n``, checked to agree (the same
    number of components, the top eigenvalue within 1%)."""
    ours = ctx.side(fit_jax, "jcompress.ged.fit", d=d, n=n, repeats=repeats)
    base = ctx.side(fit_numpy, "numpy/scipy GED", d=d, n=n, repeats=repeats)
    a, b = ours["top_eigenvalues"][0], base["top_eigenvalues"][0]
    if ours["n_components"] != base["n_components"] or not abs(a - b) <= 1e-2 * abs(b):
        raise AssertionError(
            f"GED disagrees: K {ours['n_components']} vs {base['n_components']}, "
            f"top eigenvalue {a:.6g} vs {b:.6g}"
        )
    return {
        "ours": ours,
        "baseline": base,
        "size": f"D={d}, N=2x{n}, K={base['n_components']}",
        "info": {"d": d, "n": n, "threshold": THRESHOLD, "shrinkage": GAMMA},
    }


@register(
    "ged_fit_gpt2_size",
    metric="s",
    higher_is_better=False,
    doc="jcompress.ged.fit vs the tutorial's numpy/scipy GED pipeline (PCA 99%, shrinkage "
    "0.01, scipy.linalg.eigh(S, R~)) on D=3072, N=2x2000 planted activations",
)
def ged_fit_gpt2_size(ctx: Context) -> dict[str, Any]:
    d, n = ctx.pick(full=(3072, 2000), quick=(768, 500), dry=(32, 40))
    repeats = ctx.repeats(full=3, quick=2)
    return _fit_row(ctx, d, n, repeats)


@register(
    "ged_fit_seed_size",
    metric="s",
    higher_is_better=False,
    doc="jcompress.ged.fit vs the same numpy/scipy pipeline at the seed's shape: D=3072 "
    "neurons (GPT-2 MLP), N=2x171 samples (the bundled pronoun set), so N < D",
)
def ged_fit_seed_size(ctx: Context) -> dict[str, Any]:
    d, n = ctx.pick(full=(3072, 171), quick=(768, 171), dry=(32, 12))
    repeats = ctx.repeats(full=3, quick=2)
    return _fit_row(ctx, d, n, repeats)


@register(
    "ged_permutations_1000",
    metric="s",
    higher_is_better=False,
    doc="jcompress.ged.permutation_test on a given fit (1,000 label shuffles, one jit call) vs "
    "a numpy/scipy loop over permutations in the same PCA space (fits not timed)",
)
def ged_permutations_1000(ctx: Context) -> dict[str, Any]:
    d, n, n_perm = ctx.pick(full=(3072, 2000, 1000), quick=(768, 500, 1000), dry=(32, 40, 20))
    repeats = ctx.repeats(full=2, quick=1)
    ours = ctx.side(
        perm_jax, "jcompress permutation_test", d=d, n=n, n_perm=n_perm, repeats=repeats
    )
    base = ctx.side(perm_numpy, "numpy permutation loop", d=d, n=n, n_perm=n_perm, repeats=repeats)
    return {
        "ours": ours,
        "baseline": base,
        "size": f"D={d}, N=2x{n}, {n_perm} permutations",
        "info": {"d": d, "n": n, "n_permutations": n_perm},
    }
