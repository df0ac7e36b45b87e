"""kernels/fake_quant.py: the Pallas kernel in interpret mode, bit-exact against the jnp
reference (jcompress.quant.fake_quant), on ragged shapes, bf16, zero blocks and several tiles;
the fallback; BlockSizes validation. The GPU lowering runs only where a GPU is present."""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jcompress.kernels import fake_quant as K

from jcompress.errors import UserError
from jcompress.quant import fake_quant as reference


@pytest.fixture(scope="module")
def w():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((200, 72)).astype(np.float32)  # ragged: not a tile multiple
    w[:, 3] *= 50.0
    w[16:48] *= 1e-3
    w[64:96, 5] = 0.0  # all-zero blocks
    w[100:104, :8] = -0.0  # signed zeros: a float code keeps -0.0, an int8 code cannot
    w[40, 7], w[130, 9] = 1e3, -1e3  # outliers: their blocks' small negatives round to zero
    return jnp.asarray(w)


def _bits(x) -> np.ndarray:
    """The bit patterns (so ``-0.0 != +0.0``, which ``assert_array_equal`` lets pass)."""
    x = np.asarray(x)
    return x.view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])


class TestInterpret:
    """The shared suite; a GPU subclass below runs it compiled."""

    interpret = True

    @pytest.mark.parametrize(
        "spec",
        ["nvfp4", "mxfp4", "mxfp6_e2m3", "fp4@64", "fp6@32", "int4@32", "int8@16", "fp8_e4m3@16"],
    )
    def test_bit_exact_vs_reference(self, w, spec):
        assert K.supports(spec, w.shape, interpret=self.interpret)
        got = np.asarray(K.fake_quant(w, spec, interpret=self.interpret))
        want = np.asarray(reference(w, spec))
        np.testing.assert_array_equal(_bits(got), _bits(want))  # the sign of zero included
        zeros = np.signbit(want[want == 0])
        # the fixture has both signs of zero where the codes can hold them (int8 cannot)
        assert zeros.any() != spec.startswith("int") and not zeros.all()

    def test_bf16_and_small_tiles(self, w):
        wb = w.astype(jnp.bfloat16)
        bs = K.BlockSizes(block_in=32, block_out=16)
        got = K.fake_quant(wb, "nvfp4", block_sizes=bs, interpret=self.interpret)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(_bits(got), _bits(reference(wb, "nvfp4")))

    def test_zeros(self):
        z = K.fake_quant(jnp.zeros((64, 32)), "mxfp4", interpret=self.interpret)
        assert np.all(np.asarray(z) == 0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
class TestGPU(TestInterpret):
    interpret = False


@pytest.mark.parametrize(
    ("bi", "bo", "shape"), [(16, 1, (16, 8)), (32, 1, (64, 8)), (4, 4, (8, 12))]
)
def test_dequant_tile(bi, bo, shape):
    """The in-kernel dequantization both kernels share, against numpy: each code times its
    block's scale (one float32 product, so ``-0.0`` codes stay ``-0.0``)."""
    rng = np.random.default_rng(1)
    codes = rng.choice(np.array([-6, -1.5, -0.0, 0.0, 0.5, 3], np.float32), size=shape)
    scales = rng.uniform(0.1, 2, (shape[0] // bi, shape[1] // bo)).astype(np.float32)
    want = codes * np.repeat(np.repeat(scales, bi, axis=0), bo, axis=1)
    got = jax.jit(lambda c, s: K.dequant_tile(c, s, bi=bi, bo=bo))(
        jnp.asarray(codes, jnp.float8_e4m3fn), jnp.asarray(scales)
    )
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_fallback_when_unsupported(w):
    # per-tensor FP8 and per-channel blocks wider than a power-of-two tile go to XLA
    for spec in ("fp8_e4m3", "fp4@in"):
        assert not K.supports(spec, w.shape, interpret=True)
        np.testing.assert_array_equal(
            np.asarray(K.fake_quant(w, spec, interpret=True)), np.asarray(reference(w, spec))
        )
    assert not K.supports("nvfp4", (4,), interpret=True)
    bs = K.BlockSizes(block_in=8, block_out=8)  # smaller than NVFP4's 16-row block
    assert not K.supports("nvfp4", w.shape, bs, interpret=True)


def test_errors(w):
    with pytest.raises(UserError, match="block_in"):
        K.BlockSizes(block_in=24)
    with pytest.raises(UserError, match="block_out"):
        K.BlockSizes(block_out=0)
    with pytest.raises(UserError, match="non-finite"):
        K.fake_quant(w.at[0, 0].set(jnp.nan), "nvfp4", interpret=True)
    with pytest.raises(UserError, match="2-D"):
        K.fake_quant(jnp.ones(4), "nvfp4", interpret=True)
    assert K.BlockSizes.get_default(K.F.parse_spec("fp4@256"), (512, 512)) == K.BlockSizes(256, 256)
