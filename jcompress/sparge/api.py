"""Public SpargeAttn entry points: :func:`block_mask`, :func:`attention` (with per-head
statistics) and the ``block_sparse`` implementation of the decoder's attention seam."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError
from jcompress.kernels import sparse_attention as kernel
from jcompress.models import attention as seam
from jcompress.sparge import _core
from jcompress.sparge.params import DEFAULTS, SpargeParams, check_range

__all__ = ["BlockSparse", "SpargeStats", "attention", "block_mask", "head_thresholds"]

IMPLEMENTATIONS = ("auto", "pallas", "xla", "reference")


class SpargeStats(NamedTuple):
    """Per query head statistics of one attention call (float32 ``[Hq]``).

    Attributes:
      kept: kept fraction of the (row, key block) pairs a row may see (``1 - sparsity``).
      pv_skip: fraction of the kept (row, block) pairs whose ``P V`` product was skipped.
      tiles: fraction of the visible (query block, key block) tiles the compute visits
        (a tile is visited when any of its rows keeps the key block).
    """

    kept: jax.Array
    pv_skip: jax.Array
    tiles: jax.Array


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise UserError(
            f"q, k, v: expected [B, T, Hq, D], [B, S, Hk, D], [B, S, Hk, Dv]; got "
            f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or v.shape[:3] != k.shape[:3] or hq % k.shape[2]:
        raise UserError(
            f"q, k, v: shapes {list(q.shape)}, {list(k.shape)}, {list(v.shape)} do not fit "
            "[B, T, Hq, D], [B, S, Hk, D], [B, S, Hk, Dv] with Hq a multiple of Hk"
        )
    if not 1 <= d <= 256:
        raise UserError(f"head_dim: {d} is not supported; allowed 1..256")


def head_thresholds(params: Any, hq: int, layer: Any = None):
    """``(simthreshd1, cdfthreshd, pvthreshd)`` as ``[Hq]`` float32 arrays from a
    :class:`SpargeParams` (rows indexed by ``layer`` when 2-D), a ``[Hq]`` triple or scalars."""
    if params is None:
        params = SpargeParams(DEFAULTS["simthreshd1"], DEFAULTS["cdfthreshd"],
                              DEFAULTS["pvthreshd"])  # fmt: skip
    out = []
    for name, a in zip(SpargeParams._fields, params, strict=True):
        check_range(name, a)  # concrete thresholds only; traced ones come validated
        a = jnp.asarray(a, jnp.float32)
        if a.ndim == 2:
            if layer is None:
                raise UserError(f"{name}: [layers, heads] thresholds need a layer index")
            a = a[layer]
        if a.ndim > 1 or (a.ndim == 1 and a.shape[0] != hq):
            raise UserError(f"{name}: expected {hq} per-head thresholds, got shape {list(a.shape)}")
        out.append(jnp.broadcast_to(a, (hq,)))
    return tuple(out)


def _selection(q, k, sim, cdf, *, bs, causal, scale, k_valid, q_offset, q_pos, k_pos, slopes):
    return _core.select(
        q, k, sim, cdf, block_q=bs.block_q, block_k=bs.block_k, causal=causal, scale=scale,
        k_valid=k_valid, q_offset=q_offset, q_pos=q_pos, k_pos=k_pos, alibi_slopes=slopes,
    )  # fmt: skip


def block_mask(
    q: jax.Array,  # [B, T, Hq, D]
    k: jax.Array,  # [B, S, Hk, D]
    params: Any,
    *,
    block_q: int = 128,
    block_k: int = 64,
    causal: bool = True,
    layer: Any = None,
    scale: Any = None,
    k_valid: jax.Array | None = None,
    q_offset: Any = 0,
) -> jax.Array:
    """Kept (query block, key block) tiles, bool ``[B, Hq, nQ, nK]`` (a tile is kept when
    any of its query rows keeps the key block; see :mod:`jcompress.sparge._core`)."""
    bs = kernel.BlockSizes(block_q=block_q, block_k=block_k)
    hq = q.shape[2]
    sim, cdf, _ = head_thresholds(params, hq, layer)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    sel = _selection(q, k, sim, cdf, bs=bs, causal=causal, scale=scale, k_valid=k_valid,
                     q_offset=q_offset, q_pos=None, k_pos=None, slopes=None)  # fmt: skip
    return _core.tiles_from_rows(sel.keep, min(block_q, q.shape[1]))


def _stats(sel: _core.Selection, skipped: jax.Array, block_q: int) -> SpargeStats:
    rows = sel.q_valid[:, None, :, None]
    kept = jnp.sum(sel.keep & rows, axis=(0, 2, 3)).astype(jnp.float32)
    vis = jnp.sum(sel.visible & rows, axis=(0, 2, 3)).astype(jnp.float32)
    tiles = jnp.sum(_core.tiles_from_rows(sel.keep & rows, block_q), axis=(0, 2, 3))
    vtiles = jnp.sum(_core.tiles_from_rows(sel.visible & rows, block_q), axis=(0, 2, 3))
    skipped = jnp.sum(skipped, axis=0).astype(jnp.float32)
    return SpargeStats(
        kept=kept / jnp.maximum(vis, 1.0),
        pv_skip=skipped / jnp.maximum(kept, 1.0),
        tiles=tiles.astype(jnp.float32) / jnp.maximum(vtiles.astype(jnp.float32), 1.0),
    )


def _run(q, k, v, sim, cdf, pv, *, bs, causal, scale, mask, implementation, interpret,
         with_stats):  # fmt: skip
    slopes = mask.alibi_slopes
    q_pos, k_pos = (mask.q_pos, mask.k_pos) if slopes is not None else (None, None)
    sel = _selection(q, k, sim, cdf, bs=bs, causal=causal, scale=scale, k_valid=mask.k_valid,
                     q_offset=mask.q_offset, q_pos=q_pos, k_pos=k_pos, slopes=slopes)  # fmt: skip
    if implementation == "reference" and with_stats:
        out, skipped = _core.masked_attention(
            q, k, v, sel.keep, pv, block_k=bs.block_k, causal=causal, scale=scale,
            k_valid=mask.k_valid, q_offset=mask.q_offset, q_pos=q_pos, k_pos=k_pos,
            alibi_slopes=slopes,
        )  # fmt: skip
        skipped = jnp.sum(skipped & sel.q_valid[:, None, :, None], axis=(2, 3))
    else:
        out, skipped = kernel.sparse_attention(
            q, k, v, sel.keep, pv, block_sizes=bs, scale=scale, causal=causal,
            k_valid=mask.k_valid, q_offset=mask.q_offset, q_pos=q_pos, k_pos=k_pos,
            alibi_slopes=slopes, implementation=implementation, interpret=interpret,
        )  # fmt: skip
    if not with_stats:
        return out
    return out, _stats(sel, skipped, min(bs.block_q, q.shape[1]))


def attention(
    q: jax.Array,  # [B, T, Hq, D]
    k: jax.Array,  # [B, S, Hk, D]
    v: jax.Array,  # [B, S, Hk, Dv]
    params: Any = None,
    *,
    causal: bool = True,
    block_sizes: kernel.BlockSizes | None = None,
    implementation: str | None = None,
    layer: Any = None,
    scale: Any = None,
    k_valid: jax.Array | None = None,
    q_offset: Any = 0,
    interpret: bool = False,
) -> tuple[jax.Array, SpargeStats]:
    """SpargeAttn: block selection, then block-sparse attention over the kept blocks.

    Args:
      q, k, v: ``[B, T, Hq, D]``, ``[B, S, Hk, D]``, ``[B, S, Hk, Dv]`` (GQA, any head_dim
        up to 256).
      params: :class:`SpargeParams` (``[layers, heads]``, pick a row with ``layer``), per-head
        ``[Hq]`` arrays or scalars; ``None``: the untuned defaults.
      causal: token-causal selection and the causal mask (see :mod:`jcompress.sparge._core`);
        ``False``: upstream's block-pooled selection, no mask.
      block_sizes: :class:`jcompress.kernels.sparse_attention.BlockSizes` (default 128 x 64).
      implementation: ``None``/``"auto"``, ``"pallas"``, ``"xla"`` or ``"reference"``.
      k_valid: ``[B, S]`` key validity; q_offset: cache slot of query 0 (decode).

    Returns:
      ``(out [B, T, Hq, Dv]``, :class:`SpargeStats` per head).
    """
    _check_shapes(q, k, v)
    bs = block_sizes or kernel.BlockSizes.get_default()
    impl = implementation or "auto"
    if impl not in IMPLEMENTATIONS:
        raise UserError(f"implementation: {impl!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    hq = q.shape[2]
    sim, cdf, pv = head_thresholds(params, hq, layer)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k_valid is None:
        k_valid = jnp.ones(k.shape[:2], bool)
    return _attention_jit(q, k, v, sim, cdf, pv, jnp.asarray(scale, jnp.float32), k_valid,
                          jnp.asarray(q_offset, jnp.int32), bs=bs, causal=causal,
                          implementation=impl, interpret=interpret)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("bs", "causal", "implementation", "interpret"))
def _attention_jit(q, k, v, sim, cdf, pv, scale, k_valid, q_offset, *, bs, causal,
                   implementation, interpret):  # fmt: skip
    mask = seam.AttentionMask(k_valid=k_valid, q_offset=q_offset)
    return _run(q, k, v, sim, cdf, pv, bs=bs, causal=causal, scale=scale, mask=mask,
                implementation=implementation, interpret=interpret, with_stats=True)  # fmt: skip


@seam.register_attention("block_sparse")
@dataclasses.dataclass(frozen=True)
class BlockSparse:
    """SpargeAttn as a decoder attention implementation (``forward(...,
    attention="block_sparse", attention_state=SpargeParams)``).

    The state is a :class:`SpargeParams` with ``[layers, heads]`` thresholds (row ``layer``
    is used) or ``None`` for the untuned defaults. Selection is token-causal, so prefill and
    KV-cache decode (one or a few queries against the cached key blocks) agree.

    Attributes:
      block_q, block_k: tile sizes (default 128 x 64; 32 x 32 for short sequences).
      implementation: ``"auto"`` (Pallas where supported, else the XLA gather),
        ``"pallas"``, ``"xla"`` or ``"reference"`` (dense scores under the block mask).

    Callers pass the thresholds as the traced state (``forward`` / ``forward_cached`` /
    :func:`jcompress.eval.perplexity` take ``attention_state=``), so new thresholds reuse
    the compiled function.
    """

    block_q: int = 128
    block_k: int = 64
    implementation: str = "auto"

    def __post_init__(self):
        kernel.BlockSizes(block_q=self.block_q, block_k=self.block_k)  # validates
        if self.implementation not in IMPLEMENTATIONS:
            raise UserError(
                f"implementation: {self.implementation!r} is not one of "
                f"{', '.join(IMPLEMENTATIONS)}"
            )

    def check_state(self, cfg: Any, state: Any) -> None:
        """``state``: :class:`SpargeParams` (or a triple) of ``[cfg.num_layers,
        cfg.num_heads]`` thresholds, of ``[num_heads]`` (every layer) or scalars, in range
        where concrete; see :func:`jcompress.models.attention.check_state`."""
        if not isinstance(state, tuple) or len(state) != len(SpargeParams._fields):
            raise UserError(
                "attention_state: block_sparse takes SpargeParams (or None for the defaults), "
                f"got {type(state).__name__}"
            )
        state = SpargeParams(*state)
        ndims = {int(np.ndim(a)) for a in state}
        if ndims == {2}:
            state.check_model(cfg.num_layers, cfg.num_heads, arg="attention_state")
        elif ndims == {1} and all(np.shape(a)[0] == cfg.num_heads for a in state):
            pass
        elif ndims != {0}:
            raise UserError(
                "attention_state: thresholds must all be [layers, heads] "
                f"[{cfg.num_layers}, {cfg.num_heads}], [heads] or scalars; got shapes "
                f"{[list(np.shape(a)) for a in state]}"
            )
        for name, a in zip(SpargeParams._fields, state, strict=True):
            if not isinstance(a, jax.core.Tracer):
                check_range(name, np.asarray(a, np.float64))

    def __call__(self, q, k, v, mask: seam.AttentionMask, *, scale, layer=None, state=None):
        hq = q.shape[2]
        sim, cdf, pv = head_thresholds(state, hq, layer)
        bs = kernel.BlockSizes(block_q=self.block_q, block_k=self.block_k)
        return _run(q, k, v, sim, cdf, pv, bs=bs, causal=True, scale=scale, mask=mask,
                    implementation=self.implementation, interpret=False,
                    with_stats=False)  # fmt: skip
