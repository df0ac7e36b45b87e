"""quant/split_gemm.py: quantized weights as ``bf16 core x float32 column scale``, activations
as exact bf16 pieces, and ``X W~`` from bf16 dots with float32 accumulation; checked against
float64 oracles (the pieces sum to ``x`` exactly; the product's error is float32
accumulation's, far below what a one-piece bf16 GEMM would give) and, through the tokenwise
metrics, against the float32 GEMM route."""

from __future__ import annotations

import types

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jcompress.errors import UserError
from jcompress.quant import split_gemm as S
from jcompress.quant.formats import dequantize, parse_spec, quantize
from jcompress.quant.tokenwise import (
    tokenwise_metrics,
    tokenwise_metrics_quantized,
    tokenwise_metrics_split,
)

FACTORING = ["nvfp4", "mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8", "fp8_e4m3", "fp8_e5m2",
             "int4", "int8@128", "fp4@out", "fp6@out", "fp8@out", "fp4@128"]  # fmt: skip
NOT_FACTORING = ["fp4@in", "fp4@16", "int4@32", "fp8_e4m3@in"]  # scales vary along ``in``


@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 40)) / 10).astype(np.float32)
    w[:, 3] *= 40.0  # an outlier column
    w[7] *= 25.0  # an outlier input channel
    w[32:64, 5] = 0.0  # an all-zero block (NVFP4 / MX / int groups)
    w[0, 9] = 3e-5  # a tiny value among large ones
    return w


def _rel_ulp_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.maximum(np.abs(b), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(a - b) / scale))


@pytest.mark.parametrize("spec", FACTORING)
def test_factors_rebuild_the_dequantized_weight(weight, spec):
    q = quantize(jnp.asarray(weight), spec)
    f = S.bf16_factors(q, spec)
    assert f is not None, spec
    core, col = f
    assert core.dtype == jnp.bfloat16 and core.shape == weight.shape and col.shape == (40,)
    rebuilt = np.asarray(core, np.float64) * np.asarray(col, np.float64)
    # equal to the dequantized weight up to the rounding of one float32 scale product
    assert _rel_ulp_diff(rebuilt, dequantize(q, spec)) <= 2.0**-23


