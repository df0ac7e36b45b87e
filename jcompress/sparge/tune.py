"""Per-layer, per-head SpargeAttn threshold tuning, vectorised over heads and grid points.

For every layer, calibration windows are streamed through the model with
:func:`jcompress.calibration.stream_layers`; the layer's attention-core inputs ``q, k, v``
(after RoPE) are captured through ``observe`` (``Capture`` of ``self_attn/core/...``) while
the layer runs dense. Then, per query head,
SpargeAttn's search (thu-ml/SpargeAttn ``autotune``; seed 004 tuning guide):

* ``simthreshd1`` over a grid ``-1, -1 + 1/g, ..., 1 - 1/g`` (``g = sim_grid``, upstream 16);
* for each grid point, bisection on ``cdfthreshd`` in ``[0, 1]`` for the smallest value with
  ``L1 = sum|O - O_dense| / sum|O_dense| <= l1`` (per-layer overrides ``layer_l1``);
* then bisection on ``pvthreshd`` in ``[0, pv_max]`` for the smallest value with
  ``L1 <= pv_l1``;
* per head, the grid point with the highest sparsity under ``objective`` wins; heads whose
  sparsity is ``<= min_sparsity`` stay dense.

Two sparsities are measured (both reported). Selection keeps key blocks per query *row*
(``keep [B, Hq, T, nK]``): **row sparsity** is the dropped fraction of the visible (row, key
block) pairs. The compute visits (query block, key block) tiles and visits a tile when *any* of
its rows keeps the block, so **tile sparsity** (the dropped fraction of the visible tiles, what
upstream calls sparsity and what decides speed) is lower, often much lower. ``objective="tiles"``
(default) maximises tile sparsity, ``"rows"`` row sparsity.

Upstream runs this as a Python loop over heads and grid points, one kernel call per
candidate. Here one jitted function evaluates every (grid point, head) pair of a bisection
step at once (``vmap`` over grid points, heads as an array axis), and the attention math is
done once per window: per (row, key block) partial sums ``P_j = sum_s exp(s - m)`` and
``PV_j = sum_s exp(s - m) v_s`` relative to the row's full maximum ``m``, plus block maxima for
the PV-skip rule, after which a candidate costs ``O(T x nK x Dv)`` instead of
``O(T x S x D)``. L1 numerators and denominators are summed over every calibration window.

ALiBi models (MPT): the dense reference, the partial sums and block maxima include the bias
``slopes[h] * (k_pos - q_pos)`` (slopes from the model config, positions from the window's
key validity as the model's prefill computes them), and the candidate's block selection gets
the same slopes and positions as the ``block_sparse`` implementation at run time (see
:mod:`jcompress.sparge._core` for how the bias enters the pooled block scores). So L1 is
measured against the model's true attention and the sparse side is the one that will run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.errors import UserError
from jcompress.sharding import to_host
from jcompress.sparge import _core
from jcompress.sparge.params import SpargeParams

__all__ = [
    "HeadResult",
    "LayerResult",
    "SpargeTuneConfig",
    "TuneReport",
    "alibi_slopes",
    "evaluate",
    "layer_qkv",
    "stream_evaluate",
    "stream_tune",
    "tune",
]


OBJECTIVES = ("tiles", "rows")
_KEY = {"tiles": "tile_sparsity", "rows": "row_sparsity"}


def _pos_int(name: str, v: Any, lo: int = 1, hi: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise UserError(f"{name}: must be an integer {rng}, got {v!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpargeTuneConfig:
    """Settings of :func:`tune` (frozen, validated).

    Attributes:
      l1: L1 bound of the block selection per head (seed 0.06; upstream default 0.07).
      pv_l1: L1 bound once the PV skip is on (seed 0.07; upstream 0.08); must exceed ``l1``.
      layer_l1: per-layer overrides as ``"LAYER:L1"`` strings (e.g. ``("0:0.04",)``: early
        layers stricter, the guide's advice); the PV bound of such a layer keeps the same
        margin ``pv_l1 - l1``.
      block_q: query rows per tile.
      block_k: key slots per block.
      nsamples: calibration windows (the guide: 5-10 texts).
      seqlen: tokens per calibration window.
      seed: calibration window sampling seed.
      batch_size: windows per layer call.
      sim_grid: grid granularity for simthreshd1 (``2 * sim_grid`` points in [-1, 1)).
      cdf_steps: bisection steps on cdfthreshd.
      pv_steps: bisection steps on pvthreshd (0: no PV tuning, pvthreshd = inf).
      pv_max: upper end of the pvthreshd search (nats).
      min_sparsity: heads at or below this sparsity (under ``objective``) stay dense.
      objective: the sparsity a head's grid point maximises: ``"tiles"`` (dropped fraction of
        the visible (query block, key block) tiles, what decides speed) or ``"rows"``
        (dropped fraction of the visible (row, key block) pairs).
    """

    l1: float = 0.06
    pv_l1: float = 0.07
    layer_l1: tuple[str, ...] = ()
    block_q: int = 32
    block_k: int = 32
    nsamples: int = 8
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    sim_grid: int = 16
    cdf_steps: int = 10
    pv_steps: int = 10
    pv_max: float = 50.0
    min_sparsity: float = 0.1
    objective: str = "tiles"

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective: must be one of {', '.join(OBJECTIVES)}, got "
                            f"{self.objective!r}")  # fmt: skip
        for name in ("l1", "pv_l1"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
                raise UserError(f"{name}: must be a number in (0, 1), got {v!r}")
        if self.pv_l1 <= self.l1:
            raise UserError(f"pv_l1: must exceed l1 ({self.l1}), got {self.pv_l1}")
        if isinstance(self.layer_l1, str):
            object.__setattr__(self, "layer_l1", (self.layer_l1,))
        object.__setattr__(self, "layer_l1", tuple(self.layer_l1))
        self.layer_bounds()  # validates the overrides
        for name in ("block_q", "block_k"):
            _pos_int(name, getattr(self, name), 1, 4096)
        for name in ("nsamples", "seqlen", "batch_size", "sim_grid"):
            _pos_int(name, getattr(self, name))
        for name in ("block_q", "block_k"):
            if getattr(self, name) > self.seqlen:
                raise UserError(
                    f"{name}: {getattr(self, name)} is longer than the {self.seqlen}-token "
                    f"windows (seqlen): one block would hold the whole window and none could "
                    f"be skipped; allowed: 1 <= {name} <= seqlen"
                )
        _pos_int("seed", self.seed, 0)
        _pos_int("cdf_steps", self.cdf_steps, 1, 30)
        _pos_int("pv_steps", self.pv_steps, 0, 30)
        if not isinstance(self.pv_max, (int, float)) or not 0 < self.pv_max < math.inf:
            raise UserError(f"pv_max: must be a positive finite number, got {self.pv_max!r}")
        if not isinstance(self.min_sparsity, (int, float)) or not 0 <= self.min_sparsity < 1:
            raise UserError(f"min_sparsity: must be in [0, 1), got {self.min_sparsity!r}")

    def layer_bounds(self) -> dict[int, float]:
        """``layer_l1`` parsed: ``{layer: l1}``."""
        out, seen = {}, {}
        for item in self.layer_l1:
            try:
                layer, val = str(item).split(":")
                layer, val = int(layer), float(val)
            except ValueError:
                raise UserError(f"layer_l1: {item!r} is not LAYER:L1 (e.g. 0:0.04)") from None
            if layer < 0 or not 0 < val < 1:
                raise UserError(f"layer_l1: {item!r}: layer must be >= 0 and L1 in (0, 1)")
            if layer in out:
                raise UserError(f"layer_l1: layer {layer} is given twice ({seen[layer]!r} and "
                                f"{item!r}); give each layer once")  # fmt: skip
            out[layer], seen[layer] = val, item
        return out

    def bounds(self, layer: int) -> tuple[float, float]:
        """``(l1, pv_l1)`` of one layer."""
        l1 = self.layer_bounds().get(layer, self.l1)
        return l1, l1 + (self.pv_l1 - self.l1)

    def sim_values(self) -> np.ndarray:
        g = self.sim_grid
        return np.arange(-g, g, dtype=np.float32) / g


# --------------------------------------------------------------------------- q/k/v capture


_CORE = ("q", "k", "v", "k_valid")


def _core_capture(cfg):
    """The attention core's module path and the ``Capture`` of its q/k/v inputs."""
    from jcompress.models.families import spec_for
    from jcompress.models.forward import Capture

    core = f"{spec_for(cfg.family.value).layout.attn}/core"
    return core, Capture(inputs=re.escape(core) + "/(q|k|v|k_valid|scale)")


