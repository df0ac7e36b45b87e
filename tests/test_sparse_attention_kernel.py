"""kernels/sparse_attention.py: the Pallas kernel (interpret mode on CPU) and the XLA
fallback against the jnp reference (dense attention under the same block mask) on random
block masks, GQA, padding, a cache offset, PV skip and dtypes; compiled on a GPU only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jcompress.kernels import sparse_attention as K

from jcompress.errors import UserError

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _case(b, t, s, hq, hk, d, bk, density, dtype, seed, offset=0, nan_from=None):
    """Random inputs, drawn in numpy (host-side: no device program per case shape). Keys and
    values from ``nan_from`` on hold NaN."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hq, d), np.float32) * 2.0
    k = rng.standard_normal((b, s, hk, d), np.float32)
    v = rng.standard_normal((b, s, hk, d), np.float32)
    nk = -(-s // bk)
    keep = rng.random((b, hq, t, nk)) < density
    keep[..., 0] = True  # every row sees its first key
    valid = np.ones((b, s), bool)
    valid[:, offset + t :] = False  # unused cache slots
    if b > 1:
        valid[1, :2] = False
        keep[1, ..., 0] = True
    if nan_from is not None:
        k[:, nan_from:] = v[:, nan_from:] = np.nan
    q, k, v = (jnp.asarray(x.astype(dtype), dtype) for x in (q, k, v))
    return q, k, v, jnp.asarray(keep, bool), jnp.asarray(valid, bool)


CASES = {
    "gqa_prefill": dict(b=2, t=32, s=32, hq=4, hk=2, d=16, bs=(16, 8), offset=0),
    "uneven": dict(b=1, t=21, s=21, hq=2, hk=2, d=32, bs=(8, 16), offset=0),
    "decode_offset": dict(b=2, t=3, s=40, hq=4, hk=1, d=16, bs=(16, 8), offset=29),
}


class SuiteXLA:
    """One suite, run for every implementation (tokamax-style: an interpret subclass runs
    the Pallas kernel on CPU)."""

    implementation = "xla"
    interpret = False

    @pytest.mark.parametrize(
        "name,dtype",
        [(n, jnp.float32) for n in CASES] + [("gqa_prefill", jnp.bfloat16)],
    )
    def test_matches_reference(self, name, dtype):
        c = CASES[name]
        bs = K.BlockSizes(block_q=c["bs"][0], block_k=c["bs"][1])
        q, k, v, keep, valid = _case(c["b"], c["t"], c["s"], c["hq"], c["hk"], c["d"],
                                     bs.block_k, 0.5, dtype, seed=1,
                                     offset=c["offset"])  # fmt: skip
        pv = jnp.asarray([1.5, jnp.inf, 3.0, 0.5][: c["hq"]])
        kw = dict(block_sizes=bs, scale=0.3, k_valid=valid, q_offset=c["offset"])
        out, skip = K.sparse_attention(q, k, v, keep, pv, implementation=self.implementation,
                                       interpret=self.interpret, **kw)  # fmt: skip
        ref, ref_skip = K.sparse_attention(q, k, v, keep, pv, implementation="reference", **kw)
        assert out.dtype == dtype and out.shape == ref.shape
        # rows with no visible key (left padding before the first real token) carry no meaning
        slots = c["offset"] + np.arange(c["t"])
        rows = np.cumsum(np.asarray(valid), 1)[:, slots] > 0  # [B, T]
        np.testing.assert_allclose(
            np.asarray(out, np.float32)[rows], np.asarray(ref, np.float32)[rows], atol=TOL[dtype]
        )
        if dtype == jnp.float32:
            np.testing.assert_array_equal(np.asarray(skip), np.asarray(ref_skip))
            assert int(np.asarray(skip).sum()) > 0

    def test_empty_tiles_are_skipped_not_read(self):
        """A key block no row keeps never influences the output, even holding NaN."""
        q, k, v, keep, valid = _case(1, 16, 32, 2, 1, 16, 8, 0.0, jnp.float32, seed=2,
                                     nan_from=24)  # fmt: skip
        keep = jnp.asarray(np.asarray(keep) | (np.arange(keep.shape[-1]) == 1), bool)
        bs = K.BlockSizes(block_q=8, block_k=8)
        pv = jnp.asarray(np.full(2, np.inf, np.float32), jnp.float32)
        out, _ = K.sparse_attention(q, k, v, keep, pv, block_sizes=bs,
                                    causal=False, implementation=self.implementation,
                                    interpret=self.interpret)  # fmt: skip
        assert np.isfinite(np.asarray(out)).all()


class TestXLA(SuiteXLA):
    pass


class TestPallasInterpret(SuiteXLA):
    implementation = "pallas"
    interpret = True


def test_supports_and_fallback():
    q = jnp.zeros((1, 16, 2, 16))
    bs = K.BlockSizes()
    assert K.supports(q, q, q, block_sizes=bs, interpret=True)
    assert not K.supports(q, q, q, block_sizes=bs, interpret=True, alibi=True)
    if jax.default_backend() != "gpu":
        assert not K.supports(q, q, q, block_sizes=bs)
        # "pallas" without a GPU falls back to XLA: an answer, never an error
        keep = jnp.ones((1, 2, 16, 1), bool)
        out, _ = K.sparse_attention(q, q, q, keep, jnp.inf, block_sizes=bs,
                                    implementation="pallas")  # fmt: skip
        assert out.shape == (1, 16, 2, 16)
    with pytest.raises(UserError, match="implementation: 'triton' is not one of"):
        K.sparse_attention(q, q, q, None, 0.0, implementation="triton")
    with pytest.raises(UserError, match="block_q: must be an integer"):
        K.BlockSizes(block_q=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled Pallas needs a GPU")
def test_compiled_kernel_on_gpu():
    q, k, v, keep, valid = _case(1, 256, 256, 4, 2, 64, 64, 0.5, jnp.float16, seed=3)
    bs = K.BlockSizes(block_q=64, block_k=64)
    pv = jnp.full((4,), 4.0)
    # the compiled kernel really runs here (not the silent XLA fallback) ...
    assert K.supports(q, k, v, block_sizes=bs)
    out, _ = K.sparse_attention(q, k, v, keep, pv, block_sizes=bs, k_valid=valid,
                                implementation="pallas")  # fmt: skip

    # ... and is the Pallas program: its lowered module holds the Pallas GPU custom call
    def pallas_out(q, k, v):
        return K.sparse_attention(q, k, v, keep, pv, block_sizes=bs, k_valid=valid,
                                  implementation="pallas")[0]  # fmt: skip

    hlo = jax.jit(pallas_out).lower(q, k, v).as_text()
    assert "xla.gpu.triton" in hlo or "mosaic_gpu" in hlo, "'pallas' fell back to XLA on a GPU"
    ref, _ = K.sparse_attention(q, k, v, keep, pv, block_sizes=bs, k_valid=valid,
                                implementation="reference")  # fmt: skip
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=1e-2)  # fmt: skip


def test_triton_shapes():
    """The compiled kernel's shape rule (power-of-two blocks, checked without a GPU): head dims
    and tiles >= 16, and the per-row blocks of keys (``nK`` key blocks, ``Sp = nK x bk``)."""
    bs = K.BlockSizes(block_q=64, block_k=32)
    assert K.triton_shapes_ok(64, 64, 256, 256, bs)  # nK = 8
    assert K.triton_shapes_ok(128, 128, 1000, 250, bs)  # S padded to 256: nK = 8
    assert not K.triton_shapes_ok(64, 64, 256, 96, bs)  # nK = 3
    assert not K.triton_shapes_ok(80, 80, 256, 256, bs)  # head_dim 80
    assert not K.triton_shapes_ok(8, 8, 256, 256, bs)  # head_dim below 16
    assert not K.triton_shapes_ok(64, 64, 8, 256, bs)  # one query block of 8 rows
    assert K.triton_shapes_ok(64, 64, 16, 32, bs)  # decode-like: bq = T = 16, nK = 1
