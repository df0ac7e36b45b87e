"""``jcompress demo``: the EigenAttention job on the bundled llama-1m model, no flags needed."""

from __future__ import annotations

import argparse
from pathlib import Path

from jcompress.cli.common import config_flags
from jcompress.cli.eigen import add_sample_flags, eigen_overrides, job_from_args, run_eigen_job

__all__ = ["add_parser", "run"]

_DEMO_FIELDS = ("nsamples", "seqlen", "avg_dim", "error_budget")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``demo`` subcommand (a small run: 32 windows of 256 tokens)."""
    from jcompress.eigen_attention import EigenAttentionConfig

    s = subparsers.add_parser(
        "demo",
        help="run the main job on the bundled model (no flags needed)",
        description="EigenAttention on the bundled llama-1m model: calibrates on a bundled "
        "WikiText-2 validation excerpt, then prints per-layer ranks and errors, a before/after "
        "table of perplexity (bundled WikiText-2 raw test excerpt), KV-cache size and "
        "parameters, and a greedy sample before and after.",
    )
    names = config_flags(
        s,
        EigenAttentionConfig,
        eigen_overrides(nsamples=32, seqlen=256, avg_dim=4),
        fields=_DEMO_FIELDS,
    )
    add_sample_flags(s)
    s.add_argument("--out", default=None, help="also write the report + exports to this directory")
    s.add_argument("--json", default=None, metavar="OUT", help="also write the report JSON here")
    s.set_defaults(func=run, config_fields=names, offload_dir=None)
    return s


def run(args: argparse.Namespace) -> int:
    from jcompress.cli import bundled_calib_text, bundled_eval_text, bundled_model_dir

    model = bundled_model_dir()
    print(f"jcompress demo: EigenAttention on the bundled llama-1m model ({model})")
    print("calibration: WikiText-2 validation excerpt; evaluation: WikiText-2 raw test excerpt\n")
    job = job_from_args(
        args,
        model=Path(model),
        calib_data=bundled_calib_text(),
        eval_data=bundled_eval_text(),
        text_args=("the bundled calibration text", "the bundled evaluation text"),
    )
    run_eigen_job(job)
    return 0
