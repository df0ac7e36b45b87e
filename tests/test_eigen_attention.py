"""EigenAttention (``jcompress.eigen_attention``): per-head low-rank K/Q/V projections.

Three kinds of checks:

* the single-matrix math of ``eigen_core`` on constructed inputs (Gram route == SVD route,
  vmap == loop, the rank rule on hand-made spectra);
* ``compress`` on the two trained models against an independent numpy oracle: layer inputs
  from ``embed`` + ``apply_layer`` of the uncompressed model, k/q/v features captured and
  averaged ``avg_dim`` windows at a time, per-head float64 SVDs, the reference's rank rule and
  threshold walk, and relative layer-output errors of layers rebuilt from those bases;
* ``compress`` on tiny random models of every family: report, typed leaves, latent KV cache,
  generation, and dense-equivalent export run by transformers.

One compress run per (model, setting) is shared through module-scoped fixtures; calibration is
16 windows of 128 tokens (real models) or 8 x 16 random ids (tiny models).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from _tiny import make_model
from hypothesis import given, settings
from hypothesis import strategies as st

import jcompress
from jcompress import data
from jcompress.eigen_attention import EigenAttentionConfig, compress, family_defaults
from jcompress.eigen_attention import eigen_core as core
from jcompress.leaves import HeadFoldedOut, HeadLatentBias, HeadLowRank
from jcompress.models import init_cache
from jcompress.models.convert import flatten, get_path, unflatten
from jcompress.models.families import spec_for

NS, SL = 16, 128  # calibration windows of the real models
STEP = 0.02
BUDGET, BIG_BUDGET = 0.025, 0.1
TOL = 1e-4  # fp32 logit parity
# The reference's per-family walk settings (start threshold, min threshold, min total rank,
# min total-rank fraction of heads * head_dim), written out here rather than read from
# ``family_defaults`` so the walk oracle does not share the code it checks.
REF_WALK = {
    "llama": (1.0, 0.0, 0, 0.45),
    "qwen2": (1.0, 0.0, 0, 0.45),
    "qwen3": (1.0, 0.0, 0, 0.45),
    "opt": (0.98, 0.3, 64, 0.0),
    "mpt": (0.98, 0.3, 0, 0.0),
    "gpt2": (0.98, 0.3, 0, 0.0),
}
ROPE = ("llama", "qwen2", "qwen3")


def _lay(cfg):
    return spec_for(cfg.family.value).layout


def _flip(u: np.ndarray) -> np.ndarray:
    """svd_flip convention on columns: the largest-|.| entry of each column is positive."""
    idx = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[idx, np.arange(u.shape[1])])
    return u * np.where(signs == 0, 1.0, signs)[None, :]


# --------------------------------------------------------------------------- eigen_core math


@jax.jit
def _both_routes(x):
    """(Gram route, SVD route) in one compilation per shape (eager ops compile one by one)."""
    return core.basis_core(core.gram_core(x)), core.basis_from_features_core(x)


def _features(n: int, d: int, rank: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``X [n, d]`` of the given rank with well-separated singular values ``scale * 0.7**j``."""
    rng = np.random.default_rng(seed)
    a, _ = np.linalg.qr(rng.normal(size=(n, n)))
    b, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sv = scale * 0.7 ** np.arange(rank)
    x = (a[:, :rank] * sv) @ b[:, :rank].T
    return x.astype(np.float32), sv


@settings(max_examples=25, deadline=None)
@given(  # few distinct shapes (one compilation each): n < d, n == d, n > d, d == 1
    n=st.sampled_from([1, 3, 8, 12]),
    d=st.sampled_from([1, 4, 8]),
    rank_frac=st.floats(0.0, 1.0),
    scale=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_gram_route_equals_svd_route(n, d, rank_frac, scale, seed):
    rank = int(round(rank_frac * min(n, d)))  # 0 .. min(n, d): rank-deficient and n < d included
    x, sv = _features(n, d, rank, scale, seed)
    (u_g, s_g), (u_s, s_s) = jax.tree.map(np.asarray, _both_routes(jnp.asarray(x)))
    assert u_g.shape == u_s.shape == (d, d) and s_g.shape == s_s.shape == (d,)
    want = np.zeros(d)
    want[:rank] = sv
    # the Gram route squares the spectrum: zeros come back as ~sqrt(eps) * s_max
    np.testing.assert_allclose(s_s, want, atol=1e-5 * scale)
    np.testing.assert_allclose(s_g, want, atol=2e-3 * scale)
    assert np.all(np.diff(s_g) <= 1e-6 * scale) and np.all(np.diff(s_s) <= 1e-6 * scale)
    for u in (u_g, u_s):  # orthonormal, deterministic signs
        np.testing.assert_allclose(u.T @ u, np.eye(d), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(core._flip_signs(jnp.asarray(u))), u)
        big = np.abs(u).argmax(0)
        assert np.all(u[big, np.arange(d)] > 0)
    # bases agree on the range of X (the null space basis is arbitrary)
    for j in range(rank):
        col_g, col_s = u_g[:, j], u_s[:, j]
        top2 = np.sort(np.abs(np.append(col_s, 0.0)))[-2:]
        if top2[1] - top2[0] > 1e-3:  # sign convention decides unambiguously
            np.testing.assert_allclose(col_g, col_s, atol=1e-3)
        else:
            assert abs(abs(col_g @ col_s) - 1) < 1e-4


@pytest.mark.parametrize("n,d", [(40, 8), (3, 8), (8, 8)])
def test_gram_route_on_unstructured_features(n, d):
    """Gaussian features (n < d too) plus a duplicated column (rank deficiency)."""
    rng = np.random.default_rng(n * 100 + d)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, -1] = x[:, 0]
    u_g, s_g = (np.asarray(a) for a in core.basis_core(core.gram_core(jnp.asarray(x))))
    _, s_ref, vt = np.linalg.svd(x.astype(np.float64))
    want = np.zeros(d)
    want[: s_ref.size] = s_ref
    np.testing.assert_allclose(s_g, want, atol=2e-3 * want[0])
    u_ref = _flip(vt.T)
    r = int(np.sum(want > 1e-3 * want[0]))
    gaps = -np.diff(want**2) / want[0] ** 2
    for j in range(r):
        if min(gaps[j], gaps[j - 1] if j else np.inf) > 1e-3:
            assert abs(abs(u_g[:, j] @ u_ref[:, j]) - 1) < 1e-4
    # the top-r subspace is the range of X^T
    np.testing.assert_allclose(u_g[:, :r] @ u_g[:, :r].T, u_ref[:, :r] @ u_ref[:, :r].T, atol=1e-4)


def test_head_gram_is_per_head_gram():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 12)).astype(np.float32))  # [B, T, heads * D]
    g = np.asarray(core.head_gram(x, 3))
    assert g.shape == (3, 4, 4)
    flat = np.asarray(x, np.float64).reshape(10, 12)
    for h in range(3):
        xh = flat[:, 4 * h : 4 * h + 4]
        np.testing.assert_allclose(g[h], xh.T @ xh, rtol=1e-5, atol=1e-5)


def test_head_bases_vmap_equals_loop():
    heads, d = 5, 8
    grams = []
    for h in range(heads):
        x, _ = _features(20, d, d - (h % 3), 1.0 + h, seed=h)  # some heads rank-deficient
        grams.append(np.asarray(core.gram_core(jnp.asarray(x))))
    grams = jnp.asarray(np.stack(grams))
    u, s = core.head_bases(grams)
    assert u.shape == (heads, d, d) and s.shape == (heads, d)
    for h in range(heads):
        u_h, s_h = core.basis_core(grams[h])
        np.testing.assert_allclose(np.asarray(s[h]), np.asarray(s_h), rtol=1e-5, atol=1e-5)
        r = d - (h % 3)  # null-space vectors are arbitrary
        np.testing.assert_allclose(np.asarray(u[h])[:, :r], np.asarray(u_h)[:, :r], atol=1e-4)


def test_spectrum_fraction():
    f = np.asarray(core.spectrum_fraction_core(jnp.asarray([4.0, 3.0, 2.0, 1.0])))
    np.testing.assert_allclose(f, [0.4, 0.3, 0.2, 0.1], rtol=1e-6)
    # singular values, not their squares: energy fractions would be [16, 9, 4, 1] / 30
    z = np.asarray(core.spectrum_fraction_core(jnp.zeros(3)))
    np.testing.assert_array_equal(z, np.zeros(3))  # an all-zero spectrum gives no NaN


