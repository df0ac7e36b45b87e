"""``eval_fake`` / ``eval_smooth``: the output error of ``W~ = L + Q(W - L)`` on cached ``(X, Y)``.

For every measured linear and every configuration of the grid, ``Y~ = X W~ + b`` (float32,
chunked over tokens, :func:`~jcompress.quant.tokenwise.metrics.tokenwise_metrics`) is compared
with the cached ``Y``. Every configuration starts from the original weights (pure functions).
All configurations sharing a quantization spec come from one factorization (batched over ranks,
:func:`jcompress.quant.lowrank.svdq_grid`), and every configuration of a projection is measured
in one batched pass over the tokens.

The result is the seed's JSON::

  {"meta": {...},
   "by_layer": {"0": {"self_attn": {"by_proj": {"q_proj": {"rank=16;fmt=nvfp4;blk=na":
                                                           {"nmse": ..., ...}}},
                                    "agg": {"rank=16;fmt=nvfp4;blk=na":
                                            {"nmse_mean_over_proj": ...,
                                             "nmse_max_over_proj": ..., "n_proj": 4}}},
                      "mlp": {...}}}}

Configuration keys: ``rank=16;fmt=nvfp4;blk=na`` (low rank + quantized residual),
``rank=none;fmt=fp4;blk=in`` (quantization only, ``grid_mode=full``), ``rank=16;quant=none``
(low rank only, ``grid_mode=full``).

``eval_smooth`` divides ``X`` by a per-linear ``smooth_factor`` first (SmoothQuant), with the
weights ``diag(s) W``: factors computed from the cached activations with ``alpha`` (shared by
linears reading the same input; optionally ``alpha`` searched per group), or read from a
smoothed model directory (the seed's ``smooth_factor`` buffers; its weights are already
``diag(s) W``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.errors import UserError, comma_list
from jcompress.models.config import ModelConfig
from jcompress.models.convert import get_path
from jcompress.models.families import spec_for
from jcompress.models.forward import layer_params
from jcompress.quant import lowrank as lr
from jcompress.quant import smooth as sq
from jcompress.quant import split_gemm
from jcompress.quant.tokenwise.metrics import (
    NonFiniteTokens,
    tokenwise_metrics,
    tokenwise_metrics_split,
)
from jcompress.quant.tokenwise.targets import Target, layer_kernel, targets
from jcompress.quant.tokenwise.xy import XYCache

__all__ = [
    "EvalConfig",
    "GridMode",
    "Smoothing",
    "cfg_key",
    "config_items",
    "eval_grid",
    "load_smoothed",
    "open_smoothed",
    "open_weights",
    "parse_ranks",
]


class GridMode(enum.Enum):
    """``combined``: rank x spec; ``full``: also spec-only and rank-only configurations."""

    COMBINED = "combined"
    FULL = "full"


def parse_ranks(text: str, *, arg: str = "--ranks") -> tuple[int, ...]:
    """``"8,16,32"`` -> ``(8, 16, 32)``, ``""`` -> ``()``; empty entries (``8,,16``),
    negative, non-integer or duplicate ranks (``8,08``) are errors."""
    if not str(text).strip():  # "--ranks ''": no side path (grid_mode full: spec-only)
        return ()
    out: list[int] = []
    for item in comma_list(text, arg=arg, example="8,16,32", unique=False):
        try:
            r = int(item)
        except ValueError:
            raise UserError(f"{arg}: {item!r} is not an integer (e.g. {arg} 8,16,32)") from None
        if r < 0:
            raise UserError(f"{arg}: ranks must be >= 0, got {r}")
        if r in out:
            raise UserError(f"{arg}: rank {r} is given twice")
        out.append(r)
    return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Settings of ``eval_fake`` / ``eval_smooth``.

    Attributes:
      ranks: ranks (bond dimensions for mpo) of the high-precision side path.
      qspecs: quantization specs (``jcompress.quant.formats.QuantSpec``).
      method: side path: svd or mpo.
      grid_mode: combined (rank x spec) or full (also spec-only and rank-only).
      chunk_tokens: tokens per step (memory is flat in the number of tokens).
      exact_threshold: exact SVD up to this min(in, out), randomized above.
      oversample: randomized SVD oversampling.
      niter: randomized SVD power iterations.
      gemm: how ``X W~`` is computed (:class:`jcompress.quant.split_gemm.Gemm`): ``auto``
        (the exact bf16 split where it pays and the configuration factors: an ``svd`` side
        path and a quantized residual whose scales do not vary along the input dimension),
        ``fp32`` (every configuration through one float32 GEMM) or ``split_bf16``
        (the split wherever a configuration factors). The metrics agree to float32 rounding.
    """

    ranks: tuple[int, ...] = (16, 32)
    qspecs: tuple[Any, ...] = ()
    method: str = "svd"
    grid_mode: str = "combined"
    chunk_tokens: int = 4096
    exact_threshold: int = 2048
    oversample: int = 8
    niter: int = 2
    gemm: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(self.ranks))
        object.__setattr__(self, "qspecs", tuple(self.qspecs))
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 0:
                raise UserError(f"--ranks: ranks must be integers >= 0, got {r!r}")
        lr._method(self.method)
        object.__setattr__(self, "gemm", split_gemm.as_gemm(self.gemm, arg="--gemm").value)
        try:
            GridMode(self.grid_mode)
        except ValueError:
            raise UserError(
                f"--grid_mode: must be combined or full, got {self.grid_mode!r}"
            ) from None
        if GridMode(self.grid_mode) is GridMode.COMBINED and not (self.ranks and self.qspecs):
            raise UserError("--ranks / --qspecs: grid_mode combined needs both (or use full)")
        if not (self.ranks or self.qspecs):
            raise UserError("--ranks / --qspecs: nothing to evaluate")
        for f in ("chunk_tokens", "niter", "oversample", "exact_threshold"):
            v = getattr(self, f)
            low = 1 if f == "chunk_tokens" else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"--{f}: must be an integer >= {low}, got {v!r}")

    def lowrank_kw(self) -> dict[str, Any]:
        return dict(exact_threshold=self.exact_threshold, oversample=self.oversample,
                    niter=self.niter)  # fmt: skip


