"""``jcompress eigen`` (and the demo's main job): EigenAttention end to end.

Calibrate, compress, evaluate perplexity before and after (only with ``--eval_data``), generate
a sample before and after, and write ``report.json``, ``report.md``, the dense-equivalent HF
export (``dense/``) and the factor export (``factors/``) into ``--out``, atomically (temporary
sibling, then rename). Every flag of :class:`~jcompress.eigen_attention.EigenAttentionConfig`
is reachable (derived by :func:`jcompress.cli.common.config_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import warnings
from pathlib import Path
from typing import Any

from jcompress.cli.common import (
    add_eval_window_flags,
    add_mesh_flag,
    budget,
    check_eval_window_flags,
    config_flags,
    config_from_args,
    flags_under,
    mesh_from_args,
    positive,
)
from jcompress.errors import UserError

__all__ = ["EigenJob", "add_parser", "check_eigen_job", "eigen_overrides", "run", "run_eigen_job"]

# argparse settings that differ from what config_flags derives (validated types, the CLI's
# "capped at the model's positions" seqlen rule, the reference's metavar for --layers)
FT_DEFAULTS: dict[str, Any] = {"ft_steps": 100, "ft_lr": 1e-4, "ft_batch_size": 4}
"""The --ft_* flags' values when --fine_tune is given without them (FineTuneConfig's)."""
_SEQLEN_HELP = "tokens per calibration window (default: 2048, capped at the model's positions)"
_AVG_HELP = (
    "average the features of this many consecutive windows; at most --nsamples (default: {})"
)


def eigen_overrides(**defaults: Any) -> dict[str, dict[str, Any]]:
    """argparse overrides for :class:`EigenAttentionConfig`'s fields (``defaults`` replace the
    config's defaults, e.g. the demo's smaller run)."""
    from jcompress.eigen_attention.compress import THRESHOLD_STEP

    o: dict[str, dict[str, Any]] = {
        "nsamples": {"type": positive, "help": "calibration windows (default: 128)"},
        "seed": {"help": "calibration sampling seed (default: 2)"},
        "seqlen": {"type": positive, "default": None, "help": _SEQLEN_HELP},
        "error_budget": {"type": budget},
        "batch_size": {"type": positive},
        "layers": {
            "metavar": "REGEX",
            "help": "compress only layers whose path (e.g. model/layers/3) fully matches; "
            "repeatable (default: all layers)",
        },
        "offload_dir": {"metavar": "DIR"},
        "avg_dim": {"type": positive, "help": _AVG_HELP.format(16)},
        "min_rank": {
            "help": "total rank (KV heads x per-head rank) must stay above this; default: 64 "
            "for OPT (the reference's floor, written for opt-125m: on a small OPT such as "
            "opt-1m every layer stops at it, so every --error_budget above ~0.007 gives the "
            "same model; lower it there), 0 otherwise",
        },
        "rank_search": {"choices": ("threshold", "bisect")},
        # default None: given with --rank_search bisect is an error (job_from_args)
        "threshold_step": {
            "default": None,
            "help": "decrement of the threshold walk, --rank_search threshold only "
            f"(default: {THRESHOLD_STEP})",
        },  # fmt: skip
        "gram_dtype": {
            "choices": ("float32", "float64"),
            "help": "accumulation dtype of the per-head Gram matrices (default: float64, the "
            "spectrum's tail to float64 accuracy; float32 is cheaper on TPUs)",
        },
    }
    for k, v in defaults.items():
        o.setdefault(k, {})["default"] = v
        if k == "seqlen":
            o[k]["help"] = f"tokens per calibration window (default: {v})"
        elif k == "nsamples":
            o[k]["help"] = f"calibration windows (default: {v})"
        elif k == "avg_dim":
            o[k]["help"] = _AVG_HELP.format(v)
        elif "help" not in o[k]:
            o[k].pop("help", None)  # derived help shows the new default
    return o


@dataclasses.dataclass(frozen=True, kw_only=True)
class EigenJob:
    """One EigenAttention run. ``config.seqlen`` is already resolved (never ``None``)."""

    model: Path
    calib_data: Path
    eval_data: Path | None
    out: Path | None
    config: Any  # EigenAttentionConfig
    eval_seqlen: int | None = None
    eval_max_windows: int | None = None
    prompt: str = "The history of the"
    max_new_tokens: int = 30
    overwrite: bool = False
    json: Path | None = None
    fine_tune: Any = None  # FineTuneConfig, or None: no recovery fine-tuning
    # what errors call the two texts: their flags, or (``demo``) a description
    text_args: tuple[str, str] = ("--calib_data", "--eval_data")


def resolve_seqlen(model: Path, seqlen: int | None) -> int:
    """``--seqlen``, or 2048 capped at the model's positions when not given."""
    from jcompress.models import read_config

    return seqlen or min(2048, read_config(model).max_position_embeddings)


