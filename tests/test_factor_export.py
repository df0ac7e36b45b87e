"""``save_hf(..., factors=True)``: typed leaves kept as factors and read back losslessly."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress.leaves import CompressedLeaf, LowRank, Residual, register_leaf
from jcompress.models.convert import flatten, unflatten


class _Fmt(enum.Enum):
    FP8 = "fp8"


@dataclasses.dataclass(frozen=True)
class _Spec:
    fmt: _Fmt = _Fmt.FP8
    dtype: Any = np.dtype(jnp.float8_e4m3fn)
    clip: float = float("inf")


@register_leaf
class _Fp8TestLeaf(CompressedLeaf):
    """A third-party leaf with a dataclass static (an enum, an ml_dtypes dtype, an infinite
    float): ``W = q * scale[None, :]`` (``q: [in, out]`` float8_e4m3fn, ``scale: [out]``)."""

    q: Any
    scale: Any
    spec: _Spec = _Spec()
    array_fields: ClassVar[tuple[str, ...]] = ("q", "scale")

    @classmethod
    def quantize(cls, w):
        scale = jnp.max(jnp.abs(w), axis=0) / 448
        return cls((w / scale).astype(jnp.float8_e4m3fn), scale)

    @property
    def shape(self):
        return tuple(self.q.shape)

    def materialize(self):
        return self.q.astype(self.scale.dtype) * self.scale

    def apply(self, x):
        return (x @ self.q.astype(x.dtype)) * self.scale


@pytest.fixture(scope="module")
def compressed(llama_dir):
    cfg, params = jcompress.load_hf(llama_dir)
    layer = params["model"]["layers"]["1"]
    w = layer["self_attn"]["k_proj"]["kernel"]  # [128, 4 * 16]
    u = jnp.linalg.svd(w.reshape(128, 4, 16).transpose(1, 0, 2))[2][:, :5].transpose(0, 2, 1)
    a = jnp.einsum("ihd,hdr->ihr", w.reshape(128, 4, 16), u).reshape(128, 20)
    layer["self_attn"]["k_proj"]["kernel"] = jcompress.HeadLowRank(a, u.transpose(0, 2, 1))
    q = layer["mlp"]["up_proj"]["kernel"]
    uu, s, vt = jnp.linalg.svd(q, full_matrices=False)
    layer["mlp"]["up_proj"]["kernel"] = jcompress.LowRank(uu[:, :7] * s[:7], vt[:7])
    return cfg, params


def _same(p, q):
    assert jax.tree.structure(p) == jax.tree.structure(q)
    for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(q), strict=True):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("shard", [None, 200_000])
def test_factors_round_trip(compressed, tmp_path, shard):
    cfg, params = compressed
    kw = {} if shard is None else {"max_shard_bytes": shard}
    out = jcompress.save_hf(cfg, params, tmp_path / "f", factors=True, **kw)
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names
    assert any(n.startswith("jcompress_model") for n in names)
    meta = json.loads((out / "config.json").read_text())["jcompress_factors"]
    kids = {"a": "array", "b": "array"}
    assert meta["leaves"] == {
        "model/layers/1/self_attn/k_proj/kernel": {
            "type": "jcompress.leaves.HeadLowRank",
            "static": {},
            "children": kids,
        },
        "model/layers/1/mlp/up_proj/kernel": {
            "type": "jcompress.leaves.LowRank",
            "static": {},
            "children": kids,
        },
    }
    cfg2, params2 = jcompress.load_hf(out)
    _same(params, params2)
    ids = jnp.arange(1, 33)[None]
    np.testing.assert_array_equal(
        np.asarray(jcompress.forward(cfg, params, ids)),
        np.asarray(jcompress.forward(cfg2, params2, ids)),
    )
    # saving the reloaded tree densely drops the factor entry: a stock checkpoint again
    dense = jcompress.save_hf(cfg2, params2, tmp_path / "d")
    assert "jcompress_factors" not in json.loads((dense / "config.json").read_text())
    _, params3 = jcompress.load_hf(dense)
    np.testing.assert_allclose(
        np.asarray(params3["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"]),
        np.asarray(params["model"]["layers"]["1"]["mlp"]["up_proj"]["kernel"].materialize()),
        rtol=0,
        atol=0,
    )


def test_reads_factor_checkpoints_of_the_first_format(compressed, tmp_path):
    # files written before leaf_io: bare class names, no "children"
    cfg, params = compressed
    out = jcompress.save_hf(cfg, params, tmp_path / "f", factors=True)
    conf = json.loads((out / "config.json").read_text())
    conf["jcompress_factors"]["leaves"] = {
        "model/layers/1/self_attn/k_proj/kernel": {"type": "HeadLowRank", "static": {}},
        "model/layers/1/mlp/up_proj/kernel": {"type": "LowRank", "static": {}},
    }
    (out / "config.json").write_text(json.dumps(conf))
    _, params2 = jcompress.load_hf(out)
    _same(params, params2)


def test_factors_third_party_and_nested_leaves(llama_dir, tmp_path):
    cfg, params = jcompress.load_hf(llama_dir)
    flat = flatten(params)
    down = "model/layers/0/mlp/down_proj/kernel"
    w = flat[down]
    # LowRank whose b is a quantized leaf, plus a quantized residual
    base = LowRank(w[:, :4], _Fp8TestLeaf.quantize(w[:4]))
    flat[down] = Residual(base, _Fp8TestLeaf.quantize(w - base.materialize()))
    flat["model/layers/1/self_attn/o_proj/kernel"] = _Fp8TestLeaf.quantize(
        flat["model/layers/1/self_attn/o_proj/kernel"]
    )
    emb = flat["model/embed_tokens/embedding"]
    flat["model/embed_tokens/embedding"] = LowRank(emb[:, :16], jnp.eye(16, emb.shape[1]))
    comp = unflatten(flat)
    out = jcompress.save_hf(cfg, comp, tmp_path / "f", factors=True, max_shard_bytes=300_000)
    meta = json.loads((out / "config.json").read_text())["jcompress_factors"]["leaves"]
    assert meta[down]["type"] == "jcompress.leaves.Residual"
    assert meta[down]["children"]["residual"]["static"]["spec"]["fields"]["clip"] == {
        "__float__": "inf"
    }
    _, comp2 = jcompress.load_hf(out)
    chex.assert_trees_all_equal(comp2, comp)
    chex.assert_trees_all_equal_dtypes(comp2, comp)
    leaf = flatten(comp2)[down]
    assert isinstance(leaf.residual, _Fp8TestLeaf) and leaf.residual.spec == _Spec()
    assert leaf.base.b.q.dtype == jnp.float8_e4m3fn
    ids = jnp.arange(1, 33)[None]
    np.testing.assert_array_equal(
        np.asarray(jcompress.forward(cfg, comp, ids)),
        np.asarray(jcompress.forward(cfg, comp2, ids)),
    )


def test_transformers_refuses_factor_checkpoint(compressed, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg, params = compressed
    out = jcompress.save_hf(cfg, params, tmp_path / "f", factors=True)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(out)


def test_factor_checkpoint_errors(compressed, tmp_path):
    cfg, params = compressed
    out = jcompress.save_hf(cfg, params, tmp_path / "f", factors=True)
    conf = json.loads((out / "config.json").read_text())
    conf["jcompress_factors"]["leaves"]["model/layers/1/mlp/up_proj/kernel"]["type"] = "Nope"
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(jcompress.UserError, match="unknown leaf type 'Nope'"):
        jcompress.load_hf(out)
    conf["jcompress_factors"] = "garbage"
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(jcompress.UserError, match="malformed jcompress_factors"):
        jcompress.load_hf(out)


def test_dense_save_still_default(compressed, tmp_path):
    cfg, params = compressed
    out = jcompress.save_hf(cfg, params, tmp_path / "d")
    assert (out / "model.safetensors").is_file()
    _, dense = jcompress.load_hf(out)
    ids = jnp.arange(1, 33)[None]
    np.testing.assert_allclose(
        np.asarray(jcompress.forward(cfg, dense, ids)),
        np.asarray(jcompress.forward(cfg, params, ids)),
        atol=1e-4,
    )


def test_equal_factors_stored_once_and_relinked(compressed, tmp_path):
    """EigenAttention's V basis and o_proj's folded basis (equal arrays, here two objects) are
    stored once and linked (format 2); loading relinks them to one array, exactly. K's basis
    has the same shape but other values: stored on its own."""
    from jcompress.leaves import HeadFoldedOut, HeadLowRank
    from jcompress.models import count_params
    from jcompress.streaming.loader import LayerLoader

    cfg, params = compressed
    flat = flatten(params)
    att = "model/layers/1/self_attn"
    wv, wo = flat[f"{att}/v_proj/kernel"], flat[f"{att}/o_proj/kernel"]  # [128, 64], [128, 128]
    u = jnp.linalg.svd(wv.reshape(128, 4, 16).transpose(1, 0, 2))[2][:, :5]  # [4, 5, 16] = U^T
    a = jnp.einsum("ihd,hrd->ihr", wv.reshape(128, 4, 16), u).reshape(128, 20)
    folded = jnp.einsum("hrd,hdo->hro", jnp.repeat(u, 2, axis=0), wo.reshape(8, 16, 128))
    flat[f"{att}/v_proj/kernel"] = HeadLowRank(a, u, basis="test")
    flat[f"{att}/o_proj/kernel"] = HeadFoldedOut(folded.reshape(40, 128), jnp.array(u, copy=True))
    params = unflatten(flat)
    out = jcompress.save_hf(cfg, params, tmp_path / "f", factors=True)
    meta = json.loads((out / "config.json").read_text())["jcompress_factors"]
    v_b, o_ut = (f"jcompress/{att}/{r}" for r in ("v_proj/kernel/b", "o_proj/kernel/ut"))
    assert meta["format"] == 2 and meta["links"] in ({o_ut: v_b}, {v_b: o_ut})
    from safetensors import safe_open

    with safe_open(out / "jcompress_model.safetensors", framework="np") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    (linked,) = meta["links"]
    assert linked not in stored and meta["links"][linked] in stored
    assert sum(x.size for x in stored.values()) == count_params(params) - u.size
    _, back = jcompress.load_hf(out)
    _same(params, back)
    fb = flatten(back)
    assert fb[f"{att}/o_proj/kernel"].ut is fb[f"{att}/v_proj/kernel"].b  # one array again
    assert fb[f"{att}/v_proj/kernel"].basis == "test"
    layer = LayerLoader(out).layer(1)  # the streaming loader follows the links too
    _same(
        {k: v for k, v in layer.items() if k.startswith(att)},
        {k: v for k, v in fb.items() if k.startswith(att)},
    )
    # no equal factors: format 1, no links (what older readers expect)
    out1 = jcompress.save_hf(cfg, compressed[1], tmp_path / "g", factors=True)
    meta1 = json.loads((out1 / "config.json").read_text())["jcompress_factors"]
    assert meta1["format"] == 1 and "links" not in meta1
    conf = json.loads((out / "config.json").read_text())
    conf["jcompress_factors"]["format"] = 3
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(jcompress.UserError, match="format 3"):
        jcompress.load_hf(out)


def test_eigen_report_counts_parameters_as_the_factor_checkpoint_stores_them(tmp_path):
    """EigenAttention's ``params_after`` counts K's/Q's shared basis and V's basis / o_proj's
    copy once: it equals the scalars ``save_hf(factors=True)`` writes (read back from the
    files), and the full tree's count less one ``[heads, r, d]`` basis per shared pair."""
    from _tiny import hf_config
    from safetensors import safe_open

    from jcompress.compose import REGISTRY
    from jcompress.compose.registry import leaf_infos
    from jcompress.eigen_attention import EigenAttentionConfig, compress
    from jcompress.leaves import HeadFoldedOut, HeadLatentBias, HeadLowRank
    from jcompress.models import count_params
    from jcompress.models.families import config_from_hf

    cfg = config_from_hf(hf_config("opt").to_dict())
    params = jcompress.init_params(cfg, jax.random.key(0), std=0.3)
    rng = np.random.default_rng(0)  # random biases: zero ones would be equal arrays too
    params = unflatten(
        {
            k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) if k.endswith("bias") else v
            for k, v in flatten(params).items()
        }
    )
    calib = rng.integers(2, cfg.vocab_size, (4, 16), dtype=np.int32)
    config = EigenAttentionConfig(
        nsamples=4, seqlen=16, avg_dim=1, error_budget=0.5, min_rank=0, start_threshold=0.8
    )
    small, report = compress(params, cfg, calib, config=config, progress=False)
    assert any(r.compressed for r in report.layers)
    out = jcompress.save_hf(cfg, small, tmp_path / "f", factors=True)
    with safe_open(out / "jcompress_model.safetensors", framework="np") as f:
        written = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert report.params_after == written
    flat = flatten(small)
    shared = 0  # copies of a basis: Q's (K's), o_proj's (V's), and each projected bias's
    for i in range(cfg.num_layers):
        att = {
            k.split(f"/{i}/self_attn/")[1]: v for k, v in flat.items() if f"/{i}/self_attn/" in k
        }
        if isinstance(att.get("q_proj/kernel"), HeadLowRank):
            assert np.array_equal(att["q_proj/kernel"].b, att["k_proj/kernel"].b)
            shared += att["q_proj/kernel"].b.size
        if isinstance(att.get("out_proj/kernel"), HeadFoldedOut):
            assert np.array_equal(att["out_proj/kernel"].ut, att["v_proj/kernel"].b)
            shared += att["out_proj/kernel"].ut.size
        for role in ("q_proj", "k_proj", "v_proj"):
            if isinstance(att[f"{role}/kernel"], HeadLowRank):
                bias = att[f"{role}/bias"]  # rank-r coordinates on the kernel's own basis
                assert isinstance(bias, HeadLatentBias)
                assert np.array_equal(bias.ut, att[f"{role}/kernel"].b)
                assert bias.z.size == att[f"{role}/kernel"].latent_width
                shared += bias.ut.size
    assert shared > 0 and report.params_after == count_params(small) - shared
    # the chain's pre-flight plan announces every type written (rank-space biases too)
    before = leaf_infos(params)
    plan = {**before, **REGISTRY["eigen_attention"].plan(cfg, config, before)}
    for path, info in leaf_infos(small).items():
        assert info.types <= plan[path].types, path
    _, back = jcompress.load_hf(out)
    _same(small, back)
    assert report.params_before == count_params(params)