def test_count_below_is_strict():
    f = core.spectrum_fraction_core(jnp.asarray([4.0, 3.0, 2.0, 1.0]))
    assert int(core.count_below_core(f, 0.75)) == 2  # 0.4, 0.7 < 0.75 <= 0.9
    assert int(core.count_below_core(f, 0.95)) == 3
    assert int(core.count_below_core(f, 0.1)) == 0
    # exact boundaries (dyadic fractions: cumsum 0.5, 0.75, 1.0 exactly in float32)
    g = core.spectrum_fraction_core(jnp.asarray([2.0, 1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(jnp.cumsum(g)), [0.5, 0.75, 1.0])
    assert int(core.count_below_core(g, 0.5)) == 0
    assert int(core.count_below_core(g, 0.75)) == 1
    assert int(core.count_below_core(g, 0.7500001)) == 2
    assert int(core.count_below_core(g, 1.0)) == 2  # the crossing component is left out
    assert int(core.count_below_core(g, 1.5)) == 3


def test_rank_for_threshold_max_over_heads_at_least_one():
    # cumulative fractions: head 0 .5 .75 .875 1, head 1 .25 .5 .75 1 (exact in float32)
    fracs = jnp.asarray([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])
    assert core.rank_for_threshold(fracs, 0.8) == 3  # heads: 2, 3
    assert core.rank_for_threshold(fracs, 0.75) == 2  # heads: 1, 2 (strictly below)
    assert core.rank_for_threshold(fracs, 0.6) == 2  # heads: 1, 2
    assert core.rank_for_threshold(fracs, 0.5) == 1  # heads: 0, 1
    assert core.rank_for_threshold(fracs, 0.2) == 1  # heads: 0, 0 -> at least 1
    assert core.rank_for_threshold(fracs[::-1], 0.8) == 3  # order of heads does not matter
    assert isinstance(core.rank_for_threshold(fracs, 0.8), int)


# --------------------------------------------------------------------------- config checks


def test_config_validation():
    with pytest.raises(jcompress.UserError, match="avg_dim"):
        EigenAttentionConfig(nsamples=4, avg_dim=8)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(jcompress.UserError, match="avg_dim"):
            EigenAttentionConfig(avg_dim=bad)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(jcompress.UserError, match="error_budget"):
            EigenAttentionConfig(error_budget=bad)
    with pytest.raises(jcompress.UserError, match="layers"):
        EigenAttentionConfig(layers=("model/layers/(",))
    assert EigenAttentionConfig(nsamples=4, avg_dim=4).avg_dim == 4
    assert EigenAttentionConfig(layers="model/layers/1").layers == ("model/layers/1",)


def test_avg_dim_above_windows_rejected_before_any_work(llama):
    config = EigenAttentionConfig(nsamples=16, seqlen=SL, avg_dim=8)
    calib = llama.calib[:5]
    # params={}: any work (embedding, layers) would fail with KeyError, not UserError
    with pytest.raises(jcompress.UserError, match="avg_dim: 8 is larger than the 5"):
        compress({}, llama.cfg, calib, config=config, progress=False)
    with pytest.raises(jcompress.UserError, match="calib"):
        compress({}, llama.cfg, calib.astype(np.float32), config=config, progress=False)


def test_bounds_that_block_every_layer_rejected_before_any_work(llama, monkeypatch):
    """Settings under which no rank below full could pass are an error before the stream."""
    import sys

    mod = sys.modules["jcompress.eigen_attention.compress"]

    def no_stream(*a, **k):
        raise AssertionError("the layer stream started")

    monkeypatch.setattr(mod, "stream_layers", no_stream)
    cfg = llama.cfg  # llama-1m: 4 KV heads x 16; the largest total rank below full: 4 x 15
    assert (cfg.num_kv_heads, cfg.head_dim) == (4, 16)
    base = EigenAttentionConfig(nsamples=4, seqlen=SL, avg_dim=2)

    def run(**kw):
        compress(llama.params, cfg, llama.calib[:4], config=dataclasses.replace(base, **kw),
                 progress=False)  # fmt: skip

    bis = dict(rank_search="bisect")
    for kw, match in (
        (dict(min_rank=60, **bis), r"min_rank: 60 leaves nothing .* from 60 on; allowed: .* < 60$"),
        (dict(min_rank_fraction=0.95, **bis), r"min_rank_fraction: 0.95 .* < 0.9375$"),
        (dict(start_threshold=0.5, min_threshold=0.6), "start_threshold: 0.5 is not above"),
    ):
        with pytest.raises(jcompress.UserError, match=match):
            run(**kw)
    # just inside the bounds, or the threshold walk (which keeps its first threshold whatever
    # the bounds): allowed (the stream starts)
    inside = (
        dict(min_rank=59, **bis),
        dict(min_rank_fraction=0.93, **bis),
        dict(min_rank=64),
        dict(start_threshold=0.7, min_threshold=0.6),
    )
    for kw in inside:
        with pytest.raises(AssertionError, match="layer stream started"):
            run(**kw)
    # thresholds mean nothing to the bisection
    with pytest.raises(jcompress.UserError, match="start_threshold: only used by rank_search"):
        EigenAttentionConfig(rank_search="bisect", start_threshold=0.9)
    with pytest.raises(jcompress.UserError, match="threshold_step: only used by rank_search"):
        EigenAttentionConfig(rank_search="bisect", threshold_step=0.05)
    assert EigenAttentionConfig(rank_search="bisect").threshold_step == 0.02  # the default


def test_family_defaults(llama, opt, tiny_models):
    base = EigenAttentionConfig()
    assert family_defaults(opt.cfg, base).start == 0.98
    assert family_defaults(llama.cfg, base).start == 1.0
    assert family_defaults(tiny_models["mpt"].cfg, base).start == 0.98
    assert family_defaults(tiny_models["qwen3"].cfg, base).start == 1.0
    for name, t in tiny_models.items():
        start, tmin, min_rank, frac = REF_WALK[name]
        dflt = family_defaults(t.cfg, base)
        assert (dflt.start, dflt.min_threshold, dflt.min_rank, dflt.min_rank_fraction) == (
            start,
            tmin,
            min_rank,
            frac,
        ), name
    over = EigenAttentionConfig(start_threshold=0.9, min_rank=3, min_threshold=0.1)
    d = family_defaults(llama.cfg, over)
    assert (d.start, d.min_rank, d.min_threshold) == (0.9, 3, 0.1)


# --------------------------------------------------------------------------- real models


def _load_real(model_dir, shared_data):
    cfg, params = jcompress.load_hf(model_dir)
    tok = data.load_tokenizer(model_dir)
    valid = data.load_tokens(shared_data / "wikitext-2" / "valid.txt", tok)
    # perplexity reads the first 10 windows of 256 tokens (consecutive, from the start): the
    # first 100k characters give those exact tokens, without tokenizing the whole file
    text = data.read_text(shared_data / "wikitext-2-raw" / "test.txt")
    test = data.tokenize(tok, text[:100_000])
    assert test.shape[0] > 10 * 256 + 1000
    calib = data.calibration_windows(valid, nsamples=NS, seqlen=SL, seed=2)
    return SimpleNamespace(
        name=cfg.family.value, dir=model_dir, cfg=cfg, params=params, calib=calib, test=test
    )


@pytest.fixture(scope="module")
def llama(llama_dir, shared_data):
    return _load_real(llama_dir, shared_data)


@pytest.fixture(scope="module")
def opt(opt_dir, shared_data):
    return _load_real(opt_dir, shared_data)


def _compress(model, calib=None, **kw):
    calib = model.calib if calib is None else calib
    config = EigenAttentionConfig(nsamples=calib.shape[0], seqlen=calib.shape[1], **kw)
    params, report = compress(model.params, model.cfg, calib, config=config, progress=False)
    return SimpleNamespace(params=params, report=report, config=config, calib=calib)


# Llama with avg_dim=1 (the reference's Llama setting), OPT with avg_dim=4 (4 groups of 4).
AVG = {"llama": 1, "opt": 4}


@pytest.fixture(scope="module")
def llama_run(llama):
    return _compress(llama, avg_dim=AVG["llama"], error_budget=BUDGET)


@pytest.fixture(scope="module")
def opt_run(opt):
    return _compress(opt, avg_dim=AVG["opt"], error_budget=BUDGET)


@pytest.fixture(scope="module")
def llama_run_big(llama):
    return _compress(llama, avg_dim=AVG["llama"], error_budget=BIG_BUDGET)


@pytest.fixture(scope="module")
def opt_run_big(opt):
    return _compress(opt, avg_dim=AVG["opt"], error_budget=BIG_BUDGET)


@pytest.fixture(params=["llama", "opt"])
def real(request, llama, opt, llama_run, opt_run):
    model, run = {"llama": (llama, llama_run), "opt": (opt, opt_run)}[request.param]
    return model, run


# ---- the oracle: features, per-head float64 SVDs, rebuilt layers, layer-output errors


@dataclasses.dataclass
class LayerOracle:
    lp: dict
    h: jax.Array  # [n, T, H] calibration inputs of the layer (uncompressed model)
    y: np.ndarray  # [n, T, H] uncompressed outputs
    u: dict  # "kq" / "v" -> [kv_heads, D, D] right singular vectors (columns), svd_flip signs
    s: dict  # "kq" / "v" -> [kv_heads, D] singular values


def _head_svd(x: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    d = x.shape[1] // heads
    assert x.shape[0] >= d  # a complete basis from the thin SVD
    us, ss = [], []
    for xh in x.reshape(-1, heads, d).transpose(1, 0, 2):
        _, s, vt = np.linalg.svd(xh, full_matrices=False)
        us.append(_flip(vt.T))
        ss.append(s)
    return np.stack(us), np.stack(ss)


def _average(x: np.ndarray, avg_dim: int) -> np.ndarray:
    """``[n, T, C]`` -> rows of ``avg_dim``-window means, position by position: ``[g*T, C]``."""
    g = x.shape[0] // avg_dim
    return x[: g * avg_dim].reshape(g, avg_dim, *x.shape[1:]).mean(1).reshape(-1, x.shape[-1])


def _oracle(model, calib, avg_dim, layers=None) -> dict[int, LayerOracle]:
    cfg, lay = model.cfg, _lay(model.cfg)
    roles = (lay.k, lay.q, lay.v)
    cap = jcompress.Capture(outputs="|".join(re.escape(r) for r in roles))
    h = jcompress.embed(cfg, model.params, jnp.asarray(calib))
    out = {}
    for i in range(cfg.num_layers if layers is None else max(layers) + 1):
        lp = jcompress.layer_params(cfg, model.params, i)
        y, got = jcompress.apply_layer(cfg, lp, h, i, capture=cap)
        f = {r: _average(np.asarray(got["outputs"][r], np.float64), avg_dim) for r in roles}
        kq = f[lay.k] if cfg.family.value in ROPE else np.concatenate([f[lay.k], f[lay.q]])
        hk = cfg.num_kv_heads
        (u_kq, s_kq), (u_v, s_v) = _head_svd(kq, hk), _head_svd(f[lay.v], hk)
        out[i] = LayerOracle(
            lp, h, np.asarray(y, np.float64), {"kq": u_kq, "v": u_v}, {"kq": s_kq, "v": s_v}
        )
        h = y
    return out


@pytest.fixture(scope="module")
def llama_oracle(llama):
    return _oracle(llama, llama.calib, AVG["llama"])


@pytest.fixture(scope="module")
def opt_oracle(opt):
    return _oracle(opt, opt.calib, AVG["opt"])


def _project_dense(p: dict, u_r: np.ndarray) -> dict:
    """Dense-equivalent ``W_h U U^T`` (and ``b_h U U^T``) per head: the oracle's layer."""
    w = np.asarray(p["kernel"], np.float64)
    heads, d, _ = u_r.shape
    proj = np.einsum("hdr,her->hde", u_r, u_r)
    new = {"kernel": np.einsum("ihd,hde->ihe", w.reshape(w.shape[0], heads, d), proj)}
    new["kernel"] = jnp.asarray(new["kernel"].reshape(w.shape).astype(np.float32))
    if "bias" in p:
        b = np.einsum("hd,hde->he", np.asarray(p["bias"], np.float64).reshape(heads, d), proj)
        new["bias"] = jnp.asarray(b.reshape(-1).astype(np.float32))
    return new


def _oracle_layer(cfg, o: LayerOracle, r_kq: int, r_v: int) -> dict:
    lay = _lay(cfg)
    flat = flatten(o.lp)
    d_kq, d_v = o.u["kq"].shape[1], o.u["v"].shape[1]
    roles = [(lay.k, "kq", r_kq), (lay.v, "v", r_v)]
    if cfg.family.value not in ROPE:
        roles.append((lay.q, "kq", r_kq))
    for role, key, r in roles:
        if r < (d_kq if key == "kq" else d_v):
            for leaf, v in _project_dense(get_path(o.lp, role), o.u[key][:, :, :r]).items():
                flat[f"{role}/{leaf}"] = v
    return unflatten(flat)


def _rel_err(y: np.ndarray, y2) -> float:
    return float(np.linalg.norm(np.asarray(y2, np.float64) - y) / np.linalg.norm(y))


def _oracle_error(cfg, i, o: LayerOracle, r_kq, r_v) -> float:
    return _rel_err(o.y, jcompress.apply_layer(cfg, _oracle_layer(cfg, o, r_kq, r_v), o.h, i))


def _rank_range(s: np.ndarray, t: float, eps: float = 1e-5) -> range:
    """Ranks the reference rule gives at ``t`` (max over heads of the count of cumulative
    sigma-fractions strictly below ``t``, at least 1, at most D), allowing ``eps`` of rounding."""
    cum = np.cumsum(s / s.sum(1, keepdims=True), axis=1)
    d = s.shape[1]

    def r(tt):
        return min(max(int((cum < tt).sum(1).max()), 1), d)

    return range(r(t - eps), r(t + eps) + 1)


# ---- tests on the real models


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_streamed_gram_equals_stacked_svd(name, request):
    """The bases compress used (HeadLowRank ``b = U_h^T``) are the per-head SVD of the stacked,
    avg_dim-averaged features; the ranks follow the rule at the kept threshold."""
    model, run = request.getfixturevalue(name), request.getfixturevalue(f"{name}_run")
    oracle = request.getfixturevalue(f"{name}_oracle")
    _check_bases(model, run, oracle)


def _check_bases(model, run, oracle, layers=None):
    cfg, lay = model.cfg, _lay(model.cfg)
    checked = total = 0
    for lr in run.report.layers:
        if layers is not None and lr.layer not in layers:
            continue
        o = oracle[lr.layer]
        lp = jcompress.layer_params(cfg, run.params, lr.layer)
        assert lr.threshold is not None
        for key, r, role in (("kq", lr.rank_kq, lay.k), ("v", lr.rank_v, lay.v)):
            assert r in _rank_range(o.s[key], lr.threshold), (lr.layer, key, r)
            kernel = get_path(lp, role)["kernel"]
            if r == o.u[key].shape[1]:
                assert not isinstance(kernel, HeadLowRank)
                continue
            assert isinstance(kernel, HeadLowRank)
            b = np.asarray(kernel.b, np.float64)  # [heads, r, D]
            s, u = o.s[key], o.u[key]
            assert b.shape == (cfg.num_kv_heads, r, u.shape[1])
            for h in range(b.shape[0]):
                # sign convention on the stored basis vectors
                big = np.abs(b[h]).argmax(1)
                assert np.all(b[h][np.arange(r), big] > 0)
                gaps = -np.diff(s[h] ** 2) / s[h, 0] ** 2
                if gaps[r - 1] > 1e-4:  # the kept subspace is well defined
                    np.testing.assert_allclose(
                        b[h].T @ b[h], u[h, :, :r] @ u[h, :, :r].T, atol=1e-3
                    )
                for j in range(r):  # vectors with a distinct singular value: equal, signs too
                    total += 1
                    if min(gaps[j], gaps[j - 1] if j else np.inf) > 1e-3:
                        np.testing.assert_allclose(b[h, j], u[h, :, j], atol=5e-4)
                        checked += 1
    assert checked >= total / 2 > 0


def test_one_averaged_sequence(opt):
    """avg_dim == nsamples: all windows are averaged into one sequence."""
    run = _compress(opt, avg_dim=NS, error_budget=BUDGET, layers=("model/decoder/layers/0",))
    assert run.report.averaged_sequences == 1 and run.report.dropped_sequences == 0
    _check_bases(opt, run, _oracle(opt, opt.calib, NS, layers=[0]), layers=[0])


def test_avg_dim_remainder_warns_and_drops(opt):
    calib = opt.calib[:10]
    with pytest.warns(UserWarning, match="avg_dim=4 does not divide 10"):
        run = _compress(
            opt, calib, avg_dim=4, error_budget=BUDGET, layers=("model/decoder/layers/0",)
        )
    assert run.report.dropped_sequences == 2 and run.report.averaged_sequences == 2
    assert run.report.nsamples == 10
    # bases from windows 0..7 only (two groups of four); 8 and 9 are left out
    _check_bases(opt, run, _oracle(opt, calib[:8], 4, layers=[0]), layers=[0])


def test_error_budget_respected_and_recomputed(real, llama_oracle, opt_oracle):
    """Every layer's error is under the budget, and equals ||Y - Y'|| / ||Y|| recomputed with
    the compressed layer params on the layer's calibration inputs (``embed`` + ``apply_layer``
    of the uncompressed preceding layers, from the oracle)."""
    model, run = real
    cfg, rep = model.cfg, run.report
    oracle = {"llama": llama_oracle, "opt": opt_oracle}[model.name]
    assert len(rep.layers) == cfg.num_layers and rep.error_budget == BUDGET
    for lr in rep.layers:
        i, o = lr.layer, oracle[lr.layer]
        assert lr.compressed and 0 < lr.error < BUDGET, lr
        lp2 = jcompress.layer_params(cfg, run.params, i)
        # dense-equivalent kernels: same shapes as the original layer, no recompilation
        err = _rel_err(o.y, jcompress.apply_layer(cfg, jcompress.materialize(lp2), o.h, i))
        assert err == pytest.approx(lr.error, rel=2e-3, abs=1e-6), i
        if i == 0:  # the typed leaves (factored apply) give the same error
            typed = _rel_err(o.y, jcompress.apply_layer(cfg, lp2, o.h, i))
            assert typed == pytest.approx(err, rel=1e-3, abs=1e-6)


def test_threshold_walk_keeps_last_passing_threshold(real, llama_oracle, opt_oracle):
    """Walk oracle: every threshold from the start down to the kept one meets the budget (and,
    after the first, the rank bounds); the next one fails the budget or a bound, or is past
    the minimum threshold. Thresholds sit on the start - k * step grid."""
    model, run = real
    cfg = model.cfg
    oracle = {"llama": llama_oracle, "opt": opt_oracle}[model.name]
    start, tmin, min_rank, frac = REF_WALK[model.name]
    hk = cfg.num_kv_heads
    stops = {"error": 0, "bound": 0}
    for lr in run.report.layers:
        i, o = lr.layer, oracle[lr.layer]
        d_kq, d_v = o.u["kq"].shape[1], o.u["v"].shape[1]
        bound_kq, bound_v = max(min_rank, frac * hk * d_kq), max(min_rank, frac * hk * d_v)
        cache = {}

        def err(r_kq, r_v, i=i, o=o, cache=cache):
            if (r_kq, r_v) not in cache:
                cache[r_kq, r_v] = _oracle_error(cfg, i, o, r_kq, r_v)
            return cache[r_kq, r_v]

        def pairs(t, o=o):
            return list(itertools.product(_rank_range(o.s["kq"], t), _rank_range(o.s["v"], t)))

        k = round((start - lr.threshold) / STEP)
        assert k >= 0 and abs(start - k * STEP - lr.threshold) < 1e-6, lr.threshold
        for j in range(k + 1):
            t = start - j * STEP
            for r_kq, r_v in pairs(t):
                assert err(r_kq, r_v) < BUDGET * (1 + 1e-3), (i, t, r_kq, r_v)
                if j:
                    assert hk * r_kq > bound_kq and hk * r_v > bound_v, (i, t)
        assert err(lr.rank_kq, lr.rank_v) == pytest.approx(lr.error, rel=5e-3, abs=1e-6)
        t_next = lr.threshold - STEP
        if t_next <= tmin + 1e-9:
            continue
        for r_kq, r_v in pairs(t_next):
            if hk * r_kq <= bound_kq or hk * r_v <= bound_v:
                stops["bound"] += 1
            else:
                assert err(r_kq, r_v) >= BUDGET * (1 - 1e-3), (i, t_next, r_kq, r_v)
                stops["error"] += 1
    assert sum(stops.values()) > 0
    if model.name == "llama":  # at this budget the walk stops on the error in some layer
        assert stops["error"] > 0


def test_restart_one_step_below_kept_threshold(llama, llama_run, llama_run_big, llama_oracle):
    """compress with start_threshold = kept - step: the layer either stays dense (the error at
    that threshold's ranks is over budget) or keeps exactly that threshold (a rank bound, which
    is not checked at the first threshold, had stopped the walk)."""
    cfg = llama.cfg
    hk, d = cfg.num_kv_heads, cfg.head_dim
    seen = set()
    for budget, full in ((BUDGET, llama_run), (BIG_BUDGET, llama_run_big)):
        for lr in full.report.layers:
            t_next = round(lr.threshold - STEP, 6)
            run = _compress(
                llama,
                avg_dim=1,
                error_budget=budget,
                start_threshold=t_next,
                layers=(re.escape(lr.path),),
            )
            (new,) = run.report.layers
            o = llama_oracle[lr.layer]
            ranks = (_rank_range(o.s["kq"], t_next), _rank_range(o.s["v"], t_next))
            lp_new = flatten(jcompress.layer_params(cfg, run.params, lr.layer))
            if new.threshold is None:
                seen.add("dense")
                assert not new.compressed and new.steps == 1
                old = flatten(jcompress.layer_params(cfg, llama.params, lr.layer))
                assert all(v is old[k] for k, v in lp_new.items())
                for r_kq, r_v in itertools.product(*ranks):
                    assert _oracle_error(cfg, lr.layer, o, r_kq, r_v) >= budget * (1 - 1e-3)
            else:
                seen.add("kept")
                assert new.threshold == pytest.approx(t_next, abs=1e-6)
                assert new.rank_kq in ranks[0] and new.rank_v in ranks[1]
                assert new.error < budget and new.compressed
                # only a rank bound can have stopped the full walk here
                assert hk * new.rank_kq <= 0.45 * hk * d or hk * new.rank_v <= 0.45 * hk * d
    assert seen == {"dense", "kept"}, seen  # both outcomes occur on llama-1m


def test_gqa_shapes_and_latent_cache(llama, llama_run):
    cfg = llama.cfg
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size) == (8, 4, 16, 128)
    cache = init_cache(cfg, llama_run.params, 1, 8)
    for lr in llama_run.report.layers:
        i = lr.layer
        lp, lp0 = (jcompress.layer_params(cfg, p, i) for p in (llama_run.params, llama.params))
        att = lp["self_attn"]
        assert att["q_proj"]["kernel"] is lp0["self_attn"]["q_proj"]["kernel"]  # Q stays dense
        assert not lr.shares_q and lr.kv_heads == 4 and lr.head_dim_kq == lr.head_dim_v == 16
        for role, r in (("k_proj", lr.rank_kq), ("v_proj", lr.rank_v)):
            w = att[role]["kernel"]
            assert r < 16  # every layer of llama-1m compresses K and V at this budget
            assert isinstance(w, HeadLowRank)
            assert w.b.shape == (4, r, 16) and w.a.shape == (128, 4 * r) and w.shape == (128, 64)
        assert cache.k[i].shape == (1, 8, 4 * lr.rank_kq)
        assert cache.v[i].shape == (1, 8, 4 * lr.rank_v)
        assert lr.kv_after == 4 * (lr.rank_kq + lr.rank_v) < lr.kv_before == 128
    dense = init_cache(cfg, llama.params, 1, 8)
    assert all(c.shape == (1, 8, 64) for c in dense.k + dense.v)


def test_mha_shared_kq_basis_and_projected_biases(opt, opt_run):
    cfg = opt.cfg
    assert cfg.num_heads == cfg.num_kv_heads == 4 and cfg.head_dim == 32
    cache = init_cache(cfg, opt_run.params, 1, 8)
    for lr in opt_run.report.layers:
        i = lr.layer
        assert lr.shares_q
        lp, lp0 = (
            jcompress.layer_params(cfg, p, i)["self_attn"] for p in (opt_run.params, opt.params)
        )
        k, q, v = (lp[r]["kernel"] for r in ("k_proj", "q_proj", "v_proj"))
        assert all(isinstance(w, HeadLowRank) for w in (k, q, v))
        np.testing.assert_array_equal(np.asarray(k.b), np.asarray(q.b))  # one basis for K and Q
        assert k.b.shape == (4, lr.rank_kq, 32) and v.b.shape == (4, lr.rank_v, 32)
        assert cache.k[i].shape[-1] == 4 * lr.rank_kq and cache.v[i].shape[-1] == 4 * lr.rank_v
        for role, w in (("k_proj", k), ("q_proj", q), ("v_proj", v)):
            b = np.asarray(w.b, np.float64)  # [heads, r, D] = U_h^T
            np.testing.assert_allclose(
                np.einsum("hrd,hsd->hrs", b, b),
                np.broadcast_to(np.eye(b.shape[1]), (4,) + b.shape[1:2] * 2),
                atol=1e-5,
            )
            proj = np.einsum("hrd,hre->hde", b, b)  # U U^T
            w0 = np.asarray(lp0[role]["kernel"], np.float64).reshape(128, 4, 32)
            a = np.einsum("ihd,hrd->ihr", w0, b).reshape(128, -1)  # [W_h U_h]_h
            np.testing.assert_allclose(np.asarray(w.a), a, atol=1e-5)
            np.testing.assert_allclose(
                np.asarray(w.materialize()).reshape(128, 4, 32),
                np.einsum("ihd,hde->ihe", w0, proj),
                atol=1e-5,
            )
            b0 = np.asarray(lp0[role]["bias"], np.float64).reshape(4, 32)
            bias = lp[role]["bias"]  # kept in rank space on the projection's own basis
            assert isinstance(bias, HeadLatentBias)
            np.testing.assert_array_equal(np.asarray(bias.ut), np.asarray(w.b))
            np.testing.assert_allclose(
                np.asarray(bias.z), np.einsum("hd,hrd->hr", b0, b).reshape(-1), atol=1e-5
            )
            b_new = np.asarray(bias.materialize(), np.float64).reshape(4, 32)
            np.testing.assert_allclose(b_new, np.einsum("hd,hde->he", b0, proj), atol=1e-5)
            # the projection did something (trained OPT biases are small: ~1e-3)
            assert np.abs(b_new - b0).max() > 1e-2 * np.abs(b0).max() > 0
        # out_proj is folded onto the V bases: W_o' = U_v^T W_o per head, bias untouched
        o = lp["out_proj"]["kernel"]
        assert isinstance(o, HeadFoldedOut) and o.shape == (128, 128)
        np.testing.assert_array_equal(np.asarray(o.ut), np.asarray(v.b))
        bv = np.asarray(v.b, np.float64)  # [4, r_v, 32]
        wo = np.asarray(lp0["out_proj"]["kernel"], np.float64).reshape(4, 32, 128)
        np.testing.assert_allclose(
            np.asarray(o.w).reshape(4, lr.rank_v, 128),
            np.einsum("hrd,hdo->hro", bv, wo),
            atol=1e-5,
        )
        assert lp["out_proj"]["bias"] is lp0["out_proj"]["bias"]


def _export_parity(cfg, params, out_dir, ids):
    jcompress.save_hf(cfg, params, out_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(ids, np.int64))).logits.float().numpy()
    ours = np.asarray(jcompress.forward(cfg, params, jnp.asarray(ids)), np.float32)
    assert ours.shape == ref.shape and np.isfinite(ours).all()
    return float(np.abs(ours - ref).max()), hf


def test_export_matches_transformers(real, tmp_path):
    model, run = real
    cfg, lay = model.cfg, _lay(model.cfg)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 64))
    diff, hf = _export_parity(cfg, run.params, tmp_path / "hf", ids)
    assert diff <= TOL
    # the export holds the dense-equivalent W U U^T, not the original weights
    sd = hf.state_dict()
    path = f"{lay.layers}/0/{lay.k}"
    name = f"{path.replace('/', '.')}.weight"
    w = np.asarray(get_path(run.params, path)["kernel"].materialize()).T
    np.testing.assert_allclose(sd[name].numpy(), w, atol=1e-6)
    orig = np.asarray(get_path(model.params, path)["kernel"]).T
    assert np.abs(sd[name].numpy() - orig).max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_perplexity_and_kv_cache(name, request):
    model = request.getfixturevalue(name)
    run, big = request.getfixturevalue(f"{name}_run"), request.getfixturevalue(f"{name}_run_big")

    def ppl(p):
        return jcompress.perplexity(
            model.cfg, p, model.test, seqlen=256, max_windows=10, progress=False
        ).ppl

    before, after = ppl(model.params), ppl(run.params)
    assert after < 1.05 * before, (before, after)
    assert after != before
    assert run.report.kv_cache_ratio < 1
    assert big.report.kv_cache_ratio <= run.report.kv_cache_ratio
    assert all(lr.error < BIG_BUDGET for lr in big.report.layers)
    # the ratio is the one of the cache the forward pass actually allocates
    cache, dense = (init_cache(model.cfg, p, 1, 4) for p in (run.params, model.params))
    width = sum(c.shape[-1] for c in cache.k + cache.v)
    assert width / sum(c.shape[-1] for c in dense.k + dense.v) == pytest.approx(
        run.report.kv_cache_ratio
    )


