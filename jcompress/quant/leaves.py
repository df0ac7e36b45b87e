"""The quantized leaf: block-scaled codes standing for a dense ``[in, out]`` array.

``QuantizedArray`` sits at a ``kernel`` path (or inside a ``Residual`` / ``LowRank``) and the
forward pass runs on it through :func:`jcompress.leaves.dot`. Checkpoints (orbax and
``save_hf(..., factors=True)``) store the codes, scales and tensor scale in their own dtypes
(``load_hf(dtype=...)`` leaves them alone: they are the leaf's ``exact_fields``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.leaves import CompressedLeaf, register_leaf
from jcompress.quant import formats as F
from jcompress.quant.formats import QuantSpec

__all__ = ["QuantizedArray", "quantize_leaf"]


def _concrete(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, jax.core.Tracer)


@register_leaf(name="jcompress.quant.QuantizedArray")
class QuantizedArray(CompressedLeaf):
    """A dense ``[in, out]`` array in a block-scaled format (:mod:`jcompress.quant.formats`).

    Reconstruction: ``W[i, j] = codes[i, j] * (scale(scales[i // bi, j // bo]) * global_scale)``
    with ``(bi, bo) = formats.block_shape(spec, codes.shape)``, computed in float32 and
    returned in ``dense_dtype``; ``apply(x) = x @ W`` (the dense array is rebuilt on the fly,
    the fake-quant view a tokenwise study measures).

    Attributes:
      codes: ``[in, out]`` grid values in ``spec.format.code_dtype`` (``float8_e4m3fn``
        holds every FP4/FP6/E4M3 value, ``float8_e5m2`` the E5M2 ones, ``int8`` INT4/INT8).
      scales: ``[ceil(in / bi), ceil(out / bo)]`` block scales in ``spec.format.scale_dtype``
        (float32; ``float8_e4m3fn`` for NVFP4; ``uint8`` E8M0 bits for MX).
      global_scale: ``[1]`` float32 tensor scale (NVFP4's ``amax / (6 * 448)``; else 1).
      spec: the :class:`~jcompress.quant.formats.QuantSpec` (static).
      dense_dtype: dtype of the dense array (static; the original kernel's).
    """

    codes: Any
    scales: Any
    global_scale: Any
    spec: QuantSpec
    dense_dtype: Any = np.dtype(np.float32)
    array_fields: ClassVar[tuple[str, ...]] = ("codes", "scales", "global_scale")
    exact_fields: ClassVar[tuple[str, ...]] = ("codes", "scales", "global_scale")

    def __post_init__(self):
        if not isinstance(self.spec, QuantSpec):
            raise ValueError(f"QuantizedArray: spec must be a QuantSpec, got {self.spec!r}")
        object.__setattr__(self, "dense_dtype", np.dtype(self.dense_dtype))
        if not jnp.issubdtype(self.dense_dtype, jnp.floating):
            raise ValueError(f"QuantizedArray: dense_dtype {self.dense_dtype} is not floating")
        c, s, g = self.codes, self.scales, self.global_scale
        if not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in (c, s, g)):
            return  # pytree machinery placeholders
        f = self.spec.format
        if c.ndim != 2:
            raise ValueError(f"QuantizedArray: codes must be 2-D, got shape {tuple(c.shape)}")
        want = F.scales_shape(self.spec, c.shape)
        if tuple(s.shape) != want or tuple(g.shape) != (1,):
            raise ValueError(
                f"QuantizedArray({self.spec}): codes{tuple(c.shape)} need scales{want} and a "
                f"[1] global_scale; got scales{tuple(s.shape)}, global_scale{tuple(g.shape)}"
            )
        for name, a, dt in (
            ("codes", c, f.code_dtype),
            ("scales", s, f.scale_dtype),
            ("global_scale", g, np.dtype(np.float32)),
        ):
            if np.dtype(a.dtype) != dt:
                raise ValueError(f"QuantizedArray({self.spec}): {name} must be {dt}, got {a.dtype}")
        if _concrete(s) and _concrete(g):  # a corrupt file: never a number (host-side check)
            if not (F.scales_finite(np.asarray(s), self.spec) and np.isfinite(np.asarray(g)).all()):
                raise ValueError(f"QuantizedArray({self.spec}): non-finite scales")
        if _concrete(c) and not f.is_int:
            if not np.isfinite(np.asarray(c).astype(np.float32)).all():
                raise ValueError(f"QuantizedArray({self.spec}): non-finite codes")
        if _concrete(c) and f.is_int:
            m = int(np.abs(np.asarray(c).astype(np.int32)).max(initial=0))
            if m > f.element.max:
                raise ValueError(
                    f"QuantizedArray({self.spec}): code {m} outside [-{int(f.element.max)}, "
                    f"{int(f.element.max)}]"
                )

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def dtype(self):
        return self.dense_dtype

    @property
    def parts(self) -> F.Quantized:
        return F.Quantized(self.codes, self.scales, self.global_scale)

    def materialize(self) -> jax.Array:
        # one compiled computation (eagerly: not a dispatch per op); inlined under a trace
        return F._dequantize_jit(self.parts, self.spec, self.dense_dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        return jnp.matmul(x, self.materialize().astype(jnp.result_type(x, self.dense_dtype)))

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per dense entry: the element width plus the amortized scales."""
        el = self.spec.format.element
        ebits = el.ebits + el.mbits + 1 if el.ebits else (4 if self.spec.fmt == "int4" else 8)
        n = self.shape[0] * self.shape[1]
        sbits = int(np.prod(self.scales.shape)) * np.dtype(self.scales.dtype).itemsize * 8
        return ebits + (sbits + 32) / max(n, 1)


def quantize_leaf(w: Any, spec: QuantSpec | str) -> QuantizedArray:
    """Quantize a dense ``[in, out]`` array into a :class:`QuantizedArray`.

    Args:
      w: floating ``[in, out]`` array (checked finite when concrete).
      spec: a :class:`QuantSpec` or spec string.

    Returns:
      The leaf; ``leaf.materialize()`` equals ``formats.fake_quant(w, spec)``.
    """
    spec = F._as_spec(spec)
    q = F.quantize(w, spec)
    return QuantizedArray(q.codes, q.scales, q.global_scale, spec, np.dtype(w.dtype))
