"""``jcompress generate``: greedy continuation of a prompt with the KV cache."""

from __future__ import annotations

import argparse

from jcompress.cli.common import (
    add_attention_flag,
    add_dtype_flag,
    add_mesh_flag,
    add_model_flag,
    check_prompt,
    generate_text,
    load_model,
    load_tokenizer_for,
    mesh_from_args,
    positive,
)

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
    from jcompress.models import read_config
    from jcompress.sharding import shard_params

    cfg = read_config(args.model)
    mesh = mesh_from_args(args, cfg)
    tok = load_tokenizer_for(args.model, "--model", cfg)
    check_prompt(cfg, tok, args.prompt, args.max_new_tokens, max_new_arg="--max-new-tokens",
                 allow_long=args.allow_long)  # fmt: skip
    cfg, params = load_model(args.model, args.dtype)
    params = shard_params(params, cfg, mesh)  # heads over model; one prompt: no data
    print(
        generate_text(cfg, params, tok, args.prompt, args.max_new_tokens, attention=args.attention)
    )
    return 0
