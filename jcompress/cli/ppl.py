"""``jcompress ppl``: perplexity of a model on a text file (the shared/data protocol)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jcompress.cli.common import (
    add_attention_flag,
    add_dtype_flag,
    add_mesh_flag,
    add_model_flag,
    check_data_file,
    load_eval_tokens,
    load_model,
    load_tokenizer_for,
    mesh_from_args,
    positive,
    table,
)
from jcompress.errors import UserError

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "ppl",
        help="perplexity of a model on a text file",
        description="Perplexity: the whole text is tokenized with the model's "
        "tokenizer, cut into non-overlapping windows of --seqlen tokens, and "
        "ppl = exp(mean over windows of the mean next-token NLL).",
    )
    add_model_flag(s)
    s.add_argument(
        "--data",
        required=True,
        help='text file: .txt (whole file) or .jsonl ("text" fields joined by blank lines)',
    )
    s.add_argument(
        "--seqlen", type=positive, default=512, help="window length in tokens (default: 512)"
    )
    s.add_argument(
        "--max-windows",
        type=positive,
        default=None,
        help="use at most this many windows (default: all)",
    )
    s.add_argument(
        "--batch-size", type=positive, default=8, help="windows per forward call (default: 8)"
    )
    add_dtype_flag(s)
    s.add_argument(
        "--json", default=None, metavar="OUT", help="also write the result as JSON to OUT"
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    s.add_argument(
        "--allow-long",
        action="store_true",
        help="run a RoPE model past its trained positions without a warning",
    )
    add_attention_flag(s)
    s.add_argument(
        "--tuned",
        default=None,
        metavar="FILE",
        help="with --attention block_sparse: per-layer, per-head thresholds from "
        "`jcompress sparge tune` (block sizes from its metadata; default: untuned)",
    )
    add_mesh_flag(s)
    s.add_argument(
        "--stream",
        action="store_true",
        help="read the checkpoint one decoder layer at a time from its safetensors shards "
        "(memory ~ one layer + the windows' hidden states); same numbers",
    )
    s.add_argument(
        "--offload-dir",
        "--offload_dir",
        dest="offload_dir",
        default=None,
        metavar="DIR",
        help="with --stream: keep the windows' hidden states in a temporary file here",
    )
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    from jcompress.atomic import write_json
    from jcompress.eval import check_seqlen, perplexity
    from jcompress.models import read_config
    from jcompress.outputs import check_output_file

    cfg = read_config(args.model)
    mesh = mesh_from_args(args, cfg)
    check_data_file(args.data, "--data")
    if args.json:
        inputs = {"--model": Path(args.model), "--data": Path(args.data)}
        if args.tuned is not None:
            inputs["--tuned"] = Path(args.tuned)
        check_output_file(args.json, inputs=inputs, overwrite=args.overwrite, arg="--json")
    check_seqlen(
        cfg, args.seqlen, allow_long=args.allow_long, override="--allow-long", arg="--seqlen"
    )
    if args.stream and args.mesh:
        raise UserError("--mesh: not with --stream (streamed perplexity runs on one device)")
    if args.offload_dir is not None:
        if not args.stream:
            raise UserError("--offload-dir: only with --stream")
        if not Path(args.offload_dir).is_dir():
            raise UserError(f"--offload-dir: {args.offload_dir} is not a directory")
    attention, state = args.attention, None
    if args.tuned is not None:
        if args.attention != "block_sparse":
            raise UserError(
                f"--tuned: only with --attention block_sparse (got --attention {args.attention})"
            )
        from jcompress.cli.sparge import load_tuned
        from jcompress.sparge import BlockSparse

        state, bq, bk = load_tuned(args.tuned, cfg)
        attention = BlockSparse(block_q=bq, block_k=bk)
    ids = load_eval_tokens(args.data, load_tokenizer_for(args.model, "--model", cfg), args.seqlen,
                           arg="--data", seqlen_arg="--seqlen")  # fmt: skip
    window = dict(
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        allow_long=True,  # warned above, once, naming the flag
        attention=attention,
        attention_state=state,
    )
    extra = []
    if args.stream:
        from jcompress.streaming import LayerLoader, stream_perplexity

        loader = LayerLoader(args.model, dtype=args.dtype)
        t0 = time.perf_counter()
        r = stream_perplexity(loader, ids, offload_dir=args.offload_dir, **window)
        extra = [("weights held at once", f"{loader.peak_bytes / 2**20:.1f} MiB (streamed)")]
    else:
        cfg, params = load_model(args.model, args.dtype)
        t0 = time.perf_counter()
        r = perplexity(cfg, params, ids, mesh=mesh, **window)
    secs = time.perf_counter() - t0
    out = {
        "model": str(args.model),
        "data": str(args.data),
        "tokens": int(ids.shape[0]),
        "dtype": args.dtype or "stored",
        "mesh": args.mesh,
        "attention": args.attention,
        "tuned": args.tuned,
        **r.to_dict(),
        "seconds": secs,
        "streamed": bool(args.stream),
    }
    print(
        table(
            [
                ("model", str(args.model)),
                ("data", str(args.data)),
                ("tokens", f"{ids.shape[0]:,}"),
                ("windows", f"{r.n_windows} x {r.seqlen}"),
                ("mean NLL", f"{r.mean_nll:.5f}"),
                ("perplexity", f"{r.ppl:.4f}"),
                ("seconds", f"{secs:.1f}"),
                *extra,
            ]
        )
    )
    if args.json:
        write_json(args.json, out, overwrite=args.overwrite, arg="--json")
    return 0
