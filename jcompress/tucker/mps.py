"""The data-aware ``tucker_mps`` variant: Kronecker-structured output bases learned by HOOI from
streamed calibration outputs (the seed's intent, made coherent).

Per compressed layer (calibration through :func:`jcompress.calibration.stream_layers`,
``Feed.ORIGINAL``: every layer sees the uncompressed model's inputs):

1. The k / q / v projection outputs ``y [tokens, heads, head_dim]`` are captured batch by batch
   and only their head covariance ``C = sum_{t, h} y_{t,h} y_{t,h}^T [head_dim, head_dim]``
   is kept (one jit step per batch; memory flat in tokens). The output modes are aligned to
   the head layout: ``head_dim = n_1 x ... x n_m`` (:func:`jcompress.decomp.factorize`), the
   heads axis is never compressed, so no basis mixes heads and per-head attention is intact.
2. HOOI on the covariance (:func:`~jcompress.tucker.tucker_core.kron_basis`) gives
   ``P = U_1 (x) ... (x) U_m [head_dim, r]``, ``r = prod(basis_ranks)``, shared by the heads.
3. K and Q share ``P`` (learned from ``C_k + C_q``), so the scores are
   ``q P P^T k^T``, computed in rank space (``HeadLowRank.basis = KQ_BASIS``: ``q' k'^T``
   on the rank-``r`` latents, unless ``clip_qkv``); in a RoPE family (Llama / Qwen) Q stays
   dense and ``P`` comes from the pre-RoPE keys alone (the forward widens the latent keys
   before RoPE). V has its own basis, folded into ``o_proj`` (``W_o' = P^T W_o`` per head, a
   ``HeadFoldedOut``), as EigenAttention does. The projections become
   :class:`jcompress.leaves.HeadLowRank` (``a = W (I_heads (x) P)``, ``b[h] = P^T``; biases
   projected to ``b P P^T`` and kept as their rank-``r`` coordinates ``b P``, a
   :class:`~jcompress.leaves.HeadLatentBias` whose ``ut`` is the leaf's ``b``), so the KV
   cache stores the rank-``r`` projected keys / values and the forward runs on the leaves.
4. The MPS step: the projected weight ``a = W (I_heads (x) P)`` (``[in, heads * r]``, the
   seed's ``P^T W``) becomes a TT-matrix (MPO, :class:`~jcompress.tucker.TTLinear`) at
   ``mps_eps`` (energy rule) or at fixed ``tt_ranks``, nested as the ``a`` of the
   ``HeadLowRank``. The forward reaches it only through the leaf protocol: ``down(x) =
   x @ a`` contracts ``x`` with the cores (the rank-``r`` latent the KV cache stores),
   ``up`` / ``latent_bias`` / the o_proj fold read ``b`` (the basis) and never ``a``, so
   the latent cache and the V fold work unchanged. ``mps_eps = 1`` (without ``tt_ranks``)
   skips the step: an exact TT of ``a`` only adds parameters, so ``a`` stays dense.
5. The layer output error ``||Y - Y'|| / ||Y||`` is measured on the calibration windows
   (with the TT in place: it is the error of the whole projection).

Departures from the reference (``decompose/tucker_mps.py`` of the seed's fork): the basis is
learned from the projection's own outputs, not from a row slice of stacked weights; modes follow
``[heads, head_dim]`` instead of a 64 x 64 x 144 reshape that mixes input and output indices;
no untrained ``q_to_k_proj`` / ``v_to_embed_proj`` layers (V's basis folds into o_proj); the
MPS is taken of the projected ``[in, heads * r]`` weight (input and output modes kept apart,
the MPO layout of Novikov et al.), after the basis, not of the raw weight before it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.calibration import Feed, stream_layers
from jcompress.calibration.stream import check_windows
from jcompress.decomp import factorize, tt_svd_ranks
from jcompress.errors import UserError
from jcompress.leaves import HeadFoldedOut, HeadLatentBias, HeadLowRank
from jcompress.methods import require_dense
from jcompress.models.config import Family, ModelConfig
from jcompress.models.convert import flatten, get_path, unflatten
from jcompress.models.forward import Capture
from jcompress.tucker.tucker_core import kron_basis, tt_linear

__all__ = ["MpsLayer", "MpsStep", "basis_modes", "compress_mps", "plan_mps"]

_ROPE_FAMILIES = (Family.LLAMA, Family.QWEN2, Family.QWEN3)


def basis_modes(head_dim: int, ranks: tuple[int, ...]) -> tuple[int, ...]:
    """``head_dim`` as ``len(ranks)`` modes (:func:`factorize`), each rank checked against its
    mode (:class:`UserError` naming the mode)."""
    modes = factorize(head_dim, len(ranks))
    for k, (r, n) in enumerate(zip(ranks, modes, strict=True)):
        if r > n:
            raise UserError(
                f"basis_ranks[{k}]: {r} exceeds mode size {n} (head_dim {head_dim} as modes "
                f"{list(modes)})"
            )
    return modes


@dataclasses.dataclass(frozen=True)
class MpsStep:
    """The TT-matrix step on the projected weights ``a`` (module docstring, step 4).

    Attributes:
      eps: energy rule in ``(0, 1]``, used when ``ranks`` is ``None``; 1 skips the step.
      ranks: fixed bond ranks (``n_cores - 1``), or ``None``.
      n_cores: number of cores (modes of ``in`` and ``heads * r`` by ``factorize``).
    """

    eps: float = 1.0
    ranks: tuple[int, ...] | None = None
    n_cores: int = 3

    @property
    def applies(self) -> bool:
        return self.ranks is not None or self.eps < 1

    def check(self, shape: tuple[int, int], what: str) -> None:
        """Fixed ranks against the MPO bonds of an ``a`` of ``shape`` (:class:`UserError`
        naming the projection), before any work."""
        if self.ranks is None:
            return
        n_in, n_out = shape
        merged = tuple(
            m * n
            for m, n in zip(
                factorize(n_in, self.n_cores), factorize(n_out, self.n_cores), strict=True
            )
        )
        try:
            tt_svd_ranks(merged, self.ranks)
        except UserError as e:
            raise UserError(
                f"tt_ranks: {e} for the projected weight of {what} ([{n_in}, {n_out}] as MPO "
                f"modes {list(merged)})"
            ) from None

    def __call__(self, leaf: HeadLowRank) -> HeadLowRank:
        """``leaf`` with ``a`` as a :class:`~jcompress.tucker.TTLinear` (or as it is)."""
        if not self.applies:
            return leaf
        if self.ranks is not None:
            a = tt_linear(leaf.a, n_cores=self.n_cores, ranks=self.ranks)
        else:
            a = tt_linear(leaf.a, n_cores=self.n_cores, eps=self.eps)
        return dataclasses.replace(leaf, a=a)  # static tags (basis) stay: b is untouched


@dataclasses.dataclass(frozen=True)
class MpsLayer:
    """What ``tucker_mps`` did to one layer: the new kernels (leaves) and biases by param path
    relative to the layer (``self_attn/k_proj/kernel``), the latent widths, and the layer
    output error."""

    path: str
    changed: dict[str, Any]
    rank_k: int | None  # per-head latent width of keys (None: k dense)
    rank_v: int | None
    output_error: float


@functools.partial(jax.jit, static_argnames=("heads",))
def _cov_step(cov: jax.Array, y: jax.Array, real: jax.Array, heads: int) -> jax.Array:
    """``cov [D, D] += sum over real rows, tokens, heads of y y^T``; ``y [B, T, heads * D]``."""
    b, t, w = y.shape
    keep = (jnp.arange(b) < real).astype(jnp.float32)[:, None, None, None]
    yh = y.astype(jnp.float32).reshape(b, t, heads, w // heads) * keep
    return cov + jnp.einsum("bthd,bthe->de", yh, yh, precision=jax.lax.Precision.HIGHEST)


KQ_BASIS = "tucker_mps/kq"
"""The ``HeadLowRank.basis`` tag of K and Q on the one shared ``P`` (OPT / MPT / GPT-2): the
forward pass then computes the scores in rank space, ``q' k'^T``."""


@functools.partial(jax.jit, static_argnames=("basis",))
def _project(kernel: jax.Array, bias: jax.Array | None, p: jax.Array, basis: str | None = None):
    """``kernel [in, H*D]``, ``p [D, r]`` -> ``HeadLowRank(a = W (I (x) P), b[h] = P^T)`` tagged
    ``basis``, and the bias projected on the basis (``b_h P P^T``) kept in rank space,
    ``HeadLatentBias(z_h = b_h P, ut = b)`` (``[H*r]``, ``ut`` the leaf's ``b``), or ``None``."""
    d, r = p.shape
    heads = kernel.shape[1] // d
    w = kernel.astype(jnp.float32).reshape(kernel.shape[0], heads, d)
    a = jnp.einsum("ihd,dr->ihr", w, p).reshape(kernel.shape[0], heads * r)
    b = jnp.broadcast_to(p.T, (heads, r, d))
    leaf = HeadLowRank(a.astype(kernel.dtype), b.astype(kernel.dtype), basis=basis)
    if bias is None:
        return leaf, None
    z = bias.astype(jnp.float32).reshape(heads, d) @ p  # [H, r]
    return leaf, HeadLatentBias(z.reshape(heads * r).astype(bias.dtype), leaf.b)


@functools.partial(jax.jit, static_argnames=("kv_heads",))
def _fold_out(kernel: jax.Array, p: jax.Array, kv_heads: int) -> HeadFoldedOut:
    """``o_proj [Hq*D, out]`` -> ``HeadFoldedOut(w = P^T W_o per head, ut = P^T per KV head)``."""
    d, r = p.shape
    hq = kernel.shape[0] // d
    w = kernel.astype(jnp.float32).reshape(hq, d, -1)
    folded = jnp.einsum("dr,hdo->hro", p, w).reshape(hq * r, -1)
    ut = jnp.broadcast_to(p.T, (kv_heads, r, d))
    return HeadFoldedOut(folded.astype(kernel.dtype), ut.astype(kernel.dtype))


def _check_calib(cfg: ModelConfig, calib: Any, offload_dir: str | None) -> np.ndarray:
    """The stream's :func:`~jcompress.calibration.stream.check_windows` (token-id shape, not
    empty, ids in the vocabulary, model length, ``offload_dir``), after the check that there
    is calibration at all."""
    if calib is None:
        raise UserError("calib: variant tucker_mps needs calibration token ids [nsamples, seqlen]")
    return check_windows(cfg, calib, offload_dir)


def plan_mps(
    cfg: ModelConfig,
    roles_by_layer: dict[str, set[str]],
    basis_ranks,
    mps: MpsStep = MpsStep(),  # noqa: B008 - frozen, immutable
) -> dict:
    """Which roles each layer compresses (``{"kq"|"k", "v"}``), checked before any work
    (basis ranks against the head modes, fixed TT ranks against the projected weights)."""
    rope = cfg.family in _ROPE_FAMILIES
    if not rope and cfg.num_heads != cfg.num_kv_heads:
        raise UserError(f"{cfg.family.value}: shared K/Q bases need num_heads == num_kv_heads")
    basis_modes(cfg.head_dim, basis_ranks)
    r = int(np.prod(basis_ranks))
    for role, heads in (("k/v", cfg.num_kv_heads), ("q", cfg.num_heads)):
        if role == "q" and rope:
            continue
        mps.check((cfg.hidden_size, heads * r), f"{role}_proj")
    plan = {}
    for layer, roles in roles_by_layer.items():
        if not rope and ("k" in roles) != ("q" in roles):
            have, miss = ("k", "q") if "k" in roles else ("q", "k")
            raise UserError(
                f"layers: tucker_mps shares one basis between k and q, but {layer} selects "
                f"{have}_proj without {miss}_proj; select both or neither"
            )
        plan[layer] = roles & {"k", "v"}
    return plan


def compress_mps(
    params: Any,
    cfg: ModelConfig,
    calib: Any,
    plan: dict[str, set[str]],
    *,
    basis_ranks: tuple[int, ...],
    mps: MpsStep = MpsStep(),  # noqa: B008 - frozen, immutable
    n_iter_max: int,
    batch_size: int,
    offload_dir: str | None,
    progress: bool,
) -> list[MpsLayer]:
    """Run the streamed ``tucker_mps`` protocol (module docstring) on the layers in ``plan``."""
    from jcompress.models.families import spec_for

    calib = _check_calib(cfg, calib, offload_dir)
    lay = spec_for(cfg.family.value).layout
    rope = cfg.family in _ROPE_FAMILIES
    d, hq, hk = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    modes = basis_modes(d, basis_ranks)
    r = int(np.prod(basis_ranks))
    feats = (lay.k, lay.v) if rope else (lay.k, lay.q, lay.v)
    capture = Capture(outputs="|".join(re.escape(p) for p in feats))
    out: list[MpsLayer] = []
    stream = stream_layers(
        cfg, params, calib, batch_size=batch_size, offload_dir=offload_dir, feed=Feed.ORIGINAL
    )
    with contextlib.closing(stream):
        bar = tqdm(stream, total=cfg.num_layers, desc="tucker_mps", disable=not progress)
        for layer in bar:
            roles = plan.get(layer.path)
            if not roles:
                continue
            lp = layer.params
            kp, qp, vp, op = (get_path(lp, x) for x in (lay.k, lay.q, lay.v, lay.o))
            for role, p in ((lay.k, kp), (lay.q, qp), (lay.v, vp), (lay.o, op)):
                require_dense(f"{layer.path}/{role}/kernel", p["kernel"], "tucker (tucker_mps)")
            cov_kq = jnp.zeros((d, d), jnp.float32)
            cov_v = jnp.zeros((d, d), jnp.float32)
            for ob in layer.observe(capture):
                o = ob.captured["outputs"]
                real = jnp.asarray(ob.real, jnp.int32)
                if "k" in roles:
                    cov_kq = _cov_step(cov_kq, o[lay.k], real, hk)
                    if not rope:
                        cov_kq = _cov_step(cov_kq, o[lay.q], real, hq)
                if "v" in roles:
                    cov_v = _cov_step(cov_v, o[lay.v], real, hk)
            flat = flatten(lp)
            changed: dict[str, Any] = {}

            def put(role, kernel, bias, flat=flat, changed=changed):
                changed[f"{role}/kernel"] = kernel
                if bias is not None:
                    changed[f"{role}/bias"] = bias
                flat.update(changed)

            if "k" in roles:
                p_kq, _ = kron_basis(cov_kq, modes, basis_ranks, n_iter_max=n_iter_max)
                for role, p in [(lay.k, kp)] + ([] if rope else [(lay.q, qp)]):
                    tag = None if rope else KQ_BASIS  # one P for K and Q: rank-space scores
                    leaf, bias = _project(p["kernel"], p.get("bias"), p_kq, basis=tag)
                    put(role, mps(leaf), bias)
            if "v" in roles:
                p_v, _ = kron_basis(cov_v, modes, basis_ranks, n_iter_max=n_iter_max)
                leaf, bias = _project(vp["kernel"], vp.get("bias"), p_v)
                put(lay.v, mps(leaf), bias)
                put(lay.o, _fold_out(op["kernel"], p_v, hk), None)
            new_lp = unflatten(flat)
            err = float(layer.relative_error(new_lp))
            layer.replace(new_lp)  # recorded only: Feed.ORIGINAL feeds the original outputs
            out.append(
                MpsLayer(
                    path=layer.path,
                    changed=changed,
                    rank_k=r if "k" in roles else None,
                    rank_v=r if "v" in roles else None,
                    output_error=err,
                )
            )
            bar.set_postfix(layer=layer.index, err=f"{err:.4f}")
    return out
