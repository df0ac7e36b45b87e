"""GED (jcompress.ged): the Cholesky GED against scipy, the compress-then-separate pipeline
against an independent numpy/scipy oracle, planted-component recovery, the null case, the
component count at the threshold, shrinkage and rank, the permutation test, held-out
separation, layers, figures, the pronoun files and the config checks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jcompress.errors import UserError
from jcompress.ged import (
    HER_FILE,
    HIM_FILE,
    GEDConfig,
    cross_validate,
    fit,
    fit_layers,
    load_condition_file,
    n_components_for_threshold,
    permutation_test,
)
from jcompress.ged import figures as ged_figures
from jcompress.ged import ged_core as core


def _spd(rng, k, cond=10.0):
    q, _ = np.linalg.qr(rng.normal(size=(k, k)))
    return (q * np.geomspace(1.0, cond, k)) @ q.T


def _planted(rng, n_s=300, n_r=300, d=24, amp=3.0, shift=0.0):
    """S = noise + a_i u with a_i ~ N(shift, amp^2); R = noise. Returns (xs, xr, u)."""
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    mix = np.diag(np.geomspace(1.0, 0.5, d))  # mildly anisotropic noise
    xs = rng.normal(size=(n_s, d)) @ mix + (shift + amp * rng.normal(size=(n_s, 1))) * u
    xr = rng.normal(size=(n_r, d)) @ mix
    return xs.astype(np.float32), xr.astype(np.float32), u


def _abs_cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))


# --------------------------------------------------------------------------- GED vs scipy


def test_ged_core_matches_scipy_fp64():
    rng = np.random.default_rng(0)
    s, r = _spd(rng, 12, 50.0), _spd(rng, 12, 20.0)
    ref_w, ref_v = scipy.linalg.eigh(s, r)  # ascending, V^T R V = I
    with jax.enable_x64(True):
        lam, w = jax.jit(core.ged_core)(jnp.asarray(s), jnp.asarray(r))  # jit: as fit runs it
        lam, w = np.asarray(lam), np.asarray(w)
        assert lam.dtype == np.float64
        top = jax.jit(core.top_eigenvalue_core)(jnp.asarray(s), jnp.asarray(r))
    np.testing.assert_allclose(lam, ref_w[::-1], rtol=1e-5)
    np.testing.assert_allclose(float(top), ref_w[-1], rtol=1e-5)
    ref_v = ref_v[:, ::-1]
    signs = np.sign(np.sum(w * ref_v, axis=0))
    np.testing.assert_allclose(w, ref_v * signs, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(w.T @ r @ w, np.eye(12), atol=1e-10)
    np.testing.assert_allclose(w.T @ s @ w, np.diag(lam), atol=1e-8)


def test_ged_core_vmaps():
    rng = np.random.default_rng(1)
    s = np.stack([_spd(rng, 6) for _ in range(3)]).astype(np.float32)
    r = np.stack([_spd(rng, 6) for _ in range(3)]).astype(np.float32)
    lam, _ = jax.jit(jax.vmap(core.ged_core))(s, r)
    for i in range(3):
        np.testing.assert_allclose(lam[i], scipy.linalg.eigh(s[i], r[i])[0][::-1], rtol=1e-4)


def _oracle(xs, xr, threshold, gamma):
    """The tutorial's numpy/scipy pipeline, written independently of jcompress.ged."""
    cs, cr = np.cov(xs, rowvar=False), np.cov(xr, rowvar=False)
    ev, vec = np.linalg.eigh((cs + cr) / 2)
    ev, vec = ev[::-1], vec[:, ::-1]
    k = int(np.argmax(np.cumsum(ev) / ev.sum() >= threshold)) + 1
    p = vec[:, :k]
    s, r = p.T @ cs @ p, p.T @ cr @ p
    rt = (1 - gamma) * r + gamma * np.mean(np.linalg.eigvalsh(r)) * np.eye(k)
    lam, w = scipy.linalg.eigh(s, rt)
    return k, lam[::-1], p @ w[:, ::-1], rt, cs


