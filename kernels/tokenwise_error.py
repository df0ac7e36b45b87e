"""Fused ``X W~ + b - Y`` and per-token squared error, ``W~`` dequantized from codes + scales.

Contract (the Pallas kernel, the XLA fallback and the reference agree on it):

* ``x [N, in]`` and ``y [N, out]`` (any float dtype: a save_xy cache's fp16 / bf16 / fp32),
  ``q`` a :class:`jcompress.quant.formats.Quantized` of an ``[in, out]`` kernel in ``spec``,
  ``bias [out]`` or ``None``.
* Returns ``d2 [N]`` float32: ``d2[t] = sum_o (x[t] @ W~ + b - y[t])[o] ** 2`` with
  ``W~ = codes * (scales * global_scale)`` (:func:`jcompress.quant.formats.dequantize`),
  products and sums in float32.

The Pallas kernel runs one program per ``(token tile, output tile)``: it walks the input
dimension one quantization block (``bi`` rows: 16 for NVFP4, 32 for MX) at a time, dequantizes
that ``[bi, block_out]`` slab of codes with its row of block scales in registers, accumulates
``x_slab @ w_slab`` in float32, and at the end subtracts ``y``, squares and sums over the
tile's outputs. The dequantization is :func:`jcompress.kernels.fake_quant.dequant_tile`, the
fake-quant kernel's own. ``W~`` never exists in memory (the codes are one byte, a quarter of an
fp32 weight) and ``X W~`` never leaves the program. Partial sums over output tiles
(``[n_out_tiles, N]``) are added by the wrapper.

Accumulation order differs from one full GEMM (blocks of ``bi`` along ``in``), so the kernel
matches the reference to float32 rounding (relative ~1e-6 of ``d2``), not bit for bit.

Supported (:func:`supports`): formats whose quantization block is ``(bi, 1)`` with ``bi`` a
power of two in [8, 256] (NVFP4, MXFP4/6/8, grouped INT / FP8 such as ``int4@32``), on a GPU
(Triton) or in interpret mode; anything else (per-tensor / per-channel scales, the seed's
square tiles, CPU without ``interpret``) takes the XLA fallback, which is the reference.
On CPU the kernel only runs interpreted (tests): there XLA's dense GEMM is the fast path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jcompress.kernels.fake_quant import dequant_tile

from jcompress.errors import UserError
from jcompress.quant import formats as F
from jcompress.quant.formats import Quantized, QuantSpec

__all__ = ["BlockSizes", "reference", "supports", "tokenwise_error", "xla_tokenwise_error"]

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile per program: ``block_tokens`` rows of ``x`` x ``block_out`` output columns.

    Both are powers of two (Triton's block shapes); ``N`` and ``out`` are padded to them.
    """

    block_tokens: int = 64
    block_out: int = 128

    def __post_init__(self):
        for name in ("block_tokens", "block_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 16 <= v <= 1024 or v & (v - 1):
                raise UserError(f"BlockSizes.{name}: a power of two in [16, 1024], got {v!r}")


def _spec(spec: QuantSpec | str) -> QuantSpec:
    return spec if isinstance(spec, QuantSpec) else F.parse_spec(spec, arg="spec")


def supports(
    spec: QuantSpec | str,
    shape: tuple[int, ...],
    block_sizes: BlockSizes | None = None,
    *,
    interpret: bool = False,
) -> bool:
    """Whether the Pallas kernel runs ``spec`` on an ``[in, out]`` kernel of ``shape``."""
    spec = _spec(spec)
    if len(shape) != 2 or min(shape) <= 0:
        return False
    bi, bo = F.block_shape(spec, shape)
    if bo != 1 or not 8 <= bi <= 256 or bi & (bi - 1):
        return False
    return interpret or jax.default_backend() == "gpu"


def _decoded_scales(q: Quantized, spec: QuantSpec) -> jax.Array:
    """``[ceil(in / bi), out]`` float32 block scales times the tensor scale (as dequantize)."""
    return F.scale_values(q.scales, spec) * jnp.reshape(q.global_scale, ()).astype(jnp.float32)


def _d2(x: jax.Array, y: jax.Array, w: jax.Array, bias: jax.Array | None) -> jax.Array:
    yh = jnp.dot(x.astype(jnp.float32), w, precision=HIGHEST)
    if bias is not None:
        yh = yh + bias.astype(jnp.float32)[None, :]
    d = yh - y.astype(jnp.float32)
    return jnp.sum(d * d, axis=1)


@functools.partial(jax.jit, static_argnames=("spec",))
def reference(
    x: jax.Array, y: jax.Array, q: Quantized, spec: QuantSpec, bias: jax.Array | None = None
) -> jax.Array:
    """The formula with ``W~`` materialized (:func:`jcompress.quant.formats.dequantize`) and
    one float32 GEMM: the oracle, and the XLA fallback."""
    return _d2(x, y, F._dequantize_core(q, spec), bias)


xla_tokenwise_error = reference


def _kernel(x_ref, y_ref, c_ref, s_ref, b_ref, o_ref, *, bi: int, n_blocks: int):
    """Program ``(i, j)``: ``x_ref [TN, in]``, ``y_ref [TN, TO]``, ``c_ref [in, TO]`` codes,
    ``s_ref [in / bi, TO]`` float32 scales, ``b_ref [TO]``, ``o_ref [TN]`` partial ``d2``."""
    tn, to = y_ref.shape

    def body(k, acc):
        xk = x_ref[:, pl.ds(k * bi, bi)].astype(jnp.float32)  # [TN, bi]
        ck = c_ref[pl.ds(k * bi, bi), :]  # [bi, TO] codes
        sk = s_ref[pl.ds(k, 1), :]  # [1, TO]: one scale per (block, column)
        wk = dequant_tile(ck, sk, bi=bi, bo=1)  # [bi, TO]
        return acc + jnp.dot(xk, wk, precision=HIGHEST, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((tn, to), jnp.float32))
    d = acc + b_ref[...].astype(jnp.float32)[None, :] - y_ref[...].astype(jnp.float32)
    o_ref[...] = jnp.sum(d * d, axis=1)


@functools.partial(jax.jit, static_argnames=("spec", "block_sizes", "interpret"))
def _pallas(x, y, q, bias, spec: QuantSpec, block_sizes: BlockSizes, interpret: bool):
    n, d_in = x.shape
    d_out = y.shape[1]
    bi, _ = F.block_shape(spec, (d_in, d_out))
    nb = -(-d_in // bi)
    tn, to = block_sizes.block_tokens, block_sizes.block_out
    pn, po = -(-n // tn) * tn, -(-d_out // to) * to
    s = _decoded_scales(q, spec)
    # zero padding adds nothing: padded inputs meet zero codes, padded outputs are 0 - 0
    xp = jnp.pad(x, ((0, pn - n), (0, nb * bi - d_in)))
    yp = jnp.pad(y, ((0, pn - n), (0, po - d_out)))
    cp = jnp.pad(q.codes, ((0, nb * bi - d_in), (0, po - d_out)))
    sp = jnp.pad(s, ((0, 0), (0, po - d_out)))
    b = jnp.zeros((d_out,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    bp = jnp.pad(b, (0, po - d_out))
    n_j = po // to
    part = pl.pallas_call(
        functools.partial(_kernel, bi=bi, n_blocks=nb),
        grid=(pn // tn, n_j),
        in_specs=[
            pl.BlockSpec((tn, nb * bi), lambda i, j: (i, 0)),  # x: whole rows
            pl.BlockSpec((tn, to), lambda i, j: (i, j)),  # y
            pl.BlockSpec((nb * bi, to), lambda i, j: (0, j)),  # codes: whole columns
            pl.BlockSpec((nb, to), lambda i, j: (0, j)),  # scales
            pl.BlockSpec((to,), lambda i, j: (j,)),  # bias
        ],
        out_specs=pl.BlockSpec((None, tn), lambda i, j: (j, i)),
        out_shape=jax.ShapeDtypeStruct((n_j, pn), jnp.float32),
        interpret=interpret,
    )(xp, yp, cp, sp, bp)
    return jnp.sum(part, axis=0)[:n]


def tokenwise_error(
    x: jax.Array,
    y: jax.Array,
    q: Quantized,
    spec: QuantSpec | str,
    bias: jax.Array | None = None,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Per-token squared error ``d2 [N]`` of ``x @ W~ + bias`` against ``y`` (module doc),
    with the Pallas kernel where :func:`supports` says so, else :func:`xla_tokenwise_error`.

    Args:
      x: ``[N, in]`` inputs.
      y: ``[N, out]`` reference outputs.
      q: the quantized kernel (codes ``[in, out]``, block scales, tensor scale).
      spec: its :class:`~jcompress.quant.QuantSpec` (or spec string).
      bias: ``[out]`` or ``None``.
      block_sizes: the kernel's tile (default :class:`BlockSizes`).
      interpret: run the kernel in the Pallas interpreter (any backend; tests).

    Returns:
      ``[N]`` float32.
    """
    spec = _spec(spec)
    if getattr(x, "ndim", None) != 2 or getattr(y, "ndim", None) != 2:
        raise UserError(f"tokenwise_error: x and y must be 2-D, got {x.shape} and {y.shape}")
    shape = tuple(q.codes.shape)
    if x.shape[1] != shape[0] or y.shape[1] != shape[1] or x.shape[0] != y.shape[0]:
        raise UserError(
            f"tokenwise_error: shapes disagree: x {tuple(x.shape)}, y {tuple(y.shape)}, "
            f"codes {shape} (want x [N, in], y [N, out], codes [in, out])"
        )
    if bias is not None and tuple(bias.shape) != (shape[1],):
        raise UserError(f"tokenwise_error: bias must be [{shape[1]}], got {tuple(bias.shape)}")
    bs = block_sizes or BlockSizes()
    if not supports(spec, shape, bs, interpret=interpret):
        return xla_tokenwise_error(x, y, q, spec, bias)
    return _pallas(x, y, q, bias, spec, bs, interpret)
