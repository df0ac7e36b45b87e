"""Greedy generation with the latent KV cache."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import validate
from jcompress.errors import UserError
from jcompress.models.attention import resolve
from jcompress.models.config import ModelConfig
from jcompress.models.families import check_params_match
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


def _token_id(cfg: ModelConfig, tok: Any) -> bool:
    return (
        not isinstance(tok, bool)
        and isinstance(tok, int | np.integer)
        and 0 <= int(tok) < cfg.vocab_size
    )


def check_left_padded(attention_mask: Any) -> None:
    """Generation continues every row from its last slot: a concrete mask must be left-padded
    (each row ``0 ... 0 1 ... 1``). A right-padded row would continue from a pad."""
    if attention_mask is None or validate._is_tracer(attention_mask):
        return
    m = np.asarray(attention_mask).astype(bool)
    later = np.logical_and.accumulate(m[:, ::-1], axis=1)[:, ::-1]  # a 1 from here to the end
    bad = np.flatnonzero(np.any(m & ~later, axis=1))
    if bad.size:
        raise UserError(
            f"attention_mask: row {int(bad[0])} has a pad after a prompt token; generation "
            "needs left padding (pads first, then the prompt)"
        )


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
      ``[B, T + max_new_tokens]`` int32 token ids (the prompt, then the continuation).

    Raises:
      UserError: bad ``params`` (or params that do not fit ``cfg``), ``input_ids`` (not
        ``[B, T]`` integers in ``[0, vocab_size)`` where the mask is 1), ``attention_mask``
        (also one that is not left-padded), ``max_new_tokens``, ``eos_token_id`` /
        ``pad_token_id`` outside ``[0, vocab_size)``, or a prompt + new tokens beyond the
        trained positions; non-finite logits (checked once, after the last step).
    """
    validate.check_params(params)
    if any(validate._is_tracer(x) for x in jax.tree.leaves((params, input_ids, attention_mask))):
        raise UserError(
            "generate: runs its own jit and checks the logits on the host; call it outside "
            "jax.jit / vmap (forward_cached is the traceable step)"
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise UserError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    check_params_match(cfg, params)
    input_ids = validate.check_token_ids(input_ids, cfg.vocab_size, ndim=2, mask=attention_mask)
    attention_mask = validate.check_attention_mask(attention_mask, input_ids.shape)
    check_left_padded(attention_mask)
    # at least 32 bits: new tokens are written in the ids' dtype, and a uint8 / int16 prompt
    # would wrap every id the narrow type cannot hold
    input_ids = jnp.asarray(input_ids)
    if jnp.dtype(input_ids.dtype).itemsize < 4:
        input_ids = input_ids.astype(jnp.int32)
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
    # ids the caller passes must be token ids; the config's are used as far as they are
    # (an eos the model cannot emit never stops; a pad outside the vocabulary falls back)
    given = {"eos_token_id": eos_token_id} if eos_token_id != -1 else {}
    if pad_token_id is not None:
        given["pad_token_id"] = pad_token_id
    for name, tok in given.items():
        if tok is not None and not _token_id(cfg, tok):
            raise UserError(
                f"{name}: must be a token id in [0, {cfg.vocab_size}) or None, got {tok!r}"
            )
    if eos_token_id == -1:
        eos_token_id = cfg.eos_token_id
    if pad_token_id is None:
        pad_token_id = next(
            (t for t in (cfg.pad_token_id, eos_token_id) if t is not None and _token_id(cfg, t)),
            0,
        )
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
