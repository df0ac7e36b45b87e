"""SmoothQuant: migrate activation outliers into the weights before quantizing them.

For linears reading the same input ``X [N, in]`` (q/k/v after the attention norm, gate/up
after the MLP norm) one per-input-channel factor

    ``s_j = max_t |X_tj|^alpha / max_k |W_jk|^(1 - alpha)``

(the max over ``W`` taken over every output column of every linear in the group) gives
``X' = X / s`` and ``W' = diag(s) W`` with ``X' W' = X W`` exactly; then ``W'`` is quantized.
A channel with ``max|X_j| = 0`` or ``max|W_j| = 0`` gets ``s_j = 1``; factors are clipped to
``[eps, 1/eps]``.

:func:`search_alpha` picks ``alpha`` from a grid per group by the output error of the
quantized, smoothed group on the given activations.

References:
  Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
  Language Models", ICML 2023 (Eq. 4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_ALPHAS",
    "absmax_rows",
    "apply_smooth",
    "check_alpha",
    "group_scales",
    "require_factor",
    "search_alpha",
    "smooth_scales",
]

DEFAULT_ALPHA = 0.5
"""SmoothQuant's migration strength when none is given (the paper's default)."""
DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
HIGHEST = jax.lax.Precision.HIGHEST


def check_alpha(alpha: Any, *, arg: str = "--alpha") -> float:
    """``alpha`` as a float in ``[0, 1]``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UserError(f"{arg}: must be a number in [0, 1], got {alpha!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"{arg}: must be in [0, 1], got {alpha}")
    return float(alpha)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _absmax_cols(x, chunk):
    n, d = x.shape
    pad = (-n) % chunk
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, d)

    def step(acc, c):
        return jnp.maximum(acc, jnp.max(jnp.abs(c.astype(jnp.float32)), axis=0)), None

    out, _ = jax.lax.scan(step, jnp.zeros((d,), jnp.float32), xs)
    return out


def absmax_rows(x: Any, *, chunk: int = 4096) -> jax.Array:
    """``max_t |x[t, j]|`` for ``x [N, in]`` -> ``[in]`` float32 (chunked over tokens)."""
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise UserError(f"activations must be [tokens, in], got shape {tuple(x.shape)}")
    return _absmax_cols(x, int(min(chunk, max(x.shape[0], 1))))


@jax.jit
def smooth_scales(x_absmax, w_absmax, alpha, eps: float = 1e-5) -> jax.Array:
    """``s [in] = x_absmax^alpha / w_absmax^(1 - alpha)`` (1 where either max is 0)."""
    xa = jnp.asarray(x_absmax, jnp.float32)
    wa = jnp.asarray(w_absmax, jnp.float32)
    ok = (xa > 0) & (wa > 0)
    s = jnp.power(jnp.where(ok, xa, 1.0), alpha) / jnp.power(jnp.where(ok, wa, 1.0), 1.0 - alpha)
    return jnp.clip(jnp.where(ok, s, 1.0), eps, 1.0 / eps)


def group_scales(x_absmax: Any, kernels: Sequence[Any], alpha: float) -> jax.Array:
    """One ``s`` for linears sharing an input: ``kernels`` are their ``[in, out]`` weights."""
    if not kernels:
        raise UserError("group_scales: no kernels")
    w_absmax = jnp.max(
        jnp.stack([jnp.max(jnp.abs(jnp.asarray(k, jnp.float32)), axis=1) for k in kernels]), 0
    )
    return smooth_scales(x_absmax, w_absmax, check_alpha(alpha))


def apply_smooth(kernel: Any, s: Any) -> jax.Array:
    """``W' = diag(s) W`` for a ``[in, out]`` kernel (pair with ``X' = X / s``)."""
    return jnp.asarray(s, jnp.float32)[:, None] * jnp.asarray(kernel, jnp.float32)


def require_factor(factors: Mapping[str, Any], name: str, n_in: int) -> jax.Array:
    """``factors[name]`` as a finite, positive ``[n_in]`` vector, else one clear error."""
    if name not in factors:
        raise UserError(f"smooth_factor: missing for layer {name} (no '{name}.smooth_factor')")
    s = np.asarray(factors[name], np.float32)
    if s.ndim == 0:
        s = np.full((n_in,), float(s), np.float32)
    if s.shape != (n_in,):
        raise UserError(f"smooth_factor: {name} has shape {list(s.shape)}, expected [{n_in}]")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise UserError(f"smooth_factor: {name} has zero, negative or non-finite entries")
    return jnp.asarray(s)


@functools.partial(jax.jit, static_argnames=("spec",))
def _group_error(x, kernels, x_absmax, w_absmax, alpha, spec):
    from jcompress.quant.formats import fake_quant

    s = smooth_scales(x_absmax, w_absmax, alpha)
    xs = x / s[None, :]
    num = jnp.float32(0)
    den = jnp.float32(0)
    for k in kernels:
        y = jnp.matmul(x, k, precision=HIGHEST)
        yq = jnp.matmul(xs, fake_quant(s[:, None] * k, spec), precision=HIGHEST)
        num = num + jnp.sum((yq - y) ** 2)
        den = den + jnp.sum(y**2)
    return num / jnp.maximum(den, 1e-30)


def search_alpha(
    x: Any, kernels: Sequence[Any], spec: Any, alphas: Sequence[float] = DEFAULT_ALPHAS
) -> tuple[float, dict[float, float]]:
    """Best ``alpha`` for one input group: the smallest summed output NMSE of the quantized,
    smoothed kernels on ``x [N, in]`` (ties: the first in ``alphas``).

    Returns:
      ``(alpha, {alpha: nmse})``.
    """
    if not alphas:
        raise UserError("--alphas: empty")
    x = jnp.asarray(x, jnp.float32)
    ks = tuple(jnp.asarray(k, jnp.float32) for k in kernels)
    xa = absmax_rows(x)
    wa = jnp.max(jnp.stack([jnp.max(jnp.abs(k), axis=1) for k in ks]), 0)
    errs = {
        float(a): float(_group_error(x, ks, xa, wa, check_alpha(a, arg="--alphas"), spec))
        for a in alphas
    }
    best = min(errs, key=lambda a: (errs[a], list(errs).index(a)))
    return best, errs