def test_layer_selection_and_purity(llama, llama_run):
    before = flatten(llama.params)
    snapshot = {k: (v, np.asarray(v).copy()) for k, v in before.items()}
    with pytest.raises(jcompress.UserError, match=r"layers: rule 'nomatch/\.\*' matches nothing"):
        _compress(llama, avg_dim=1, error_budget=BUDGET, layers=("model/layers/0", "nomatch/.*"))
    with pytest.warns(UserWarning, match="matches nothing"):
        run = _compress(
            llama,
            avg_dim=1,
            error_budget=BUDGET,
            layers=("model/layers/0", "nomatch/.*"),
            allow_unmatched=True,
        )
    rep = run.report
    assert rep.unmatched_rules == ("nomatch/.*",)
    assert [lr.layer for lr in rep.layers] == [0] and rep.layers[0].path == "model/layers/0"
    after = flatten(run.params)
    assert set(after) == set(before)
    changed = {k for k in after if after[k] is not before[k]}
    assert changed and all(k.startswith("model/layers/0/self_attn/") for k in changed)
    # layer 0 is what the full run produced for it (same calibration inputs for layer 0)
    full = flatten(llama_run.params)
    for k in changed:
        for field, arr in after[k].arrays().items():
            np.testing.assert_array_equal(np.asarray(arr), np.asarray(full[k].arrays()[field]))
    assert rep.layers[0] == llama_run.report.layers[0]
    # KV figures: the selected layer, and the whole model (the other layers at full width)
    lr, per_layer = rep.layers[0], llama.cfg.num_kv_heads * 2 * llama.cfg.head_dim
    assert rep.kv_cache_before == per_layer and rep.kv_cache_after == lr.kv_after
    assert rep.model_kv_cache_before == llama.cfg.num_layers * per_layer
    assert rep.model_kv_cache_after == (llama.cfg.num_layers - 1) * per_layer + lr.kv_after
    md = rep.to_markdown()
    assert f"| model ({llama.cfg.num_layers} layers) |" in md
    assert f"({100 * rep.model_kv_cache_ratio:.1f}%)" in md
    # the input tree is untouched: same structure, same leaf objects, same values
    now = flatten(llama.params)
    assert set(now) == set(snapshot)
    for k, (leaf, value) in snapshot.items():
        assert now[k] is leaf
        np.testing.assert_array_equal(np.asarray(leaf), value)
    assert not any(isinstance(v, HeadLowRank) for v in now.values())