def cfg_key(rank: int | None, spec: Any) -> str:
    """The seed's configuration key."""
    r = "none" if rank is None else str(int(rank))
    return f"rank={r};quant=none" if spec is None else f"rank={r};{spec.key}"


def config_items(config: EvalConfig) -> list[tuple[int | None, Any]]:
    """``(rank or None, spec or None)`` in the seed's order."""
    if GridMode(config.grid_mode) is GridMode.COMBINED:
        return [(r, q) for r in config.ranks for q in config.qspecs]
    return (
        [(None, q) for q in config.qspecs]
        + [(r, None) for r in config.ranks]
        + [(r, q) for r in config.ranks for q in config.qspecs]
    )


def _spec_pair(spec: Any) -> list[str]:
    parts = dict(p.split("=", 1) for p in spec.key.split(";"))
    return [parts.get("fmt", str(spec)), parts.get("blk", "na")]


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """How ``eval_smooth`` gets ``s``: ``alpha`` (from the cached activations), ``alphas`` (a
    per-group search, scored with the first spec) or ``factors`` (``{module path: s}``, the
    weights in ``params`` already smoothed). With none of them, ``alpha`` is
    :data:`jcompress.quant.smooth.DEFAULT_ALPHA` (0.5); more than one is an error.

    Example: ``Smoothing()`` is ``Smoothing(alpha=0.5)``; ``Smoothing(alphas=(0.3, 0.5))``.
    """

    alpha: float | None = None
    alphas: tuple[float, ...] | None = None
    factors: Mapping[str, Any] | None = None
    search_tokens: int = 2048

    def __post_init__(self):
        given = sum(x is not None for x in (self.alpha, self.alphas, self.factors))
        if given > 1:
            raise UserError("eval_smooth: give at most one of --alpha, --alphas, "
                            "--smooth_model_dir")  # fmt: skip
        if given == 0:
            object.__setattr__(self, "alpha", sq.DEFAULT_ALPHA)
        if self.alpha is not None:
            sq.check_alpha(self.alpha)
        if self.alphas is not None:
            if not self.alphas:
                raise UserError("--alphas: empty")
            for a in self.alphas:
                sq.check_alpha(a, arg="--alphas")

    @property
    def source(self) -> str:
        if self.factors is not None:
            return "smooth_factor"
        return "alpha" if self.alpha is not None else "alpha_search"


