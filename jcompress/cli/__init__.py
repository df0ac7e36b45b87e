"""The ``jcompress`` command line: ``demo``, ``eigen``, ``ppl``, ``generate``, ``convert``.

User errors (bad paths, bad options, malformed checkpoints) print one line
``jcompress: error: ...`` on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path

from jcompress.atomic import write_json
from jcompress.cli.common import generate_text
from jcompress.errors import UserError

__all__ = ["main", "bundled_calib_text", "bundled_eval_text", "bundled_model_dir", "write_json"]

DTYPES = ("float32", "bfloat16", "float16")


def bundled_model_dir() -> Path:
    """Directory of the bundled llama-1m model (config, safetensors, tokenizer)."""
    return Path(str(resources.files("jcompress") / "assets" / "llama-1m"))


def bundled_eval_text() -> Path:
    """The bundled WikiText-2 raw test excerpt."""
    return Path(str(resources.files("jcompress") / "assets" / "wikitext2_test_excerpt.txt"))


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'metric':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    lines += [f"| {k:<{w}} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _load(model: str, dtype: str | None):
    from jcompress.models import load_hf

    return load_hf(model, dtype=dtype, progress=True)


def _check_out_json(path: str | None) -> None:
    if path is not None and Path(path).is_dir():
        raise UserError(f"--json: {path} is a directory; give a file path")


# --------------------------------------------------------------------------- subcommands


def cmd_ppl(args: argparse.Namespace) -> int:
    from jcompress.data import load_tokenizer, load_tokens
    from jcompress.eval import check_seqlen, perplexity
    from jcompress.models import read_config

    _check_out_json(args.json)
    if not Path(args.data).is_file():
        raise UserError(f"--data: {args.data} is not a file (expected a .txt or .jsonl text file)")
    check_seqlen(read_config(args.model), args.seqlen)
    cfg, params = _load(args.model, args.dtype)
    ids = load_tokens(args.data, load_tokenizer(args.model))
    t0 = time.perf_counter()
    r = perplexity(
        cfg,
        params,
        ids,
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
    )
    secs = time.perf_counter() - t0
    out = {
        "model": str(args.model),
        "data": str(args.data),
        "tokens": int(ids.shape[0]),
        "dtype": args.dtype or "stored",
        **r.to_dict(),
        "seconds": secs,
    }
    print(
        _table(
            [
                ("model", str(args.model)),
                ("data", str(args.data)),
                ("tokens", f"{ids.shape[0]:,}"),
                ("windows", f"{r.n_windows} x {r.seqlen}"),
                ("mean NLL", f"{r.mean_nll:.5f}"),
                ("perplexity", f"{r.ppl:.4f}"),
                ("seconds", f"{secs:.1f}"),
            ]
        )
    )
    if args.json:
        write_json(args.json, out)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from jcompress.data import load_tokenizer

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    tok = load_tokenizer(args.model)
    cfg, params = _load(args.model, args.dtype)
    print(generate_text(cfg, params, tok, args.prompt, args.max_new_tokens))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from jcompress import checkpoint
    from jcompress.models import load_hf, save_hf

    if args.to == "orbax":
        cfg, params = load_hf(args.src, dtype=args.dtype, progress=True)
        checkpoint.save(args.out, cfg, params, overwrite=args.overwrite)
    else:
        if args.dtype:
            raise UserError(
                "--dtype: only applies with --to orbax (HF export keeps the stored dtype)"
            )
        cfg, params = checkpoint.restore(args.src)
        save_hf(
            cfg,
            params,
            args.out,
            tokenizer_dir=args.tokenizer,
            overwrite=args.overwrite,
            progress=True,
        )
    print(f"wrote {args.out}")
    return 0


def bundled_calib_text() -> Path:
    """The bundled WikiText-2 validation excerpt (the demo's calibration text)."""
    return Path(str(resources.files("jcompress") / "assets" / "wikitext2_valid_excerpt.txt"))


def _run_eigen(job, json_path: str | None) -> int:
    from jcompress.cli.eigen import check_eigen_job, run_eigen_job

    _check_out_json(json_path)
    check_eigen_job(job)
    result = run_eigen_job(job)
    if json_path:
        write_json(json_path, result)
    return 0


def cmd_eigen(args: argparse.Namespace) -> int:
    from jcompress.cli.eigen import EigenJob

    job = EigenJob(
        model=Path(args.model),
        calib_data=Path(args.calib_data),
        eval_data=Path(args.eval_data),
        out=None if args.out is None else Path(args.out),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        avg_dim=args.avg_dim,
        error_budget=args.error_budget,
        seed=args.seed,
        eval_seqlen=args.eval_seqlen,
        eval_max_windows=args.eval_max_windows,
        batch_size=args.batch_size,
        layers=tuple(args.layers or (".*",)),
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        overwrite=args.overwrite,
        offload_dir=args.offload_dir,
    )
    return _run_eigen(job, args.json)


def cmd_demo(args: argparse.Namespace) -> int:
    from jcompress.cli.eigen import EigenJob

    model = bundled_model_dir()
    print(f"jcompress demo: EigenAttention on the bundled llama-1m model ({model})")
    print("calibration: WikiText-2 validation excerpt; evaluation: WikiText-2 raw test excerpt\n")
    job = EigenJob(
        model=model,
        calib_data=bundled_calib_text(),
        eval_data=bundled_eval_text(),
        out=None if args.out is None else Path(args.out),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        avg_dim=args.avg_dim,
        error_budget=args.error_budget,
        seed=2,
        eval_seqlen=args.seqlen,
        eval_max_windows=None,
        batch_size=8,
        layers=(".*",),
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        overwrite=args.overwrite,
    )
    return _run_eigen(job, args.json)


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        self.exit(2, f"jcompress: error: {message} (see --help)\n")


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _budget(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {s!r}")
    return v


def _eigen_flags(s: argparse.ArgumentParser, *, nsamples: int, seqlen: int | None, avg_dim: int):
    default_seqlen = f"{seqlen}" if seqlen else "2048, capped at the model's positions"
    s.add_argument(
        "--nsamples", type=_positive, default=nsamples, help=f"calibration windows ({nsamples})"
    )
    s.add_argument(
        "--seqlen",
        type=_positive,
        default=seqlen,
        help=f"tokens per calibration window (default {default_seqlen})",
    )
    s.add_argument(
        "--avg_dim",
        "--avg-dim",
        type=_positive,
        default=avg_dim,
        help="average the features of this many consecutive windows; 1 = none; must be "
        f"<= --nsamples (default {avg_dim})",
    )
    s.add_argument(
        "--error_budget",
        "--error-budget",
        type=_budget,
        default=0.025,
        help="max relative layer-output error per layer (default 0.025)",
    )
    s.add_argument("--prompt", default="The history of the", help="prompt for the samples")
    s.add_argument(
        "--max_new_tokens",
        "--max-new-tokens",
        type=_positive,
        default=30,
        help="sample length (default 30)",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jcompress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(
        dest="command",
        required=True,
        parser_class=_Parser,
        metavar="{demo,eigen,ppl,generate,convert}",
    )

    s = sub.add_parser(
        "ppl",
        help="perplexity of a model on a text file",
        description="Perplexity: the whole text is tokenized with the model's "
        "tokenizer, cut into non-overlapping windows of --seqlen tokens, and "
        "ppl = exp(mean over windows of the mean next-token NLL).",
    )
    s.add_argument(
        "--model", required=True, help="HF model directory (config.json + weights + tokenizer)"
    )
    s.add_argument(
        "--data",
        required=True,
        help='text file: .txt (whole file) or .jsonl ("text" fields joined by blank lines)',
    )
    s.add_argument(
        "--seqlen", type=_positive, default=512, help="window length in tokens (default 512)"
    )
    s.add_argument(
        "--max-windows",
        type=_positive,
        default=None,
        help="use at most this many windows (default: all)",
    )
    s.add_argument(
        "--batch-size", type=_positive, default=8, help="windows per forward call (default 8)"
    )
    s.add_argument(
        "--dtype", choices=DTYPES, default=None, help="compute dtype (default: as stored)"
    )
    s.add_argument(
        "--json", default=None, metavar="OUT", help="also write the result as JSON to OUT"
    )
    s.set_defaults(func=cmd_ppl)

    s = sub.add_parser(
        "generate",
        help="greedy generation with the KV cache",
        description="Greedy continuation of a prompt.",
    )
    s.add_argument("--model", required=True, help="HF model directory")
    s.add_argument("--prompt", required=True, help="prompt text")
    s.add_argument(
        "--max-new-tokens", type=_positive, default=30, help="tokens to generate (default 30)"
    )
    s.add_argument(
        "--dtype", choices=DTYPES, default=None, help="compute dtype (default: as stored)"
    )
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser(
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
    s.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser(
        "eigen",
        help="EigenAttention: low-rank K/Q/V from calibration activations",
        description="EigenAttention (arXiv 2408.05646): calibrate per-head bases of the K/Q/V "
        "projection outputs layer by layer, pick each layer's rank by lowering a threshold while "
        "the layer's relative output error stays under --error_budget, evaluate perplexity and a "
        "sample before/after, and write report.json, report.md, dense/ (loads in transformers) "
        "and factors/ (jcompress, lossless) into --out. Flags keep the reference names; dashes "
        "work too.",
    )
    s.add_argument("--model", required=True, help="HF model directory (config, weights, tokenizer)")
    s.add_argument(
        "--calib_data",
        "--calib-data",
        required=True,
        help="calibration text (.txt / .jsonl), e.g. wikitext-2/valid.txt",
    )
    s.add_argument(
        "--eval_data", "--eval-data", required=True, help="evaluation text for perplexity"
    )
    s.add_argument("--out", default=None, help="output directory (nothing written when omitted)")
    _eigen_flags(s, nsamples=128, seqlen=None, avg_dim=16)
    s.add_argument(
        "--eval_seqlen",
        "--eval-seqlen",
        type=_positive,
        default=None,
        help="perplexity window (default: --seqlen)",
    )
    s.add_argument(
        "--eval_max_windows",
        "--eval-max-windows",
        type=_positive,
        default=None,
        help="at most this many evaluation windows (default: all)",
    )
    s.add_argument(
        "--batch_size",
        "--batch-size",
        type=_positive,
        default=8,
        help="calibration windows per forward call (default 8)",
    )
    s.add_argument(
        "--layers",
        action="append",
        default=None,
        metavar="REGEX",
        help="compress only layers whose path (e.g. model/layers/3) fully matches; repeatable",
    )
    s.add_argument("--seed", type=int, default=2, help="calibration sampling seed (default 2)")
    s.add_argument(
        "--offload_dir",
        "--offload-dir",
        default=None,
        help="keep calibration activations in temporary files here instead of memory "
        "(memory stays flat as --nsamples grows)",
    )
    s.add_argument("--json", default=None, metavar="OUT", help="also write the report JSON here")
    s.set_defaults(func=cmd_eigen)

    s = sub.add_parser(
        "demo",
        help="run the main job on the bundled model (no flags needed)",
        description="EigenAttention on the bundled llama-1m model: calibrates on a bundled "
        "WikiText-2 validation excerpt, then prints per-layer ranks and errors, a before/after "
        "table of perplexity (bundled WikiText-2 raw test excerpt), KV-cache size and "
        "parameters, and a greedy sample before and after.",
    )
    _eigen_flags(s, nsamples=32, seqlen=256, avg_dim=4)
    s.add_argument("--out", default=None, help="also write report + exports to this directory")
    s.add_argument("--json", default=None, metavar="OUT", help="also write the report JSON here")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    # transformers (tokenizers, configs) is imported lazily below; keep its import-time notices
    # (e.g. "PyTorch was not found") out of the command's output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"jcompress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jcompress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