def _observe_qkv(layer, core: str, capture) -> list:
    """``[(q, k, v, k_valid, scale) per batch]`` of one
    :class:`~jcompress.calibration.StreamLayer` (numpy, real rows only)."""
    got = []
    for ob in layer.observe(capture):
        c = ob.captured["inputs"]
        # to_host: under a multi-host mesh the batch spans other processes' devices
        q, k, v, valid = (to_host(c[f"{core}/{n}"])[: ob.real] for n in _CORE)
        got.append((q, k, v, valid, float(to_host(c[f"{core}/scale"]))))
    return got


def layer_qkv(cfg, params, windows, *, batch_size: int = 4, progress: bool = False
              ) -> Iterator[tuple[int, list]]:  # fmt: skip
    """Stream ``windows [n, T]`` through the model; yield ``(layer, [(q, k, v, k_valid,
    scale) per batch])`` with the layer's attention-core inputs (numpy, real rows only),
    captured by :meth:`~jcompress.calibration.StreamLayer.observe` (``Capture`` of
    ``<attn>/core/{q,k,v,k_valid,scale}``, see :class:`jcompress.models.forward.Capture`)."""
    from jcompress.calibration import stream_layers

    core, capture = _core_capture(cfg)
    stream = stream_layers(cfg, params, windows, batch_size=batch_size, attention="dense")
    with contextlib.closing(stream):
        for layer in tqdm(stream, total=cfg.num_layers, desc="sparge layers",
                          disable=not progress, leave=False):  # fmt: skip
            yield layer.index, _observe_qkv(layer, core, capture)


