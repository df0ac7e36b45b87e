"""SpargeAttn block selection and block-sparse attention math (pure ``jnp``, jit-able).

Everything here works on one attention call: ``q [B, T, Hq, D]``, ``k, v [B, S, Hk, D]``
(GQA: query head ``h`` reads KV head ``h // (Hq // Hk)``; K/V are never repeated over the
query heads, queries are grouped instead), with thresholds as traced per-query-head arrays
``[Hq]``. Keys are cut into blocks of ``block_k`` slots (the last one padded and masked).

Selection (which key blocks a query attends to) is a boolean ``keep [B, Hq, T, nK]`` per
query *row*; the compute paths skip a (query block, key block) tile when no row of the query
block keeps it, and mask the rest element-wise. Two selection modes:

* ``causal=True`` (causal LMs, the decoder seam): **token-causal selection**. Upstream
  (thu-ml/SpargeAttn) pools queries over a whole query block and centres keys by the mean of
  K over the whole sequence, so a query's selection depends on later tokens (a leak in a
  causal LM, and prefill != decode). Here the pooled query of row ``t`` is ``q_t`` itself
  (pooling over later queries would leak; pooling over earlier queries is impossible at
  decode, where the cache holds K/V only), and key block ``j`` is centred, for its
  self-similarity gate, by the mean of the valid keys in blocks ``0..j`` (available as soon
  as block ``j`` is complete). Only key blocks lying entirely before the block that holds
  the query's own slot take part in the pooled-score softmax; that block ("diagonal") and
  block 0 (attention sink) are always kept. So row ``t``'s output depends on tokens ``<= t``
  only, and a decode step reproduces the prefill row exactly. The query self-similarity gate
  has no meaning for a single token (its similarity is 1) and is not applied in this mode.
  Note that the centring only matters for the gate: the pooled scores of one row are all
  shifted by the same ``q . mu`` under a constant centre, which the softmax ignores.
* ``causal=False`` (encoders; :func:`jcompress.sparge.attention` with ``causal=False``):
  upstream's block selection: pooled query per ``block_q`` rows with the query gate, keys
  centred by their whole-sequence mean for the key gate.

Per block, self-similarity is the mean cosine similarity of the block's (valid) tokens to
each other, diagonal included: ``|sum_i x_i / |x_i||^2 / n^2``. Blocks at or below
``simthreshd1`` are not compressible: their rows keep every key block, their key columns are
kept for every row (upstream's rule). Among the remaining candidates the pooled scores
``q_bar . k_bar * scale`` are soft-maxed per row, sorted, and the fewest blocks whose
cumulative mass reaches ``cdfthreshd`` are kept (at least one; ``cdfthreshd >= 1`` keeps all).

ALiBi (MPT; ``alibi_slopes``, ``q_pos``, ``k_pos`` given): the bias enters everything that
decides or computes attention. The element scores carry ``slopes[h] * (k_pos - q_pos)`` (so
the PV-skip block maxima do too), and the bias **does enter the pooled block scores**: block
``j``'s pooled score is ``q_bar . k_bar_j * scale + slopes[h] * (pos_bar_j - q_pos)`` with
``pos_bar_j`` the mean position of its valid keys. Because the bias is linear in the key
position, this is exactly the mean over the block's keys of the true (biased) score, just as
``q . k_bar`` is the mean of the unbiased ones; leaving it out would rank a far block as
highly as a near one with similar keys, while a steep-slope head attends mostly locally (its
far blocks carry ``~exp(-slope * distance)`` of the mass), so the cdf would keep the wrong
blocks. The self-similarity gate looks at keys (and queries) only and has no bias. The tuner
(:mod:`jcompress.sparge.tune`) evaluates candidates with this same biased selection against
the biased dense reference.

PV skip (``pvthreshd``, natural-log units of the scaled scores): key blocks are visited in
ascending order with an online softmax; for a row whose running maximum before block ``j``
is ``m`` and whose maximum score inside block ``j`` is ``m_j < m - pvthreshd``, every
probability of the block is below ``exp(-pvthreshd)`` times the current leading one, and the
``P V`` product of that row and block is skipped (its probabilities still enter the
normaliser). This is upstream's rule per row (upstream decides per warp of rows and works in
log2 units); ``pvthreshd = inf`` never skips. :func:`masked_attention` evaluates the same
rule in closed form (exclusive running max over blocks), which is what the tuner uses.

References: Zhang et al., "SpargeAttn: Accurate Sparse Attention Accelerating Any Model
Inference", ICML 2025 (arXiv:2502.18137); Dao et al., "FlashAttention" (2022).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Selection",
    "gathered_attention",
    "key_block_stats",
    "masked_attention",
    "select",
    "tiles_from_rows",
]

_NEG = float(jnp.finfo(jnp.float32).min)
_EPS = 1e-12


def _pad_axis(x: jax.Array, n: int, axis: int, value: Any = 0) -> jax.Array:
    if x.shape[axis] == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _group(q: jax.Array, hk: int) -> jax.Array:
    """``[B, T, Hq, D] -> [B, Hk, g, T, D]`` (query heads grouped by their KV head)."""
    b, t, hq, d = q.shape
    return jnp.transpose(q.reshape(b, t, hk, hq // hk, d), (0, 2, 3, 1, 4))


def _self_similarity(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean cosine similarity of the valid rows of ``x [..., n, D]`` (``valid [..., n]``),
    diagonal included; 0 for an empty block."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    unit = jnp.where(valid[..., None] & (norm > _EPS), x / jnp.maximum(norm, _EPS), 0.0)
    tot = jnp.sum(unit, axis=-2)
    n = jnp.sum(valid, axis=-1).astype(jnp.float32)
    return jnp.sum(tot * tot, axis=-1) / jnp.maximum(n * n, 1.0)


class KeyBlocks(NamedTuple):
    """Per key block statistics.

    Attributes:
      pooled: ``[B, Hk, nK, D]`` float32 mean of the block's valid keys.
      sim: ``[B, Hk, nK]`` self-similarity of the centred keys.
      count: ``[B, nK]`` number of valid keys in the block.
      pos: ``[B, nK]`` float32 mean position (``k_pos``) of the valid keys (ALiBi), or None.
    """

    pooled: jax.Array
    sim: jax.Array
    count: jax.Array
    pos: jax.Array | None


def key_block_stats(
    k: jax.Array,  # [B, S, Hk, D]
    k_valid: jax.Array,  # [B, S] bool
    block_k: int,
    *,
    causal: bool,
    k_pos: jax.Array | None = None,  # [B, S]
) -> KeyBlocks:
    """Pooled keys and the self-similarity gate's input per key block.

    Causal: block ``j`` is centred by the mean of the valid keys of blocks ``0..j`` (no key
    after block ``j`` is read); otherwise by the whole-sequence mean (upstream)."""
    b, s, hk, d = k.shape
    nk = math.ceil(s / block_k)
    sp = nk * block_k
    kf = _pad_axis(k.astype(jnp.float32), sp, 1).reshape(b, nk, block_k, hk, d)
    valid = _pad_axis(k_valid.astype(bool), sp, 1, False).reshape(b, nk, block_k)
    kf = jnp.where(valid[..., None, None], kf, 0.0)
    count = jnp.sum(valid, axis=-1)  # [B, nK]
    block_sum = jnp.sum(kf, axis=2)  # [B, nK, Hk, D]
    pooled = block_sum / jnp.maximum(count, 1)[..., None, None].astype(jnp.float32)
    if causal:
        csum = jnp.cumsum(block_sum, axis=1)
        ccount = jnp.cumsum(count, axis=1)
    else:
        csum = jnp.broadcast_to(jnp.sum(block_sum, axis=1, keepdims=True), block_sum.shape)
        ccount = jnp.broadcast_to(jnp.sum(count, axis=1, keepdims=True), count.shape)
    mu = csum / jnp.maximum(ccount, 1)[..., None, None].astype(jnp.float32)  # [B, nK, Hk, D]
    centred = kf - mu[:, :, None]
    sim = _self_similarity(jnp.moveaxis(centred, 3, 1), valid[:, None])  # [B, Hk, nK]
    pos = None
    if k_pos is not None:
        kp = _pad_axis(k_pos.astype(jnp.float32), sp, 1).reshape(b, nk, block_k)
        pos = jnp.sum(jnp.where(valid, kp, 0.0), -1) / jnp.maximum(count, 1).astype(jnp.float32)
    return KeyBlocks(jnp.moveaxis(pooled, 2, 1), sim, count, pos)


def _cdf_keep(
    z: jax.Array,  # [..., nK] pooled scores
    cand: jax.Array,  # [..., nK] bool candidates
    cdf: jax.Array,  # broadcastable to z[..., :1]: per-row threshold
) -> jax.Array:
    """Keep the fewest candidates whose softmax mass reaches ``cdf`` (at least one; all of
    them when ``cdf >= 1``)."""
    zc = jnp.where(cand, z, -jnp.inf)
    zmax = jnp.max(zc, axis=-1, keepdims=True)
    e = jnp.where(cand, jnp.exp(zc - jnp.where(jnp.isfinite(zmax), zmax, 0.0)), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), _EPS)
    order = jnp.argsort(-jnp.where(cand, p, -1.0), axis=-1, stable=True)
    sorted_p = jnp.take_along_axis(p, order, axis=-1)
    cum = jnp.cumsum(sorted_p, axis=-1)
    n_cand = jnp.sum(cand, axis=-1, keepdims=True)
    n = 1 + jnp.sum((cum < cdf) & (jnp.arange(z.shape[-1]) < n_cand), axis=-1, keepdims=True)
    n = jnp.where(cdf >= 1.0, n_cand, jnp.minimum(n, n_cand))
    rank = jnp.argsort(order, axis=-1)  # rank of each block in descending probability
    return cand & (rank < n)


class Selection(NamedTuple):
    """Output of :func:`select`.

    Attributes:
      keep: ``[B, Hq, T, nK]`` bool, key blocks each query row attends to.
      visible: ``[B, Hq, T, nK]`` bool, key blocks holding a key the row may see (the
        denominator of the kept fraction).
      q_valid: ``[B, T]`` bool, rows that are real queries (statistics only).
    """

    keep: jax.Array
    visible: jax.Array
    q_valid: jax.Array


def select(
    q: jax.Array,  # [B, T, Hq, D]
    k: jax.Array,  # [B, S, Hk, D]
    simthreshd1: jax.Array,  # [Hq]
    cdfthreshd: jax.Array,  # [Hq]
    *,
    block_q: int,
    block_k: int,
    causal: bool,
    scale: Any,
    k_valid: jax.Array | None = None,  # [B, S]
    q_offset: Any = 0,
    q_pos: jax.Array | None = None,  # [B, T] (ALiBi)
    k_pos: jax.Array | None = None,  # [B, S] (ALiBi)
    alibi_slopes: jax.Array | None = None,  # [Hq]
) -> Selection:
    """Which key blocks each query row keeps (see the module docstring for the rules)."""
    b, t, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    g = hq // hk
    nk = math.ceil(s / block_k)
    if k_valid is None:
        k_valid = jnp.ones((b, s), bool)
    k_valid = k_valid.astype(bool)
    alibi = alibi_slopes is not None
    kb = key_block_stats(k, k_valid, block_k, causal=causal, k_pos=k_pos if alibi else None)
    sim_thr = jnp.asarray(simthreshd1, jnp.float32).reshape(hk, g)
    cdf_thr = jnp.asarray(cdfthreshd, jnp.float32).reshape(hk, g)
    k_similar = kb.sim[:, :, None, :] > sim_thr[None, :, :, None]  # [B, Hk, g, nK]
    has_keys = (kb.count > 0)[:, None, None, :]  # [B, 1, 1, nK]
    j = jnp.arange(nk)
    qg = _group(q, hk).astype(jnp.float32)  # [B, Hk, g, T, D]
    q_offset = jnp.asarray(q_offset, jnp.int32)

    if causal:
        slot = q_offset + jnp.arange(t)  # [T] cache slot of each query
        diag = (j * block_k <= slot[:, None]) & (slot[:, None] < (j + 1) * block_k)  # own
        full = (((j + 1) * block_k - 1)[None, :] <= slot[:, None]) & ~diag  # [T, nK] before
        z = jnp.einsum("bkgtd,bknd->bkgtn", qg, kb.pooled) * scale
        if alibi:
            slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(hk, g)
            rel = kb.pos[:, None, :] - q_pos.astype(jnp.float32)[:, :, None]  # [B, T, nK]
            z = z + slopes[None, :, :, None, None] * rel[:, None, None]
        cand = full[None, None, None] & has_keys[..., None, :] & k_similar[:, :, :, None, :]
        kept = _cdf_keep(z, cand, cdf_thr[None, :, :, None, None])
        forced = (
            (j == 0)[None, :] | diag  # sink + the block holding the query's own slot
        )[None, None, None] | (full[None, None, None] & ~k_similar[:, :, :, None, :])
        visible = (full | diag)[None, None, None] & has_keys[..., None, :]
        keep = (kept | forced) & visible
        safe = jnp.clip(slot, 0, s - 1)
        q_valid = k_valid[:, safe] & (slot < s)[None]
    else:
        nq = math.ceil(t / block_q)
        tp = nq * block_q
        rows = (jnp.arange(tp) < t).reshape(nq, block_q)
        qb = _pad_axis(qg, tp, 3).reshape(b, hk, g, nq, block_q, d)
        cnt = jnp.sum(rows, axis=-1).astype(jnp.float32)  # [nQ]
        pooled_q = jnp.sum(qb, axis=4) / jnp.maximum(cnt, 1.0)[:, None]  # [B, Hk, g, nQ, D]
        q_sim = _self_similarity(qb, rows)  # [B, Hk, g, nQ]
        q_similar = q_sim > sim_thr[None, :, :, None]
        z = jnp.einsum("bkgqd,bknd->bkgqn", pooled_q, kb.pooled) * scale
        if alibi:
            slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(hk, g)
            qp = _pad_axis(q_pos.astype(jnp.float32), tp, 1).reshape(b, nq, block_q)
            qpos = jnp.sum(jnp.where(rows, qp, 0.0), -1) / jnp.maximum(cnt, 1.0)
            rel = kb.pos[:, None, :] - qpos[:, :, None]  # [B, nQ, nK]
            z = z + slopes[None, :, :, None, None] * rel[:, None, None]
        cand = has_keys[..., None, :] & k_similar[:, :, :, None, :]
        kept = _cdf_keep(z, cand, cdf_thr[None, :, :, None, None])
        forced = (
            (~q_similar)[..., None] | (~k_similar)[:, :, :, None, :] | (j == 0)[None, None, None]
        )
        keep_blocks = (kept | forced) & has_keys[..., None, :]  # [B, Hk, g, nQ, nK]
        keep = jnp.repeat(keep_blocks, block_q, axis=3)[:, :, :, :t]
        visible = jnp.broadcast_to(has_keys[..., None, :], keep.shape)
        q_valid = jnp.ones((b, t), bool)
    shape = (b, hq, t, nk)
    keep = jnp.broadcast_to(keep, (b, hk, g, t, nk)).reshape(shape)
    visible = jnp.broadcast_to(visible, (b, hk, g, t, nk)).reshape(shape)
    return Selection(keep, visible, q_valid)


def tiles_from_rows(keep: jax.Array, block_q: int) -> jax.Array:
    """``keep [B, Hq, T, nK] -> [B, Hq, nQ, nK]``: a tile is computed when any of its rows
    keeps the key block."""
    b, h, t, nk = keep.shape
    nq = math.ceil(t / block_q)
    kp = _pad_axis(keep, nq * block_q, 2, False)
    return jnp.any(kp.reshape(b, h, nq, block_q, nk), axis=3)


def _element_visible(t: int, s: int, q_offset: Any, k_valid: jax.Array, causal: bool):
    """``[B, T, S]`` bool: causal slot rule (when ``causal``) and key validity."""
    vis = k_valid.astype(bool)[:, None, :]
    if causal:
        q_offset = jnp.asarray(q_offset, jnp.int32)
        vis = vis & (jnp.arange(s)[None, :] <= (q_offset + jnp.arange(t))[:, None])[None]
    return vis


def masked_attention(
    q: jax.Array,  # [B, T, Hq, D]
    k: jax.Array,  # [B, S, Hk, D]
    v: jax.Array,  # [B, S, Hk, Dv]
    keep: jax.Array,  # [B, Hq, T, nK] bool
    pvthreshd: jax.Array,  # [Hq]
    *,
    block_k: int,
    causal: bool,
    scale: Any,
    k_valid: jax.Array | None = None,  # [B, S]
    q_offset: Any = 0,
    q_pos: jax.Array | None = None,
    k_pos: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense attention under the block mask ``keep`` with the PV skip in closed form.

    The reference for the block-sparse paths (and what the tuner evaluates): full float32
    scores ``[B, Hq, T, S]``, so use it on short sequences. Returns ``(out [B, T, Hq, Dv]``
    in ``v``'s dtype, ``skipped [B, Hq, T, nK]`` bool: the (row, block) pairs whose PV
    product is skipped)."""
    b, t, hq, d = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    nk = keep.shape[-1]
    sp = nk * block_k
    if k_valid is None:
        k_valid = jnp.ones((b, s), bool)
    qg = _group(q, hk)
    sc = jnp.einsum("bkgtd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if alibi_slopes is not None:
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).astype(jnp.float32)  # [B, T, S]
        slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(hk, g)
        sc = sc + slopes[None, :, :, None, None] * rel[:, None, None]
    sc = sc.reshape(b, hq, t, s)
    vis = _element_visible(t, s, q_offset, k_valid, causal)[:, None]  # [B, 1, T, S]
    allowed = vis & jnp.repeat(keep, block_k, axis=-1)[..., :s]
    sc = jnp.where(allowed, sc, -jnp.inf)
    blk = _pad_axis(sc, sp, 3, -jnp.inf).reshape(b, hq, t, nk, block_k)
    m_blk = jnp.max(blk, axis=-1)  # [B, Hq, T, nK]
    run = jax.lax.cummax(m_blk, axis=3)
    m_prev = jnp.concatenate([jnp.full_like(run[..., :1], -jnp.inf), run[..., :-1]], axis=3)
    pv = jnp.asarray(pvthreshd, jnp.float32)[None, :, None, None]
    skipped = (
        keep & jnp.isfinite(m_blk) & jnp.isfinite(m_prev) & (m_blk < m_prev - pv)
    )  # [B, Hq, T, nK]
    m = run[..., -1:]  # [B, Hq, T, 1]
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(sc - m)  # masked entries: exp(-inf) = 0
    den = jnp.sum(p, axis=-1, keepdims=True)
    p_pv = jnp.where(jnp.repeat(skipped, block_k, axis=-1)[..., :s], 0.0, p)
    o = jnp.einsum(
        "bkgts,bskd->bkgtd",
        p_pv.reshape(b, hk, g, t, s).astype(v.dtype),
        v,
        preferred_element_type=jnp.float32,
    )
    o = o / jnp.maximum(den.reshape(b, hk, g, t, 1), jnp.finfo(jnp.float32).tiny)
    out = jnp.transpose(o, (0, 3, 1, 2, 4)).reshape(b, t, hq, dv).astype(v.dtype)
    return out, skipped


