"""EigenAttention as a pure transform of a param pytree.

Protocol (the reference's, layer by layer; see ``eigen_core`` for the math):

1. Calibration windows ``[n, T]`` are embedded; layer ``i`` runs on its inputs with the k/q/v
   projection outputs captured. Features of ``avg_dim`` consecutive windows are averaged
   position by position; per-head Gram matrices of the averaged features accumulate as
   batches stream through (nothing else is stored). The next layer's inputs are the
   *uncompressed* layer's outputs. The stream, the padding of the last batch and the
   offloading are :mod:`jcompress.calibration`'s (``stream_layers`` with ``Feed.ORIGINAL``);
   the grouped Gram step is :class:`jcompress.calibration.GroupedGram` (one jit call per
   batch); candidate errors use ``StreamLayer.relative_error`` (sums on device).
2. Per head, the basis is the eigendecomposition of the Gram matrix (== SVD of the stacked
   features). OPT / MPT / GPT-2: K and Q share one basis per head (stacked K and Q features);
   V has its own. Llama / Qwen (RoPE, GQA): one K basis per *KV head*, shared by the query
   heads of its group, from the pre-RoPE K features; Q stays dense; V per KV head.
3. Rank for threshold ``t``: the largest, over heads, count of components whose cumulative
   fraction of singular values is below ``t``; every head keeps that many. Decided in float64
   with the last cumulative fraction pinned to 1 and a tolerance of ``eigen_core.RANK_TOL``
   (1e-9), so a threshold (1.0 above all) is never decided by float32 rounding.
4. Rank search (``rank_search``):

   * ``threshold`` (default): from ``start_threshold`` (0.98 OPT/MPT/GPT-2, 1.0 Llama family)
     down by ``threshold_step`` (thresholds ``start - k * step``, no accumulated drift) while
     the layer's relative output error ``||Y - Y'|| / ||Y||`` over the calibration set stays
     below ``error_budget`` and the rank bounds hold; the last threshold that met the budget
     is kept. A layer where even the first threshold fails stays dense (no threshold).
   * ``bisect``: bisection on the ranks (a rank shared by K and V, then K's and V's lowered
     separately), about ``3 log2(head_dim)`` evaluations; see :func:`bisect_ranks`.

   Every candidate is scored with static shapes (:func:`_masked_layer`: basis columns past
   the rank masked out, the original kernel shapes, one compilation for every rank) and the
   sums stay on device (one host sync per candidate).
5. K/Q/V projections become :class:`~jcompress.leaves.HeadLowRank` leaves ``a = [W_h U_h]_h``,
   ``b[h] = U_h^T`` (biases projected to ``b U U^T``, kept as their rank-r coordinates
   ``b U``: :class:`~jcompress.leaves.HeadLatentBias`) and ``o_proj`` becomes a
   :class:`~jcompress.leaves.HeadFoldedOut` ``W_o' = U_v^T W_o`` per head. The forward pass
   caches ``x @ a`` (rank-r keys and values per head), attends over rank-r values and applies
   ``W_o'`` to rank-r head outputs, as the reference does. OPT / MPT / GPT-2: K and Q are
   tagged as sharing one basis (``HeadLowRank.basis = KQ_BASIS``), so the scores are
   ``q' k'^T`` on the rank-r latents (the reference's ``OPTEigenAttention``; off under
   ``clip_qkv``); Llama / Qwen widen keys back (with ``U^T``) before RoPE. ``materialize``
   gives the dense-equivalent ``W U U^T`` / ``U U^T W_o`` that stock transformers loads.

Departures from the reference, on purpose (``reference_mode=True`` undoes the first two):

* per-KV-head K bases for GQA models (the reference uses one K basis per layer, shared by all
  KV heads: ``generate_basis_vectors_per_layer``); per-KV-head bases measured lower layer
  error at equal rank in 23 of 24 (layer, rank) cases on llama-1m;
* the stop point: the default keeps the last threshold that met the budget; the reference
  steps its counter back by two steps after the walk, which is the same threshold when the
  error ended the walk but one step *above* the last passing one when a rank bound or the
  minimum threshold ended it (opt-1m layer 1: the default keeps 0.92 at 18/20, the reference
  0.94 at 20/22), and the Llama family checks its rank bound on the ranks just evaluated
  rather than before evaluating (see :func:`threshold_walk`);
* thresholds on an exact grid and the rank rule in float64 (the reference accumulates
  ``t -= 0.02`` and compares float32 sums);
* streamed Gram matrices instead of stored features; ``avg_dim > n`` / ``avg_dim < 1``
  rejected up front and a remainder of ``n % avg_dim`` windows reported (the reference
  crashes or drops it silently); rank bounds are checked before a threshold is tried rather
  than after (OPT's order, for every family).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.calibration import Feed, GroupedGram, stream_layers
from jcompress.calibration.gram import GRAM_DTYPES
from jcompress.calibration.stream import check_windows
from jcompress.eigen_attention import eigen_core as core
from jcompress.eigen_attention.report import EigenReport, LayerReport
from jcompress.errors import UserError
from jcompress.leaves import HeadFoldedOut, HeadLatentBias, HeadLowRank
from jcompress.methods import require_dense, select
from jcompress.models.config import Family, ModelConfig, Position
from jcompress.models.convert import flatten, get_path, unflatten
from jcompress.models.families import spec_for
from jcompress.models.forward import DEFAULT_ATTENTION, Capture, apply_layer
from jcompress.models.params import count_params, count_stored_params
from jcompress.sharding import to_host
from jcompress.validate import NonFiniteInput

__all__ = ["EigenAttentionConfig", "compress", "family_defaults"]

_ROPE_FAMILIES = (Family.LLAMA, Family.QWEN2, Family.QWEN3)
_HI = jax.lax.Precision.HIGHEST
RANK_SEARCHES = ("threshold", "bisect")
THRESHOLD_STEP = 0.02  # the threshold walk's default decrement (the reference's)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EigenAttentionConfig:
    """Settings of :func:`compress` (names follow the reference CLI).

    Attributes:
      nsamples, seqlen, seed: calibration windows (used by callers that sample them, e.g. the
        CLI; :func:`compress` takes the windows it is given).
      avg_dim: average the features of this many consecutive windows (1: no averaging).
      error_budget: bound on a layer's relative output error.
      threshold_step: decrement of the threshold walk.
      start_threshold: first threshold; ``None``: 0.98 (OPT/MPT/GPT-2) or 1.0 (Llama family).
      min_threshold: thresholds at or below this are not tried; ``None``: family default
        (0.3 OPT/MPT/GPT-2, none for Llama).
      min_rank: total rank (heads x per-head rank) must stay above this; ``None``: family
        default (64 for OPT, the reference's bound; 0 otherwise).
      min_rank_fraction: total rank must stay above this fraction of ``heads x head_dim``;
        ``None``: family default (0.45 for the Llama family, 0 otherwise).
      layers: regexes (``re.fullmatch``) over layer paths such as ``model/layers/3``; a layer
        is compressed when any rule matches. A rule that matches no layer is an error
        (see ``allow_unmatched``).
      allow_unmatched: a ``layers`` rule that matches no layer is an error before any work;
        with this set it is only warned about and listed in the report.
      batch_size: calibration windows per forward call.
      offload_dir: keep the calibration activations (each layer's inputs and outputs,
        ``[nsamples, seqlen, hidden]`` each) in temporary files in this directory instead of
        memory, so memory stays flat as ``nsamples`` grows (files are removed when done).
      rank_search: how each layer's ranks are chosen: ``threshold`` (the reference's walk of
        the spectrum threshold down by ``threshold_step``; one threshold for K and V) or
        ``bisect`` (bisection on the ranks themselves: first a rank shared by K and V, then
        K's and V's ranks lowered separately; the smallest ranks meeting ``error_budget`` in
        about ``3 log2(head_dim)`` layer evaluations; thresholds play no part).
      reference_mode: reproduce UtkarshSaxena1/EigenAttn: one K basis per layer for the
        Llama family (pooled over KV heads) and the reference's stop rule (the kept threshold
        is the last one evaluated plus one step, even when that one was never checked).
        Needs ``rank_search='threshold'``.
      gram_dtype: accumulation dtype of the per-head Gram matrices (``float64``: the
        spectrum's tail to float64 accuracy, the eigendecomposition is float64 on the host
        either way; ``float32``: the route before, ~2x cheaper products, tail singular values
        off by up to ~1e-3 relative; see :mod:`jcompress.calibration.gram`).
      per_head_ranks: with the threshold walk, each KV head keeps its own count of
        components at the threshold (the reference keeps the maximum over heads for every
        head); candidates are scored with those per-head ranks, the total-rank bounds apply to
        their sum. Leaves stay :class:`~jcompress.leaves.HeadLowRank` /
        :class:`~jcompress.leaves.HeadFoldedOut` of width ``max`` over heads, the columns
        past a head's own rank zero (exactly its rank-``r_h`` projection; the KV cache keeps
        the padded width, the report the true counts and what they would cache).
    """

    nsamples: int = 128
    seqlen: int = 2048
    avg_dim: int = 16
    error_budget: float = 0.025
    seed: int = 2
    threshold_step: float = THRESHOLD_STEP
    start_threshold: float | None = None
    min_threshold: float | None = None
    min_rank: int | None = None
    min_rank_fraction: float | None = None
    layers: tuple[str, ...] = (".*",)
    allow_unmatched: bool = False
    batch_size: int = 8
    offload_dir: str | None = None
    rank_search: str = "threshold"
    reference_mode: bool = False
    gram_dtype: str = "float64"
    per_head_ranks: bool = False

    def __post_init__(self):
        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"{name}: must be a positive integer, got {v!r}")

        for name in ("nsamples", "seqlen", "avg_dim", "batch_size"):
            positive_int(name)
        if self.avg_dim > self.nsamples:
            raise UserError(
                f"avg_dim: {self.avg_dim} is larger than nsamples ({self.nsamples}); "
                "allowed: 1 <= avg_dim <= nsamples (avg_dim defaults to 16: set it lower "
                "for fewer windows)"
            )
        for name in ("error_budget", "threshold_step", "start_threshold"):
            v = getattr(self, name)  # a recipe's JSON may hold any type: name the field
            if not (name == "start_threshold" and v is None) and (
                isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            ):
                raise UserError(f"{name}: must be a number, got {v!r}")
        if not 0 < self.error_budget < 1:
            raise UserError(f"error_budget: must be in (0, 1), got {self.error_budget!r}")
        if not 0 < self.threshold_step < 1:
            raise UserError(f"threshold_step: must be in (0, 1), got {self.threshold_step!r}")
        if self.start_threshold is not None and not 0 < self.start_threshold <= 1:
            raise UserError(f"start_threshold: must be in (0, 1], got {self.start_threshold!r}")
        for name in ("min_threshold", "min_rank", "min_rank_fraction"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0):
                raise UserError(f"{name}: must be a non-negative number or None, got {v!r}")
        if self.min_threshold is not None and self.min_threshold > 1:
            raise UserError(f"min_threshold: must be in [0, 1], got {self.min_threshold!r}")
        if self.min_rank_fraction is not None and self.min_rank_fraction >= 1:
            raise UserError(f"min_rank_fraction: must be < 1, got {self.min_rank_fraction!r}")
        if self.rank_search not in RANK_SEARCHES:
            raise UserError(
                f"rank_search: must be one of {', '.join(RANK_SEARCHES)}, got {self.rank_search!r}"
            )
        if self.gram_dtype not in GRAM_DTYPES:
            raise UserError(
                f"gram_dtype: must be one of {', '.join(GRAM_DTYPES)}, got {self.gram_dtype!r}"
            )
        if self.per_head_ranks and (self.rank_search != "threshold" or self.reference_mode):
            raise UserError(
                "per_head_ranks: each head keeps its own count at the walk's threshold; it "
                "needs rank_search='threshold' and reference_mode off"
            )
        if self.rank_search == "bisect":
            if self.threshold_step != THRESHOLD_STEP:
                raise UserError(
                    "threshold_step: only used by rank_search='threshold' (bisect searches the "
                    "ranks themselves); drop it or use the threshold walk"
                )
            for name in ("start_threshold", "min_threshold"):
                if getattr(self, name) is not None:
                    raise UserError(
                        f"{name}: only used by rank_search='threshold' (bisect searches the "
                        "ranks themselves); drop it or use the threshold walk"
                    )
        if self.reference_mode and self.rank_search != "threshold":
            raise UserError(
                "reference_mode: the reference walks the threshold; it needs "
                f"rank_search='threshold', got {self.rank_search!r}"
            )
        if self.offload_dir is not None and not os.path.isdir(self.offload_dir):
            raise UserError(f"offload_dir: {self.offload_dir} is not a directory")
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", (self.layers,))
        if not isinstance(self.layers, tuple | list) or not all(
            isinstance(r, str) for r in self.layers
        ):
            raise UserError(f"layers: must be a regex or a list of regexes, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        for rule in self.layers:
            try:
                re.compile(rule)
            except re.error as e:
                raise UserError(f"layers: bad regex {rule!r} ({e})") from None


@dataclasses.dataclass(frozen=True)
class _Defaults:
    start: float
    min_threshold: float
    min_rank: int
    min_rank_fraction: float


def family_defaults(cfg: ModelConfig, config: EigenAttentionConfig) -> _Defaults:
    """Start threshold and rank bounds: the config's values, else the reference's per family."""
    rope = cfg.family in _ROPE_FAMILIES
    return _Defaults(
        start=config.start_threshold or (1.0 if rope else 0.98),
        min_threshold=(
            config.min_threshold if config.min_threshold is not None else (0.0 if rope else 0.3)
        ),
        min_rank=(
            config.min_rank
            if config.min_rank is not None
            else (64 if cfg.family is Family.OPT else 0)
        ),
        min_rank_fraction=(
            config.min_rank_fraction
            if config.min_rank_fraction is not None
            else (0.45 if rope else 0.0)
        ),
    )


def check_bounds(
    cfg: ModelConfig, config: EigenAttentionConfig, kv_heads: int, head_dim: int
) -> None:
    """Settings that would leave every layer uncompressed are an error, not a silent no-op:

    * the threshold walk with ``start_threshold`` not above ``min_threshold`` (either one
      the family default) tries no threshold at all;
    * with ``rank_search='bisect'``, an explicit ``min_rank`` / ``min_rank_fraction`` whose
      floor is the full rank: the search's per-head floor is ``floor(bound / kv_heads) + 1``,
      so any bound of at least ``kv_heads x (head_dim - 1)`` leaves only ``head_dim``. (The
      threshold walk keeps its first threshold whatever the bounds, as the reference does, so
      there a high bound only stops the walk early.)
    """
    d = family_defaults(cfg, config)
    if config.rank_search == "threshold" and not d.start > d.min_threshold + 1e-9:
        raise UserError(
            f"start_threshold: {d.start} is not above min_threshold {d.min_threshold} (either "
            "may be the family default), so no threshold would be tried; allowed: "
            "start_threshold > min_threshold"
        )
    if config.rank_search != "bisect":
        return
    top = kv_heads * (head_dim - 1)
    where = f"with {kv_heads} KV heads of {head_dim} the bisection's floor reaches full rank from"
    if config.min_rank is not None and config.min_rank >= top:
        raise UserError(
            f"min_rank: {config.min_rank} leaves nothing to compress: {where} {top} on; "
            f"allowed: 0 <= min_rank < {top}"
        )
    frac = config.min_rank_fraction
    if frac is not None and frac * kv_heads * head_dim >= top:
        raise UserError(
            f"min_rank_fraction: {frac} of {kv_heads} x {head_dim} leaves nothing to compress: "
            f"{where} a total of {top} on; allowed: 0 <= min_rank_fraction < "
            f"{top / (kv_heads * head_dim):.6g}"
        )


def _check_calib(cfg: ModelConfig, calib: Any, config: EigenAttentionConfig) -> np.ndarray:
    """The stream's :func:`~jcompress.calibration.stream.check_windows` (token-id shape, ids in
    the vocabulary, model length, ``offload_dir``) plus EigenAttention's own: present, enough
    windows for ``avg_dim``; windows past the trained positions are a warning."""
    if calib is None:
        raise UserError("calib: EigenAttention needs calibration token ids [nsamples, seqlen]")
    calib = check_windows(cfg, calib, config.offload_dir)
    n = calib.shape[0]
    if config.avg_dim > n:
        raise UserError(
            f"avg_dim: {config.avg_dim} is larger than the {n} calibration windows; "
            "allowed: 1 <= avg_dim <= nsamples (avg_dim defaults to 16)"
        )
    if calib.shape[1] > cfg.max_position_embeddings:
        warnings.warn(
            f"calib: windows of {calib.shape[1]} tokens are longer than the model's "
            f"{cfg.max_position_embeddings} trained positions; the statistics come from "
            "positions the model never saw in training",
            stacklevel=3,
        )
    return calib


def _as_dtype(x: np.ndarray, like) -> jax.Array:
    return jax.device_put(x.astype(np.dtype(like.dtype)))


KQ_BASIS = "eigen_attention/kq"
"""The ``HeadLowRank.basis`` tag of K and Q projected on one shared basis per head (OPT / MPT /
GPT-2): the forward pass then computes the scores in rank space."""


def _project(
    kernel: jax.Array, bias: jax.Array | None, u: np.ndarray, r: int, basis: str | None = None
):
    """``kernel [in, heads*D]``, host basis ``u [heads, D, D]`` -> (rank-``r`` HeadLowRank
    ``a = [W_h U_h]_h``, ``b[h] = U_h^T``, tagged ``basis``; bias projected to
    ``b_h U_h U_h^T`` and kept in rank space, ``HeadLatentBias(z_h = b_h U_h, ut = b)``
    sharing the leaf's ``b`` array, or None).

    Built once per layer on the host in float64 (one ``[in, D] @ [D, r]`` product per head,
    BLAS), then cast to the kernel's dtype: no compilation per rank or shape."""
    heads, d, _ = u.shape
    ur = np.asarray(u, np.float64)[:, :, :r]  # [heads, D, r]
    w = np.asarray(to_host(kernel), np.float64)  # whole on every process (multi-host)
    w = w.reshape(kernel.shape[0], heads, d).transpose(1, 0, 2)
    a = np.matmul(w, ur).transpose(1, 0, 2).reshape(kernel.shape[0], heads * r)
    leaf = HeadLowRank(_as_dtype(a, kernel), _as_dtype(ur.transpose(0, 2, 1), kernel), basis=basis)
    if bias is None:
        return leaf, None
    z = np.matmul(np.asarray(to_host(bias), np.float64).reshape(heads, 1, d), ur).reshape(heads * r)
    return leaf, HeadLatentBias(_as_dtype(z, bias), leaf.b)


def _head_masked(u: np.ndarray, r) -> tuple[np.ndarray, int]:
    """Host basis ``u [heads, D, D]`` and per-head ranks (an int, or one per head) ->
    ``(u with each head's columns past its rank zeroed, the max rank)``: the leaves of
    width ``max`` whose extra columns are zero are exactly each head's own projection."""
    r = np.broadcast_to(np.asarray(r), (u.shape[0],))
    keep = np.arange(u.shape[2])[None, :] < r[:, None]  # [heads, D]
    return np.where(keep[:, None, :], u, 0.0), int(r.max())


def _fold_out(kernel: jax.Array, u: np.ndarray, query_heads: int, r: int) -> HeadFoldedOut:
    """``W_o' = U_v^T W_o`` per query head (its KV head's basis) at rank ``r`` ->
    ``HeadFoldedOut``; host float64 as :func:`_project`."""
    hk, d, _ = u.shape
    ur = np.repeat(np.asarray(u, np.float64)[:, :, :r], query_heads // hk, axis=0)  # [Hq,D,r]
    w = np.asarray(to_host(kernel), np.float64).reshape(query_heads, d, -1)
    folded = np.matmul(ur.transpose(0, 2, 1), w).reshape(query_heads * r, -1)
    ut = np.asarray(u, np.float64)[:, :, :r].transpose(0, 2, 1)
    return HeadFoldedOut(_as_dtype(folded, kernel), _as_dtype(ut, kernel))


def _masked_params(xp, mm, lp, u_kq, u_v, r_kq, r_v, *, kq_roles, v_role, o_role, query_heads):
    """The math of :func:`_masked_layer` for ``xp`` = ``jax.numpy`` (jitted, float32) or
    ``numpy`` (host, float64); ``mm`` is the matmul (``precision=HIGHEST`` on device)."""
    dt = xp.float32 if xp is jnp else xp.float64

    def projector(u, r):
        hk, d, _ = u.shape
        u = u.astype(dt)
        m = (xp.arange(d)[None, :] < r[:, None]).astype(dt)  # [Hk, D]
        p = mm(u * m[:, None, :], xp.swapaxes(u, 1, 2))  # U diag(m) U^T per head
        return xp.where((r >= d)[:, None, None], xp.eye(d, dtype=dt)[None], p)

    flat = dict(flatten(lp))

    def project(role, p):
        w = flat[f"{role}/kernel"]
        h, d, _ = p.shape
        wf = xp.swapaxes(w.astype(dt).reshape(w.shape[0], h, d), 0, 1)  # [h, in, D]
        flat[f"{role}/kernel"] = xp.swapaxes(mm(wf, p), 0, 1).reshape(w.shape).astype(w.dtype)
        if f"{role}/bias" in flat:
            b = flat[f"{role}/bias"]
            bp = mm(b.astype(dt).reshape(h, 1, d), p)
            flat[f"{role}/bias"] = bp.reshape(b.shape).astype(b.dtype)

    p_kq = projector(u_kq, r_kq)
    for role in kq_roles:
        project(role, p_kq)
    p_v = projector(u_v, r_v)
    project(v_role, p_v)
    wo = flat[f"{o_role}/kernel"]
    hk, d, _ = p_v.shape
    pq = xp.repeat(p_v, query_heads // hk, axis=0)  # [Hq, D, D]
    wof = wo.astype(dt).reshape(query_heads, d, -1)
    flat[f"{o_role}/kernel"] = mm(pq, wof).reshape(wo.shape).astype(wo.dtype)
    return unflatten(flat)


@functools.partial(jax.jit, static_argnames=("kq_roles", "v_role", "o_role", "query_heads"))
def _masked_layer(lp, u_kq, u_v, r_kq, r_v, *, kq_roles, v_role, o_role, query_heads):
    """Dense-equivalent layer params for per-head ranks given as *traced* arrays.

    Each head's projector ``P_h = U_h diag(m_h) U_h^T`` keeps the first ``r_h`` basis columns
    (``m_h = [j < r_h]``; ``P_h = I`` when ``r_h >= D``, the dense layer). K (and Q where the
    basis is shared) and V kernels become ``W_h P_h``, their biases ``b_h P_h``, and o_proj's
    rows ``P_g(h) W_o[h]``: exactly ``materialize`` of the leaves :func:`compress` builds at
    those ranks, but with the original shapes, so every candidate rank reuses one compilation
    of this function and of ``StreamLayer.relative_error``.

    Args:
      lp: the layer's dense params.
      u_kq, u_v: ``[Hk, D, D]`` bases (columns by decreasing singular value).
      r_kq, r_v: ``[Hk]`` int32 per-head ranks.
      kq_roles, v_role, o_role: param paths (static).
      query_heads: ``Hq`` (o_proj rows per query head; static).
    """
    mm = functools.partial(jnp.matmul, precision=_HI)
    return _masked_params(
        jnp, mm, lp, u_kq, u_v, r_kq, r_v,
        kq_roles=kq_roles, v_role=v_role, o_role=o_role, query_heads=query_heads,
    )  # fmt: skip


def _masked_layer_host(lp, u_kq, u_v, r_kq, r_v, **static):
    """:func:`_masked_layer` on the host in float64 (``numpy``), what the CPU backend uses:
    no compilation; the layer's params go back as device arrays (a cheap copy on CPU)."""
    host = jax.tree.map(to_host, lp)  # whole on every process (multi-host)
    out = _masked_params(np, np.matmul, host, u_kq, u_v, np.asarray(r_kq), np.asarray(r_v),
                          **static)  # fmt: skip
    # device arrays, like the statistics pass's params: the same jit cache entry
    return jax.device_put(out)


@jax.jit
def _sq_sums(acc: jax.Array, y2: jax.Array, y: jax.Array, real) -> jax.Array:
    """``acc [2] + (||y2 - y||^2, ||y||^2)`` over the first ``real`` rows, in float32."""
    keep = (jnp.arange(y.shape[0]) < real)[:, None, None]
    diff = jnp.where(keep, (y2 - y).astype(jnp.float32), 0.0)
    ref = jnp.where(keep, y.astype(jnp.float32), 0.0)
    return acc + jnp.stack([jnp.sum(diff * diff), jnp.sum(ref * ref)])


class _Evaluator:
    """``evaluate(r_kq, r_v) -> float``: one layer's relative output error
    ``||Y' - Y|| / ||Y||`` at per-head ranks (an int: every head; a tuple: one per KV head),
    memoised; ``count`` is the number of
    layer evaluations (the dense pair costs none) and ``batches`` the calibration batches
    they ran.

    Compile-free per candidate: :func:`_masked_layer` gives the candidate with the original
    shapes (one compilation for every rank and, shapes being equal, every layer; on the CPU
    backend :func:`_masked_layer_host` builds it in numpy float64 with no compilation), and each
    batch goes through ``apply_layer`` with the *same* capture, attention and argument
    structure as the statistics pass (``StreamLayer.observe``), so the candidate runs on the
    executable that pass already compiled; the squared sums stay on device. The ranks go in
    as host arrays (no compiled broadcast) and the final ratio is taken on the host in
    float32 (one sync per candidate, one per batch while an early exit is possible).

    Early exit (``budget``): the sum of squared differences only grows batch by batch, so once
    it exceeds ``budget^2 ||Y||^2 (1 + 1e-5)`` the candidate is known to fail and the
    remaining batches are skipped. The decision equals the full evaluation's (the margin
    covers float32 rounding); the value kept is the partial ratio, a lower bound at or above
    the budget, marked so that :meth:`exact` recomputes it if it is ever reported.
    ``||Y||^2`` is summed once per layer.
    """

    _MARGIN = 1.0 + 1e-5

    def __init__(
        self, layer, lp, u_kq, u_v, *, cfg, attention, capture, d_k, d_v, kv_heads,
        budget=None, host=None, **static,
    ):  # fmt: skip
        self.layer, self.lp, self.d_k, self.d_v, self.hk = layer, lp, d_k, d_v, kv_heads
        self.static = static
        # the CPU backend builds candidates on the host (no compilation, no copy), other
        # backends with the jitted float32 _masked_layer (bases uploaded once per layer)
        self.host = jax.default_backend() == "cpu" if host is None else host
        if self.host:
            self.u_kq, self.u_v = (np.asarray(u, np.float64) for u in (u_kq, u_v))
        else:
            self.u_kq, self.u_v = (jax.device_put(np.asarray(u, np.float32)) for u in (u_kq, u_v))
        self.cfg, self.attention, self.capture, self.budget = cfg, attention, capture, budget
        self.seen: dict[tuple[int, int], float] = {}
        self.partial: set[tuple[int, int]] = set()
        self.count = 0
        self.batches = 0
        self._den: np.float32 | None = None

    def _run(self, key: tuple[int, int], early: bool) -> tuple[float, bool]:
        """The error of ``key``; ``(value, complete)``."""
        layer = self.layer
        ranks = [np.broadcast_to(np.asarray(r, np.int32), (self.hk,)) for r in key]
        if self.host:
            cand = _masked_layer_host(self.lp, self.u_kq, self.u_v, *ranks, **self.static)
        else:
            ranks = [jax.device_put(r) for r in ranks]
            cand = _masked_layer(self.lp, self.u_kq, self.u_v, *ranks, **self.static)
        ref, acc = layer.reference, jax.device_put(np.zeros((2,), np.float32))
        if self._den is None:  # ||Y||^2 once per layer (the same compiled step, y2 = y)
            zero = jax.device_put(np.zeros((2,), np.float32))
            for b, batch in enumerate(layer.batches):
                zero = _sq_sums(zero, ref.get(b), ref.get(b), batch.real)
            self._den = np.asarray(zero)[1]
        den = self._den
        limit = (
            np.float32(self.budget) ** 2 * den * np.float32(self._MARGIN)
            if early and self.budget is not None and den is not None
            else None
        )
        last = len(layer.batches) - 1
        for b, batch in enumerate(layer.batches):
            y2, _ = apply_layer(
                self.cfg, cand, layer.inputs.get(b), layer.index, capture=self.capture,
                attention=self.attention,
            )  # fmt: skip
            acc = _sq_sums(acc, y2, ref.get(b), batch.real)
            self.batches += 1
            if limit is not None and b < last and np.asarray(acc)[0] >= limit:
                num = np.asarray(acc)[0]
                return float(np.sqrt(num / den)), False
        num = np.asarray(acc)[0]
        return (float(np.sqrt(num / den)) if den > 0 else 0.0), True

    def _key(self, r_kq, r_v) -> tuple:
        """Per-head ranks clipped to the head widths; ints (uniform) stay ints."""

        def clip(r, d):
            return min(r, d) if isinstance(r, int | np.integer) else tuple(min(x, d) for x in r)

        return clip(r_kq, self.d_k), clip(r_v, self.d_v)

    def _dense(self, key) -> bool:
        return all(
            np.all(np.asarray(r) >= d) for r, d in zip(key, (self.d_k, self.d_v), strict=True)
        )

    def __call__(self, r_kq, r_v) -> float:
        key = self._key(r_kq, r_v)
        if self._dense(key):
            return 0.0
        if key not in self.seen:
            err, complete = self._run(key, early=True)
            self.seen[key] = err
            if not complete:
                self.partial.add(key)
            self.count += 1
        return self.seen[key]

    def exact(self, r_kq, r_v) -> float:
        """The full error of a pair (recomputed if it was only bounded by an early exit)."""
        key = self._key(r_kq, r_v)
        if key in self.partial:
            self.seen[key], _ = self._run(key, early=False)
            self.partial.discard(key)
        return self(*key)


def threshold_grid(start: float, step: float, min_threshold: float):
    """Thresholds ``start - k * step`` (k = 0, 1, ...) above ``min_threshold``, each computed
    from ``k`` and rounded to 12 decimals (no drift from repeated subtraction)."""
    k = 0
    while (t := round(start - k * step, 12)) > min_threshold + 1e-9:
        yield t
        k += 1


def threshold_walk(
    ranks: Callable[[float], tuple[int, int]],
    evaluate: Callable[[int, int], float],
    *,
    start: float,
    step: float,
    min_threshold: float,
    bounds_ok: Callable[[int, int], bool],
    budget: float,
    reference: bool = False,
    bound_after: bool = False,
) -> tuple[float | None, int, int, float]:
    """The threshold walk of one layer.

    Default rule: thresholds from ``start`` down by ``step`` (:func:`threshold_grid`); a
    threshold whose ranks break the bounds (checked from the second threshold on) or whose
    error reaches ``budget`` ends the walk; the last threshold that met the budget is kept
    (``None`` when the first failed).

    Reference rule (``reference=True``, ``decompose/eigen_attn.py``): the walk evaluates
    thresholds while the error stays under budget and the bounds hold (OPT/MPT/GPT-2 check
    the bounds on a threshold's ranks before evaluating it, the first one included; the Llama
    family, ``bound_after``, on the ranks just evaluated); then the threshold *steps back by
    two steps from where the walk's counter stands*, i.e. it is the last evaluated threshold
    plus one step. So when the error ended the walk this is the last passing threshold, but
    when a bound ended it, it is one step above the last passing one (e.g. opt-1m layer 1:
    0.94 and 20/22 where the default keeps 0.92 and 18/20), and a first failure gives
    ``start + step`` (at 1.02 every rank is full: the layer stays dense).

    Args:
      ranks: threshold -> ``(r_kq, r_v)`` per-head ranks.
      evaluate: ``(r_kq, r_v)`` -> relative layer error (memoised by the caller).
      start, step, min_threshold: the grid.
      bounds_ok: ``(r_kq, r_v)`` -> whether the rank bounds hold.
      budget: error budget.
      reference, bound_after: as above.

    Returns:
      ``(threshold, r_kq, r_v, error)``; ``threshold`` is ``None`` when nothing is kept
      (the ranks returned then are those of the failed first threshold).
    """
    if not reference:
        best = None
        r = (0, 0)
        for t in threshold_grid(start, step, min_threshold):
            r = ranks(t)
            if best is not None and not bounds_ok(*r):
                break
            err = evaluate(*r)
            if err >= budget:
                break
            best = (t, *r, err)
        return best if best is not None else (None, *r, float("inf"))
    k = 0
    for t in threshold_grid(start, step, min_threshold):
        r = ranks(t)
        if not bound_after and not bounds_ok(*r):
            break
        err = evaluate(*r)
        k += 1
        if err >= budget or (bound_after and not bounds_ok(*r)):
            break
    t = round(start - (k - 2) * step, 12)
    r = ranks(t)
    return (t, *r, evaluate(*r))


def bisect_ranks(
    evaluate: Callable[[int, int], float],
    *,
    d_k: int,
    d_v: int,
    floor_kq: int,
    floor_v: int,
    budget: float,
) -> tuple[None, int, int, float]:
    """Smallest per-head ranks meeting ``budget`` by bisection on the ranks.

    Three searches, each over ranks whose error is assumed non-increasing in the rank
    (the layer at full rank is exact): (1) a bisection for the smallest rank ``r`` shared by
    K and V in ``[max(floors), max(d_k, d_v)]``, a floor above 1 probed first; (2) K's rank
    in ``[floor_kq, r]`` with V at ``r``; (3) V's rank in ``[floor_v, r]`` with K at the rank
    found. Searches (2) and (3) gallop down from ``r`` (probes ``r - 1, r - 3, r - 7, ...``,
    then a bisection inside the first failing step): on llama-1m K's and V's ranks end at
    ``r`` or just below it, so one or two evaluations settle them. The answers are the plain
    bisection's. At most ``3 ceil(log2 D)`` layer evaluations, typically ``log2 D + 3``. The
    result is a pair where lowering either rank by one (within its floor) breaks the budget.

    Args:
      evaluate: ``(r_kq, r_v)`` -> relative layer error; ``(d_k, d_v)`` must give 0.
      d_k, d_v: head widths (full ranks).
      floor_kq, floor_v: smallest allowed ranks (from ``min_rank`` / ``min_rank_fraction``).
      budget: error budget (strict: ``error < budget``).

    Returns:
      ``(None, r_kq, r_v, error)`` (no threshold); full ranks when nothing smaller passes.
    """

    def ok(r_kq: int, r_v: int) -> bool:
        return evaluate(r_kq, r_v) < budget

    def smallest(lo: int, hi: int, passes: Callable[[int], bool]) -> int:
        # passes(hi) is known to hold; find the smallest r in [lo, hi] with passes(r)
        while lo < hi:
            mid = (lo + hi) // 2
            if passes(mid):
                hi = mid
            else:
                lo = mid + 1
        return hi

    d = max(d_k, d_v)
    floor_kq, floor_v = max(floor_kq, 1), max(floor_v, 1)
    lo = max(floor_kq, floor_v)
    if lo >= d:
        return None, d_k, d_v, 0.0

    def smallest_from_top(lo: int, hi: int, passes: Callable[[int], bool]) -> int:
        # the same answer as smallest(); K's and V's own ranks mostly sit at or just under
        # the shared one, so gallop down from the top (hi - 1, hi - 3, hi - 7, ...) and
        # bisect inside the first step that fails
        step = 1
        while hi - step >= lo:
            if not passes(hi - step):
                return smallest(hi - step + 1, hi, passes)
            hi, step = hi - step, 2 * step
        return smallest(lo, hi, passes)

    # a floor above 1 (the Llama family's 45% of heads x D) is where the shared rank often
    # ends (llama-1m layer 0): probe it first; a floor that fails mostly costs one batch
    # (the evaluator's early exit), and the answer is the bisection's either way
    if lo > 1 and ok(min(lo, d_k), min(lo, d_v)):
        r = lo
    else:
        r = smallest(lo + 1 if lo > 1 else lo, d, lambda r: ok(min(r, d_k), min(r, d_v)))
    r_kq = smallest_from_top(min(floor_kq, d_k), min(r, d_k), lambda x: ok(x, min(r, d_v)))
    r_v = smallest_from_top(min(floor_v, d_v), min(r, d_v), lambda x: ok(r_kq, x))
    return None, r_kq, r_v, evaluate(r_kq, r_v)


def _with(lp: dict, role: str, kernel, bias) -> dict:
    """Copy of layer params ``lp`` with ``role``'s kernel (and bias) replaced."""
    flat = flatten(lp)
    flat[f"{role}/kernel"] = kernel
    if bias is not None:
        flat[f"{role}/bias"] = bias
    return unflatten(flat)


def compress(
    params: Any,
    cfg: ModelConfig,
    calib: Any = None,
    *,
    config: EigenAttentionConfig = EigenAttentionConfig(),  # noqa: B008 - frozen, immutable
    progress: bool = True,
) -> tuple[Any, EigenReport]:
    """Compress K/Q/V projections to per-head low rank (EigenAttention).

    Args:
      params: dense param pytree (``load_hf``).
      cfg: its model config.
      calib: ``[nsamples, seqlen]`` calibration token ids (``data.calibration_windows``);
        required (``None`` is rejected; the :class:`jcompress.methods.Compress` signature).
      config: :class:`EigenAttentionConfig`.
      progress: show a progress bar over layers.

    Returns:
      ``(params, report)``: params with ``HeadLowRank`` k/q/v kernels in the selected layers
      (same tree otherwise; the input is not modified), and an :class:`EigenReport` with
      per-layer thresholds, ranks, errors and KV-cache / parameter sizes.

    Example::

      calib = calibration_windows(ids, nsamples=32, seqlen=256, seed=2)
      params2, report = compress(params, cfg, calib, config=EigenAttentionConfig(avg_dim=4))
      print(report.to_markdown())
    """
    t_start = time.perf_counter()
    calib = _check_calib(cfg, calib, config)
    n, seqlen = calib.shape
    n_groups, dropped = n // config.avg_dim, n % config.avg_dim
    if dropped:
        warnings.warn(
            f"avg_dim={config.avg_dim} does not divide {n} calibration windows: the last "
            f"{dropped} are left out of the bases (they still feed the error checks)",
            stacklevel=2,
        )
    lay = spec_for(cfg.family.value).layout
    defaults = family_defaults(cfg, config)
    rope = cfg.family in _ROPE_FAMILIES
    hq, hk = cfg.num_heads, cfg.num_kv_heads
    if not rope and hq != hk:
        raise UserError(f"{cfg.family.value}: shared K/Q bases need num_heads == num_kv_heads")
    layer_paths = [f"{lay.layers}/{i}" for i in range(cfg.num_layers)]
    selection = select(config.layers, layer_paths, allow_unmatched=config.allow_unmatched)

    flat_params = flatten(params)
    lp0 = flatten(get_path(params, layer_paths[0]))
    d_model_k = int(lp0[f"{lay.k}/kernel"].shape[-1]) // hk
    d_model_v = int(lp0[f"{lay.v}/kernel"].shape[-1]) // hk
    check_bounds(cfg, config, hk, max(d_model_k, d_model_v))
    reports: list[LayerReport] = []
    feat_paths = (lay.k, lay.v) if rope else (lay.k, lay.q, lay.v)
    capture = Capture(outputs="|".join(re.escape(p) for p in feat_paths))
    attention = DEFAULT_ATTENTION  # candidates run on the statistics pass's executable
    # the next layer calibrates on the uncompressed outputs (Feed.ORIGINAL), as the reference
    stream = stream_layers(
        cfg,
        params,
        calib,
        batch_size=config.batch_size,
        offload_dir=config.offload_dir,
        feed=Feed.ORIGINAL,
        attention=attention,
    )
    with contextlib.closing(stream):  # temp files go as soon as the loop ends or fails
        bar = tqdm(
            stream,
            total=cfg.num_layers,
            desc="eigen_attention",
            disable=not progress,
            leave=False,
        )
        for layer in bar:
            i, path, lp = layer.index, layer.path, layer.params
            if path not in selection:
                continue
            t_layer = time.perf_counter()
            kp, qp, vp, op = (get_path(lp, r) for r in (lay.k, lay.q, lay.v, lay.o))
            for role, p in ((lay.k, kp), (lay.q, qp), (lay.v, vp), (lay.o, op)):
                require_dense(
                    f"{path}/{role}/kernel", p["kernel"], "EigenAttention", "k/q/v/o kernels"
                )
            d_k = int(kp["kernel"].shape[-1]) // hk
            d_v = int(vp["kernel"].shape[-1]) // hk
            acc_kq = GroupedGram(n=n, avg_dim=config.avg_dim, heads=hk, dtype=config.gram_dtype)
            acc_v = GroupedGram(n=n, avg_dim=config.avg_dim, heads=hk, dtype=config.gram_dtype)
            for ob in layer.observe(capture):
                outs = ob.captured["outputs"]
                acc_kq.add((outs[lay.k],) if rope else (outs[lay.k], outs[lay.q]), ob.real)
                acc_v.add((outs[lay.v],), ob.real)
            g_kq = np.asarray(to_host(acc_kq.gram), np.float64)  # whole on every process
            g_v = np.asarray(to_host(acc_v.gram), np.float64)
            if not (np.isfinite(g_kq).all() and np.isfinite(g_v).all()):
                raise NonFiniteInput(
                    f"{path}: the k/q/v activations of the calibration windows are not finite "
                    "(finite weights that overflow float32 in an earlier layer?)"
                )
            if config.reference_mode and rope:
                # the reference's one K basis per layer: KV heads pooled as extra samples
                u1, s_kq = core.host_bases(g_kq.sum(axis=0, keepdims=True))
                u_kq = np.broadcast_to(u1, (hk, *u1.shape[1:]))
            else:
                u_kq, s_kq = core.host_bases(g_kq)
            u_v, s_v = core.host_bases(g_v)

            def ranks(t, s_kq=s_kq, s_v=s_v, d_k=d_k, d_v=d_v):
                if config.per_head_ranks:  # each head its own count (at least 1)
                    return tuple(
                        tuple(int(c) for c in np.clip(core.head_counts_below(sv, t), 1, dd))
                        for sv, dd in ((s_kq, d_k), (s_v, d_v))
                    )
                return (
                    min(core.rank_for_threshold(s_kq, t), d_k),
                    min(core.rank_for_threshold(s_v, t), d_v),
                )

            def total(r):  # total rank over KV heads
                return hk * r if isinstance(r, int | np.integer) else sum(r)

            def build(
                r_kq, r_v, lp=lp, kp=kp, qp=qp, vp=vp, op=op, u_kq=u_kq, u_v=u_v, d_k=d_k, d_v=d_v
            ):
                # per-head ranks: width = max over heads, columns past a head's rank zeroed
                u_kq, w_kq = _head_masked(u_kq, r_kq)
                u_v, w_v = _head_masked(u_v, r_v)
                new = lp
                if np.any(np.asarray(r_kq) < d_k):
                    roles = [(lay.k, kp)] if rope else [(lay.k, kp), (lay.q, qp)]
                    tag = None if rope else KQ_BASIS  # K and Q share u_kq: rank-space scores
                    for role, p in roles:
                        leaf, bias = _project(p["kernel"], p.get("bias"), u_kq, w_kq, tag)
                        new = _with(new, role, leaf, bias)
                if np.any(np.asarray(r_v) < d_v):
                    new = _with(new, lay.v, *_project(vp["kernel"], vp.get("bias"), u_v, w_v))
                    new = _with(new, lay.o, _fold_out(op["kernel"], u_v, hq, w_v), None)
                return new

            evaluate = _Evaluator(
                layer, lp, u_kq, u_v, cfg=cfg, attention=attention, capture=capture,
                d_k=d_k, d_v=d_v, kv_heads=hk, budget=config.error_budget, query_heads=hq,
                kq_roles=(lay.k,) if rope else (lay.k, lay.q), v_role=lay.v, o_role=lay.o,
            )  # fmt: skip
            bound_kq = max(defaults.min_rank, defaults.min_rank_fraction * hk * d_k)
            bound_v = max(defaults.min_rank, defaults.min_rank_fraction * hk * d_v)
            if config.rank_search == "bisect":
                found = bisect_ranks(
                    evaluate,
                    d_k=d_k,
                    d_v=d_v,
                    floor_kq=math.floor(bound_kq / hk) + 1,
                    floor_v=math.floor(bound_v / hk) + 1,
                    budget=config.error_budget,
                )
            else:
                found = threshold_walk(
                    ranks,
                    evaluate,
                    start=defaults.start,
                    step=config.threshold_step,
                    min_threshold=defaults.min_threshold,
                    bounds_ok=lambda r_kq, r_v, bk=bound_kq, bv=bound_v: (
                        total(r_kq) > bk and total(r_v) > bv
                    ),
                    budget=config.error_budget,
                    reference=config.reference_mode,
                    bound_after=rope,
                )
            t_best, r_kq, r_v, err = found
            if config.rank_search == "threshold" and t_best is None:
                r_kq, r_v = d_k, d_v  # the first threshold failed: the layer stays dense
            compressed = bool(np.any(np.asarray(r_kq) < d_k) or np.any(np.asarray(r_v) < d_v))
            if compressed:
                err = evaluate.exact(r_kq, r_v)  # never an early-exit bound
            heads_kq = heads_v = None
            if compressed and config.per_head_ranks:  # the true per-head counts
                heads_kq, heads_v = tuple(r_kq), tuple(r_v)
            elif compressed and t_best is not None:  # what per-head ranks would keep (report)
                heads_kq, heads_v = (
                    tuple(
                        int(c)
                        for c in np.broadcast_to(
                            np.clip(core.head_counts_below(sv, t_best), 1, dd), (hk,)
                        )
                    )
                    for sv, dd in ((s_kq, d_k), (s_v, d_v))
                )
            if compressed:
                new_lp = build(r_kq, r_v)
                layer.replace(new_lp)  # recorded only: Feed.ORIGINAL feeds the original outputs
                for k, v in flatten(new_lp).items():
                    flat_params[f"{path}/{k}"] = v
            else:  # nothing met the budget (or the reference stepped back to full rank)
                t_best, err = None, 0.0
            rep = LayerReport(
                layer=i,
                path=path,
                threshold=t_best,
                rank_kq=int(np.max(r_kq)),  # the stored (padded) width per head
                rank_v=int(np.max(r_v)),
                head_dim_kq=d_k,
                head_dim_v=d_v,
                kv_heads=hk,
                error=err,
                steps=evaluate.count,
                compressed=compressed,
                shares_q=not rope,
                seconds=time.perf_counter() - t_layer,
                shared_k_basis=bool(config.reference_mode and rope),
                head_ranks_kq=heads_kq,
                head_ranks_v=heads_v,
            )
            reports.append(rep)
            bar.set_postfix(layer=i, r_kq=rep.rank_kq, r_v=rep.rank_v, err=f"{rep.error:.4f}")
    unmatched = selection.unmatched
    report = EigenReport(
        family=cfg.family.value,
        layers=tuple(reports),
        nsamples=n,
        seqlen=seqlen,
        avg_dim=config.avg_dim,
        averaged_sequences=n_groups,
        dropped_sequences=dropped,
        error_budget=config.error_budget,
        unmatched_rules=unmatched,
        rope=cfg.position is Position.ROPE,
        params_before=count_params(params),
        params_after=count_stored_params(flat_params),
        rank_search=config.rank_search,
        reference_mode=config.reference_mode,
        per_head_ranks=config.per_head_ranks,
        model_layers=cfg.num_layers,
        model_kv_per_layer=hk * (d_model_k + d_model_v),
        compress_seconds=time.perf_counter() - t_start,
    )
    return unflatten(flat_params), report
