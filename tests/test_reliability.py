"""Issue #17: broken input never returns a number.

Tables of bad inputs, each of which must raise :class:`jcompress.UserError` with a one-line
message naming the argument / tensor / field. Checkpoints are temporary copies of the shared
``llama-1m`` (the shared files themselves are checked to stay untouched); the rest uses tiny
random models (``init_params``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcompress
from jcompress import validate
from jcompress.data import calibration_windows, eval_windows, load_tokenizer
from jcompress.eval import check_seqlen
from jcompress.models import read_config
from jcompress.models.attention import Chunked
from jcompress.models.config import ModelConfig
from jcompress.models.families import config_from_hf

REPO = Path(__file__).resolve().parents[1]


def user_error(fn, *words: str) -> str:
    """``fn()`` must raise UserError with a one-line message containing every word."""
    with pytest.raises(jcompress.UserError) as ei:
        fn()
    msg = str(ei.value)
    assert msg and "\n" not in msg, msg
    for w in words:
        assert str(w) in msg, f"{w!r} not in {msg!r}"
    return msg


def _digest(d: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module", autouse=True)
def shared_untouched(llama_dir):
    """Sentinel: no test here may modify the shared model files it copies."""
    before = _digest(llama_dir)
    yield
    assert _digest(llama_dir) == before, "a test modified ../shared/data/models/llama-1m"


@pytest.fixture
def model(llama_dir, tmp_path) -> Path:
    """A writable copy of llama-1m (the shared files are read-only)."""
    out = tmp_path / "llama-1m"
    out.mkdir()
    for p in llama_dir.iterdir():
        if p.is_file():
            shutil.copyfile(p, out / p.name)
    return out


# --------------------------------------------------------------------------- safetensors


def _read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_st(path: Path, header, data: bytes, *, raw_header: bytes | None = None) -> None:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _edit(key: str, **changes):
    def f(header, data):
        header[key].update(changes)
        return header, data

    return f


def _overlap(header, data):
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    return header, data


def _shift_all(delta):
    def f(header, data):
        for k, v in header.items():
            if k != "__metadata__":
                v["data_offsets"] = [o + delta for o in v["data_offsets"]]
        return header, data

    return f


NORM = "model.norm.weight"
ST_CASES = {
    "relabel F32 as I32": (_edit(NORM, dtype="I32"), [NORM, "int32", "floating-point"]),
    "relabel F32 as BOOL": (_edit(NORM, dtype="BOOL", shape=[512]), [NORM, "bool"]),
    "unknown dtype": (_edit(NORM, dtype="F31"), [NORM, "unknown dtype 'F31'", "F32"]),
    "dtype not a string": (_edit(NORM, dtype=4), [NORM, "unknown dtype"]),
    "overlapping offsets": (_overlap, ["model.layers", "overlaps"]),
    "size mismatch": (_edit(NORM, shape=[129]), [NORM, "needs 516"]),
    "float offsets": (_edit(NORM, data_offsets=[0.0, 512.0]), [NORM, "data_offsets"]),
    "bool shape": (_edit(NORM, shape=[True]), [NORM, "shape"]),
    "negative shape": (_edit(NORM, shape=[-128]), [NORM, "shape"]),
    "end before begin": (_edit(NORM, data_offsets=[512, 0]), [NORM, "data_offsets"]),
    "missing field": (lambda h, d: ({**h, NORM: {"dtype": "F32"}}, d), [NORM, "data_offsets"]),
    "entry not an object": (lambda h, d: ({**h, NORM: [1, 2]}, d), [NORM]),
    "gap at the start": (_shift_all(8), ["gap at 0"]),
    "truncated data": (lambda h, d: (h, d[:-100]), ["truncated"]),
    "trailing bytes": (lambda h, d: (h, d + b"\0" * 8), ["8 bytes after the last tensor"]),
    "metadata not an object": (lambda h, d: ({**h, "__metadata__": [1]}, d), ["__metadata__"]),
    "header a list": (lambda h, d: ([1, 2], d), ["not a JSON object"]),
}


@pytest.mark.parametrize("case", list(ST_CASES))
def test_corrupt_safetensors(model, case):
    mutate, words = ST_CASES[case]
    path = model / "model.safetensors"
    header, data = _read_st(path)
    header, data = mutate(header, data)
    _write_st(path, header, data)
    user_error(lambda: jcompress.load_hf(model), "model.safetensors", *words)


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"", ["0 bytes"]),
        (b"\x10\0\0", ["3 bytes"]),
        (struct.pack("<Q", 1 << 40) + b"{}", ["header length"]),
        (struct.pack("<Q", 8) + b"{not js}", ["not JSON"]),
        (struct.pack("<Q", 8) + b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8", ["not JSON"]),
    ],
)
def test_truncated_safetensors_file(model, raw, words):
    (model / "model.safetensors").write_bytes(raw)
    user_error(lambda: jcompress.load_hf(model), "model.safetensors", *words)


# --------------------------------------------------------------------------- non-finite weights


def _poison(model: Path, name: str, value: float, index: int = 3) -> None:
    path = model / "model.safetensors"
    header, data = _read_st(path)
    begin = header[name]["data_offsets"][0] + 4 * index
    data = data[:begin] + np.float32(value).tobytes() + data[begin + 4 :]
    _write_st(path, header, data)


@pytest.mark.parametrize(
    "name, value",
    [
        ("model.layers.1.mlp.up_proj.weight", math.nan),
        ("model.norm.weight", math.inf),
        ("lm_head.weight", -math.inf),
    ],
)
def test_nonfinite_weights(model, name, value):
    _poison(model, name, value)
    user_error(lambda: jcompress.load_hf(model), name, "1 of", "NaN or Inf", "allow_nonfinite")
    _, params = jcompress.load_hf(model, allow_nonfinite=True)  # the debugging escape hatch
    assert not all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_finite_weights_that_overflow_are_an_error_not_a_nan(llama_dir):
    """Weights that pass the load-time check but overflow float32 in the forward pass: the
    perplexity and EigenAttention's bases say so instead of a NaN perplexity or a LinAlgError."""
    from jcompress.data import calibration_windows as windows
    from jcompress.eigen_attention import EigenAttentionConfig, compress

    cfg, params = jcompress.load_hf(llama_dir)
    mlp = params["model"]["layers"]["1"]["mlp"]
    for name in ("up_proj", "gate_proj"):
        mlp[name]["kernel"] = mlp[name]["kernel"] * 1e30
    ids = np.arange(600) % cfg.vocab_size
    user_error(lambda: jcompress.perplexity(cfg, params, ids, seqlen=64, max_windows=2),
               "window 0 of 2", "non-finite logits")  # fmt: skip
    prompt = jnp.asarray(ids[None, :8])
    user_error(lambda: jcompress.generate(cfg, params, prompt, max_new_tokens=3),
               "generate", "non-finite logits")  # fmt: skip
    calib = windows(ids, 2, 64)
    user_error(lambda: compress(params, cfg, calib, config=EigenAttentionConfig(avg_dim=1)),
               "model/layers/2", "not finite")  # fmt: skip


