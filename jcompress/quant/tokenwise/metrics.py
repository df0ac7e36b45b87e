"""Tokenwise output-error metrics of ``Y~ = X W~ + b`` against cached ``Y`` (float32, chunked).

For every candidate weight ``W~_c`` (a batch ``[C, in, out]``, one per configuration):

* ``nmse = sse / denom`` with ``sse = ||Y~ - Y||_F^2``, ``denom = ||Y||_F^2``;
* per token ``t``: ``l2_t = ||Y~_t - Y_t||``, ``rel_t = l2_t / (||Y_t|| + eps)``;
  ``token_l2_mean / max``, ``token_rel_l2_mean / max`` and the ``p95 / p99 / p999``
  percentiles of ``rel_t`` (linear interpolation, as ``torch.quantile`` / ``numpy``);
* ``n_tokens``.

Tokens stream in chunks of ``chunk_tokens`` rows (smaller on a CPU: :data:`CPU_STEP_BYTES`;
the last one padded and masked): device
memory holds one chunk of ``X`` / ``Y`` and the ``C`` candidate weights, whatever ``N`` is;
only the per-token relative errors (``C x N`` floats, for the percentiles) grow with ``N``.
Each chunk is one jitted step: one GEMM against all configurations stacked along the output
axis (``[in, C * out]``); the sums stay on device.
The optional ``inv_scale [in]`` multiplies ``X`` first (SmoothQuant's ``X / s``).

Under a mesh (``mesh=``, or the current :func:`jcompress.sharding.use_mesh` / ``--mesh``) each
chunk's tokens are split over the ``data`` axis (the chunk rounded up to a multiple of its size)
and the candidate weights replicated; the sums over tokens become all-reduces, the per-token
errors are gathered back for the percentiles.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import sharding
from jcompress.errors import UserError

__all__ = [
    "METRIC_KEYS",
    "PERCENTILES",
    "tokenwise_metrics",
    "tokenwise_metrics_quantized",
    "tokenwise_metrics_split",
]

PERCENTILES = (0.95, 0.99, 0.999)
METRIC_KEYS = (
    "nmse", "sse", "denom", "token_l2_mean", "token_l2_max", "token_rel_l2_mean",
    "token_rel_l2_max", "n_tokens", "token_rel_l2_p95", "token_rel_l2_p99", "token_rel_l2_p999",
)  # fmt: skip
HIGHEST = jax.lax.Precision.HIGHEST
CPU_STEP_BYTES = 16 * 2**20
"""On a CPU, a chunk is measured in steps whose ``[n, C * out]`` float32 GEMM output fits in
this many bytes (at least 256 tokens): with a 4096 x 4096 weight, 4096-token steps (64 MiB of
output) took 1.1-1.35x the time of 1024-token ones (16 MiB), float32 and bf16 split alike.
Device memory only shrinks; the sums are the same up to float32 summation order."""


def _check_args(where, x, y, d_in, d_out, bias, inv_scale, chunk_tokens, eps) -> None:
    """One clear error for inputs that would otherwise broadcast into wrong metrics."""
    for name, a in (("x", x), ("y", y)):
        if getattr(a, "ndim", None) != 2:
            raise UserError(f"{where}: {name} must be 2-D [N, features], got shape "
                            f"{tuple(getattr(a, 'shape', ()))}")  # fmt: skip
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{where}: token count mismatch: X{tuple(x.shape)} vs Y{tuple(y.shape)}")
    if x.shape[0] == 0:
        raise UserError(f"{where}: no tokens (X has shape {tuple(x.shape)})")
    if x.shape[1] != d_in or y.shape[1] != d_out:
        raise UserError(
            f"{where}: shape mismatch: X{tuple(x.shape)}, Y{tuple(y.shape)} for a "
            f"[{d_in}, {d_out}] weight (want X [N, {d_in}], Y [N, {d_out}])"
        )
    for name, a, n in (("bias", bias, d_out), ("inv_scale", inv_scale, d_in)):
        if a is not None and tuple(np.shape(a)) != (n,):
            raise UserError(f"{where}: {name} must have shape ({n},), got {tuple(np.shape(a))}")
    if (
        isinstance(chunk_tokens, (bool, np.bool_))
        or not isinstance(chunk_tokens, numbers.Integral)
        or chunk_tokens < 1
    ):
        raise UserError(f"{where}: chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise UserError(f"{where}: eps must be a finite number >= 0, got {eps!r}")


@functools.partial(jax.jit, static_argnames=("scaled",))
def _gemm(w_stack, inv_scale, x, scaled):
    """``X W~`` of one chunk for every candidate: ``[n, C * out]`` float32.

    ``w_stack [in, C * out]`` holds the candidates side by side along the output axis: one
    ``[n, in] x [in, C * out]`` GEMM in the natural layout (a batched ``einsum("ni,cio->cno")``
    lowers to ``W^T X^T`` plus a transpose, 1.5x slower on XLA:CPU). It is its own jitted
    computation: inside one jit with the error sums, XLA:CPU fuses dot + subtract + square +
    sum into one kernel that runs 3x slower than the plain GEMM at 4096 x 4096 (measured;
    an ``optimization_barrier`` does not stop it).
    """
    x = x.astype(jnp.float32)
    if scaled:
        x = x * inv_scale[None, :]
    return jnp.dot(x, w_stack, precision=HIGHEST)


@functools.partial(jax.jit, static_argnames=("eps",))
def _errors(acc, yh, b, y, real, eps):
    """Per-token errors of one chunk from ``yh [n, C * out]``, added to ``acc``."""
    c = acc[0].shape[0]
    n = y.shape[0]
    y = y.astype(jnp.float32)
    yh = yh.reshape(n, c, -1) + b[None, None, :]
    d2 = jnp.sum((yh - y[:, None, :]) ** 2, axis=-1).T  # [C, n]
    return _accumulate(acc, d2, y, real, eps)


def _step(acc, w_stack, b, inv_scale, x, y, real, eps, scaled):
    """One chunk: ``acc`` = (sse [C], denom, l2_sum [C], l2_max [C], rel_sum [C], rel_max [C]);
    returns it updated and the chunk's ``rel [C, n]``."""
    return _errors(acc, _gemm(w_stack, inv_scale, x, scaled), b, y, real, eps)


