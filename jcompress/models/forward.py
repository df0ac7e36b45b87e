"""A pure JAX forward pass for every supported family, with capture, layer-wise execution and
a KV cache.

One generic decoder reads the family's :class:`~jcompress.models.convert.Layout` to find
each role's params. Every linear goes through :func:`jcompress.leaves.dot`, so typed
compressed leaves (``LowRank``, ...) work in place of dense kernels, and head sizes are read
off the kernels (a method may shrink the per-head q/k or v width without touching this file).

Shapes: ``B`` batch, ``T`` new tokens, ``S`` key slots, ``H`` hidden, ``Hq``/``Hk`` query /
key-value heads, ``D`` head width, ``V`` vocabulary.

KV cache: per layer it stores the *latent* keys and values, i.e. the output of the first factor
of a ``Factored`` k/v kernel (``x @ a``, width ``r``) or the full projection for a dense
kernel, so a rank-r method shrinks the cache with no change here. Latent keys are re-expanded
and rotated at read time; behind a dense k kernel the cache holds the *final* keys (after
``clip_qkv``, q/k norm and RoPE, all per token), so a decode step prepares only its own key
instead of re-rotating every cached one.

Rank-space scores: when the k kernel says it shares a per-head orthonormal basis with the q
kernel (``shares_latent_scores``: EigenAttention's K/Q on OPT / MPT / GPT-2) and no RoPE,
q/k norm or ``clip_qkv`` acts on full-width heads, attention gets the latent queries and keys
(``down(x)`` plus the bias in the latent space, width ``r`` per head): ``q' k'^T == q k^T``
without widening either, and cached keys are read as stored.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import validate
from jcompress.errors import UserError
from jcompress.leaves import CompressedLeaf, Factored, dot
from jcompress.models import attention as attention_impls
from jcompress.models.attention import (
    AttentionImpl,
    AttentionMask,
    check_state,
    fit_to_devices,
    resolve,
)
from jcompress.models.config import ModelConfig, Norm, Position
from jcompress.models.convert import Layout, get_path
from jcompress.models.families import check_params_match, spec_for

__all__ = [
    "Capture",
    "KVCache",
    "forward",
    "embed",
    "apply_layer",
    "unembed",
    "layer_params",
    "init_cache",
    "positions_from_mask",
]

Params = Mapping[str, Any]


class Capture(NamedTuple):
    """Which module inputs/outputs to return, as regexes (``re.fullmatch``) over module paths.

    Module paths are param paths without the leaf name: linears
    (``model/layers/0/self_attn/q_proj``), norms, attention and MLP blocks
    (``model/layers/0/self_attn``, ``model/layers/0/mlp``) and whole layers
    (``model/layers/0``); plus ``lm_head`` for the head. The attention core's inputs are
    inputs of ``.../self_attn/core/{q,k,v,k_valid,scale}``: q ``[B, T, Hq, D]`` and k / v
    ``[B, S, Hk, D]`` as the attention implementation sees them (after norms, RoPE and
    clipping; rank-``r`` latents ``[B, T, Hq, r]`` / ``[B, S, Hk, r]`` when the scores run in
    rank space), the key validity ``[B, S]`` and the softmax scale (no KV cache only).
    """

    inputs: str | None = None
    outputs: str | None = None


class _Recorder:
    """Collects captured activations while the (traced) forward runs."""

    def __init__(self, capture: Capture | None, prefix: str = ""):
        self.capture = capture
        self.prefix = prefix
        self.inputs: dict[str, jax.Array] = {}
        self.outputs: dict[str, jax.Array] = {}

    def child(self, name: str) -> _Recorder:
        r = _Recorder(self.capture, self._join(name))
        r.inputs, r.outputs = self.inputs, self.outputs
        return r

    def _join(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix and name else (self.prefix or name)

    def wants(self, name: str, kind: str) -> bool:
        """Whether ``__call__(name, kind, ...)`` would record (lets callers skip extra work)."""
        if self.capture is None:
            return False
        pattern = self.capture.inputs if kind == "in" else self.capture.outputs
        path = self._join(name)
        return pattern is not None and bool(path) and re.fullmatch(pattern, path) is not None

    def __call__(self, name: str, kind: str, x: jax.Array) -> None:
        if self.capture is None:
            return
        pattern = self.capture.inputs if kind == "in" else self.capture.outputs
        path = self._join(name)
        if pattern is not None and path and re.fullmatch(pattern, path):
            (self.inputs if kind == "in" else self.outputs)[path] = x

    def result(self) -> dict[str, dict[str, jax.Array]]:
        return {"inputs": self.inputs, "outputs": self.outputs}


class KVCache(NamedTuple):
    """Latent KV cache (a pytree).

    Attributes:
      k: per layer ``[B, S, Rk]``: latent keys ``down(x)`` behind a ``Factored`` k kernel,
        else the final keys (clipped, normed, rotated; ``Rk = Hk * D``).
      v: per layer ``[B, S, Rv]`` latent values.
      mask: ``[B, S]`` bool, slots that hold a real token.
      pos: ``[B, S]`` int32, position id of each slot.
      index: int32 scalar, the next slot to write.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    mask: jax.Array
    pos: jax.Array
    index: jax.Array


