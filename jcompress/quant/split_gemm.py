"""``X @ W~`` of a quantized weight with float32-exact products on bf16 matrix units.

A block-scaled weight factors as ``W~ = core * col_scale`` (``col_scale [out]`` float32) where
every ``core`` value has few significant bits: an NVFP4 value ``code * s_block`` is an E2M1
value (2 significant bits) times an E4M3 scale (4 bits), at most 6 bits, so ``core`` is
*exactly* a bfloat16 (8 bits) and the float32 tensor scale moves out of the sum. The
activations are exact sums of bfloat16 pieces: a float16 ``x`` (11 bits) is
``bf16(x) + bf16(x - bf16(x))``, a float32 one (24 bits) three pieces, a bfloat16 one itself.
A bf16 x bf16 product has at most 16 significant bits, so it is exact in float32, and
``sum_p dot(x_p, core, preferred_element_type=float32) * col_scale`` is ``X W~`` with exact
products and float32 accumulation: the float32 GEMM's result up to summation order and the
rounding of the final scale, on the hardware's bf16 units (AMX on recent Xeons, tensor cores,
the MXU) instead of its float32 ones.

Which weights factor (:func:`bf16_factors`):

============================== ====================================== =====================
format / block                 ``core``                               ``col_scale``
============================== ====================================== =====================
nvfp4                          codes x E4M3 block scales              tensor scale ``g``
mxfp4 / mxfp6_* / mxfp8        codes x E8M0 block scales              1
per tensor / per output        codes                                  the column's scale
channel (``fp8_*``, ``int*``,
the seed's ``fp*@out``)
============================== ====================================== =====================

Scales that vary along the input dimension in float32 (``@in``, the seed's square tiles and
INT / FP8 groups smaller than ``in``; a tile or group covering all of ``in`` is a column scale
and factors) do not factor: those weights keep the float32 GEMM. The factorization is
also checked for exactness on the values themselves (every ``core`` value a normal bfloat16:
matrix units treat bf16 subnormals as zero), so an MX weight whose tiny blocks fall below
``2**-126`` keeps the float32 GEMM too.

Whether the split pays (:func:`split_pays`, the ``auto`` choice): on a GPU (compute
capability 8.0 and up: bf16 tensor cores run 10-15x the float32 rate, so two or three passes
still win several-fold) and on a TPU. Not on a CPU, where the gain depends on the shape:
even with AMX-BF16 (this project's Xeon host), XLA:CPU's bf16 dots reached 250-650 GFLOP/s
against 115-165 for float32 (one thread: 137 against 65), and the tokenwise metrics of an
NVFP4 weight took, one thread, 0.69-0.72x the float32 route's time at 4096 x 4096 on 16K
float16 tokens (two pieces; 0.91-0.96x in an earlier two-thread run), about 0.33x at 2048 x
2048 on 8K bfloat16 tokens (one piece), while the whole ``eval_fake`` grid on llama-1m's
float16 cache (9 configurations, 128-wide linears) took 2x the float32 route's time (and
4.6 s more compilation). A CPU default would lose on small models; ``split_bf16`` asks for
the split on large weights (``--gemm split_bf16``).
"""

from __future__ import annotations

import enum
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError
from jcompress.quant import formats as F
from jcompress.quant.formats import Quantized, QuantSpec

__all__ = [
    "Gemm",
    "as_gemm",
    "bf16_factors",
    "factors_structurally",
    "factors_traced",
    "n_pieces",
    "split_bf16",
    "split_dot",
    "split_pays",
    "use_split",
]

# the smallest normal bfloat16 (= float32's): smaller nonzero values are flushed by matrix units
_BF16_TINY = float(jnp.finfo(jnp.bfloat16).tiny)
_BF16_MAX = float(jnp.finfo(jnp.bfloat16).max)
_PIECES = {np.dtype(jnp.bfloat16): 1, np.dtype(np.float16): 2, np.dtype(np.float32): 3}


class Gemm(enum.Enum):
    """How a quantized weight's ``X W~`` is computed.

    ``auto``: :attr:`SPLIT_BF16` where :func:`split_pays` says so and the weight factors, else
    :attr:`FP32`; ``fp32``: one float32 GEMM against the dequantized ``W~``; ``split_bf16``:
    the exact bf16 split wherever the weight factors (anywhere: tests, or a CPU the rule does
    not know).
    """

    AUTO = "auto"
    FP32 = "fp32"
    SPLIT_BF16 = "split_bf16"


def as_gemm(value: Any, *, arg: str = "gemm") -> Gemm:
    """``value`` (a :class:`Gemm` or its string) as a :class:`Gemm`; else one clear error."""
    if isinstance(value, Gemm):
        return value
    try:
        return Gemm(value)
    except ValueError:
        allowed = ", ".join(g.value for g in Gemm)
        raise UserError(f"{arg}: must be one of {allowed}, got {value!r}") from None


def split_pays(device: Any = None, x_dtype: Any = np.float16) -> bool:
    """Whether :func:`split_dot` beats a float32 GEMM on ``device`` (default: JAX's first
    device) for activations of ``x_dtype`` (module doc)."""
    device = device if device is not None else jax.devices()[0]
    pieces = n_pieces(x_dtype)
    if pieces is None:
        return False
    if device.platform == "gpu":
        cc = getattr(device, "compute_capability", None)
        try:
            return cc is not None and float(cc) >= 8.0
        except (TypeError, ValueError):
            return False
    return device.platform == "tpu"


