"""``jcompress convert``: HF model directory <-> jcompress orbax checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from jcompress.cli.common import DTYPES, load_tokenizer_for, model_bytes
from jcompress.errors import UserError

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "convert",
        help="HF directory <-> orbax checkpoint",
        description="--to orbax: SRC is an HF model directory, OUT an orbax "
        "checkpoint directory. --to hf: SRC is a jcompress orbax checkpoint "
        "(typed compressed leaves are materialized), OUT an HF directory.",
    )
    s.add_argument(
        "src", help="input: HF model directory (--to orbax) or orbax checkpoint (--to hf)"
    )
    s.add_argument("out", help="output directory (must not exist unless --overwrite)")
    s.add_argument("--to", choices=("orbax", "hf"), required=True, help="output format")
    s.add_argument(
        "--tokenizer", default=None, help="with --to hf: copy tokenizer files from this directory"
    )
    s.add_argument(
        "--dtype", choices=DTYPES, default=None, help="with --to orbax: cast floating weights"
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory (only one jcompress itself wrote)",
    )
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    from jcompress import checkpoint
    from jcompress.models import load_hf, read_config, save_hf
    from jcompress.outputs import check_output_dir, is_jcompress_output, path_bytes

    src, out = Path(args.src), Path(args.out)
    inputs = {"SRC": src}
    if args.to == "orbax":
        if args.tokenizer is not None:
            raise UserError("--tokenizer: only applies with --to hf")
        read_config(src)
        check_output_dir(
            out,
            inputs=inputs,
            overwrite=args.overwrite,
            arg="OUT",
            need_bytes=model_bytes(src),
            # checkpoints written before the marker existed are recognized by their sidecar
            require_marker=not (checkpoint.is_checkpoint(out) or is_jcompress_output(out)),
        )
        cfg, params = load_hf(src, dtype=args.dtype, progress=True)
        checkpoint.save(out, cfg, params, overwrite=args.overwrite)
    else:
        if args.dtype:
            raise UserError(
                "--dtype: only applies with --to orbax (HF export keeps the stored dtype)"
            )
        if args.tokenizer is not None:
            load_tokenizer_for(args.tokenizer, "--tokenizer")
            inputs["--tokenizer"] = Path(args.tokenizer)
        if not checkpoint.is_checkpoint(src):
            raise UserError(
                f"SRC: {src} is not a jcompress checkpoint (no {checkpoint.SIDECAR}); "
                "--to hf converts a checkpoint written by --to orbax"
            )
        check_output_dir(
            out, inputs=inputs, overwrite=args.overwrite, arg="OUT", need_bytes=path_bytes(src)
        )
        cfg, params = checkpoint.restore(src)
        save_hf(
            cfg,
            params,
            out,
            tokenizer_dir=args.tokenizer,
            overwrite=args.overwrite,
            progress=True,
            marker=True,
        )
    print(f"wrote {out}")
    return 0
