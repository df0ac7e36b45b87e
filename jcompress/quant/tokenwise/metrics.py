"""Tokenwise output-error metrics of ``Y~ = X W~ + b`` against cached ``Y`` (float32, chunked).

For every candidate weight ``W~_c`` (a batch ``[C, in, out]``, one per configuration):

* ``nmse = sse / denom`` with ``sse = ||Y~ - Y||_F^2``, ``denom = ||Y||_F^2``;
* per token ``t``: ``l2_t = ||Y~_t - Y_t||``, ``rel_t = l2_t / (||Y_t|| + eps)``;
  ``token_l2_mean / max``, ``token_rel_l2_mean / max`` and the ``p95 / p99 / p999``
  percentiles of ``rel_t`` (linear interpolation, as ``torch.quantile`` / ``numpy``);
* ``n_tokens``.

Tokens stream in chunks of ``chunk_tokens`` rows (the last one padded and masked): device
memory holds one chunk of ``X`` / ``Y`` and the ``C`` candidate weights, whatever ``N`` is;
only the per-token relative errors (``C x N`` floats, for the percentiles) grow with ``N``.
Each chunk is one jitted step batched over configurations (``vmap``); the sums stay on device.
The optional ``inv_scale [in]`` multiplies ``X`` first (SmoothQuant's ``X / s``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["METRIC_KEYS", "PERCENTILES", "tokenwise_metrics"]

PERCENTILES = (0.95, 0.99, 0.999)
METRIC_KEYS = (
    "nmse", "sse", "denom", "token_l2_mean", "token_l2_max", "token_rel_l2_mean",
    "token_rel_l2_max", "n_tokens", "token_rel_l2_p95", "token_rel_l2_p99", "token_rel_l2_p999",
)  # fmt: skip
HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("eps",))
def _step(acc, w, b, inv_scale, x, y, real, eps):
    """One chunk: ``acc`` = (sse [C], denom, l2_sum [C], l2_max [C], rel_sum [C], rel_max [C])."""
    sse, denom, l2s, l2m, rs, rm = acc
    x = x.astype(jnp.float32) * inv_scale[None, :]
    y = y.astype(jnp.float32)
    keep = jnp.arange(x.shape[0]) < real
    yh = jnp.einsum("ni,cio->cno", x, w, precision=HIGHEST) + b[None, None, :]
    d2 = jnp.sum((yh - y[None]) ** 2, axis=-1)  # [C, n]
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


def tokenwise_metrics(
    x: Any,
    y: Any,
    w_hats: Any,
    bias: Any = None,
    *,
    inv_scale: Any = None,
    chunk_tokens: int = 4096,
    eps: float = 1e-8,
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

    Returns:
      One dict per candidate with :data:`METRIC_KEYS` (Python floats, ``n_tokens`` too, as
      the seed writes it).
    """
    w = jnp.asarray(w_hats, jnp.float32)
    single = w.ndim == 2
    if single:
        w = w[None]
    n, d_in = x.shape
    if y.shape[0] != n:
        raise ValueError(f"token count mismatch: X{tuple(x.shape)} vs Y{tuple(y.shape)}")
    c, _, d_out = w.shape
    b = jnp.zeros((d_out,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    s = jnp.ones((d_in,), jnp.float32) if inv_scale is None else jnp.asarray(inv_scale, jnp.float32)
    chunk = int(max(1, min(chunk_tokens, n)))
    z = jnp.zeros((c,), jnp.float32)
    acc = (z, jnp.float32(0), z, z, z, z)
    rels = []
    for i0 in range(0, n, chunk):
        xc, yc = np.asarray(x[i0 : i0 + chunk]), np.asarray(y[i0 : i0 + chunk])
        real = xc.shape[0]
        if real < chunk:  # pad: one compiled shape for every chunk
            xc = np.concatenate([xc, np.zeros((chunk - real, d_in), xc.dtype)])
            yc = np.concatenate([yc, np.zeros((chunk - real, d_out), yc.dtype)])
        acc, rel = _step(acc, w, b, s, xc, yc, real, eps)
        rels.append(rel[:, :real])
    rel_all = np.asarray(jnp.concatenate(rels, axis=1), np.float64)
    qs = np.quantile(rel_all, PERCENTILES, axis=1) if n else np.zeros((3, c))
    sse, denom, l2s, l2m, rs, rm = (np.asarray(a, np.float64) for a in acc)
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
