"""jcompress.tucker ``tucker_mps``: Kronecker output bases learned by HOOI from calibration outputs.

Oracles: a numpy HOOI on the raw captured output tensor (SVDs of unfoldings, no covariance, no
jcompress.decomp), projectors built by hand, and jcompress.forward with captures for the layer
output error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress.errors import UserError
from jcompress.leaves import HeadFoldedOut, HeadLowRank, materialize
from jcompress.models.convert import flatten
from jcompress.models.forward import Capture
from jcompress.tucker import TuckerConfig, compress
from jcompress.tucker.tucker_core import kron_basis

CALIB = np.random.default_rng(1).integers(3, 64, size=(5, 12))  # 5 windows: a padded batch of 4


def _np_hooi_basis(y: np.ndarray, ranks, iters=200) -> np.ndarray:
    """Projector ``P P^T`` of the HOOI Kronecker basis of data ``y [N, n_1, ..., n_m]`` at ranks
    ``(N, r_1..r_m)``: HOSVD init, then alternating SVDs of the projected unfoldings (numpy,
    float64, on the raw data)."""
    y = np.asarray(y, np.float64)
    m = y.ndim - 1

    def lead(t, mode, r):
        unf = np.moveaxis(t, mode, 0).reshape(t.shape[mode], -1)
        return np.linalg.svd(unf, full_matrices=False)[0][:, :r]

    us = [lead(y, k + 1, r) for k, r in enumerate(ranks)]
    for _ in range(iters):
        for k in range(m):
            t = y
            for j in range(m):
                if j != k:
                    t = np.moveaxis(np.tensordot(t, us[j], axes=([j + 1], [0])), -1, j + 1)
            us[k] = lead(t, k + 1, ranks[k])
    p = us[0]
    for u in us[1:]:
        p = np.kron(p, u)
    return p @ p.T


def test_kron_basis_equals_hooi_on_the_raw_data():
    rng = np.random.default_rng(0)
    a, b = np.linalg.qr(rng.normal(size=(4, 2)))[0], np.linalg.qr(rng.normal(size=(6, 3)))[0]
    z = rng.normal(size=(300, 2, 3)) * np.array([3.0, 1.5])[None, :, None]
    y = np.einsum("nab,ia,jb->nij", z, a, b) + 0.05 * rng.normal(size=(300, 4, 6))
    flat = y.reshape(300, 24)
    p, (u1, u2) = kron_basis(jnp.asarray(flat.T @ flat, jnp.float32), (4, 6), (2, 3))
    assert p.shape == (24, 6) and u1.shape == (4, 2) and u2.shape == (6, 3)
    np.testing.assert_allclose(p.T @ p, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(p, np.kron(u1, u2), atol=1e-6)
    np.testing.assert_allclose(p @ p.T, _np_hooi_basis(y, (2, 3)), atol=2e-4)
    # and it captures at least the energy of the planted subspace
    cov = flat.T @ flat
    planted = np.kron(a, b)
    assert np.trace(p.T @ cov @ p) >= np.trace(planted.T @ cov @ planted) * (1 - 1e-5)


def _opt():
    cfg = jcompress.ModelConfig(
        family="opt", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2,
        num_kv_heads=2, head_dim=16, intermediate_size=48, max_position_embeddings=32,
        norm="layer", activation="relu", gated_mlp=False, position="learned", pos_offset=2,
        qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True, tie_word_embeddings=True,
    )  # fmt: skip
    return cfg, jcompress.init_params(cfg, jax.random.key(5), std=0.3)


def _llama():
    cfg = jcompress.ModelConfig(
        family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    return cfg, jcompress.init_params(cfg, jax.random.key(6), std=0.3)


@pytest.fixture(scope="module")
def opt_done():
    cfg, params = _opt()
    config = TuckerConfig(variant="tucker_mps", basis_ranks=(2, 3), batch_size=4)
    out, rep = compress(params, cfg, CALIB, config=config, progress=False)
    return cfg, params, out, rep


def test_opt_basis_is_hooi_of_the_k_and_q_outputs(opt_done):
    """K and Q share P = HOOI basis of their stacked per-head outputs on the calibration
    windows (numpy oracle on the raw outputs); V has the HOOI basis of its own outputs."""
    cfg, params, out, rep = opt_done
    _, cap = jcompress.forward(cfg, params, CALIB, capture=Capture(outputs=r".*/(k|q|v)_proj"))
    outs = {k.rsplit("/", 1)[-1]: np.asarray(v, np.float64) for k, v in cap["outputs"].items()}
    modes = (4, 4)  # head_dim 16 as factorize(16, 2)

    def data(*names):
        return np.concatenate([outs[n].reshape(-1, *modes) for n in names])  # [N * heads, 4, 4]

    f = flatten(out)
    k, q, v = (f[f"model/decoder/layers/0/self_attn/{r}_proj/kernel"] for r in "kqv")
    o = f["model/decoder/layers/0/self_attn/out_proj/kernel"]
    assert all(isinstance(x, HeadLowRank) for x in (k, q, v)) and isinstance(o, HeadFoldedOut)
    assert k.rank == q.rank == v.rank == 6
    np.testing.assert_array_equal(k.b, q.b)
    for leaf, names in ((k, ("k_proj", "q_proj")), (v, ("v_proj",))):
        for h in range(2):
            proj = np.asarray(leaf.b[h].T @ leaf.b[h], np.float64)
            np.testing.assert_allclose(proj, _np_hooi_basis(data(*names), (2, 3)), atol=2e-3)
    # the compressed kernel is W (I (x) P P^T), biases projected the same way
    w = np.asarray(flatten(params)["model/decoder/layers/0/self_attn/k_proj/kernel"])
    pp = np.asarray(k.b[0].T @ k.b[0])
    want = np.einsum("ihd,de->ihe", w.reshape(32, 2, 16), pp).reshape(32, 32)
    np.testing.assert_allclose(materialize(k), want, atol=1e-5)
    bias = np.asarray(flatten(params)["model/decoder/layers/0/self_attn/k_proj/bias"])
    np.testing.assert_allclose(
        f["model/decoder/layers/0/self_attn/k_proj/bias"],
        (bias.reshape(2, 16) @ pp).reshape(32), atol=1e-5,
    )  # fmt: skip


def test_opt_report_layer_error_kv_and_forward(opt_done):
    cfg, params, out, rep = opt_done
    ids = CALIB
    # layer output error: the report's vs one from two captured forwards (1 layer: same inputs)
    cap = Capture(outputs=r"model/decoder/layers/0")
    _, c0 = jcompress.forward(cfg, params, ids, capture=cap)
    _, c1 = jcompress.forward(cfg, out, ids, capture=cap)
    y0 = np.asarray(c0["outputs"]["model/decoder/layers/0"], np.float64)
    y1 = np.asarray(c1["outputs"]["model/decoder/layers/0"], np.float64)
    want = np.linalg.norm(y1 - y0) / np.linalg.norm(y0)
    (path, err), = rep.layer_errors  # fmt: skip
    assert path == "model/decoder/layers/0" and err == pytest.approx(want, rel=1e-3)
    assert 0 < err < 1
    # KV cache: 2 heads x (6 + 6) latent scalars per token instead of 2 x 2 x 16
    assert (rep.kv_cache_before, rep.kv_cache_after) == (64, 24)
    assert rep.to_json()["totals"]["kv_cache_per_token"] == 24
    paths = [p.path.rsplit("/", 1)[-1] for p in rep.projections]
    assert sorted(paths) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    for p in rep.projections:
        w = np.asarray(flatten(params)[f"{p.path}/kernel"], np.float64)
        got = np.asarray(materialize(flatten(out)[f"{p.path}/kernel"]), np.float64)
        assert p.weight_error == pytest.approx(np.linalg.norm(got - w) / np.linalg.norm(w), 1e-4)
    assert "projected rank-r" in rep.to_markdown()
    np.testing.assert_allclose(
        jcompress.forward(cfg, out, ids), jcompress.forward(cfg, materialize(out), ids), atol=1e-5
    )


def test_full_basis_reproduces_the_model_and_llama_gqa():
    """basis_ranks = the modes: P is orthonormal and square, so the model is unchanged. Llama
    (RoPE, GQA 4/2): q stays dense, k/v become latent; forward on leaves == materialized."""
    cfg, params = _opt()
    out, rep = compress(
        params, cfg, CALIB,
        config=TuckerConfig(variant="tucker_mps", basis_ranks=(4, 4)), progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(
        jcompress.forward(cfg, out, CALIB), jcompress.forward(cfg, params, CALIB), atol=2e-5
    )
    assert max(e for _, e in rep.layer_errors) < 1e-5
    cfg, params = _llama()
    out, rep = compress(
        params, cfg, CALIB,
        config=TuckerConfig(variant="tucker_mps", basis_ranks=(2, 2)), progress=False,
    )  # fmt: skip
    f = flatten(out)
    assert not isinstance(f["model/layers/0/self_attn/q_proj/kernel"], HeadLowRank)
    k = f["model/layers/1/self_attn/k_proj/kernel"]
    assert isinstance(k, HeadLowRank) and k.heads == 2 and k.rank == 4
    assert rep.kv_cache_after == 2 * 2 * (4 + 4)
    np.testing.assert_allclose(
        jcompress.forward(cfg, out, CALIB), jcompress.forward(cfg, materialize(out), CALIB),
        atol=5e-5, rtol=1e-5,
    )  # fmt: skip


def test_bad_input_is_one_line_before_work():
    cfg, params = _opt()
    mps = TuckerConfig(variant="tucker_mps", basis_ranks=(2, 3))
    cases = [
        (dict(calib=None, config=mps), r"^calib: variant tucker_mps needs calibration"),
        (dict(calib=CALIB + 100, config=mps), r"^calib: token ids must lie in \[0, 64\)"),
        (
            dict(calib=CALIB, config=TuckerConfig(variant="tucker_mps", basis_ranks=(5, 1))),
            r"^basis_ranks\[0\]: 5 exceeds mode size 4",
        ),
        (
            dict(calib=CALIB, config=TuckerConfig(variant="tucker_mps", layers=(r".*/k_proj",))),
            r"^layers: tucker_mps shares one basis between k and q",
        ),
    ]
    for kw, match in cases:
        with pytest.raises(UserError, match=match) as e:
            compress(params, cfg, kw["calib"], config=kw["config"], progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"^basis_ranks: expected positive integers"):
        TuckerConfig(variant="tucker_mps", basis_ranks=(2, 0))