def _smooth_scales(cache, members_by_group, smoothing, spec0, kernels):
    """``{target name: s [in]}`` and the chosen alpha per target from the cached activations
    (alpha modes), for the groups given (``[[Target]]``, one layer's)."""
    out: dict[str, Any] = {}
    chosen: dict[str, float] = {}
    for members in members_by_group:
        x = cache.get(f"{members[0].name}.X")
        ws = [kernels[t.name][0] for t in members]
        alpha = smoothing.alpha
        if alpha is None:
            xs = np.asarray(x[: smoothing.search_tokens], np.float32)
            alpha, _ = sq.search_alpha(xs, ws, spec0, smoothing.alphas)
        s = sq.group_scales(sq.absmax_rows(x), ws, alpha)
        for t in members:
            out[t.name] = s
            chosen[t.name] = float(alpha)
    return out, chosen


def _kernel_shape(lp: Mapping[str, Any], t: Target) -> tuple[int, int]:
    """``(in, out)`` of target ``t``'s ``[in, out]`` weight from the layer's param shapes."""
    shapes = [tuple(get_path(lp, part)["kernel"].shape) for part in t.parts]
    return shapes[0][0], sum(s[1] for s in shapes)


def open_weights(model_dir: str | os.PathLike, *, dtype: Any = None, arg: str = "--model_dir"):
    """``(cfg, weights)`` for :func:`eval_grid`: a :class:`jcompress.streaming.LayerLoader`
    (no tensor read yet; ``eval_grid`` reads one layer's measured kernels at a time), or, for
    a torch ``pytorch_model.bin`` checkpoint (which cannot be read per tensor), the whole
    params from :func:`jcompress.load_hf`."""
    from jcompress.models import load_hf
    from jcompress.streaming import LayerLoader

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"{arg}: {d} is not a model directory (no config.json)")
    safetensors = (d / "model.safetensors").is_file() or (
        d / "model.safetensors.index.json"
    ).is_file()
    torch_bin = (d / "pytorch_model.bin").is_file() or (
        d / "pytorch_model.bin.index.json"
    ).is_file()
    if torch_bin and not safetensors:
        return load_hf(d, dtype=dtype, progress=True)
    loader = LayerLoader(d, dtype=dtype)
    return loader.cfg, loader


def _measure(cache, name, w, b, inv, config, by_spec) -> dict[str, Any]:
    """``{cfg key: metrics}`` of one linear ``w [in, out]``: one factorization at the largest
    rank serves every configuration, all measured in one pass over the cached tokens per
    route (the configurations that factor through the exact bf16 split, the rest through one
    float32 GEMM; ``config.gemm``)."""
    lim = min(w.shape)
    top = max((r for r in config.ranks if r < lim), default=0)
    kw = config.lowrank_kw()
    method = lr._method(config.method)
    factors = lr.lowrank_factors(w, top, method=method, **kw) if top else None
    x, y = cache.get(f"{name}.X"), cache.get(f"{name}.Y")
    x_dtype = np.float32 if inv is not None else x.dtype  # smoothing: X / s in float32
    split = method is lr.LowRankMethod.SVD and split_gemm.use_split(config.gemm, x_dtype)
    cands, order = [], []
    parts, split_order = [], []
    for spec, lst in by_spec.items():
        if split and spec is not None and split_gemm.factors_structurally(spec, w.shape):
            inner = [(k, r) for k, r in lst if r < lim]  # the exact rank has nothing to quantize
            got = None
            if inner:
                got = lr.svdq_grid_split(w, [r for _, r in inner], spec, factors=factors, **kw)
            if got is not None:
                parts.append(got)
                split_order += [k for k, _ in inner]
                lst = [(k, r) for k, r in lst if r >= lim]
        if lst:
            ranks = [r for _, r in lst]
            cands.append(lr.svdq_grid(w, ranks, spec, method=method, factors=factors))
            order += [k for k, _ in lst]
    try:
        out = _measure_routes(x, y, b, inv, config, cands, order, parts, split_order, top)
    except NonFiniteTokens as e:
        raise UserError(
            f"{cache.arg}: {name}.{e.which}: the cache holds NaN / Inf (token {e.token})"
        ) from None
    cache.release(f"{name}.X")
    cache.release(f"{name}.Y")
    return out


