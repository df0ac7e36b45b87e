"""Every family variant: config parsing, pytree layout, and fp32 logits parity with transformers.

One tiny random model per variant (see ``_tiny.VARIANTS``) is built, saved with
``save_pretrained`` and loaded with ``jcompress.load_hf`` once per module. All forwards use the
same ``[3, SEQ]`` batch (unpadded, left-padded, right-padded rows), so each variant compiles once
in fp32; the bf16 and "feature is load-bearing" checks add one compile each for a few variants.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _tiny import (
    LAYERS,
    NAMES,
    PAD,
    SEQ,
    VARIANTS,
    VOCAB,
    batch,
    hf_config,
    hf_logits,
    jx_logits,
    make_model,
    read_json,
    real,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

import jcompress
from jcompress.models import config_from_hf, count_params, param_shapes
from jcompress.models.convert import flatten
from jcompress.models.forward import _alibi_slopes, _inv_freq

TOL = 1e-4  # fp32 parity, max abs logit difference


def _build(name: str, tmp_path_factory) -> SimpleNamespace:
    model = make_model(name)
    model_dir = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(model_dir)
    cfg, params = jcompress.load_hf(model_dir)
    ids, mask = batch()
    return SimpleNamespace(
        name=name,
        model=model,
        dir=model_dir,
        cfg=cfg,
        params=params,
        ids=ids,
        mask=mask,
        ref=hf_logits(model, ids, mask),
        out=jx_logits(cfg, params, ids, mask),
    )


@pytest.fixture(scope="module")
def _built():
    return {}


@pytest.fixture(scope="module", params=NAMES)
def tiny(request, _built, tmp_path_factory):
    """One built variant; cached so that tests parametrizing ``tiny`` indirectly reuse it."""
    if request.param not in _built:
        _built[request.param] = _build(request.param, tmp_path_factory)
    return _built[request.param]


def _maxdiff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


# --------------------------------------------------------------------------- config and layout


def test_config_fields(tiny):
    cfg = tiny.cfg
    assert cfg.vocab_size == VOCAB
    assert cfg.num_layers == LAYERS
    assert cfg.hidden_size == tiny.model.config.hidden_size
    assert cfg.num_heads == tiny.model.config.num_attention_heads
    for field, want in VARIANTS[tiny.name][2].items():
        assert getattr(cfg, field) == want, f"{field}: {getattr(cfg, field)!r} != {want!r}"
    assert cfg.hf_config["model_type"] == tiny.model.config.model_type


def test_param_tree_shapes_and_count(tiny):
    flat = flatten(tiny.params)
    assert {k: tuple(v.shape) for k, v in flat.items()} == param_shapes(tiny.cfg)
    assert all(v.dtype == jnp.float32 for v in flat.values())
    # every HF parameter is represented exactly once (a tied head is not duplicated)
    assert count_params(tiny.params) == tiny.model.num_parameters()


def _layout_checks(name: str, model) -> list[tuple[str, np.ndarray]]:
    """(pytree path, the HF tensor it must equal after the family's layout change)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    h = model.config.hidden_size
    if name.startswith(("llama", "qwen")):
        p = "model.layers.1"
        checks = [
            ("model/layers/1/self_attn/k_proj/kernel", sd[f"{p}.self_attn.k_proj.weight"].T),
            ("model/layers/1/mlp/gate_proj/kernel", sd[f"{p}.mlp.gate_proj.weight"].T),
            ("model/embed_tokens/embedding", sd["model.embed_tokens.weight"]),
        ]
        if name == "qwen2":
            b = sd[f"{p}.self_attn.v_proj.bias"]
            checks.append(("model/layers/1/self_attn/v_proj/bias", b))
        if name == "qwen3":
            s = sd[f"{p}.self_attn.k_norm.weight"]
            checks.append(("model/layers/1/self_attn/k_norm/scale", s))
        return checks
    if name.startswith("opt"):
        p = "model.decoder.layers.1"
        checks = [
            (
                "model/decoder/layers/1/self_attn/k_proj/kernel",
                sd[f"{p}.self_attn.k_proj.weight"].T,
            ),
            ("model/decoder/layers/1/fc1/bias", sd[f"{p}.fc1.bias"]),
            ("model/decoder/embed_positions/embedding", sd["model.decoder.embed_positions.weight"]),
        ]
        if name == "opt-350m":
            checks += [
                ("model/decoder/project_in/kernel", sd["model.decoder.project_in.weight"].T),
                ("model/decoder/project_out/kernel", sd["model.decoder.project_out.weight"].T),
            ]
        return checks
    if name.startswith("mpt"):
        w = sd["transformer.blocks.1.attn.Wqkv.weight"]  # [3H, H]
        return [
            (f"transformer/blocks/1/attn/Wqkv/{part}/kernel", w[i * h : (i + 1) * h].T)
            for i, part in enumerate("qkv")
        ] + [("transformer/blocks/1/norm_1/scale", sd["transformer.blocks.1.norm_1.weight"])]
    if name.startswith("gpt2"):
        w = sd["transformer.h.1.attn.c_attn.weight"]  # Conv1D: [H, 3H], already [in, out]
        b = sd["transformer.h.1.attn.c_attn.bias"]
        checks = (
            [
                (f"transformer/h/1/attn/c_attn/{part}/kernel", w[:, i * h : (i + 1) * h])
                for i, part in enumerate("qkv")
            ]
            + [
                (f"transformer/h/1/attn/c_attn/{part}/bias", b[i * h : (i + 1) * h])
                for i, part in enumerate("qkv")
            ]
            + [("transformer/h/1/mlp/c_fc/kernel", sd["transformer.h.1.mlp.c_fc.weight"])]
        )
        if not model.config.tie_word_embeddings:
            checks.append(("lm_head/kernel", sd["lm_head.weight"].T))
        return checks
    raise AssertionError(name)


def test_kernel_layout(tiny):
    flat = flatten(tiny.params)
    checks = _layout_checks(tiny.name, tiny.model)
    assert len(checks) >= 3
    for path, want in checks:
        got = np.asarray(flat[path])
        assert got.shape == want.shape, path
        np.testing.assert_array_equal(got, want, err_msg=path)


# --------------------------------------------------------------------------- fp32 parity


def test_logits_are_not_trivial(tiny):
    # the random init must make the parity checks meaningful: O(1) logits that vary over the
    # vocabulary and, beyond a shared offset, from position to position
    ref = tiny.ref[0]
    assert np.std(ref) > 0.3
    assert np.std(ref - ref.mean(axis=0)) > 0.2


def test_parity_unpadded(tiny):
    assert tiny.out.shape == (3, SEQ, VOCAB)
    assert _maxdiff(tiny.out[0], tiny.ref[0]) <= TOL


def test_parity_right_padding(tiny):
    m = tiny.mask
    assert m[2].sum() == SEQ - PAD and m[2, 0] == 1
    assert _maxdiff(real(tiny.out, m, 2), real(tiny.ref, m, 2)) <= TOL


def test_left_padding_equals_unpadded(tiny):
    # Row 1 is row 0's first SEQ - PAD tokens behind PAD random pad tokens. With causal
    # attention, row 0's first SEQ - PAD logits are the logits of that unpadded sequence.
    m = tiny.mask
    assert m[1].sum() == SEQ - PAD and m[1, 0] == 0
    assert _maxdiff(real(tiny.out, m, 1), tiny.out[0, : SEQ - PAD]) <= 1e-5


def test_left_padding_matches_transformers(tiny):
    m = tiny.mask
    assert _maxdiff(real(tiny.out, m, 1), real(tiny.ref, m, 1)) <= TOL


def test_pad_tokens_do_not_leak(tiny):
    # different junk in the pad slots must not change any real position
    ids = tiny.ids.copy()
    ids[1, :PAD] = (ids[1, :PAD] + 1) % VOCAB
    ids[2, SEQ - PAD :] = (ids[2, SEQ - PAD :] + 7) % VOCAB
    out = jx_logits(tiny.cfg, tiny.params, ids, tiny.mask)
    for row in (1, 2):
        np.testing.assert_array_equal(real(out, tiny.mask, row), real(tiny.out, tiny.mask, row))


# --------------------------------------------------------------------------- bf16

# one variant per family (each bf16 run is one more jit compilation)
BF16 = ["opt-350m", "llama-tied-llama3", "qwen2", "qwen3", "mpt-6heads", "gpt2"]


@pytest.mark.parametrize("tiny", BF16, indirect=True)
def test_bf16_close_to_fp32(tiny):
    cfg, params = jcompress.load_hf(tiny.dir, dtype="bfloat16")
    assert cfg == tiny.cfg
    leaves = flatten(params)
    assert leaves and all(v.dtype == jnp.bfloat16 for v in leaves.values())
    logits = jcompress.forward(cfg, params, tiny.ids, tiny.mask)
    assert logits.dtype == jnp.bfloat16
    out = np.asarray(logits.astype(jnp.float32))
    m = tiny.mask
    for row in range(3):
        got, want = real(out, m, row), real(tiny.out, m, row)
        assert np.isfinite(got).all()
        diff = _maxdiff(got, want)
        assert 0 < diff <= 0.1 * np.max(np.abs(want)), (row, diff)


# --------------------------------------------------------------------------- features are exercised

# Switching off one feature in the config must break parity: proves the tiny models actually
# exercise it (e.g. llama3 frequencies are in use at these positions, clip_qkv clamps).
# (ALiBi slopes and the llama3 frequencies are also checked directly against transformers below.)
LOAD_BEARING = [
    ("llama-tied-llama3", "rope_scaling", None),
    ("mpt", "clip_qkv", None),
    ("gpt2-untied-layerscale", "scale_attn_by_inverse_layer_idx", False),
]


@pytest.mark.parametrize(
    "tiny,field,value", LOAD_BEARING, indirect=["tiny"], ids=[x[0] for x in LOAD_BEARING]
)
def test_feature_is_load_bearing(tiny, field, value):
    assert _maxdiff(tiny.out[0], tiny.ref[0]) <= TOL
    cfg = dataclasses.replace(tiny.cfg, **{field: value})
    wrong = jx_logits(cfg, tiny.params, tiny.ids, tiny.mask)
    assert _maxdiff(wrong[0], tiny.ref[0]) > 1e-2


# --------------------------------------------------------------------------- position encodings


@pytest.mark.parametrize("head_dim", [8, 16, 64])
def test_llama3_inv_freq_matches_transformers(head_dim):
    hf = hf_config("llama-tied-llama3", head_dim=head_dim)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = config_from_hf(hf.to_dict())
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3"
    got = _inv_freq(cfg, head_dim)
    default = _inv_freq(dataclasses.replace(cfg, rope_scaling=None), head_dim)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=0)
    assert not np.allclose(got, default)  # scaling changes some frequencies ...
    assert got[0] == default[0]  # ... but never the highest one