# full eigh (N >= D), dual PCA (N < D): the data and settings of both fp64 pipeline tests
# (test_fit_matches_numpy_scipy_pipeline_fp64, test_fixed_k_jit_matches_eager_and_threshold_...),
# so that the threshold fit's programs are compiled once for both
FP64_SHAPES = [(80, 70, 20), (14, 10, 40)]
FP64_CONFIG = dict(variance_threshold=0.95, shrinkage=0.05)


def _fp64_planted(n_s, n_r, d):
    xs, xr, _ = _planted(np.random.default_rng(2), n_s=n_s, n_r=n_r, d=d)
    return xs.astype(np.float64), xr.astype(np.float64)


@pytest.mark.parametrize(("n_s", "n_r", "d"), FP64_SHAPES)
def test_fit_matches_numpy_scipy_pipeline_fp64(n_s, n_r, d):
    xs, xr = _fp64_planted(n_s, n_r, d)
    k, lam, filt, _, cs = _oracle(xs, xr, 0.95, 0.05)
    with jax.enable_x64(True):
        res = fit(xs, xr, config=GEDConfig(**FP64_CONFIG))
        assert res.eigenvalues.dtype == jnp.float64
    assert res.n_components == k < d
    # S is rank-deficient in the dual case: its null directions have eigenvalues ~1e-15
    np.testing.assert_allclose(res.eigenvalues, lam, rtol=1e-5, atol=1e-10 * lam[0])
    f = np.asarray(res.filters)
    signs = np.sign(np.sum(f * filt, axis=0))
    m = int(np.sum(lam > 1e-8 * lam[0]))  # past that, a degenerate (null of S) eigenspace
    np.testing.assert_allclose(f[:, :m], (filt * signs)[:, :m], rtol=1e-5, atol=1e-9)
    w, p = np.asarray(res.eigvecs), np.asarray(res.basis)
    np.testing.assert_allclose(p @ w, f, atol=1e-12)
    r_red = p.T @ np.cov(xr, rowvar=False) @ p  # our basis: the oracle's up to column signs
    rt = 0.95 * r_red + 0.05 * np.trace(r_red) / k * np.eye(k)
    np.testing.assert_allclose(w.T @ rt @ w, np.eye(k), atol=1e-9)
    maps = np.asarray(res.maps)
    np.testing.assert_allclose(maps, cs @ f, rtol=1e-6, atol=1e-9)
    top = np.argmax(np.abs(maps), axis=0)
    assert np.all(maps[top, np.arange(k)] > 0)
    np.testing.assert_allclose(
        res.scores_s, (xs - (xs.mean(0) + xr.mean(0)) / 2) @ f, rtol=1e-6, atol=1e-9
    )
    # the swap: R as signal, S (shrunk) as reference
    cr = np.cov(xr, rowvar=False)
    s_red = p.T @ cs @ p
    st = 0.95 * s_red + 0.05 * np.trace(s_red) / k * np.eye(k)
    ref = scipy.linalg.eigh(p.T @ cr @ p, st, eigvals_only=True)[::-1]
    np.testing.assert_allclose(res.swapped.eigenvalues, ref, rtol=1e-5, atol=1e-10 * ref[0])
    assert json.loads(json.dumps(res.to_json()))["swapped"]["n_components"] == k


# --------------------------------------------------------------------------- planted / null


