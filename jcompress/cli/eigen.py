"""``jcompress eigen`` (and the demo's main job): EigenAttention end to end.

Calibrate, compress, evaluate perplexity before and after, generate a sample before and after,
and write ``report.json``, ``report.md``, the dense-equivalent HF export (``dense/``) and the
factor export (``factors/``) into ``--out``, atomically (temporary sibling, then rename).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

from jcompress.errors import UserError

__all__ = ["EigenJob", "check_eigen_job", "run_eigen_job"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EigenJob:
    model: Path
    calib_data: Path
    eval_data: Path
    out: Path | None
    nsamples: int
    seqlen: int | None
    avg_dim: int
    error_budget: float
    seed: int
    eval_seqlen: int | None
    eval_max_windows: int | None
    batch_size: int
    layers: tuple[str, ...]
    prompt: str
    max_new_tokens: int
    overwrite: bool = False
    offload_dir: str | None = None


def check_eigen_job(job: EigenJob):
    """Validate everything cheap before any heavy work; returns ``(cfg, config)``."""
    from jcompress.eigen_attention import EigenAttentionConfig
    from jcompress.eval import check_seqlen
    from jcompress.models import read_config

    cfg = read_config(job.model)
    for flag, path in (("--calib_data", job.calib_data), ("--eval_data", job.eval_data)):
        if not Path(path).is_file():
            raise UserError(f"{flag}: {path} is not a file (expected a .txt or .jsonl text file)")
    if job.out is not None and Path(job.out).exists() and not job.overwrite:
        raise UserError(f"--out: {job.out} already exists (pass --overwrite to replace it)")
    seqlen = job.seqlen or min(2048, cfg.max_position_embeddings)
    config = EigenAttentionConfig(
        nsamples=job.nsamples,
        seqlen=seqlen,
        avg_dim=job.avg_dim,
        error_budget=job.error_budget,
        seed=job.seed,
        batch_size=job.batch_size,
        layers=job.layers,
        offload_dir=job.offload_dir,
    )
    check_seqlen(cfg, seqlen)
    check_seqlen(cfg, job.eval_seqlen or seqlen)
    return cfg, config


def run_eigen_job(job: EigenJob, log=print) -> dict[str, Any]:
    """Run the whole job; returns the JSON-able result (also written to ``out/report.json``)."""
    import jax.numpy as jnp

    from jcompress.atomic import atomic_dir, write_json
    from jcompress.cli.common import generate_text
    from jcompress.data import calibration_windows, load_tokenizer, load_tokens
    from jcompress.eigen_attention import compress
    from jcompress.eval import perplexity
    from jcompress.models import load_hf, save_hf

    _, config = check_eigen_job(job)
    cfg, params = load_hf(job.model, progress=True)
    tok = load_tokenizer(job.model)
    calib_ids = load_tokens(job.calib_data, tok)
    eval_ids = load_tokens(job.eval_data, tok)
    calib = calibration_windows(calib_ids, config.nsamples, config.seqlen, seed=config.seed)
    eval_seqlen = job.eval_seqlen or config.seqlen

    before = perplexity(cfg, params, eval_ids, seqlen=eval_seqlen, max_windows=job.eval_max_windows)
    sample_before = generate_text(cfg, params, tok, job.prompt, job.max_new_tokens)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new_params, report = compress(params, cfg, jnp.asarray(calib), config=config)
    for w in caught:
        log(f"warning: {w.message}")
    secs = time.perf_counter() - t0
    after = perplexity(
        cfg, new_params, eval_ids, seqlen=eval_seqlen, max_windows=job.eval_max_windows
    )
    sample_after = generate_text(cfg, new_params, tok, job.prompt, job.max_new_tokens)
    report = report.with_extra(
        model=str(job.model),
        calib_data=str(job.calib_data),
        eval_data=str(job.eval_data),
        seed=config.seed,
        compress_seconds=secs,
        ppl_before=before.to_dict(),
        ppl_after=after.to_dict(),
        sample_before=sample_before,
        sample_after=sample_after,
    )
    result = report.to_dict()
    summary = _summary(report)
    log(report.to_markdown())
    log("")
    log(summary)
    log(f"\nsample before: {sample_before}\nsample after:  {sample_after}")
    if job.out is not None:
        out = Path(job.out)
        with atomic_dir(out) as tmp:
            write_json(tmp / "report.json", result)
            (tmp / "report.md").write_text(report.to_markdown() + "\n\n" + summary + "\n")
            save_hf(cfg, new_params, tmp / "dense", tokenizer_dir=job.model)
            save_hf(cfg, new_params, tmp / "factors", tokenizer_dir=job.model, factors=True)
        log(f"\nwrote {out}/report.json, report.md, dense/ (transformers), factors/ (jcompress)")
    return result


def _summary(report) -> str:
    e = report.extra
    rows = [
        (
            "perplexity",
            f"{e['ppl_before']['ppl']:.3f}",
            f"{e['ppl_after']['ppl']:.3f}",
            f"{100 * (e['ppl_after']['ppl'] / e['ppl_before']['ppl'] - 1):+.2f}%",
        ),
        (
            "KV cache / token (scalars)",
            f"{report.kv_cache_before}",
            f"{report.kv_cache_after}",
            f"{100 * report.kv_cache_ratio:.1f}%",
        ),
        (
            "parameters",
            f"{report.params_before:,}",
            f"{report.params_after:,}",
            f"{100 * report.params_after / report.params_before:.1f}%",
        ),
    ]
    lines = ["| | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)