def test_report_serialisation(real):
    model, run = real
    rep = run.report
    d = json.loads(json.dumps(rep.to_dict()))
    assert len(d["layers"]) == model.cfg.num_layers
    assert d["kv_cache_after"] == rep.kv_cache_after < d["kv_cache_before"] == rep.kv_cache_before
    assert d["kv_cache_percent"] == pytest.approx(100 * rep.kv_cache_ratio)
    assert d["layers"][0]["rank_kq"] == rep.layers[0].rank_kq
    assert d["avg_dim"] == AVG[model.name] and d["averaged_sequences"] == NS // AVG[model.name]
    md = rep.to_markdown()
    for lr in rep.layers:
        rows = [ln for ln in md.splitlines() if ln.startswith(f"| {lr.layer} |")]
        assert len(rows) == 1
        assert f"{lr.rank_kq}/{lr.head_dim_kq}" in rows[0] and f"{lr.threshold:.2f}" in rows[0]
    assert ("K/Q rank/head" in md) == (model.name == "opt")
    ext = rep.with_extra(ppl_before=1.0)
    assert json.loads(json.dumps(ext.to_dict()))["extra"] == {"ppl_before": 1.0}


def test_method_protocol(llama_run, llama):
    """EigenAttention follows ``jcompress.methods``: a Report with to_json / to_markdown /
    unmatched_rules, the ``compress(params, cfg, calib=None, *, config, progress)`` signature
    (calib required here, rejected with a clear error), selection by first-match rules."""
    import inspect

    from jcompress import methods

    rep = llama_run.report
    assert isinstance(rep, methods.Report)
    assert json.loads(json.dumps(rep.to_json())) == json.loads(json.dumps(rep.to_dict()))
    sig = inspect.signature(compress)
    assert list(sig.parameters) == ["params", "cfg", "calib", "config", "progress"]
    assert sig.parameters["calib"].default is None
    assert sig.parameters["config"].kind is inspect.Parameter.KEYWORD_ONLY
    with pytest.raises(jcompress.UserError, match="calib: EigenAttention needs calibration"):
        compress({}, llama.cfg, None, progress=False)
    rules = ("model/layers/[01]", "model/layers/1", "model/layers/9", "model/layers/.*")
    paths = [f"model/layers/{i}" for i in range(4)]
    with pytest.raises(jcompress.UserError, match=r"layers: rule 'model/layers/9' matches"):
        methods.select(rules, paths)
    with pytest.warns(UserWarning, match="model/layers/9"):
        sel = methods.select(rules, paths, allow_unmatched=True)
    assert sel.chosen == {
        "model/layers/0": "model/layers/[01]",
        "model/layers/1": "model/layers/[01]",  # first match wins
        "model/layers/2": "model/layers/.*",
        "model/layers/3": "model/layers/.*",
    }
    assert sel.unmatched == ("model/layers/9",)  # shadowed rules that match are not reported
    assert "model/layers/2" in sel and "model/layers/7" not in sel
    with pytest.raises(jcompress.UserError, match=r"params: a/kernel is a LowRank; X needs dense"):
        methods.require_dense(
            "a/kernel", jcompress.LowRank(jnp.ones((2, 1)), jnp.ones((1, 2))), "X"
        )