def test_planted_component_recovered_and_significant():
    rng = np.random.default_rng(3)
    xs, xr, u = _planted(rng)
    cfg = GEDConfig(n_permutations=199)
    res = fit(xs, xr, config=cfg)
    assert _abs_cos(res.maps[:, 0], u) > 0.9  # the pattern is the planted direction
    # the filter is not (Haufe et al. 2014): it is the noise-whitened R^-1 u
    assert _abs_cos(res.filters[:, 0], np.linalg.solve(np.cov(xr, rowvar=False), u)) > 0.9
    assert float(res.eigenvalues[0]) > 3 * float(res.eigenvalues[1])
    assert float(res.swapped.eigenvalues[0]) < float(res.eigenvalues[0]) / 3
    # the fit's PCA basis (test_permutation_edges checks result= against a fresh fit)
    null, p = permutation_test(xs, xr, config=cfg, result=res)
    assert null.shape == (199,)
    assert p == pytest.approx(1 / 200)
    assert np.all(np.isfinite(null))


def test_null_case_mostly_not_significant():
    hits = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        xs, xr, _ = _planted(rng, n_s=60, n_r=60, d=8, amp=0.0)
        cfg = GEDConfig(variance_threshold=1.0, n_permutations=99, seed=seed)
        _, p = permutation_test(xs, xr, config=cfg)
        assert 0 < p <= 1
        hits += p < 0.05
    assert hits <= 2


def _shifted():
    """Two conditions with a planted shift on a large common mean (the float32 cancellation
    case), shared by the permutation tests below so that they share compiled programs."""
    rng = np.random.default_rng(14)
    xs, xr, _ = _planted(rng, n_s=50, n_r=40, d=10, shift=5.0)
    return xs + 20.0, xr + 20.0


def test_permutation_edges():
    xs, xr = _shifted()
    null, p = permutation_test(xs, xr, config=GEDConfig(n_permutations=0))
    assert null.shape == (0,) and p == 1.0
    cfg = GEDConfig(n_permutations=30, seed=5)
    a = permutation_test(xs, xr, config=cfg)
    res = fit(xs, xr, config=cfg, swap=False)
    b = permutation_test(xs, xr, config=cfg, result=res)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    with pytest.raises(UserError, match="other activations"):
        permutation_test(xs[:10], xr, config=cfg, result=res)


@pytest.mark.parametrize("center", [True, False])
def test_permutation_moments_path_matches_gather_path(center):
    """The fast null (sufficient statistics, one GEMM) equals the plain gather-and-refit one."""
    from jcompress.ged.fit import _permutation_from_fit

    xs, xr = _shifted()
    cfg = GEDConfig(n_permutations=30, center=center)
    res = fit(xs, xr, config=cfg, swap=False)
    fast, p_fast = _permutation_from_fit(xs, xr, res, cfg, moments=True)
    slow, p_slow = _permutation_from_fit(xs, xr, res, cfg, moments=False)
    np.testing.assert_allclose(fast, slow, rtol=2e-3)
    assert p_fast == p_slow


# --------------------------------------------------------------------------- PCA count


def test_n_components_exact_threshold():
    ev = np.array([5.0, 3.0, 1.0, 1.0, 0.0, 0.0])  # cumulative 0.5, 0.8, 0.9, 1.0
    assert n_components_for_threshold(ev, 0.9) == 3  # reaching exactly counts
    assert n_components_for_threshold(ev, 0.9 + 1e-4) == 4
    assert n_components_for_threshold(ev, 0.8) == 2
    assert n_components_for_threshold(ev, 0.5) == 1
    assert n_components_for_threshold(ev, 0.49) == 1
    assert n_components_for_threshold(ev, 1.0) == 4  # stops at the rank
    assert n_components_for_threshold(ev * (1 + 1e-7), 0.9) == 3
    with pytest.raises(UserError, match="zero variance"):
        n_components_for_threshold(np.zeros(3), 0.5)