@pytest.mark.parametrize("spec", NOT_FACTORING)
def test_scales_along_the_input_do_not_factor(weight, spec):
    q = quantize(jnp.asarray(weight), spec)
    assert not S.factors_structurally(spec, weight.shape)
    assert S.bf16_factors(q, spec) is None


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_pieces_sum_exactly(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(4000) * np.exp2(rng.integers(-12, 12, 4000))
    if dtype is np.float16:
        x = np.concatenate([x, [65504.0, -65504.0, 2.0**-24, -(2.0**-24), 6.1e-5, -0.0, 0.0]])
    x = x.astype(dtype)
    pieces = S.split_bf16(jnp.asarray(x))
    assert len(pieces) == S.n_pieces(dtype) and all(p.dtype == jnp.bfloat16 for p in pieces)
    total = sum(np.asarray(p, np.float64) for p in pieces)
    np.testing.assert_array_equal(total, x.astype(np.float64))


def test_pieces_at_the_float32_limits():
    big = np.float32(np.finfo(np.float32).max)  # above bf16's largest finite value
    x = np.array([big, -big, 3.39e38, np.inf, -np.inf, np.nan, 1.0], np.float32)
    pieces = S.split_bf16(jnp.asarray(x))
    total = sum(np.asarray(p, np.float64) for p in pieces)
    np.testing.assert_array_equal(total[:3], x[:3].astype(np.float64))  # finite: exact
    assert total[3] == np.inf and total[4] == -np.inf and np.isnan(total[5]) and total[6] == 1
    # through the dot: what a float32 GEMM gives
    got = np.asarray(S.split_dot(jnp.asarray(x[None, [0, 3, 6]]), jnp.ones((3, 2), jnp.bfloat16),
                                 jnp.full((2,), 0.25, jnp.float32)))  # fmt: skip
    assert np.all(got == np.inf)
    got = np.asarray(S.split_dot(jnp.asarray(x[None, [0, 6]]), jnp.ones((2, 1), jnp.bfloat16),
                                 jnp.full((1,), 0.25, jnp.float32)))  # fmt: skip
    assert got[0, 0] == np.float32(big * np.float32(0.25) + np.float32(0.25))


@pytest.mark.parametrize("x_dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("spec", ["nvfp4", "int8", "mxfp8"])
def test_split_dot_has_float32_accuracy(weight, spec, x_dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((37, weight.shape[0])).astype(x_dtype)
    q = quantize(jnp.asarray(weight), spec)
    core, col = S.bf16_factors(q, spec)
    got = np.asarray(S.split_dot(jnp.asarray(x), core, col), np.float64)
    w64 = np.asarray(core, np.float64) * np.asarray(col, np.float64)
    x64 = x.astype(np.float64)
    exact = x64 @ w64
    # float32 accumulation over ``in`` terms: |error| <= ~in * 2**-24 * sum |x| |w| per output
    bound = weight.shape[0] * 2.0**-24 * (np.abs(x64) @ np.abs(w64))
    assert np.all(np.abs(got - exact) <= bound)
    # a one-piece bf16 GEMM (x rounded to bf16) misses that bound by orders of magnitude
    if x_dtype is not ml_dtypes.bfloat16:
        x1 = x.astype(ml_dtypes.bfloat16).astype(np.float64)
        assert np.max(np.abs(x1 @ w64 - exact) / bound) > 100


def test_metrics_split_route_equals_fp32_route(weight):
    rng = np.random.default_rng(3)
    b = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((70, 96)).astype(np.float16)
    y = (x.astype(np.float32) @ weight + b).astype(np.float16)
    for spec, xs in (("nvfp4", x), ("int4", x), ("fp8@out", x.astype(np.float32))):
        q = quantize(jnp.asarray(weight), spec)
        split = tokenwise_metrics_quantized(xs, y, q, spec, b, chunk_tokens=32, gemm="split_bf16")
        fp32 = tokenwise_metrics_quantized(xs, y, q, spec, b, chunk_tokens=32, gemm="fp32")
        want = tokenwise_metrics(xs, y, dequantize(q, spec), b, chunk_tokens=32)[0]
        assert fp32 == want
        for k, v in want.items():
            assert split[k] == pytest.approx(v, rel=1e-5, abs=1e-12), (spec, k)
    # a weight that does not factor takes the float32 GEMM whatever is asked
    q = quantize(jnp.asarray(weight), "fp4@in")
    got = tokenwise_metrics_quantized(x, y, q, "fp4@in", b, gemm="split_bf16")
    assert got == tokenwise_metrics(x, y, dequantize(q, "fp4@in"), b)[0]


def test_metrics_split_with_lowrank_and_smoothing(weight):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((50, 96)).astype(np.float16)
    y = (x.astype(np.float32) @ weight).astype(np.float16)
    inv = rng.uniform(0.5, 2.0, 96).astype(np.float32)
    a = rng.standard_normal((96, 6)).astype(np.float32) / 10
    bs = rng.standard_normal((2, 6, 40)).astype(np.float32) / 10
    bs[0, 4:] = 0.0  # candidate 0 uses 4 directions, candidate 1 all 6
    cores, cols, dense = [], [], []
    for c, spec in enumerate(("nvfp4", "int8")):
        q = quantize(jnp.asarray(weight - a @ bs[c]), spec)
        core, col = S.bf16_factors(q, spec)
        cores.append(core)
        cols.append(col)
        dense.append(a @ bs[c] + np.asarray(dequantize(q, spec)))
    got = tokenwise_metrics_split(x, y, jnp.stack(cores), jnp.stack(cols), lowrank=(a, bs),
                                  inv_scale=inv, chunk_tokens=16)  # fmt: skip
    want = tokenwise_metrics(x, y, np.stack(dense), inv_scale=inv, chunk_tokens=16)
    for g, w in zip(got, want, strict=True):
        for k, v in w.items():
            assert g[k] == pytest.approx(v, rel=1e-5, abs=1e-12), k


def test_gemm_argument_and_pays_rule(weight):
    q = quantize(jnp.asarray(weight), "nvfp4")
    x = np.zeros((4, 96), np.float16)
    with pytest.raises(UserError, match=r"gemm: must be one of auto, fp32, split_bf16"):
        tokenwise_metrics_quantized(x, x[:, :40], q, "nvfp4", gemm="bf16")
    gpu = types.SimpleNamespace(platform="gpu", compute_capability="9.0")
    old_gpu = types.SimpleNamespace(platform="gpu", compute_capability="7.0")
    assert S.split_pays(gpu) and not S.split_pays(old_gpu)
    assert S.split_pays(types.SimpleNamespace(platform="tpu"), np.float32)
    assert not S.split_pays(gpu, np.float64)  # float64 activations are not split
    cpu = types.SimpleNamespace(platform="cpu")
    assert not S.split_pays(cpu, np.float16)  # measured: not worth it on XLA:CPU (module doc)
    assert parse_spec("nvfp4") and S.as_gemm("auto") is S.Gemm.AUTO


def test_metrics_inputs_checked(weight):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 96)).astype(np.float16)
    y = (x.astype(np.float32) @ weight).astype(np.float16)
    q = quantize(jnp.asarray(weight), "nvfp4")
    cases = [
        (lambda: tokenwise_metrics(x, y[:, :1], weight), "shape mismatch"),  # no broadcasting
        (lambda: tokenwise_metrics(x, y, weight, np.ones(1)), r"bias must have shape \(40,\)"),
        (lambda: tokenwise_metrics(x, y, weight, inv_scale=np.ones(3)), "inv_scale"),
        (lambda: tokenwise_metrics(x[:0], y[:0], weight), "no tokens"),
        (lambda: tokenwise_metrics(x, y, weight, chunk_tokens=0), "chunk_tokens"),
        (lambda: tokenwise_metrics(x, y, weight, eps=-1.0), "eps"),
        (lambda: tokenwise_metrics(x[0], y, weight), "2-D"),
        (lambda: tokenwise_metrics_quantized(x, y, q, "mxfp4"), "not a mxfp4 quantization"),
        (
            lambda: tokenwise_metrics_split(
                x, y, jnp.zeros((1, 96, 40), jnp.bfloat16), np.ones((2, 40))
            ),
            "col_scales",
        ),  # fmt: skip
    ]
    for call, msg in cases:
        with pytest.raises(UserError, match=msg):
            call()
    # an empty weight quantizes to an empty weight in every format (NVFP4's tensor scale too)
    assert dequantize(quantize(np.zeros((0, 5), np.float32), "nvfp4"), "nvfp4").shape == (0, 5)