def _accumulate(acc, d2, y, real, eps):
    """Add one chunk's per-token squared errors ``d2 [C, n]`` (``y [n, out]`` float32; rows
    from ``real`` on are padding) to ``acc``; return it and the chunk's ``rel [C, n]``."""
    sse, denom, l2s, l2m, rs, rm = acc
    keep = jnp.arange(y.shape[0]) < real
    d2 = jnp.where(keep[None], d2, 0.0)
    y2 = jnp.where(keep, jnp.sum(y * y, axis=-1), 0.0)  # [n]
    l2 = jnp.sqrt(d2)
    rel = l2 / (jnp.sqrt(y2) + eps)
    acc = (
        sse + jnp.sum(d2, axis=1),
        denom + jnp.sum(y2),
        l2s + jnp.sum(l2, axis=1),
        jnp.maximum(l2m, jnp.max(l2, axis=1)),
        rs + jnp.sum(rel, axis=1),
        jnp.maximum(rm, jnp.max(rel, axis=1)),
    )
    return acc, rel


@jax.jit
def _stack(w):
    """``[C, in, out]`` -> ``[in, C * out]`` (candidate ``c`` in columns ``c*out:(c+1)*out``)."""
    c, d_in, d_out = w.shape
    return jnp.transpose(w, (1, 0, 2)).reshape(d_in, c * d_out)