def test_nonfinite_factor_checkpoint(llama_dir, tmp_path):
    """Typed-leaf arrays of a factor checkpoint go through the same check."""
    cfg, params = jcompress.load_hf(llama_dir)
    attn = params["model"]["layers"]["0"]["self_attn"]
    w = np.asarray(attn["k_proj"]["kernel"])
    a, b = w[:, :8].copy(), np.eye(8, w.shape[1], dtype=w.dtype)
    a[0, 0] = np.nan
    attn["k_proj"]["kernel"] = jcompress.LowRank(jnp.asarray(a), jnp.asarray(b))
    user_error(
        lambda: jcompress.save_hf(cfg, params, tmp_path / "f", factors=True),
        "model/layers/0/self_attn/k_proj/kernel/a",
        "1 of 1024 values are NaN or Inf",
    )
    assert not (tmp_path / "f").exists()
    # a file written by something else: the loader's own check
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate, "check_params_finite", lambda *a, **k: None)
        out = jcompress.save_hf(cfg, params, tmp_path / "f", factors=True)
    user_error(
        lambda: jcompress.load_hf(out),
        "jcompress_model.safetensors",
        "jcompress/model/layers/0/self_attn/k_proj/kernel/a",
        "NaN or Inf",
    )
    _, back = jcompress.load_hf(out, allow_nonfinite=True)
    assert np.isnan(
        np.asarray(back["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"].a)[0, 0]
    )


def test_nonfinite_bf16_weights_are_caught():
    import ml_dtypes

    x = np.array([1.0, np.nan], ml_dtypes.bfloat16)
    user_error(lambda: validate.check_finite(x, "tensor w"), "tensor w", "1 of 2")
    validate.check_finite(np.array([1, 2], np.int32), "ints pass")
    validate.check_finite(np.zeros((0,), np.float32), "empty passes")


# --------------------------------------------------------------------------- config.json

NAN, INF = float("nan"), float("inf")
CONFIG_CASES = {
    "rms_norm_eps NaN": ({"rms_norm_eps": NAN}, ["rms_norm_eps", "finite"]),
    "rms_norm_eps negative": ({"rms_norm_eps": -1e-5}, ["rms_norm_eps", "> 0"]),
    "rms_norm_eps string": ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps", "number"]),
    "rope_theta inf": ({"rope_theta": INF}, ["rope_theta", "finite"]),
    "rope_theta zero": ({"rope_theta": 0}, ["rope_theta"]),
    "hidden_size string": ({"hidden_size": "128"}, ["hidden_size", "integer", "'128'"]),
    "hidden_size float": ({"hidden_size": 128.0}, ["hidden_size", "integer"]),
    "hidden_size bool": ({"hidden_size": True}, ["hidden_size", "integer"]),
    "num_hidden_layers string": ({"num_hidden_layers": "4"}, ["num_hidden_layers"]),
    "vocab_size negative": ({"vocab_size": -1}, ["vocab_size", ">= 1"]),
    "max_position_embeddings 0": ({"max_position_embeddings": 0}, ["max_position_embeddings"]),
    "tie_word_embeddings string": ({"tie_word_embeddings": "false"}, ["tie_word_embeddings"]),
    "rope_scaling list": ({"rope_scaling": [1, 2]}, ["rope_scaling"]),
    "rope_scaling factor NaN": (
        {"rope_scaling": {"rope_type": "linear", "factor": NAN}},
        ["rope_scaling.factor"],
    ),
    "rope_scaling original length string": (
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": "64",
            }
        },
        ["original_max_position_embeddings"],
    ),
    "eos_token_id string": ({"eos_token_id": "x"}, ["eos_token_id"]),
    "model_type int": ({"model_type": 5}, ["model_type"]),
    "hidden_act int": ({"hidden_act": 3}, ["hidden_act"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_field(model, case):
    changes, words = CONFIG_CASES[case]
    d = json.loads((model / "config.json").read_text())
    d.update(changes)
    (model / "config.json").write_text(json.dumps(d))  # NaN / Infinity as Python writes them
    user_error(lambda: read_config(model), *words)


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2]", ["JSON object", "list"]),
        ('"llama"', ["JSON object"]),
        ("7", ["JSON object"]),
        ("{", ["not valid JSON"]),
    ],
)
def test_config_not_an_object(model, text, words):
    (model / "config.json").write_text(text)
    user_error(lambda: jcompress.load_hf(model), "config.json", *words)


