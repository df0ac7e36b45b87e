"""Attention implementations: the seam between the decoder and the attention math.

The decoder (:mod:`jcompress.models.forward`) projects, normalises and rotates q/k/v, then
hands them to one *implementation* chosen by a static setting (``forward(...,
attention="chunked")``). Every implementation has the same contract:

* ``q [B, T, Hq, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` with ``Hq % Hk == 0``.
  Query head ``h`` reads KV head ``h // (Hq // Hk)`` (GQA / MQA); K and V are never repeated
  in memory (queries are grouped instead).
* ``mask``: an :class:`AttentionMask`, a structured description, never a materialised
  ``[B, T, S]`` array: query ``t`` sits in cache slot ``q_offset + t``; key slot ``s`` is
  visible to it iff ``s <= q_offset + t`` (causal) and ``k_valid[b, s]``; with ALiBi the score
  gains ``slopes[h] * (k_pos[b, s] - q_pos[b, t])``.
* ``scale``: the softmax scale (a float, or a traced scalar for GPT-2's per-layer scaling).
* ``layer``: the decoder layer's index (an int, or traced inside ``apply_layer``), and
  ``state``: the pytree the caller passed as ``forward(..., attention_state=...)`` (``None``
  unless given). An implementation with per-layer settings (SpargeAttn's thresholds
  ``[layers, heads]``) indexes its state with ``layer``; the built-in ones ignore both.
* Returns ``[B, T, Hq, Dv]`` in ``v``'s dtype. Scores and softmax run in float32.

A query row with no visible key (a pad query at the left edge) carries no meaning; its output
is finite but implementation-specific.

Implementations are frozen dataclasses (hashable, so they are static ``jit`` arguments) that
register themselves by name with :func:`register_attention`; :func:`resolve` turns a name or
an instance into one. ``dense`` is today's math and the oracle the others are tested against;
``chunked`` is an online-softmax (flash-attention style) loop over key blocks in plain XLA
whose memory is ``O(T x block_k)`` instead of ``O(T x S)`` and which skips key blocks that
are entirely in a query block's causal future. SpargeAttn's ``block_sparse`` registers here
from its own module.

Example::

    from jcompress.models import attention
    out = attention.resolve("chunked")(q, k, v, attention.causal_mask(k_valid), scale=d**-0.5)

References: Milakov & Gimelshein, "Online normalizer calculation for softmax" (2018);
Dao et al., "FlashAttention" (2022); Press et al., "ALiBi" (2022).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError

__all__ = [
    "AttentionImpl",
    "AttentionMask",
    "Chunked",
    "Dense",
    "IMPLEMENTATIONS",
    "causal_mask",
    "fit_to_devices",
    "register_attention",
    "resolve",
]

_NEG = float(jnp.finfo(jnp.float32).min)


class AttentionMask(NamedTuple):
    """Structured causal mask with key validity and optional ALiBi (a pytree).

    Attributes:
      k_valid: ``[B, S]`` bool, key slots that hold a real token.
      q_offset: int32 scalar (or Python int), cache slot of query 0 (0 without a cache).
      q_pos: ``[B, T]`` int32 positions of the queries (ALiBi only; may be ``None``).
      k_pos: ``[B, S]`` int32 positions of the keys (ALiBi only; may be ``None``).
      alibi_slopes: ``[Hq]`` float32 ALiBi slopes, or ``None`` for no positional bias.
    """

    k_valid: jax.Array
    q_offset: Any = 0
    q_pos: jax.Array | None = None
    k_pos: jax.Array | None = None
    alibi_slopes: jax.Array | None = None


def causal_mask(k_valid: jax.Array, q_offset: Any = 0) -> AttentionMask:
    """A causal :class:`AttentionMask` with no positional bias."""
    return AttentionMask(k_valid=k_valid, q_offset=q_offset)


class AttentionImpl(Protocol):
    """What the decoder calls (see the module docstring for the contract)."""

    name: str

    def __call__(
        self,
        q: jax.Array,  # [B, T, Hq, D]
        k: jax.Array,  # [B, S, Hk, D]
        v: jax.Array,  # [B, S, Hk, Dv]
        mask: AttentionMask,
        *,
        scale: Any,
        layer: Any = None,
        state: Any = None,
    ) -> jax.Array:  # [B, T, Hq, Dv]
        ...


IMPLEMENTATIONS: dict[str, Callable[..., AttentionImpl]] = {}

DEFAULT = "chunked"
"""The implementation used when none is named (``resolve(None)``, ``forward``'s default)."""


def register_attention(name: str) -> Callable[[type], type]:
    """Class decorator: make an implementation available as ``attention=name``.

    The class must be a frozen dataclass (hashable: it is a static ``jit`` argument) whose
    no-argument construction gives sensible defaults. Registering a second class under a taken
    name is an error.
    """

    def deco(cls: type) -> type:
        if name in IMPLEMENTATIONS and IMPLEMENTATIONS[name] is not cls:
            raise ValueError(f"attention implementation {name!r} is already registered")
        IMPLEMENTATIONS[name] = cls
        cls.name = name
        return cls

    return deco


PROVIDERS: dict[str, str] = {"block_sparse": "jcompress.sparge"}
"""Implementations that jcompress's own method packages register, by name -> the module to
import on first use (so ``attention="block_sparse"`` works without importing the method
first; the model code still imports no method)."""


def resolve(attention: Any) -> AttentionImpl:
    """``None`` (:data:`DEFAULT`) / a registered name / an implementation instance -> an
    implementation."""
    if attention is None:
        attention = DEFAULT
    if isinstance(attention, str):
        if attention not in IMPLEMENTATIONS and attention in PROVIDERS:
            importlib.import_module(PROVIDERS[attention])  # registers it
        if attention not in IMPLEMENTATIONS:
            known = ", ".join(sorted({*IMPLEMENTATIONS, *PROVIDERS}))
            raise UserError(f"attention: unknown implementation {attention!r}; allowed: {known}")
        return IMPLEMENTATIONS[attention]()
    if callable(attention) and getattr(attention, "name", None) in IMPLEMENTATIONS:
        try:
            hash(attention)
        except TypeError:
            raise UserError(
                f"attention: {type(attention).__name__} must be hashable (a frozen dataclass)"
            ) from None
        return attention
    known = ", ".join(sorted(IMPLEMENTATIONS))
    raise UserError(
        f"attention: expected a name ({known}) or a registered implementation, "
        f"got {type(attention).__name__}"
    )


def check_state(impl: AttentionImpl, cfg: Any, state: Any) -> None:
    """Host-side check of an implementation's state against the model, before tracing: an
    implementation may define ``check_state(cfg, state)`` (one :class:`UserError` line, e.g.
    SpargeAttn's ``[layers, heads]`` thresholds; inside the jitted forward a row index past
    the state's rows would clamp silently). ``None`` state and implementations without the
    method pass."""
    fn = getattr(impl, "check_state", None)
    if state is not None and fn is not None:
        fn(cfg, state)


def fit_to_devices(impl: AttentionImpl, *trees: Any, mesh: Any = None) -> AttentionImpl:
    """``impl`` as it should run where its inputs live: :class:`Chunked`'s row-block path
    walks the (batch row, KV head) pairs with a ``lax.map``, which XLA cannot partition (a
    sharded call would gather q / k / v onto every device), so with a mesh of more than one
    device (``mesh``, else :func:`jcompress.sharding.current_mesh`) or any concrete array of
    ``trees`` spread over several devices it takes the paired tiles (``row_blocks=0``), which
    stay batched over rows and heads. Other implementations are returned as they are."""
    if not isinstance(impl, Chunked) or impl.row_blocks == 0:
        return impl
    if mesh is None:
        from jcompress import sharding  # lazy: the sharding module imports the model code

        mesh = sharding.current_mesh()
    multi = mesh is not None and mesh.size > 1
    if not multi:
        multi = any(
            isinstance(x, jax.Array)
            and not isinstance(x, jax.core.Tracer)
            and len(x.sharding.device_set) > 1
            for x in jax.tree.leaves(trees)
        )
    return dataclasses.replace(impl, row_blocks=0) if multi else impl


def _check(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[int, ...]:
    b, t, hq, d = q.shape
    bk, s, hk, dk = k.shape
    if (bk, s, hk) != tuple(v.shape[:3]) or b != bk or dk != d or hq % hk:
        raise ValueError(
            f"attention: q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)} do not fit "
            "[B, T, Hq, D], [B, S, Hk, D], [B, S, Hk, Dv] with Hq a multiple of Hk"
        )
    return b, t, hq, d, s, hk, v.shape[-1]


def _to_rows(q: jax.Array, hk: int) -> jax.Array:
    """``[B, T, Hq, D] -> [B, Hk, g * T, D]``: the query heads of one KV head become rows of one
    matrix (row ``i * T + t`` is group member ``i`` at query ``t``), so each KV head's scores
    are a single matmul and K/V are never repeated."""
    b, t, hq, d = q.shape
    g = hq // hk
    return jnp.transpose(q.reshape(b, t, hk, g, d), (0, 2, 3, 1, 4)).reshape(b, hk, g * t, d)


def _from_rows(o: jax.Array, t: int) -> jax.Array:
    """Inverse of :func:`_to_rows`: ``[B, Hk, g * T, Dv] -> [B, T, Hq, Dv]``."""
    b, hk, gt, dv = o.shape
    g = gt // t
    return jnp.transpose(o.reshape(b, hk, g, t, dv), (0, 3, 1, 2, 4)).reshape(b, t, hk * g, dv)


def _masked_scores(
    q: jax.Array,  # [B, Hk, g * Tq, D] query rows (see _to_rows)
    k: jax.Array,  # [B, Hk, Sk, D]
    scale: Any,
    q_offset: Any,  # slot of query index 0
    q_idx: jax.Array,  # [Tq] query indices of this tile
    k_idx: jax.Array,  # [Sk] key slots of this tile
    k_valid: jax.Array,  # [B, Sk]
    q_pos: jax.Array | None,  # [B, Tq] (ALiBi)
    k_pos: jax.Array | None,  # [B, Sk] (ALiBi)
    slopes: jax.Array | None,  # [Hq] (ALiBi)
) -> jax.Array:  # [B, Hk, g * Tq, Sk] float32, invisible entries at the float32 minimum
    hk, rows = k.shape[1], q.shape[2]
    g = rows // q_idx.shape[0]
    sc = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    row_t = jnp.tile(q_idx, g)  # [g * Tq]
    visible = (k_idx[None, :] <= (q_offset + row_t)[:, None])[None] & k_valid[:, None, :]
    if slopes is not None:
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)  # [B, Tq, Sk]
        rel = jnp.tile(rel, (1, g, 1))[:, None]  # [B, 1, g * Tq, Sk]
        row_slope = jnp.repeat(slopes.astype(jnp.float32).reshape(hk, g), q_idx.shape[0], axis=1)
        sc = sc + row_slope[None, :, :, None] * rel
    return jnp.where(visible[:, None], sc, _NEG)


def _alibi(mask: AttentionMask):
    if mask.alibi_slopes is None:
        return None, None, None
    return mask.q_pos, mask.k_pos, mask.alibi_slopes


@register_attention("dense")
@dataclasses.dataclass(frozen=True)
class Dense:
    """Full float32 scores ``[B, Hq, T, S]`` and one softmax: the reference implementation."""

    def __call__(self, q, k, v, mask: AttentionMask, *, scale, layer=None, state=None):
        del layer, state
        b, t, hq, d, s, hk, dv = _check(q, k, v)
        q_pos, k_pos, slopes = _alibi(mask)
        kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
        sc = _masked_scores(
            _to_rows(q, hk), kt, scale, mask.q_offset, jnp.arange(t), jnp.arange(s),
            mask.k_valid, q_pos, k_pos, slopes,
        )  # fmt: skip
        m = jnp.max(sc, axis=-1, keepdims=True)
        p = jnp.exp(sc - m)
        den = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vt, preferred_element_type=jnp.float32)
        return _from_rows((o / den).astype(v.dtype), t)


