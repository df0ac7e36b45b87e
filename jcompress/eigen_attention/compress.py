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
   fraction of singular values is below ``t``; every head keeps that many.
4. Threshold walk: from ``start_threshold`` (0.98 OPT/MPT/GPT-2, 1.0 Llama family) down by
   ``threshold_step`` while the layer's relative output error ``||Y - Y'|| / ||Y||`` over the
   calibration set stays below ``error_budget`` and the rank bounds hold; the last threshold
   that met the budget is kept. A layer where even the first threshold fails stays dense.
5. K/Q/V projections become :class:`~jcompress.leaves.HeadLowRank` leaves ``a = [W_h U_h]_h``,
   ``b[h] = U_h^T`` (biases projected to ``b U U^T``) and ``o_proj`` becomes a
   :class:`~jcompress.leaves.HeadFoldedOut` ``W_o' = U_v^T W_o`` per head. The forward pass
   caches ``x @ a`` (rank-r keys and values per head), attends over rank-r values and applies
   ``W_o'`` to rank-r head outputs, as the reference does; keys are widened back (with
   ``U^T``) before the scores, which RoPE needs and which for OPT/MPT costs compute but not
   cache. ``materialize`` gives the dense-equivalent ``W U U^T`` / ``U U^T W_o`` that stock
   transformers loads.

Departures from the reference, on purpose: per-KV-head K bases for GQA models (the reference
uses one K basis per layer, shared by all KV heads); streamed Gram matrices instead of stored
features; ``avg_dim > n`` / ``avg_dim < 1`` rejected up front and a remainder of
``n % avg_dim`` windows reported (the reference crashes or drops it silently); rank bounds are
checked before a threshold is tried rather than after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.calibration import Feed, GroupedGram, stream_layers
from jcompress.eigen_attention import eigen_core as core
from jcompress.eigen_attention.report import EigenReport, LayerReport
from jcompress.errors import UserError
from jcompress.leaves import HeadFoldedOut, HeadLowRank, materialize
from jcompress.methods import require_dense, select
from jcompress.models.config import Family, ModelConfig, Position
from jcompress.models.convert import flatten, get_path, unflatten
from jcompress.models.families import spec_for
from jcompress.models.forward import Capture, check_length
from jcompress.models.params import count_params

__all__ = ["EigenAttentionConfig", "compress", "family_defaults"]

