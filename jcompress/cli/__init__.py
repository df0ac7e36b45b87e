"""The ``jcompress`` command line: ``ppl``, ``generate``, ``convert``, ``demo``.

User errors (bad paths, bad options, malformed checkpoints) print one line
``jcompress: error: ...`` on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from jcompress.errors import UserError

__all__ = ["main", "bundled_model_dir", "bundled_eval_text"]

DTYPES = ("float32", "bfloat16", "float16")


def bundled_model_dir() -> Path:
    """Directory of the bundled llama-1m model (config, safetensors, tokenizer)."""
    return Path(str(resources.files("jcompress") / "assets" / "llama-1m"))


def bundled_eval_text() -> Path:
    """The bundled WikiText-2 raw test excerpt."""
    return Path(str(resources.files("jcompress") / "assets" / "wikitext2_test_excerpt.txt"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _generate_text(cfg, params, tok, prompt: str, max_new_tokens: int) -> str:
    import jax.numpy as jnp

    from jcompress.data import tokenize
    from jcompress.models import generate

    ids = tokenize(tok, prompt)
    if ids.size == 0:
        raise UserError("--prompt: the prompt tokenizes to nothing")
    out = generate(cfg, params, jnp.asarray(ids)[None], max_new_tokens=max_new_tokens)
    return tok.decode([int(t) for t in out[0]], skip_special_tokens=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from jcompress.data import load_tokenizer

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    tok = load_tokenizer(args.model)
    cfg, params = _load(args.model, args.dtype)
    print(_generate_text(cfg, params, tok, args.prompt, args.max_new_tokens))
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


def cmd_demo(args: argparse.Namespace) -> int:
    from jcompress.data import load_tokenizer, load_tokens
    from jcompress.eval import perplexity

    model = bundled_model_dir()
    text = bundled_eval_text()
    print(f"jcompress demo: bundled model {model.name} ({model})")
    cfg, params = _load(str(model), None)
    tok = load_tokenizer(model)
    ids = load_tokens(text, tok)
    r = perplexity(cfg, params, ids, seqlen=args.seqlen)
    sample = _generate_text(cfg, params, tok, args.prompt, args.max_new_tokens)
    from jcompress.models import count_params

    print(
        _table(
            [
                ("model", f"llama-1m ({count_params(params):,} params, {cfg.num_layers} layers)"),
                ("eval text", f"WikiText-2 raw test excerpt ({ids.shape[0]:,} tokens)"),
                ("windows", f"{r.n_windows} x {r.seqlen}"),
                ("perplexity", f"{r.ppl:.3f}"),
            ]
        )
    )
    print(f"\nsample (greedy, {args.max_new_tokens} new tokens):\n  {sample}")
    if args.json:
        write_json(args.json, {"perplexity": r.to_dict(), "sample": sample})
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jcompress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="{ppl,generate,convert,demo}"
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
        "demo",
        help="run the main job on the bundled model (no flags needed)",
        description="Loads the bundled llama-1m model, prints its perplexity on "
        "the bundled WikiText-2 test excerpt and a sample greedy generation.",
    )
    s.add_argument("--seqlen", type=_positive, default=256, help="perplexity window (default 256)")
    s.add_argument("--prompt", default="The history of the", help="prompt for the sample")
    s.add_argument(
        "--max-new-tokens", type=_positive, default=30, help="sample length (default 30)"
    )
    s.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
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