# --------------------------------------------------------------------------- building blocks


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    raise AssertionError(name)  # ModelConfig validates activation names


def _norm(cfg: ModelConfig, p: Params, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    if cfg.norm is Norm.RMS:
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
        return p["scale"] * xf.astype(x.dtype)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * p["scale"]
    if "bias" in p:
        y = y + p["bias"]
    return y.astype(x.dtype)


def _linear(p: Params, x: jax.Array, rec: _Recorder, name: str) -> jax.Array:
    rec(name, "in", x)
    y = dot(x, p["kernel"])
    if "bias" in p:
        y = y + _bias(p)
    rec(name, "out", y)
    return y


def _latent(p: Params, x: jax.Array) -> jax.Array:
    """What the KV cache stores for a k/v projection: ``down(x)`` of a factored kernel
    (``LowRank``, ``HeadLowRank``), else the full projection."""
    w = p["kernel"]
    if isinstance(w, Factored):
        return w.down(x)
    y = dot(x, w)
    return y + _bias(p) if "bias" in p else y


def _bias(p: Params) -> jax.Array:
    """A projection's bias as a dense array (a ``HeadLatentBias`` widened)."""
    b = p["bias"]
    return b.materialize() if isinstance(b, CompressedLeaf) else b


def _expand(p: Params, lat: jax.Array) -> jax.Array:
    """Inverse of :func:`_latent`: latent -> full projection."""
    w = p["kernel"]
    if isinstance(w, Factored):
        y = w.up(lat)
        return y + _bias(p) if "bias" in p else y
    return lat


def _latent_width(p: Params) -> int:
    w = p["kernel"]
    return w.latent_width if isinstance(w, Factored) else int(w.shape[-1])


@functools.cache
def _inv_freq(cfg: ModelConfig, dim: int) -> np.ndarray:
    """RoPE inverse frequencies ``[dim / 2]`` in float32, as transformers computes them."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    scaling = dict(cfg.rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv = inv / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def _rope(cfg: ModelConfig, x: jax.Array, pos: jax.Array) -> jax.Array:
    """Rotate ``x: [B, T, heads, D]`` at positions ``pos: [B, T]`` (rotate-half convention)."""
    d = x.shape[-1]
    freqs = pos.astype(jnp.float32)[..., None] * jnp.asarray(_inv_freq(cfg, d))
    # one cos / sin per (token, frequency), materialized: fused into the rotation below, XLA
    # would recompute them for every head and both halves
    cos, sin = jax.lax.optimization_barrier((jnp.cos(freqs), jnp.sin(freqs)))
    cos, sin = (jnp.concatenate([a, a], axis=-1)[:, :, None, :].astype(x.dtype) for a in (cos, sin))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _alibi_slopes(cfg: ModelConfig) -> np.ndarray:
    """MPT ALiBi slopes ``[Hq]`` (transformers ``build_mpt_alibi_tensor``)."""
    n = cfg.num_heads
    p2 = 2 ** int(np.ceil(np.log2(n)))
    base = np.arange(1, p2 + 1, dtype=np.float32) * np.float32(cfg.alibi_bias_max / p2)
    slopes = np.float32(1.0) / np.power(np.float32(2.0), base)
    if p2 != n:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n]
    return slopes.astype(np.float32)


def _caches_final_keys(kp: Params) -> bool:
    """Whether the KV cache holds final keys for this k projection: yes behind a kernel whose
    latent is the full projection (a dense or non-factored kernel), no behind a
    :class:`~jcompress.leaves.Factored` one (its cache holds ``down(x)``, rank ``r``)."""
    return not isinstance(kp["kernel"], Factored)


def _latent_scores(cfg: ModelConfig, qp: Params, kp: Params) -> bool:
    """Whether the scores run on the latent queries and keys (``q' k'^T``, width ``r`` per
    head) instead of the full-width ones: the k kernel says it shares its basis with the q
    kernel (:meth:`~jcompress.leaves.CompressedLeaf.shares_latent_scores`, EigenAttention's
    shared K/Q basis on OPT / MPT / GPT-2) and nothing acts on full-width heads between the
    projections and the scores (RoPE, q/k norm, ``clip_qkv``)."""
    k = kp["kernel"]
    return (
        isinstance(k, Factored)
        and isinstance(qp["kernel"], Factored)
        and k.shares_latent_scores(qp["kernel"])
        and cfg.position is not Position.ROPE
        and not cfg.qk_norm
        and cfg.clip_qkv is None
    )


def _with_latent_bias(p: Params, lat: jax.Array) -> jax.Array:
    """A latent ``down(x)`` plus the projection's bias in the latent space (if any)."""
    return lat + p["kernel"].latent_bias(p["bias"]) if "bias" in p else lat


def _final_keys(cfg: ModelConfig, lay: Layout, lp: Params, k: jax.Array, pos: jax.Array):
    """Full k projections ``[B, S, Hk * D]`` -> the keys attention reads ``[B, S, Hk, D]``:
    clipped (``clip_qkv``), normed (``qk_norm``) and rotated at ``pos [B, S]`` (RoPE). Each
    step is per token, so a cache may store its result."""
    b, s, _ = k.shape
    if cfg.clip_qkv is not None:
        k = jnp.clip(k, -cfg.clip_qkv, cfg.clip_qkv)
    k = k.reshape(b, s, cfg.num_kv_heads, -1)
    if cfg.qk_norm:
        k = _norm(cfg, get_path(lp, lay.k_norm), k)
    if cfg.position is Position.ROPE:
        k = _rope(cfg, k, pos)
    return k


def _attention(
    cfg: ModelConfig,
    lay: Layout,
    lp: Params,
    x: jax.Array,  # [B, T, H]
    pos: jax.Array,  # [B, T]
    mask: jax.Array,  # [B, T] bool
    layer_idx: jax.Array | int,
    rec: _Recorder,
    kv: tuple[jax.Array, jax.Array] | None,
    cache_meta: tuple[jax.Array, jax.Array, jax.Array] | None,
    attn: tuple[AttentionImpl, Any],
):
    """Self-attention block. Returns ``(out [B, T, H], (k_latent, v_latent) for the cache)``.

    Projections, q/k norms, RoPE and clipping happen here; the score/softmax/value math is
    ``attn = (implementation, state)`` (:mod:`jcompress.models.attention`)."""
    b, t, _ = x.shape
    hq, hk = cfg.num_heads, cfg.num_kv_heads
    qp, kp, vp = (get_path(lp, r) for r in (lay.q, lay.k, lay.v))
    rec(lay.attn, "in", x)
    # rank-space scores: q' k'^T on the latents of a shared per-head basis (OPT / MPT / GPT-2
    # after EigenAttention), so neither queries nor cached keys are widened to the head width
    latent = _latent_scores(cfg, qp, kp)
    if latent:
        rec(lay.q, "in", x)
        q = _with_latent_bias(qp, qp["kernel"].down(x))
        if rec.wants(lay.q, "out"):  # what the dense q_proj gives: full width
            rec(lay.q, "out", _expand(qp, qp["kernel"].down(x)))
    else:
        q = _linear(qp, x, rec, lay.q)
    rec(lay.k, "in", x)
    rec(lay.v, "in", x)
    k_new, v_new = _latent(kp, x), _latent(vp, x)
    # a cache behind a dense k kernel holds the final keys (clipped, normed, rotated at
    # their own positions): a decode step then prepares only its new keys
    ready = kv is not None and _caches_final_keys(kp)
    if ready:
        k_new = _final_keys(cfg, lay, lp, k_new, pos).reshape(k_new.shape)
    if kv is None:  # no cache: keys are this call's tokens
        k_lat, v_lat = k_new, v_new
        k_pos, k_mask = pos, mask
        q_offset = 0
    else:  # write this call's latents at cache.index, read the whole cache
        cmask, cpos, index = cache_meta
        k_lat = jax.lax.dynamic_update_slice_in_dim(kv[0], k_new.astype(kv[0].dtype), index, 1)
        v_lat = jax.lax.dynamic_update_slice_in_dim(kv[1], v_new.astype(kv[1].dtype), index, 1)
        k_pos, k_mask = cpos, cmask
        q_offset = index
    op = get_path(lp, lay.o)
    # EigenAttention's folded form: rank-r values per head and W_o' = W_o U_v, so values are
    # never widened back to the head width (clip_qkv acts on full-width values: no folding).
    fold = (
        isinstance(op["kernel"], CompressedLeaf)
        and op["kernel"].consumes_latent_values(vp["kernel"])
        and cfg.clip_qkv is None
    )
    if latent:
        k = _with_latent_bias(kp, k_lat)
        if kv is None and rec.wants(lay.k, "out"):
            rec(lay.k, "out", _expand(kp, k_lat))
    else:
        k = k_lat if ready else _expand(kp, k_lat)
    if fold:
        v = v_lat if "bias" not in vp else v_lat + vp["kernel"].latent_bias(vp["bias"])
        if kv is None and rec.wants(lay.v, "out"):
            rec(lay.v, "out", _expand(vp, v_lat))
    else:
        v = _expand(vp, v_lat)
        if kv is None:
            rec(lay.v, "out", v)
    if kv is None and not latent:
        rec(lay.k, "out", k)
    if cfg.clip_qkv is not None:
        q, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, v))
    s = k.shape[1]
    q = q.reshape(b, t, hq, -1)
    v = v.reshape(b, s, hk, -1)
    if cfg.qk_norm:
        q = _norm(cfg, get_path(lp, lay.q_norm), q)
    if cfg.position is Position.ROPE:
        q = _rope(cfg, q, pos)
    if ready or latent:  # final keys from the cache, or latent keys (nothing to apply)
        k = k.reshape(b, s, hk, -1)
    else:
        k = _final_keys(cfg, lay, lp, k, k_pos)
    scale = cfg.softmax_scale
    if cfg.scale_attn_by_inverse_layer_idx:
        scale = scale / (jnp.asarray(layer_idx, jnp.float32) + 1.0)
    alibi = cfg.position is Position.ALIBI
    amask = AttentionMask(
        k_valid=k_mask,
        q_offset=q_offset,
        q_pos=pos if alibi else None,
        k_pos=k_pos if alibi else None,
        alibi_slopes=jnp.asarray(_alibi_slopes(cfg)) if alibi else None,
    )
    if kv is None:  # the attention core's inputs (e.g. for tuning a sparse implementation)
        core = {"q": q, "k": k, "v": v, "k_valid": k_mask, "scale": scale}
        for name, a in core.items():
            if rec.wants(f"{lay.attn}/core/{name}", "in"):
                rec(f"{lay.attn}/core/{name}", "in", jnp.asarray(a))
    impl, state = attn
    o = impl(q, k, v, amask, scale=scale, layer=layer_idx, state=state).reshape(b, t, -1)
    if fold:
        w = op["kernel"]
        if rec.wants(lay.o, "in"):  # what the dense o_proj would see: full-width head outputs
            rec(lay.o, "in", w.widen(o))
        out = w.apply_latent(o)
        out = out + _bias(op) if "bias" in op else out
        rec(lay.o, "out", out)
    else:
        out = _linear(op, o, rec, lay.o)
    rec(lay.attn, "out", out)
    return out, (k_lat, v_lat)