# --------------------------------------------------------------------------- tiny families

FAMILIES = ["opt", "llama", "qwen2", "qwen3", "mpt", "gpt2"]
TINY_BUDGET = 0.2  # random weights have flat spectra: a tighter budget keeps everything dense


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = {}
    for name in FAMILIES:
        d = tmp_path_factory.mktemp(f"eigen-{name}") / "hf"
        make_model(name).save_pretrained(d)
        cfg, params = jcompress.load_hf(d)
        out[name] = SimpleNamespace(name=name, dir=d, cfg=cfg, params=params)
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_models):
    t = tiny_models[request.param]
    calib = np.random.RandomState(0).randint(0, t.cfg.vocab_size, (8, 16))
    # min_rank=0: OPT's reference bound of 64 total would stop the walk on a 32-wide model
    config = EigenAttentionConfig(
        nsamples=8, seqlen=16, avg_dim=2, error_budget=TINY_BUDGET, min_rank=0
    )
    params, report = compress(t.params, t.cfg, calib, config=config, progress=False)
    return SimpleNamespace(**vars(t), calib=calib, out=params, report=report)


def test_tiny_report_and_leaves(tiny):
    cfg, rep, lay = tiny.cfg, tiny.report, _lay(tiny.cfg)
    assert rep.family == tiny.name and len(rep.layers) == cfg.num_layers
    count, stored = jcompress.models.count_params, jcompress.models.count_stored_params
    assert (rep.params_before, rep.params_after) == (count(tiny.params), stored(tiny.out))
    assert rep.averaged_sequences == 4 and rep.dropped_sequences == 0
    assert rep.rope == (tiny.name in ROPE)
    start = REF_WALK[tiny.name][0]
    for lr in rep.layers:
        assert lr.error < TINY_BUDGET and lr.steps >= 1
        assert 1 <= lr.rank_kq <= lr.head_dim_kq and 1 <= lr.rank_v <= lr.head_dim_v
        lp = jcompress.layer_params(cfg, tiny.out, lr.layer)
        lp0 = jcompress.layer_params(cfg, tiny.params, lr.layer)
        if lr.threshold is None:  # no threshold met the budget: the layer stays as it was
            assert not lr.compressed
            assert all(v is flatten(lp0)[p] for p, v in flatten(lp).items())
            continue
        assert lr.threshold <= start + 1e-9
        steps = (start - lr.threshold) / STEP
        assert abs(steps - round(steps)) < 1e-6
        for role, r, d in ((lay.k, lr.rank_kq, lr.head_dim_kq), (lay.v, lr.rank_v, lr.head_dim_v)):
            w = get_path(lp, role)["kernel"]
            if r < d:
                assert isinstance(w, HeadLowRank) and w.b.shape == (cfg.num_kv_heads, r, d)
            else:
                assert w is get_path(lp0, role)["kernel"]
        q = get_path(lp, lay.q)["kernel"]
        k = get_path(lp, lay.k)["kernel"]
        if lr.shares_q and lr.rank_kq < lr.head_dim_kq:
            np.testing.assert_array_equal(np.asarray(q.b), np.asarray(k.b))
            # tagged as one basis: the forward computes the scores in rank space
            assert q.basis == k.basis == "eigen_attention/kq" and k.shares_latent_scores(q)
        else:
            assert getattr(k, "basis", None) is None  # Llama / Qwen: K widened before RoPE
            assert q is get_path(lp0, lay.q)["kernel"]
    assert any(lr.compressed for lr in rep.layers)
    assert rep.kv_cache_ratio < 1
    assert rep.kv_cache_after == sum(
        c.shape[-1] for c in init_cache(cfg, tiny.out, 1, 4).k + init_cache(cfg, tiny.out, 1, 4).v
    )


