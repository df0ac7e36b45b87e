"""``jcompress stream METHOD``: run a compression method one decoder layer at a time from the
checkpoint's safetensors shards (peak memory ~ one layer + calibration activations),
resumably (``--resume``), writing an HF checkpoint (:func:`jcompress.streaming.stream_compress`).

Methods that run per layer through the calibration stream are listed in :data:`METHODS`;
their flags are derived from their config dataclass as in their own subcommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jcompress.cli.common import (
    add_calib_window_flags,
    add_dtype_flag,
    calib_window_args,
    config_flags,
    config_from_args,
)
from jcompress.errors import UserError

__all__ = ["METHODS", "add_parser", "run"]


class _Calib(typing.NamedTuple):
    """How a method's calibration windows are drawn (``None`` fields: no calibration)."""

    nsamples: int
    seqlen: int
    seed: int


@dataclasses.dataclass(frozen=True)
class _Method:
    help: str
    compress: Callable[[], Callable[..., Any]]
    add_flags: Callable[[argparse.ArgumentParser], list[str]]
    build: Callable[[argparse.Namespace, Any], tuple[Any, _Calib | None]]
    globals_step: bool = False  # the method may compress the head / embeddings


def _eigen_compress():
    from jcompress.eigen_attention import compress

    return compress


def _eigen_flags(p: argparse.ArgumentParser) -> list[str]:
    from jcompress.cli.eigen import eigen_overrides
    from jcompress.eigen_attention import EigenAttentionConfig

    return config_flags(p, EigenAttentionConfig, eigen_overrides())


def _eigen_build(args: argparse.Namespace, cfg: Any) -> tuple[Any, _Calib | None]:
    from jcompress.cli.eigen import check_walk_flags
    from jcompress.eigen_attention import EigenAttentionConfig
    from jcompress.eigen_attention.compress import check_bounds

    check_walk_flags(args)
    seqlen = args.seqlen or min(2048, cfg.max_position_embeddings)
    config = config_from_args(EigenAttentionConfig, args, args.config_fields, seqlen=seqlen)
    if args.calib_data is None:
        raise UserError("--calib_data: EigenAttention needs calibration text")
    check_bounds(cfg, config, cfg.num_kv_heads, cfg.head_dim)
    return config, _Calib(config.nsamples, config.seqlen, config.seed)


def _tucker_compress():
    from jcompress.tucker import compress

    return compress


def _tucker_flags(p: argparse.ArgumentParser) -> list[str]:
    from jcompress.cli.tucker import tucker_overrides
    from jcompress.tucker import TuckerConfig, Variant

    p.add_argument(
        "--variant",
        choices=[v.value for v in Variant],
        default=Variant.TT.value,
        help="decomposition (default: tt)",
    )
    add_calib_window_flags(p)
    return config_flags(p, TuckerConfig, tucker_overrides())


def _tucker_build(args: argparse.Namespace, cfg: Any) -> tuple[Any, _Calib | None]:
    from jcompress.tucker import TuckerConfig

    config = config_from_args(TuckerConfig, args, args.config_fields, variant=args.variant)
    nsamples, seed = calib_window_args(args)
    if args.calib_data is None:
        if args.variant == "tucker_mps":
            raise UserError(
                "--calib_data: --variant tucker_mps learns its bases from calibration text"
            )
        return config, None
    seqlen = args.seqlen or min(512, cfg.max_position_embeddings)
    return config, _Calib(nsamples, seqlen, seed)


def _quant_compress():
    from jcompress.quant.apply import compress

    return compress


def _quant_flags(p: argparse.ArgumentParser) -> list[str]:
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="REGEX=CONFIG",
        help="regex over linear paths (model/layers/0/mlp/down_proj, lm_head) = a spec "
        "(nvfp4, fp4@128, int4@128, mxfp4) or a tokenwise cfg key (rank=16;fmt=nvfp4;blk=na) "
        "or none; repeatable, first match wins (as `jcompress quant apply`)",
    )
    p.add_argument(
        "--allow_unmatched",
        "--allow-unmatched",
        action="store_true",
        help="report rules that match nothing instead of failing",
    )
    return []


def _quant_build(args: argparse.Namespace, cfg: Any) -> tuple[Any, _Calib | None]:
    from jcompress.quant.apply import QuantApplyConfig, parse_rule

    if not args.rule:
        raise UserError("--rule: give at least one REGEX=CONFIG")
    if args.calib_data is not None:
        raise UserError(
            "--calib_data: stream quant is data-free (no calibration text is read); drop it"
        )
    rules = tuple(parse_rule(r) for r in args.rule)
    return QuantApplyConfig(rules=rules, allow_unmatched=args.allow_unmatched), None


METHODS: dict[str, _Method] = {
    "eigen": _Method(
        "EigenAttention (low-rank K/Q/V from calibration activations), layer by layer",
        _eigen_compress,
        _eigen_flags,
        _eigen_build,
    ),
    "tucker": _Method(
        "Tucker / MPS compression of the K/Q/V projections, layer by layer (with "
        "--calib_data: each layer's output error; tucker_mps: bases learned from it)",
        _tucker_compress,
        _tucker_flags,
        _tucker_build,
    ),
    "quant": _Method(
        "quantized (or low-rank + quantized) linears by regex rules, layer by layer, the "
        "head / embeddings in one step of their own (data-free)",
        _quant_compress,
        _quant_flags,
        _quant_build,
        globals_step=True,
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
            default=None,
            help="calibration text (.txt / .jsonl), e.g. wikitext-2/valid.txt",
        )
        p.add_argument("--out", required=True, help="output checkpoint directory")
        names = m.add_flags(p)
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
    from jcompress.cli.common import calibration_from_text, check_data_file, load_tokenizer_for
    from jcompress.eval import check_seqlen
    from jcompress.models import read_config
    from jcompress.outputs import check_output_dir
    from jcompress.streaming import stream_compress

    m = METHODS[args.stream_method]
    model, out = Path(args.model), Path(args.out)
    cfg = read_config(model)
    config, spec = m.build(args, cfg)
    offload = getattr(config, "offload_dir", None)
    inputs: dict[str, Path] = {"--model": model}
    if args.calib_data is not None:
        inputs["--calib_data"] = check_data_file(args.calib_data, "--calib_data")
    if args.work_dir is not None:
        inputs["--work_dir"] = Path(args.work_dir)
    check_output_dir(out, inputs=inputs, overwrite=args.overwrite, arg="--out")
    calib = None
    if spec is not None:
        check_seqlen(cfg, spec.seqlen, arg="--seqlen", override=None)
        tok = load_tokenizer_for(model, "--model", cfg)
        calib = calibration_from_text(args.calib_data, tok, spec.nsamples, spec.seqlen, spec.seed)
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
            globals_step=m.globals_step,
        )
    if res is None:  # another process of a multi-host run wrote --out
        return 0
    for w in caught:
        print(f"warning: {w.message}")
    print(res.report.to_markdown())
    print(f"\nwrote {out} ({'factors' if args.factors else 'dense-equivalent HF checkpoint'})")
    return 0
