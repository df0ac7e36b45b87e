"""jcompress.tucker ``tucker_mps``: Kronecker output bases learned by HOOI from calibration outputs.

Oracles: a numpy HOOI on the raw captured output tensor (SVDs of unfoldings, no covariance, no
jcompress.decomp), projectors built by hand, and jcompress.forward with captures for the layer
output error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _numpy_params import random_params

import jcompress
from jcompress.errors import UserError
from jcompress.leaves import HeadFoldedOut, HeadLatentBias, HeadLowRank, materialize
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
    p, u1, u2 = (np.asarray(a) for a in (p, u1, u2))  # the checks in numpy (no eager programs)
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
    params = random_params(cfg, 5, std=0.3)
    rng = np.random.default_rng(5)  # random biases: zero ones vanish from every check
    return cfg, jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        if path[-1].key == "bias" else x,
        params,
    )  # fmt: skip


def _llama():
    cfg = jcompress.ModelConfig(
        family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=32,
    )  # fmt: skip
    return cfg, random_params(cfg, 6, std=0.3)


@pytest.fixture(scope="module")
def opt_done():
    cfg, params = _opt()
    # mps_eps = 1: the projected weights stay dense (the TT step is tested on its own below)
    config = TuckerConfig(variant="tucker_mps", basis_ranks=(2, 3), batch_size=4, mps_eps=1.0)
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
    # tagged as one basis (the forward's rank-space scores); V's basis is o_proj's, untagged
    assert k.basis == q.basis == "tucker_mps/kq" and k.shares_latent_scores(q) and v.basis is None
    for leaf, names in ((k, ("k_proj", "q_proj")), (v, ("v_proj",))):
        for h in range(2):
            b_h = np.asarray(leaf.b[h], np.float64)
            proj = b_h.T @ b_h
            np.testing.assert_allclose(proj, _np_hooi_basis(data(*names), (2, 3)), atol=2e-3)
    # the compressed kernel is W (I (x) P P^T), biases projected the same way
    w = np.asarray(flatten(params)["model/decoder/layers/0/self_attn/k_proj/kernel"])
    p_np = np.asarray(k.b[0], np.float64).T  # [16, 6]
    pp = p_np @ p_np.T
    want = np.einsum("ihd,de->ihe", w.reshape(32, 2, 16), pp).reshape(32, 32)
    np.testing.assert_allclose(materialize(k), want, atol=1e-5)
    # ... and kept in rank space: z_h = bias_h P (r values per head), ut the kernel's basis
    bias = np.asarray(flatten(params)["model/decoder/layers/0/self_attn/k_proj/bias"])
    kb = f["model/decoder/layers/0/self_attn/k_proj/bias"]
    assert isinstance(kb, HeadLatentBias) and kb.z.shape == (2 * 6,)
    np.testing.assert_array_equal(kb.ut, k.b)
    np.testing.assert_allclose(kb.z, (bias.reshape(2, 16) @ p_np).reshape(12), atol=1e-5)
    np.testing.assert_allclose(
        materialize(kb), (bias.reshape(2, 16) @ pp).reshape(32), atol=1e-5
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


def _widened(params):
    """``params`` with each ``HeadLatentBias`` as its full-width projected bias: the layout
    ``tucker_mps`` wrote before rank-space biases (old checkpoints)."""
    return jax.tree.map(
        lambda x: x.materialize() if isinstance(x, HeadLatentBias) else x,
        params,
        is_leaf=lambda x: isinstance(x, HeadLatentBias),
    )


def test_opt_biases_in_rank_space(opt_done):
    """Projected k/q/v biases are stored as r coordinates per head: logits equal those of the
    widened model (full-width biases, on the rank-space path and on the full-width one), the
    stored parameter count drops by heads * (head_dim - r) per bias, and the compose plan
    announces the type."""
    from jcompress.compose import REGISTRY
    from jcompress.compose.registry import leaf_infos
    from jcompress.models import count_stored_params

    cfg, params, out, rep = opt_done
    wide = _widened(out)
    f, fw = flatten(out), flatten(wide)
    biases = sorted(k for k, v in f.items() if isinstance(v, HeadLatentBias))
    assert [b.split("/")[-2] for b in biases] == ["k_proj", "q_proj", "v_proj"]
    for b in biases:
        assert isinstance(fw[b], jax.Array) and fw[b].shape == (32,)
        assert f[b].z.shape == (2 * 6,) and f[b].shape == (32,)
    want = np.asarray(jcompress.forward(cfg, wide, CALIB))
    np.testing.assert_allclose(jcompress.forward(cfg, out, CALIB), want, atol=1e-5, rtol=1e-5)
    untagged = jax.tree.map(  # K/Q scores at full width: the forward widens the bias itself
        lambda x: dataclasses.replace(x, basis=None) if isinstance(x, HeadLowRank) else x,
        out,
        is_leaf=lambda x: isinstance(x, HeadLowRank),
    )
    np.testing.assert_allclose(jcompress.forward(cfg, untagged, CALIB), want, atol=1e-5, rtol=1e-5)
    # 2 heads, head_dim 16, r = 2 * 3: 2 * (16 - 6) fewer stored scalars for each of k, q, v
    assert count_stored_params(wide) - count_stored_params(out) == 3 * 2 * (16 - 6)
    assert rep.params_after == count_stored_params(out)
    config = TuckerConfig(variant="tucker_mps", basis_ranks=(2, 3), mps_eps=1.0)
    before = leaf_infos(params)
    plan = {**before, **REGISTRY["tucker"].plan(cfg, config, before)}
    for path, info in leaf_infos(out).items():
        assert info.types <= plan[path].types, path


def test_full_basis_reproduces_the_model_and_llama_gqa():
    """basis_ranks = the modes: P is orthonormal and square, so the model is unchanged. Llama
    (RoPE, GQA 4/2): q stays dense, k/v become latent; forward on leaves == materialized."""
    cfg, params = _opt()
    out, rep = compress(  # batch_size as opt_done: the calibration stream is compiled already
        params, cfg, CALIB,
        config=TuckerConfig(variant="tucker_mps", basis_ranks=(4, 4), mps_eps=1.0, batch_size=4),
        progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(
        jcompress.forward(cfg, out, CALIB), jcompress.forward(cfg, params, CALIB), atol=2e-5
    )
    assert max(e for _, e in rep.layer_errors) < 1e-5
    cfg, params = _llama()
    out, rep = compress(
        params, cfg, CALIB,
        config=TuckerConfig(variant="tucker_mps", basis_ranks=(2, 2), mps_eps=1.0),
        progress=False,
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


def test_calib_checks_before_work(tmp_path):
    """The stream's window checks (shape / dtype, learned-position length, offload_dir) and
    tucker_mps's own (not empty) are each one line before any work."""
    cfg, params = _opt()
    mps = TuckerConfig(variant="tucker_mps", basis_ranks=(2, 3))
    gone = tmp_path / "gone"
    cases = [
        (CALIB.astype(np.float32), mps, r"^calib: expected integer token ids \[nsamples, "
         r"seqlen\], got float32\[5, 12\]$"),
        (CALIB[0], mps, r"^calib: expected integer token ids .*, got int64\[12\]$"),
        (CALIB[:0], mps, r"^calib: expected integer token ids .*, got int64\[0, 12\]$"),
        (np.tile(CALIB, 3), mps, r"^input_ids: 36 tokens exceed the model's 32 learned"),
        (CALIB, dataclasses.replace(mps, offload_dir=str(gone)),
         rf"^offload_dir: {gone} is not a directory$"),
    ]  # fmt: skip
    for calib, config, match in cases:
        with pytest.raises(UserError, match=match) as e:
            compress(params, cfg, calib, config=config, progress=False)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the MPS step