def _check_layers(cfg, config) -> None:
    """``--layers`` rules against the model's layer paths, before anything is loaded."""
    import warnings

    from jcompress.methods import select
    from jcompress.models.families import spec_for

    root = spec_for(cfg.family.value).layout.layers
    paths = [f"{root}/{i}" for i in range(cfg.num_layers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compress() warns once more, with the report
        select(config.layers, paths, allow_unmatched=config.allow_unmatched, arg="--layers")


def check_eigen_job(job: EigenJob):
    """Validate everything cheap before any weights are loaded: inputs, outputs (the
    :mod:`jcompress.outputs` guard, free space), window lengths, the sample length. Returns
    the model's ``ModelConfig``."""
    from jcompress.cli.common import check_data_file, check_positions, model_bytes
    from jcompress.eigen_attention.compress import check_bounds
    from jcompress.eval import check_seqlen
    from jcompress.models import read_config
    from jcompress.outputs import check_output_dir, check_output_file

    cfg = read_config(job.model)
    _check_layers(cfg, job.config)
    check_bounds(cfg, job.config, cfg.num_kv_heads, cfg.head_dim)
    check_data_file(job.calib_data, "--calib_data")
    if job.eval_data is not None:
        check_data_file(job.eval_data, "--eval_data")
    inputs = {"--model": job.model, "--calib_data": job.calib_data}
    if job.eval_data is not None:
        inputs["--eval_data"] = job.eval_data
    if job.config.offload_dir is not None:
        inputs["--offload_dir"] = Path(job.config.offload_dir)
    if job.out is not None:
        check_output_dir(
            job.out,
            inputs=inputs,
            overwrite=job.overwrite,
            arg="--out",
            need_bytes=2 * model_bytes(job.model),  # dense/ + factors/ (<= dense)
        )
    if job.json is not None:
        json_inputs = dict(inputs)
        if job.out is not None:
            json_inputs["--out"] = job.out
        check_output_file(job.json, inputs=json_inputs, overwrite=job.overwrite, arg="--json")
    check_seqlen(cfg, job.config.seqlen, arg="--seqlen", override=None)
    if job.eval_seqlen:
        check_seqlen(cfg, job.eval_seqlen, arg="--eval_seqlen", override=None)
    check_positions(cfg, job.max_new_tokens + 1, arg="--max_new_tokens", override=None)
    return cfg


def run_eigen_job(job: EigenJob, log=print) -> dict[str, Any]:
    """Run the whole job; returns the JSON-able result (also written to ``out/report.json``
    and to ``job.json``)."""
    import jax.numpy as jnp

    from jcompress.atomic import atomic_dir, write_json
    from jcompress.cli.common import (
        calibration_from_text,
        check_prompt,
        generate_text,
        load_eval_tokens,
        load_tokenizer_for,
    )
    from jcompress.eigen_attention import compress
    from jcompress.eigen_attention.figures import kv_cache_figure
    from jcompress.eval import perplexity
    from jcompress.models import load_hf, save_hf

    model_cfg = check_eigen_job(job)
    config = job.config
    tok = load_tokenizer_for(job.model, "--model", model_cfg)
    check_prompt(model_cfg, tok, job.prompt, job.max_new_tokens)  # before any weight
    calib = calibration_from_text(job.calib_data, tok, config.nsamples, config.seqlen,
                                  config.seed, arg=job.text_args[0])  # fmt: skip
    eval_seqlen = job.eval_seqlen or config.seqlen
    eval_ids = None
    if job.eval_data is not None:
        eval_ids = load_eval_tokens(
            job.eval_data,
            tok,
            eval_seqlen,
            arg=job.text_args[1],
            seqlen_arg="--eval_seqlen" if job.eval_seqlen else "--seqlen",
        )
    cfg, params = load_hf(job.model, progress=True)

    def ppl(p):
        if eval_ids is None:
            return None
        return perplexity(
            cfg, p, eval_ids, seqlen=eval_seqlen, max_windows=job.eval_max_windows
        ).to_dict()

    before = ppl(params)
    sample_before = generate_text(cfg, params, tok, job.prompt, job.max_new_tokens)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new_params, report = compress(params, cfg, jnp.asarray(calib), config=config)
    for w in caught:
        log(f"warning: {w.message}")
    secs = time.perf_counter() - t0
    ft_extra = {}
    if job.fine_tune is not None:
        from jcompress.eigen_attention.finetune import fine_tune

        compressed_ppl = ppl(new_params)
        new_params, ft = fine_tune(new_params, cfg, calib, config=job.fine_tune)
        ft_extra = {"fine_tune": ft.to_json(), "ppl_after_compress": compressed_ppl}
        log(f"fine-tuned {ft.trainable_params:,} factor parameters for {ft.steps} steps: "
            f"training loss {ft.losses[0]:.4f} -> {ft.losses[-1]:.4f}")  # fmt: skip
    after = ppl(new_params)
    sample_after = generate_text(cfg, new_params, tok, job.prompt, job.max_new_tokens)
    report = report.with_extra(
        model=str(job.model),
        calib_data=str(job.calib_data),
        eval_data=None if job.eval_data is None else str(job.eval_data),
        seed=config.seed,
        compress_seconds=secs,
        ppl_before=before,
        ppl_after=after,
        sample_before=sample_before,
        sample_after=sample_after,
        **ft_extra,
    )
    result = report.to_dict()
    summary = _summary(report)
    log(report.to_markdown())
    log("")
    log(summary)
    log(f"\nsample before: {sample_before}\nsample after:  {sample_after}")
    if job.out is not None:
        out = Path(job.out)
        with atomic_dir(out, overwrite=job.overwrite, arg="--out") as tmp:
            write_json(tmp / "report.json", result)
            (tmp / "report.md").write_text(report.to_markdown() + "\n\n" + summary + "\n")
            kv_cache_figure(report, tmp / "kv_cache.png")
            save_hf(cfg, new_params, tmp / "dense", tokenizer_dir=job.model)
            save_hf(cfg, new_params, tmp / "factors", tokenizer_dir=job.model, factors=True)
        log(
            f"\nwrote {out}/report.json, report.md, kv_cache.png, dense/ (transformers), "
            "factors/ (jcompress)"
        )
    if job.json is not None:
        write_json(job.json, result, overwrite=job.overwrite, arg="--json")
    return result


def _summary(report) -> str:
    e = report.extra
    rows = []
    if e.get("ppl_before") is not None:
        rows.append(
            (
                "perplexity",
                f"{e['ppl_before']['ppl']:.3f}",
                f"{e['ppl_after']['ppl']:.3f}",
                f"{100 * (e['ppl_after']['ppl'] / e['ppl_before']['ppl'] - 1):+.2f}%",
            )
        )
    if e.get("ppl_after_compress") is not None:
        b, c = e["ppl_before"]["ppl"], e["ppl_after_compress"]["ppl"]
        rows.insert(0, ("perplexity, before fine-tuning", f"{b:.3f}", f"{c:.3f}",
                        f"{100 * (c / b - 1):+.2f}%"))  # fmt: skip
    selected = len(report.layers) < report.model_layers
    rows += [
        (
            "KV cache / token (scalars), selected layers"
            if selected
            else "KV cache / token (scalars)",
            f"{report.kv_cache_before}",
            f"{report.kv_cache_after}",
            f"{100 * report.kv_cache_ratio:.1f}%",
        ),
    ]
    if selected:
        rows.append(
            (
                "KV cache / token (scalars), whole model",
                f"{report.model_kv_cache_before}",
                f"{report.model_kv_cache_after}",
                f"{100 * report.model_kv_cache_ratio:.1f}%",
            )
        )
    rows += [
        (
            "parameters",
            f"{report.params_before:,}",
            f"{report.params_after:,}",
            f"{100 * report.params_after / report.params_before:.1f}%",
        ),
    ]
    lines = ["| | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append(
        f"\ncompression: {report.compress_seconds:.1f} s, {report.evaluations} layer evaluations "
        f"(rank search: {report.rank_search}"
        + (", reference mode)" if report.reference_mode else ")")
    )
    if e.get("ppl_before") is None:
        lines.append("\nperplexity: not evaluated (no --eval_data given)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- subcommand


def add_sample_flags(s: argparse.ArgumentParser) -> None:
    """``--prompt``, ``--max_new_tokens`` and ``--overwrite`` (eigen and demo)."""
    s.add_argument("--prompt", default="The history of the", help="prompt for the samples")
    s.add_argument(
        "--max_new_tokens",
        "--max-new-tokens",
        type=positive,
        default=30,
        help="sample length (default: 30)",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (only a directory jcompress itself wrote) and --json file",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``eigen`` subcommand."""
    from jcompress.eigen_attention import EigenAttentionConfig

    s = subparsers.add_parser(
        "eigen",
        help="EigenAttention: low-rank K/Q/V from calibration activations",
        description="EigenAttention (arXiv 2408.05646): calibrate per-head bases of the K/Q/V "
        "projection outputs layer by layer, pick each layer's ranks (--rank_search: the "
        "reference's threshold walk, or bisection on the ranks) so that the layer's relative "
        "output error stays under --error_budget (--reference_mode: the reference's exact "
        "rules), evaluate perplexity (with --eval_data) and a sample before/after, and write "
        "report.json, report.md, dense/ "
        "(loads in transformers) and factors/ (jcompress, lossless) into --out. Flags keep the "
        "reference names; dashes work too.",
    )
    s.add_argument("--model", required=True, help="HF model directory (config, weights, tokenizer)")
    s.add_argument(
        "--calib_data",
        "--calib-data",
        required=True,
        help="calibration text (.txt / .jsonl), e.g. wikitext-2/valid.txt",
    )
    s.add_argument(
        "--eval_data",
        "--eval-data",
        default=None,
        help="evaluation text for perplexity before/after (default: none; no perplexity rows)",
    )
    s.add_argument("--out", default=None, help="output directory (nothing written when omitted)")
    names = config_flags(s, EigenAttentionConfig, eigen_overrides())
    add_sample_flags(s)
    add_eval_window_flags(s)
    add_mesh_flag(s)
    s.add_argument("--json", default=None, metavar="OUT", help="also write the report JSON here")
    s.add_argument(
        "--fine_tune",
        "--fine-tune",
        action="store_true",
        help="after compression, tune the low-rank factors (bases and everything else frozen) "
        "on the calibration windows with AdamW; perplexity before fine-tuning is reported too",
    )
    # default None: given without --fine_tune is an error (job_from_args), not a silent no-op
    s.add_argument("--ft_steps", "--ft-steps", type=positive, default=None,
                   help=f"fine-tuning steps (default: {FT_DEFAULTS['ft_steps']})")  # fmt: skip
    s.add_argument("--ft_lr", "--ft-lr", type=float, default=None,
                   help="fine-tuning peak learning rate "
                   f"(default: {FT_DEFAULTS['ft_lr']})")  # fmt: skip
    s.add_argument("--ft_batch_size", "--ft-batch-size", type=positive, default=None,
                   help="fine-tuning windows per step "
                   f"(default: {FT_DEFAULTS['ft_batch_size']})")  # fmt: skip
    s.set_defaults(func=run, config_fields=names)
    return s


def check_walk_flags(args: argparse.Namespace) -> None:
    """``--threshold_step`` given at all with ``--rank_search bisect`` is an error (its flag
    default is None; the config alone cannot tell an explicit 0.02 from the default). The
    demo has neither flag; ``stream eigen`` shares them."""
    step = getattr(args, "threshold_step", None)
    if getattr(args, "rank_search", None) == "bisect" and step is not None:
        raise UserError(
            "--threshold_step: only used by --rank_search threshold (bisect searches the "
            "ranks themselves); drop it or use the threshold walk"
        )


def job_from_args(
    args: argparse.Namespace, *, model: Path, calib_data: Path, eval_data: Path | None, **kw
) -> EigenJob:
    """An :class:`EigenJob` from parsed flags (the config built from its derived flags)."""
    from jcompress.eigen_attention import EigenAttentionConfig

    if args.offload_dir is not None and not os.path.isdir(args.offload_dir):
        raise UserError(f"--offload_dir: {args.offload_dir} is not a directory")
    check_walk_flags(args)
    config = config_from_args(
        EigenAttentionConfig,
        args,
        args.config_fields,
        seqlen=resolve_seqlen(model, args.seqlen),
    )
    ft = None
    tuning = bool(getattr(args, "fine_tune", False))
    v = flags_under(args, "--fine_tune", FT_DEFAULTS, present=tuning)
    if tuning:
        from jcompress.eigen_attention.finetune import FineTuneConfig

        ft = FineTuneConfig(steps=v["ft_steps"], lr=v["ft_lr"], batch_size=v["ft_batch_size"])
    return EigenJob(
        fine_tune=ft,
        model=model,
        calib_data=calib_data,
        eval_data=eval_data,
        out=None if args.out is None else Path(args.out),
        config=config,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        overwrite=args.overwrite,
        json=None if args.json is None else Path(args.json),
        **kw,
    )


def run(args: argparse.Namespace) -> int:
    mesh_from_args(args)  # --mesh: the calibration stream and perplexity run sharded
    check_eval_window_flags(args)
    job = job_from_args(
        args,
        model=Path(args.model),
        calib_data=Path(args.calib_data),
        eval_data=None if args.eval_data is None else Path(args.eval_data),
        eval_seqlen=args.eval_seqlen,
        eval_max_windows=args.eval_max_windows,
    )
    run_eigen_job(job)
    return 0