def test_linear_rope_scaling_matches_transformers():
    params = dict(rope_type="linear", rope_theta=500.0, factor=4.0)
    hf = hf_config("llama", rope_parameters=params)
    want, _ = ROPE_INIT_FUNCTIONS["linear"](hf, "cpu")
    cfg = config_from_hf(hf.to_dict())
    assert cfg.rope_theta == 500.0
    np.testing.assert_allclose(_inv_freq(cfg, cfg.head_dim), want.numpy(), rtol=1e-6, atol=0)


def test_old_style_rope_config_parses_the_same(tiny_llama3_config):
    new = tiny_llama3_config
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    rp = dict(new["rope_parameters"])
    old["rope_theta"] = rp.pop("rope_theta")
    rp["type"] = rp.pop("rope_type")  # the oldest spelling
    old["rope_scaling"] = rp
    old["torch_dtype"] = old.pop("dtype", "float32")
    assert config_from_hf(old) == config_from_hf(new)


def test_llama3_scaling_without_required_key_is_user_error(tiny_llama3_config):
    d = dict(tiny_llama3_config)
    d["rope_parameters"] = {
        k: v for k, v in d["rope_parameters"].items() if k != "original_max_position_embeddings"
    }
    with pytest.raises(jcompress.UserError, match="llama3.*original_max_position_embeddings"):
        config_from_hf(d)


@pytest.mark.parametrize("clip, want", [(0.0, None), (None, None), (2.0, 2.0)])
def test_mpt_clip_qkv_follows_transformers(clip, want):
    # transformers clamps only when attn_config.clip_qkv is truthy
    d = hf_config("mpt", attn_config={"clip_qkv": clip}).to_dict()
    assert config_from_hf(d).clip_qkv == want


@pytest.fixture(scope="module")
def tiny_llama3_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    hf_config("llama-tied-llama3").save_pretrained(d)
    return read_json(d / "config.json")


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
def test_alibi_slopes_match_transformers(heads):
    cfg = jcompress.ModelConfig(
        family="mpt",
        vocab_size=8,
        hidden_size=8 * heads,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=8,
        intermediate_size=8,
        max_position_embeddings=8,
        position="alibi",
        norm="layer",
    )
    alibi = build_mpt_alibi_tensor(heads, 2)  # [heads, 1, 2]: (key - last key) * slope
    want = -alibi[:, 0, 0].to(torch.float32).numpy()
    np.testing.assert_allclose(_alibi_slopes(cfg), want, rtol=1e-7)
    assert len(set(want.tolist())) == heads
