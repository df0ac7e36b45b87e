"""Block-sparse flash attention driven by kept-block lists (SpargeAttn's compute).

Contract (shared by the Pallas kernel, the XLA fallback and the reference):

* ``q [B, T, Hq, D]``, ``k [B, S, Hk, D]``, ``v [B, S, Hk, Dv]`` (GQA: query head ``h`` reads
  KV head ``h // (Hq // Hk)``; K/V are not repeated in memory).
* ``keep [B, Hq, T, nK]`` bool with ``nK = ceil(S / block_k)``: the key blocks each query row
  attends to (from :func:`jcompress.sparge.select`). A (query block, key block) tile is
  visited when any of its rows keeps the key block; inside it the row selection, the
  element-wise causal mask (key slot ``<= q_offset + t``; diagonal tiles included) and
  ``k_valid`` apply.
* ``pvthreshd [Hq]``: per-row PV skip (see :mod:`jcompress.sparge._core`).
* Returns ``(out [B, T, Hq, Dv]`` in ``v``'s dtype, ``skipped [B, Hq]`` int32: skipped
  (row, key block) PV products).

:func:`reference` is dense attention under the same mask (full scores; the oracle).
:func:`xla_block_sparse` gathers only the kept K/V blocks (work proportional to the kept
tiles, so CPU gets faster with sparsity). :func:`pallas_block_sparse` is the Pallas kernel: one
program per (batch, query head, query block) walks its kept-block list (indices + count) with
an online softmax. :func:`sparse_attention` picks the kernel where :func:`supports` says so,
else the XLA fallback; never an error for a valid input.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jcompress.errors import UserError
from jcompress.sparge import _core

__all__ = [
    "BlockSizes",
    "pallas_block_sparse",
    "reference",
    "sparse_attention",
    "supports",
    "xla_block_sparse",
]

_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes: ``block_q`` query rows x ``block_k`` key slots (upstream: 128 x 64; 32 x 32
    suits short sequences). Lengths that are not multiples are padded and masked."""

    block_q: int = 128
    block_k: int = 64

    def __post_init__(self):
        for f in ("block_q", "block_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 4096:
                raise UserError(f"{f}: must be an integer in [1, 4096], got {v!r}")

    @classmethod
    def get_default(cls) -> BlockSizes:
        return cls()


def reference(q, k, v, keep, pvthreshd, *, block_k, scale, causal=True, k_valid=None,
              q_offset=0, q_pos=None, k_pos=None, alibi_slopes=None):  # fmt: skip
    """Dense attention under ``keep`` with the PV skip in closed form (the oracle)."""
    out, skipped = _core.masked_attention(
        q, k, v, keep, pvthreshd, block_k=block_k, causal=causal, scale=scale, k_valid=k_valid,
        q_offset=q_offset, q_pos=q_pos, k_pos=k_pos, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    return out, jnp.sum(skipped, axis=(2, 3)).astype(jnp.int32)


def xla_block_sparse(q, k, v, keep, pvthreshd, *, block_sizes, scale, causal=True, k_valid=None,
                     q_offset=0, q_pos=None, k_pos=None, alibi_slopes=None):  # fmt: skip
    """The XLA fallback: online softmax over the gathered kept K/V blocks."""
    return _core.gathered_attention(
        q, k, v, keep, pvthreshd, block_q=block_sizes.block_q, block_k=block_sizes.block_k,
        causal=causal, scale=scale, k_valid=k_valid, q_offset=q_offset, q_pos=q_pos,
        k_pos=k_pos, alibi_slopes=alibi_slopes,
    )  # fmt: skip


def supports(q, k, v, *, block_sizes: BlockSizes, interpret: bool = False,
             alibi: bool = False) -> bool:  # fmt: skip
    """Whether :func:`pallas_block_sparse` runs here: in interpret mode always (no ALiBi);
    compiled only on a GPU (Pallas Triton) with power-of-two tiles and head dims >= 16."""
    if alibi:
        return False
    if interpret:
        return True
    if jax.default_backend() != "gpu":
        return False
    return triton_shapes_ok(q.shape[-1], v.shape[-1], q.shape[1], k.shape[1], block_sizes)


def triton_shapes_ok(d: int, dv: int, t: int, s: int, block_sizes: BlockSizes) -> bool:
    """Pallas Triton loads and stores only power-of-two shaped blocks: the tiles and head dims
    (>= 16 for its dot), and the whole-row blocks the kernel reads per (batch, head, query
    block): the padded key length ``Sp`` (K, V, key validity) and the number of key blocks
    ``nK`` (the kept-block indices, the row selection). Other shapes take the XLA path."""
    bq, bk = min(block_sizes.block_q, t), block_sizes.block_k
    nk = -(-s // bk)

    def p2(n, least=1):
        return n >= least and n & (n - 1) == 0

    return all(p2(n, 16) for n in (d, dv, bq, bk)) and p2(nk)  # so Sp = nK * bk too


def _kernel(
    cnt_ref,  # [1] kept blocks of this (b, h, i)
    idx_ref,  # [nK] kept key block indices, ascending
    off_ref,  # [1] int32 q_offset
    scale_ref,  # [1] float32
    pv_ref,  # [1] float32 pvthreshd of this head
    q_ref,  # [bq, D]
    k_ref,  # [Sp, D] this KV head
    v_ref,  # [Sp, Dv]
    valid_ref,  # [Sp] int32 key validity
    rows_ref,  # [bq, nK] int32 row selection
    o_ref,  # [bq, Dv]
    skip_ref,  # [bq] int32 skipped blocks per row
    *,
    block_q: int,
    block_k: int,
    causal: bool,
):
    i = pl.program_id(2)
    q = q_ref[...].astype(jnp.float32)
    scale = scale_ref[0]
    pv = pv_ref[0]
    slot = off_ref[0] + i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    bq, dv = o_ref.shape

    def body(c, carry):
        m, l_, acc, nskip = carry
        j = idx_ref[c]
        start = pl.multiple_of(j * block_k, block_k)
        kt = k_ref[pl.ds(start, block_k), :].astype(jnp.float32)
        vt = v_ref[pl.ds(start, block_k), :]
        ok = valid_ref[pl.ds(start, block_k)] > 0  # [bk]
        row_ok = rows_ref[:, pl.ds(j, 1)] > 0  # [bq, 1]
        sc = jax.lax.dot_general(q, kt, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # fmt: skip
        vis = ok[None, :] & row_ok
        if causal:
            kslot = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            vis = vis & (kslot <= slot)
        sc = jnp.where(vis, sc, _NEG)
        m_loc = jnp.max(sc, axis=1, keepdims=True)  # [bq, 1]
        m_new = jnp.maximum(m, m_loc)
        skip = row_ok & (m_loc > _NEG / 2) & (m > _NEG / 2) & (m_loc < m - pv)
        corr = jnp.exp(m - m_new)
        p = jnp.exp(sc - m_new)
        l_new = l_ * corr + jnp.sum(p, axis=1, keepdims=True)
        p_pv = jnp.where(skip, 0.0, p)
        o = jax.lax.dot_general(p_pv.astype(vt.dtype), vt, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)  # fmt: skip
        return m_new, l_new, acc * corr + o, nskip + skip.astype(jnp.int32)

    init = (
        jnp.full((bq, 1), _NEG, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, dv), jnp.float32),
        jnp.zeros((bq, 1), jnp.int32),
    )
    _, l_, acc, nskip = jax.lax.fori_loop(0, cnt_ref[0], body, init)
    o_ref[...] = (acc / jnp.maximum(l_, jnp.finfo(jnp.float32).tiny)).astype(o_ref.dtype)
    skip_ref[...] = nskip[:, 0]


@functools.partial(jax.jit, static_argnames=("block_sizes", "causal", "interpret"))
def pallas_block_sparse(q, k, v, keep, pvthreshd, *, block_sizes, scale, causal=True,
                        k_valid=None, q_offset=0, interpret=False):  # fmt: skip
    """The Pallas kernel (no ALiBi; see :func:`supports`). Grid ``(B, Hq, nQ)``; each program
    loads its query tile and walks the kept key blocks of its list."""
    b, t, hq, d = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    nk = keep.shape[-1]
    bq, bk = min(block_sizes.block_q, t), block_sizes.block_k
    nq = math.ceil(t / bq)
    tp, sp = nq * bq, nk * bk
    if k_valid is None:
        k_valid = jnp.ones((b, s), bool)
    qh = jnp.transpose(_core._pad_axis(q, tp, 1), (0, 2, 1, 3))  # [B, Hq, Tp, D]
    kh = jnp.transpose(_core._pad_axis(k, sp, 1), (0, 2, 1, 3))  # [B, Hk, Sp, D]
    vh = jnp.transpose(_core._pad_axis(v, sp, 1), (0, 2, 1, 3))  # [B, Hk, Sp, Dv]
    valid = _core._pad_axis(k_valid.astype(jnp.int32), sp, 1, 0)  # [B, Sp]
    rows = _core._pad_axis(keep, tp, 2, False)  # [B, Hq, Tp, nK]
    tiles = jnp.any(rows.reshape(b, hq, nq, bq, nk), axis=3)
    idx, counts = _core.kept_lists(tiles)  # [B, Hq, nQ, nK], [B, Hq, nQ]
    rows = rows.astype(jnp.int32)
    off = jnp.asarray(q_offset, jnp.int32).reshape(1)
    sc = jnp.asarray(scale, jnp.float32).reshape(1)
    pv = jnp.broadcast_to(jnp.asarray(pvthreshd, jnp.float32), (hq,))
    kernel = functools.partial(_kernel, block_q=bq, block_k=bk, causal=causal)
    out, skip = pl.pallas_call(
        kernel,
        grid=(b, hq, nq),
        in_specs=[
            pl.BlockSpec((None, None, None, 1), lambda bi, h, i: (bi, h, i, 0)),  # counts
            pl.BlockSpec((None, None, None, nk), lambda bi, h, i: (bi, h, i, 0)),  # idx
            pl.BlockSpec((1,), lambda bi, h, i: (0,)),  # q_offset
            pl.BlockSpec((1,), lambda bi, h, i: (0,)),  # scale
            pl.BlockSpec((1,), lambda bi, h, i: (h,)),  # pvthreshd
            pl.BlockSpec((None, None, bq, d), lambda bi, h, i: (bi, h, i, 0)),  # q
            pl.BlockSpec((None, None, sp, d), lambda bi, h, i: (bi, h // g, 0, 0)),  # k
            pl.BlockSpec((None, None, sp, dv), lambda bi, h, i: (bi, h // g, 0, 0)),  # v
            pl.BlockSpec((None, sp), lambda bi, h, i: (bi, 0)),  # k_valid
            pl.BlockSpec((None, None, bq, nk), lambda bi, h, i: (bi, h, i, 0)),  # rows
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), lambda bi, h, i: (bi, h, i, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, h, i: (bi, h, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hq, tp, dv), v.dtype),
            jax.ShapeDtypeStruct((b, hq, tp), jnp.int32),
        ],
        interpret=interpret,
    )(counts[..., None], idx, off, sc, pv, qh, kh, vh, valid, rows)
    return jnp.transpose(out, (0, 2, 1, 3))[:, :t], jnp.sum(skip, axis=-1)


@functools.partial(
    jax.jit, static_argnames=("block_sizes", "causal", "implementation", "interpret")
)
def sparse_attention(q, k, v, keep, pvthreshd, *, block_sizes=None, scale=None, causal=True,
                     k_valid=None, q_offset=0, q_pos=None, k_pos=None, alibi_slopes=None,
                     implementation=None, interpret=False):  # fmt: skip
    """Block-sparse attention with kernel dispatch.

    Args:
      implementation: ``None``/``"auto"`` (the Pallas kernel where :func:`supports`, else
        the XLA fallback), ``"pallas"`` (the kernel; falls back when unsupported),
        ``"xla"`` or ``"reference"``.
      interpret: run the Pallas kernel in interpret mode (CPU tests).
    """
    block_sizes = block_sizes or BlockSizes.get_default()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = implementation or "auto"
    if impl not in ("auto", "pallas", "xla", "reference"):
        raise UserError(f"implementation: {impl!r} is not one of auto, pallas, xla, reference")
    pvthreshd = jnp.broadcast_to(jnp.asarray(pvthreshd, jnp.float32), (q.shape[2],))
    kw = dict(scale=scale, causal=causal, k_valid=k_valid, q_offset=q_offset)
    alibi = dict(q_pos=q_pos, k_pos=k_pos, alibi_slopes=alibi_slopes)
    if impl == "reference":
        return reference(q, k, v, keep, pvthreshd, block_k=block_sizes.block_k, **kw, **alibi)
    if impl in ("auto", "pallas") and supports(
        q, k, v, block_sizes=block_sizes, interpret=interpret, alibi=alibi_slopes is not None
    ):
        return pallas_block_sparse(
            q, k, v, keep, pvthreshd, block_sizes=block_sizes, interpret=interpret, **kw
        )
    return xla_block_sparse(q, k, v, keep, pvthreshd, block_sizes=block_sizes, **kw, **alibi)
