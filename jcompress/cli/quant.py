"""``jcompress quant apply``: quantize linears by regex rules, check the perplexity change.

::

    jcompress quant apply --model DIR --rule 'model/layers/\\d+/mlp/.*=nvfp4' \\
        --rule 'model/layers/\\d+/self_attn/.*=rank=16;fmt=fp4;blk=128' --out OUT

or, from a tokenwise ranking (best configuration per block, optionally under a bit budget)::

    jcompress quant apply --model DIR --from_ranking rank_out/ranking1.csv --max_bits 6 --out OUT

or, on a factor checkpoint another method wrote (its kernels are typed leaves ``T``), the
quantized residual ``W - T`` against the original dense model::

    jcompress quant apply --model TUCKED --original DIR \\
        --rule 'model/layers/\\d+/mlp/.*=residual=int4@32'

writes ``OUT/report.json``, ``OUT/report.md`` and ``OUT/factors/`` (a jcompress checkpoint with
the quantized leaves; ``load_hf`` reads it back, ``forward`` runs on it) and prints the
perplexity before and after on ``--eval_data`` (default: the bundled WikiText-2 excerpt).

``jcompress quant check`` checks a tokenwise ``eval_fake`` result against the real thing: every
configuration applied to the projections it covers, perplexity on the same windows, Spearman's
rank correlation of the tokenwise and measured orders (:mod:`jcompress.quant.check`)::

    jcompress quant check --json r.json --model DIR --out chk
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from jcompress.cli.common import (
    DTYPES,
    add_mesh_flag,
    check_data_file,
    load_eval_tokens,
    load_tokenizer_for,
    mesh_from_args,
    positive,
)
from jcompress.errors import UserError, comma_list, naming

__all__ = ["add_parser", "run", "run_check"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "quant",
        help="quantize linears (NVFP4, MXFP4, FP4/FP6/FP8, INT4/8) by regex rules",
        description="Quantization tools.",
    )
    sub = s.add_subparsers(
        dest="quant_command", required=True, metavar="{apply,check}", parser_class=type(s)
    )
    a = sub.add_parser(
        "apply",
        help="write quantized leaves into a model and report the perplexity change",
        description="Replace the kernels selected by --rule / --config with quantized leaves "
        "(first matching rule wins), evaluate perplexity before and after, write the "
        "quantized model (jcompress factor checkpoint) and a report.",
    )
    a.add_argument("--model", required=True, help="HF model directory")
    a.add_argument(
        "--original",
        default=None,
        metavar="DIR",
        help="the dense model --model was compressed from (same architecture and shapes): "
        "residual=SPEC rules quantize W - T with W read from here, T --model's typed leaf",
    )
    a.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="REGEX=CONFIG",
        help="regex over linear paths (model/layers/0/mlp/down_proj) = a spec (nvfp4, "
        "fp4@128, int4@128, mxfp4) or a tokenwise cfg key (rank=16;fmt=nvfp4;blk=na, "
        "rank=16;quant=none), residual=SPEC (a typed leaf T of a factor checkpoint -> T + "
        "Q(W - T), W from --original) or none; repeatable, first match wins",
    )
    a.add_argument(
        "--config",
        default=None,
        metavar="JSON",
        help='rules as JSON: {"rules": [[regex, config], ...], '
        '"allow_unmatched": false}; --rule entries come first',
    )
    a.add_argument(
        "--from_ranking",
        default=None,
        metavar="FILE",
        help="rules from a tokenwise ranking: ranking1.csv / best_per_block.csv (one "
        "configuration per layer block), ranking2.csv (per projection) or the eval_fake "
        "JSON; after --rule / --config rules",
    )
    a.add_argument(
        "--ranking_by",
        choices=("mean", "max"),
        default="mean",
        help="Ranking-1 score: nmse_mean_over_proj or nmse_max_over_proj (mean)",
    )
    a.add_argument(
        "--ranking_level",
        choices=("auto", "block", "proj"),
        default="auto",
        help="units of --from_ranking: blocks or projections (auto: what the file ranks; "
        "a JSON result: block)",
    )
    a.add_argument(
        "--max_bits",
        type=float,
        default=None,
        help="--from_ranking budget: mean bits per weight over the chosen linears at most "
        "this (greedy: the largest score drop per added bit first)",
    )
    a.add_argument(
        "--top_k",
        type=int,
        default=None,
        help="--from_ranking: quantize only the K best-scoring units, keep the rest dense",
    )
    a.add_argument(
        "--allow_unmatched",
        action="store_true",
        help="report rules that match nothing instead of failing",
    )
    a.add_argument("--out", default=None, help="output directory (report + factors/)")
    a.add_argument(
        "--packed",
        action="store_true",
        help="also write OUT/packed/: NVFP4 / MXFP4 linears in the compressed-tensors "
        "packed layout (vLLM), the rest dense",
    )
    a.add_argument("--json", default=None, help="also write the report JSON here")
    _add_eval_flags(a)
    a.add_argument("--no_eval", action="store_true", help="skip the perplexity evaluation")
    a.add_argument("--overwrite", action="store_true", help="replace --out / --json")
    add_mesh_flag(a)
    a.set_defaults(func=run)
    _add_check(sub)
    return s


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    """The perplexity flags ``quant apply`` and ``quant check`` share."""
    p.add_argument(
        "--eval_data",
        default=None,
        help="perplexity text (default: the bundled WikiText-2 test excerpt)",
    )
    p.add_argument("--seqlen", type=positive, default=256, help="perplexity window (256)")
    p.add_argument(
        "--max_windows", type=positive, default=40, help="at most this many windows (40)"
    )
    p.add_argument("--batch_size", type=positive, default=8, help="windows per batch (8)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="load dtype (default: stored)")


def _add_check(sub) -> None:
    """``quant check``: here, not under ``tokenwise``, because it writes quantized leaves and
    runs the forward pass as ``quant apply`` does (same rules, same perplexity flags); the
    ``tokenwise`` subcommands are layer-local (see :mod:`jcompress.quant.check`)."""
    c = sub.add_parser(
        "check",
        help="check a tokenwise eval_fake result against end-to-end perplexity",
        description="Apply every configuration of a tokenwise eval_fake JSON to "
        "the projections it covers, measure perplexity on the same windows, and report the "
        "tokenwise prediction (mean / max nmse, a fitted log-perplexity change) beside the "
        "measured change, Spearman's rank correlation and the pairs ordered the other way.",
    )
    c.add_argument(
        "--json",
        required=True,
        metavar="EVAL.json",
        help="the tokenwise eval_fake result (--method svd, not eval_smooth)",
    )
    c.add_argument("--model", required=True, help="HF model directory the result was measured on")
    c.add_argument(
        "--configs",
        default=None,
        metavar="K1,K2",
        help="check only these cfg keys of the result (default: all)",
    )
    c.add_argument(
        "--by",
        choices=("mean", "max"),
        default="mean",
        help="tokenwise score: nmse mean or max over projections (mean)",
    )
    c.add_argument(
        "--out", default=None, help="output directory: check.json, check.md, scatter.png"
    )
    _add_eval_flags(c)
    c.add_argument("--overwrite", action="store_true", help="replace --out")
    add_mesh_flag(c)
    c.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from jcompress.atomic import atomic_dir, write_json
    from jcompress.cli import bundled_eval_text
    from jcompress.eval import check_seqlen
    from jcompress.models import load_hf, read_config
    from jcompress.outputs import check_output_dir
    from jcompress.quant.check import CheckConfig, check_ranking, plan_checks
    from jcompress.quant.tokenwise.rank import load_result

    model = Path(args.model)
    cfg = read_config(model)
    p = Path(args.json)
    result = load_result(p)  # the tokenwise reader: not a file / not JSON / not its schema
    configs = None
    if args.configs is not None:
        configs = tuple(
            comma_list(args.configs, arg="--configs", example="'rank=16;fmt=nvfp4;blk=na'")
        )
    config = CheckConfig(
        by=args.by,
        configs=configs,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
    )
    plan = plan_checks(result, cfg, config)
    mesh_from_args(args, cfg)
    data = check_data_file(args.eval_data or bundled_eval_text(), "--eval_data")
    with naming("--seqlen"):
        check_seqlen(cfg, args.seqlen, arg="--seqlen", override=None)
    if args.out is not None:
        check_output_dir(args.out, inputs={"--model": model, "--json": p},
                         overwrite=args.overwrite, arg="--out")  # fmt: skip
    ids = load_eval_tokens(data, load_tokenizer_for(model, "--model", cfg), args.seqlen,
                           arg="--eval_data", seqlen_arg="--seqlen")  # fmt: skip
    cfg, params = load_hf(model, dtype=args.dtype, progress=True)
    chk = check_ranking(cfg, params, result, ids, config, plan=plan)
    chk = dataclasses.replace(chk, meta={**chk.meta, "model": str(model), "json": str(p),
                                         "eval_data": str(data)})  # fmt: skip
    md = chk.to_markdown()
    print(md)
    if args.out is not None:
        with atomic_dir(Path(args.out), overwrite=args.overwrite, arg="--out") as tmp:
            write_json(tmp / "check.json", chk.to_json())
            (tmp / "check.md").write_text(md + "\n")
            chk.scatter(tmp / "scatter.png")
        print(f"\nwrote {args.out}/check.json, check.md, scatter.png")
    return 0


def _config(args: argparse.Namespace, cfg=None):
    """``(QuantApplyConfig, Choices or None)`` from --rule, --config and --from_ranking."""
    from jcompress.quant.apply import QuantApplyConfig, parse_rule
    from jcompress.quant.choices import ChoiceConfig, config_from_ranking

    rules = [parse_rule(r) for r in args.rule]
    allow = args.allow_unmatched
    if args.config is not None:
        p = Path(args.config)
        if not p.is_file():
            raise UserError(f"--config: {p} is not a file")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"--config: {p} is not valid JSON ({e})") from None
        c = QuantApplyConfig.from_json(data)
        rules += list(c.rules)
        allow = allow or c.allow_unmatched
    choices = None
    if args.from_ranking is not None:
        cc = ChoiceConfig(by=args.ranking_by, level=args.ranking_level,
                          max_bits=args.max_bits, top_k=args.top_k)  # fmt: skip
        rc, choices = config_from_ranking(args.from_ranking, cfg, cc)
        rules += list(rc.rules)
    elif args.max_bits is not None or args.top_k is not None:
        raise UserError("--max_bits / --top_k: they choose from a ranking; add --from_ranking")
    if not rules:
        raise UserError(
            "give --rule REGEX=CONFIG (repeatable), --config JSON or --from_ranking FILE"
        )
    return QuantApplyConfig(rules=tuple(rules), allow_unmatched=allow), choices


def run(args: argparse.Namespace) -> int:
    import jax

    from jcompress.atomic import atomic_dir, write_json
    from jcompress.cli import bundled_eval_text
    from jcompress.eval import check_seqlen, perplexity
    from jcompress.methods import select
    from jcompress.models import load_hf, read_config, save_hf
    from jcompress.models.params import param_shapes
    from jcompress.outputs import check_output_dir, check_output_file
    from jcompress.quant.apply import compress, result_type
    from jcompress.quant.export import EXPORT_FORMATS, save_compressed_tensors
    from jcompress.quant.lowrank import check_rank

    model = Path(args.model)
    cfg = read_config(model)
    config, choices = _config(args, cfg)
    mesh_from_args(args, cfg)  # --mesh: perplexity runs sharded
    inputs = {"--model": model}
    if args.no_eval and args.eval_data is not None:
        raise UserError("--eval_data: not read with --no_eval; drop one of them")
    for flag, value in (
        ("--from_ranking", args.from_ranking),
        ("--config", args.config),
        ("--eval_data", args.eval_data),
    ):
        if value is not None:  # input files: never an output of this run
            inputs[flag] = Path(value)
    shapes = param_shapes(cfg)
    residual = [rx for rx, c in config.rules if c.residual is not None]
    if residual and args.original is None:
        raise UserError(
            f"--original: rule {residual[0]!r} is residual=SPEC, which quantizes W - T with W "
            "the original dense kernel; give --original DIR (the model --model was made from)"
        )
    if args.original is not None and not residual:
        raise UserError(
            "--original: only residual=SPEC rules read the original model, and no rule is one"
        )
    if args.original is not None:
        inputs["--original"] = Path(args.original)
        _check_original(Path(args.original), shapes, cfg)
    if args.packed and args.out is None:
        raise UserError("--packed: needs --out")
    if args.packed and not any(
        c.spec is not None and c.rank is None and c.spec.fmt in EXPORT_FORMATS
        for _, c in config.rules
    ):
        raise UserError(
            f"--packed: no rule quantizes to {' or '.join(EXPORT_FORMATS)} "
            "without a low-rank branch"
        )
    if args.out is not None:
        check_output_dir(args.out, inputs=inputs, overwrite=args.overwrite, arg="--out")
    if args.json is not None:
        check_output_file(args.json, inputs=inputs, overwrite=args.overwrite, arg="--json")
        if args.out is not None and Path(args.json).resolve().is_relative_to(
            Path(args.out).resolve()
        ):
            raise UserError(
                f"--json: {args.json} is inside --out {args.out}, which this run replaces as a "
                "whole; write it elsewhere (--out gets its own report.json)"
            )
    eval_ids = None
    if not args.no_eval:
        data = check_data_file(args.eval_data or bundled_eval_text(), "--eval_data")
        with naming("--seqlen"):
            check_seqlen(cfg, args.seqlen, arg="--seqlen", override=None)
        eval_ids = load_eval_tokens(data, load_tokenizer_for(model, "--model", cfg), args.seqlen,
                                    arg="--eval_data", seqlen_arg="--seqlen")  # fmt: skip
    # the rules are checked against the model's linear paths and their leaf types (a factor
    # checkpoint's config.json names them) before any weights are read
    kinds = _kernel_types(model, cfg, shapes)
    sel = select(
        [rx for rx, _ in config.rules], list(kinds), allow_unmatched=config.allow_unmatched,
        arg="--rule",
    )  # fmt: skip
    by_rx = dict(config.rules)
    for path, rx in sel.chosen.items():
        result_type(path, kinds[path], by_rx[rx])
        shape = shapes.get(f"{path}/kernel")
        if by_rx[rx].rank is not None and kinds[path] is jax.Array and shape is not None:
            check_rank(by_rx[rx].rank, shape, what=f"--rule {rx!r}: rank on {path}/kernel")
    cfg, params = load_hf(model, dtype=args.dtype, progress=True)
    original = None
    if args.original is not None:  # only the kernels W of the residual=SPEC rows
        needed = [f"{p}/kernel" for p, rx in sel.chosen.items() if by_rx[rx].residual is not None]
        original = _original_kernels(Path(args.original), needed, args.dtype)

    def ppl(p):
        if eval_ids is None:
            return None
        return perplexity(
            cfg,
            p,
            eval_ids,
            seqlen=args.seqlen,
            max_windows=args.max_windows,
            batch_size=args.batch_size,
        ).to_dict()

    before = ppl(params)
    t0 = time.perf_counter()
    new_params, report = compress(params, config=config, original=original)
    del original
    secs = time.perf_counter() - t0
    after = ppl(new_params)
    report = report.with_extra(
        model=str(model),
        original=None if args.original is None else str(args.original),
        rules=[[rx, c.key] for rx, c in config.rules],
        quantize_seconds=secs,
        ppl_before=before,
        ppl_after=after,
        eval_data=None if eval_ids is None else str(args.eval_data or bundled_eval_text()),
        seqlen=args.seqlen,
        max_windows=args.max_windows,
    )
    if choices is not None:  # what the tokenwise ranking predicted, beside the measured change
        report = report.with_extra(ranking_choices=choices.to_json())
    result = report.to_json()
    md = report.to_markdown()
    if choices is not None:
        md = choices.to_markdown() + "\n\n" + md
    print(md)
    if args.out is not None:
        with atomic_dir(Path(args.out), overwrite=args.overwrite, arg="--out") as tmp:
            write_json(tmp / "report.json", result)
            (tmp / "report.md").write_text(md + "\n")
            save_hf(cfg, new_params, tmp / "factors", tokenizer_dir=model, factors=True)
            if args.packed:
                save_compressed_tensors(cfg, new_params, tmp / "packed", tokenizer_dir=model)
        extra = ", packed/ (compressed-tensors)" if args.packed else ""
        print(f"\nwrote {args.out}/report.json, report.md, factors/ (jcompress checkpoint)" + extra)
    if args.json is not None:
        write_json(args.json, result, overwrite=args.overwrite, arg="--json")
    return 0


def _kernel_types(model: Path, cfg, shapes) -> dict[str, type]:
    """``{linear path: kernel type}`` from ``config.json`` alone: a factor checkpoint's
    ``jcompress_factors`` entry names its typed leaves, every other kernel is dense."""
    import jax

    from jcompress.leaves import leaf_type
    from jcompress.models import hf

    meta = hf._factors_meta(cfg, model) or {}
    out = {}
    for p, sh in shapes.items():
        if not (p.endswith("/kernel") and len(sh) == 2):
            continue
        desc = meta.get(p)
        kind = jax.Array
        if isinstance(desc, dict):
            try:
                kind = leaf_type(desc.get("type"))
            except UserError as e:
                raise UserError(f"--model: {model}/config.json: {p}: {e}") from None
        out[p[: -len("/kernel")]] = kind
    return out


def _original_kernels(original: Path, paths: list[str], dtype) -> dict:
    """A tree of the params ``paths`` of ``--original`` alone: read tensor by tensor from its
    safetensors (:meth:`jcompress.streaming.LayerLoader.read`), so memory holds these, not a
    second whole model; a torch ``.bin`` checkpoint cannot be read lazily and is loaded whole,
    then cut."""
    from jcompress.models import load_hf
    from jcompress.models.convert import flatten, unflatten
    from jcompress.streaming import LayerLoader

    if (original / "model.safetensors").is_file() or (
        original / "model.safetensors.index.json"
    ).is_file():
        return unflatten(LayerLoader(original, dtype=dtype).read(paths))
    _, tree = load_hf(original, dtype=dtype, progress=True)
    want = set(paths)
    return unflatten({p: v for p, v in flatten(tree).items() if p in want})


def _check_original(original: Path, shapes, cfg) -> None:
    """``--original`` describes the model ``--model`` was compressed from: the same family and
    every param shape, stored dense (checked on ``config.json`` before any load)."""
    from jcompress.models import hf
    from jcompress.models.params import param_shapes

    if not original.is_dir():
        raise UserError(f"--original: {original} is not a directory")
    ocfg = hf.read_config(original)
    if ocfg.family != cfg.family:
        raise UserError(
            f"--original: {original} holds a model of family {ocfg.family.value}, --model "
            f"one of family {cfg.family.value}; give the dense model --model was compressed from"
        )
    oshapes = param_shapes(ocfg)
    for p in sorted(set(shapes) | set(oshapes)):
        a, b = shapes.get(p), oshapes.get(p)
        if a != b:
            fmt = lambda s: "missing" if s is None else list(s)  # noqa: E731
            raise UserError(
                f"--original: {original} has {p} {fmt(b)} where --model has {fmt(a)}; give "
                "the dense model --model was compressed from (same architecture and shapes)"
            )
    if hf._factors_meta(ocfg, original):
        raise UserError(
            f"--original: {original} is a jcompress factor checkpoint; give the dense model "
            "(the original kernels W of residual=SPEC)"
        )