# --------------------------------------------------------------------------- evaluation


def alibi_slopes(cfg) -> np.ndarray | None:
    """The model's ALiBi slopes ``[Hq]`` (float32), or ``None`` for a model without ALiBi."""
    from jcompress.models.config import Position
    from jcompress.models.forward import _alibi_slopes

    return _alibi_slopes(cfg) if cfg.position is Position.ALIBI else None


def _positions(k_valid):
    """``[B, S]`` int32 positions of a prefill window (as ``forward.positions_from_mask``:
    real tokens count up from 0); query ``t`` of the window is key slot ``t``."""
    return jnp.maximum(jnp.cumsum(k_valid.astype(jnp.int32), axis=1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("block_k",))
def _partials(q, k, v, k_valid, scale, slopes, *, block_k):
    """Per (row, key block) partial softmax sums relative to the row's full max, block maxima
    and the dense output: the candidate-independent part of an evaluation. ``slopes [Hq]``
    (or ``None``): ALiBi bias ``slopes[h] * (k_pos - q_pos)`` added to the scores."""
    b, t, hq, d = q.shape
    s, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hk
    nk = math.ceil(s / block_k)
    sp = nk * block_k
    qg = _core._group(q, hk)
    sc = jnp.einsum("bkgtd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    sc = sc.reshape(b, hq, t, s)
    if slopes is not None:
        pos = _positions(k_valid).astype(jnp.float32)
        rel = pos[:, None, :] - pos[:, :t, None]  # [B, T, S]: k_pos - q_pos
        sc = sc + slopes[None, :, None, None] * rel[:, None]
    vis = _core._element_visible(t, s, 0, k_valid, True)[:, None]
    sc = jnp.where(vis, sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(sc - m)  # [B, Hq, T, S]
    pb = _core._pad_axis(p, sp, 3).reshape(b, hq, t, nk, block_k)
    vb = _core._pad_axis(v.astype(jnp.float32), sp, 1).reshape(b, nk, block_k, hk, dv)
    pbg = pb.reshape(b, hk, g, t, nk, block_k)
    pv = jnp.einsum("bkgtnc,bnckd->bkgtnd", pbg, vb).reshape(b, hq, t, nk, dv)
    psum = jnp.sum(pb, axis=-1)  # [B, Hq, T, nK]
    m_blk = jnp.max(_core._pad_axis(sc, sp, 3, -jnp.inf).reshape(b, hq, t, nk, block_k), -1)
    ref = jnp.sum(pv, axis=3) / jnp.maximum(jnp.sum(psum, axis=3), 1e-30)[..., None]
    return psum, pv, m_blk, ref


@functools.partial(jax.jit, static_argnames=("block_q", "block_k"))
def _evaluate_batch(q, k, k_valid, scale, slopes, parts, sim, cdf, pv, *, block_q, block_k):
    """L1 numerator / denominator, kept and visible (row, block) pairs, skipped pairs, kept
    and visible (query block, key block) tiles, per candidate and head: ``sim, cdf, pv
    [G, Hq]`` -> ``[G, 7, Hq]``."""
    psum, pvs, m_blk, ref = parts
    qrow = jnp.cumsum(k_valid, axis=1)[:, : q.shape[1]] > 0  # rows with a visible key
    rowm = qrow[:, None, :, None]
    ref_abs = jnp.sum(jnp.abs(ref) * rowm, axis=(0, 2, 3))
    pos = None if slopes is None else _positions(k_valid)

    def one(sim_g, cdf_g, pv_g):
        sel = _core.select(q, k, sim_g, cdf_g, block_q=block_q, block_k=block_k, causal=True,
                           scale=scale, k_valid=k_valid, q_pos=None if pos is None
                           else pos[:, : q.shape[1]], k_pos=pos,
                           alibi_slopes=slopes)  # fmt: skip
        keep = sel.keep
        m_kept = jnp.where(keep, m_blk, -jnp.inf)
        run = jax.lax.cummax(m_kept, axis=3)
        m_prev = jnp.concatenate([jnp.full_like(run[..., :1], -jnp.inf), run[..., :-1]], 3)
        skip = (keep & jnp.isfinite(m_kept) & jnp.isfinite(m_prev)
                & (m_kept < m_prev - pv_g[None, :, None, None]))  # fmt: skip
        use = (keep & ~skip).astype(jnp.float32)
        num = jnp.einsum("bhtn,bhtnd->bhtd", use, pvs)
        den = jnp.sum(keep * psum, axis=3)
        out = num / jnp.maximum(den, 1e-30)[..., None]
        err = jnp.sum(jnp.abs(out - ref) * rowm, axis=(0, 2, 3))
        valid = sel.q_valid[:, None, :, None]
        kept = jnp.sum(keep & valid, axis=(0, 2, 3))
        visible = jnp.sum(sel.visible & valid, axis=(0, 2, 3))
        skipped = jnp.sum(skip & valid, axis=(0, 2, 3))
        bq = min(block_q, q.shape[1])
        tiles = jnp.sum(_core.tiles_from_rows(keep & valid, bq), axis=(0, 2, 3))
        vtiles = jnp.sum(_core.tiles_from_rows(sel.visible & valid, bq), axis=(0, 2, 3))
        return jnp.stack([err, ref_abs, kept, visible, skipped, tiles, vtiles]
                         ).astype(jnp.float32)  # fmt: skip

    return jax.vmap(one)(sim, cdf, pv)  # [G, 7, Hq]


class _LayerData:
    """One layer's calibration batches with their candidate-independent partial sums
    (``slopes [Hq]``: the model's ALiBi slopes, ``None`` without ALiBi)."""

    def __init__(self, batches: list, block_k: int, slopes: np.ndarray | None = None):
        self.items = []
        self.slopes = None if slopes is None else jnp.asarray(slopes, jnp.float32)
        for q, k, v, valid, scale in batches:
            qa, ka, va, vv = (jnp.asarray(x) for x in (q, k, v, valid))
            parts = _partials(qa, ka, va, vv, jnp.float32(scale), self.slopes, block_k=block_k)
            self.items.append((qa, ka, vv, jnp.float32(scale), parts))
        self.evaluations = 0

    def evaluate(self, sim, cdf, pv, block_q, block_k) -> dict[str, np.ndarray]:
        """``sim, cdf, pv [G, Hq]`` -> ``{"l1", "row_sparsity", "tile_sparsity", "pv_skip"}``
        arrays ``[G, Hq]`` summed over every batch."""
        tot = None
        for q, k, valid, scale, parts in self.items:
            r = _evaluate_batch(q, k, valid, scale, self.slopes, parts, jnp.asarray(sim),
                                jnp.asarray(cdf), jnp.asarray(pv), block_q=block_q,
                                block_k=block_k)  # fmt: skip
            tot = r if tot is None else tot + r
        self.evaluations += 1
        tot = np.asarray(tot, np.float64)
        err, ref, kept, vis, skipped, tiles, vtiles = (tot[:, i] for i in range(7))
        return {
            "l1": err / np.maximum(ref, 1e-30),
            "row_sparsity": 1.0 - kept / np.maximum(vis, 1.0),
            "tile_sparsity": 1.0 - tiles / np.maximum(vtiles, 1.0),
            "pv_skip": skipped / np.maximum(kept, 1.0),
        }


_METRICS = ("row_sparsity", "tile_sparsity", "l1", "pv_skip")


def _bisect(data, sim, lo, hi, fixed, which, bound, steps, cfg):
    """Vectorised bisection on ``cdfthreshd`` (``which="cdf"``) or ``pvthreshd``: the smallest
    value in ``[lo, hi]`` whose L1 stays ``<= bound`` (``hi`` assumed feasible)."""
    lo, hi = lo.copy(), hi.copy()
    for _ in range(steps):
        mid = (lo + hi) / 2
        cdf, pv = (mid, fixed) if which == "cdf" else (fixed, mid)
        ok = data.evaluate(sim, cdf, pv, cfg.block_q, cfg.block_k)["l1"] <= bound
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return hi


def _candidates(data: _LayerData, hq: int, layer: int, cfg: SpargeTuneConfig):
    """Per (grid point, head) the bisected thresholds: ``sim, cdf, pv [G, Hq]``."""
    l1, pv_l1 = cfg.bounds(layer)
    sims = cfg.sim_values()
    g = len(sims)
    sim = np.repeat(sims[:, None], hq, axis=1).astype(np.float32)  # [G, Hq]
    inf = np.full((g, hq), np.inf, np.float32)
    cdf = _bisect(data, sim, np.zeros((g, hq), np.float32), np.ones((g, hq), np.float32), inf,
                  "cdf", l1, cfg.cdf_steps, cfg)  # fmt: skip
    if cfg.pv_steps:
        pv = _bisect(data, sim, np.zeros((g, hq), np.float32),
                     np.full((g, hq), cfg.pv_max, np.float32), cdf, "pv", pv_l1, cfg.pv_steps,
                     cfg)  # fmt: skip
    else:
        pv = inf
    return sim, cdf, pv


def _tune_layer(data: _LayerData, hq: int, layer: int, cfg: SpargeTuneConfig):
    """The best grid point per head under ``cfg.objective`` (heads at or below
    ``min_sparsity`` stay dense): ``({threshold / metric: [Hq], "dense": [Hq]}, bounds)``."""
    sim, cdf, pv = _candidates(data, hq, layer, cfg)
    res = data.evaluate(sim, cdf, pv, cfg.block_q, cfg.block_k)
    key = _KEY[cfg.objective]
    best = np.argmax(res[key], axis=0)  # first (lowest simthreshd1) among ties
    h = np.arange(hq)
    out = {
        "simthreshd1": sim[best, h], "cdfthreshd": cdf[best, h], "pvthreshd": pv[best, h],
        **{k: res[k][best, h] for k in _METRICS},
    }  # fmt: skip
    dense = out[key] <= cfg.min_sparsity
    out["simthreshd1"] = np.where(dense, -1.0, out["simthreshd1"])
    out["cdfthreshd"] = np.where(dense, 1.0, out["cdfthreshd"])
    out["pvthreshd"] = np.where(dense, np.inf, out["pvthreshd"])
    for k in _METRICS:
        out[k] = np.where(dense, 0.0, out[k])
    out["dense"] = dense
    return out, cfg.bounds(layer)


# --------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class HeadResult:
    """One head's thresholds and, on the calibration windows, its row sparsity (dropped
    fraction of the visible (row, key block) pairs), tile sparsity (dropped fraction of the
    visible (query block, key block) tiles), L1 and PV-skip fraction (of the kept pairs)."""

    head: int
    simthreshd1: float
    cdfthreshd: float
    pvthreshd: float
    row_sparsity: float
    tile_sparsity: float
    l1: float
    pv_skip: float
    dense: bool


@dataclasses.dataclass(frozen=True)
class LayerResult:
    layer: int
    l1_bound: float
    pv_l1_bound: float
    heads: tuple[HeadResult, ...]
    evaluations: int  # bisection / grid evaluations (each covers every head and grid point)

    @property
    def mean_row_sparsity(self) -> float:
        return float(np.mean([h.row_sparsity for h in self.heads]))

    @property
    def mean_tile_sparsity(self) -> float:
        return float(np.mean([h.tile_sparsity for h in self.heads]))


@dataclasses.dataclass(frozen=True)
class TuneReport:
    """What :func:`tune` did: per layer and head thresholds, row and tile sparsity (see
    :class:`HeadResult`), L1 on the calibration windows, PV-skip fraction; tuning wall time
    and attention evaluations per head. ``config["objective"]`` names the sparsity that was
    maximised."""

    layers: tuple[LayerResult, ...]
    config: dict[str, Any]
    wall_seconds: float
    evaluations_per_head: int

    @property
    def mean_row_sparsity(self) -> float:
        return float(np.mean([h.row_sparsity for lay in self.layers for h in lay.heads]))

    @property
    def mean_tile_sparsity(self) -> float:
        return float(np.mean([h.tile_sparsity for lay in self.layers for h in lay.heads]))

    def to_json(self) -> dict[str, Any]:
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return "inf" if x > 0 else "-inf"
            return x

        return {
            "config": self.config,
            "wall_seconds": self.wall_seconds,
            "evaluations_per_head": self.evaluations_per_head,
            "objective": self.config.get("objective"),
            "mean_row_sparsity": self.mean_row_sparsity,
            "mean_tile_sparsity": self.mean_tile_sparsity,
            "layers": [
                {
                    "layer": lay.layer,
                    "l1_bound": lay.l1_bound,
                    "pv_l1_bound": lay.pv_l1_bound,
                    "mean_row_sparsity": lay.mean_row_sparsity,
                    "mean_tile_sparsity": lay.mean_tile_sparsity,
                    "heads": [
                        {k: clean(v) for k, v in dataclasses.asdict(h).items()} for h in lay.heads
                    ],
                }
                for lay in self.layers
            ],
        }

    def to_markdown(self) -> str:
        lines = [
            f"SpargeAttn tuning (objective: {self.config.get('objective')} sparsity): mean "
            f"tile sparsity {self.mean_tile_sparsity:.3f}, mean row sparsity "
            f"{self.mean_row_sparsity:.3f}, {self.wall_seconds:.1f} s, "
            f"{self.evaluations_per_head} attention evaluations per head",
            "",
            "| layer | head | simthreshd1 | cdfthreshd | pvthreshd | tile sparsity "
            "| row sparsity | L1 | PV skip |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for lay in self.layers:
            for h in lay.heads:
                tag = " (dense)" if h.dense else ""
                lines.append(
                    f"| {lay.layer} | {h.head}{tag} | {h.simthreshd1:.4f} | {h.cdfthreshd:.4f} "
                    f"| {h.pvthreshd:.2f} | {h.tile_sparsity:.3f} | {h.row_sparsity:.3f} "
                    f"| {h.l1:.4f} | {h.pv_skip:.3f} |"
                )
            lines.append(
                f"| {lay.layer} | mean | | | | {lay.mean_tile_sparsity:.3f} | "
                f"{lay.mean_row_sparsity:.3f} | (bound {lay.l1_bound:g}) | |"
            )
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- public API


def tune(cfg, params, windows, config: SpargeTuneConfig | None = None, *,
         progress: bool = True) -> tuple[SpargeParams, TuneReport]:  # fmt: skip
    """Tune per-layer, per-head thresholds on calibration ``windows [n, T]``.

    Returns ``(SpargeParams [layers, heads], TuneReport)``."""
    config = config or SpargeTuneConfig()
    check_layers(cfg, config)
    t0 = time.perf_counter()
    outs = {}
    for li, batches in layer_qkv(cfg, params, windows, batch_size=config.batch_size,
                                 progress=progress):  # fmt: skip
        outs[li] = _tune_batches(batches, cfg.num_heads, li, config, alibi_slopes(cfg))
    return _assemble(cfg, outs, config, t0)


def stream_tune(model, windows, config: SpargeTuneConfig | None = None, *,
                work_dir=None, resume: bool = False, dtype: Any = None, offload_dir=None,
                progress: bool = True, on_layer=None
                ) -> tuple[SpargeParams, TuneReport] | None:  # fmt: skip
    """:func:`tune` reading the checkpoint one decoder layer at a time.

    Each layer is read from the safetensors shards, its q/k/v captured and its thresholds
    tuned exactly as :func:`tune` does, then dropped
    (:func:`jcompress.streaming.stream_analysis`: peak memory ~ one layer plus the windows'
    hidden states, offloaded with ``offload_dir``). With ``work_dir`` every finished layer's
    thresholds are kept there, so an interrupted run continues with ``resume=True`` from the
    last finished layer. The thresholds equal :func:`tune`'s.

    Args:
      model: checkpoint directory (safetensors) or a
        :class:`~jcompress.streaming.LayerLoader` (its account shows what was held).
      windows, config: as for :func:`tune`.
      work_dir, resume, offload_dir, progress, on_layer: as for
        :func:`~jcompress.streaming.stream_analysis`.
      dtype: load dtype (as :func:`jcompress.load_hf`); ignored when ``model`` is a loader.

    Returns:
      ``(SpargeParams [layers, heads], TuneReport)`` (``None`` on processes other than 0 of a
      multi-host run).
    """
    from jcompress.streaming import LayerLoader, stream_analysis

    config = config or SpargeTuneConfig()
    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    cfg = loader.cfg
    check_layers(cfg, config)
    t0 = time.perf_counter()
    core, capture = _core_capture(cfg)

    def one(layer):
        return _tune_batches(_observe_qkv(layer, core, capture), cfg.num_heads, layer.index,
                             config, alibi_slopes(cfg))  # fmt: skip

    res = stream_analysis(loader, one, windows, method="sparge", config=config,
                          batch_size=config.batch_size, attention="dense", work_dir=work_dir,
                          resume=resume, offload_dir=offload_dir, progress=progress,
                          on_layer=on_layer)  # fmt: skip
    if res is None:
        return None
    return _assemble(cfg, res.results, config, t0)


def check_layers(cfg, config: SpargeTuneConfig) -> None:
    """Every ``layer_l1`` override names a layer the model has."""
    bad = [lay for lay in config.layer_bounds() if lay >= cfg.num_layers]
    if bad:
        raise UserError(f"layer_l1: layer {bad[0]} does not exist (the model has "
                        f"{cfg.num_layers} layers)")  # fmt: skip


def _tune_batches(batches: list, hq: int, li: int, config: SpargeTuneConfig,
                  slopes: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """One layer's tuning: ``{threshold / metric: [Hq], "bounds": [2], "evaluations": []}``
    (``slopes``: the model's ALiBi slopes, see :func:`alibi_slopes`)."""
    data = _LayerData(batches, config.block_k, slopes)
    out, bounds = _tune_layer(data, hq, li, config)
    return {**out, "bounds": np.asarray(bounds, np.float64),
            "evaluations": np.asarray(data.evaluations)}  # fmt: skip


def _assemble(cfg, outs: dict[int, dict[str, np.ndarray]], config: SpargeTuneConfig,
              t0: float) -> tuple[SpargeParams, TuneReport]:  # fmt: skip
    """``SpargeParams`` and the report from every layer's :func:`_tune_batches`."""
    hq = cfg.num_heads
    rows = {k: np.zeros((cfg.num_layers, hq), np.float32)
            for k in ("simthreshd1", "cdfthreshd", "pvthreshd")}  # fmt: skip
    layers = []
    evals = 0
    for li in sorted(outs):
        out = outs[li]
        for k in rows:
            rows[k][li] = out[k]
        n_eval = int(out["evaluations"])
        evals = n_eval * len(config.sim_values())
        l1, pv_l1 = (float(b) for b in out["bounds"])
        layers.append(LayerResult(
            li, l1, pv_l1,
            tuple(HeadResult(h, float(out["simthreshd1"][h]), float(out["cdfthreshd"][h]),
                             float(out["pvthreshd"][h]), float(out["row_sparsity"][h]),
                             float(out["tile_sparsity"][h]), float(out["l1"][h]),
                             float(out["pv_skip"][h]),
                             bool(out["dense"][h])) for h in range(hq)),
            n_eval,
        ))  # fmt: skip
    p = SpargeParams(**rows)
    p.validate()
    cfg_json = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return p, TuneReport(tuple(layers), cfg_json, time.perf_counter() - t0, evals)


def evaluate(cfg, params, windows, sparge_params: SpargeParams, *, block_q: int = 32,
             block_k: int = 32, batch_size: int = 4, progress: bool = False
             ) -> dict[str, np.ndarray]:  # fmt: skip
    """Per layer and head ``{"l1", "row_sparsity", "tile_sparsity", "pv_skip"}`` arrays
    ``[layers, heads]`` of
    ``sparge_params`` on ``windows`` (e.g. held-out text), each layer fed the dense model's
    activations (as during tuning)."""
    sparge_params.check_model(cfg.num_layers, cfg.num_heads)
    out = {k: np.zeros((cfg.num_layers, cfg.num_heads)) for k in _METRICS}
    for li, batches in layer_qkv(cfg, params, windows, batch_size=batch_size,
                                 progress=progress):  # fmt: skip
        r = _evaluate_layer(batches, li, {"": sparge_params}, block_q, block_k,
                            alibi_slopes(cfg))  # fmt: skip
        for k in out:
            out[k][li] = r[f".{k}"]
    return out


def _evaluate_layer(batches: list, li: int, candidates: dict[str, SpargeParams], block_q: int,
                    block_k: int, slopes: np.ndarray | None) -> dict[str, np.ndarray]:  # fmt: skip
    """One layer's metrics of every thresholds set: ``{"<name>.<metric>": [Hq]}`` (the
    candidate-independent partial sums computed once for all sets)."""
    data = _LayerData(batches, block_k, slopes)
    out = {}
    for name, p in candidates.items():
        r = data.evaluate(*(np.asarray(a, np.float32)[None] for a in p.layer(li)), block_q,
                          block_k)  # fmt: skip
        out.update({f"{name}.{k}": r[k][0] for k in _METRICS})
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class _EvalIdentity:
    """What a resumable :func:`stream_evaluate` run measures (its work directory's config):
    block sizes and, per thresholds set, a digest of its arrays."""

    block_q: int
    block_k: int
    thresholds: tuple[tuple[str, str], ...]


def _digest(p: SpargeParams) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in p:
        h.update(np.ascontiguousarray(np.asarray(a, np.float32)).tobytes())
    return h.hexdigest()


def stream_evaluate(model, windows, candidates: dict[str, SpargeParams], *, block_q: int = 32,
                    block_k: int = 32, batch_size: int = 4, work_dir=None, resume: bool = False,
                    offload_dir=None, dtype: Any = None, progress: bool = False
                    ) -> dict[str, dict[str, np.ndarray]] | None:  # fmt: skip
    """:func:`evaluate` of several thresholds sets in one pass over the checkpoint, read one
    decoder layer at a time (:func:`jcompress.streaming.stream_analysis`: peak weights held
    ~ one layer; the windows' hidden states in memory or in ``offload_dir``). Each layer's
    q/k/v are captured once and every set is measured on them; the numbers equal
    :func:`evaluate`'s for each set.

    Args:
      model: checkpoint directory (safetensors) or a
        :class:`~jcompress.streaming.LayerLoader` (its account shows what was held).
      windows: ``[n, T]`` token ids (e.g. held-out text).
      candidates: ``{name: SpargeParams [layers, heads]}``, e.g. tuned and untuned.
      block_q, block_k, batch_size: as for :func:`evaluate`.
      work_dir, resume, offload_dir, progress: as for
        :func:`~jcompress.streaming.stream_analysis` (a resume with other thresholds or
        block sizes is an error).
      dtype: load dtype; ignored when ``model`` is a loader.

    Returns:
      ``{name: {"l1", "row_sparsity", "tile_sparsity", "pv_skip": [layers, heads]}}``
      (``None`` on processes other than 0 of a multi-host run).

    Raises:
      UserError: a thresholds set that is not ``[layers, heads]`` of the model, no set, or
        what :func:`~jcompress.streaming.stream_analysis` refuses -- before any layer is read.
    """
    from jcompress.streaming import LayerLoader, stream_analysis

    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    cfg = loader.cfg
    if not candidates:
        raise UserError("candidates: at least one thresholds set is needed")
    for name, p in candidates.items():
        p.check_model(cfg.num_layers, cfg.num_heads, arg=f"candidates[{name!r}]")
    core, capture = _core_capture(cfg)
    slopes = alibi_slopes(cfg)

    def one(layer):
        return _evaluate_layer(_observe_qkv(layer, core, capture), layer.index, candidates,
                               block_q, block_k, slopes)  # fmt: skip

    digests = tuple((n, _digest(p)) for n, p in candidates.items())
    ident = _EvalIdentity(block_q=block_q, block_k=block_k, thresholds=digests)
    res = stream_analysis(loader, one, windows, method="sparge-eval", config=ident,
                          batch_size=batch_size, attention="dense", work_dir=work_dir,
                          resume=resume, offload_dir=offload_dir, progress=progress)  # fmt: skip
    if res is None:
        return None
    return {name: {k: np.stack([res.results[li][f"{name}.{k}"]
                                for li in range(cfg.num_layers)]).astype(np.float64)
                   for k in _METRICS}
            for name in candidates}  # fmt: skip