def test_tiny_generate_and_export(tiny, tmp_path):
    """Greedy generation through the rank-r latent cache, checked against cache-free forwards;
    then the dense-equivalent export (save_hf) run by transformers gives the same logits."""
    cfg = tiny.cfg
    prompt = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 6))
    seq = np.asarray(
        jcompress.generate(cfg, tiny.out, jnp.asarray(prompt), max_new_tokens=10, eos_token_id=None)
    )
    assert seq.shape == (2, 16) and (seq[:, :6] == prompt).all()
    # every token the cached decoder chose is the argmax of a full (cache-free) forward
    logits = np.asarray(jcompress.forward(cfg, tiny.out, jnp.asarray(seq)), np.float32)
    assert np.isfinite(logits).all()
    for t in range(5, 15):
        chosen = logits[np.arange(2), t, seq[:, t + 1]]
        assert np.all(chosen >= logits[:, t].max(-1) - 1e-4), t
    assert _export_parity(cfg, tiny.out, tmp_path / "hf", seq)[0] <= TOL


def test_offload_dir_gives_identical_results_and_cleans_up(tmp_path):
    import jax

    cfg, params = jcompress.load_hf(bundled_llama())
    calib = np.random.RandomState(0).randint(0, cfg.vocab_size, (6, 32))
    conf = dict(nsamples=6, avg_dim=2, batch_size=4, error_budget=0.05)
    a, ra = compress(params, cfg, calib, config=EigenAttentionConfig(**conf), progress=False)
    b, rb = compress(
        params,
        cfg,
        calib,
        config=EigenAttentionConfig(**conf, offload_dir=str(tmp_path)),
        progress=False,
    )
    assert ra.layers == rb.layers
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(jcompress.UserError, match="offload_dir"):
        EigenAttentionConfig(offload_dir=str(tmp_path / "missing"))


def bundled_llama():
    from jcompress.cli import bundled_model_dir

    return bundled_model_dir()


def test_folded_forward_captures_full_width_v_and_o_input(llama, llama_run):
    """The folded path never widens values, yet Capture still reports what the dense
    projections would see (v_proj output, o_proj input) and the output is unchanged."""
    cfg = llama.cfg
    lp = jcompress.layer_params(cfg, llama_run.params, 0)
    dense = jcompress.materialize(lp)
    h = jcompress.embed(cfg, llama.params, jnp.asarray(np.arange(1, 33)[None]))
    cap = jcompress.Capture(inputs="self_attn/o_proj", outputs="self_attn/(v|o)_proj")
    y, got = jcompress.apply_layer(cfg, lp, h, 0, capture=cap)
    y2, want = jcompress.apply_layer(cfg, dense, h, 0, capture=cap)
    assert isinstance(lp["self_attn"]["o_proj"]["kernel"], HeadFoldedOut)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y2), atol=1e-4)
    for kind in ("inputs", "outputs"):
        assert got[kind].keys() == want[kind].keys()
        for k in got[kind]:
            np.testing.assert_allclose(
                np.asarray(got[kind][k]), np.asarray(want[kind][k]), atol=1e-4
            )


# ------------------------------------------------------------ rank search, reference mode


@pytest.fixture(scope="module")
def llama_bisect(llama):
    return _compress(llama, avg_dim=AVG["llama"], error_budget=BUDGET, rank_search="bisect")


