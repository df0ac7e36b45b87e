"""``jcompress stream METHOD``: run a compression method one decoder layer at a time from the
checkpoint's safetensors shards (peak memory ~ one layer + calibration activations),
resumably (``--resume``), writing an HF checkpoint (:func:`jcompress.streaming.stream_compress`).

Methods that run per layer through the calibration stream are listed in :data:`METHODS`;
their flags are derived from their config dataclass as in their own subcommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jcompress.cli.common import add_dtype_flag, config_flags, config_from_args
from jcompress.errors import UserError

__all__ = ["METHODS", "add_parser", "run"]


@dataclasses.dataclass(frozen=True)
class _Method:
    help: str
    config: Callable[[], type]
    compress: Callable[[], Callable[..., Any]]
    overrides: Callable[[], dict[str, Any]]


def _eigen_config():
    from jcompress.eigen_attention import EigenAttentionConfig

    return EigenAttentionConfig


def _eigen_compress():
    from jcompress.eigen_attention import compress

    return compress


def _eigen_overrides():
    from jcompress.cli.eigen import eigen_overrides

    return eigen_overrides()


METHODS: dict[str, _Method] = {
    "eigen": _Method(
        "EigenAttention (low-rank K/Q/V from calibration activations), layer by layer",
        _eigen_config,
        _eigen_compress,
        _eigen_overrides,
    ),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "stream",
        help="run a method layer by layer from the safetensors shards (memory ~ one layer)",
        description="Read one decoder layer's tensors from the checkpoint's safetensors "
        "shards, run the method on it (its calibration inputs carried from layer to layer, "
        "offloaded with --offload_dir), write the compressed layer to its own shard, record it "
        "in a manifest, and drop it. An interrupted run continues with --resume from the last "
        "finished layer (same flags, model and calibration data; anything else is an error). "
        "--out receives an HF checkpoint (dense-equivalent, which transformers loads, or "
        "--factors) with jcompress_stream_report.json.",
    )
    sub = s.add_subparsers(dest="method", metavar="{" + ",".join(METHODS) + "}", required=True)
    for name, m in METHODS.items():
        p = sub.add_parser(name, help=m.help, description=m.help)
        p.add_argument("--model", required=True, help="HF model directory (safetensors)")
        p.add_argument(
            "--calib_data",
            "--calib-data",
            required=True,
            help="calibration text (.txt / .jsonl), e.g. wikitext-2/valid.txt",
        )
        p.add_argument("--out", required=True, help="output checkpoint directory")
        names = config_flags(p, m.config(), m.overrides())
        p.add_argument(
            "--work_dir",
            "--work-dir",
            default=None,
            help="resumable state (layer shards, next-layer inputs, manifest); "
            "default: OUT.stream next to --out, removed when the run completes",
        )
        p.add_argument(
            "--resume", action="store_true", help="continue the run recorded in --work_dir"
        )
        p.add_argument(
            "--factors",
            action="store_true",
            help="write the factor form (jcompress, lossless) instead of the dense-equivalent "
            "checkpoint",
        )
        add_dtype_flag(p)
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace an existing --out (only output jcompress itself wrote)",
        )
        p.set_defaults(func=run, config_fields=names, stream_method=name)
    return s


def run(args: argparse.Namespace) -> int:
    from jcompress.cli.common import check_data_file, load_tokenizer_for
    from jcompress.data import calibration_windows, load_tokens
    from jcompress.eval import check_seqlen
    from jcompress.models import read_config
    from jcompress.outputs import check_output_dir
    from jcompress.streaming import stream_compress

    m = METHODS[args.stream_method]
    model, out = Path(args.model), Path(args.out)
    cfg = read_config(model)
    check_data_file(args.calib_data, "--calib_data")
    offload = getattr(args, "offload_dir", None)
    if offload is not None and not os.path.isdir(offload):
        raise UserError(f"--offload_dir: {offload} is not a directory")
    seqlen = getattr(args, "seqlen", None) or min(2048, cfg.max_position_embeddings)
    config = config_from_args(m.config(), args, args.config_fields, seqlen=seqlen)
    inputs = {"--model": model, "--calib_data": Path(args.calib_data)}
    check_output_dir(out, inputs=inputs, overwrite=args.overwrite, arg="--out")
    check_seqlen(cfg, config.seqlen)
    ids = load_tokens(args.calib_data, load_tokenizer_for(model, "--model", cfg))
    most = int(ids.shape[0]) // config.seqlen
    if config.seqlen + 1 >= ids.shape[0] or config.nsamples > most:
        raise UserError(
            f"--nsamples: {config.nsamples} windows of {config.seqlen} tokens need "
            f"{config.nsamples * config.seqlen:,} tokens; {args.calib_data} has "
            f"{ids.shape[0]:,} (at most {most} windows)"
        )
    calib = calibration_windows(ids, config.nsamples, config.seqlen, seed=config.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = stream_compress(
            model,
            out,
            m.compress(),
            config=config,
            calib=calib,
            method=args.stream_method,
            work_dir=args.work_dir,
            resume=args.resume,
            factors=args.factors,
            dtype=args.dtype,
            overwrite=args.overwrite,
            offload_dir=offload,
            marker=True,
        )
    for w in caught:
        print(f"warning: {w.message}")
    print(res.report.to_markdown())
    print(f"\nwrote {out} ({'factors' if args.factors else 'dense-equivalent HF checkpoint'})")
    return 0
