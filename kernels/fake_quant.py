"""Pallas block-scaled fake quantization (FP4 / NVFP4 / MX / INT / the seed's minifloats).

``fake_quant(w, spec)`` computes exactly what :func:`jcompress.quant.fake_quant` (the jnp
reference, also the XLA fallback) computes, one ``[block_in, block_out]`` tile of ``w`` per
program: the tile is cut into quantization blocks ``(bi, bo)``, each block's absolute maximum
gives its scale, and each entry is rounded on the element grid and scaled back, in one pass
over HBM (read ``w`` once, write ``w_hat`` once). NVFP4's tensor scale needs the whole tensor's
amax: the wrapper computes it first (one reduction) and passes it in.

Rounding in the kernel uses bit arithmetic (exponent from the float32 bits, quantum a power of
two built from bits, round-half-even of ``a * 2**(mbits - e)``): no ``frexp`` / ``ldexp``, which
Triton does not lower, and bit-exact with the reference's ``frexp`` form (tested in interpret
mode).

Supported (:func:`supports`): every format whose block fits a tile (``bi <= block_in``,
``bo <= block_out``, both dividing the tile): NVFP4 / MX / grouped INT and FP8, the seed's
``fp4@in|out|<tile>`` ..., per-channel INT; per-tensor FP8 (one block = the whole array) goes
to the fallback. Backends: ``interpret=True`` anywhere (the tests), GPU (Triton) when a GPU is
present; anything else falls back to XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jcompress.errors import UserError
from jcompress.quant import formats as F
from jcompress.quant.formats import QuantSpec

__all__ = ["BlockSizes", "dequant_tile", "fake_quant", "fake_quant_reference", "supports"]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile of ``w`` per program.

    Attributes:
      block_in: rows (input dimension) per tile; a multiple of the quantization block's rows.
      block_out: columns (output dimension) per tile; a multiple of its columns.
    """

    block_in: int = 128
    block_out: int = 128

    def __post_init__(self):
        for name in ("block_in", "block_out"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise UserError(f"BlockSizes.{name}: a positive power of two, got {v!r}")

    @classmethod
    def get_default(cls, spec: QuantSpec, shape: tuple[int, int]) -> BlockSizes:
        """A tile that holds whole quantization blocks: at least ``(bi, bo)``, 128 otherwise."""
        bi, bo = F.block_shape(spec, shape)
        up = lambda n: 1 << max(n - 1, 0).bit_length()  # noqa: E731
        return cls(max(128, up(bi)), max(128, up(bo)))


def fake_quant_reference(w: jax.Array, spec: QuantSpec | str) -> jax.Array:
    """The jnp reference (and fallback): :func:`jcompress.quant.fake_quant`."""
    return F.fake_quant(w, spec)


def _spec(spec: QuantSpec | str) -> QuantSpec:
    return spec if isinstance(spec, QuantSpec) else F.parse_spec(spec, arg="spec")


def supports(
    spec: QuantSpec | str,
    shape: tuple[int, ...],
    block_sizes: BlockSizes | None = None,
    *,
    interpret: bool = False,
) -> bool:
    """Whether the Pallas path runs ``spec`` on an array of ``shape`` (else: the fallback)."""
    spec = _spec(spec)
    if len(shape) != 2 or min(shape) <= 0:
        return False
    bi, bo = F.block_shape(spec, shape)
    bs = block_sizes or BlockSizes.get_default(spec, shape)
    if bi > 1024 or bo > 1024 or bs.block_in % bi or bs.block_out % bo:
        return False
    if bs.block_in * bs.block_out > 1 << 20:
        return False
    return interpret or jax.default_backend() == "gpu"


def _pow2(k: jax.Array) -> jax.Array:
    """``2.0 ** k`` for int32 ``k`` in the float32 normal range, from its bits."""
    return jax.lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def _round_bits(y: jax.Array, el: F.Element) -> jax.Array:
    """:func:`jcompress.quant.formats.round_to_grid` with bit arithmetic (Triton-friendly),
    signed zeros as the stored codes have them: a float grid keeps the sign of ``y``
    (``copysign``, so ``-0.0`` and negatives that round to zero give ``-0.0``, as a float8 code
    does); an INT grid gives ``+0.0`` (an ``int8`` code has no ``-0``)."""
    a = jnp.minimum(jnp.abs(y), el.max)
    if el.ebits == 0:
        q = jnp.round(a)
        return jnp.where((y < 0) & (q > 0), -q, q)
    e = ((jax.lax.bitcast_convert_type(a, jnp.int32) >> 23) & 0xFF) - 127  # floor(log2 a)
    e = jnp.maximum(e, el.emin)
    q = jnp.round(a * _pow2(el.mbits - e)) * _pow2(e - el.mbits)
    q = jnp.minimum(q, el.max)
    sign = jax.lax.bitcast_convert_type(y, jnp.uint32) & jnp.uint32(0x80000000)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(q, jnp.uint32) | sign,
                                        jnp.float32)  # fmt: skip