def test_fit_threshold_boundary_hand_built_spectrum():
    """Data whose mean covariance has eigenvalues exactly proportional to 5, 3, 1, 1, 0, 0
    (in a random rotation): a threshold of 0.9 keeps 3 components."""
    d = 6
    spec = np.array([5.0, 3.0, 1.0, 1.0, 0.0, 0.0])
    e = np.diag(np.sqrt(spec))
    x = np.concatenate([e, -e])  # zero mean, covariance diag(spec) * 2 / (2d - 1)
    q, _ = np.linalg.qr(np.random.default_rng(5).normal(size=(d, d)))
    x = (x @ q.T).astype(np.float32)
    res = fit(x, x, config=GEDConfig(variance_threshold=0.9))
    assert res.n_components == 3
    np.testing.assert_allclose(np.asarray(res.explained)[:4], spec[:4] / 10, atol=1e-6)


# --------------------------------------------------------------------------- shrinkage / rank


def _few_reference_samples():
    """The seed's situation in small: many neurons, few reference samples, so after PCA the
    reference covariance has rank < n_components (52 < 63 there)."""
    rng = np.random.default_rng(7)
    return _planted(rng, n_s=80, n_r=14, d=96)


def test_rank_deficient_reference_without_shrinkage_is_a_clear_error():
    xs, xr, _ = _few_reference_samples()
    with pytest.raises(UserError, match=r"not positive definite.*shrinkage") as e:
        fit(xs, xr, config=GEDConfig(shrinkage=0.0))
    assert "\n" not in str(e.value)


def test_shrinkage_lifts_rank_like_the_seed():
    """:func:`_few_reference_samples`: g = 0.01 makes the reference covariance full rank."""
    xs, xr, _ = _few_reference_samples()
    n_r = xr.shape[0]
    res = fit(xs, xr, config=GEDConfig(shrinkage=0.01))
    k = res.n_components
    assert int(res.rank_r_before) == n_r - 1 < k
    assert int(res.rank_r_after) == k
    assert np.all(np.isfinite(res.eigenvalues))
    shrink = jax.jit(core.shrink_core)  # one program, not one per op
    np.testing.assert_allclose(
        np.asarray(res.eigvecs).T
        @ np.asarray(
            shrink(np.asarray(res.basis).T @ np.cov(xr, rowvar=False) @ np.asarray(res.basis), 0.01)
        )
        @ np.asarray(res.eigvecs),
        np.eye(k),
        atol=2e-3,
    )
    lw = fit(xs, xr, config=GEDConfig(shrinkage="ledoit_wolf"))
    assert 0.01 < float(lw.shrinkage) <= 1 and int(lw.rank_r_after) == lw.n_components


def test_ledoit_wolf_matches_definition():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(30, 5)) * np.array([3.0, 1, 1, 0.5, 0.2])
    xc = x - x.mean(0)
    n, p = xc.shape
    sig = xc.T @ xc / n
    mu = np.trace(sig) / p
    delta = np.sum((sig - mu * np.eye(p)) ** 2) / p
    beta = sum(np.sum((np.outer(v, v) - sig) ** 2) for v in xc) / (n * n * p)
    with jax.enable_x64(True):
        g = float(jax.jit(core.ledoit_wolf_core)(jnp.asarray(x)))
    assert g == pytest.approx(min(beta, delta) / delta, rel=1e-9)


def test_rank_core_matches_numpy():
    rng = np.random.default_rng(9)
    a = rng.normal(size=(10, 4))
    m = (a @ a.T).astype(np.float32)
    assert int(jax.jit(core.rank_core)(m)) == np.linalg.matrix_rank(m) == 4


# --------------------------------------------------------------------------- held-out / layers


def test_cross_validate_separates_planted_shift():
    rng = np.random.default_rng(10)
    xs, xr, _ = _planted(rng, n_s=100, n_r=90, d=16, amp=1.0, shift=3.0)  # uneven R folds
    cv = cross_validate(xs, xr, config=GEDConfig(center=False, n_folds=4))
    assert len(cv.fold_accuracy) == 4 and sum(cv.fold_sizes) == 190
    assert cv.accuracy > 0.9 and cv.cohens_d > 2
    assert cv.scores_s.shape == (100,) and cv.scores_r.shape == (90,)
    with pytest.raises(UserError, match="n_folds"):
        cross_validate(xs[:3], xr, config=GEDConfig(n_folds=4))