def _mlp(cfg: ModelConfig, lay: Layout, lp: Params, x: jax.Array, rec: _Recorder) -> jax.Array:
    if lay.mlp:  # OPT has no MLP module (fc1/fc2 sit in the layer)
        rec(lay.mlp, "in", x)
    up = _linear(get_path(lp, lay.up), x, rec, lay.up)
    if cfg.gated_mlp:
        h = _act(cfg.activation, _linear(get_path(lp, lay.gate), x, rec, lay.gate)) * up
    else:
        h = _act(cfg.activation, up)
    out = _linear(get_path(lp, lay.down), h, rec, lay.down)
    if lay.mlp:
        rec(lay.mlp, "out", out)
    return out


def _layer(cfg, lay, lp, h, pos, mask, layer_idx, rec, attn, kv=None, cache_meta=None):
    """One decoder block (pre- or post-LN). Returns ``(h [B, T, H], kv latents)``."""
    rec("", "in", h)

    def norm(role, x):
        rec(role, "in", x)
        y = _norm(cfg, get_path(lp, role), x)
        rec(role, "out", y)
        return y

    x = norm(lay.attn_norm, h) if cfg.pre_norm else h
    a, new_kv = _attention(cfg, lay, lp, x, pos, mask, layer_idx, rec, kv, cache_meta, attn)
    h = h + a
    if not cfg.pre_norm:
        h = norm(lay.attn_norm, h)
    x = norm(lay.mlp_norm, h) if cfg.pre_norm else h
    h = h + _mlp(cfg, lay, lp, x, rec)
    if not cfg.pre_norm:
        h = norm(lay.mlp_norm, h)
    rec("", "out", h)
    return h, new_kv