def dequant_tile(codes: jax.Array, scales: jax.Array, *, bi: int, bo: int) -> jax.Array:
    """In-kernel :func:`jcompress.quant.formats.dequantize` of one tile: each code times its
    block's scale, one float32 product per entry, as the reference computes it.

    Shared by this kernel (after rounding) and :mod:`jcompress.kernels.tokenwise_error` (one
    quantization block of rows at a time), so both dequantize exactly as the reference does.

    Args:
      codes: ``[TI, TO]`` grid values (any dtype holding them exactly; ``-0.0`` stays ``-0.0``).
      scales: ``[TI / bi, TO / bo]`` float32 decoded block scales, the tensor scale already
        multiplied in (:func:`jcompress.quant.formats.scale_values` ``* global_scale``).
      bi, bo: the quantization block; ``TI % bi == TO % bo == 0``.

    Returns:
      ``[TI, TO]`` float32.
    """
    ti, to = codes.shape
    nbi, nbo = ti // bi, to // bo
    c = codes.astype(jnp.float32)
    if bo == 1 and nbi == 1:  # one block of rows: the scales are a row vector
        return c * scales
    if bo == 1:
        return (c.reshape(nbi, bi, to) * scales[:, None, :]).reshape(ti, to)
    return (c.reshape(nbi, bi, nbo, bo) * scales[:, None, :, None]).reshape(ti, to)


def _kernel(g_ref, w_ref, o_ref, *, spec: QuantSpec, bi: int, bo: int):
    """One tile: ``w_ref`` ``[TI, TO]`` -> ``o_ref`` ``[TI, TO]``; ``g_ref`` ``[1]`` (NVFP4's
    tensor scale, else unused)."""
    f = spec.format
    el = f.element
    x = w_ref[...].astype(jnp.float32)  # [TI, TO]
    ti, to = x.shape
    xb = x.reshape(ti // bi, bi, to // bo, bo)
    amax = jnp.max(jnp.abs(xb), axis=(1, 3), keepdims=True)  # [TI/bi, 1, TO/bo, 1]
    # ``x * 0 + s`` makes the divisor elementwise: XLA rewrites division by a broadcast into a
    # multiplication by the reciprocal, which is not the IEEE quotient the reference takes
    if f.scaling == "amax":
        s = amax / (amax * 0 + el.max)
    elif f.scaling == "nvfp4":
        g = g_ref[0]
        sb = amax / (amax * 0 + el.max)
        sb = jnp.where(g > 0, sb / (sb * 0 + jnp.where(g > 0, g, 1.0)), 0.0)
        s = _round_bits(sb, F.E4M3FN) * g
    else:  # mx: a power of two from amax's exponent bits
        e = ((jax.lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF) - 127
        k = jnp.clip(jnp.where(amax > 0, e - el.emax, -127), -127, 127)
        s = jnp.where(k > -127, _pow2(jnp.maximum(k, -126)), 0.0)  # 2**-127: flushed anyway
        # the reference divides by 2**k exactly; so does multiplying by 2**-k
        y = xb * _pow2(jnp.clip(-k, -126, 127))
    if f.scaling != "mx":
        sfull = xb * 0 + s
        y = jnp.where(sfull > 0, xb / jnp.where(sfull > 0, sfull, 1.0), 0.0)
    codes = _round_bits(y, el).reshape(ti, to)
    out = dequant_tile(codes, s.reshape(ti // bi, to // bo), bi=bi, bo=bo)
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "block_sizes", "interpret"))
def _pallas_fake_quant(w, spec: QuantSpec, block_sizes: BlockSizes, interpret: bool):
    n_in, n_out = w.shape
    bi, bo = F.block_shape(spec, (n_in, n_out))
    ti, to = block_sizes.block_in, block_sizes.block_out
    pi, po = -(-n_in // ti) * ti, -(-n_out // to) * to
    wp = jnp.pad(w, ((0, pi - n_in), (0, po - n_out)))
    if spec.format.scaling == "nvfp4":
        amax = jnp.max(jnp.abs(w.astype(jnp.float32)))
        g = F._div(amax, spec.format.element.max * F.E4M3FN.max).reshape(1)
    else:
        g = jnp.ones((1,), jnp.float32)
    out = pl.pallas_call(
        functools.partial(_kernel, spec=spec, bi=bi, bo=bo),
        grid=(pi // ti, po // to),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (0,)),  # g: [1]
            pl.BlockSpec((ti, to), lambda i, j: (i, j)),  # w: [in, out]
        ],
        out_specs=pl.BlockSpec((ti, to), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((pi, po), w.dtype),
        interpret=interpret,
    )(g, wp)
    return out[:n_in, :n_out]


def fake_quant(
    w: jax.Array,
    spec: QuantSpec | str,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Fake-quantize ``w`` (``[in, out]``) with the Pallas kernel where :func:`supports` says
    so, else with the XLA reference; the two agree bit for bit (interpret mode).

    Args:
      w: ``[in, out]`` floating array (checked finite when concrete).
      spec: a :class:`~jcompress.quant.QuantSpec` or spec string.
      block_sizes: the tile per program (default :meth:`BlockSizes.get_default`).
      interpret: run the kernel in the Pallas interpreter (any backend; tests).

    Returns:
      ``[in, out]`` array of ``w.dtype``.
    """
    spec = _spec(spec)
    if getattr(w, "ndim", None) != 2:
        shape = getattr(w, "shape", None)
        raise UserError(f"fake_quant: w must be a 2-D [in, out] array, got {shape}")
    bs = block_sizes or BlockSizes.get_default(spec, tuple(w.shape))
    if not supports(spec, tuple(w.shape), bs, interpret=interpret):
        return fake_quant_reference(w, spec)
    F._check_2d(w, "fake_quant")
    F._check_finite(w, "fake_quant")
    return _pallas_fake_quant(w, spec, bs, interpret)
