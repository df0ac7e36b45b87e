"""Block-scaled fake quantization of 2-D arrays: the format table, spec grammar and core math.

Every format is "element grid x block scale": a 2-D array ``w`` (an ``[in, out]`` kernel) is cut
into blocks of ``(bi, bo)`` entries (edges padded with zeros), each block gets one scale from its
absolute maximum, and every entry is rounded on the element grid after dividing by its scale::

    w_hat[i, j] = codes[i, j] * (scales[i // bi, j // bo] * global_scale)

``codes`` are values on the element grid (stored in a one-byte container: ``float8_e4m3fn`` holds
every E2M1 / E3M2 / E2M3 / E4M3 value exactly, ``float8_e5m2`` the E5M2 ones, ``int8`` the
INT4 / INT8 ones). Rounding is round-to-nearest, ties-to-even, computed exactly in float32 with
``frexp`` / ``ldexp`` (no ``log2``), after a clip to the largest finite value (a cast above the
maximum would give NaN or infinity). The same math runs on every backend: XLA's CPU converter has
no FP6 casts, and its E8M0 cast rounds instead of flooring, so no narrow-dtype cast is used.

Formats (:data:`FORMATS`):

========== ======== ================================ =========================================
name       element  scale                            block ``(bi, bo)`` of an ``[in, out]`` w
========== ======== ================================ =========================================
fp4        E2M1*    fp32 ``amax / 3``                ``blk``: ``in`` (1, out), ``out`` (in, 1),
fp6        E3M2*    fp32 ``amax / 14``               tile ``t`` (t, t); required (the seed's)
fp8        E4M3*    fp32 ``amax / 240``
nvfp4      E2M1     E4M3 ``amax_b / 6 / g``,         (16, 1); ``g = amax / (6 * 448)`` fp32
                    fp32 global ``g``
mxfp4      E2M1     E8M0 ``2**(floor(log2 amax_b)    (32, 1) (OCP MX v1.0, section 6.3)
mxfp6_e3m2 E3M2     - emax_elem)``, exponent         (32, 1)
mxfp6_e2m3 E2M3     clamped to [-127, 127]           (32, 1)
mxfp8      E4M3FN                                    (32, 1)
fp8_e4m3   E4M3FN   fp32 ``amax / 448``              default per tensor; ``in``/``out``/group g
fp8_e5m2   E5M2     fp32 ``amax / 57344``            (g, 1) along the input dimension
int4       [-7, 7]  fp32 ``amax / 7`` (symmetric)    default per output channel (in, 1);
int8       [-127,   fp32 ``amax / 127``              ``in``/``out``/group g (g, 1)
           127]
========== ======== ================================ =========================================

``*`` the seed's IEEE-like minifloats: the top exponent is reserved (so E2M1 tops out at 3.0,
E3M2 at 14.0, E4M3 at 240.0), subnormals kept, one scale per block, as the tokenwise precision
tool (seed 003) computed them. The standard elements (OCP FP4 E2M1: +-{0, .5, 1, 1.5, 2, 3, 4,
6}; OCP FP6 E3M2 / E2M3; FP8 E4M3FN (max 448, no infinities) and E5M2 (max 57344)) use every
exponent code for finite values.

The microscaling formats have a fixed block (NVFP4: 16, MX: 32 along the input dimension, the
reduction dimension of ``x @ w``); an ``@blk`` suffix is accepted for compatibility with the
seed's ``nvfp4@128`` and recorded as ``blk=na``.

A block whose scale is zero (all-zero block, or an NVFP4 block scale that underflows E4M3)
quantizes to zeros. XLA:CPU flushes float32 subnormals to zero, so an MX block whose scale
is ``2**-127`` (amax below ``2**-125``) dequantizes to zeros there. Non-finite input:
:func:`fake_quant` and :func:`quantize` check concrete
arrays on the host and raise :class:`~jcompress.errors.UserError`; under ``jit`` (a traced
``w``) no check is possible without ``checkify``, and a NaN/Inf makes its whole block NaN, so
check parameters first (:func:`jcompress.validate.check_finite`, as ``load_hf`` does).

References:
  OCP Microscaling Formats (MX) Specification v1.0 (2023), sections 5 (element types) and 6.3
  (conversion: ``X = 2**(floor(log2(amax)) - emax_elem)``).
  OCP 8-bit Floating Point Specification (OFP8) rev. 1.0 (E4M3FN / E5M2).
  NVIDIA, "Introducing NVFP4" (2025): 16-element blocks, E4M3 block scales, FP32 tensor scale.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jcompress.errors import UserError, comma_list

__all__ = [
    "FORMATS",
    "Format",
    "QuantSpec",
    "Quantized",
    "block_shape",
    "dequantize",
    "fake_quant",
    "format_info",
    "parse_spec",
    "parse_specs",
    "quantize",
    "round_to_grid",
    "scale_values",
    "scales_shape",
]


@dataclasses.dataclass(frozen=True)
class Element:
    """A floating-point element grid: ``ebits`` exponent bits, ``mbits`` mantissa bits, ``bias``,
    largest finite magnitude ``max``. Smallest normal exponent ``1 - bias``; subnormals below.
    ``INT`` grids (``ebits == 0``) are the integers in ``[-max, max]``."""

    ebits: int
    mbits: int
    bias: int
    max: float

    @property
    def emax(self) -> int:
        """Exponent of the largest normal value (the MX spec's ``emax_elem``)."""
        return math.frexp(self.max)[1] - 1

    @property
    def emin(self) -> int:
        return 1 - self.bias


E2M1 = Element(2, 1, 1, 6.0)
E3M2 = Element(3, 2, 3, 28.0)
E2M3 = Element(2, 3, 1, 7.5)
E4M3FN = Element(4, 3, 7, 448.0)
E5M2 = Element(5, 2, 15, 57344.0)
SEED_E2M1 = Element(2, 1, 1, 3.0)  # IEEE-like: top exponent reserved
SEED_E3M2 = Element(3, 2, 3, 14.0)
SEED_E4M3 = Element(4, 3, 7, 240.0)
INT4 = Element(0, 0, 0, 7.0)
INT8 = Element(0, 0, 0, 127.0)


@dataclasses.dataclass(frozen=True)
class Format:
    """One row of the format table.

    Attributes:
      name: the spec name (``nvfp4``).
      element: the element grid.
      scaling: ``"amax"`` (fp32 ``amax / element.max``), ``"nvfp4"`` (E4M3 block scales under
        an fp32 tensor scale) or ``"mx"`` (E8M0 power-of-two scales).
      fixed_block: the standard block ``(bi, bo)`` of a microscaling format (``None``: ``blk``
        chooses).
      default_block: the block of ``blk=None`` for the other formats: ``"tensor"``,
        ``"out"`` (one scale per output channel) or ``None`` (``blk`` is required).
      tile_square: an integer ``blk`` means square ``t x t`` tiles (the seed's minifloats)
        rather than groups of ``t`` along the input dimension.
      code_dtype: the container dtype of the codes (exact for every grid value).
      scale_dtype: the dtype the block scales are stored in (``uint8``: E8M0 bits).
    """

    name: str
    element: Element
    scaling: str
    fixed_block: tuple[int, int] | None
    default_block: str | None
    tile_square: bool
    code_dtype: Any
    scale_dtype: Any

    @property
    def is_int(self) -> bool:
        return self.element.ebits == 0


_F8 = np.dtype(ml_dtypes.float8_e4m3fn)
_F32 = np.dtype(np.float32)
# E8M0 scales are stored as their bit pattern (the biased exponent ``k + 127``) in uint8: the
# same bytes as ``float8_e8m0fnu``, which safetensors files and XLA:CPU arithmetic lack.
_E8M0 = np.dtype(np.uint8)
_TABLE: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp4", SEED_E2M1, "amax", None, None, True, _F8, _F32),
        Format("fp6", SEED_E3M2, "amax", None, None, True, _F8, _F32),
        Format("fp8", SEED_E4M3, "amax", None, None, True, _F8, _F32),
        Format("nvfp4", E2M1, "nvfp4", (16, 1), None, False, _F8, _F8),
        Format("mxfp4", E2M1, "mx", (32, 1), None, False, _F8, _E8M0),
        Format("mxfp6_e3m2", E3M2, "mx", (32, 1), None, False, _F8, _E8M0),
        Format("mxfp6_e2m3", E2M3, "mx", (32, 1), None, False, _F8, _E8M0),
        Format("mxfp8", E4M3FN, "mx", (32, 1), None, False, _F8, _E8M0),
        Format("fp8_e4m3", E4M3FN, "amax", None, "tensor", False, _F8, _F32),
        Format(
            "fp8_e5m2", E5M2, "amax", None, "tensor", False, np.dtype(ml_dtypes.float8_e5m2), _F32
        ),
        Format("int4", INT4, "amax", None, "out", False, np.dtype(np.int8), _F32),
        Format("int8", INT8, "amax", None, "out", False, np.dtype(np.int8), _F32),
    )
}