def kept_lists(tiles: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``tiles [..., nK]`` bool -> ``(indices [..., nK]`` int32 with the kept blocks first in
    ascending order (the tail repeats the last kept index), ``counts [...]`` int32)."""
    nk = tiles.shape[-1]
    j = jnp.arange(nk, dtype=jnp.int32)
    order = jnp.argsort(jnp.where(tiles, j, nk + j), axis=-1, stable=True).astype(jnp.int32)
    counts = jnp.sum(tiles, axis=-1).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    idx = jnp.where(j < counts[..., None], order, last)
    return idx, counts


def gathered_attention(
    q: jax.Array,  # [B, T, Hq, D]
    k: jax.Array,  # [B, S, Hk, D]
    v: jax.Array,  # [B, S, Hk, Dv]
    keep: jax.Array,  # [B, Hq, T, nK] bool
    pvthreshd: jax.Array,  # [Hq]
    *,
    block_q: int,
    block_k: int,
    causal: bool,
    scale: Any,
    k_valid: jax.Array | None = None,
    q_offset: Any = 0,
    q_pos: jax.Array | None = None,
    k_pos: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse online-softmax attention that reads only the kept K/V blocks (XLA).

    For each query block (``lax.map``) the kept key blocks of every (batch, query head) are
    listed in ascending order; a loop over ``max`` count of the block gathers one K/V block
    per query head (``[B, Hq, block_k, D]``, a tile, never the whole K repeated), computes the
    tile's scores under the element-wise causal / validity / row-selection mask, and updates
    the running max, normaliser and output with the per-row PV skip. Work is proportional to
    the kept tiles. Returns ``(out [B, T, Hq, Dv], skipped_count [B, Hq]``: skipped (row,
    block) pairs)."""
    b, t, hq, d = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    nk = keep.shape[-1]
    bq = min(block_q, t)
    nq = math.ceil(t / bq)
    tp, sp = nq * bq, nk * block_k
    if k_valid is None:
        k_valid = jnp.ones((b, s), bool)
    alibi = alibi_slopes is not None
    q_offset = jnp.asarray(q_offset, jnp.int32)
    qh = jnp.transpose(_pad_axis(q, tp, 1), (0, 2, 1, 3)).reshape(b, hq, nq, bq, d)
    kb = jnp.transpose(_pad_axis(k, sp, 1).reshape(b, nk, block_k, hk, d), (0, 3, 1, 2, 4))
    vb = jnp.transpose(_pad_axis(v, sp, 1).reshape(b, nk, block_k, hk, dv), (0, 3, 1, 2, 4))
    kb = kb.reshape(b, hk * nk, block_k, d)
    vb = vb.reshape(b, hk * nk, block_k, dv)
    validb = _pad_axis(k_valid.astype(bool), sp, 1, False).reshape(b, nk, block_k)
    kposb = None
    if alibi:
        kposb = _pad_axis(k_pos.astype(jnp.float32), sp, 1).reshape(b, nk, block_k)
        qposb = _pad_axis(q_pos.astype(jnp.float32), tp, 1).reshape(b, nq, bq)
        slopes = jnp.asarray(alibi_slopes, jnp.float32)
    keep_p = _pad_axis(keep, tp, 2, False).reshape(b, hq, nq, bq, nk)
    tiles = jnp.any(keep_p, axis=3)  # [B, Hq, nQ, nK]
    idx, counts = kept_lists(tiles)
    kv_head = (jnp.arange(hq) // g).astype(jnp.int32)
    pv = jnp.asarray(pvthreshd, jnp.float32)[None, :, None]
    take = jax.vmap(lambda arr, i: arr[i])  # per batch row: [N, ...][Hq] -> [Hq, ...]

    def one_q_block(i):
        qi = qh[:, :, i]  # [B, Hq, bq, D]
        rows_keep = keep_p[:, :, i]  # [B, Hq, bq, nK]
        idx_i, cnt_i = idx[:, :, i], counts[:, :, i]  # [B, Hq, nK], [B, Hq]
        slot = q_offset + i * bq + jnp.arange(bq)  # [bq]

        def body(c, carry):
            m, l_, acc, nskip = carry
            jb = idx_i[:, :, c]  # [B, Hq]
            flat = kv_head[None, :] * nk + jb
            kt = take(kb, flat)  # [B, Hq, bk, D]
            vt = take(vb, flat)
            sc = jnp.einsum("bhqd,bhkd->bhqk", qi, kt, preferred_element_type=jnp.float32)
            sc = sc * scale
            kslot = jb[..., None] * block_k + jnp.arange(block_k)  # [B, Hq, bk]
            ok = take(validb, jb)  # [B, Hq, bk]
            row_ok = jnp.take_along_axis(rows_keep, jb[:, :, None, None], axis=3)[..., 0]
            row_ok = row_ok & (c < cnt_i)[..., None]  # [B, Hq, bq]
            vis = ok[:, :, None, :] & row_ok[..., None]
            if causal:
                vis = vis & (kslot[:, :, None, :] <= slot[None, None, :, None])
            if alibi:
                kp = take(kposb, jb)  # [B, Hq, bk]
                rel = kp[:, :, None, :] - qposb[:, i][:, None, :, None]
                sc = sc + slopes[None, :, None, None] * rel
            sc = jnp.where(vis, sc, _NEG)
            m_loc = jnp.max(sc, axis=-1)  # [B, Hq, bq]
            m_new = jnp.maximum(m, m_loc)
            live = m_loc > _NEG / 2
            skip = row_ok & live & (m > _NEG / 2) & (m_loc < m - pv)
            corr = jnp.exp(m - m_new)
            p = jnp.exp(sc - m_new[..., None])
            l_new = l_ * corr + jnp.sum(p, axis=-1)
            p_pv = jnp.where(skip[..., None], 0.0, p)
            o = jnp.einsum(
                "bhqk,bhkd->bhqd", p_pv.astype(v.dtype), vt, preferred_element_type=jnp.float32
            )
            return m_new, l_new, acc * corr[..., None] + o, nskip + jnp.sum(skip, axis=-1)

        init = (
            jnp.full((b, hq, bq), _NEG, jnp.float32),
            jnp.zeros((b, hq, bq), jnp.float32),
            jnp.zeros((b, hq, bq, dv), jnp.float32),
            jnp.zeros((b, hq), jnp.int32),
        )
        _, l_, acc, nskip = jax.lax.fori_loop(0, jnp.max(cnt_i), body, init)
        out = acc / jnp.maximum(l_, jnp.finfo(jnp.float32).tiny)[..., None]
        return out.astype(v.dtype), nskip  # [B, Hq, bq, Dv], [B, Hq]

    if nq == 1:
        o, nskip = one_q_block(0)
        o, nskip = o[None], nskip[None]
    else:
        o, nskip = jax.lax.map(one_q_block, jnp.arange(nq))  # [nQ, B, Hq, bq, Dv]
    out = jnp.transpose(o, (1, 0, 3, 2, 4)).reshape(b, tp, hq, dv)[:, :t]
    return out, jnp.sum(nskip, axis=0)