def test_config_error_through_load_hf(model):
    d = json.loads((model / "config.json").read_text())
    d["rms_norm_eps"] = NAN
    (model / "config.json").write_text(json.dumps(d))
    user_error(lambda: jcompress.load_hf(model), "rms_norm_eps")


_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 2, "vocab_size": 128}
_MPT = {"model_type": "mpt", "d_model": 32, "n_heads": 4, "n_layers": 2, "vocab_size": 128}
_OPT = {
    "model_type": "opt",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "ffn_dim": 64,
    "vocab_size": 128,
}


@pytest.mark.parametrize(
    "d, words",
    [
        ({**_GPT2, "layer_norm_epsilon": NAN}, ["layer_norm_epsilon"]),
        ({**_GPT2, "n_positions": "1024"}, ["n_positions"]),
        ({**_MPT, "layer_norm_epsilon": INF}, ["layer_norm_epsilon"]),
        ({**_MPT, "attn_config": {"clip_qkv": NAN}}, ["clip_qkv"]),
        ({**_MPT, "attn_config": {"softmax_scale": -1.0}}, ["softmax_scale"]),
        ({**_MPT, "attn_config": "alibi"}, ["attn_config"]),
        ({**_OPT, "ffn_dim": 64.5}, ["ffn_dim"]),
        ({**_OPT, "do_layer_norm_before": "yes"}, ["do_layer_norm_before"]),
    ],
)
def test_bad_config_other_families(d, words):
    user_error(lambda: config_from_hf(d), *words)


def test_family_base_configs_parse():
    for d in (_GPT2, _MPT, _OPT):
        assert config_from_hf(d).vocab_size == 128


def test_model_config_rejects_nonfinite_fields():
    cfg = _tiny_cfg()
    for field, value in [("norm_eps", NAN), ("rope_theta", INF), ("norm_eps", 0.0)]:
        user_error(lambda f=field, v=value: dataclasses.replace(cfg, **{f: v}), field)


# --------------------------------------------------------------------------- sharded index


def _shard(model: Path) -> dict[str, str]:
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    header, _ = _read_st(model / "model-00001-of-00001.safetensors")
    return {k: "model-00001-of-00001.safetensors" for k in header if k != "__metadata__"}


INDEX_CASES = {
    "not JSON": (lambda wm: "{", ["not valid JSON"]),
    "a list": (lambda wm: json.dumps([wm]), ["not a JSON object"]),
    "no weight_map": (lambda wm: json.dumps({"metadata": {}}), ["weight_map"]),
    "weight_map a list": (lambda wm: json.dumps({"weight_map": list(wm)}), ["weight_map"]),
    "name -> int": (
        lambda wm: json.dumps({"weight_map": {**wm, NORM: 3}}),
        ["weight_map", NORM, "shard file name"],
    ),
    "name -> path outside": (
        lambda wm: json.dumps({"weight_map": {**wm, NORM: "../model.safetensors"}}),
        ["weight_map", NORM],
    ),
    "shard missing": (
        lambda wm: json.dumps({"weight_map": {**wm, NORM: "model-00002-of-00002.safetensors"}}),
        ["missing weights file", "model-00002-of-00002.safetensors"],
    ),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_bad_index(model, case):
    make, words = INDEX_CASES[case]
    wm = _shard(model)
    (model / "model.safetensors.index.json").write_text(make(wm))
    user_error(lambda: jcompress.load_hf(model), *words)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text, words",
    [
        ("not json", ["tokenizer.json", "not valid JSON"]),
        ("[]", ["tokenizer.json", "JSON object"]),
        ('{"version": "1.0", "model": 5}', ["model_dir", "tokenizer.json"]),
    ],
)
def test_bad_tokenizer_json(model, text, words):
    (model / "tokenizer.json").write_text(text)
    user_error(lambda: load_tokenizer(model), *words)


def test_tokenizer_larger_than_model(llama_dir):
    cfg = read_config(llama_dir)
    assert load_tokenizer(llama_dir, cfg=cfg) is not None
    small = dataclasses.replace(cfg, vocab_size=1000)
    user_error(lambda: load_tokenizer(llama_dir, cfg=small), "tokenizer", "2048", "1000")