def test_bisect_ranks_minimal_against_oracle(llama, llama_bisect, llama_oracle):
    """rank_search='bisect': every layer meets the budget with the leaves it got (error
    recomputed from the oracle's float64 bases), and lowering K's or V's rank by one (above
    the 0.45 floor) breaks it; no threshold is reported; few evaluations."""
    cfg, rep = llama.cfg, llama_bisect.report
    d, hk = cfg.head_dim, cfg.num_kv_heads
    floor = int(0.45 * hk * d / hk) + 1  # hk * r > 0.45 * hk * d
    assert rep.rank_search == "bisect" and "rank search: bisect" in rep.to_markdown()
    for lr in rep.layers:
        o = llama_oracle[lr.layer]
        assert lr.threshold is None and lr.compressed and lr.rank_kq >= floor <= lr.rank_v
        assert 0 < lr.steps <= 3 * int(np.ceil(np.log2(d))) + 1
        lp2 = jcompress.layer_params(cfg, llama_bisect.params, lr.layer)
        err = _rel_err(o.y, jcompress.apply_layer(cfg, jcompress.materialize(lp2), o.h, lr.layer))
        assert err == pytest.approx(lr.error, rel=2e-3) and err < BUDGET
        assert _oracle_error(cfg, lr.layer, o, lr.rank_kq, lr.rank_v) < BUDGET * (1 + 1e-3)
        for rk, rv in ((lr.rank_kq - 1, lr.rank_v), (lr.rank_kq, lr.rank_v - 1)):
            if min(rk, rv) >= floor:
                assert _oracle_error(cfg, lr.layer, o, rk, rv) >= BUDGET * (1 - 1e-3), lr
        assert "(bisect)" in [ln for ln in rep.to_markdown().splitlines()
                              if ln.startswith(f"| {lr.layer} |")][0]  # fmt: skip
    # the walk's pairs use one threshold for K and V; bisection never keeps more cache
    assert rep.kv_cache_after <= sum(lr.kv_after for lr in rep.layers)


def test_rank_search_and_reference_mode_validation():
    with pytest.raises(jcompress.UserError, match="rank_search: must be one of threshold, bisect"):
        EigenAttentionConfig(rank_search="grid")
    with pytest.raises(jcompress.UserError, match="reference_mode: .*rank_search='threshold'"):
        EigenAttentionConfig(reference_mode=True, rank_search="bisect")


@pytest.fixture(scope="module")
def llama_reference(llama):
    return _compress(llama, avg_dim=AVG["llama"], error_budget=BUDGET, reference_mode=True)


def test_reference_mode_pooled_k_basis_and_stop_rule(llama, llama_reference):
    """reference_mode on Llama: one K basis per layer, the SVD of the K features of all KV
    heads stacked as rows (numpy float64 oracle, as ``generate_basis_vectors_per_layer``),
    ranks from its spectrum; the kept threshold is the last evaluated plus one step (oracle:
    the reference loop written out here with numpy layer errors)."""
    cfg, lay, rep = llama.cfg, _lay(llama.cfg), llama_reference.report
    hk, d = cfg.num_kv_heads, cfg.head_dim
    assert rep.reference_mode and "reference mode" in rep.to_markdown()
    cap = jcompress.Capture(outputs=f"{re.escape(lay.k)}|{re.escape(lay.v)}")
    h = jcompress.embed(cfg, llama.params, jnp.asarray(llama.calib))
    for lr in rep.layers[:2]:
        i = lr.layer
        lp = jcompress.layer_params(cfg, llama.params, i)
        y, got = jcompress.apply_layer(cfg, lp, h, i, capture=cap)
        fk = np.asarray(got["outputs"][lay.k], np.float64).reshape(-1, hk, d).reshape(-1, d)
        _, s_k, vt = np.linalg.svd(fk, full_matrices=False)
        u_k = np.broadcast_to(_flip(vt.T), (hk, d, d))
        fv = np.asarray(got["outputs"][lay.v], np.float64).reshape(-1, hk * d)
        u_v, s_v = _head_svd(fv, hk)
        o = SimpleNamespace(lp=lp, h=h, y=np.asarray(y, np.float64),
                            u={"kq": u_k, "v": u_v}, s={"kq": s_k[None], "v": s_v})  # fmt: skip

        def ranks(t, o=o):  # the rule in float64, a fraction within 1e-9 of t reaching it
            def r(s):
                cum = np.cumsum(s, axis=1) / s.sum(1, keepdims=True)
                return min(max(int((cum < t - 1e-9).sum(1).max()), 1), d)

            return r(o.s["kq"]), r(o.s["v"])

        # the reference's Llama loop (bound on the ranks just evaluated), then t += 2 steps
        t, rk, rv, err = 1.0, d, d, 0.0
        while err < BUDGET and hk * rk > 0.45 * hk * d and hk * rv > 0.45 * hk * d:
            rk, rv = ranks(t)
            err = _oracle_error(cfg, i, o, rk, rv)
            t = round(t - STEP, 9)
        t = round(t + 2 * STEP, 9)
        rk, rv = min(ranks(t)[0], d), min(ranks(t)[1], d)
        if rk == d and rv == d:
            assert not lr.compressed and lr.threshold is None
        else:
            assert lr.threshold == pytest.approx(t) and (lr.rank_kq, lr.rank_v) == (rk, rv)
            kk = get_path(jcompress.layer_params(cfg, llama_reference.params, i), lay.k)["kernel"]
            b = np.asarray(kk.b, np.float64)  # [hk, r, D]: the same basis for every head
            np.testing.assert_allclose(b, b[:1].repeat(hk, 0), atol=1e-6)
            proj = b[0].T @ b[0]
            np.testing.assert_allclose(proj, u_k[0, :, :rk] @ u_k[0, :, :rk].T, atol=2e-3)
            assert lr.shared_k_basis and lr.error == pytest.approx(
                _oracle_error(cfg, i, o, rk, rv), rel=5e-3, abs=1e-6
            )
        h = y


def test_reference_mode_opt_steps_back_after_a_bound_stop(opt, opt_run, opt_oracle):
    """OPT (per-head K/Q bases either way): the reference's kept threshold is the default's
    when the error ended the walk, and one step above it when the rank floor (total rank >
    64) or the minimum threshold ended it; its error is the recomputed error at those ranks."""
    cfg = opt.cfg
    ref = _compress(opt, avg_dim=AVG["opt"], error_budget=BUDGET, reference_mode=True)
    hk, d = cfg.num_kv_heads, cfg.head_dim
    stops = set()
    for lr, lr_ref in zip(opt_run.report.layers, ref.report.layers, strict=True):
        o = opt_oracle[lr.layer]
        t_next = round(lr.threshold - STEP, 9)
        r_next = [
            min(max(int((np.cumsum(s, 1) / s.sum(1, keepdims=True) < t_next - 1e-9).sum(1).max()),
                    1), d)
            for s in (o.s["kq"], o.s["v"])
        ]  # fmt: skip
        if t_next <= 0.3 + 1e-9 or min(r_next) * hk <= 64:
            stops.add("bound")
            assert lr_ref.threshold == pytest.approx(lr.threshold + STEP), lr.layer
            assert lr_ref.rank_kq >= lr.rank_kq and lr_ref.rank_v >= lr.rank_v
        else:
            stops.add("error")
            assert lr_ref.threshold == pytest.approx(lr.threshold), lr.layer
            assert (lr_ref.rank_kq, lr_ref.rank_v) == (lr.rank_kq, lr.rank_v)
        if lr_ref.compressed:
            err = _oracle_error(cfg, lr.layer, o, lr_ref.rank_kq, lr_ref.rank_v)
            assert lr_ref.error == pytest.approx(err, rel=5e-3, abs=1e-6)
    assert stops


def test_per_head_ranks_reported(llama, llama_run, llama_oracle):
    """Each head's own count at the kept threshold (float64 rule, from the oracle's
    singular values); the layer keeps the maximum; the per-head cache is what they'd keep."""
    d = llama.cfg.head_dim
    for lr in llama_run.report.layers:
        o = llama_oracle[lr.layer]
        for key, got, r in (
            ("kq", lr.head_ranks_kq, lr.rank_kq),
            ("v", lr.head_ranks_v, lr.rank_v),
        ):
            s = o.s[key]
            cum = np.cumsum(s, 1) / s.sum(1, keepdims=True)
            want = np.clip((cum < lr.threshold - 1e-9).sum(1), 1, d)
            assert np.all(np.abs(np.asarray(got) - want) <= (cum - lr.threshold < 1e-5).any())
            assert max(got) == r
        assert lr.kv_after_per_head == sum(lr.head_ranks_kq) + sum(lr.head_ranks_v)
        assert lr.kv_after_per_head <= lr.kv_after
    rep = llama_run.report
    js = json.loads(json.dumps(rep.to_json()))
    assert js["kv_cache_after_per_head"] == sum(lr.kv_after_per_head for lr in rep.layers)
    if rep.kv_cache_after_per_head < rep.kv_cache_after:
        assert "per-head ranks" in rep.to_markdown()


