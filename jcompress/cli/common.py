"""Helpers shared by CLI subcommands."""

from __future__ import annotations

from typing import Any

from jcompress.errors import UserError

__all__ = ["generate_text"]


def generate_text(cfg, params, tok: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` decoded to text (prompt included)."""
    import jax.numpy as jnp

    from jcompress.data import tokenize
    from jcompress.models import generate

    ids = tokenize(tok, prompt)
    if ids.size == 0:
        raise UserError("--prompt: the prompt tokenizes to nothing")
    out = generate(cfg, params, jnp.asarray(ids)[None], max_new_tokens=max_new_tokens)
    return tok.decode([int(t) for t in out[0]], skip_special_tokens=True)