# --------------------------------------------------------------------------- token ids etc.


def _tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        family="llama",
        vocab_size=64,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    return ModelConfig(**{**base, **kw})


def _tiny_opt_cfg() -> ModelConfig:
    return config_from_hf({**_OPT, "vocab_size": 64, "max_position_embeddings": 16})


@pytest.fixture(scope="module")
def tiny():
    cfg = _tiny_cfg()
    return cfg, jcompress.init_params(cfg, jax.random.key(0))


IDS_CASES = {
    "float": (np.zeros((1, 4), np.float32), "integer"),
    "bool": (np.ones((1, 4), bool), "integer"),
    "1-D": (np.zeros(4, np.int32), "[batch, length]"),
    "3-D": (np.zeros((1, 2, 4), np.int32), "[batch, length]"),
    "empty": (np.zeros((1, 0), np.int32), "empty"),
    "negative": (np.array([[1, -1]]), "[0, 64)"),
    "== vocab": (np.array([[1, 64]]), "found 64"),
    "ragged list": ([[1, 2], [3]], "ragged"),
    "float list": ([[1.0, 2.0]], "integer"),
    "string": ("hello", "got str"),
    "None": (None, "got NoneType"),
    "jax float": (jnp.zeros((1, 3)), "integer"),
    "jax out of range": (jnp.full((1, 3), 99, jnp.int32), "found 99"),
}


@pytest.mark.parametrize("case", list(IDS_CASES))
def test_check_token_ids(case):
    ids, word = IDS_CASES[case]
    user_error(lambda: validate.check_token_ids(ids, 64), "input_ids", word)


def test_check_token_ids_accepts_and_converts():
    out = validate.check_token_ids([[1, 2, 3]], 64)
    assert isinstance(out, np.ndarray) and out.shape == (1, 3)
    x = jnp.array([[0, 63]], jnp.int32)
    assert validate.check_token_ids(x, 64) is x
    # masked slots may hold any id (a pad id outside the vocabulary)
    ids, mask = np.array([[64, 1, 2]]), np.array([[0, 1, 1]])
    validate.check_token_ids(ids, 64, mask=mask)
    user_error(lambda: validate.check_token_ids(ids, 64), "found 64")


def test_check_token_ids_under_jit():
    """Tracers get the shape/dtype checks only."""
    f = jax.jit(lambda x: validate.check_token_ids(x, 10) + 0)
    assert int(f(jnp.array([[99]], jnp.int32))[0, 0]) == 99
    g = jax.jit(lambda x: validate.check_token_ids(x, 10))
    user_error(lambda: g(jnp.zeros((1, 2), jnp.float32)), "integer")
    user_error(lambda: g(jnp.zeros((2,), jnp.int32)), "[batch, length]")


def test_forward_under_jit_turns_out_of_range_rows_into_nan(tiny):
    """Under a caller's jit the ids are tracers, so the host check cannot raise: a row holding
    an id outside ``[0, vocab)`` at a real position gives NaN logits (never the clipped id's
    plausible numbers); other rows, and out-of-range pad ids under a 0 mask, are untouched."""
    cfg, params = tiny
    ids = np.array([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    mask = np.ones_like(ids)
    f = jax.jit(lambda i, m: jcompress.forward(cfg, params, i, m))
    ref = np.asarray(f(ids, mask))
    bad = ids.copy()
    bad[0, 2] = cfg.vocab_size  # real position: row 0 broken
    bad[1, 0] = -3  # real position: row 1 broken
    bad[2, 0], mask[2, 0] = cfg.vocab_size + 7, 0  # a pad id under a 0 mask: fine
    out = np.asarray(f(bad, mask))
    assert np.isnan(out[0]).all() and np.isnan(out[1]).all()
    clean = ids.copy()
    clean[2, 0] = cfg.vocab_size + 7
    ref2 = np.asarray(jcompress.forward(cfg, params, clean, mask))  # eager: allowed under mask 0
    np.testing.assert_allclose(out[2, 1:], ref2[2, 1:], rtol=1e-5, atol=1e-5)
    assert np.isfinite(ref).all()
    # the eager call (concrete ids) still raises
    user_error(lambda: jcompress.forward(cfg, params, bad, mask), "input_ids")


MASK_CASES = {
    "shape": (np.ones((1, 3), np.int32), "does not match"),
    "float": (np.ones((1, 4), np.float32), "bool or integer"),
    "value 2": (np.array([[1, 1, 2, 1]]), "0 or 1"),
    "negative": (np.array([[1, 1, -1, 1]]), "0 or 1"),
    "all masked row": (np.array([[0, 0, 0, 0]]), "row 0"),
    "string": ("1111", "got str"),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_check_attention_mask(case):
    mask, word = MASK_CASES[case]
    user_error(lambda: validate.check_attention_mask(mask, (1, 4)), "attention_mask", word)


@pytest.mark.parametrize("params", [None, [1, 2], "params", {}, 3])
def test_check_params(params):
    user_error(lambda: validate.check_params(params), "params")


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(input_ids=np.zeros((1, 4), np.float32)), ["input_ids", "integer"]),
        (dict(input_ids=np.array([[1, 70]])), ["input_ids", "[0, 64)"]),
        (dict(input_ids=np.zeros(4, np.int32)), ["input_ids", "[batch, length]"]),
        (dict(attention_mask=np.ones((1, 3))), ["attention_mask"]),
        (dict(params=None), ["params"]),
        (dict(params=[]), ["params"]),
        (dict(max_new_tokens=0), ["max_new_tokens"]),
        (dict(max_new_tokens=True), ["max_new_tokens"]),
        (dict(max_new_tokens=13), ["max_new_tokens", "17 tokens", "16 positions"]),
    ],
)
def test_generate_bad_input(tiny, kw, words):
    cfg, params = tiny
    args = dict(params=params, input_ids=np.ones((1, 4), np.int32), max_new_tokens=2) | kw
    user_error(lambda: jcompress.generate(cfg, **args), *words)