# --------------------------------------------------------------------------- public pieces


def positions_from_mask(mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
    """Position ids ``[B, T]`` from a ``[B, T]`` 0/1 mask: real tokens count up from ``start``
    (left or right padding alike); pad slots get the position of their neighbour."""
    m = mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0) + start


def check_length(cfg: ModelConfig, length: int) -> None:
    """Learned position tables have ``max_position_embeddings`` rows; longer inputs are an error
    (checked at trace time, from static shapes)."""
    if cfg.position is Position.LEARNED and length > cfg.max_position_embeddings:
        raise UserError(
            f"input_ids: {length} tokens exceed the model's {cfg.max_position_embeddings} "
            "learned positions"
        )


def layer_params(cfg: ModelConfig, params: Params, i: int) -> Params:
    """The params subtree of decoder layer ``i``."""
    try:
        idx = None if isinstance(i, bool) else operator.index(i)  # ints, numpy / jax scalars
    except TypeError:
        idx = None
    if idx is None or not 0 <= idx < cfg.num_layers:
        raise UserError(f"i: layer index must be in [0, {cfg.num_layers}), got {i!r}")
    i = idx
    return get_path(params, f"{spec_for(cfg.family.value).layout.layers}/{i}")


def _embed(cfg, params, input_ids, pos, rec, mask):
    from jcompress.leaves import take

    lay = spec_for(cfg.family.value).layout
    table = get_path(params, lay.embed)["embedding"]
    # clip: an out-of-range id (e.g. a pad id == vocab_size under a 0 mask) must not turn
    # into NaN, which the attention product would spread to every position of the row.
    h = take(table, input_ids, mode="clip")
    # ...but one at a real (mask 1) position is broken input: the host check raises where the
    # ids are concrete; under a caller's jit (traced ids) the whole row becomes NaN instead of
    # the clipped id's plausible numbers.
    ids = input_ids  # uint8 / int16 ids would wrap the vocab size: compare in >= 32 bits
    if jnp.dtype(ids.dtype).itemsize < 4:
        ids = ids.astype(jnp.int32)
    bad = jnp.any(((ids < 0) | (ids >= cfg.vocab_size)) & mask, axis=1)
    h = jnp.where(bad[:, None, None], jnp.asarray(jnp.nan, h.dtype), h)
    rec(lay.embed, "out", h)
    if lay.project_in is not None and cfg.embed_dim is not None:
        h = _linear(get_path(params, lay.project_in), h, rec, lay.project_in)
    if cfg.position is Position.LEARNED:
        pe = get_path(params, lay.pos_embed)["embedding"]
        h = h + jnp.take(pe, pos + cfg.pos_offset, axis=0, mode="clip").astype(h.dtype)
    return h