@pytest.fixture(scope="module")
def layer_table():
    """Three layers, the middle one with a planted shift, through :func:`fit_layers`: checked
    in test_fit_layers_table and drawn in test_figures_written (one computation for both)."""
    rng = np.random.default_rng(11)
    layers = [_planted(rng, n_s=60, n_r=60, d=10, amp=a, shift=a) for a in (0.0, 3.0, 0.0)]
    xs = np.stack([l[0] for l in layers])
    xr = np.stack([l[1] for l in layers])
    cfg = GEDConfig(n_permutations=49, n_folds=3, center=False)
    return xs, xr, cfg, fit_layers(xs, xr, config=cfg)


def test_fit_layers_table(layer_table):
    xs, xr, cfg, table = layer_table
    assert table.top_eigenvalue.shape == (3,) and len(table.results) == 3
    assert table.p_value[1] == pytest.approx(1 / 50)
    assert np.argmax(table.top_eigenvalue) == 1 and np.argmax(table.accuracy) == 1
    ref = fit(xs[1], xr[1], config=cfg, swap=False)  # as fit_layers fits: its programs
    np.testing.assert_allclose(table.results[1].eigenvalues, ref.eigenvalues, rtol=1e-4)
    assert len(json.loads(json.dumps(table.to_json()))["layers"]) == 3
    with pytest.raises(UserError, match="disagree"):
        fit_layers(xs, xr[:2], config=cfg)


def test_fit_layers_fixed_k_is_one_vmapped_call_equal_to_per_layer_fits():
    rng = np.random.default_rng(13)
    layers = [_planted(rng, n_s=50, n_r=50, d=9, amp=a, shift=a) for a in (0.5, 3.0)]
    xs = np.stack([l[0] for l in layers])
    xr = np.stack([l[1] for l in layers])
    cfg = GEDConfig(n_permutations=19, n_folds=2, n_components=5)
    table = fit_layers(xs, xr, config=cfg, swap=True)
    assert list(table.n_components) == [5, 5]
    for i in range(2):
        ref = fit(xs[i], xr[i], config=cfg, swap=True)
        np.testing.assert_allclose(table.results[i].eigenvalues, ref.eigenvalues, rtol=1e-4)
        np.testing.assert_allclose(
            table.results[i].swapped.eigenvalues, ref.swapped.eigenvalues, rtol=1e-4
        )
        dots = np.abs(np.sum(np.asarray(table.results[i].filters) * np.asarray(ref.filters), 0))
        norms = np.linalg.norm(ref.filters, axis=0) * np.linalg.norm(
            table.results[i].filters, axis=0
        )
        np.testing.assert_allclose(dots / norms, 1.0, atol=1e-4)  # same filters up to sign
    with pytest.raises(UserError, match="n_components"):
        fit_layers(xs[:, :3], xr[:, :3], config=GEDConfig(n_components=6, n_permutations=0))


# --------------------------------------------------------------------------- figures


def test_figures_written(tmp_path, layer_table):
    *_, table = layer_table
    res = table.results[1]  # the planted layer
    cv = table.cvs[1]  # fit_layers' cross_validate(xs[1], xr[1], config=cfg)
    paths = [
        ged_figures.scree(res, tmp_path / "scree.png", threshold=0.9),
        ged_figures.spectrum_vs_null(res, table.nulls[1], tmp_path / "null.png", p_value=0.05),
        ged_figures.score_histograms(cv, tmp_path / "sub" / "hist.png", labels=("him", "her")),
        ged_figures.top_neurons(res, tmp_path / "top.png", k=5),
        ged_figures.layer_summary(table, tmp_path / "layers.png"),
    ]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- pronoun data


