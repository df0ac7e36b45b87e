"""Greedy generation with the latent KV cache."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jcompress import validate
from jcompress.errors import UserError
from jcompress.models.attention import resolve
from jcompress.models.config import ModelConfig
from jcompress.models.forward import DEFAULT_ATTENTION, check_length, forward_cached, init_cache

__all__ = ["generate"]


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_token_id", "pad_token_id", "impl")
)
def _generate(
    cfg, params, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, impl, state
):
    b, t = input_ids.shape
    cache = init_cache(cfg, params, b, t + max_new_tokens)
    logits, cache = forward_cached(cfg, params, input_ids, attention_mask, cache, impl, state)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(input_ids.dtype)
    done0 = jnp.zeros((b,), bool)
    finite0 = jnp.all(jnp.isfinite(logits[:, -1]))

    def step(carry, _):
        tok, done, cache, finite = carry
        done = done | (tok == eos_token_id) if eos_token_id is not None else done
        logits, cache = forward_cached(
            cfg, params, tok[:, None], jnp.ones((b, 1), bool), cache, impl, state
        )
        ok = jnp.all(jnp.isfinite(logits[:, -1]) | done[:, None])  # finished rows: ignored
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(tok.dtype)
        nxt = jnp.where(done, pad_token_id, nxt)
        return (nxt, done, cache, finite & ok), nxt

    finite = finite0
    if max_new_tokens > 1:
        (_, _, _, finite), rest = jax.lax.scan(
            step, (first, done0, cache, finite0), None, length=max_new_tokens - 1
        )
        new = jnp.concatenate([first[:, None], rest.T], axis=1)
    else:
        new = first[:, None]
    return jnp.concatenate([input_ids, new], axis=1), finite


def generate(
    cfg: ModelConfig,
    params: Any,
    input_ids: jax.Array,
    *,
    max_new_tokens: int,
    attention_mask: jax.Array | None = None,
    allow_long: bool = False,
    eos_token_id: int | None = -1,
    pad_token_id: int | None = None,
    attention: Any = DEFAULT_ATTENTION,
    attention_state: Any = None,
) -> jax.Array:
    """Greedy decoding with a KV cache (prefill once, then one token per step, all jitted).

    Args:
      input_ids: ``[B, T]`` prompts, *left*-padded when lengths differ.
      max_new_tokens: tokens to add (>= 1).
      attention_mask: ``[B, T]`` 0/1 for padded prompts.
      allow_long: let a RoPE model run past its trained positions (``max_position_embeddings``);
        a learned position table can never be exceeded.
      eos_token_id: stop token; after it a sequence emits ``pad_token_id``. Default: the
        config's ``eos_token_id``; ``None`` never stops.
      pad_token_id: filler after EOS (default: the config's pad id, else the EOS id).
      attention, attention_state: attention implementation (and its state) for prefill and
        decode (as for ``forward``).

    Returns:
      ``[B, T + max_new_tokens]`` token ids (the prompt, then the continuation).

    Raises:
      UserError: bad ``params``, ``input_ids`` (not ``[B, T]`` integers in
        ``[0, vocab_size)`` where the mask is 1), ``attention_mask``, ``max_new_tokens``, or
        a prompt + new tokens beyond the trained positions; non-finite logits (checked
        once, after the last step).
    """
    validate.check_params(params)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise UserError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    input_ids = validate.check_token_ids(input_ids, cfg.vocab_size, ndim=2, mask=attention_mask)
    attention_mask = validate.check_attention_mask(attention_mask, input_ids.shape)
    input_ids = jnp.asarray(input_ids)
    validate.check_positions(
        cfg,
        input_ids.shape[1] + max_new_tokens,
        arg="input_ids + max_new_tokens",
        allow_long=allow_long,
    )
    check_length(cfg, input_ids.shape[1] + max_new_tokens)
    mask = (
        jnp.ones(input_ids.shape, bool)
        if attention_mask is None
        else jnp.asarray(attention_mask, bool)
    )
    if eos_token_id == -1:
        eos_token_id = cfg.eos_token_id
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_token_id or 0)
    impl = resolve(attention)
    out, finite = _generate(
        cfg, params, input_ids, mask, max_new_tokens, eos_token_id, pad_token_id, impl,
        attention_state,
    )  # fmt: skip
    if not bool(finite):  # argmax of NaN logits is token 0: text, but not the model's
        raise UserError(
            "generate: the forward pass gives non-finite logits (finite weights that overflow "
            "float32 somewhere?)"
        )
    return out