FORMATS: tuple[str, ...] = tuple(_TABLE)
"""Every valid format name, in table order."""

MICROSCALING: tuple[str, ...] = tuple(n for n, f in _TABLE.items() if f.fixed_block)
SEED_MINIFLOATS: tuple[str, ...] = ("fp4", "fp6", "fp8")


def format_info(fmt: str) -> Format:
    """The :class:`Format` row of ``fmt`` (a :class:`UserError` listing the valid names)."""
    try:
        return _TABLE[fmt]
    except (KeyError, TypeError):
        raise UserError(
            f"unknown quantization format {fmt!r}; valid: {', '.join(FORMATS)}"
        ) from None


def _valid_specs_line() -> str:
    seed = ", ".join(f"{f}@in|out|<tile>" for f in SEED_MINIFLOATS)
    mx = ", ".join(MICROSCALING)
    other = ", ".join(
        f"{n}[@in|out|<group>]"
        for n, f in _TABLE.items()
        if not f.fixed_block and f.name not in SEED_MINIFLOATS
    )
    return f"valid: {seed}; {mx} (any @blk recorded as na); {other}"


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """A quantization format and its block choice (hashable: a static jit argument).

    Attributes:
      fmt: a name in :data:`FORMATS`.
      blk: ``"in"`` (one scale per input channel, i.e. per row of ``[in, out]``), ``"out"``
        (per output channel), a positive int (square tiles for fp4/fp6/fp8, groups along the
        input dimension for int*/fp8_*), or ``None`` (the format's standard block; printed
        ``na``). Microscaling formats always store ``None``.
    """

    fmt: str
    blk: str | int | None = None

    def __post_init__(self):
        f = format_info(self.fmt)
        blk = self.blk
        if f.fixed_block is not None:
            object.__setattr__(self, "blk", None)
            return
        if isinstance(blk, bool) or not (
            blk is None or blk in ("in", "out") or (isinstance(blk, int) and blk > 0)
        ):
            raise UserError(
                f"QuantSpec.blk: {blk!r} for {self.fmt}; allowed: 'in', 'out', a positive "
                f"int, or None"
            )
        if blk is None and f.default_block is None:
            raise UserError(
                f"{self.fmt} needs a block: {self.fmt}@in, {self.fmt}@out or "
                f"{self.fmt}@<tile> (e.g. {self.fmt}@128)"
            )

    @property
    def key(self) -> str:
        """The seed's cfg-key piece: ``fmt=nvfp4;blk=na``, ``fmt=fp4;blk=128``."""
        return f"fmt={self.fmt};blk={'na' if self.blk is None else self.blk}"

    @property
    def format(self) -> Format:
        return _TABLE[self.fmt]

    def __str__(self) -> str:
        return self.fmt if self.blk is None else f"{self.fmt}@{self.blk}"


