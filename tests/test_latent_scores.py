"""Rank-space attention scores: K and Q ``HeadLowRank`` leaves tagged as sharing one per-head
basis make the forward pass compute ``q' k'^T`` on the rank-r latents (EigenAttention on OPT /
MPT / GPT-2), and the logits stay those of the widened (dense-equivalent) model.

Leaves are built here from random orthonormal bases (not by ``eigen_attention``), on tiny
random models (``init_params``): the oracle is the forward of ``materialize(params)``, dense
kernels ``W U U^T`` with biases projected on the span, which never takes the rank-space path.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tiny import batch, hf_config

import jcompress
from jcompress import leaf_io
from jcompress.leaves import HeadLowRank, LowRank
from jcompress.models import init_cache
from jcompress.models.convert import flatten, unflatten
from jcompress.models.families import config_from_hf, spec_for
from jcompress.models.forward import forward_cached

TAG = "test/kq"
RANK = 3  # of head_dim 8 (16 for qwen3); one head keeps only RANK - 1 (zero-padded)
TOL = 2e-5


def _basis(rng, heads: int, d: int) -> np.ndarray:
    """``[heads, r, d]`` orthonormal rows; head 0's last row zeroed (padded per-head ranks)."""
    u = np.linalg.qr(rng.standard_normal((heads, d, d)))[0][:, :, :RANK]
    u[0, :, -1] = 0.0
    return u.transpose(0, 2, 1)


def _project(kernel, bias, b, tag):
    """``HeadLowRank(a = [W_h b_h^T]_h, b)`` and the bias on the span, in float64."""
    heads, r, d = b.shape
    w = np.asarray(kernel, np.float64).reshape(-1, heads, d)
    leaf = HeadLowRank(
        jnp.asarray(np.einsum("ihd,hrd->ihr", w, b).reshape(w.shape[0], -1), jnp.float32),
        jnp.asarray(b, jnp.float32),
        basis=tag,
    )
    if bias is None:
        return leaf, None
    bh = np.asarray(bias, np.float64).reshape(heads, d)
    return leaf, jnp.asarray(np.einsum("hd,hrd,hre->he", bh, b, b).reshape(-1), jnp.float32)


