"""``jcompress tokenwise {save_xy,eval_fake,eval_smooth,rank}``: the tokenwise precision tool.

Flag names follow the seed's ``tokenwise_precision.py`` (``--model_dir --save_path --label
--seed --cn --eu --length --save_dtype``; ``--xy_path --out_json --ranks --qspecs --method
--grid_mode --chunk_tokens``; ``--smooth_model_dir``). Every output path is checked before any
model is loaded; results are written atomically. ``save_xy`` and ``eval_*`` take ``--mesh``
(the captures' batches, the metrics' tokens over ``data``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jcompress.cli.common import (
    add_mesh_flag,
    config_flags,
    config_from_args,
    load_tokenizer_for,
    mesh_from_args,
)
from jcompress.errors import UserError, comma_list, naming

TORCH_DTYPES = {"auto": None, "fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def add_parser(sub) -> None:
    from jcompress.quant.tokenwise import EvalConfig, SaveXYConfig

    p = sub.add_parser(
        "tokenwise",
        help="layer-local output error of fake SVD/MPO-quantization on cached activations",
        description=__doc__.splitlines()[0],
    )
    tsub = p.add_subparsers(dest="tokenwise_cmd", required=True, parser_class=type(p))

    s = tsub.add_parser("save_xy", help="cache X / Y of every measured linear")
    s.add_argument("--model_dir", required=True, help="HF model directory")
    s.add_argument("--save_path", required=True, help="output directory")
    s.add_argument("--label", required=True, help="cache name ({label}.safetensors or {label}/)")
    _torch_dtype(s)
    s.add_argument("--overwrite", action="store_true", help="replace an earlier cache")
    add_mesh_flag(s)
    s.add_argument(
        "--stream",
        action="store_true",
        help="read the checkpoint one decoder layer at a time from its safetensors "
        "shards (weights held: one layer; with --layout per_layer each layer's file "
        "is written before the next is read); the same cache, not resumable",
    )
    s.add_argument("--offload_dir", "--offload-dir", default=None, metavar="DIR",
                   help="with --stream: keep the windows' hidden states in a temporary file "
                   "here")  # fmt: skip
    s.set_defaults(func=run_save_xy, _save_fields=config_flags(s, SaveXYConfig, {
        "save_dtype": {"choices": ["fp16", "bf16", "fp32"], "metavar": None},
        "layout": {"choices": ["single", "per_layer"], "metavar": None},
    }))  # fmt: skip

    for name, smooth in (("eval_fake", False), ("eval_smooth", True)):
        e = tsub.add_parser(
            name,
            help=(
                "output error with SmoothQuant-scaled inputs"
                if smooth
                else "output error of every (rank, spec) configuration"
            ),  # fmt: skip
        )
        if smooth:
            g = e.add_mutually_exclusive_group()
            g.add_argument("--smooth_model_dir", help="smoothed HF model with smooth_factor "
                           "buffers (its weights are diag(s) W)")  # fmt: skip
            g.add_argument("--alpha", type=float, help="SmoothQuant alpha (needs --model_dir; "
                           "default: 0.5 unless --alphas or --smooth_model_dir)")  # fmt: skip
            g.add_argument("--alphas", help="comma-separated alphas searched per input group, "
                           "scored with the first --qspecs spec (needs --model_dir)")  # fmt: skip
            e.add_argument("--model_dir", help="the original model (with --alpha / --alphas; "
                           "read one decoder layer at a time from its safetensors shards, a "
                           "torch .bin checkpoint whole)")  # fmt: skip
        else:
            e.add_argument("--model_dir", required=True, help="HF model directory (its "
                           "safetensors shards are read one decoder layer at a time; a torch "
                           ".bin checkpoint is loaded whole)")  # fmt: skip
        e.add_argument("--xy_path", required=True, help="save_xy cache: file or directory")
        e.add_argument("--out_json", required=True, help="result JSON")
        e.add_argument("--ranks", default="16,32", help="comma-separated ranks (default: 16,32)")
        e.add_argument("--qspecs", default="nvfp4",
                       help="comma-separated fmt@blk specs (default: nvfp4)")  # fmt: skip
        _torch_dtype(e)
        e.add_argument("--no_restore", action="store_true",
                       help="accepted for the seed's scripts; every configuration always starts "
                       "from the original weights")  # fmt: skip
        e.add_argument("--overwrite", action="store_true", help="replace an existing --out_json")
        add_mesh_flag(e)
        fields = config_flags(e, EvalConfig, {
            "method": {"choices": ["svd", "mpo"], "metavar": None},
            "grid_mode": {"choices": ["combined", "full"], "metavar": None},
            "gemm": {"choices": ["auto", "fp32", "split_bf16"], "metavar": None},
        }, fields=("method", "grid_mode", "chunk_tokens", "exact_threshold", "oversample",
                   "niter", "gemm"))  # fmt: skip
        e.set_defaults(func=run_eval, _eval_fields=fields, _smooth=smooth)

    r = tsub.add_parser("rank", help="Ranking-1 / Ranking-2 tables and a heatmap of a result")
    r.add_argument("--json", required=True, help="eval_fake / eval_smooth result")
    r.add_argument("--out_dir", help="output directory (default: {json stem}_rank next to it)")
    r.add_argument("--by", choices=["mean", "max"], default="mean",
                   help="Ranking-1 key: nmse_mean_over_proj or nmse_max_over_proj")  # fmt: skip
    r.add_argument("--top", type=int, default=50, help="rows per markdown table (default: 50)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    r.set_defaults(func=run_rank)


def _torch_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--torch_dtype", choices=list(TORCH_DTYPES), default="auto",
                   help="dtype the model is loaded in (default: auto = as stored)")  # fmt: skip


def _model_dir(path, arg: str):

    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"{arg}: {d} is not a model directory (no config.json)")
    return d


def run_save_xy(args) -> int:
    from jcompress.models import load_hf, read_config
    from jcompress.outputs import check_output_dir, check_output_file
    from jcompress.quant.tokenwise import SaveXYConfig, representative_windows, save_xy
    from jcompress.quant.tokenwise.xy import CACHE_OWNER, output_path
    from jcompress.validate import check_positions

    config = config_from_args(SaveXYConfig, args, args._save_fields)
    d = _model_dir(args.model_dir, "--model_dir")
    if args.stream and args.mesh:
        raise UserError("--mesh: not with --stream (a streamed save_xy runs on one device)")
    if args.offload_dir is not None:
        if not args.stream:
            raise UserError("--offload_dir: only with --stream")
        if not Path(args.offload_dir).is_dir():
            raise UserError(f"--offload_dir: {args.offload_dir} is not a directory")
    model_cfg = read_config(d)
    mesh_from_args(args, model_cfg)  # --mesh: the capture stream runs sharded
    check_positions(model_cfg, config.length, arg="--length", warn=True, override=None)
    texts = dict(zip(("--cn_text", "--eu_text"), config.texts(), strict=True))
    for arg, path in texts.items():
        if not path.is_file():
            raise UserError(f"{arg}: {path} is not a file")
    dest = output_path(args.save_path, args.label, config.layout)
    inputs = {"--model_dir": d, **texts}  # the cache never replaces a text it reads
    if config.layout == "single":
        check_output_file(dest, inputs=inputs, overwrite=args.overwrite,
                          arg="--save_path/--label", owner=CACHE_OWNER)  # fmt: skip
    else:
        check_output_dir(dest, inputs=inputs, overwrite=args.overwrite, arg="--save_path/--label")
    tok = load_tokenizer_for(d, "--model_dir", model_cfg)
    windows = representative_windows(tok, config)  # bad --length / --cn / --eu: before loading
    if args.stream:
        from jcompress.quant.tokenwise import stream_save_xy
        from jcompress.streaming import LayerLoader

        loader = LayerLoader(d, dtype=TORCH_DTYPES[args.torch_dtype])
        out = stream_save_xy(loader, windows, args.save_path, args.label, config=config,
                             overwrite=args.overwrite, offload_dir=args.offload_dir)  # fmt: skip
        print(f"weights held at once: {loader.peak_bytes / 2**20:.1f} MiB (streamed)")
        print(out)
        return 0
    cfg, params = load_hf(d, dtype=TORCH_DTYPES[args.torch_dtype], progress=True)
    out = save_xy(cfg, params, windows, args.save_path, args.label, config=config,
                  overwrite=args.overwrite)  # fmt: skip
    print(out)
    return 0


def run_eval(args) -> int:
    from jcompress.atomic import write_json
    from jcompress.models import read_config
    from jcompress.outputs import check_output_file
    from jcompress.quant.formats import parse_specs
    from jcompress.quant.smooth import DEFAULT_ALPHA, check_alpha
    from jcompress.quant.tokenwise import EvalConfig, Smoothing, XYCache, open_weights, parse_ranks

    ranks = parse_ranks(args.ranks)
    qspecs = parse_specs(args.qspecs, arg="--qspecs") if args.qspecs.strip() else ()
    config = config_from_args(EvalConfig, args, args._eval_fields, ranks=ranks, qspecs=qspecs)
    smoothing = None
    dtype = TORCH_DTYPES[args.torch_dtype]
    inputs = {"--xy_path": args.xy_path}
    if args._smooth:
        if args.smooth_model_dir is not None:
            if args.model_dir is not None:
                raise UserError("--model_dir: not used with --smooth_model_dir (the smoothed "
                                "model is the one evaluated)")  # fmt: skip
            model_dir = _model_dir(args.smooth_model_dir, "--smooth_model_dir")
            inputs["--smooth_model_dir"] = model_dir
        else:
            if args.model_dir is None:
                raise UserError("--model_dir: required with --alpha / --alphas (--alpha is "
                                "0.5 by default), or give --smooth_model_dir")  # fmt: skip
            model_dir = _model_dir(args.model_dir, "--model_dir")
            inputs["--model_dir"] = model_dir
            if args.alphas is None:  # --alpha, or SmoothQuant's default 0.5
                alpha = DEFAULT_ALPHA if args.alpha is None else check_alpha(args.alpha)
                smoothing = Smoothing(alpha=alpha)
            else:
                items = comma_list(args.alphas, arg="--alphas", example="0.3,0.5,0.7")
                try:
                    alphas = tuple(float(a) for a in items)
                except ValueError:
                    raise UserError(f"--alphas: not numbers: {args.alphas!r}") from None
                if len(set(alphas)) < len(alphas):
                    raise UserError(f"--alphas: a value is given twice in {args.alphas!r}")
                smoothing = Smoothing(alphas=alphas)
    else:
        model_dir = _model_dir(args.model_dir, "--model_dir")
        inputs["--model_dir"] = model_dir
    mesh_from_args(args, read_config(model_dir))  # --mesh: tokens over data in the metrics
    check_output_file(args.out_json, inputs=inputs, overwrite=args.overwrite, arg="--out_json")
    with naming("--xy_path"):
        cache = XYCache(args.xy_path)
    if args._smooth and args.smooth_model_dir is not None:
        from jcompress.quant.tokenwise import open_smoothed

        with open_smoothed(model_dir, dtype=dtype) as (cfg, weights, factors):
            res = _eval(cfg, weights, cache, config, Smoothing(factors=factors), model_dir)
    else:
        with naming("--model_dir"):
            cfg, weights = open_weights(model_dir, dtype=dtype)
        res = _eval(cfg, weights, cache, config, smoothing, model_dir)
    write_json(args.out_json, res, overwrite=args.overwrite, arg="--out_json")
    print(args.out_json)
    return 0


def _eval(cfg, weights, cache, config, smoothing, model_dir):
    from jcompress.quant.tokenwise import eval_grid
    from jcompress.streaming import LayerLoader

    res = eval_grid(cfg, weights, cache, config, smoothing=smoothing,
                    meta={"model_dir": str(model_dir)})  # fmt: skip
    if isinstance(weights, LayerLoader):
        print(f"weights held at once: {weights.peak_bytes / 2**20:.1f} MiB (streamed)")
    return res


def run_rank(args) -> int:

    from jcompress.outputs import check_output_dir
    from jcompress.quant.tokenwise import load_result, write_rankings

    if args.top < 1:
        raise UserError(f"--top: must be >= 1, got {args.top}")
    src = Path(args.json)
    out = Path(args.out_dir) if args.out_dir else src.with_name(f"{src.stem}_rank")
    check_output_dir(out, inputs={"--json": src}, overwrite=args.overwrite, arg="--out_dir")
    res = load_result(src)
    write_rankings(res, out, by=args.by, overwrite=args.overwrite, top=args.top)
    print(out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    from jcompress.cli import main

    sys.exit(main(["tokenwise", *sys.argv[1:]]))
