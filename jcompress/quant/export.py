"""NVFP4 / MXFP4 leaves in the packed layout inference engines read (compressed-tensors).

The ``compressed-tensors`` convention (``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``,
what vLLM loads) for one ``nn.Linear`` (torch layout ``weight: [out, in]``):

* ``weight_packed``: ``uint8 [out, in / 2]``, two E2M1 codes per byte along the input
  dimension, element ``2k`` in the low nibble and ``2k + 1`` in the high one; a code is the
  OCP E2M1 bit pattern (sign bit 3, exponent bits 2..1, mantissa bit 0);
* ``weight_scale``: ``[out, in / 16]`` ``float8_e4m3fn`` (NVFP4) or ``[out, in / 32]``
  ``uint8`` E8M0 biased exponents (MXFP4, ``2 ** (e - 127)``);
* ``weight_global_scale`` (NVFP4 only): ``float32 [1]``, the divisor of the block scales:
  ``W = code * (weight_scale / weight_global_scale)``. Ours multiplies by the tensor scale
  ``g = amax / (6 * 448)``; the export writes ``1 / g`` (float32) and the import reads
  ``1 / weight_global_scale`` back, which can differ from ``g`` by one ulp; codes and block
  scales round-trip bit for bit.

The layout is done here with numpy (the library never imports torch); the tests check it
bit for bit against the ``compressed-tensors`` package's own pack / unpack / dequantization.
A zero, missing or non-finite scale is an error at export (engines divide by them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jcompress.errors import UserError
from jcompress.quant.formats import QuantSpec
from jcompress.quant.leaves import QuantizedArray

__all__ = [
    "EXPORT_FORMATS",
    "from_compressed_tensors",
    "pack_fp4",
    "to_compressed_tensors",
    "unpack_fp4",
]

EXPORT_FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}


def pack_fp4(codes: Any) -> np.ndarray:
    """E2M1 values ``[in, out]`` -> ``uint8 [out, in / 2]`` (torch layout, low nibble first).

    Raises:
      UserError: ``in`` is odd or a value is not an E2M1 value.
    """
    c = np.asarray(codes).astype(np.float32).T  # [out, in]
    if c.ndim != 2 or c.shape[1] % 2:
        raise UserError(f"pack_fp4: need an even input dimension, got codes{tuple(c.shape)[::-1]}")
    bits = c.astype(ml_dtypes.float4_e2m1fn)
    if not np.array_equal(bits.astype(np.float32), c):
        raise UserError("pack_fp4: codes are not all E2M1 values")
    nib = bits.view(np.uint8) & 0x0F
    return (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)


def unpack_fp4(packed: Any) -> np.ndarray:
    """``uint8 [out, in / 2]`` -> E2M1 values ``[in, out]`` in a ``float8_e4m3fn`` container."""
    p = np.asarray(packed)
    if p.dtype != np.uint8 or p.ndim != 2:
        raise UserError(f"weight_packed: expected a 2-D uint8 array, got {p.dtype}{p.shape}")
    nib = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[0], -1)  # [out, in]
    vals = nib.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return vals.T.astype(ml_dtypes.float8_e4m3fn)


def _check_scales(where: str, scales: np.ndarray, fmt: str) -> None:
    vals = (np.ldexp(1.0, scales.astype(np.int32) - 127) if fmt == "mxfp4" else
            scales.astype(np.float32))
    bad = ~np.isfinite(vals) | (scales == 255 if fmt == "mxfp4" else vals <= 0)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise UserError(
            f"{where}: {int(bad.sum())} block scale(s) are zero or non-finite (first: block "
            f"{i} of output channel {j}, value {vals[i, j]}); engines divide by them, so this "
            f"weight cannot be exported (an all-zero block has no scale)"
        )


def to_compressed_tensors(leaf: QuantizedArray, *, where: str = "weight") -> dict[str, np.ndarray]:
    """A :class:`QuantizedArray` (NVFP4 / MXFP4) -> the compressed-tensors tensors.

    Args:
      leaf: the leaf (``[in, out]``, ``in`` a multiple of the block).
      where: names the weight in error messages.

    Returns:
      ``{"weight_packed", "weight_scale"[, "weight_global_scale"]}`` numpy arrays.

    Raises:
      UserError: another format, a ragged input dimension, or a zero / non-finite scale.
    """
    if not isinstance(leaf, QuantizedArray) or leaf.spec.fmt not in EXPORT_FORMATS:
        got = leaf.spec.key if isinstance(leaf, QuantizedArray) else type(leaf).__name__
        raise UserError(f"{where}: only {', '.join(EXPORT_FORMATS)} leaves export to "
                        f"compressed-tensors, got {got}")
    fmt = leaf.spec.fmt
    bi = leaf.spec.format.fixed_block[0]
    if leaf.shape[0] % bi:
        raise UserError(f"{where}: input dimension {leaf.shape[0]} is not a multiple of "
                        f"the {fmt} block {bi}")
    scales = np.asarray(leaf.scales)
    _check_scales(where, scales, fmt)
    out = {"weight_packed": pack_fp4(leaf.codes), "weight_scale": np.ascontiguousarray(scales.T)}
    if fmt == "nvfp4":
        g = np.float32(np.asarray(leaf.global_scale).reshape(()))
        if not np.isfinite(g) or g <= 0:
            raise UserError(f"{where}: tensor scale {g} is zero or non-finite")
        out["weight_global_scale"] = np.array([np.float32(1.0) / g], np.float32)
    return out


def from_compressed_tensors(
    tensors: Mapping[str, Any], fmt: str, *, dense_dtype: Any = np.float32,
    where: str = "weight",
) -> QuantizedArray:
    """The inverse of :func:`to_compressed_tensors` (a validated leaf).

    Raises:
      UserError: a missing tensor, wrong shapes / dtypes, or a zero / non-finite scale.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"{where}: format {fmt!r}; allowed: {', '.join(EXPORT_FORMATS)}")
    need = ("weight_packed", "weight_scale") + (("weight_global_scale",) if fmt == "nvfp4"
                                                else ())
    missing = [k for k in need if k not in tensors]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")
    codes = unpack_fp4(tensors["weight_packed"])
    spec = QuantSpec(fmt)
    want_dt = spec.format.scale_dtype
    scales = np.asarray(tensors["weight_scale"])
    n_blocks = -(-codes.shape[0] // spec.format.fixed_block[0])
    if scales.dtype != want_dt or scales.shape != (codes.shape[1], n_blocks):
        raise UserError(f"{where}: weight_scale {scales.dtype}{scales.shape} does not fit "
                        f"weight_packed for {fmt}")
    scales = np.ascontiguousarray(scales.T)
    _check_scales(where, scales, fmt)
    g = np.ones((1,), np.float32)
    if fmt == "nvfp4":
        gs = np.asarray(tensors["weight_global_scale"], np.float32).reshape(-1)
        if gs.shape != (1,) or not np.isfinite(gs).all() or gs[0] <= 0:
            raise UserError(f"{where}: weight_global_scale must be one positive finite value")
        g = np.array([np.float32(1.0) / gs[0]], np.float32)
    try:
        return QuantizedArray(jnp.asarray(codes), jnp.asarray(scales), jnp.asarray(g), spec,
                              np.dtype(dense_dtype))
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None

