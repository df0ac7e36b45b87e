"""``jcompress run RECIPE``: a chain of methods from a recipe file, end to end.

The recipe (JSON, or YAML with PyYAML) is an ordered list of steps ``{"method": ..., <config
fields>}`` (:mod:`jcompress.compose.recipe`). Before the model is loaded: the recipe is
validated field by field, the data files and the output directory are checked, and the whole
chain is checked on leaf types and shapes against the model's config
(:func:`jcompress.compose.preflight` on ``param_shapes``); after loading, once more on the
loaded tree (a ``factors/`` export may hold typed leaves already). Then the steps run on one
set of calibration windows (``--calib_data``), with perplexity after every step
(``--eval_data``). ``--out`` receives ``report.json``, ``report.md``, the dense-equivalent HF
export (``dense/``), the lossless factor export (``factors/``) and, when the last step tuned
SpargeAttn thresholds, ``sparge_params.safetensors``; all written atomically through
:mod:`jcompress.outputs` / :mod:`jcompress.atomic`. With ``--mesh`` the steps' calibration
streams and the perplexity rows run sharded (:mod:`jcompress.sharding`).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from jcompress.cli.common import (
    DataJob,
    add_calib_window_flags,
    add_dtype_flag,
    add_eval_window_flags,
    add_mesh_flag,
    mesh_from_args,
)
from jcompress.errors import UserError

__all__ = ["RunJob", "add_parser", "check_run_job", "run", "run_recipe_job"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunJob(DataJob):
    """One ``jcompress run``."""

    recipe: Path
    dtype: str | None = None


def _is_factor_export(model: Path) -> bool:
    import json

    try:
        return "jcompress_factors" in json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_run_job(job: RunJob):
    """Everything cheap, before any weights are loaded: the recipe, the model config, the data
    files, the output guard, the window lengths and the chain's pre-flight on the config's
    shapes. Returns ``(chain, ModelConfig)``."""
    import jax
    import jax.numpy as jnp

    from jcompress.compose import Chain, load_recipe
    from jcompress.models import read_config
    from jcompress.models.convert import unflatten
    from jcompress.models.params import param_shapes

    steps = load_recipe(job.recipe)  # a bad recipe: one line, nothing else touched
    chain = Chain(steps)
    if not Path(job.model).is_dir():
        raise UserError(f"--model: {job.model} is not a directory")
    cfg = read_config(job.model)
    inputs = {"--model": Path(job.model), "RECIPE": Path(job.recipe), **job.data_inputs()}
    for i, s in enumerate(steps):
        if job.calib_data is None and s.entry.needs_calib(s.config):
            raise UserError(f"--calib_data: step {i} ({s.method}) calibrates on a text")
        off = getattr(s.config, "offload_dir", None)
        if off is not None:
            inputs[f"step {i} offload_dir"] = Path(off)
    if job.calib_data is not None and not any(s.entry.reads_calib(s.config) for s in steps):
        raise UserError(
            f"--calib_data: no step of the recipe reads calibration text "
            f"({', '.join(s.method for s in steps)}); drop it"
        )
    job.check_out_and_windows(cfg, inputs)
    if not _is_factor_export(job.model):  # a plain HF checkpoint: every kernel is dense
        shapes = unflatten(
            {p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in param_shapes(cfg).items()}
        )
        chain.preflight(shapes, cfg)
    return chain, cfg


def run_recipe_job(job: RunJob, log=print) -> dict[str, Any]:
    """Run the job; returns the JSON-able chain report (also ``out/report.json``)."""
    from jcompress.atomic import atomic_dir, write_json
    from jcompress.models import load_hf, save_hf

    chain, model_cfg = check_run_job(job)
    calib, eval_ids, seqlen = job.tokens(model_cfg)
    cfg, params = load_hf(job.model, dtype=job.dtype, progress=True)
    chain.preflight(params, cfg)  # the loaded tree (a factors/ export: typed leaves)
    new_params, report = chain(
        params, cfg, calib,
        eval_ids=eval_ids, eval_seqlen=job.eval_seqlen or seqlen,
        eval_max_windows=job.eval_max_windows,
    )  # fmt: skip
    report = report.with_extra(
        recipe=chain.to_json(),
        model=str(job.model),
        dtype=job.dtype,
        calib_data=None if job.calib_data is None else str(job.calib_data),
        nsamples=None if calib is None else job.nsamples,
        seqlen=None if calib is None else seqlen,
        eval_data=None if job.eval_data is None else str(job.eval_data),
    )
    result, md = report.to_json(), report.to_markdown()
    log(md)
    if job.out is not None:
        out = Path(job.out)
        with atomic_dir(out, overwrite=job.overwrite, arg="--out") as tmp:
            write_json(tmp / "report.json", result)
            (tmp / "report.md").write_text(md + "\n")
            save_hf(cfg, new_params, tmp / "dense", tokenizer_dir=job.model)
            save_hf(cfg, new_params, tmp / "factors", tokenizer_dir=job.model, factors=True)
            if report.attention_state is not None:
                from jcompress.sparge import save_params

                att = report.attention
                save_params(
                    tmp / "sparge_params.safetensors",
                    report.attention_state,
                    model=str(job.model),
                    extra={"block_q": att.block_q, "block_k": att.block_k},
                )
        log(f"\nwrote {out}/report.json, report.md, dense/ (transformers), factors/ (jcompress)")
    return result


# --------------------------------------------------------------------------- subcommand


def add_parser(subparsers) -> argparse.ArgumentParser:
    """The ``run`` subcommand."""
    from jcompress.compose import NOT_CHAINABLE, REGISTRY

    methods = ", ".join(sorted(REGISTRY))
    s = subparsers.add_parser(
        "run",
        help="run a recipe: methods chained on one model (eigen_attention, tucker, quant, ...)",
        description="Run the steps of RECIPE (a JSON or YAML list of {method: ..., <config "
        f"fields>}}; methods: {methods}; not chainable: {', '.join(NOT_CHAINABLE)}) on one "
        "model, each step on the previous one's leaves; report sizes and (with --eval_data) "
        "perplexity after every step; write report.json, report.md, dense/ (transformers) "
        "and factors/ (jcompress, lossless) into --out.",
    )
    s.add_argument("recipe", metavar="RECIPE", help="recipe file (.json, .yaml, .yml)")
    s.add_argument("--model", required=True, help="HF model directory (config, weights, tokenizer)")
    s.add_argument("--out", default=None, help="output directory (nothing written when omitted)")
    s.add_argument(
        "--calib_data",
        "--calib-data",
        default=None,
        help="calibration text (.txt / .jsonl) for the steps that calibrate",
    )
    add_calib_window_flags(s)
    s.add_argument(
        "--eval_data",
        "--eval-data",
        default=None,
        help="evaluation text: perplexity before and after every step (default: none)",
    )
    add_eval_window_flags(s)
    add_dtype_flag(s)
    add_mesh_flag(s)
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (only output jcompress itself wrote)",
    )
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    mesh_from_args(args)  # --mesh: every step's calibration stream and perplexity run sharded
    job = RunJob(recipe=Path(args.recipe), dtype=args.dtype, **DataJob.fields_from_args(args))
    run_recipe_job(job)
    return 0