def _unembed(cfg, params, h, rec):
    lay = spec_for(cfg.family.value).layout
    if cfg.final_norm:
        rec(lay.final_norm, "in", h)
        h = _norm(cfg, get_path(params, lay.final_norm), h)
        rec(lay.final_norm, "out", h)
    if lay.project_out is not None and cfg.embed_dim is not None:
        h = _linear(get_path(params, lay.project_out), h, rec, lay.project_out)
    if cfg.tie_word_embeddings:
        rec(lay.lm_head, "in", h)
        table = get_path(params, lay.embed)["embedding"]
        from jcompress.leaves import dot_t

        if not isinstance(table, CompressedLeaf):
            table = table.astype(h.dtype)
        logits = dot_t(h, table)
        rec(lay.lm_head, "out", logits)
        return logits
    return _linear(get_path(params, lay.lm_head), h, rec, lay.lm_head)


def _mask_or_ones(input_ids, attention_mask):
    if attention_mask is None:
        return jnp.ones(input_ids.shape, bool)
    return attention_mask.astype(bool)


def _run(cfg, params, input_ids, mask, pos, rec, attn, cache: KVCache | None = None):
    lay = spec_for(cfg.family.value).layout
    h = _embed(cfg, params, input_ids, pos, rec, mask)
    new_k, new_v = [], []
    meta = None
    if cache is not None:
        t = input_ids.shape[1]
        cmask = jax.lax.dynamic_update_slice_in_dim(cache.mask, mask, cache.index, 1)
        cpos = jax.lax.dynamic_update_slice_in_dim(cache.pos, pos.astype(jnp.int32), cache.index, 1)
        meta = (cmask, cpos, cache.index)
    for i in range(cfg.num_layers):
        lp = get_path(params, f"{lay.layers}/{i}")
        kv = None if cache is None else (cache.k[i], cache.v[i])
        h, (kl, vl) = _layer(
            cfg, lay, lp, h, pos, mask, i, rec.child(f"{lay.layers}/{i}"), attn, kv, meta
        )
        new_k.append(kl)
        new_v.append(vl)
    logits = _unembed(cfg, params, h, rec)
    if cache is None:
        return logits, None
    new_cache = KVCache(tuple(new_k), tuple(new_v), meta[0], meta[1], cache.index + t)
    return logits, new_cache