def test_generate_long_rope_needs_allow_long_learned_never(tiny):
    cfg, params = tiny
    ids = np.ones((1, 15), np.int32)
    out = jcompress.generate(cfg, params, ids, max_new_tokens=2, allow_long=True)
    assert out.shape == (1, 17)
    ocfg = _tiny_opt_cfg()
    oparams = jcompress.init_params(ocfg, jax.random.key(1))
    user_error(
        lambda: jcompress.generate(ocfg, oparams, ids, max_new_tokens=2, allow_long=True),
        "17 tokens",
        "learned positions",
    )


# --------------------------------------------------------------------------- sequence length


def test_check_seqlen_rope_warns_learned_errors():
    cfg = _tiny_cfg()
    with pytest.warns(UserWarning, match="16 positions the model was trained on"):
        check_seqlen(cfg, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_seqlen(cfg, 32, allow_long=True)
        check_seqlen(cfg, 16)
    user_error(lambda: check_seqlen(_tiny_opt_cfg(), 17), "seqlen", "16 learned positions")
    for bad in (1, 2.5, "8", True):
        user_error(lambda b=bad: check_seqlen(cfg, b), "seqlen")
    # a command without a silencing switch names the flag and no switch
    with pytest.warns(UserWarning) as rec:
        check_seqlen(cfg, 32, arg="--eval_seqlen", override=None)
    assert [str(w.message) for w in rec] == [
        "--eval_seqlen: 32 tokens exceed the 16 positions the model was trained on (RoPE); "
        "running anyway"
    ]


@pytest.mark.parametrize(
    "ids, words",
    [
        (np.linspace(0, 10, 100), ["ids", "integer"]),
        (np.full(100, 64, np.int32), ["ids", "[0, 64)"]),
        (np.full(100, -3, np.int64), ["ids", "found -3"]),
        (np.zeros((2, 50), np.int32), ["ids", "[length]"]),
        (np.zeros(0, np.int32), ["ids", "empty"]),
    ],
)
def test_perplexity_bad_ids(tiny, ids, words):
    cfg, params = tiny
    user_error(lambda: jcompress.perplexity(cfg, params, ids, seqlen=8, progress=False), *words)


def test_perplexity_bad_params(tiny):
    cfg, _ = tiny
    ids = np.ones(64, np.int32)
    user_error(lambda: jcompress.perplexity(cfg, None, ids, seqlen=8, progress=False), "params")


def test_perplexity_refuses_what_cannot_fit(tiny, monkeypatch):
    cfg, params = tiny
    monkeypatch.setattr(validate, "available_memory", lambda: 1000)
    ids = np.ones(64, np.int32)
    user_error(
        lambda: jcompress.perplexity(cfg, params, ids, seqlen=8, progress=False),
        "batch_size x seqlen",
        "lower batch_size or seqlen",
    )


def test_estimate_forward_bytes_terms():
    cfg = _tiny_cfg(max_position_embeddings=4096)
    b, t = 2, 2048
    dense = validate.estimate_forward_bytes(cfg, b, t, "float32")
    chunked = validate.estimate_forward_bytes(cfg, b, t, "float32", attention="chunked")
    bq, bk = Chunked().block_q, Chunked().block_k
    # chunked: its largest per-step scores, here the paired tiles' half of the query blocks
    assert b * cfg.num_heads * (t // 2) * bk >= cfg.num_heads // cfg.num_kv_heads * bq * t
    assert dense - chunked == b * cfg.num_heads * (t * t - (t // 2) * bk) * 4
    short = min(bq, bk)  # within one block both hold the same scores
    assert validate.estimate_forward_bytes(cfg, b, short) == validate.estimate_forward_bytes(
        cfg, b, short, attention="chunked"
    )
    assert dense >= b * cfg.num_heads * t * t * 4 + b * t * cfg.vocab_size * 4
    user_error(lambda: validate.estimate_forward_bytes(cfg, 1, 8, attention="flash"), "attention")
    validate.check_memory(cfg, 1, 8, available=1 << 40)
    user_error(lambda: validate.check_memory(cfg, 1, 8, available=10), "seqlen", "GiB")
    assert validate.available_memory() is None or validate.available_memory() > 0


# --------------------------------------------------------------------------- calibration windows


def test_calibration_windows_bounds():
    ids = np.arange(100, dtype=np.int32)
    assert calibration_windows(ids, 90, 10, seed=0).shape == (90, 10)
    user_error(lambda: calibration_windows(ids, 91, 10), "nsamples", "at most 90")
    user_error(lambda: calibration_windows(ids, 10**9, 10), "nsamples")
    user_error(lambda: calibration_windows(ids.astype(np.float32), 4, 10), "ids", "integer")
    user_error(lambda: calibration_windows(ids - 5, 4, 10), "ids", ">= 0")
    user_error(lambda: calibration_windows(ids, True, 10), "nsamples")
    user_error(lambda: eval_windows(ids.astype(bool), 10), "ids", "integer")


# --------------------------------------------------------------------------- orbax checkpoints


def test_restore_nonfinite(tiny, tmp_path):
    cfg, params = tiny
    bad = jax.tree.map(lambda x: x, params)
    bad["model"]["norm"]["scale"] = bad["model"]["norm"]["scale"].at[0].set(jnp.nan)
    user_error(
        lambda: jcompress.checkpoint.save(tmp_path / "ck", cfg, bad),
        "params: model/norm/scale: 1 of",
        "NaN or Inf",
    )
    assert not (tmp_path / "ck").exists()
    with pytest.MonkeyPatch.context() as mp:  # written by something else: restore's check
        mp.setattr(validate, "check_params_finite", lambda *a, **k: None)
        jcompress.checkpoint.save(tmp_path / "ck", cfg, bad)
    user_error(
        lambda: jcompress.checkpoint.restore(tmp_path / "ck"),
        "params/model/norm/scale",
        "NaN or Inf",
    )
    _, back = jcompress.checkpoint.restore(tmp_path / "ck", allow_nonfinite=True)
    assert np.isnan(np.asarray(back["model"]["norm"]["scale"][0]))


@pytest.fixture(scope="module")
def saved_checkpoint(llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "llama"
    cfg, params = jcompress.load_hf(llama_dir)
    jcompress.checkpoint.save(out, cfg, params)
    return out


def _largest(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file() and "/d/" in str(p)), key=os.path.getsize)


@pytest.mark.parametrize(
    "target", ["largest data file", "arrays/manifest.ocdbt", "arrays/_METADATA"]
)
def test_truncated_orbax_one_line_on_stderr(saved_checkpoint, tmp_path, target):
    ck = tmp_path / "ck"
    shutil.copytree(saved_checkpoint, ck)
    victim = _largest(ck / "arrays") if target == "largest data file" else ck / target
    with open(victim, "r+b") as f:
        f.truncate(min(100, victim.stat().st_size // 2))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jcompress",
            "convert",
            str(ck),
            str(tmp_path / "out"),
            "--to",
            "hf",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jcompress: error: checkpoint: cannot read arrays in "), lines[0]
    assert not (tmp_path / "out").exists()


def test_truncated_orbax_repeated_restores_stay_quiet(saved_checkpoint, tmp_path):
    """The late tensorstore callbacks race with orbax closing its loop; five restores in one
    process make a stray "Event loop is closed" traceback near certain if it can escape."""
    ck = tmp_path / "ck"
    shutil.copytree(saved_checkpoint, ck)
    victim = _largest(ck / "arrays")
    with open(victim, "r+b") as f:
        f.truncate(100)
    code = (
        "import sys, time, jcompress\n"
        "for _ in range(5):\n"
        "    try:\n"
        f"        jcompress.checkpoint.restore({str(ck)!r})\n"
        "    except jcompress.UserError as e:\n"
        "        print('ERR', str(e)[:33], file=sys.stderr)\n"
        "time.sleep(0.5)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines() == ["ERR checkpoint: cannot read arrays in"] * 5, (
        proc.stderr
    )


def test_naming_puts_the_flag_first():
    """``errors.naming``: a library error raised under a CLI flag names the flag first, once."""
    from jcompress.errors import UserError, naming

    def raised(msg, arg="--seqlen"):
        with pytest.raises(UserError) as e, naming(arg):
            raise UserError(msg)
        return str(e.value)

    assert raised("seqlen: must be an integer >= 2, got 1") == (
        "--seqlen: must be an integer >= 2, got 1"
    )  # the library's name for the flag is replaced
    assert raised("x.safetensors: corrupt header", "--xy_path") == (
        "--xy_path: x.safetensors: corrupt header"
    )
    assert raised("--data: a.txt is empty") == "--data: a.txt is empty"  # already named
    with naming("--seqlen"):  # nothing raised: nothing changes
        pass
    with pytest.raises(ValueError, match="^plain$"), naming("--seqlen"):
        raise ValueError("plain")  # only UserErrors are renamed


# --------------------------------------------------------------------------- the Python API's
# inputs (from an adversarial pass over it): each must be a one-line error or the right answer


@pytest.fixture(scope="module")
def llama_pair(llama_dir):
    return jcompress.load_hf(llama_dir)


def test_narrow_integer_ids_give_the_int32_answer(llama_pair):
    """uint8 / int8 ids compared against the vocabulary size in their own dtype wrapped it
    (2048 -> 0): every id counted as out of range and every logit became NaN."""
    cfg, params = llama_pair
    ids = np.array([[1, 2, 100, 7]])
    want = np.asarray(jcompress.forward(cfg, params, ids.astype(np.int32)))
    assert np.isfinite(want).all()
    for dt in (np.uint8, np.int8, np.int16, np.uint16):
        got = np.asarray(jcompress.forward(cfg, params, ids.astype(dt)))
        np.testing.assert_array_equal(got, want, err_msg=str(dt))
    # generate writes its new tokens as int32, whatever the prompt's dtype (uint8 would wrap
    # every id above 255)
    ref = jcompress.generate(cfg, params, ids.astype(np.int32), max_new_tokens=6, eos_token_id=None)
    out = jcompress.generate(cfg, params, ids.astype(np.uint8), max_new_tokens=6, eos_token_id=None)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_generate_refuses_right_padding_and_bad_token_ids(llama_pair):
    cfg, params = llama_pair
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)
    right = np.ones((2, 8), np.int32)
    right[1, -3:] = 0
    user_error(
        lambda: jcompress.generate(cfg, params, ids, attention_mask=right, max_new_tokens=2),
        "attention_mask: row 1 has a pad after a prompt token",
        "left padding",
    )
    hole = np.ones((2, 8), np.int32)
    hole[0, 3] = 0  # a pad between prompt tokens: not a left-padded row either
    user_error(
        lambda: jcompress.generate(cfg, params, ids, attention_mask=hole, max_new_tokens=2),
        "row 0",
    )
    left = right[:, ::-1].copy()  # the same prompts, left-padded: fine
    out = jcompress.generate(cfg, params, ids, attention_mask=left, max_new_tokens=2)
    assert out.shape == (2, 10)
    user_error(
        lambda: jax.jit(lambda x: jcompress.generate(cfg, params, x, max_new_tokens=2))(ids),
        "generate: runs its own jit",
    )
    # the config's own ids are used as far as they go: a pad id outside the vocabulary (an
    # early LLaMA conversion's -1) falls back to eos, an eos the model cannot emit never stops
    odd = dataclasses.replace(cfg, pad_token_id=-1, eos_token_id=cfg.vocab_size)
    ref = jcompress.generate(cfg, params, ids, max_new_tokens=3, eos_token_id=None)
    np.testing.assert_array_equal(
        np.asarray(jcompress.generate(odd, params, ids, max_new_tokens=3)), np.asarray(ref)
    )
    for kw, word in (
        ({"pad_token_id": cfg.vocab_size}, "pad_token_id: must be a token id in [0, 2048)"),
        ({"eos_token_id": -5}, "eos_token_id: must be a token id"),
        ({"pad_token_id": 1.5}, "pad_token_id"),
    ):
        user_error(lambda kw=kw: jcompress.generate(cfg, params, ids, max_new_tokens=2, **kw), word)


def test_forward_cached_refuses_an_overrun_cache_and_bad_ids(llama_pair):
    from jcompress.models.forward import forward_cached, init_cache

    cfg, params = llama_pair
    ids = jnp.arange(5, 29, dtype=jnp.int32)[None]
    cache = init_cache(cfg, params, 1, 16)
    logits, cache = forward_cached(cfg, params, ids[:, :12], jnp.ones((1, 12), bool), cache)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(jcompress.forward(cfg, params, ids[:, :12])), atol=1e-4
    )
    user_error(
        lambda: forward_cached(cfg, params, ids[:, 12:], jnp.ones((1, 12), bool), cache),
        "cache: 12 slots used + 12 new tokens > its 16 slots",
    )
    user_error(
        lambda: forward_cached(cfg, params, jnp.full((1, 1), 4096), jnp.ones((1, 1), bool), cache),
        "input_ids: token ids must lie in [0, 2048)",
    )


def test_params_that_do_not_fit_the_config_are_one_line(llama_pair, opt_dir, tmp_path):
    from jcompress.models.forward import apply_layer, layer_params

    cfg, params = llama_pair
    ocfg, oparams = jcompress.load_hf(opt_dir)
    ids = np.array([[1, 2, 3]])
    user_error(lambda: jcompress.forward(cfg, oparams, ids), "params: missing leaf model/")
    bad = jax.tree.map(lambda x: x, params)
    up = bad["model"]["layers"]["0"]["mlp"]["up_proj"]
    up["kernel"] = up["kernel"].T
    user_error(
        lambda: jcompress.forward(cfg, bad, ids),
        "params: leaf model/layers/0/mlp/up_proj/kernel has shape [352, 128], config implies "
        "[128, 352]",
    )
    bad = jax.tree.map(lambda x: x, params)
    kp = bad["model"]["layers"]["1"]["self_attn"]["k_proj"]
    kp["kernel"] = jcompress.LowRank(jnp.ones((128, 8)), jnp.ones((8, 32)))  # [128, 32] != 64
    user_error(lambda: jcompress.forward(cfg, bad, ids), "k_proj/kernel has shape [128, 32]")
    bad = jax.tree.map(lambda x: x, params)
    kp = bad["model"]["layers"]["0"]["self_attn"]["k_proj"]
    kp["kernel"] = kp["kernel"].astype(jnp.int32)
    user_error(lambda: jcompress.forward(cfg, bad, ids), "dtype int32; weights must be floating")
    # one layer
    lp = layer_params(cfg, params, 0)
    for i in (jnp.int32(0), np.int64(0)):  # concrete integer scalars are indices too
        assert layer_params(cfg, params, i) is lp
    user_error(lambda: layer_params(cfg, params, 4), "i: layer index must be in [0, 4)")
    user_error(lambda: layer_params(cfg, params, 1.0), "i: layer index")
    user_error(lambda: apply_layer(cfg, lp, jnp.ones((1, 4, 64)), 0), "hidden: expected [batch")
    user_error(
        lambda: apply_layer(cfg, layer_params(ocfg, oparams, 0), jnp.ones((1, 4, 128)), 0),
        "lp: missing leaf",
    )
    assert apply_layer(cfg, lp, jnp.ones((1, 4, 128)), 0).shape == (1, 4, 128)
    # a checkpoint of params from another model: refused before writing
    user_error(
        lambda: jcompress.checkpoint.save(tmp_path / "ck", cfg, oparams),
        "params: has none of the leaves a llama model",
    )
    assert not (tmp_path / "ck").exists()


def test_save_hf_records_bfloat16(llama_pair, tmp_path):
    cfg, params = llama_pair
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    out = jcompress.save_hf(cfg, half, tmp_path / "bf16")
    conf = json.loads((out / "config.json").read_text())
    assert conf.get("torch_dtype", conf.get("dtype")) == "bfloat16"


def test_save_refuses_a_quantized_leaf_with_a_nan_scale_code(llama_pair, tmp_path):
    """MX block scales are E8M0 bits (uint8): 0xFF is their NaN code, which a float check of
    the arrays cannot see; the leaf's own checks (as the loader runs them) do."""
    from jcompress.quant import quantize_leaf

    cfg, params = llama_pair
    p = jax.tree.map(lambda x: x, params)
    q = p["model"]["layers"]["0"]["mlp"]["up_proj"]
    leaf = quantize_leaf(q["kernel"], "mxfp4")
    bad = jax.tree.map(lambda a: a, leaf)  # rebuilt without validation
    object.__setattr__(bad, "scales", bad.scales.at[0, 0].set(0xFF))
    q["kernel"] = bad
    for save in (
        lambda: jcompress.save_hf(cfg, p, tmp_path / "hf", factors=True),
        lambda: jcompress.checkpoint.save(tmp_path / "ck", cfg, p),
    ):
        user_error(save, "model/layers/0/mlp/up_proj/kernel", "non-finite scales")
    assert list(tmp_path.iterdir()) == []


def test_method_inputs_that_were_silently_accepted(llama_pair):
    """From an adversarial pass over the methods' APIs."""
    from jcompress import sparge
    from jcompress.quant.apply import QuantApplyConfig
    from jcompress.quant.apply import compress as quant_compress
    from jcompress.tucker import TuckerConfig
    from jcompress.tucker import compress as tucker_compress

    cfg, params = llama_pair
    ids = np.arange(1, 33)[None]
    att = sparge.BlockSparse(block_q=16, block_k=16)

    def state(rows, cdf=0.05):
        return sparge.SpargeParams.create(rows, cfg.num_heads, simthreshd1=-1.0, cdfthreshd=cdf)

    # thresholds for another layer count: a clamped row index reused the last row silently
    for rows in (2, 6):
        user_error(
            lambda r=rows: jcompress.forward(
                cfg, params, ids, attention=att, attention_state=state(r)
            ),
            f"attention_state: thresholds are for {rows} layers x 8 heads; the model has 4 layers",
        )
    bad = state(4)._replace(cdfthreshd=jnp.full((4, 8), -3.0))  # built without validate()
    user_error(
        lambda: jcompress.forward(cfg, params, ids, attention=att, attention_state=bad),
        "cdfthreshd",
    )
    ok = jcompress.forward(cfg, params, ids, attention=att, attention_state=state(4))
    assert np.isfinite(np.asarray(ok)).all()
    # a quant rank above the kernel's full rank was clamped, reported as asked
    user_error(
        lambda: quant_compress(
            params,
            config=QuantApplyConfig(
                rules=((r"model/layers/0/mlp/up_proj", "rank=500;fmt=nvfp4;blk=na"),)
            ),
            progress=False,
        ),
        "rank 500 is above its full rank 128",
    )
    # tucker: NaN weights, and an empty rule list that compressed nothing
    nan = jax.tree.map(lambda x: x, params)
    q = nan["model"]["layers"]["0"]["self_attn"]["q_proj"]
    q["kernel"] = q["kernel"].at[0, 0].set(jnp.nan)
    for conf in (
        TuckerConfig(variant="tt", tt_ranks=(4, 4)),
        TuckerConfig(variant="tt", mps_eps=0.9),
    ):
        user_error(
            lambda c=conf: tucker_compress(nan, cfg, config=c),
            "params: model/layers/0/self_attn/q_proj/kernel: 1 of",
            "NaN or Inf",
        )
    user_error(lambda: TuckerConfig(variant="tt", tt_ranks=(4, 4), layers=()), "layers: is empty")