_SPEC_RE = re.compile(r"([A-Za-z0-9_]+)(?:@([A-Za-z0-9_]+))?")


def parse_spec(text: str, *, arg: str = "--qspecs") -> QuantSpec:
    """Parse ``fmt`` or ``fmt@blk`` (``nvfp4``, ``fp4@128``, ``fp4@in``, ``nvfp4@16``).

    A microscaling format ignores its ``@blk`` (recorded as ``blk=na``); ``@na`` means the
    format's default block. Raises a one-line :class:`UserError` naming ``arg`` and listing the
    valid specs.
    """
    s = str(text).strip()
    m = _SPEC_RE.fullmatch(s)
    if m is None or m.group(1).lower() not in _TABLE:
        raise UserError(f"{arg}: bad quantization spec {text!r}; {_valid_specs_line()}")
    fmt, raw = m.group(1).lower(), m.group(2)
    blk: str | int | None
    if raw is None or raw.lower() == "na" or _TABLE[fmt].fixed_block is not None:
        blk = None
    elif raw.lower() in ("in", "out"):
        blk = raw.lower()
    elif raw.isdigit() and int(raw) > 0:
        blk = int(raw)
    else:
        raise UserError(f"{arg}: bad block {raw!r} in {text!r}; {_valid_specs_line()}")
    try:
        return QuantSpec(fmt, blk)
    except UserError as e:
        raise UserError(f"{arg}: {e}; {_valid_specs_line()}") from None