DEFAULT_ATTENTION = attention_impls.DEFAULT
"""The implementation :func:`forward` and friends use unless told otherwise (see
:mod:`jcompress.models.attention`; ``"dense"`` is the reference it is tested against)."""


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "impl"))
def _forward(cfg, params, input_ids, attention_mask, capture, impl, state):
    check_length(cfg, input_ids.shape[-1])
    mask = _mask_or_ones(input_ids, attention_mask)
    pos = positions_from_mask(mask)
    rec = _Recorder(capture)
    logits, _ = _run(cfg, params, input_ids, mask, pos, rec, (impl, state))
    return logits if capture is None else (logits, rec.result())


def forward(
    cfg: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    capture: Capture | None = None,
    attention: Any = DEFAULT_ATTENTION,
    attention_state: Any = None,
):
    """Logits of a causal LM (jit-compiled; ``cfg``, ``capture`` and ``attention`` are static).

    Args:
      cfg: model config.
      params: param pytree (dense arrays or typed compressed leaves at ``kernel`` paths).
      input_ids: ``[B, T]`` int token ids.
      attention_mask: optional ``[B, T]`` 0/1; left or right padding. Pad positions produce
        logits that carry no meaning.
      capture: optional :class:`Capture`; then the result is ``(logits, captured)`` with
        ``captured = {"inputs": {path: array}, "outputs": {path: array}}``.
      attention: an attention implementation: a registered name (``"chunked"``, the default:
        online softmax over key blocks, memory ``O(T x block)``; ``"dense"``: full scores, the
        reference) or an instance such as ``attention.Chunked(block_q=64, block_k=64)``.
      attention_state: a pytree of arrays handed to the implementation with each layer's
        index (traced; e.g. SpargeAttn's per-layer, per-head thresholds); ``None`` for the
        built-in implementations.

    Returns:
      ``logits [B, T, V]`` in the params' compute dtype, or ``(logits, captured)``.

    Raises:
      UserError: ``params`` is not a param dict, ``input_ids`` is not ``[B, T]`` integers in
        ``[0, vocab_size)`` (checked on the host where the ids are concrete; pad slots under
        a 0 mask may hold any id), or the mask does not fit the ids.
    """
    validate.check_params(params)
    check_params_match(cfg, params)
    input_ids = validate.check_token_ids(input_ids, cfg.vocab_size, ndim=2, mask=attention_mask)
    attention_mask = validate.check_attention_mask(attention_mask, input_ids.shape)
    impl = fit_to_devices(resolve(attention), params, input_ids)
    check_state(impl, cfg, attention_state)
    return _forward(cfg, params, input_ids, attention_mask, capture, impl, attention_state)