def _tagged(name: str, tag: str | None = TAG, seed: int = 0):
    """A tiny random model of variant ``name`` whose K and Q of every layer sit on one shared
    basis per KV head (query heads use their group's), tagged ``tag``."""
    cfg = config_from_hf(hf_config(name).to_dict())
    params = jcompress.init_params(cfg, jax.random.key(seed), std=0.3)
    lay = spec_for(cfg.family.value).layout
    flat = flatten(params)
    rng = np.random.default_rng(seed)
    for p in flat:  # init_params gives zero biases, which would hide a bias left out
        if p.endswith("/bias"):
            flat[p] = jnp.asarray(0.3 * rng.standard_normal(flat[p].shape), jnp.float32)
    for i in range(cfg.num_layers):
        b_k = _basis(rng, cfg.num_kv_heads, cfg.head_dim)
        b_q = np.repeat(b_k, cfg.num_heads // cfg.num_kv_heads, axis=0)
        for role, b in ((lay.k, b_k), (lay.q, b_q)):
            path = f"{lay.layers}/{i}/{role}"
            leaf, bias = _project(flat[f"{path}/kernel"], flat.get(f"{path}/bias"), b, tag)
            flat[f"{path}/kernel"] = leaf
            if bias is not None:
                flat[f"{path}/bias"] = bias
    return cfg, unflatten(flat)


def _captured(cfg, params, ids, mask):
    """Logits, the query shape attention saw in layer 0 and layer 0's q/k projection outputs."""
    lay = spec_for(cfg.family.value).layout
    pre = f"{lay.layers}/0"
    cap = jcompress.Capture(inputs=f"{pre}/{lay.attn}/core/q", outputs=f"{pre}/({lay.q}|{lay.k})")
    logits, got = jcompress.forward(cfg, params, ids, mask, capture=cap)
    (q,) = got["inputs"].values()
    return np.asarray(logits), q.shape, {k: np.asarray(v) for k, v in got["outputs"].items()}


@pytest.mark.parametrize("name", ["opt", "gpt2", "mpt-6heads"])
def test_rank_space_scores_equal_the_widened_model(name):
    """OPT (biases, padded per-head ranks), GPT-2 (fused c_attn, biases) and MPT without
    clip_qkv (ALiBi): scores in rank space, logits of the widened model, on prefill (padded
    rows) and on cached decode through the rank-r key cache."""
    cfg, params = _tagged(name)
    dense = jcompress.materialize(params)
    ids, mask = batch()
    got, q_shape, proj = _captured(cfg, params, ids, mask)
    want, _, want_proj = _captured(cfg, dense, ids, mask)
    assert q_shape == (3, ids.shape[1], cfg.num_heads, RANK)  # latent queries: rank space
    assert float(np.std(want)) > 0.1
    keep = mask.astype(bool)
    np.testing.assert_allclose(got[keep], want[keep], rtol=TOL, atol=TOL)
    # Capture still reports what the dense q/k projections give (full width)
    assert proj.keys() == want_proj.keys() and len(proj) == 2
    for k in proj:
        np.testing.assert_allclose(proj[k], want_proj[k], rtol=TOL, atol=TOL)
    # cached decode: prefill 12 tokens, then 4 one-token steps through the latent cache
    seq, n0 = jnp.asarray(ids[:1]), 12
    cache = init_cache(cfg, params, 1, seq.shape[1])
    assert cache.k[0].shape[-1] == cfg.num_kv_heads * RANK  # rank-r keys are cached
    step = jax.jit(forward_cached, static_argnums=0)
    logits, cache = step(cfg, params, seq[:, :n0], jnp.ones((1, n0), bool), cache)
    outs = [logits]
    for t in range(n0, seq.shape[1]):
        logits, cache = step(cfg, params, seq[:, t : t + 1], jnp.ones((1, 1), bool), cache)
        outs.append(logits)
    cached = np.concatenate([np.asarray(o) for o in outs], axis=1)
    np.testing.assert_allclose(cached, want[:1], rtol=TOL, atol=TOL)  # row 0: unpadded


@pytest.mark.parametrize("name", ["llama", "qwen3", "mpt"])  # RoPE + GQA, q/k norm, clip_qkv
def test_full_width_ops_fall_back_to_widening(name):
    """Tagged K/Q under RoPE, q/k norm or clip_qkv: the scores need full-width heads, so the
    forward widens them (attention sees queries of width D; traced only: once the decision is
    made the path is the one every untagged model runs)."""
    cfg, params = _tagged(name)
    ids, mask = batch()
    lay = spec_for(cfg.family.value).layout
    cap = jcompress.Capture(inputs=f"{lay.layers}/0/{lay.attn}/core/(q|k)")
    _, got = jax.eval_shape(lambda p: jcompress.forward(cfg, p, ids, mask, capture=cap), params)
    shapes = {k.rsplit("/", 1)[1]: v.shape for k, v in got["inputs"].items()}
    assert shapes == {
        "q": (3, ids.shape[1], cfg.num_heads, cfg.head_dim),
        "k": (3, ids.shape[1], cfg.num_kv_heads, cfg.head_dim),
    }


def test_shares_latent_scores_protocol_and_storage():
    rng = np.random.default_rng(0)
    b = jnp.asarray(_basis(rng, 2, 8), jnp.float32)
    a = jnp.asarray(rng.standard_normal((16, 2 * RANK)), jnp.float32)
    k = HeadLowRank(a, b, basis=TAG)
    q4 = HeadLowRank(jnp.concatenate([a, a], 1), jnp.repeat(b, 2, axis=0), basis=TAG)
    assert k.shares_latent_scores(k) and k.shares_latent_scores(q4)  # MHA, GQA groups
    assert not q4.shares_latent_scores(k)  # 4 key heads cannot serve 2 query heads
    assert not k.shares_latent_scores(dataclasses.replace(k, basis=None))
    assert not dataclasses.replace(k, basis=None).shares_latent_scores(k)
    assert not k.shares_latent_scores(dataclasses.replace(k, basis="other"))
    assert not k.shares_latent_scores(jnp.zeros((16, 16)))
    assert not LowRank(a, jnp.zeros((2 * RANK, 16))).shares_latent_scores(k)
    wider = HeadLowRank(jnp.zeros((16, 2 * 4)), jnp.zeros((2, 4, 8)), basis=TAG)
    assert not k.shares_latent_scores(wider)
    for bad in ("", 3):
        with pytest.raises(ValueError, match="basis"):
            HeadLowRank(a, b, basis=bad)
    # the tag is static (a jit key, kept by tree_map) and stored only when set
    assert jax.tree.map(lambda x: x + 0, k).basis == TAG
    assert jax.tree.structure(k) != jax.tree.structure(dataclasses.replace(k, basis=None))
    _, desc = leaf_io.to_arrays(dataclasses.replace(k, basis=None))
    assert desc["static"] == {}  # untagged leaves are stored as before the tag existed
    flat, desc = leaf_io.to_arrays(k)
    assert desc["static"] == {"basis": TAG}
    back = leaf_io.from_arrays(json.loads(json.dumps(desc)), flat)
    assert back.basis == TAG and back.shares_latent_scores(k)
    old = {"type": "HeadLowRank", "static": {}}  # a file written before the tag
    assert leaf_io.from_arrays(old, flat).basis is None


def test_rank_space_biases(tmp_path):
    """K and Q biases kept as their rank-r coordinates (``HeadLatentBias``) instead of the
    projected full-width vector: logits of the widened model on the rank-space path and on
    the widening path (untagged), ``heads * (d - r)`` fewer scalars per bias in the factor
    checkpoint (``ut`` linked to the kernel's basis), and both layouts load back."""
    from safetensors import safe_open

    from jcompress.leaves import HeadLatentBias

    cfg, params = _tagged("opt")
    lay = spec_for(cfg.family.value).layout
    flat = flatten(params)
    saved = 0
    for i in range(cfg.num_layers):
        for role in (lay.k, lay.q):
            path = f"{lay.layers}/{i}/{role}"
            b = np.asarray(flat[f"{path}/kernel"].b, np.float64)  # [heads, r, d]
            bias = np.asarray(flat[f"{path}/bias"], np.float64).reshape(b.shape[0], -1)
            z = np.einsum("hd,hrd->hr", bias, b).reshape(-1)
            flat[f"{path}/bias"] = HeadLatentBias(
                jnp.asarray(z, jnp.float32), flat[f"{path}/kernel"].b
            )
            saved += bias.size - z.size
    latent = unflatten(flat)
    untagged = jax.tree.map(
        lambda x: dataclasses.replace(x, basis=None) if isinstance(x, HeadLowRank) else x,
        latent,
        is_leaf=lambda x: isinstance(x, HeadLowRank),
    )
    ids, mask = batch()
    keep = mask.astype(bool)
    want = np.asarray(jcompress.forward(cfg, jcompress.materialize(params), ids, mask))
    for p in (latent, untagged):
        got = np.asarray(jcompress.forward(cfg, p, ids, mask))
        np.testing.assert_allclose(got[keep], want[keep], rtol=TOL, atol=TOL)
    written = {}
    for name, p in (("dense_bias", params), ("latent_bias", latent)):
        out = jcompress.save_hf(cfg, p, tmp_path / name, factors=True)
        with safe_open(out / "jcompress_model.safetensors", framework="np") as f:
            written[name] = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        assert written[name] == jcompress.models.count_stored_params(p)
        _, back = jcompress.load_hf(out)
        assert jax.tree.structure(back) == jax.tree.structure(p)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(p), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert saved > 0 and written["latent_bias"] == written["dense_bias"] - saved
    ut = jnp.zeros((2, 3, 8))
    assert HeadLatentBias(jnp.zeros(6), ut).shape == (16,)
    for z, u in ((jnp.zeros(5), ut), (jnp.zeros((2, 3)), ut), (jnp.zeros(6), ut[0])):
        with pytest.raises(ValueError, match="HeadLatentBias"):
            HeadLatentBias(z, u)
