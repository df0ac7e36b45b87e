"""QuantizedArray: reconstruction vs fake_quant and a numpy block oracle, pytree / jit, the
forward pass on quantized kernels (plain, LowRank + quantized residual), checkpoint round trips
(orbax and save_hf factors, load_hf(dtype=) keeps codes), validation of corrupt leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jcompress
from jcompress import checkpoint
from jcompress.leaves import LowRank, Residual, dot
from jcompress.models.convert import flatten, unflatten
from jcompress.quant import QuantizedArray, QuantSpec, fake_quant, parse_spec, quantize_leaf


@pytest.fixture(scope="module")
def w():
    return jnp.asarray(np.random.default_rng(0).standard_normal((48, 20)), jnp.float32)


@pytest.mark.parametrize("text", ["nvfp4", "mxfp4", "fp4@in", "int4@16", "fp8_e5m2"])
def test_leaf_reconstruction(w, text):
    leaf = quantize_leaf(w, text)
    assert leaf.shape == (48, 20) and leaf.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(leaf.materialize()), np.asarray(fake_quant(w, text)))
    # numpy oracle: codes times the block scale broadcast by explicit index arithmetic
    spec = parse_spec(text)
    bi, bo = {
        "nvfp4": (16, 1),
        "mxfp4": (32, 1),
        "fp4@in": (1, 20),
        "int4@16": (16, 1),
        "fp8_e5m2": (48, 20),
    }[text]
    codes = np.asarray(leaf.codes).astype(np.float32)
    sc = np.asarray(leaf.scales)
    sc = np.ldexp(1.0, sc.astype(np.int32) - 127) if spec.fmt == "mxfp4" else sc.astype(np.float32)
    i, j = np.meshgrid(np.arange(48), np.arange(20), indexing="ij")
    # the block scale times the tensor scale first (one float32 product per block), then codes
    want = codes * (sc[i // bi, j // bo].astype(np.float32) * np.float32(leaf.global_scale[0]))
    np.testing.assert_array_equal(np.asarray(leaf.materialize()), want)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 48)), jnp.float32)
    np.testing.assert_allclose(np.asarray(dot(x, leaf)), np.asarray(x) @ want, rtol=1e-5, atol=1e-5)


def test_leaf_pytree_jit_and_dtypes(w):
    leaf = quantize_leaf(w.astype(jnp.bfloat16), "nvfp4")
    assert leaf.dtype == jnp.bfloat16 and leaf.materialize().dtype == jnp.bfloat16
    assert leaf.codes.dtype == ml_dtypes.float8_e4m3fn
    assert leaf.scales.dtype == ml_dtypes.float8_e4m3fn
    out = jax.jit(lambda l, x: dot(x, l))(leaf, jnp.ones((2, 48), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 20)
    maxes = jax.tree.map(lambda a: jnp.max(a.astype(jnp.float32)), leaf)  # no __post_init__
    assert isinstance(maxes, QuantizedArray)
    assert leaf.num_params == 48 * 20 + 3 * 20 + 1
    assert leaf.nbytes == 48 * 20 + 3 * 20 + 4
    assert 4.5 < leaf.bits_per_weight < 4.6  # 4 + 8/16 + amortized tensor scale


def test_leaf_validation(w):
    leaf = quantize_leaf(w, "int4@16")
    with pytest.raises(ValueError, match="scales"):
        QuantizedArray(leaf.codes, leaf.scales[:2], leaf.global_scale, leaf.spec)
    with pytest.raises(ValueError, match="codes must be int8"):
        QuantizedArray(leaf.codes.astype(jnp.float32), leaf.scales, leaf.global_scale, leaf.spec)
    with pytest.raises(ValueError, match="outside"):
        QuantizedArray(leaf.codes.at[0, 0].set(8), leaf.scales, leaf.global_scale, leaf.spec)
    with pytest.raises(ValueError, match="non-finite"):
        QuantizedArray(leaf.codes, leaf.scales.at[0, 0].set(jnp.nan), leaf.global_scale, leaf.spec)
    mx = quantize_leaf(w, "mxfp4")
    with pytest.raises(ValueError, match="non-finite"):  # E8M0 0xFF is NaN
        QuantizedArray(mx.codes, mx.scales.at[0, 0].set(255), mx.global_scale, mx.spec)
    with pytest.raises(ValueError, match="QuantSpec"):
        QuantizedArray(leaf.codes, leaf.scales, leaf.global_scale, "int4@16")


@pytest.fixture(scope="module")
def quantized_model(llama_dir):
    cfg, params = jcompress.load_hf(llama_dir)
    flat = flatten(params)
    q = "model/layers/0/self_attn/q_proj/kernel"
    up = "model/layers/1/mlp/up_proj/kernel"
    down = "model/layers/1/mlp/down_proj/kernel"
    dense = dict(flat)
    flat[q] = quantize_leaf(flat[q], "nvfp4")
    dense[q] = fake_quant(dense[q], "nvfp4")
    flat[up] = quantize_leaf(flat[up], "mxfp4")
    dense[up] = fake_quant(dense[up], "mxfp4")
    # W ~ L + Q(W - L): a rank-4 SVD branch plus a quantized residual
    wd = flat[down]
    u, s, vt = jnp.linalg.svd(wd, full_matrices=False)
    low = LowRank(u[:, :4] * s[:4], vt[:4])
    res = quantize_leaf(wd - low.materialize(), "fp4@16")
    flat[down] = Residual(low, res)
    dense[down] = low.materialize() + fake_quant(wd - low.materialize(), "fp4@16")
    return cfg, unflatten(flat), unflatten(dense)


def test_forward_on_quantized_leaves(quantized_model):
    cfg, comp, dense = quantized_model
    ids = jnp.arange(1, 25)[None]
    got = np.asarray(jcompress.forward(cfg, comp, ids))
    want = np.asarray(jcompress.forward(cfg, dense, ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(
            np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
        )


def test_checkpoint_round_trips(quantized_model, tmp_path):
    cfg, comp, _ = quantized_model
    checkpoint.save(tmp_path / "ck", cfg, comp)
    _, back = checkpoint.restore(tmp_path / "ck")
    _same(comp, back)
    out = jcompress.save_hf(cfg, comp, tmp_path / "hf", factors=True)
    meta = json.loads((out / "config.json").read_text())["jcompress_factors"]["leaves"]
    q = meta["model/layers/0/self_attn/q_proj/kernel"]
    assert q["type"] == "jcompress.quant.QuantizedArray"
    _, back2 = jcompress.load_hf(out)
    _same(comp, back2)
    # a dtype cast leaves codes and scales alone (the dense factors of LowRank are cast)
    _, bf = jcompress.load_hf(out, dtype="bfloat16")
    leaf = flatten(bf)["model/layers/0/self_attn/q_proj/kernel"]
    assert leaf.codes.dtype == ml_dtypes.float8_e4m3fn and leaf.global_scale.dtype == np.float32
    assert flatten(bf)["model/layers/1/mlp/down_proj/kernel"].base.a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(leaf.codes).view(np.uint8),
        np.asarray(flatten(comp)["model/layers/0/self_attn/q_proj/kernel"].codes).view(np.uint8),
    )


def test_fresh_process_loads_quantized_factors(quantized_model, tmp_path):
    cfg, comp, _ = quantized_model
    out = jcompress.save_hf(cfg, comp, tmp_path / "hf", factors=True)
    code = (
        "import sys, jcompress\n"
        "assert 'jcompress.quant' not in sys.modules\n"
        f"cfg, p = jcompress.load_hf({str(out)!r})\n"
        "leaf = p['model']['layers']['0']['self_attn']['q_proj']['kernel']\n"
        "print(type(leaf).__name__, leaf.spec.key)\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == ["QuantizedArray", "fmt=nvfp4;blk=na"]


def test_corrupt_scale_in_file_is_an_error(quantized_model, tmp_path):
    cfg, comp, _ = quantized_model
    flat = flatten(comp)
    path = "model/layers/0/self_attn/q_proj/kernel"
    bad = jax.tree.map(lambda a: a, flat[path])  # rebuilt without validation
    object.__setattr__(bad, "global_scale", jnp.array([np.inf], jnp.float32))
    flat[path] = bad
    with pytest.raises(jcompress.UserError, match="global_scale: 1 of 1 values are NaN or Inf"):
        jcompress.save_hf(cfg, unflatten(flat), tmp_path / "hf", factors=True)
    assert not (tmp_path / "hf").exists()
    # a file written by something else: the loader's own checks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jcompress.validate, "check_params_finite", lambda *a, **k: None)
        out = jcompress.save_hf(cfg, unflatten(flat), tmp_path / "hf", factors=True)
    with pytest.raises(jcompress.UserError, match="global_scale: 1 of 1 values are NaN or Inf"):
        jcompress.load_hf(out)
    with pytest.raises(jcompress.UserError, match="q_proj.*non-finite scales"):
        jcompress.load_hf(out, allow_nonfinite=True)


def test_spec_static_is_hashable_and_equal():
    a = QuantSpec("fp4", 128)
    assert a == parse_spec("fp4@128") and hash(a) == hash(parse_spec("fp4@128"))


# ---------------------------------------------------------------- compressed-tensors export


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_compressed_tensors_export_against_the_package(w, fmt):
    torch = pytest.importorskip("torch")
    helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    mx_utils = pytest.importorskip("compressed_tensors.compressors.mx_utils")
    from jcompress.quant.export import from_compressed_tensors, to_compressed_tensors

    wq = w.at[0, 0].set(-0.0)  # a negative zero keeps its sign bit
    leaf = quantize_leaf(wq[:32] if fmt == "mxfp4" else wq, fmt)
    t = to_compressed_tensors(leaf)
    n_out, n_in = leaf.shape[1], leaf.shape[0]
    assert t["weight_packed"].shape == (n_out, n_in // 2) and t["weight_packed"].dtype == np.uint8
    # the package packs our codes (torch layout [out, in]) to the same bytes ...
    codes_t = torch.from_numpy(np.asarray(leaf.codes).astype(np.float32).T.copy())
    np.testing.assert_array_equal(helpers.pack_fp4_to_uint8(codes_t).numpy(), t["weight_packed"])
    # ... and its dequantization of our tensors is our dense weight
    vals = helpers.unpack_fp4_from_uint8(
        torch.from_numpy(t["weight_packed"].copy()), n_out, n_in, dtype=torch.float32
    )
    if fmt == "nvfp4":
        s = torch.from_numpy(t["weight_scale"].astype(np.float32)) / torch.from_numpy(
            t["weight_global_scale"]
        )
        g = 16
    else:
        s = mx_utils.decompress_mx_scale(torch.from_numpy(t["weight_scale"].copy())).float()
        g = 32
    dense = (vals * s.repeat_interleave(g, dim=1)).numpy().T
    np.testing.assert_allclose(dense, np.asarray(leaf.materialize()), rtol=2e-7, atol=0)
    # round trip: codes and scales bit for bit; the tensor scale within one ulp
    back = from_compressed_tensors(t, fmt)
    np.testing.assert_array_equal(
        np.asarray(back.codes).view(np.uint8), np.asarray(leaf.codes).view(np.uint8)
    )
    np.testing.assert_array_equal(
        np.asarray(back.scales).view(np.uint8), np.asarray(leaf.scales).view(np.uint8)
    )
    assert back.spec == leaf.spec
    np.testing.assert_array_max_ulp(
        np.asarray(back.global_scale), np.asarray(leaf.global_scale), maxulp=1
    )
    again = to_compressed_tensors(back)
    for k in t:
        np.testing.assert_array_equal(again[k].view(np.uint8), t[k].view(np.uint8))


def test_compressed_tensors_export_errors(w):
    from jcompress.quant.export import from_compressed_tensors, to_compressed_tensors

    with pytest.raises(jcompress.UserError, match="only nvfp4, mxfp4"):
        to_compressed_tensors(quantize_leaf(w, "int8"))
    with pytest.raises(jcompress.UserError, match="not a multiple"):
        to_compressed_tensors(quantize_leaf(w[:40], "nvfp4"))
    z = quantize_leaf(w.at[:16, 3].set(0.0), "nvfp4")  # an all-zero block: scale 0
    with pytest.raises(
        jcompress.UserError, match="zero or non-finite.*block 0 of output channel 3"
    ):
        to_compressed_tensors(z, where="model.layers.0.mlp.up_proj")
    t = to_compressed_tensors(quantize_leaf(w, "nvfp4"))
    with pytest.raises(jcompress.UserError, match="missing weight_global_scale"):
        from_compressed_tensors({k: v for k, v in t.items() if k != "weight_global_scale"}, "nvfp4")
    for bad in (0.0, np.inf, np.nan):
        with pytest.raises(jcompress.UserError, match="weight_global_scale"):
            from_compressed_tensors(
                {**t, "weight_global_scale": np.array([bad], np.float32)}, "nvfp4"
            )
    mx = to_compressed_tensors(quantize_leaf(w[:32], "mxfp4"))
    with pytest.raises(jcompress.UserError, match="zero or non-finite"):
        from_compressed_tensors(
            {**mx, "weight_scale": np.full_like(mx["weight_scale"], 255)}, "mxfp4"
        )


def test_save_compressed_tensors_model(llama_dir, tmp_path):
    torch = pytest.importorskip("torch")
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from jcompress.quant.apply import QuantApplyConfig, compress
    from jcompress.quant.export import save_compressed_tensors

    cfg, params = jcompress.load_hf(llama_dir)
    qparams, _ = compress(
        params,
        config=QuantApplyConfig(
            rules=(
                (r"model/layers/\d+/mlp/.*", "nvfp4"),
                (r"model/layers/0/self_attn/[qkv]_proj", "mxfp4"),
                (r"model/layers/1/self_attn/o_proj", "int8"),
            )
        ),
        progress=False,
    )
    out = save_compressed_tensors(cfg, qparams, tmp_path / "ct", tokenizer_dir=llama_dir)
    conf = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(conf["quantization_config"])  # the package parses it
    assert conf["torch_dtype"] == "float32" and (out / "tokenizer.json").is_file()
    sd = load_file(out / "model.safetensors")
    flat = flatten(qparams)
    groups = {g.format: g for g in qc.config_groups.values()}
    for module, fmt, comp in (
        ("model.layers.2.mlp.down_proj", "nvfp4", NVFP4PackedCompressor),
        ("model.layers.0.self_attn.k_proj", "mxfp4", MXFP4PackedCompressor),
    ):
        assert f"{module}.weight" not in sd
        local = {k[len(module) + 1 :]: v for k, v in sd.items() if k.startswith(module + ".")}
        scheme = groups[f"{fmt}-pack-quantized"]
        assert module in scheme.targets
        w = comp.decompress(local, scheme)["weight"].float().numpy()  # [out, in]
        leaf = flat[module.replace(".", "/") + "/kernel"]
        # the package dequantizes in bfloat16 (the exact float32 check is the tensor-level test)
        np.testing.assert_allclose(w.T, np.asarray(leaf.materialize()), rtol=2**-7, atol=0)
    # int8 and untouched linears are written dense, as save_hf does
    np.testing.assert_array_equal(
        sd["model.layers.1.self_attn.o_proj.weight"].numpy(),
        np.asarray(flat["model/layers/1/self_attn/o_proj/kernel"].materialize()).T,
    )
    assert torch.equal(
        sd["model.norm.weight"], torch.from_numpy(np.asarray(flat["model/norm/scale"]).copy())
    )
    assert ct is not None
    with pytest.raises(jcompress.UserError, match="no NVFP4 / MXFP4"):
        save_compressed_tensors(cfg, params, tmp_path / "none")
    assert not (tmp_path / "none").exists()