def _np_tt_matrix(w: np.ndarray, in_modes, out_modes, eps: float) -> tuple[np.ndarray, list]:
    """numpy TT-SVD oracle of the MPO of ``w [in, out]`` with the energy rule: per unfolding
    the fewest singular values whose squared sum reaches ``eps`` of the total (float64 SVDs).
    Returns ``(the reconstructed [in, out] matrix, bond ranks)``."""
    w = np.asarray(w, np.float64)
    d = len(in_modes)
    merged = [m * n for m, n in zip(in_modes, out_modes, strict=True)]
    t = w.reshape(*in_modes, *out_modes).transpose([x for k in range(d) for x in (k, d + k)])
    c, r, cores, ranks = t.reshape(merged), 1, [], []
    for k in range(d - 1):
        u, s, vt = np.linalg.svd(c.reshape(r * merged[k], -1), full_matrices=False)
        frac = np.cumsum(s**2) / np.sum(s**2)
        rk = int(np.argmax(frac >= eps - 1e-12)) + 1
        cores.append(u[:, :rk].reshape(r, merged[k], rk))
        c, r = s[:rk, None] * vt[:rk], rk
        ranks.append(rk)
    cores.append(c.reshape(r, merged[-1], 1))
    full = cores[0]
    for core in cores[1:]:
        full = np.tensordot(full, core, axes=([-1], [0]))
    full = full.reshape([x for k in range(d) for x in (in_modes[k], out_modes[k])])
    full = full.transpose([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    return full.reshape(w.shape), ranks


@pytest.fixture(scope="module")
def opt_mps(opt_done):
    """The opt model of ``opt_done`` (dense ``a``) again with the MPS step at eps 0.9."""
    cfg, params, dense, _ = opt_done
    config = TuckerConfig(
        variant="tucker_mps", basis_ranks=(2, 3), batch_size=4, mps_eps=0.9, n_cores=3
    )
    out, rep = compress(params, cfg, CALIB, config=config, progress=False)
    return cfg, params, dense, out, rep


def test_mps_step_is_tt_svd_of_the_projected_weight(opt_mps):
    """With mps_eps < 1 each projection's ``a = W (I (x) P)`` becomes a nested TT-matrix
    (numpy TT-SVD oracle at the same eps); the bases, biases, o_proj fold and the latent KV
    cache are those of the dense-``a`` run."""
    from jcompress.decomp import factorize
    from jcompress.tucker import TTLinear

    cfg, params, dense, out, rep = opt_mps
    fd, fm = flatten(dense), flatten(out)
    pre = "model/decoder/layers/0/self_attn"
    for role in ("k_proj", "q_proj", "v_proj"):
        leaf, ref = fm[f"{pre}/{role}/kernel"], fd[f"{pre}/{role}/kernel"]
        assert isinstance(leaf, HeadLowRank) and isinstance(leaf.a, TTLinear)
        assert not isinstance(ref.a, TTLinear) and leaf.shape == ref.shape == (32, 32)
        np.testing.assert_array_equal(leaf.b, ref.b)  # same basis
        bias, ref_bias = fm[f"{pre}/{role}/bias"], fd[f"{pre}/{role}/bias"]
        assert isinstance(bias, HeadLatentBias)
        np.testing.assert_array_equal(bias.z, ref_bias.z)
        np.testing.assert_array_equal(bias.ut, leaf.b)  # on the nested leaf's basis
        a = np.asarray(ref.a, np.float64)  # [32, 2 heads * 6]
        want, ranks = _np_tt_matrix(a, factorize(32, 3), factorize(12, 3), 0.9)
        assert leaf.a.ranks == (1, *ranks, 1)
        assert len(leaf.a.cores) == 3 and leaf.a.shape == (32, 12)
        got = np.asarray(materialize(leaf.a), np.float64)
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(a).max())
        # the energy bound of TT-SVD: ||a - a_tt||^2 <= (d - 1)(1 - eps) ||a||^2
        assert np.sum((got - a) ** 2) <= 2 * 0.1 * np.sum(a**2) * (1 + 1e-4)
        # apply contracts the cores (== the materialized product)
        x = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
        np.testing.assert_allclose(leaf.apply(x), x @ np.asarray(materialize(leaf)), atol=1e-4)
        p = next(p for p in rep.projections if p.path == f"{pre}/{role}")
        assert p.ranks == (6, *ranks) and p.params_after == leaf.num_params
        assert leaf.num_params == sum(c.size for c in leaf.a.cores) + leaf.b.size
    assert fm[f"{pre}/out_proj/kernel"].ut.shape == fd[f"{pre}/out_proj/kernel"].ut.shape
    assert rep.kv_cache_after == 24 and rep.settings["mps_eps"] == 0.9
    # the reported layer output error is that of the whole projection, TT included
    cap = Capture(outputs=r"model/decoder/layers/0")
    _, c0 = jcompress.forward(cfg, params, CALIB, capture=cap)
    _, c1 = jcompress.forward(cfg, out, CALIB, capture=cap)
    y0 = np.asarray(c0["outputs"]["model/decoder/layers/0"], np.float64)
    y1 = np.asarray(c1["outputs"]["model/decoder/layers/0"], np.float64)
    (_, err), = rep.layer_errors  # fmt: skip
    assert err == pytest.approx(np.linalg.norm(y1 - y0) / np.linalg.norm(y0), rel=1e-3)


def test_mps_forward_on_nested_leaves_and_checkpoints(opt_mps, tmp_path):
    """Forward on the nested leaves == on the materialized weights; both checkpoint formats
    restore the nested TT-matrix bit-exactly; the dense HF export stands for the same model."""
    from safetensors import safe_open

    cfg, _, _, out, rep = opt_mps
    want = jcompress.forward(cfg, out, CALIB)
    np.testing.assert_allclose(want, jcompress.forward(cfg, materialize(out), CALIB), atol=1e-5)

    def same(a, b):
        fa, fb = flatten(a), flatten(b)
        assert fa.keys() == fb.keys()
        for k in fa:
            assert type(fa[k]) is type(fb[k]), k
            if isinstance(fa[k], HeadLowRank):
                assert type(fa[k].a) is type(fb[k].a), k
            la, lb = jax.tree.leaves(fa[k]), jax.tree.leaves(fb[k])
            assert len(la) == len(lb)
            for x, y in zip(la, lb, strict=True):
                assert x.dtype == y.dtype and x.shape == y.shape
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    from jcompress import checkpoint

    checkpoint.save(tmp_path / "ckpt", cfg, out)
    same(out, checkpoint.restore(tmp_path / "ckpt")[1])
    import transformers

    hf = transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=48,
        max_position_embeddings=32, word_embed_proj_dim=32, activation_function="relu",
    ).to_dict()  # fmt: skip
    cfg = dataclasses.replace(cfg, hf_config=hf)  # config.json for save_hf
    jcompress.save_hf(cfg, out, tmp_path / "hf", factors=True)
    cfg_back, back = jcompress.load_hf(tmp_path / "hf")
    ids_unset = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    assert dataclasses.replace(cfg_back, **ids_unset) == cfg
    same(out, back)
    np.testing.assert_array_equal(jcompress.forward(cfg, back, CALIB), want)
    # the report counts what the factor checkpoint stores; a checkpoint of the old layout
    # (full-width projected biases) stores 2 heads * (16 - 6) more per bias and still loads
    old = _widened(out)
    jcompress.save_hf(cfg, old, tmp_path / "old", factors=True)
    _, old_back = jcompress.load_hf(tmp_path / "old")
    same(old, old_back)  # (the widened model's logits: test_opt_biases_in_rank_space)
    written = {}
    for name in ("hf", "old"):
        with safe_open(tmp_path / name / "jcompress_model.safetensors", framework="np") as fh:
            written[name] = sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys())
    assert written["hf"] == rep.params_after
    assert written["old"] - written["hf"] == 3 * 2 * (16 - 6)
    jcompress.save_hf(cfg, out, tmp_path / "dense")
    _, dense = jcompress.load_hf(tmp_path / "dense")
    np.testing.assert_allclose(jcompress.forward(cfg, dense, CALIB), want, atol=1e-5)


