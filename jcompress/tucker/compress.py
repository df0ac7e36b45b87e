"""Tensor-network compression of attention projections as a pure transform of a param pytree.

Variants (:class:`Variant`), data-free (issue #18, first increment):

* ``tt``: every selected ``[in, out]`` kernel becomes a TT-matrix (MPO) with ``n_cores`` cores
  (:class:`~jcompress.tucker.tucker_core.TTLinear`). Bond ranks are fixed (``tt_ranks``) or
  chosen per matrix by the energy rule ``mps_eps`` (keep the fewest singular values of each
  unfolding whose squared sum reaches ``mps_eps`` of the total).
* ``tucker``: every selected projection ``[hidden, heads * head_dim]`` is viewed as the 3-way
  tensor ``[hidden, heads, head_dim]`` and decomposed by HOOI at multilinear ranks
  ``hooi_ranks`` (:class:`~jcompress.tucker.tucker_core.TuckerLinear`).

Batching: with fixed ranks (``tucker``; ``tt`` with ``tt_ranks``) the kernels of one shape and
rank setting (e.g. every layer's k_proj) are stacked and decomposed in one jit-compiled call,
``jax.lax.map`` of the per-matrix decomposition over the stack (:func:`_mapped`): one dispatch
and one compilation per group, each item exactly the per-matrix computation. Not ``vmap``: a
``vmap``-ed HOOI batches LAPACK ``eigh`` / ``qr`` inside a batched ``lax.while_loop``, and such
a graph deadlocked XLA:CPU at 0% CPU in CI (see :mod:`jcompress.decomp.tucker_core`);
``lax.map`` keeps every custom call unbatched. ``tt`` with ``mps_eps`` picks ranks from each
matrix's singular values on the host, so it runs one matrix at a time.

Neither leaf is :class:`jcompress.leaves.Factored`, so a compressed k/v projection does not
shrink the KV cache: the forward pass caches the full pre-RoPE k/v it computes with
``leaf.apply`` (the report states the KV size, unchanged). Parameters and the weight traffic
of the projections shrink; ``apply`` never builds the dense kernel.

Biases are left as they are (dense).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress import validate
from jcompress.calibration import Feed, stream_layers
from jcompress.decomp import factorize, tt_svd_ranks
from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf, HeadFoldedOut, HeadLowRank
from jcompress.methods import require_dense, select
from jcompress.models.config import ModelConfig
from jcompress.models.convert import flatten, unflatten
from jcompress.models.families import spec_for
from jcompress.models.params import count_params, count_stored_params
from jcompress.tucker.mps import MpsStep, compress_mps, plan_mps
from jcompress.tucker.report import ProjectionReport, TuckerReport
from jcompress.tucker.tucker_core import TTLinear, TuckerLinear, tt_linear, tucker_linear

__all__ = ["DEFAULT_LAYERS", "TuckerConfig", "Variant", "check_fits", "compress"]

# k/q/v projections of every family in one rule (so it is never reported unused):
# llama/qwen/opt `.../self_attn/q_proj`, GPT-2's fused `.../attn/c_attn/q`, MPT's `.../attn/Wqkv/k`
DEFAULT_LAYERS: tuple[str, ...] = (r".*/((k|q|v)_proj|(c_attn|Wqkv)/(q|k|v))",)


class Variant(enum.Enum):
    """Which decomposition replaces a selected kernel."""

    TT = "tt"  # TT-matrix (MPO) of the [in, out] kernel
    TUCKER = "tucker"  # Tucker of [hidden, heads, head_dim]
    TUCKER_MPS = "tucker_mps"  # data-aware Kronecker output bases (jcompress.tucker.mps)


def _ints(value: Any, name: str) -> tuple[int, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise UserError(f"{name}: expected a non-empty tuple of positive integers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise UserError(f"{name}: expected positive integers, got {value!r}")
        out.append(int(v))
    return tuple(out)


_VARIANT_FIELDS: dict[Any, tuple[str, ...]] = {
    Variant.TT: ("mps_eps", "tt_ranks", "n_cores"),
    Variant.TUCKER: ("hooi_ranks", "hooi_ranks_q", "hooi_ranks_k", "hooi_ranks_v", "hooi_iters"),
    Variant.TUCKER_MPS: ("mps_eps", "tt_ranks", "n_cores", "hooi_iters", "basis_ranks"),
    "all": (
        "mps_eps",
        "tt_ranks",
        "n_cores",
        "hooi_ranks",
        "hooi_ranks_q",
        "hooi_ranks_k",
        "hooi_ranks_v",
        "hooi_iters",
        "basis_ranks",
    ),  # fmt: skip
}
"""The decomposition settings each :class:`Variant` reads (:class:`TuckerConfig` refuses a
non-default value of any other)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuckerConfig:
    """Settings of :func:`compress`.

    Attributes:
      variant: :class:`Variant` (or its value, ``"tt"`` / ``"tucker"`` / ``"tucker_mps"``).
      mps_eps: ``tt`` / ``tucker_mps`` energy rule in ``(0, 1]`` (1: exact up to rounding);
        used when ``tt_ranks`` is not given. ``tucker_mps`` applies it to the projected
        weights ``a = W (I (x) P)`` (nested TT-matrix leaves); there ``mps_eps = 1`` keeps
        ``a`` dense (an exact TT would only add parameters).
      tt_ranks: ``tt`` / ``tucker_mps`` fixed bond ranks (``n_cores - 1`` positive ints), or
        ``None`` (use ``mps_eps``). Each must fit the bond it sits on (checked per kernel,
        or per projected weight, before any work).
      n_cores: ``tt`` / ``tucker_mps`` number of cores (>= 2); modes by
        :func:`jcompress.decomp.factorize`.
      hooi_ranks: ``tucker`` multilinear ranks ``(r_hidden, r_heads, r_head_dim)`` of every
        selected projection without its own setting below; each at most its mode size
        (checked per kernel before any work).
      hooi_ranks_q, hooi_ranks_k, hooi_ranks_v: ``tucker`` ranks of the q / k / v projections
        (``None``: ``hooi_ranks``). In a GQA model k/v have ``num_kv_heads`` heads and q
        ``num_heads``, so their ``r_heads`` bounds differ.
      hooi_iters: ``tucker`` / ``tucker_mps`` most HOOI sweeps (0: HOSVD).
      basis_ranks: ``tucker_mps`` ranks of the Kronecker factors of the per-head output basis;
        ``head_dim`` is split into ``len(basis_ranks)`` modes (``factorize``), each rank at most
        its mode; the latent width per head is their product.
      layers: regex rules (``re.fullmatch``, first match wins) over projection paths such as
        ``model/layers/3/self_attn/k_proj``; only k/q/v projections are candidates.
      allow_unmatched: a ``layers`` rule that matches no projection is an error before any
        work; with this set it is only warned about and listed in the report (main's
        ``methods.select`` protocol; see :func:`_select`).
      batch_size, offload_dir: calibration stream settings (only when ``calib`` is given: the
        per-layer output error is reported).
    """

    variant: Variant = Variant.TT
    mps_eps: float = 0.99
    tt_ranks: tuple[int, ...] | None = None
    n_cores: int = 3
    hooi_ranks: tuple[int, ...] = (6, 6, 8)
    hooi_ranks_q: tuple[int, ...] | None = None
    hooi_ranks_k: tuple[int, ...] | None = None
    hooi_ranks_v: tuple[int, ...] | None = None
    hooi_iters: int = 100
    basis_ranks: tuple[int, ...] = (4, 4)
    layers: tuple[str, ...] = DEFAULT_LAYERS
    allow_unmatched: bool = False
    batch_size: int = 8
    offload_dir: str | None = None

    def __post_init__(self):
        if not isinstance(self.variant, Variant):
            allowed = ", ".join(v.value for v in Variant)
            try:
                object.__setattr__(self, "variant", Variant(self.variant))
            except ValueError:
                raise UserError(
                    f"variant: must be one of {allowed}, got {self.variant!r}"
                ) from None
        m = self.mps_eps
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 < m <= 1:
            raise UserError(f"mps_eps: must be in (0, 1], got {m!r}")
        if not isinstance(self.allow_unmatched, bool):
            raise UserError(f"allow_unmatched: must be True or False, got {self.allow_unmatched!r}")
        for name in ("n_cores", "hooi_iters", "batch_size"):
            v, low = getattr(self, name), {"n_cores": 2, "hooi_iters": 0, "batch_size": 1}[name]
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise UserError(f"{name}: must be an integer >= {low}, got {v!r}")
        if self.tt_ranks is not None:
            r = _ints(self.tt_ranks, "tt_ranks")
            if len(r) != self.n_cores - 1:
                raise UserError(
                    f"tt_ranks: n_cores={self.n_cores} needs {self.n_cores - 1} bond ranks, "
                    f"got {len(r)} ({list(r)})"
                )
            object.__setattr__(self, "tt_ranks", r)
        for name in ("hooi_ranks", "hooi_ranks_q", "hooi_ranks_k", "hooi_ranks_v"):
            v = getattr(self, name)
            if v is None and name != "hooi_ranks":
                continue
            h = _ints(v, name)
            if len(h) != 3:
                raise UserError(f"{name}: must be 3 ranks (hidden, heads, head_dim), got {list(h)}")
            object.__setattr__(self, name, h)
        object.__setattr__(self, "basis_ranks", _ints(self.basis_ranks, "basis_ranks"))
        if isinstance(self.layers, str) or not all(isinstance(r, str) for r in self.layers):
            raise UserError(f"layers: must be a tuple of regex strings, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:  # would run the whole job on nothing
            raise UserError(
                "layers: is empty; give at least one regex (default: every k/q/v projection)"
            )
        # a setting the variant never reads is a mistake, not a no-op
        used = _VARIANT_FIELDS[self.variant]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _VARIANT_FIELDS["all"]:
            if name not in used and getattr(self, name) != defaults[name]:
                raise UserError(
                    f"{name}: not used by variant {self.variant.value} (it reads "
                    f"{', '.join(used)}); drop it or choose the variant that uses it"
                )
        if self.tt_ranks is not None and self.mps_eps != defaults["mps_eps"]:
            raise UserError(
                "mps_eps: not used when tt_ranks fixes the bond ranks; give one of the two"
            )
        if (
            self.variant is Variant.TUCKER_MPS
            and self.mps_eps == 1
            and self.tt_ranks is None
            and self.n_cores != defaults["n_cores"]
        ):
            raise UserError(
                "n_cores: not used by tucker_mps with mps_eps=1 (the projected weights stay "
                "dense); lower mps_eps or give tt_ranks to split them into cores"
            )


@dataclasses.dataclass(frozen=True)
class _Job:
    path: str  # projection path (kernel at path + "/kernel")
    layer: str  # layer path
    role: str  # "q" / "k" / "v"
    kernel: Any


_MODES = ("hidden", "heads", "head_dim")


def _hooi_ranks(config: TuckerConfig, role: str) -> tuple[int, int, int]:
    """The ``tucker`` ranks of a ``"q"`` / ``"k"`` / ``"v"`` projection."""
    own = getattr(config, f"hooi_ranks_{role}")
    return config.hooi_ranks if own is None else own


def _ranks_name(config: TuckerConfig, role: str) -> str:
    return "hooi_ranks" if getattr(config, f"hooi_ranks_{role}") is None else f"hooi_ranks_{role}"


def _plan(cfg: ModelConfig, jobs: list[_Job], config: TuckerConfig) -> None:
    """Every rank checked against every kernel before any decomposition."""
    for job in jobs:
        n_in, n_out = (int(s) for s in job.kernel.shape)
        if config.variant is Variant.TUCKER:
            heads, rem = divmod(n_out, cfg.head_dim)
            if rem or heads < 1:
                raise UserError(
                    f"params: {job.path}/kernel has width {n_out}, not a multiple of "
                    f"head_dim {cfg.head_dim}; tucker needs [hidden, heads * head_dim]"
                )
            sizes = (n_in, heads, cfg.head_dim)
            ranks = _hooi_ranks(config, job.role)
            for k, (r, size) in enumerate(zip(ranks, sizes, strict=True)):
                if r > size:
                    name = _ranks_name(config, job.role)
                    raise UserError(
                        f"{name}[{k}]: {r} exceeds the {_MODES[k]} mode size {size} of "
                        f"{job.path} (viewed as [hidden, heads, head_dim] = {list(sizes)})"
                    )
        elif config.tt_ranks is not None:
            d = config.n_cores
            merged = tuple(
                m * n for m, n in zip(factorize(n_in, d), factorize(n_out, d), strict=True)
            )
            try:
                tt_svd_ranks(merged, config.tt_ranks)
            except UserError as e:
                raise UserError(
                    f"tt_ranks: {e} for {job.path} ([{n_in}, {n_out}] as MPO modes {list(merged)})"
                ) from None


def check_fits(cfg: ModelConfig, config: TuckerConfig) -> None:
    """Every rank of ``config`` against the projection shapes ``cfg`` implies (q:
    ``[hidden, num_heads * head_dim]``, k/v: ``[hidden, num_kv_heads * head_dim]``), without
    any weights: the checks :func:`compress` runs first, for callers (the CLI) that want them
    before loading a model. Raises :class:`UserError` like :func:`compress`."""
    lay = spec_for(cfg.family.value).layout
    heads = {"q": cfg.num_heads, "k": cfg.num_kv_heads, "v": cfg.num_kv_heads}
    cands = [
        (f"{lay.layers}/{i}", f"{lay.layers}/{i}/{path}", role)
        for i in range(cfg.num_layers)
        for role, path in (("q", lay.q), ("k", lay.k), ("v", lay.v))
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sel = select(config.layers, [p for _, p, _ in cands], allow_unmatched=True)
    jobs = [
        _Job(path, layer, role, jax.ShapeDtypeStruct(
            (cfg.hidden_size, heads[role] * cfg.head_dim), jnp.float32
        ))
        for layer, path, role in cands
        if path in sel
    ]  # fmt: skip
    if config.variant is Variant.TUCKER_MPS:
        roles: dict[str, set[str]] = {}
        for job in jobs:
            roles.setdefault(job.layer, set()).add(job.role)
        plan_mps(cfg, roles, config.basis_ranks, _mps_step(config))
    else:
        _plan(cfg, jobs, config)


@functools.partial(jax.jit, static_argnames=("settings",))
def _mapped(ws: jax.Array, settings: tuple) -> CompressedLeaf:
    """``ws [L, in, out]`` -> one leaf with stacked children: ``lax.map`` of the per-matrix
    decomposition (fixed ranks), so the stack compiles once and every LAPACK call stays
    unbatched (module docstring, "Batching")."""
    if settings[0] == "tt":
        _, n_cores, ranks = settings
        return jax.lax.map(lambda w: tt_linear(w, n_cores=n_cores, ranks=ranks), ws)
    _, head_dim, ranks, iters = settings
    return jax.lax.map(
        lambda w: tucker_linear(w, head_dim=head_dim, ranks=ranks, n_iter_max=iters), ws
    )


def _decompose(cfg: ModelConfig, jobs: list[_Job], config: TuckerConfig, progress: bool):
    """``{path: leaf}``: one :func:`_mapped` call per group of kernels with the same shape,
    dtype and ranks (fixed ranks), or one matrix at a time (``tt`` with ``mps_eps``)."""
    out: dict[str, CompressedLeaf] = {}
    if config.variant is Variant.TT and config.tt_ranks is None:
        bar = tqdm(jobs, desc=config.variant.value, disable=not progress, leave=False)
        for job in bar:
            out[job.path] = tt_linear(job.kernel, n_cores=config.n_cores, eps=config.mps_eps)
        return out
    groups: dict[tuple, list[_Job]] = {}
    for job in jobs:
        if config.variant is Variant.TUCKER:
            settings = ("tucker", cfg.head_dim, _hooi_ranks(config, job.role), config.hooi_iters)
        else:
            settings = ("tt", config.n_cores, config.tt_ranks)
        key = (tuple(job.kernel.shape), jnp.dtype(job.kernel.dtype), settings)
        groups.setdefault(key, []).append(job)
    bar = tqdm(groups.items(), desc=config.variant.value, disable=not progress, leave=False)
    for (_, _, settings), group in bar:
        stacked = _mapped(jnp.stack([jnp.asarray(job.kernel) for job in group]), settings)
        for i, job in enumerate(group):
            out[job.path] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


def _weight_errors(jobs: list[_Job], leaves: dict[str, CompressedLeaf]) -> dict[str, float]:
    errs = {}
    for job in jobs:
        w = jnp.asarray(job.kernel, jnp.float32)
        d = jnp.asarray(leaves[job.path].materialize(), jnp.float32) - w
        den = float(jnp.linalg.norm(w))
        errs[job.path] = float(jnp.linalg.norm(d)) / den if den > 0 else float(jnp.linalg.norm(d))
    return errs


def _mps_step(config: TuckerConfig) -> MpsStep:
    return MpsStep(eps=config.mps_eps, ranks=config.tt_ranks, n_cores=config.n_cores)


def _ranks(leaf: CompressedLeaf) -> tuple[int, ...]:
    if isinstance(leaf, HeadLowRank):
        # the per-head latent width, then the bond ranks of a TT-matrix ``a`` (tucker_mps)
        return (leaf.rank, *(leaf.a.ranks[1:-1] if isinstance(leaf.a, TTLinear) else ()))
    if isinstance(leaf, HeadFoldedOut):
        return (leaf.rank,)
    if isinstance(leaf, TTLinear):
        return leaf.ranks[1:-1]
    assert isinstance(leaf, TuckerLinear)
    return leaf.ranks


def compress(
    params: Any,
    cfg: ModelConfig,
    calib: Any = None,
    *,
    config: TuckerConfig = TuckerConfig(),  # noqa: B008 - frozen, immutable
    progress: bool = True,
) -> tuple[Any, TuckerReport]:
    """Replace selected k/q/v kernels by TT-matrix or Tucker leaves (data-free), or by
    Kronecker-basis ``HeadLowRank`` leaves learned from calibration outputs (``tucker_mps``,
    see :mod:`jcompress.tucker.mps`; ``o_proj`` of a layer whose v is compressed becomes a
    ``HeadFoldedOut``).

    Args:
      params: param pytree (``load_hf``); the selected kernels must be dense.
      cfg: its model config.
      calib: ``[nsamples, seqlen]`` token ids: required by ``tucker_mps`` (the bases are
        learned from them); optional otherwise. When given, the report carries each
        compressed layer's relative output error ``||Y - Y'|| / ||Y||`` (original inputs,
        :func:`jcompress.calibration.stream_layers` with ``Feed.ORIGINAL``). The
        decomposition itself never reads it.
      config: :class:`TuckerConfig`.
      progress: show progress bars.

    Returns:
      ``(params, report)``: a new tree sharing every untouched leaf with ``params`` (which is
      not modified), selected kernels replaced by ``TTLinear`` / ``TuckerLinear``; and a
      :class:`~jcompress.tucker.report.TuckerReport`.

    Raises:
      UserError: a selected kernel is not dense (names the path and type), or a rank does not
        fit a kernel (names the rank, the mode and the path), before any decomposition.

    Example::

      params2, report = compress(params, cfg, config=TuckerConfig(variant="tucker",
                                                                  hooi_ranks=(64, 8, 32)))
      print(report.to_markdown())
    """
    lay = spec_for(cfg.family.value).layout
    candidates = [
        (f"{lay.layers}/{i}", f"{lay.layers}/{i}/{path}", role)
        for i in range(cfg.num_layers)
        for role, path in (("q", lay.q), ("k", lay.k), ("v", lay.v))
    ]
    sel = select(
        config.layers, [p for _, p, _ in candidates], allow_unmatched=config.allow_unmatched
    )
    flat = flatten(params)  # a new dict: params itself is never modified
    jobs = []
    for layer, path, role in candidates:
        if path not in sel:
            continue
        key = f"{path}/kernel"
        if key not in flat:
            raise UserError(f"params: {key} is missing")
        require_dense(key, flat[key], f"tucker ({config.variant.value})")
        # a NaN weight would come out as a NaN error (or an empty SVD's IndexError)
        validate.check_finite(flat[key], f"params: {key}")
        jobs.append(_Job(path, layer, role, flat[key]))
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    kv_after = kv
    if config.variant is Variant.TUCKER_MPS:
        roles: dict[str, set[str]] = {}
        for job in jobs:
            roles.setdefault(job.layer, set()).add(job.role)
        mps = _mps_step(config)
        plan = plan_mps(cfg, roles, config.basis_ranks, mps)
        done = compress_mps(
            params,
            cfg,
            calib,
            plan,
            basis_ranks=config.basis_ranks,
            mps=mps,
            n_iter_max=config.hooi_iters,
            batch_size=config.batch_size,
            offload_dir=config.offload_dir,
            progress=progress,
        )
        leaves, jobs, orig = {}, [], flatten(params)
        for layer in done:
            for rel, value in layer.changed.items():
                flat[f"{layer.path}/{rel}"] = value
                if rel.endswith("/kernel"):
                    path = f"{layer.path}/{rel[: -len('/kernel')]}"
                    leaves[path] = value
                    role = "o" if path.endswith(lay.o) else path.rsplit("/", 1)[-1][0]
                    jobs.append(_Job(path, layer.path, role, orig[f"{path}/kernel"]))
            for r in (layer.rank_k, layer.rank_v):
                if r is not None:
                    kv_after -= cfg.num_kv_heads * (cfg.head_dim - r)
        layer_errors = {layer.path: layer.output_error for layer in done}
        errors = _weight_errors(jobs, leaves)
        out = unflatten(flat)
    else:
        _plan(cfg, jobs, config)
        leaves = _decompose(cfg, jobs, config, progress)
        errors = _weight_errors(jobs, leaves)
        for job in jobs:
            flat[f"{job.path}/kernel"] = leaves[job.path]
        out = unflatten(flat)

        layer_errors = {}
        if calib is not None and jobs:
            layer_errors = _layer_errors(cfg, params, out, calib, {j.layer for j in jobs}, config)

    projections = tuple(
        ProjectionReport(
            path=job.path,
            shape=tuple(int(s) for s in job.kernel.shape),
            ranks=_ranks(leaves[job.path]),
            params_before=math.prod(job.kernel.shape),
            params_after=leaves[job.path].num_params,
            weight_error=errors[job.path],
        )
        for job in jobs
    )
    report = TuckerReport(
        variant=config.variant.value,
        family=cfg.family.value,
        settings=_settings(config),
        projections=projections,
        unmatched_rules=sel.unmatched,
        params_before=count_params(params),
        params_after=count_stored_params(out),  # as the factor checkpoint stores it
        kv_cache_before=kv,
        kv_cache_after=kv_after,
        layer_errors=tuple(sorted(layer_errors.items(), key=lambda kv: _layer_index(kv[0]))),
    )
    return out, report


def _layer_index(path: str) -> int:
    return int(path.rsplit("/", 1)[-1])


def _settings(config: TuckerConfig) -> dict[str, Any]:
    if config.variant is Variant.TUCKER_MPS:
        out = {"basis_ranks": list(config.basis_ranks), "hooi_iters": config.hooi_iters}
        if config.tt_ranks is not None:
            return {**out, "n_cores": config.n_cores, "tt_ranks": list(config.tt_ranks)}
        if config.mps_eps < 1:
            return {**out, "n_cores": config.n_cores, "mps_eps": config.mps_eps}
        return out
    if config.variant is Variant.TUCKER:
        out: dict[str, Any] = {"hooi_ranks": list(config.hooi_ranks)}
        for role in ("q", "k", "v"):
            own = getattr(config, f"hooi_ranks_{role}")
            if own is not None:
                out[f"hooi_ranks_{role}"] = list(own)
        return {**out, "hooi_iters": config.hooi_iters}
    if config.tt_ranks is not None:
        return {"n_cores": config.n_cores, "tt_ranks": list(config.tt_ranks)}
    return {"n_cores": config.n_cores, "mps_eps": config.mps_eps}


def _layer_errors(cfg, params, out, calib, layers, config) -> dict[str, float]:
    """``||Y - Y'|| / ||Y||`` per compressed layer, each on the original layer's inputs."""
    errs: dict[str, float] = {}
    new_flat = flatten(out)
    stream = stream_layers(
        cfg,
        params,
        np.asarray(calib),
        batch_size=config.batch_size,
        offload_dir=config.offload_dir,
        feed=Feed.ORIGINAL,
    )
    with contextlib.closing(stream):
        for layer in stream:
            if layer.path not in layers:
                continue
            prefix = f"{layer.path}/"
            new_lp = unflatten(
                {k[len(prefix) :]: v for k, v in new_flat.items() if k.startswith(prefix)}
            )
            errs[layer.path] = float(layer.relative_error(new_lp))
    return errs