def use_split(gemm: Any, x_dtype: Any, *, auto: bool = True) -> bool:
    """Whether ``gemm`` (a :class:`Gemm` or its string) takes the split for activations of
    ``x_dtype``: ``split_bf16`` always, ``auto`` where ``auto`` is allowed and
    :func:`split_pays` (before the weight's own :func:`bf16_factors` check)."""
    how = as_gemm(gemm)
    return how is Gemm.SPLIT_BF16 or (how is Gemm.AUTO and auto and split_pays(x_dtype=x_dtype))


def n_pieces(dtype: Any) -> int | None:
    """How many bfloat16 pieces sum exactly to a value of ``dtype`` (None: not split)."""
    return _PIECES.get(np.dtype(dtype))


def split_bf16(x: jax.Array) -> tuple[jax.Array, ...]:
    """``x`` as bfloat16 pieces summing to it exactly (:func:`n_pieces` of them; each piece
    is the round-to-nearest bf16 of what the previous ones left, so it carries the next 8-9
    bits). Limits: a float32 value above bf16's largest finite (``3.3895e38``) starts from
    that value instead of rounding to infinity; ``inf`` / ``nan`` go whole into the first piece
    (the dot then gives what a float32 GEMM gives); pieces below ``2**-126`` are bf16
    subnormals, which matrix units and XLA:CPU flush to zero, as XLA:CPU flushes float32
    subnormals (a float32 value below about ``2**-102`` may lose its last piece)."""
    pieces = n_pieces(x.dtype)
    if pieces is None:
        raise ValueError(f"split_bf16: float16, bfloat16 or float32 input, got {x.dtype}")
    if pieces == 1:
        return (x,)
    rest = x.astype(jnp.float32)
    out = []
    for _ in range(pieces - 1):
        finite = jnp.isfinite(rest)
        p = jnp.where(finite, jnp.clip(rest, -_BF16_MAX, _BF16_MAX), rest).astype(jnp.bfloat16)
        out.append(p)
        # exact: the rounding residual of p (0 where x is not finite)
        rest = jnp.where(finite, rest - p.astype(jnp.float32), 0.0)
    out.append(rest.astype(jnp.bfloat16))  # exact: at most 8 significant bits remain
    return tuple(out)


def split_dot(x: jax.Array, core: jax.Array, col_scale: jax.Array) -> jax.Array:
    """``x @ (core * col_scale)`` float32 ``[..., out]`` with exact products: one
    ``preferred_element_type=float32`` bf16 dot per piece of ``x`` (``core`` bfloat16
    ``[in, out]``, ``col_scale`` float32 ``[out]``). Jit-able."""
    acc = None
    for p in reversed(split_bf16(x)):  # smallest first: no overflow from the top piece's rounding
        d = jnp.matmul(p, core, preferred_element_type=jnp.float32)
        acc = d if acc is None else acc + d
    return acc * col_scale


def _core_parts(q: Quantized, spec: QuantSpec) -> tuple[jax.Array, jax.Array] | None:
    """``(core float32 [in, out], col_scale [out])`` by the format's structure (module
    table), or None when its scales vary along the input dimension."""
    f = spec.format
    shape = (int(q.codes.shape[0]), int(q.codes.shape[1]))
    bi, bo = F.block_shape(spec, shape)
    g = jnp.reshape(q.global_scale, ()).astype(jnp.float32)
    s = F.scale_values(q.scales, spec)  # [ceil(in / bi), ceil(out / bo)]
    codes = q.codes.astype(jnp.float32)
    if f.scaling in ("nvfp4", "mx"):
        core = F._unblocks(F._blocks(codes, bi, bo) * s[:, None, :, None], shape)
        return core, jnp.full((shape[1],), g, jnp.float32)
    if bi >= shape[0]:  # one block along the input dimension: the scale is per column
        col = jnp.repeat(s[0], bo, total_repeat_length=s.shape[1] * bo)[: shape[1]]
        return codes, col * g
    return None


def factors_traced(q: Quantized, spec: QuantSpec) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(core bf16, col_scale, ok)`` of a weight that :func:`factors_structurally` (traceable,
    ``vmap``-able): ``ok`` a bool scalar, False where a value is not an exact normal bf16."""
    core, col = _core_parts(q, spec)
    b = core.astype(jnp.bfloat16)
    exact = jnp.all(b.astype(jnp.float32) == core)
    normal = jnp.all((core == 0) | (jnp.abs(core) >= _BF16_TINY))
    return b, col, exact & normal & jnp.all(jnp.isfinite(col))


_factors = jax.jit(factors_traced, static_argnums=1)


def factors_structurally(spec: QuantSpec | str, shape: tuple[int, ...]) -> bool:
    """Whether ``spec`` on an ``[in, out]`` weight of ``shape`` has the ``core * col_scale``
    structure (before the value check of :func:`bf16_factors`)."""
    spec = F._as_spec(spec)
    if spec.format.scaling in ("nvfp4", "mx"):
        return True
    return F.block_shape(spec, shape)[0] >= int(shape[0])


def bf16_factors(q: Quantized, spec: QuantSpec | str) -> tuple[jax.Array, jax.Array] | None:
    """``(core bfloat16 [in, out], col_scale float32 [out])`` with
    ``dequantize(q, spec) == core * col_scale`` (to float32 rounding of the scale product), or
    None where the weight does not factor (module doc). One host read of a flag."""
    spec = F._as_spec(spec)
    if not factors_structurally(spec, tuple(q.codes.shape)):
        return None
    core, col, ok = _factors(q, spec)
    return (core, col) if bool(ok) else None