def test_pronoun_files_paired_and_marked():
    him, her = load_condition_file(HIM_FILE), load_condition_file(HER_FILE)
    assert len(him) == len(her) >= 150
    assert len({t for t, _ in him}) == len(him)  # no duplicate sentences
    for (th, (a, b)), (tr, (c, d)) in zip(him, her, strict=True):
        assert th[a:b] == "him" and tr[c:d] == "her"
        assert th[:a] == tr[:c] and th[b:] == tr[d:]  # same frame
    starts = {a == 0 for _, (a, _b) in him}
    ends = {th[b:].strip() in {".", "?", ""} for th, (_a, b) in him}
    assert ends == {True, False} and starts == {False}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("", "empty"),
        ("# only a comment\n\n", "empty"),
        ("I saw [him] here.\nno target on this line\n", r"bad\.txt:2: expected exactly one"),
        ("I saw [him] and [her].\n", r"bad\.txt:1: .*found 2"),
        ("I saw [him there.\n", r"bad\.txt:1: .*stray"),
        ("I saw [ ] there.\n", r"bad\.txt:1: "),
    ],
)
def test_condition_file_errors(tmp_path, body, match):
    p = tmp_path / "bad.txt"
    p.write_text(body)
    with pytest.raises(UserError, match=match) as e:
        load_condition_file(p)
    assert "\n" not in str(e.value)