def _measure_routes(x, y, b, inv, config, cands, order, parts, split_order, top):
    """The metrics of :func:`_measure`'s candidates through their two routes."""
    out: dict[str, Any] = {}
    if cands:
        ms = tokenwise_metrics(x, y, jnp.concatenate(cands, axis=0), b, inv_scale=inv,
                               chunk_tokens=config.chunk_tokens)  # fmt: skip
        out.update(zip(order, ms, strict=True))
    if parts:
        a = parts[0][0]  # the same factors for every spec
        bs, cores, cols = (jnp.concatenate([p[i] for p in parts], axis=0) for i in (1, 2, 3))
        low = (a, bs) if top > 0 else None  # plain quantization only: no side path
        ms = tokenwise_metrics_split(x, y, cores, cols, b, lowrank=low, inv_scale=inv,
                                     chunk_tokens=config.chunk_tokens)  # fmt: skip
        out.update(zip(split_order, ms, strict=True))
    return out


def eval_grid(
    cfg: ModelConfig,
    params: Any,
    cache: XYCache,
    config: EvalConfig,
    *,
    smoothing: Smoothing | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The seed's result dict for every measured linear x configuration (see module doc).

    Args:
      cfg: the model config.
      params: the model's params (a pytree in memory), or a
        :class:`jcompress.streaming.LayerLoader` on its checkpoint: then only the measured
        kernels (and biases) of one decoder layer are read at a time and released
        (:meth:`~jcompress.streaming.LayerLoader.release` of
        :data:`~jcompress.streaming.PICKED`) before the next layer is read, so the weights
        held are one layer's (``loader.peak_bytes``). The result is the same.
      cache: the ``save_xy`` cache. config: the grid. smoothing: ``eval_smooth``'s factors.
      meta: extra ``meta`` entries. progress: a progress bar over projections.

    Returns:
      ``{"meta": ..., "by_layer": ...}`` (module doc).

    Checks first, before any work: the cache belongs to this model (metadata, keys, shapes),
    every rank fits every weight, smoothing factors exist and fit. ``Y = X W + b`` on a few
    tokens is checked for every linear before any work when ``params`` is in memory, and
    layer by layer (each layer before its work) when it is a loader.
    """
    from jcompress.models.convert import unflatten
    from jcompress.streaming import PICKED, LayerLoader

    streamed = isinstance(params, LayerLoader)
    if streamed and params.cfg != cfg:
        raise ValueError("eval_grid: cfg is not the loader's config (pass loader.cfg)")
    items = config_items(config)
    ts = targets(cfg)
    cache.check_model(cfg, ts)
    by_layer: dict[int, list[Target]] = {}
    for t in ts:
        by_layer.setdefault(t.layer, []).append(t)
    root = spec_for(cfg.family.value).layout.layers

    def layer_kernels(i: int) -> dict[str, tuple[Any, Any]]:
        if not streamed:
            lp = layer_params(cfg, params, i)
            return {t.name: layer_kernel(lp, t) for t in by_layer[i]}
        want = tuple(f"{root}/{i}/{part}/" for t in by_layer[i] for part in t.parts)
        flat = params.read([p for p in params.paths(i) if p.startswith(want)])
        lp = layer_params(cfg, unflatten(flat), i)
        return {t.name: layer_kernel(lp, t) for t in by_layer[i]}

    if streamed:  # shapes from the headers: no tensor read
        shape_tree = unflatten(params.shapes())
        wshapes = {t.name: _kernel_shape(layer_params(cfg, shape_tree, t.layer), t) for t in ts}
        kernels: dict[str, tuple[Any, Any]] = {}
    else:
        kernels = {k: v for i in by_layer for k, v in layer_kernels(i).items()}
        wshapes = {k: tuple(w.shape) for k, (w, _) in kernels.items()}
    for t in ts:
        for r in config.ranks:
            lr.check_rank(r, wshapes[t.name], what=f"--ranks ({t.name}, weight "
                          f"{list(wshapes[t.name])})")  # fmt: skip
    spec0 = config.qspecs[0] if config.qspecs else None
    factor_scales: dict[str, Any] = {}
    if smoothing is not None:
        if smoothing.alphas is not None and spec0 is None:
            raise UserError("--alphas: the alpha search needs a --qspecs spec to score with")
        if smoothing.factors is not None:
            factor_scales = {
                t.name: sq.require_factor(smoothing.factors, t.name, wshapes[t.name][0]) for t in ts
            }

    def spot_check(ks: Mapping[str, tuple[Any, Any]], layer_ts: list[Target]) -> None:
        # the cache was made by this model (after smoothing for a smoothed model)
        for t in layer_ts:
            w, b = ks[t.name]
            inv = 1.0 / np.asarray(factor_scales[t.name]) if factor_scales else None
            cache.spot_check(t.name, w, b, inv)

    if not streamed:
        spot_check(kernels, ts)

    results: dict[str, Any] = {
        "meta": {
            "xy_path": str(cache.path),
            "xy_meta": dict(cache.meta),
            "xy_is_dir": cache.layout == "per_layer",
            "grid_mode": GridMode(config.grid_mode).value,
            "method": lr._method(config.method).value,
            "ranks": list(config.ranks),
            "qspecs": [_spec_pair(q) for q in config.qspecs],
            "smooth": smoothing is not None,
            "chunk_tokens": int(config.chunk_tokens),
            "gemm": config.gemm,
            **dict(meta or {}),
        },
        "by_layer": {},
    }
    if smoothing is not None:
        results["meta"]["smooth_source"] = smoothing.source

    by_spec: dict[Any, list[tuple[str, int]]] = {}
    for rank, spec in items:
        by_spec.setdefault(spec, []).append((cfg_key(rank, spec), 0 if rank is None else rank))
    keys = [cfg_key(r, q) for r, q in items]
    chosen: dict[str, float] = {}
    bar = tqdm(total=len(ts), desc="eval", disable=not progress, unit="proj")

    def run_layer(i: int, layer_ts: list[Target]) -> None:
        # a function, so that this layer's kernels are dropped on return (before the next
        # layer is read), and released from the loader's account even on an error
        ks = layer_kernels(i) if streamed else kernels
        try:
            if streamed:
                spot_check(ks, layer_ts)
            scales = factor_scales
            if smoothing is not None and smoothing.factors is None:
                groups: dict[str, list[Target]] = {}
                for t in layer_ts:
                    groups.setdefault(t.group, []).append(t)
                scales, got = _smooth_scales(cache, groups.values(), smoothing, spec0, ks)
                chosen.update(got)
            for t in layer_ts:
                w, b = ks[t.name]
                inv = None
                if smoothing is not None:
                    s = jnp.asarray(scales[t.name])
                    inv = 1.0 / s
                    if smoothing.factors is None:  # weights of the original model: smooth them
                        w = sq.apply_smooth(w, s)
                by_key = _measure(cache, t.name, w, b, inv, config, by_spec)
                blk = (
                    results["by_layer"]
                    .setdefault(str(t.layer), {})
                    .setdefault(t.block, {"by_proj": {}, "agg": {}})
                )
                blk["by_proj"][t.proj] = {k: by_key[k] for k in keys}
                bar.update(1)
        finally:
            if streamed:
                params.release(PICKED)

    for i, layer_ts in by_layer.items():
        run_layer(i, layer_ts)
    bar.close()
    if chosen:
        results["meta"]["smooth_alpha"] = chosen
    for layer in results["by_layer"].values():
        for blk in layer.values():
            for k in keys:
                vals = [p[k]["nmse"] for p in blk["by_proj"].values()]
                blk["agg"][k] = {
                    "nmse_mean_over_proj": float(sum(vals) / max(len(vals), 1)),
                    "nmse_max_over_proj": float(max(vals) if vals else 0.0),
                    "n_proj": len(vals),
                }
    return results


@contextlib.contextmanager
def open_smoothed(model_dir: str | os.PathLike, *, dtype: Any = None, stream: bool = True):
    """A smoothed model directory -> ``(cfg, weights, {module path: smooth_factor})``.

    The seed's smoothed models carry a ``smooth_factor`` buffer next to each linear
    (``model.layers.0.self_attn.q_proj.smooth_factor`` in the weights files, or in a
    ``smooth_factors.safetensors`` beside them). The factors are read, and the weights opened
    without them: with ``stream`` a :class:`jcompress.streaming.LayerLoader` (as
    :func:`open_weights`; a torch ``.bin`` checkpoint is loaded whole), else the whole params.
    ``load_hf`` and the loader refuse unknown tensors: when the buffers sit inside the weights
    file, a buffer-free copy of it is streamed to a temporary directory that lives as long as
    the context.
    """
    from jcompress.models import load_hf
    from jcompress.models.safetensors_io import SafetensorsFile, write_safetensors

    def weights(path):
        if stream:
            return open_weights(path, dtype=dtype, arg="--smooth_model_dir")
        return load_hf(path, dtype=dtype)

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"--smooth_model_dir: {d} is not a directory")
    suffix = ".smooth_factor"
    factors: dict[str, np.ndarray] = {}
    holders = []
    for f in sorted(d.glob("*.safetensors")):
        sf = SafetensorsFile(f)
        ks = [k for k in sf.keys() if k.endswith(suffix)]
        for k in ks:
            factors[k[: -len(suffix)]] = np.array(sf.get(k), np.float32)
        if ks and f.name != "smooth_factors.safetensors":
            holders.append((f, sf, ks))
    if not factors:
        raise UserError(f"--smooth_model_dir: {d} has no '*.smooth_factor' tensors")
    if not holders:
        cfg, params = weights(d)
        yield cfg, params, factors
        return
    if len(holders) > 1 or (d / "model.safetensors.index.json").exists():
        raise UserError(
            f"--smooth_model_dir: {d}: smooth_factor buffers inside sharded weights are not "
            "supported; move them to smooth_factors.safetensors"
        )
    f, sf, ks = holders[0]
    with tempfile.TemporaryDirectory(prefix="jcompress-smooth-") as tmp:
        for p in d.iterdir():
            if p.is_file() and p.suffix != ".safetensors" and not p.name.endswith(".bin"):
                os.symlink(p.resolve(), Path(tmp) / p.name)
        keep = [k for k in sf.keys() if k not in set(ks)]
        write_safetensors(
            Path(tmp) / "model.safetensors",
            [(k, sf.shape(k), sf.dtype(k), (lambda k=k: sf.get(k))) for k in keep],
        )
        cfg, params = weights(tmp)
        yield cfg, params, factors


def load_smoothed(model_dir: str | os.PathLike, *, dtype: Any = None):
    """A smoothed model directory -> ``(cfg, params, {module path: smooth_factor})``, the
    params in memory (:func:`open_smoothed` with ``stream=False``)."""
    with open_smoothed(model_dir, dtype=dtype, stream=False) as out:
        return out