def test_kv_cache_figure(llama_run, tmp_path):
    import matplotlib.image as mpimg

    from jcompress.eigen_attention.figures import kv_cache_figure

    rep = dataclasses.replace(llama_run.report, layers=llama_run.report.layers[1:3])
    assert rep.model_kv_cache_after > rep.kv_cache_after  # layers 0 and 3 count at full width
    p = kv_cache_figure(rep, tmp_path / "fig" / "kv.png")
    img = mpimg.imread(p)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_cli_reaches_every_config_field():
    from jcompress.cli import build_parser
    from jcompress.cli.common import config_from_args

    parser = build_parser()
    argv = ["eigen", "--model", "m", "--calib_data", "c", "--seqlen", "64", "--nsamples", "8",
            "--avg_dim", "2", "--rank_search", "threshold", "--min_rank", "0",
            "--min_rank_fraction", "0.2", "--start_threshold", "0.9", "--threshold-step", "0.01",
            "--min_threshold", "0.5", "--no-reference_mode"]  # fmt: skip
    args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(EigenAttentionConfig)}
    assert set(args.config_fields) == fields
    c = config_from_args(EigenAttentionConfig, args, args.config_fields)
    assert (c.rank_search, c.min_rank, c.min_rank_fraction, c.start_threshold) == (
        "threshold",
        0,
        0.2,
        0.9,
    )
    assert (c.threshold_step, c.min_threshold, c.reference_mode, c.avg_dim) == (0.01, 0.5, False, 2)
    # the bisection (thresholds play no part in it, so none are given)
    args = parser.parse_args([*argv[:11], "--rank_search", "bisect"])
    assert config_from_args(EigenAttentionConfig, args, args.config_fields).rank_search == "bisect"
    args = parser.parse_args([*argv[:5], "--reference-mode"])
    assert config_from_args(EigenAttentionConfig, args, args.config_fields).reference_mode
    with pytest.raises(SystemExit):
        parser.parse_args([*argv[:5], "--rank_search", "grid"])
    sub = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "eigen")
    text = " ".join(sub[1].format_help().split())
    assert "64 for OPT" in text and "opt-1m" in text and "(default: 16)" in text
    with pytest.raises(jcompress.UserError, match="avg_dim defaults to 16"):
        EigenAttentionConfig(nsamples=4)


def test_calibration_past_trained_positions_warns(tiny_models):
    t = tiny_models["llama"]
    n = t.cfg.max_position_embeddings + 8
    calib = np.random.RandomState(0).randint(0, t.cfg.vocab_size, (2, n))
    config = EigenAttentionConfig(nsamples=2, seqlen=n, avg_dim=1, layers=("model/layers/0",))
    with pytest.warns(UserWarning, match=f"longer than the model's {n - 8} trained positions"):
        compress(t.params, t.cfg, calib, config=config, progress=False)


def test_fine_tune_tunes_only_the_factors(tiny_models):
    """Recovery fine-tuning: same tree and leaf types; only HeadLowRank ``a`` / HeadFoldedOut
    ``w`` change; bases untouched (v's ``b`` still o's ``ut``), so the factored forward equals
    the dense export's; the training loss goes down; held-out perplexity before equals
    ``jcompress.perplexity`` of the compressed model."""
    from jcompress.eigen_attention.finetune import FineTuneConfig, fine_tune, trainable_factors
    from jcompress.eval.perplexity import window_nll

    t = tiny_models["llama"]
    rng = np.random.RandomState(1)
    calib = rng.randint(0, t.cfg.vocab_size, (8, 16))
    config = EigenAttentionConfig(nsamples=8, seqlen=16, avg_dim=1, error_budget=TINY_BUDGET)
    small, crep = compress(t.params, t.cfg, calib, config=config, progress=False)
    assert trainable_factors(small)
    # compression time is reported per layer and in total (and in the markdown table)
    assert crep.compress_seconds > 0 and all(r.seconds > 0 for r in crep.layers)
    assert crep.compress_seconds >= sum(r.seconds for r in crep.layers)
    assert f"{crep.compress_seconds:.2f}" in crep.to_markdown()
    held = rng.randint(0, t.cfg.vocab_size, 200)
    with pytest.raises(jcompress.UserError, match="lr: must be in"):
        FineTuneConfig(lr=0)
    with pytest.raises(jcompress.UserError, match="nothing was compressed"):
        fine_tune(t.params, t.cfg, calib, config=FineTuneConfig(steps=1), progress=False)
    ft = FineTuneConfig(steps=12, lr=3e-2, batch_size=8)
    tuned, rep = fine_tune(
        small, t.cfg, calib, config=ft, heldout=held, heldout_seqlen=16, progress=False
    )
    before, after = flatten(small), flatten(tuned)
    assert set(before) == set(after)
    changed = 0
    for k, v in before.items():
        w = after[k]
        assert type(w) is type(v)
        if isinstance(v, HeadLowRank):
            np.testing.assert_array_equal(np.asarray(v.b), np.asarray(w.b))
            changed += not np.array_equal(np.asarray(v.a), np.asarray(w.a))
        elif isinstance(v, HeadFoldedOut):
            np.testing.assert_array_equal(np.asarray(v.ut), np.asarray(w.ut))
            changed += not np.array_equal(np.asarray(v.w), np.asarray(w.w))
        else:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(w))
    assert changed == len(trainable_factors(small))
    ids = jnp.asarray(calib)
    nll0 = float(jnp.mean(window_nll(t.cfg, small, ids)))
    nll1 = float(jnp.mean(window_nll(t.cfg, tuned, ids)))
    assert nll1 < nll0 - 1e-3 and rep.losses[0] == pytest.approx(nll0, rel=1e-4)
    dense = jcompress.materialize(tuned)
    np.testing.assert_allclose(
        np.asarray(jcompress.forward(t.cfg, dense, ids)),
        np.asarray(jcompress.forward(t.cfg, tuned, ids)),
        atol=2e-4,
    )
    ref = jcompress.perplexity(t.cfg, small, held, seqlen=16, progress=False).ppl
    assert rep.heldout_ppl_before == pytest.approx(ref, rel=1e-6)
    after = jcompress.perplexity(t.cfg, tuned, held, seqlen=16, progress=False).ppl
    assert rep.heldout_ppl_after == pytest.approx(after, rel=1e-6) and after != ref
    assert rep.trainable_params == sum(int(v.size) for v in trainable_factors(small).values())
    assert json.loads(json.dumps(rep.to_json()))["steps"] == 12


def test_cli_fine_tune_figure_and_whole_model_kv(tmp_path, llama_dir, shared_data, capsys):
    from jcompress.cli import main

    # the first 100k characters of each text: enough tokens for the windows below (8 x 64
    # sampled, 2 x 64 evaluated) without tokenizing the whole files once more
    texts = {}
    for name, src in (("calib", "wikitext-2/valid.txt"), ("eval", "wikitext-2-raw/test.txt")):
        texts[name] = tmp_path / f"{name}.txt"
        head = (shared_data / src).read_text(encoding="utf-8")[:100_000]
        texts[name].write_text(head, encoding="utf-8")
    out = tmp_path / "run"
    code = main([
        "eigen", "--model", str(llama_dir),
        "--calib_data", str(texts["calib"]), "--eval_data", str(texts["eval"]),
        "--nsamples", "8", "--seqlen", "64", "--avg_dim", "1", "--layers", "model/layers/1",
        "--rank_search", "bisect", "--fine_tune", "--ft_steps", "3", "--ft_lr", "1e-3",
        "--eval_seqlen", "64", "--eval_max_windows", "2", "--max_new_tokens", "3",
        "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    stdout = capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["rank_search"] == "bisect" and len(rep["layers"]) == 1
    per_layer = rep["layers"][0]["kv_before"]
    assert rep["model_kv_cache_before"] == 4 * per_layer
    assert rep["model_kv_cache_after"] == 3 * per_layer + rep["layers"][0]["kv_after"]
    assert "whole model" in stdout and "selected layers" in stdout
    ft = rep["extra"]["fine_tune"]
    assert ft["steps"] == 3 and len(ft["losses"]) == 3 and ft["trainable_params"] > 0
    assert rep["extra"]["ppl_after_compress"]["ppl"] > 0 and "before fine-tuning" in stdout
    assert (out / "kv_cache.png").stat().st_size > 1000
    cfg, params = jcompress.load_hf(out / "factors")
    kk = params["model"]["layers"]["1"]["self_attn"]["k_proj"]["kernel"]
    assert isinstance(kk, HeadLowRank) and kk.rank == rep["layers"][0]["rank_kq"]


def test_cli_fine_tune_defaults_are_the_configs():
    """--fine_tune without --ft_* flags runs FineTuneConfig's own defaults."""
    from jcompress.cli.eigen import FT_DEFAULTS
    from jcompress.eigen_attention.finetune import FineTuneConfig

    d = FineTuneConfig()
    assert FT_DEFAULTS == {"ft_steps": d.steps, "ft_lr": d.lr, "ft_batch_size": d.batch_size}