def parse_specs(text: str, *, arg: str = "--qspecs") -> tuple[QuantSpec, ...]:
    """Parse a comma-separated list of specs (duplicates after normalization are an error)."""
    try:  # the one rule for list flags; repeats are checked below, after normalization
        parts = comma_list(text, arg=arg, example="nvfp4,fp4@128", unique=False)
    except UserError as e:
        raise UserError(f"{e}; {_valid_specs_line()}") from None
    specs = tuple(parse_spec(p, arg=arg) for p in parts)
    seen: set[QuantSpec] = set()
    for p, s in zip(parts, specs, strict=True):
        if s in seen:
            raise UserError(f"{arg}: {p!r} repeats spec {s.key!r}")
        seen.add(s)
    return specs


def _as_spec(spec: QuantSpec | str) -> QuantSpec:
    return spec if isinstance(spec, QuantSpec) else parse_spec(spec, arg="spec")


def block_shape(spec: QuantSpec | str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(bi, bo)`` block of ``spec`` on an ``[in, out]`` array of ``shape``.

    A tile or group longer than the array along a dimension is cut to the array there: the
    scales are the same (the zero padding of an edge block never changes its amax), and a
    ``fp4@100000`` tile needs no ``100000 x 100000`` padded buffer."""
    spec = _as_spec(spec)
    f = spec.format
    n_in, n_out = int(shape[0]), int(shape[1])
    if f.fixed_block is not None:
        return f.fixed_block
    blk = spec.blk if spec.blk is not None else f.default_block
    if blk == "in":
        return (1, max(n_out, 1))
    if blk == "out":
        return (max(n_in, 1), 1)
    if blk == "tensor":
        return (max(n_in, 1), max(n_out, 1))
    assert isinstance(blk, int)
    bi = min(blk, max(n_in, 1))
    return (bi, min(blk, max(n_out, 1))) if f.tile_square else (bi, 1)


def scales_shape(spec: QuantSpec | str, shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``[ceil(in / bi), ceil(out / bo)]`` shape of ``spec``'s block scales on an
    ``[in, out]`` array of ``shape``."""
    bi, bo = block_shape(spec, shape)
    return (-(-int(shape[0]) // bi), -(-int(shape[1]) // bo))


def round_to_grid(y: jax.Array, el: Element) -> jax.Array:
    """Round float32 ``y`` to the element grid: clip to ``+-el.max``, then round to nearest,
    ties to even (exact: the quantum is a power of two applied with ``ldexp``).

    Args:
      y: float32 array of any shape (already divided by its scale).
      el: the element grid.

    Returns:
      float32 array of grid values, same shape; ``-0.0`` keeps its sign.
    """
    y = y.astype(jnp.float32)
    a = jnp.minimum(jnp.abs(y), jnp.float32(el.max))
    if el.ebits == 0:
        q = jnp.round(a)  # jnp.round: half to even
    else:
        _, e = jnp.frexp(a)  # a = m * 2**e, m in [0.5, 1): floor(log2 a) = e - 1
        e = jnp.maximum(e - 1, el.emin)  # subnormals share the smallest normal exponent
        shift = (el.mbits - e).astype(jnp.int32)
        q = jnp.ldexp(jnp.round(jnp.ldexp(a, shift)), -shift)
        q = jnp.minimum(q, jnp.float32(el.max))
    return jnp.copysign(q, y)


class Quantized(NamedTuple):
    """The stored form of a quantized ``[in, out]`` array.

    ``w_hat = codes * (scales[i // bi, j // bo] * global_scale)`` with ``(bi, bo) =
    block_shape(spec, codes.shape)``.

    Attributes:
      codes: ``[in, out]`` grid values in ``spec.format.code_dtype``.
      scales: ``[ceil(in / bi), ceil(out / bo)]`` in ``spec.format.scale_dtype``.
      global_scale: ``[1]`` float32 (NVFP4's tensor scale ``amax / (6 * 448)``; 1 otherwise;
        shape ``[1]`` rather than ``[]`` so every file format stores it as it is).
    """

    codes: jax.Array
    scales: jax.Array
    global_scale: jax.Array


def _blocks(x: jax.Array, bi: int, bo: int) -> jax.Array:
    """``[in, out]`` -> ``[nbi, bi, nbo, bo]`` (zero padded at the high edges)."""
    n_in, n_out = x.shape
    nbi, nbo = -(-n_in // bi), -(-n_out // bo)
    x = jnp.pad(x, ((0, nbi * bi - n_in), (0, nbo * bo - n_out)))
    return x.reshape(nbi, bi, nbo, bo)


def _unblocks(x: jax.Array, shape: tuple[int, int]) -> jax.Array:
    nbi, bi, nbo, bo = x.shape
    return x.reshape(nbi * bi, nbo * bo)[: shape[0], : shape[1]]


@jax.custom_batching.custom_vmap
def _true_div(x: jax.Array, s: jax.Array) -> jax.Array:
    return x / jax.lax.optimization_barrier(s)


@_true_div.def_vmap
def _true_div_vmap(axis_size, in_batched, x, s):
    # an unbatched operand is broadcast to the batch *before* the barrier: vmap's own rule
    # would broadcast it after, and XLA would see a division by a broadcast again
    x, s = (a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip((x, s), in_batched, strict=True))  # fmt: skip
    return _true_div(x, s), True


@jax.custom_jvp
def _exact_div(x: jax.Array, s: jax.Array) -> jax.Array:
    return _true_div(x, s)


@_exact_div.defjvp
def _exact_div_jvp(primals, tangents):
    # differentiable as before (custom_vmap has no autodiff rule of its own); the tangent is an
    # ordinary division: gradients need no bit-exactness
    (x, s), (dx, ds) = primals, tangents
    y = _true_div(x, s)
    return y, (dx - y * ds) / s


def _div(x: jax.Array, s: jax.Array | float) -> jax.Array:
    """IEEE ``x / s`` (``s`` broadcast to ``x``'s shape).

    XLA's algebraic simplifier turns a division by a constant or a broadcast into a
    multiplication by its reciprocal (off by one ulp in a third of the cases); the
    optimization barrier keeps the true division, so results match the formulas bit for bit,
    under ``vmap`` too (its batching rule broadcasts before the barrier).
    """
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape)
    return _exact_div(x, s)


def _safe_div(x: jax.Array, s: jax.Array | float) -> jax.Array:
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), x.shape)
    return jnp.where(s > 0, _div(x, jnp.where(s > 0, s, 1.0)), 0.0)


def _quantize_core(w: jax.Array, spec: QuantSpec) -> Quantized:
    f = spec.format
    el = f.element
    if w.ndim != 2:
        raise UserError(f"quantize: w must be 2-D [in, out], got shape {tuple(w.shape)}")
    shape = (int(w.shape[0]), int(w.shape[1]))
    bi, bo = block_shape(spec, shape)
    x = _blocks(w.astype(jnp.float32), bi, bo)  # [nbi, bi, nbo, bo]
    amax = jnp.max(jnp.abs(x), axis=(1, 3))  # [nbi, nbo]
    g = jnp.float32(1.0)
    if f.scaling == "amax":
        s = _div(amax, el.max)
        y = _safe_div(x, s[:, None, :, None])
    elif f.scaling == "nvfp4":
        g = _div(jnp.max(amax, initial=0.0), el.max * E4M3FN.max)  # initial: an empty w
        sb = _safe_div(_div(amax, el.max), g)
        s = round_to_grid(sb, E4M3FN)  # E4M3 block scale (clipped to 448, RNE)
        y = _safe_div(x, (s * g)[:, None, :, None])
    elif f.scaling == "mx":
        _, e = jnp.frexp(amax)
        k = jnp.where(amax > 0, e - 1 - el.emax, -127)
        k = jnp.clip(k, -127, 127).astype(jnp.int32)
        s = (k + 127).astype(jnp.uint8)  # E8M0 bits
        y = jnp.ldexp(x, -k[:, None, :, None])  # exact division by a power of two
    else:  # pragma: no cover - table rows are fixed
        raise AssertionError(f.scaling)
    q = round_to_grid(y, el)
    codes = _unblocks(q, shape).astype(f.code_dtype)
    return Quantized(codes, s.astype(f.scale_dtype), jnp.reshape(g, (1,)).astype(jnp.float32))


def scale_values(scales: jax.Array, spec: QuantSpec) -> jax.Array:
    """Stored block scales -> float32 (E8M0 bits through ``float8_e8m0fnu``, whose conversion
    keeps ``2**-127``)."""
    if spec.format.scaling == "mx":
        scales = jax.lax.bitcast_convert_type(scales.astype(jnp.uint8), jnp.float8_e8m0fnu)
    return scales.astype(jnp.float32)


def scales_finite(scales: np.ndarray, spec: QuantSpec) -> bool:
    """Whether stored block scales (a host array) are all finite numbers, checked on the host
    (E8M0 bits: all but ``0xFF``, the NaN code; float scales through ``ml_dtypes``)."""
    scales = np.asarray(scales)
    if spec.format.scaling == "mx":
        return not np.any(scales == 0xFF)
    return bool(np.isfinite(scales.astype(np.float32)).all())


def _dequantize_core(q: Quantized, spec: QuantSpec, dtype: Any = jnp.float32) -> jax.Array:
    shape = (int(q.codes.shape[0]), int(q.codes.shape[1]))
    bi, bo = block_shape(spec, shape)
    s = scale_values(q.scales, spec) * jnp.reshape(q.global_scale, ()).astype(jnp.float32)
    c = _blocks(q.codes.astype(jnp.float32), bi, bo)
    return _unblocks(c * s[:, None, :, None], shape).astype(dtype)


_quantize_jit = jax.jit(_quantize_core, static_argnums=1)
_dequantize_jit = jax.jit(_dequantize_core, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=1)
def _fake_quant_jit(w: jax.Array, spec: QuantSpec) -> jax.Array:
    return _dequantize_core(_quantize_core(w, spec), spec).astype(w.dtype)


@jax.jit
def _count_nonfinite(w: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(w), dtype=jnp.int32)


def _check_finite(w: Any, where: str) -> None:
    if isinstance(w, jax.core.Tracer):
        return  # traced: see the module docstring (non-finite values make their block NaN)
    if isinstance(w, jax.Array) and any(d.platform != "cpu" for d in w.devices()):
        bad = int(_count_nonfinite(w.astype(jnp.float32)))  # one reduction, one scalar back
    else:  # host memory (numpy, or a CPU jax array, viewed without a copy): no compile
        a = np.asarray(w)
        if a.dtype.itemsize > 4:  # float64: what is finite there may not be in float32
            with np.errstate(over="ignore"):
                a = a.astype(np.float32)
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        raise UserError(
            f"{where}: w has {bad} non-finite value(s) (NaN/Inf, or beyond float32's range); "
            "quantization needs finite input"
        )


def _check_2d(w: Any, where: str) -> None:
    if getattr(w, "ndim", None) != 2:
        raise UserError(
            f"{where}: w must be a 2-D [in, out] array, got shape {tuple(getattr(w, 'shape', ()))}"
        )
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise UserError(f"{where}: w must be floating point, got {w.dtype}")


def quantize(w: jax.Array, spec: QuantSpec | str) -> Quantized:
    """Quantize a 2-D ``[in, out]`` array to ``spec``'s codes and scales.

    Args:
      w: ``[in, out]`` floating array (computed in float32).
      spec: a :class:`QuantSpec` or a spec string (``"nvfp4"``, ``"fp4@128"``).

    Returns:
      :class:`Quantized` (codes, scales, global_scale); :func:`dequantize` inverts it.
    """
    spec = _as_spec(spec)
    _check_2d(w, "quantize")
    _check_finite(w, "quantize")
    return _quantize_jit(w, spec)


def dequantize(q: Quantized, spec: QuantSpec | str) -> jax.Array:
    """``codes * scales (broadcast over blocks) * global_scale`` as float32 ``[in, out]``."""
    return _dequantize_jit(q, _as_spec(spec))


def fake_quant(w: jax.Array, spec: QuantSpec | str) -> jax.Array:
    """Quantize-dequantize ``w``: the array a quantized model computes with.

    Pure and jit-able (``spec`` static: a hashable :class:`QuantSpec`); computed in float32 and
    returned in ``w.dtype``. A concrete ``w`` with NaN/Inf raises :class:`UserError`; a traced one
    cannot be checked (its non-finite blocks come out NaN).

    Args:
      w: ``[in, out]`` floating array.
      spec: a :class:`QuantSpec` or a spec string.

    Returns:
      ``[in, out]`` array of ``w.dtype``.

    Example:
      >>> w_hat = fake_quant(w, "nvfp4")   # doctest: +SKIP
    """
    spec = _as_spec(spec)
    _check_2d(w, "fake_quant")
    _check_finite(w, "fake_quant")
    return _fake_quant_jit(w, spec)
