"""kernels/tokenwise_error.py: the fused ``X W~ - Y`` + per-token error kernel in interpret
mode against a numpy float64 oracle (``W~`` rebuilt from the codes and scales by hand), on
ragged shapes, fp16 / bf16 caches and a bias; the fallback; tokenwise_metrics_quantized against
tokenwise_metrics. The GPU lowering runs only where a GPU is present."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jcompress.kernels import tokenwise_error as K

from jcompress.errors import UserError
from jcompress.quant.formats import parse_spec, quantize
from jcompress.quant.tokenwise import tokenwise_metrics, tokenwise_metrics_quantized

SMALL = K.BlockSizes(block_tokens=16, block_out=16)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n, d_in, d_out = 70, 80, 40  # ragged: no dimension is a tile multiple
    w = (rng.standard_normal((d_in, d_out)) / 9).astype(np.float32)
    w[:, 3] *= 30.0
    w[16:32, 5] = 0.0  # an all-zero block
    b = rng.standard_normal(d_out).astype(np.float32)
    x = rng.standard_normal((n, d_in)).astype(np.float16)
    y = (x.astype(np.float32) @ w + b).astype(np.float16)
    return x, y, w, b


def _oracle(x, y, q, spec, b):
    """``W~ = codes * scale[block] * g`` rebuilt in numpy, then the error in float64."""
    bi = {"nvfp4": 16}.get(spec, 32)
    codes = np.asarray(q.codes).astype(np.float64)
    sc = np.asarray(q.scales)
    if spec.startswith("mx"):
        sc = 2.0 ** (sc.astype(np.float64) - 127)  # E8M0 bits
    else:
        sc = sc.astype(np.float32).astype(np.float64)
    scale = np.repeat(sc, bi, axis=0)[: codes.shape[0]] * float(np.asarray(q.global_scale)[0])
    w_hat = codes * scale
    d = x.astype(np.float64) @ w_hat + b - y.astype(np.float64)
    return np.sum(d * d, axis=1)


class TestInterpret:
    """The shared suite; a GPU subclass below runs it compiled."""

    interpret = True

    @pytest.mark.parametrize("spec", ["nvfp4", "mxfp4", "int4@32"])
    def test_matches_oracle(self, data, spec):
        x, y, w, b = data
        q = quantize(jnp.asarray(w), spec)
        assert K.supports(spec, w.shape, SMALL, interpret=self.interpret)
        got = K.tokenwise_error(
            jnp.asarray(x), jnp.asarray(y), q, spec, jnp.asarray(b),
            block_sizes=SMALL, interpret=self.interpret,
        )  # fmt: skip
        assert got.shape == (x.shape[0],) and got.dtype == jnp.float32
        want = _oracle(x, y, q, spec, b)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6 * want.max())
        ref = K.reference(jnp.asarray(x), jnp.asarray(y), q, parse_spec(spec), jnp.asarray(b))
        np.testing.assert_allclose(np.asarray(ref), want, rtol=2e-5, atol=1e-6 * want.max())

    def test_bf16_cache_no_bias_default_tiles(self, data):
        x, y, w, _ = data
        xb = jnp.asarray(x.astype(np.float32)).astype(jnp.bfloat16)
        yb = jnp.asarray(y.astype(np.float32)).astype(jnp.bfloat16)
        q = quantize(jnp.asarray(w), "nvfp4")
        got = K.tokenwise_error(xb, yb, q, "nvfp4", interpret=self.interpret)
        xs = np.asarray(xb.astype(jnp.float32))
        ys = np.asarray(yb.astype(jnp.float32))
        want = _oracle(xs, ys, q, "nvfp4", 0.0)
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6 * want.max())

    def test_metrics_through_the_kernel(self, data):
        x, y, w, b = data
        q = quantize(jnp.asarray(w), "nvfp4")
        got = tokenwise_metrics_quantized(
            x, y, q, "nvfp4", b, chunk_tokens=32, block_sizes=SMALL, interpret=self.interpret
        )
        w_hat = jnp.asarray(_dense(q, "nvfp4"))  # the dense path on the same W~
        want = tokenwise_metrics(x, y, w_hat, b, chunk_tokens=32)[0]
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4), k


def _dense(q, spec):
    from jcompress.quant.formats import dequantize

    return np.asarray(dequantize(q, spec))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
class TestGPU(TestInterpret):
    interpret = False


def test_fallback(data):
    x, y, w, b = data
    for spec in ("fp8_e4m3", "fp4@in", "fp4@64"):  # per tensor, per row, square tiles
        assert not K.supports(spec, w.shape, interpret=True)
    q = quantize(jnp.asarray(w), "fp8_e4m3")
    got = K.tokenwise_error(jnp.asarray(x), jnp.asarray(y), q, "fp8_e4m3", jnp.asarray(b),
                            interpret=True)  # fmt: skip
    w_hat = np.asarray(q.codes.astype(jnp.float32), np.float64) * float(q.scales.reshape(()))
    d = x.astype(np.float64) @ w_hat + b - y.astype(np.float64)
    want = np.sum(d * d, axis=1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6 * want.max())
    if jax.default_backend() == "cpu":  # compiled Pallas needs a GPU: the XLA path here
        assert not K.supports("nvfp4", w.shape)
    # the fallback of the metrics is the dense path
    m = tokenwise_metrics_quantized(x, y, q, "fp8_e4m3", b)
    assert m["nmse"] == pytest.approx(float(np.sum(want) / np.sum(y.astype(np.float64) ** 2)),
                                      rel=1e-4)  # fmt: skip


def test_errors(data):
    x, y, w, _ = data
    q = quantize(jnp.asarray(w), "nvfp4")
    with pytest.raises(UserError, match="block_tokens"):
        K.BlockSizes(block_tokens=24)
    with pytest.raises(UserError, match="block_out"):
        K.BlockSizes(block_out=8)
    with pytest.raises(UserError, match="shapes disagree"):
        K.tokenwise_error(jnp.asarray(x[:, :40]), jnp.asarray(y), q, "nvfp4", interpret=True)
    with pytest.raises(UserError, match="bias"):
        K.tokenwise_error(jnp.asarray(x), jnp.asarray(y), q, "nvfp4", jnp.zeros(3),
                          interpret=True)  # fmt: skip