@register_attention("chunked")
@dataclasses.dataclass(frozen=True)
class Chunked:
    """Online softmax over key blocks (flash-attention style) in plain XLA.

    Queries are processed ``block_q`` at a time (``lax.map``); for each query block a loop
    over key blocks keeps a running max ``m``, normaliser ``l`` and output ``acc`` in float32,
    so peak memory is ``O(B x Hq x block_q x block_k)`` for the scores instead of
    ``O(B x Hq x T x S)``. Equal to :class:`Dense` to float32 rounding.

    Where the time goes (profiled on XLA:CPU for llama-1m, ``D = 16``): the two tile matmuls
    (~half, at close to one core's peak for ``K = 16``), the ``exp`` (~a quarter) and one
    pass per elementwise op over each tile. So the loop does the least elementwise work per
    score: the softmax scale is folded into ``q`` once, key padding is one additive bias row
    built once (not a compare/select per tile), and the causal mask is built only for key
    blocks that straddle a query block's diagonal (a second loop); blocks entirely in the
    causal future are not visited. Small tiles win on CPU because each tile's scores stay in
    L2 between the matmul, the max, the ``exp`` and the second matmul.

    A call whose whole ``T x S`` score matrix is no bigger than one tile (a short input)
    attends to all keys in one pass. A call with few queries (``4 T <= block_q``: a decode
    step) takes them as one query block against key blocks of ``4 x block_k`` slots (the same
    tile size): on XLA:CPU that beat both a single pass over a 2K-slot cache and 64-slot
    blocks. Causal self-attention without a cache (``q_offset`` the Python int 0, ``S == T``:
    a ``forward`` / ``apply_layer`` call) of at most ``row_blocks`` query blocks (``T <=
    2048`` with the defaults; ALiBi allowed) takes the row-block path (:func:`_causal_rows`):
    one (batch row, KV head) at a time, each query block against exactly the keys it sees,
    plain softmax, no rescaling; for OPT-125m's attention (heads of 64) on XLA:CPU, one
    thread, it took 0.41x the time of the paired tiles below, and 0.7-0.9x for llama-1m's
    (heads of 16). Longer such calls without ALiBi, with square blocks (``block_q ==
    block_k``, the default), run the tiles batched: the diagonal tiles in one operation, then
    ``n - 1`` steps that each cover ``n / 2`` tiles below the diagonal, query blocks paired so
    that every step is full (:func:`_causal_pairs`); for llama-1m on XLA:CPU, one thread, a
    whole forward took 0.92x (4 x 512) and 0.84x (1 x 2048) the CPU time of the
    one-block-at-a-time loop, which other calls keep. The memory bound above holds on every
    path (the row-block path's scores are at most ``g x row_blocks x block_q^2`` floats per
    step, ``g = Hq / Hk``).

    Attributes:
      block_q: query rows per block.
      block_k: key slots per block. The defaults (64 x 64) were the fastest on a 2-core
        XLA:CPU for llama-1m at 4 x 512 and 1 x 2048 (256 x 256 took 1.3x the time: its
        tiles spill out of L2).
      row_blocks: the most query blocks an uncached causal call may have to take the
        row-block path (0: never).
    """

    block_q: int = 64
    block_k: int = 64
    row_blocks: int = 32

    def __post_init__(self):
        for f in ("block_q", "block_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{f}: must be a positive integer, got {v!r}")
        v = self.row_blocks
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise UserError(f"row_blocks: must be a non-negative integer, got {v!r}")

    def __call__(self, q, k, v, mask: AttentionMask, *, scale, layer=None, state=None):
        del layer, state
        b, t, hq, d, s, hk, dv = _check(q, k, v)
        g = hq // hk
        # few queries (decode): one query block with 4x longer key blocks (the same tile
        # size); a score matrix within one tile: one pass, no running max
        few = 4 * t <= self.block_q
        single = t * s <= self.block_q * self.block_k
        bq = t if few or single else min(self.block_q, t)
        bk = s if single else min(4 * self.block_k if few else self.block_k, s)
        nq, nk = math.ceil(t / bq), math.ceil(s / bk)
        uncached = isinstance(mask.q_offset, int) and mask.q_offset == 0 and s == t
        if not single and uncached and math.ceil(t / self.block_q) <= self.row_blocks:
            return _causal_rows(q, k, v, mask, scale, self.block_q)
        if not single and uncached and mask.alibi_slopes is None and self.block_q == self.block_k:
            return _causal_pairs(q, k, v, mask.k_valid, scale, self.block_k)
        tp, sp = nq * bq, nk * bk
        q_pos, k_pos, slopes = _alibi(mask)
        f32 = jnp.float32

        def pad(x, n, value=0):
            if x is None or x.shape[1] == n:
                return x
            widths = [(0, 0)] * x.ndim
            widths[1] = (0, n - x.shape[1])
            return jnp.pad(x, widths, constant_values=value)

        # the scale is applied once to q (in float32, then back to q's dtype as the
        # reference's scores would round it), not to every score
        qs = (pad(q, tp).astype(f32) * scale).astype(q.dtype)
        # [nq, B, Hk, g * bq, D]: query blocks, each in the row layout of _to_rows
        qb = jax.vmap(lambda x: _to_rows(x, hk))(jnp.moveaxis(qs.reshape(b, nq, bq, hq, d), 1, 0))
        kb = jnp.transpose(pad(k, sp).reshape(b, nk, bk, hk, d), (1, 0, 3, 2, 4))
        vb = jnp.transpose(pad(v, sp).reshape(b, nk, bk, hk, dv), (1, 0, 3, 2, 4))
        # key padding as an additive bias, built once: [nk, B, 1, 1, bk]
        bias = jnp.where(pad(mask.k_valid, sp, False), 0.0, _NEG).astype(f32)
        bias = jnp.moveaxis(bias.reshape(b, nk, bk), 1, 0)[:, :, None, None, :]
        qpos = None if slopes is None else jnp.moveaxis(pad(q_pos, tp).reshape(b, nq, bq), 1, 0)
        kpos = None if slopes is None else jnp.moveaxis(pad(k_pos, sp).reshape(b, nk, bk), 1, 0)
        row_slope = (
            None
            if slopes is None
            else jnp.repeat(slopes.astype(f32).reshape(hk, g), bq, axis=1)[None, :, :, None]
        )  # [1, Hk, g * bq, 1]
        q_offset = jnp.asarray(mask.q_offset, jnp.int32)
        row_t = jnp.tile(jnp.arange(bq), g)  # [g * bq] query index within the block per row
        rows = g * bq

        def tile(qi, i, j, causal):
            """Scores of query block ``i`` against key block ``j``: [B, Hk, g * bq, bk]."""
            sc = jnp.einsum("bkqd,bksd->bkqs", qi, kb[j], preferred_element_type=f32) + bias[j]
            if slopes is not None:  # ALiBi: slopes[h] * (k_pos - q_pos)
                rel = (kpos[j][:, None, :] - qpos[i][:, :, None]).astype(f32)  # [B, bq, bk]
                sc = sc + row_slope * jnp.tile(rel, (1, g, 1))[:, None]
            if causal:
                slot = j * bk + jnp.arange(bk)
                visible = slot[None, :] <= (q_offset + i * bq + row_t)[:, None]
                sc = jnp.where(visible, sc, _NEG)
            return sc

        def update(carry, sc, vj):
            m, l_, acc = carry
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            corr = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[..., None])
            l_new = l_ * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vj, preferred_element_type=f32)
            return m_new, l_new, acc * corr[..., None] + pv

        def finish(l_, acc):
            out = acc / jnp.maximum(l_, jnp.finfo(f32).tiny)[..., None]
            return _from_rows(out.astype(v.dtype), bq)  # [B, bq, Hq, Dv]

        if single:  # one tile: a plain softmax, no running max
            sc = tile(qb[0], 0, 0, True)
            # the max held at the float32 minimum or above: a row whose padding bias pushed
            # every score to -inf gives 0, not NaN (as the loop's running max does)
            p = jnp.exp(sc - jnp.maximum(jnp.max(sc, axis=-1, keepdims=True), _NEG))
            o = jnp.einsum("bkqs,bksd->bkqd", p.astype(v.dtype), vb[0], preferred_element_type=f32)
            return finish(jnp.sum(p, axis=-1), o)[:, :t]

        def one_q_block(i):
            qi = qb[i]  # [B, Hk, g * bq, D]
            # key blocks [0, n_full) are visible to every row of the block (no causal mask);
            # [n_full, n_vis) straddle its diagonal; later ones are in its future
            n_vis = jnp.clip((q_offset + (i + 1) * bq - 1) // bk + 1, 1, nk)
            n_full = jnp.clip((q_offset + i * bq + 1) // bk, 0, n_vis)

            def body(causal):
                return lambda j, c: update(c, tile(qi, i, j, causal), vb[j])

            init = (
                jnp.full((b, hk, rows), _NEG, f32),
                jnp.zeros((b, hk, rows), f32),
                jnp.zeros((b, hk, rows, dv), f32),
            )
            carry = jax.lax.fori_loop(0, n_full, body(False), init)
            _, l_, acc = jax.lax.fori_loop(n_full, n_vis, body(True), carry)
            return finish(l_, acc)

        if nq == 1:
            o = one_q_block(0)[None]
        else:
            o = jax.lax.map(one_q_block, jnp.arange(nq))  # [nq, B, bq, Hq, Dv]
        return jnp.moveaxis(o, 0, 1).reshape(b, tp, hq, dv)[:, :t]


def _causal_rows(q, k, v, mask: AttentionMask, scale, blk: int):
    """Causal self-attention without a cache offset (``q_offset == 0``, ``S == T``; ALiBi
    allowed) one (batch row, KV head) at a time, each query block against exactly the keys
    it can see, with a plain (not online) softmax.

    A ``lax.map`` runs over the ``B x Hk`` (batch row, KV head) pairs; inside, a static loop
    over the ``ceil(T / blk)`` query blocks takes block ``i``'s ``g x blk`` query rows (the
    ``g`` query heads of the KV head, row ``t * g + j``) against keys ``[0, (i + 1) blk)``:
    one score matmul, one masked max / ``exp`` / sum, one matmul with V. Nothing is rescaled
    (no running max), the causal future is never computed (the work is ``T^2 / 2 + T blk / 2``
    scores), and each step's scores, at most ``g x blk x T`` floats, stay in the core's cache
    between the four passes. The caller takes this path only while ``T <= row_blocks x blk``,
    which bounds those scores (``g x row_blocks x blk^2``: 1 MiB for ``g = 2`` and the
    defaults) and the unrolled program's size.

    On XLA:CPU, one thread, this took 0.41x the paired-tiles path's time for OPT-125m's
    attention (4 x 512, 12 heads of 64) and 0.7-0.9x for llama-1m's (4 x 512 and 1 x 2048,
    8 query / 4 KV heads of 16).
    """
    b, t, hq, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    g, n = hq // hk, b * hk
    f32 = jnp.float32
    q_pos, k_pos, slopes = _alibi(mask)

    def per_pair(x):  # [B, T, Hk, ...] -> [B * Hk, T, ...]
        return jnp.moveaxis(x, 2, 1).reshape(n, t, *x.shape[3:])

    qs = (q.astype(f32) * scale).astype(q.dtype)
    qr = per_pair(qs.reshape(b, t, hk, g, d))  # [B * Hk, T, g, D]
    kr, vr = per_pair(k), per_pair(v)  # [B * Hk, T, D], [B * Hk, T, Dv]
    # key padding joins the causal mask in one select (no additive bias: one that overflowed
    # to -inf would make a row NaN, one that did not could lose to a real key's score)
    valid = jnp.repeat(mask.k_valid.astype(bool), hk, axis=0)  # [B * Hk, S]
    xs = [qr, kr, vr, valid]
    if slopes is not None:
        xs += [
            jnp.repeat(q_pos.astype(f32), hk, axis=0),  # [B * Hk, T]
            jnp.repeat(k_pos.astype(f32), hk, axis=0),  # [B * Hk, S]
            jnp.tile(slopes.astype(f32).reshape(hk, g), (b, 1)),  # [B * Hk, g]
        ]
    nq = math.ceil(t / blk)

    def one(x):
        qn, kn, vn, ok = x[:4]
        outs = []
        for i in range(nq):
            lo, hi = i * blk, min((i + 1) * blk, t)
            rows = (hi - lo) * g
            qi = qn[lo:hi].reshape(rows, d)
            sc = jnp.dot(qi, kn[:hi].T, preferred_element_type=f32)
            row_t = lo + jnp.arange(rows) // g
            if slopes is not None:  # ALiBi: slopes[h] * (k_pos - q_pos)
                qp, kp, sl = x[4:]
                rel = kp[None, :hi] - qp[lo:hi][:, None]  # [blk, hi]
                sc = sc + (sl[None, :, None] * rel[:, None, :]).reshape(rows, hi)
            visible = (jnp.arange(hi)[None, :] <= row_t[:, None]) & ok[None, :hi]
            sc = jnp.where(visible, sc, _NEG)
            p = jnp.exp(sc - jnp.max(sc, axis=-1, keepdims=True))
            o = jnp.dot(p.astype(v.dtype), vn[:hi], preferred_element_type=f32)
            o = o / jnp.maximum(jnp.sum(p, axis=-1), jnp.finfo(f32).tiny)[:, None]
            outs.append(o.reshape(hi - lo, g, dv))
        return jnp.concatenate(outs, axis=0).astype(v.dtype)  # [T, g, Dv]

    o = jax.lax.map(one, xs)  # [B * Hk, T, g, Dv]
    return jnp.moveaxis(o.reshape(b, hk, t, g, dv), 1, 2).reshape(b, t, hq, dv)


def _causal_pairs(q, k, v, k_valid, scale, blk: int):
    """Causal self-attention without a cache offset (``q_offset == 0``, ``S == T``, no ALiBi)
    in square ``blk`` tiles, many tiles per operation.

    The ``n`` diagonal tiles (the only ones that need the causal mask) run first, all in one
    batched softmax; it gives each query block its starting ``(m, l, acc)``. The
    ``n (n - 1) / 2`` tiles below the diagonal then run in ``n - 1`` steps of ``n / 2`` tiles
    each: query block ``p`` (``p`` key blocks to visit) is paired with block ``n - 1 - p``
    (``n - 1 - p`` key blocks), so every pair has exactly ``n - 1`` tiles and no step does
    padding work. With the blocks stored in the order ``[0, 1, .., n/2 - 1, n - 1, n - 2, ..,
    n/2]``, the blocks one step works on are one contiguous window of ``n / 2`` positions
    starting at ``min(s + 1, n / 2)`` (read and written with dynamic slices): at step ``s``
    the first members still running read key block ``s``, and the second member at position
    ``r`` (pair ``r - n/2``) reads key block ``s - r + n/2``.

    Compared with one query block at a time, each operation covers ``n / 2`` tiles: the
    per-operation cost of XLA:CPU's loop (a dozen small kernels per tile) is paid ``n`` times
    instead of ``n^2 / 2`` times, and each operation is large enough to be split across
    threads. Memory stays ``O(T x blk)`` per batch row and head. Key padding is an extra
    contraction column (ones in ``q``, the bias in ``k``) instead of a pass over the scores.
    """
    b, t, hq, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    g = hq // hk
    f32 = jnp.float32
    n = math.ceil(t / blk)
    n += n % 2  # an even number of blocks (an extra all-padding block if needed)
    tp, h = n * blk, n // 2

    def pad(x, value=0):
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, tp - x.shape[1])
        return jnp.pad(x, widths, constant_values=value) if tp != x.shape[1] else x

    # key padding rides in the score matmul: q gains a column of ones and k a column holding
    # 0 (real key) or a large negative bias (padding), so no pass over the scores adds it
    neg = max(-1e30, float(jnp.finfo(k.dtype).min) / 2)
    qs = (pad(q).astype(f32) * scale).astype(q.dtype)
    qs = jnp.concatenate([qs, jnp.ones((b, tp, hq, 1), q.dtype)], axis=-1)
    bias = jnp.where(pad(k_valid, False), 0.0, neg).astype(k.dtype)
    ks = jnp.concatenate([pad(k), jnp.broadcast_to(bias[:, :, None, None], (b, tp, hk, 1))], -1)
    # [n, B, Hk, g * blk, D + 1]: query blocks in the row layout of _to_rows
    qb = jax.vmap(lambda x: _to_rows(x, hk))(jnp.moveaxis(qs.reshape(b, n, blk, hq, -1), 1, 0))
    kb = jnp.transpose(ks.reshape(b, n, blk, hk, d + 1), (1, 0, 3, 2, 4))  # [n, B, Hk, blk, D+1]
    vb = jnp.transpose(pad(v).reshape(b, n, blk, hk, dv), (1, 0, 3, 2, 4))

    # the diagonal tiles: one batched, causally masked softmax
    local = jnp.arange(blk)
    causal = local[None, :] <= jnp.tile(local, g)[:, None]  # [g * blk, blk]
    sc = jnp.einsum("nbkqd,nbksd->nbkqs", qb, kb, preferred_element_type=f32)
    sc = jnp.where(causal, sc, _NEG)
    m = jnp.max(sc, axis=-1)
    p = jnp.exp(sc - m[..., None])
    l_ = jnp.sum(p, axis=-1)
    acc = jnp.einsum("nbkqs,nbksd->nbkqd", p.astype(v.dtype), vb, preferred_element_type=f32)

    # pair order: [0, .., h - 1, n - 1, .., h]
    order = np.concatenate([np.arange(h), np.arange(n - 1, h - 1, -1)])
    qo = qb[order]
    w = jnp.arange(h)

    def step(s, carry):
        start = jnp.minimum(s + 1, h)  # first active position (first members finish by h - 1)
        m, l_, acc = (jax.lax.dynamic_slice_in_dim(x, start, h, 0) for x in carry)
        r = start + w  # positions of the window; second member of row r - h is at key s - (r - h)
        j = jnp.where(r < h, s, s - r + h)  # key block of each window position
        qi = jax.lax.dynamic_slice_in_dim(qo, start, h, 0)
        sc = jnp.einsum("nbkqd,nbksd->nbkqs", qi, kb[j], preferred_element_type=f32)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new[..., None])
        l_new = l_ * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("nbkqs,nbksd->nbkqd", p.astype(v.dtype), vb[j], preferred_element_type=f32)
        new = (m_new, l_new, acc * corr[..., None] + pv)
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(x, y, start, 0)
            for x, y in zip(carry, new, strict=True)
        )

    _, l_, acc = jax.lax.fori_loop(0, n - 1, step, (m[order], l_[order], acc[order]))
    out = acc / jnp.maximum(l_, jnp.finfo(f32).tiny)[..., None]
    out = out[np.argsort(order)].astype(v.dtype)  # natural block order
    out = jax.vmap(lambda x: _from_rows(x, blk))(out)  # [n, B, blk, Hq, Dv]
    return jnp.moveaxis(out, 0, 1).reshape(b, tp, hq, dv)[:, :t]