_ROPE_FAMILIES = (Family.LLAMA, Family.QWEN2, Family.QWEN3)


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
    """

    nsamples: int = 128
    seqlen: int = 2048
    avg_dim: int = 16
    error_budget: float = 0.025
    seed: int = 2
    threshold_step: float = 0.02
    start_threshold: float | None = None
    min_threshold: float | None = None
    min_rank: int | None = None
    min_rank_fraction: float | None = None
    layers: tuple[str, ...] = (".*",)
    allow_unmatched: bool = False
    batch_size: int = 8
    offload_dir: str | None = None

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
                "allowed: 1 <= avg_dim <= nsamples"
            )
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
        if self.min_rank_fraction is not None and self.min_rank_fraction >= 1:
            raise UserError(f"min_rank_fraction: must be < 1, got {self.min_rank_fraction!r}")
        if self.offload_dir is not None and not os.path.isdir(self.offload_dir):
            raise UserError(f"offload_dir: {self.offload_dir} is not a directory")
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", (self.layers,))
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


def _check_calib(cfg: ModelConfig, calib: Any, config: EigenAttentionConfig) -> np.ndarray:
    if calib is None:
        raise UserError("calib: EigenAttention needs calibration token ids [nsamples, seqlen]")
    calib = np.asarray(calib)
    if calib.ndim != 2 or not np.issubdtype(calib.dtype, np.integer):
        raise UserError(
            f"calib: expected integer token ids [nsamples, seqlen], got {calib.dtype}"
            f"{list(calib.shape)}"
        )
    n = calib.shape[0]
    if config.avg_dim > n:
        raise UserError(
            f"avg_dim: {config.avg_dim} is larger than the {n} calibration windows; "
            "allowed: 1 <= avg_dim <= nsamples"
        )
    if calib.min() < 0 or calib.max() >= cfg.vocab_size:
        raise UserError(f"calib: token ids must lie in [0, {cfg.vocab_size})")
    check_length(cfg, calib.shape[1])
    return calib


@jax.jit
def _project(kernel: jax.Array, bias: jax.Array | None, u: jax.Array):
    """``kernel [in, heads*D]``, ``u [heads, D, r]`` -> (HeadLowRank, projected bias or None)."""
    heads, d, r = u.shape
    w = kernel.astype(jnp.float32).reshape(kernel.shape[0], heads, d)
    a = jnp.einsum("ihd,hdr->ihr", w, u).reshape(kernel.shape[0], heads * r)
    leaf = HeadLowRank(a.astype(kernel.dtype), jnp.swapaxes(u, 1, 2).astype(kernel.dtype))
    if bias is None:
        return leaf, None
    bh = bias.astype(jnp.float32).reshape(heads, d)
    proj = jnp.einsum("hd,hdr,her->he", bh, u, u).reshape(heads * d)
    return leaf, proj.astype(bias.dtype)


_materialize = jax.jit(materialize)


@functools.partial(jax.jit, static_argnames=("query_heads",))
def _fold_out(kernel: jax.Array, u: jax.Array, query_heads: int) -> HeadFoldedOut:
    """``W_o' = W_o U_v``: ``kernel [Hq*D, out]``, ``u [Hk, D, r]`` -> ``HeadFoldedOut``."""
    hk, d, r = u.shape
    uq = jnp.repeat(u, query_heads // hk, axis=0)  # [Hq, D, r]: each query head's KV basis
    w = kernel.astype(jnp.float32).reshape(query_heads, d, -1)
    folded = jnp.einsum("hdr,hdo->hro", uq, w).reshape(query_heads * r, -1)
    return HeadFoldedOut(folded.astype(kernel.dtype), jnp.swapaxes(u, 1, 2).astype(kernel.dtype))


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
    reports: list[LayerReport] = []
    feat_paths = (lay.k, lay.v) if rope else (lay.k, lay.q, lay.v)
    capture = Capture(outputs="|".join(re.escape(p) for p in feat_paths))
    # the next layer calibrates on the uncompressed outputs (Feed.ORIGINAL), as the reference
    stream = stream_layers(
        cfg,
        params,
        calib,
        batch_size=config.batch_size,
        offload_dir=config.offload_dir,
        feed=Feed.ORIGINAL,
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
            kp, qp, vp, op = (get_path(lp, r) for r in (lay.k, lay.q, lay.v, lay.o))
            for role, p in ((lay.k, kp), (lay.q, qp), (lay.v, vp), (lay.o, op)):
                require_dense(
                    f"{path}/{role}/kernel", p["kernel"], "EigenAttention", "k/q/v/o kernels"
                )
            d_k = int(kp["kernel"].shape[-1]) // hk
            d_v = int(vp["kernel"].shape[-1]) // hk
            acc_kq = GroupedGram(n=n, avg_dim=config.avg_dim, heads=hk)
            acc_v = GroupedGram(n=n, avg_dim=config.avg_dim, heads=hk)
            for ob in layer.observe(capture):
                outs = ob.captured["outputs"]
                acc_kq.add((outs[lay.k],) if rope else (outs[lay.k], outs[lay.q]), ob.real)
                acc_v.add((outs[lay.v],), ob.real)
            u_kq, s_kq = core.head_bases(acc_kq.gram)
            u_v, s_v = core.head_bases(acc_v.gram)
            frac_kq = jax.vmap(core.spectrum_fraction_core)(s_kq)
            frac_v = jax.vmap(core.spectrum_fraction_core)(s_v)

            def build(
                r_kq, r_v, lp=lp, kp=kp, qp=qp, vp=vp, op=op, u_kq=u_kq, u_v=u_v, d_k=d_k, d_v=d_v
            ):
                new = lp
                if r_kq < d_k:
                    u = u_kq[:, :, :r_kq]
                    roles = [(lay.k, kp)] if rope else [(lay.k, kp), (lay.q, qp)]
                    for role, p in roles:
                        new = _with(new, role, *_project(p["kernel"], p.get("bias"), u))
                if r_v < d_v:
                    u = u_v[:, :, :r_v]
                    new = _with(new, lay.v, *_project(vp["kernel"], vp.get("bias"), u))
                    new = _with(new, lay.o, _fold_out(op["kernel"], u, hq), None)
                return new

            def error(candidate, layer=layer) -> float:
                # dense-equivalent kernels: the original's shapes, so no recompilation; the sums
                # stay on device and this is the one host sync per candidate
                return float(layer.relative_error(_materialize(candidate)))

            best, tried, seen = None, 0, {}
            t = defaults.start
            while t > defaults.min_threshold + 1e-9:
                r_kq = min(core.rank_for_threshold(frac_kq, t), d_k)
                r_v = min(core.rank_for_threshold(frac_v, t), d_v)
                bound = max(defaults.min_rank, defaults.min_rank_fraction * hk * d_k)
                bound_v = max(defaults.min_rank, defaults.min_rank_fraction * hk * d_v)
                if best is not None and (hk * r_kq <= bound or hk * r_v <= bound_v):
                    break
                if (r_kq, r_v) not in seen:
                    seen[(r_kq, r_v)] = error(build(r_kq, r_v))
                    tried += 1
                err = seen[(r_kq, r_v)]
                if err >= config.error_budget:
                    break
                best = (round(t, 6), r_kq, r_v, err)
                t -= config.threshold_step
            if best is None:  # even the first threshold failed: the layer stays dense
                t_best, r_kq, r_v, err = None, d_k, d_v, 0.0
            else:
                t_best, r_kq, r_v, err = best
                new_lp = build(r_kq, r_v)
                layer.replace(new_lp)  # recorded only: Feed.ORIGINAL feeds the original outputs
                for k, v in flatten(new_lp).items():
                    flat_params[f"{path}/{k}"] = v
            rep = LayerReport(
                layer=i,
                path=path,
                threshold=t_best,
                rank_kq=r_kq,
                rank_v=r_v,
                head_dim_kq=d_k,
                head_dim_v=d_v,
                kv_heads=hk,
                error=err,
                steps=tried,
                compressed=best is not None and (r_kq < d_k or r_v < d_v),
                shares_q=not rope,
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
        params_after=count_params(flat_params),
    )
    return unflatten(flat_params), report