def test_mps_fixed_ranks_gqa_latent_cache_decode():
    """Llama (RoPE, GQA 4/2) with fixed TT ranks on the projected k/v weights: the KV cache
    holds the rank-r latents (``down`` contracts the TT cores) and prefill + one-token decode
    steps give the full forward's logits."""
    from jcompress.models.forward import forward_cached, init_cache
    from jcompress.tucker import TTLinear

    cfg, params = _llama()
    config = TuckerConfig(variant="tucker_mps", basis_ranks=(2, 2), tt_ranks=(3,), n_cores=2)
    # CALIB as in test_full_basis_reproduces_the_model_and_llama_gqa (same model, same bases):
    # its calibration stream and dense forward are compiled once for both tests
    out, rep = compress(params, cfg, CALIB, config=config, progress=False)
    f = flatten(out)
    for i in range(2):
        for role in ("k_proj", "v_proj"):
            leaf = f[f"model/layers/{i}/self_attn/{role}/kernel"]
            assert isinstance(leaf.a, TTLinear) and leaf.a.ranks == (1, 3, 1)
    assert rep.kv_cache_after == 2 * 2 * (4 + 4) and rep.settings["tt_ranks"] == [3]
    ids = CALIB
    full = jcompress.forward(cfg, out, ids)
    np.testing.assert_allclose(full, jcompress.forward(cfg, materialize(out), ids), atol=5e-5)
    cache = init_cache(cfg, out, 5, ids.shape[1])
    assert all(c.shape == (5, ids.shape[1], 8) for c in cache.k + cache.v)
    mask = np.ones((5, 10), bool)
    # jitted as generate does (one program for the prefill, one for a decode step; eager,
    # every op of the model compiled on its own)
    run = jax.jit(forward_cached, static_argnums=0)
    logits, cache = run(cfg, out, ids[:, :10], mask, cache)
    steps = [logits]
    for t in range(10, ids.shape[1]):
        step, cache = run(cfg, out, ids[:, t : t + 1], mask[:, :1], cache)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=5e-5, rtol=1e-5)
    # a fixed rank that does not fit the projected weight: one line before any work
    bad = TuckerConfig(variant="tucker_mps", basis_ranks=(2, 2), tt_ranks=(99,), n_cores=2)
    with pytest.raises(UserError, match=r"^tt_ranks: .* for the projected weight of k/v_proj"):
        compress(params, cfg, CALIB, config=bad, progress=False)