def test_condition_file_spans(tmp_path):
    p = tmp_path / "ok.txt"
    p.write_text("# header\n  [Him], I trust.  \nWe thanked [her].\n")
    ex = load_condition_file(p)
    assert ex[0].text == "Him, I trust." and ex[0].span == (0, 3)
    assert ex[1].text[slice(*ex[1].span)] == "her"
    with pytest.raises(UserError, match="cannot read"):
        load_condition_file(tmp_path / "missing.txt")


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"variance_threshold": 0.0}, "variance_threshold"),
        ({"variance_threshold": 1.5}, "variance_threshold"),
        ({"variance_threshold": "0.9"}, "variance_threshold"),
        ({"shrinkage": 1.0}, "shrinkage"),
        ({"shrinkage": -0.1}, "shrinkage"),
        ({"shrinkage": float("nan")}, "shrinkage"),
        ({"shrinkage": "oas"}, "shrinkage"),
        ({"n_permutations": -1}, "n_permutations"),
        ({"n_permutations": 10.0}, "n_permutations"),
        ({"n_folds": 1}, "n_folds"),
        ({"seed": 1.5}, "seed"),
        ({"center": 1}, "center"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(UserError, match=rf"GEDConfig\.{field} must") as e:
        GEDConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_config_accepts_edges_and_is_hashable():
    for kw in (
        {"variance_threshold": 1.0},
        {"shrinkage": 0.0},
        {"shrinkage": "ledoit_wolf"},
        {"n_permutations": 0},
        {"n_folds": 2},
    ):
        hash(GEDConfig(**kw))
    with pytest.raises(TypeError):
        GEDConfig(0.9)  # keyword-only


def test_dual_pca_matches_primal_fp64():
    """N < D: the Gram-matrix PCA gives the covariance PCA (eigenvalues, top vectors)."""
    rng = np.random.default_rng(13)
    xs, xr = rng.normal(size=(9, 30)), rng.normal(size=(7, 30)) + 1.0
    with jax.enable_x64(True):
        y = jax.jit(core.pooled_factor_core)(jnp.asarray(xs), jnp.asarray(xr))  # jit: one program
        ev, vec = jax.jit(core.pca_dual_core)(y)  # each, not one per op
        ref_cov = (np.cov(xs, rowvar=False) + np.cov(xr, rowvar=False)) / 2
        ref_ev, ref_vec = jax.jit(core.pca_core)(ref_cov)
    ev, vec, ref_ev, ref_vec = map(np.asarray, (ev, vec, ref_ev, ref_vec))
    assert ev.shape == (30,) and vec.shape == (30, 16)
    np.testing.assert_allclose(ev, np.where(ref_ev > 1e-10, ref_ev, 0.0), atol=1e-10)
    np.testing.assert_allclose(vec[:, :14], ref_vec[:, :14], atol=1e-8)  # rank 14 = 8 + 6
    assert np.all(vec[:, 14:] == 0)


@pytest.mark.parametrize("threshold", [0.9, 0.999])  # fits the first block / needs growing
def test_iterative_pca_matches_scipy_pipeline_fp64(monkeypatch, threshold):
    """N >= D: the subspace-iteration PCA (small block so that D = 96 takes that path, and
    the full eigh forbidden) gives the tutorial pipeline's K, eigenvalues and filters."""
    import importlib

    fit_mod = importlib.import_module("jcompress.ged.fit")

    monkeypatch.setattr(fit_mod, "ITERATIVE_MIN_D", 32)
    monkeypatch.setattr(fit_mod, "_BLOCK", 8)
    monkeypatch.setattr(fit_mod, "_OVERSAMPLE", 4)

    def no_full(y):
        raise AssertionError("full eigh used")

    monkeypatch.setattr(fit_mod, "_full_pca", no_full)
    rng = np.random.default_rng(21)
    d, n, r = 96, 150, 10
    mix = rng.normal(size=(r, d))
    scales = np.geomspace(3.0, 0.5, r)

    def cond():
        return (rng.normal(size=(n, r)) * scales) @ mix + 0.01 * rng.normal(size=(n, d))

    xs, xr = cond(), cond()
    xs += 2.0 * rng.normal(size=(n, 1)) * mix[4] / np.linalg.norm(mix[4])
    k, lam, filt, _, _ = _oracle(xs, xr, threshold, 0.01)
    with jax.enable_x64(True):
        res = fit(xs, xr, config=GEDConfig(variance_threshold=threshold))
    assert res.n_components == k
    np.testing.assert_allclose(res.eigenvalues, lam, rtol=1e-5)
    f = np.asarray(res.filters)
    signs = np.sign(np.sum(f * filt, axis=0))
    np.testing.assert_allclose(f, filt * signs, rtol=1e-5, atol=1e-8 * np.abs(filt).max())
    ev = np.linalg.eigvalsh((np.cov(xs, rowvar=False) + np.cov(xr, rowvar=False)) / 2)[::-1]
    np.testing.assert_allclose(np.asarray(res.explained)[:k], ev[:k] / ev.sum(), rtol=1e-8)


# --------------------------------------------------------------------------- fixed K: jit, vmap


def _same_fit(a, b, rtol=1e-5):
    """Two fits agree: K, eigenvalues (both directions), filters up to sign, ranks."""
    assert a.n_components == b.n_components
    for x, y in ((a, b), (a.swapped, b.swapped)):
        lam = np.asarray(x.eigenvalues)
        np.testing.assert_allclose(y.eigenvalues, lam, rtol=rtol, atol=1e-9 * lam[0])
        fa, fb = np.asarray(x.filters), np.asarray(y.filters)
        m = int(np.sum(lam > 1e-6 * lam[0]))  # past that, the degenerate null of S
        signs = np.sign(np.sum(fa * fb, axis=0))[:m]
        np.testing.assert_allclose(fb[:, :m] * signs, fa[:, :m], rtol=rtol, atol=1e-7)
        assert int(x.rank_r_before) == int(y.rank_r_before)
        assert int(x.rank_r_after) == int(y.rank_r_after)
    k = a.n_components
    np.testing.assert_allclose(np.asarray(b.explained)[:k], np.asarray(a.explained)[:k], rtol=rtol)


@pytest.mark.parametrize(("n_s", "n_r", "d"), FP64_SHAPES)
def test_fixed_k_jit_matches_eager_and_threshold_fit_fp64(n_s, n_r, d):
    """``jax.jit(partial(fit, config=GEDConfig(n_components=K)))`` == the eager fixed-K fit ==
    the threshold fit that picks the same K == the numpy/scipy pipeline."""
    import functools

    xs, xr = _fp64_planted(n_s, n_r, d)
    with jax.enable_x64(True):
        by_threshold = fit(xs, xr, config=GEDConfig(**FP64_CONFIG))
        k = by_threshold.n_components
        cfg = GEDConfig(n_components=k, shrinkage=FP64_CONFIG["shrinkage"])
        eager = fit(xs, xr, config=cfg)
        jitted = jax.jit(functools.partial(fit, config=cfg))(xs, xr)
        assert jitted.eigenvalues.dtype == jnp.float64
    assert 1 < k < d
    _same_fit(by_threshold, eager)
    _same_fit(eager, jitted)
    k_ref, lam, filt, _, _ = _oracle(xs, xr, 0.95, 0.05)
    assert k_ref == k
    np.testing.assert_allclose(jitted.eigenvalues, lam, rtol=1e-5, atol=1e-10 * lam[0])
    f = np.asarray(jitted.filters)
    signs = np.sign(np.sum(f * filt, axis=0))
    np.testing.assert_allclose(f[:, :2], (filt * signs)[:, :2], rtol=1e-5, atol=1e-9)


def test_fixed_k_bounds_and_tracing_errors():
    import functools

    rng = np.random.default_rng(32)
    xs, xr = rng.normal(size=(6, 20)), rng.normal(size=(5, 20))
    # centered: 6 + 5 - 2 = 9 components at most; uncentered 11
    with pytest.raises(UserError, match=r"n_components=10 exceeds the 9 components") as e:
        fit(xs, xr, config=GEDConfig(n_components=10))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"n_components=12 exceeds the 11 components"):
        fit(xs, xr, config=GEDConfig(n_components=12, center=False))
    fit(xs, xr, config=GEDConfig(n_components=9))  # the bound itself is fine
    with pytest.raises(UserError, match=r"n_components=10 exceeds"):  # shapes: also traced
        jax.jit(functools.partial(fit, config=GEDConfig(n_components=10)))(xs, xr)
    # the data span 3 directions only (+ each condition's mean: centered away)
    basis = rng.normal(size=(3, 20))  # in xs, xr's shapes: their compiled programs
    low_s, low_r = rng.normal(size=(6, 3)) @ basis, rng.normal(size=(5, 3)) @ basis
    with pytest.raises(UserError, match=r"span only 3 principal components"):
        fit(low_s, low_r, config=GEDConfig(n_components=4))
    # the threshold picks K on the host: not traceable, one clear error
    with pytest.raises(UserError, match=r"needs a fixed GEDConfig\.n_components"):
        jax.jit(functools.partial(fit, config=GEDConfig()))(xs, xr)
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(UserError, match=r"GEDConfig\.n_components must be a positive"):
            GEDConfig(n_components=bad)


def test_fixed_k_jit_vmaps_over_layers_fp64():
    """The issue's "vmap where shapes agree": one jitted, vmapped fit over a [L, N, D] stack
    equals the per-layer eager fits."""
    import functools

    rng = np.random.default_rng(33)
    layers = [_planted(rng, n_s=12, n_r=10, d=30, amp=2.0 + i)[:2] for i in range(3)]
    xs = np.stack([a for a, _ in layers]).astype(np.float64)
    xr = np.stack([b for _, b in layers]).astype(np.float64)
    cfg = GEDConfig(n_components=6, shrinkage=0.05)
    with jax.enable_x64(True):
        batched = jax.vmap(jax.jit(functools.partial(fit, config=cfg)))(xs, xr)
        per_layer = [fit(xs[i], xr[i], config=cfg) for i in range(3)]
    assert batched.eigenvalues.shape == (3, 6) and batched.filters.shape == (3, 30, 6)
    assert batched.swapped.scores_s.shape == (3, 10, 6)
    for i, ref in enumerate(per_layer):
        _same_fit(ref, jax.tree.map(lambda a, i=i: np.asarray(a)[i], batched))