@functools.partial(jax.jit, static_argnames=("cfg", "capture", "impl"))
def _apply_layer(cfg, lp, hidden, layer_idx, attention_mask, capture, impl, state):
    b, t, _ = hidden.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    rec = _Recorder(capture)
    lay = spec_for(cfg.family.value).layout
    pos = positions_from_mask(mask)
    out, _ = _layer(cfg, lay, lp, hidden, pos, mask, layer_idx, rec, (impl, state))
    return out if capture is None else (out, rec.result())


def apply_layer(
    cfg: ModelConfig,
    lp: Params,
    hidden: jax.Array,
    layer_idx: jax.Array | int,
    attention_mask: jax.Array | None = None,
    *,
    capture: Capture | None = None,
    attention: Any = DEFAULT_ATTENTION,
    attention_state: Any = None,
):
    """Run one decoder layer on hidden states (for layer-by-layer calibration).

    Args:
      lp: the layer's params (:func:`layer_params`).
      hidden: ``[B, T, H]`` inputs of the layer.
      layer_idx: the layer's index (traced: one compilation serves every layer).
      attention_mask: optional ``[B, T]`` 0/1.
      capture: regexes over paths *relative to the layer* (``self_attn/k_proj``).
      attention, attention_state: the attention implementation and its state (as for
        :func:`forward`; the state is indexed by ``layer_idx``).

    Returns:
      ``[B, T, H]`` outputs, or ``(outputs, captured)`` when ``capture`` is given.
    """
    validate.check_params(lp, arg="lp")
    check_params_match(cfg, lp, arg="lp", layer=True)
    shape = tuple(getattr(hidden, "shape", ()))
    if len(shape) != 3 or shape[-1] != cfg.hidden_size:
        raise UserError(
            f"hidden: expected [batch, length, {cfg.hidden_size}] hidden states, got shape "
            f"{list(shape)}"
        )
    if attention_mask is not None:
        attention_mask = validate.check_attention_mask(attention_mask, shape[:2])
    impl = fit_to_devices(resolve(attention), lp, hidden)
    check_state(impl, cfg, attention_state)
    return _apply_layer(cfg, lp, hidden, layer_idx, attention_mask, capture, impl, attention_state)


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed(
    cfg: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array | None = None
) -> jax.Array:
    """Token (and learned position) embeddings: ``[B, T] -> [B, T, H]``, the first layer's input."""
    mask = _mask_or_ones(input_ids, attention_mask)
    return _embed(cfg, params, input_ids, positions_from_mask(mask), _Recorder(None), mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def unembed(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Final norm, projection and head: ``[B, T, H] -> [B, T, V]`` logits."""
    return _unembed(cfg, params, hidden, _Recorder(None))


def init_cache(
    cfg: ModelConfig, params: Params, batch: int, max_len: int, dtype: Any = None
) -> KVCache:
    """An empty latent KV cache sized from the layers' k/v kernels (``[B, max_len, R]``)."""
    lay = spec_for(cfg.family.value).layout
    ks, vs = [], []
    for i in range(cfg.num_layers):
        lp = get_path(params, f"{lay.layers}/{i}")
        kp, vp = get_path(lp, lay.k), get_path(lp, lay.v)
        dt = dtype or jnp.result_type(kp["kernel"].dtype)
        ks.append(jnp.zeros((batch, max_len, _latent_width(kp)), dt))
        vs.append(jnp.zeros((batch, max_len, _latent_width(vp)), dt))
    return KVCache(
        tuple(ks),
        tuple(vs),
        jnp.zeros((batch, max_len), bool),
        jnp.zeros((batch, max_len), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def forward_cached(
    cfg, params, input_ids, mask, cache: KVCache, attention: Any = None, attention_state=None
):
    """Run new tokens ``[B, T]`` through the model, reading and extending ``cache``.

    Positions continue from the number of real tokens already cached per sequence.
    Returns ``(logits [B, T, V], new_cache)``. Not jitted itself (callers jit the loop).
    ``attention`` / ``attention_state``: as for :func:`forward` (default
    :data:`DEFAULT_ATTENTION`).
    """
    impl = resolve(DEFAULT_ATTENTION if attention is None else attention)
    check_state(impl, cfg, attention_state)
    check_params_match(cfg, params)
    input_ids = validate.check_token_ids(input_ids, cfg.vocab_size, ndim=2, mask=mask)
    mask = validate.check_attention_mask(mask, input_ids.shape)
    if mask is None:
        raise UserError("mask: forward_cached needs the [B, T] 0/1 mask of the new tokens")
    slots, t = int(cache.mask.shape[1]), int(input_ids.shape[1])
    if not validate._is_tracer(cache.index) and int(cache.index) + t > slots:
        raise UserError(
            f"cache: {int(cache.index)} slots used + {t} new tokens > its {slots} slots "
            "(init_cache with a larger max_len)"
        )
    start = jnp.sum(cache.mask, axis=1, keepdims=True).astype(jnp.int32)
    pos = positions_from_mask(mask, start)
    attn = (impl, attention_state)
    return _run(cfg, params, input_ids, mask.astype(bool), pos, _Recorder(None), attn, cache)
