"""``jcompress tucker``: tensor-network compression of the attention projections end to end.

Variants ``tt`` / ``tucker`` (data-free) and ``tucker_mps`` (bases learned from calibration
outputs), see :mod:`jcompress.tucker`. With ``--calib_data`` the report carries each compressed
layer's output error (required by ``tucker_mps``); with ``--eval_data`` perplexity before and
after. Writes ``report.json``, ``report.md``, the dense-equivalent HF export (``dense/``) and
the lossless factor export (``factors/``) into ``--out`` atomically (temporary sibling, then
rename). ``--test-type compression-only`` decomposes the first selected layer's projections and
prints their ratio / error; ``--test-type full`` compresses that whole layer and runs the model
forward on it; neither writes anything. Every :class:`~jcompress.tucker.TuckerConfig` field is a
flag (derived by :func:`jcompress.cli.common.config_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

from jcompress.cli.common import (
    DataJob,
    add_calib_window_flags,
    add_eval_window_flags,
    add_mesh_flag,
    config_flags,
    config_from_args,
    mesh_from_args,
    positive,
)
from jcompress.errors import UserError

__all__ = ["TuckerJob", "add_parser", "check_tucker_job", "run", "run_tucker_job"]

TEST_TYPES = ("compression-only", "full")


def _rank_list(flag: str):
    def parse(s: str) -> tuple[int, ...]:
        try:
            out = tuple(int(x) for x in s.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag}: expected comma-separated positive integers such as 6,6,8, got {s!r}"
            ) from None
        if not out or min(out) < 1:
            raise argparse.ArgumentTypeError(
                f"{flag}: expected comma-separated positive integers such as 6,6,8, got {s!r}"
            )
        return out

    return parse


def _ranks_flag(name: str) -> dict[str, Any]:
    return {"action": "store", "type": _rank_list(f"--{name}"), "default": None, "metavar": "R,R"}


def tucker_overrides() -> dict[str, dict[str, Any] | None]:
    """argparse overrides for :class:`TuckerConfig`'s fields (comma-separated rank lists,
    validated integers; ``variant`` gets its own flag with choices)."""
    return {
        "variant": None,
        "tt_ranks": _ranks_flag("tt_ranks"),
        "hooi_ranks": _ranks_flag("hooi_ranks"),
        "hooi_ranks_q": _ranks_flag("hooi_ranks_q"),
        "hooi_ranks_k": _ranks_flag("hooi_ranks_k"),
        "hooi_ranks_v": _ranks_flag("hooi_ranks_v"),
        "basis_ranks": _ranks_flag("basis_ranks"),
        "n_cores": {"type": positive},
        "batch_size": {"type": positive},
        "layers": {
            "metavar": "REGEX",
            "help": "compress only projections whose path (e.g. "
            "model/layers/3/self_attn/k_proj) fully matches; repeatable (default: k/q/v of "
            "every layer)",
        },
        "offload_dir": {"metavar": "DIR"},
    }


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuckerJob(DataJob):
    """One ``jcompress tucker`` run."""

    config: Any  # TuckerConfig
    test_type: str | None = None


def check_tucker_job(job: TuckerJob):
    """Everything cheap, before any weights are loaded: the model config, the data files, the
    output guard, window lengths, and the layer rules. Returns the ``ModelConfig``."""
    from jcompress.methods import select
    from jcompress.models import read_config
    from jcompress.models.families import spec_for
    from jcompress.tucker import Variant
    from jcompress.tucker.compress import check_fits

    if not Path(job.model).is_dir():
        raise UserError(f"--model: {job.model} is not a directory")
    cfg = read_config(job.model)
    if job.test_type is not None and job.test_type not in TEST_TYPES:
        raise UserError(
            f"--test-type: must be one of {', '.join(TEST_TYPES)}, got {job.test_type!r}"
        )
    if job.test_type is not None and job.out is not None:
        raise UserError("--out: a --test-type run writes nothing; drop --out or --test-type")
    if job.test_type is not None and job.eval_data is not None:
        raise UserError(
            "--eval_data: a --test-type run measures no perplexity; drop --eval_data or --test-type"
        )
    if job.config.variant is Variant.TUCKER_MPS and job.calib_data is None:
        raise UserError("--calib_data: variant tucker_mps learns its bases from calibration text")
    inputs = {"--model": Path(job.model), **job.data_inputs()}
    if job.config.offload_dir is not None:
        if not os.path.isdir(job.config.offload_dir):
            raise UserError(f"--offload_dir: {job.config.offload_dir} is not a directory")
        inputs["--offload_dir"] = Path(job.config.offload_dir)
    job.check_out_and_windows(cfg, inputs)
    lay = spec_for(cfg.family.value).layout
    paths = [f"{lay.layers}/{i}/{r}" for i in range(cfg.num_layers) for r in (lay.q, lay.k, lay.v)]
    select(job.config.layers, paths, allow_unmatched=job.config.allow_unmatched, arg="--layers")
    check_fits(cfg, job.config)  # ranks against the projection shapes, before any weights
    return cfg


def _first_layer_rules(cfg, config) -> tuple[str, ...]:
    """The config's rules restricted to the first layer that has a selected projection."""
    import warnings

    from jcompress.methods import select
    from jcompress.models.families import spec_for

    lay = spec_for(cfg.family.value).layout
    for i in range(cfg.num_layers):
        paths = [f"{lay.layers}/{i}/{r}" for r in (lay.q, lay.k, lay.v)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chosen = list(select(config.layers, paths, allow_unmatched=True).chosen)
        if chosen:
            return tuple(re.escape(p) for p in chosen)
    raise UserError("--layers: the rules select no projection")


def run_tucker_job(job: TuckerJob, log=print) -> dict[str, Any]:
    """Run the job; returns the JSON-able report (also written to ``out/report.json``)."""
    import numpy as np

    from jcompress.atomic import atomic_dir, write_json
    from jcompress.eval import perplexity
    from jcompress.models import forward, load_hf, save_hf
    from jcompress.tucker import compress

    model_cfg = check_tucker_job(job)
    config = job.config
    calib, eval_ids, seqlen = job.tokens(model_cfg)
    cfg, params = load_hf(job.model, progress=True)

    if job.test_type is not None:
        one = dataclasses.replace(config, layers=_first_layer_rules(cfg, config))
        with_calib = calib if job.test_type == "full" or calib is not None else None
        new, report = compress(params, cfg, with_calib, config=one)
        log(report.to_markdown())
        if job.test_type == "full":
            batch = (
                calib[: config.batch_size]
                if calib is not None
                else np.random.default_rng(job.seed).integers(0, cfg.vocab_size, (2, seqlen))
            )
            logits = np.asarray(forward(cfg, new, batch))
            if not np.isfinite(logits).all():
                raise UserError("the compressed layer gives non-finite logits")
            ref = np.asarray(forward(cfg, params, batch))
            rel = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
            log(f"\nforward on the compressed layer: logits {list(logits.shape)}, relative "
                f"logit change {rel:.4f}")  # fmt: skip
            report = report.with_extra(logits_relative_change=rel)
        return report.to_json()

    def ppl(p):
        if eval_ids is None:
            return None
        es = job.eval_seqlen or seqlen
        return perplexity(cfg, p, eval_ids, seqlen=es, max_windows=job.eval_max_windows).to_dict()

    before = ppl(params)
    t0 = time.perf_counter()
    new_params, report = compress(params, cfg, calib, config=config)
    secs = time.perf_counter() - t0
    after = ppl(new_params)
    report = report.with_extra(
        model=str(job.model),
        calib_data=None if job.calib_data is None else str(job.calib_data),
        nsamples=None if calib is None else job.nsamples,
        seqlen=None if calib is None else seqlen,
        eval_data=None if job.eval_data is None else str(job.eval_data),
        compress_seconds=secs,
        ppl_before=before,
        ppl_after=after,
    )
    result = report.to_json()
    md = report.to_markdown()
    if before is not None:
        md += (
            f"\n\nPerplexity: {before['ppl']:.3f} -> {after['ppl']:.3f} "
            f"({100 * (after['ppl'] / before['ppl'] - 1):+.2f}%)"
        )
    log(md)
    if job.out is not None:
        out = Path(job.out)
        with atomic_dir(out, overwrite=job.overwrite, arg="--out") as tmp:
            write_json(tmp / "report.json", result)
            (tmp / "report.md").write_text(md + "\n")
            save_hf(cfg, new_params, tmp / "dense", tokenizer_dir=job.model)
            save_hf(cfg, new_params, tmp / "factors", tokenizer_dir=job.model, factors=True)
        log(f"\nwrote {out}/report.json, report.md, dense/ (transformers), factors/ (jcompress)")
    return result


# --------------------------------------------------------------------------- subcommand


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``tucker`` subcommand."""
    from jcompress.tucker import TuckerConfig, Variant

    s = subparsers.add_parser(
        "tucker",
        help="Tucker / MPS (tensor-train) compression of the K/Q/V projections",
        description="Replace the K/Q/V projections by TT-matrices (--variant tt), Tucker "
        "tensors [hidden, heads, head_dim] (tucker) or Kronecker-basis projections learned by "
        "HOOI from calibration outputs (tucker_mps); report ratio, weight and layer output "
        "errors, KV-cache size and (with --eval_data) perplexity; write report.json, "
        "report.md, dense/ (transformers) and factors/ (jcompress, lossless) into --out.",
    )
    s.add_argument("--model", required=True, help="HF model directory (config, weights, tokenizer)")
    s.add_argument(
        "--variant",
        choices=[v.value for v in Variant],
        default=Variant.TT.value,
        help="decomposition (default: tt)",
    )
    s.add_argument(
        "--calib_data",
        "--calib-data",
        default=None,
        help="calibration text (.txt / .jsonl): layer output errors; required by tucker_mps",
    )
    add_calib_window_flags(s)
    s.add_argument(
        "--eval_data",
        "--eval-data",
        default=None,
        help="evaluation text for perplexity before/after (default: none)",
    )
    add_eval_window_flags(s)
    add_mesh_flag(s)
    s.add_argument("--out", default=None, help="output directory (nothing written when omitted)")
    s.add_argument(
        "--test-type",
        "--test_type",
        dest="test_type",
        choices=TEST_TYPES,
        default=None,
        help="compression-only: decompose the first selected layer's projections and print "
        "ratio/error; full: compress that layer and run the forward (writes nothing)",
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (only output jcompress itself wrote)",
    )
    names = config_flags(s, TuckerConfig, tucker_overrides())
    s.set_defaults(func=run, config_fields=names)
    return s


def run(args: argparse.Namespace) -> int:
    from jcompress.tucker import TuckerConfig

    mesh_from_args(args)  # --mesh: the calibration stream and perplexity run sharded
    config = config_from_args(TuckerConfig, args, args.config_fields, variant=args.variant)
    # --test-type full draws its random batch from --seed when there is no calibration text
    fields = DataJob.fields_from_args(args, seed_without_calib=args.test_type == "full")
    job = TuckerJob(config=config, test_type=args.test_type, **fields)
    run_tucker_job(job)
    return 0