def tokenwise_metrics(
    x: Any,
    y: Any,
    w_hats: Any,
    bias: Any = None,
    *,
    inv_scale: Any = None,
    chunk_tokens: int = 4096,
    eps: float = 1e-8,
    mesh: Any = None,
) -> list[dict[str, float]]:
    """Metrics of every candidate in ``w_hats [C, in, out]`` (or one ``[in, out]``).

    Args:
      x: ``[N, in]`` cached inputs (any float dtype; host or device).
      y: ``[N, out]`` cached outputs of the original linear.
      w_hats: candidate weights, float32.
      bias: ``[out]`` or ``None``.
      inv_scale: ``[in]`` factor applied to ``x`` (``1 / smooth_factor``) or ``None``.
      chunk_tokens: rows per step.
      eps: added to ``||Y_t||`` in the relative error.
      mesh: a :class:`jax.sharding.Mesh`: tokens over ``data``, weights replicated (default:
        :func:`jcompress.sharding.current_mesh`, else one device).

    Returns:
      One dict per candidate with :data:`METRIC_KEYS` (Python floats, ``n_tokens`` too, as
      the seed writes it).
    """
    w = jnp.asarray(w_hats, jnp.float32)
    if w.ndim not in (2, 3):
        raise UserError(f"tokenwise_metrics: w_hats must be [C, in, out] or [in, out], got "
                        f"shape {tuple(w.shape)}")  # fmt: skip
    single = w.ndim == 2
    if single:
        w = w[None]
    c, d_in, d_out = w.shape
    _check_args("tokenwise_metrics", x, y, d_in, d_out, bias, inv_scale, chunk_tokens, eps)
    b = jnp.zeros((d_out,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    scaled = inv_scale is not None
    s = jnp.asarray(inv_scale, jnp.float32) if scaled else jnp.ones((d_in,), jnp.float32)
    w_stack = _stack(w)
    del w
    mesh = sharding.current_mesh() if mesh is None else mesh
    if mesh is not None:
        w_stack, b, s = (sharding.replicate(a, mesh) for a in (w_stack, b, s))
    return _chunked(
        x, y, c, chunk_tokens, eps,
        lambda acc, xc, yc, real: _step(acc, w_stack, b, s, xc, yc, real, eps, scaled),
        mesh=mesh,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("scaled",))
def _split_gemm(cores, col, a, b_stack, inv_scale, x, scaled):
    """``X W~`` of one chunk for every factored candidate (:func:`tokenwise_metrics_split`):
    ``split_dot`` against the bf16 cores side by side, plus the float32 low-rank part."""
    from jcompress.quant.split_gemm import split_dot

    if scaled:
        x = x.astype(jnp.float32) * inv_scale[None, :]
    yh = split_dot(x, cores, col)
    if a is not None:
        xa = jnp.dot(x.astype(jnp.float32), a, precision=HIGHEST)
        yh = yh + jnp.dot(xa, b_stack, precision=HIGHEST)
    return yh


def tokenwise_metrics_split(
    x: Any,
    y: Any,
    cores: Any,
    col_scales: Any,
    bias: Any = None,
    *,
    lowrank: tuple[Any, Any] | None = None,
    inv_scale: Any = None,
    chunk_tokens: int = 4096,
    eps: float = 1e-8,
    mesh: Any = None,
) -> list[dict[str, float]]:
    """:func:`tokenwise_metrics` of candidates ``W~_c = L_c + cores[c] * col_scales[c]`` with
    the quantized part's products exact on bf16 units (:mod:`jcompress.quant.split_gemm`).

    Args:
      x, y, bias, inv_scale, chunk_tokens, eps, mesh: as :func:`tokenwise_metrics`.
      cores: ``[C, in, out]`` bfloat16 (:func:`jcompress.quant.split_gemm.bf16_factors`).
      col_scales: ``[C, out]`` float32.
      lowrank: ``(a [in, R], b [C, R, out])`` float32: ``L_c = a @ b[c]`` (directions a
        candidate does not use are zero rows of its ``b``), or None (``L = 0``).

    Returns:
      One dict per candidate with :data:`METRIC_KEYS`.
    """
    cores = jnp.asarray(cores)
    if cores.dtype != jnp.bfloat16 or cores.ndim != 3:
        raise ValueError(f"cores: [C, in, out] bfloat16, got {cores.dtype}{tuple(cores.shape)}")
    c, d_in, d_out = cores.shape
    _check_args("tokenwise_metrics_split", x, y, d_in, d_out, bias, inv_scale, chunk_tokens, eps)
    if tuple(np.shape(col_scales)) != (c, d_out):
        raise UserError(f"tokenwise_metrics_split: col_scales must be [{c}, {d_out}], got "
                        f"{tuple(np.shape(col_scales))}")  # fmt: skip
    if lowrank is not None:
        sa, sb = tuple(np.shape(lowrank[0])), tuple(np.shape(lowrank[1]))
        if len(sa) != 2 or sa[0] != d_in or sb != (c, sa[1], d_out):
            raise UserError(f"tokenwise_metrics_split: lowrank must be (a [{d_in}, R], "
                            f"b [{c}, R, {d_out}]), got shapes {sa} and {sb}")  # fmt: skip
    col = jnp.reshape(jnp.asarray(col_scales, jnp.float32), (c * d_out,))
    b = jnp.zeros((d_out,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    scaled = inv_scale is not None
    s = jnp.asarray(inv_scale, jnp.float32) if scaled else jnp.ones((d_in,), jnp.float32)
    stack = _stack(cores)
    a = b_stack = None
    if lowrank is not None:
        a = jnp.asarray(lowrank[0], jnp.float32)
        b_stack = _stack(jnp.asarray(lowrank[1], jnp.float32))
    mesh = sharding.current_mesh() if mesh is None else mesh
    if mesh is not None:
        stack, col, b, s = (sharding.replicate(t, mesh) for t in (stack, col, b, s))
        if a is not None:
            a, b_stack = sharding.replicate(a, mesh), sharding.replicate(b_stack, mesh)

    def step(acc, xc, yc, real):
        return _errors(acc, _split_gemm(stack, col, a, b_stack, s, xc, scaled), b, yc, real, eps)

    return _chunked(x, y, c, chunk_tokens, eps, step, mesh=mesh)


class NonFiniteTokens(UserError):
    """A cached ``X`` or ``Y`` row holds NaN / Inf: ``which`` (``"X"`` or ``"Y"``) and the
    first such ``token``. Metrics of such a cache would be NaN (or, for the maxima, silently
    finite), so they are an error, never a number."""

    def __init__(self, where: str, which: str, token: int):
        super().__init__(f"{where}: {which} holds NaN / Inf (token {token})")
        self.which, self.token = which, token


def _first_nonfinite(a: np.ndarray) -> int | None:
    ok = np.isfinite(a).all(axis=1)
    return None if ok.all() else int(np.argmin(ok))


def _chunked(x, y, c, chunk_tokens, eps, step, mesh=None) -> list[dict[str, float]]:
    """Stream ``(x, y)`` through ``step(acc, x_chunk, y_chunk, real) -> (acc, rel [C, n])`` in
    padded chunks of one shape (split over ``data`` under ``mesh``); finish the sums, maxima
    and percentiles on the host."""
    n, d_in = x.shape
    d_out = y.shape[1]
    chunk = int(max(1, min(chunk_tokens, n)))
    if jax.default_backend() == "cpu":
        chunk = min(chunk, max(256, CPU_STEP_BYTES // (4 * c * max(d_out, 1))))
    if mesh is not None:  # every chunk splits evenly over data (the padding is masked)
        n_data = int(mesh.shape["data"])
        chunk = -(-chunk // n_data) * n_data
    z = jnp.zeros((c,), jnp.float32)
    acc = (z, jnp.float32(0), z, z, z, z)
    rels = []
    for i0 in range(0, n, chunk):
        xc, yc = np.asarray(x[i0 : i0 + chunk]), np.asarray(y[i0 : i0 + chunk])
        real = xc.shape[0]
        for which, a in (("X", xc), ("Y", yc)):
            if (bad := _first_nonfinite(a)) is not None:
                raise NonFiniteTokens("tokenwise_metrics", which, i0 + bad)
        if real < chunk:  # pad: one compiled shape for every chunk
            xc = np.concatenate([xc, np.zeros((chunk - real, d_in), xc.dtype)])
            yc = np.concatenate([yc, np.zeros((chunk - real, d_out), yc.dtype)])
        if mesh is not None:
            xc, yc = sharding.shard_batch(xc, mesh), sharding.shard_batch(yc, mesh)
        prev = acc
        acc, rel = step(acc, xc, yc, real)
        rels.append(rel[:, :real])
        # at most two chunks in flight: the host slices the next chunk while this one runs,
        # and no more chunks than that are staged on the device (memory flat in tokens)
        jax.block_until_ready(prev)
    rel_all = sharding.to_host(jnp.concatenate(rels, axis=1)).astype(np.float64)
    qs = np.quantile(rel_all, PERCENTILES, axis=1) if n else np.zeros((3, c))
    sse, denom, l2s, l2m, rs, rm = (sharding.to_host(a).astype(np.float64) for a in acc)
    out = []
    for k in range(c):
        out.append({
            "nmse": float(sse[k] / max(float(denom), eps)),
            "sse": float(sse[k]),
            "denom": float(denom),
            "token_l2_mean": float(l2s[k] / max(n, 1)),
            "token_l2_max": float(l2m[k]),
            "token_rel_l2_mean": float(rs[k] / max(n, 1)),
            "token_rel_l2_max": float(rm[k]),
            "n_tokens": float(n),
            "token_rel_l2_p95": float(qs[0, k]),
            "token_rel_l2_p99": float(qs[1, k]),
            "token_rel_l2_p999": float(qs[2, k]),
        })  # fmt: skip
    return out


@functools.partial(jax.jit, static_argnames=("eps", "spec", "block_sizes", "interpret"))
def _qstep(acc, q, b, x, y, real, eps, spec, block_sizes, interpret):
    """One chunk through the fused kernel (:mod:`jcompress.kernels.tokenwise_error`)."""
    from jcompress.kernels import tokenwise_error as K

    d2 = K._pallas(x, y, q, b, spec, block_sizes, interpret)
    return _accumulate(acc, d2[None], y.astype(jnp.float32), real, eps)


def tokenwise_metrics_quantized(
    x: Any,
    y: Any,
    q: Any,
    spec: Any,
    bias: Any = None,
    *,
    chunk_tokens: int = 4096,
    eps: float = 1e-8,
    block_sizes: Any = None,
    interpret: bool = False,
    mesh: Any = None,
    gemm: Any = "auto",
) -> dict[str, float]:
    """:func:`tokenwise_metrics` of one quantized kernel given as codes + scales.

    Three routes, the same metrics (to float32 rounding):

    * the exact bf16 split (:mod:`jcompress.quant.split_gemm`, :func:`tokenwise_metrics_split`)
      where ``gemm`` asks for it (``auto``: where
      :func:`~jcompress.quant.split_gemm.split_pays`) and the weight factors;
    * otherwise, where :func:`jcompress.kernels.tokenwise_error.supports` says so (a GPU, or
      ``interpret=True``, which also takes precedence over ``auto``), every chunk goes through
      the fused Pallas kernel (``W~`` dequantized tile by tile inside it, never
      materialized);
    * elsewhere ``W~`` is dequantized once and the chunks take :func:`tokenwise_metrics`'
      float32 GEMM.

    Args:
      x: ``[N, in]`` cached inputs.
      y: ``[N, out]`` cached outputs.
      q: :class:`jcompress.quant.formats.Quantized` of the ``[in, out]`` kernel.
      spec: its :class:`jcompress.quant.QuantSpec` (or spec string).
      bias: ``[out]`` or ``None``.
      chunk_tokens: rows per step.
      eps: added to ``||Y_t||`` in the relative error.
      block_sizes: the kernel's tile (:class:`jcompress.kernels.tokenwise_error.BlockSizes`).
      interpret: run the kernel in the Pallas interpreter (tests).
      mesh: as :func:`tokenwise_metrics`; under a mesh the chunks take a GEMM path (the
        fused kernel runs on one device).
      gemm: ``auto``, ``fp32`` or ``split_bf16`` (:class:`jcompress.quant.split_gemm.Gemm`).

    Returns:
      One dict with :data:`METRIC_KEYS`.
    """
    from jcompress.kernels import tokenwise_error as K
    from jcompress.quant import formats as F
    from jcompress.quant import split_gemm as S

    spec = K._spec(spec)
    how = S.as_gemm(gemm)
    shape = tuple(q.codes.shape)
    if len(shape) != 2:
        raise UserError(f"tokenwise_metrics_quantized: codes must be [in, out], got {shape}")
    _check_args("tokenwise_metrics_quantized", x, y, *shape, bias, None, chunk_tokens, eps)
    f = spec.format
    want = F.scales_shape(spec, shape)
    if (
        np.dtype(q.codes.dtype) != f.code_dtype
        or np.dtype(q.scales.dtype) != f.scale_dtype
        or tuple(q.scales.shape) != want
    ):
        raise UserError(
            f"tokenwise_metrics_quantized: q is not a {spec} quantization of a {shape} weight "
            f"(want codes {f.code_dtype}, scales {f.scale_dtype}{want}; got codes "
            f"{q.codes.dtype}, scales {q.scales.dtype}{tuple(q.scales.shape)})"
        )
    bs = block_sizes or K.BlockSizes()
    mesh = sharding.current_mesh() if mesh is None else mesh
    # interpret=True asks for the kernel: auto does not override it
    factors = S.bf16_factors(q, spec) if S.use_split(how, x.dtype, auto=not interpret) else None
    if factors is not None:
        core, col = factors
        return tokenwise_metrics_split(
            x, y, core[None], col[None], bias, chunk_tokens=chunk_tokens, eps=eps, mesh=mesh
        )[0]
    if mesh is not None or not K.supports(spec, shape, bs, interpret=interpret):
        return tokenwise_metrics(x, y, F.dequantize(q, spec), bias,
                                 chunk_tokens=chunk_tokens, eps=eps, mesh=mesh)[0]  # fmt: skip
    b = jnp.zeros((shape[1],), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    return _chunked(
        x, y, 1, chunk_tokens, eps,
        lambda acc, xc, yc, real: _qstep(acc, q, b, xc, yc, real, eps, spec, bs, interpret),
    )[0]  # fmt: skip
