"""``jcompress generate``: greedy continuation of a prompt with the KV cache."""

from __future__ import annotations

import argparse

from jcompress.cli.common import (
    add_attention_flag,
    add_dtype_flag,
    add_mesh_flag,
    add_model_flag,
    check_positions,
    generate_text,
    load_model,
    load_tokenizer_for,
    mesh_from_args,
    positive,
)
from jcompress.errors import UserError

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "generate",
        help="greedy generation with the KV cache",
        description="Greedy continuation of a prompt. Prompt + new tokens may not exceed the "
        "model's trained positions (learned positions: never; RoPE / ALiBi: with --allow-long).",
    )
    add_model_flag(s)
    s.add_argument("--prompt", required=True, help="prompt text")
    s.add_argument(
        "--max-new-tokens", type=positive, default=30, help="tokens to generate (default: 30)"
    )
    s.add_argument(
        "--allow-long",
        action="store_true",
        help="generate past the model's trained positions (RoPE / ALiBi models only)",
    )
    add_dtype_flag(s)
    add_attention_flag(s)
    add_mesh_flag(s)
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    from jcompress.data import tokenize
    from jcompress.models import read_config
    from jcompress.sharding import shard_params

    cfg = read_config(args.model)
    mesh = mesh_from_args(args, cfg)
    tok = load_tokenizer_for(args.model, "--model", cfg)
    n_prompt = int(tokenize(tok, args.prompt).size)
    if n_prompt == 0:
        raise UserError("--prompt: the prompt tokenizes to nothing")
    # a prompt that alone is too long is the prompt's fault, not --max-new-tokens'
    check_positions(cfg, n_prompt, arg="--prompt", allow_long=args.allow_long)
    check_positions(
        cfg,
        n_prompt + args.max_new_tokens,
        arg=f"--max-new-tokens ({args.max_new_tokens} after a {n_prompt}-token prompt)",
        allow_long=args.allow_long,
    )
    cfg, params = load_model(args.model, args.dtype)
    params = shard_params(params, cfg, mesh)  # heads over model; one prompt: no data
    print(
        generate_text(cfg, params, tok, args.prompt, args.max_new_tokens, attention=args.attention)
    )
    return 0
