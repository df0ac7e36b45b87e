"""``jcompress ged``: GED of two conditions of sentences (default: the bundled him/her pronoun
set) on a model's MLP activations, every layer; report.json, report.md and figures in --out.

Every check that needs no weights runs first (model config, hook, layers, condition files,
tokenization, output directory); then the weights load, the activations are captured through
the layer stream, each layer is fitted with its permutation test and held-out separation, and
everything is written atomically (a temporary sibling of --out renamed into place).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from jcompress.cli.common import (
    add_mesh_flag,
    add_stream_flags,
    config_flags,
    config_from_args,
    field_docs,
    mesh_from_args,
    positive,
    stream_from_args,
)
from jcompress.errors import UserError, naming

__all__ = ["add_parser", "run", "shrinkage_arg"]

DEFAULT_OUT = "ged-report"


def shrinkage_arg(s: str) -> float | str:
    """argparse type: a number in [0, 1) or ``ledoit_wolf``."""
    from jcompress.ged import LEDOIT_WOLF

    if s.replace("-", "_") == LEDOIT_WOLF:
        return LEDOIT_WOLF
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in [0, 1) or {LEDOIT_WOLF}, got {s!r}"
        ) from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or {LEDOIT_WOLF}, got {s!r}")
    return v


def add_parser(subparsers) -> argparse.ArgumentParser:
    from jcompress.ged import CaptureConfig, GEDConfig

    s = subparsers.add_parser(
        "ged",
        help="GED: which MLP neurons separate two conditions (default: him vs her)",
        description="Generalized eigendecomposition of two conditions' activations, compress "
        "then separate (PCA to --variance_threshold, shrinkage of the reference covariance, "
        "S w = lambda R~ w), with a label-permutation test, k-fold held-out accuracy, the swap "
        "(B as signal) and figures, per layer. The default hook is `pre`: the MLP expansion's "
        "output before the nonlinearity (GPT-2 mlp/c_fc, OPT fc1, Llama/Qwen mlp/up_proj, MPT "
        "ffn/up_proj). Condition files: one sentence a line, the target word in [brackets]. "
        "With no flags: the bundled llama-1m model and him/her pronoun set.",
    )
    s.add_argument(
        "--model",
        default=None,
        help="HF model directory (config, weights, fast tokenizer) (default: the bundled llama-1m)",
    )
    s.add_argument(
        "--cond-a",
        "--cond_a",
        dest="cond_a",
        default=None,
        metavar="FILE",
        help="signal condition sentences (default: the bundled [him] set)",
    )
    s.add_argument(
        "--cond-b",
        "--cond_b",
        dest="cond_b",
        default=None,
        metavar="FILE",
        help="reference condition sentences (default: the bundled [her] set, line-paired)",
    )
    s.add_argument(
        "--out", default=DEFAULT_OUT, help=f"output directory (default: ./{DEFAULT_OUT})"
    )
    s.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (only a directory jcompress itself wrote)",
    )
    g = s.add_mutually_exclusive_group()
    g.add_argument(
        "--layer",
        type=int,
        action="append",
        default=None,
        metavar="L",
        help="analyse decoder layer L (repeatable; default: all layers)",
    )
    g.add_argument(
        "--layers",
        choices=("all",),
        default=None,
        help="analyse every decoder layer (the default)",
    )
    cap = config_flags(
        s,
        CaptureConfig,
        {
            "layers": None,
            "hook": {"metavar": "pre|post|REGEX"},
            "side": {"choices": ("output", "input")},
            "position": {"choices": ("target", "last", "all")},
            "batch_size": {"type": positive},
        },
    )
    # shrinkage is ``float | str``: its flag is written here (config_flags derives one type)
    names = config_flags(s, GEDConfig, {"shrinkage": None, "n_folds": {"type": positive}})
    s.add_argument(
        "--shrinkage",
        type=shrinkage_arg,
        default=GEDConfig.shrinkage,
        metavar="X|ledoit_wolf",
        help=field_docs(GEDConfig)["shrinkage"].rstrip(".") + f" (default: {GEDConfig.shrinkage})",
    )
    names.append("shrinkage")
    add_stream_flags(s)
    add_mesh_flag(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=run, ged_fields=names, capture_fields=cap)
    return s


def _inputs(args):
    from jcompress.cli import bundled_model_dir
    from jcompress.ged import HER_FILE, HIM_FILE

    model = Path(args.model) if args.model is not None else bundled_model_dir()
    a = Path(args.cond_a) if args.cond_a is not None else HIM_FILE
    b = Path(args.cond_b) if args.cond_b is not None else HER_FILE
    return model, a, b


def _labels(a: Path, b: Path) -> tuple[str, str]:
    la, lb = a.stem, b.stem
    return (la, lb) if la != lb else (f"A ({la})", f"B ({lb})")


def run(args: argparse.Namespace, log=print) -> int:
    from jcompress.ged import CaptureConfig, GEDConfig, load_condition_file, resolve_hook
    from jcompress.ged.capture import resolve_layers
    from jcompress.models import read_config
    from jcompress.outputs import check_output_dir

    model, file_a, file_b = _inputs(args)
    if not model.is_dir() or not (model / "config.json").is_file():
        raise UserError(f"--model: {model} is not a model directory (no config.json)")
    layers = () if args.layer is None else tuple(args.layer)
    if any(i < 0 for i in layers):
        raise UserError(f"--layer: layer indices are >= 0, got {min(layers)}")
    if len(set(layers)) != len(layers):
        raise UserError(f"--layer: repeated layer in {list(layers)}")
    capture = config_from_args(CaptureConfig, args, args.capture_fields, layers=layers)
    config = config_from_args(GEDConfig, args, args.ged_fields)
    cfg = read_config(model)
    if args.stream and args.mesh:
        raise UserError("--mesh: not with --stream (a streamed capture runs on one device)")
    mesh_from_args(args, cfg)  # --mesh: the capture stream runs sharded
    hook = resolve_hook(cfg, capture, arg="--hook")
    layer_ids = resolve_layers(cfg, capture, arg="--layer")
    for flag, f in (("--cond-a", file_a), ("--cond-b", file_b)):
        if not f.is_file():
            raise UserError(f"{flag}: {f} is not a file (one sentence a line, [target] marked)")
    try:
        texts_a = load_condition_file(file_a)
        texts_b = load_condition_file(file_b)
    except UserError as e:
        flag = "--cond-a" if str(e).startswith(str(file_a)) else "--cond-b"
        raise UserError(f"{flag}: {e}") from None
    if texts_a == texts_b:
        raise UserError(
            f"--cond-b: {file_b} holds the same sentences as --cond-a {file_a}; GED separates "
            "two different conditions"
        )
    streamed = stream_from_args(args, Path(args.out))
    inputs = {"--model": model, "--cond-a": file_a, "--cond-b": file_b}
    if streamed is not None:
        inputs["--work_dir"] = streamed["work_dir"]
    out = check_output_dir(Path(args.out), inputs=inputs, overwrite=args.overwrite, arg="--out")
    from jcompress.cli.common import load_tokenizer_for
    from jcompress.ged.analyze import _check_sizes, _check_vocab
    from jcompress.ged.capture import tokenize_examples

    labels = _labels(file_a, file_b)
    tok = load_tokenizer_for(model, "--model", cfg)
    ta = tokenize_examples(tok, texts_a, capture.position, what=f"--cond-a {file_a}")
    tb = tokenize_examples(tok, texts_b, capture.position, what=f"--cond-b {file_b}")
    with naming("--n_components"):
        _check_sizes(ta.n_samples, tb.n_samples, config, ("--cond-a", "--cond-b"), hook.width)
    _check_vocab(cfg, ta, tb)

    import jcompress
    from jcompress.atomic import atomic_dir, write_json
    from jcompress.ged import analyze

    log(
        f"GED on {model}: {hook.describe()} (D = {hook.width}), layers "
        f"{', '.join(map(str, layer_ids))}, position {capture.position}, "
        f"{ta.n_samples} {labels[0]} vs {tb.n_samples} {labels[1]} samples"
    )
    kw = dict(tokenizer=tok, config=config, capture=capture, labels=labels,
              progress=not args.quiet)  # fmt: skip
    if streamed is None:
        _, params = jcompress.load_hf(model, progress=not args.quiet)
        t0 = time.perf_counter()
        res = analyze(cfg, params, texts_a, texts_b, **kw)
    else:
        from jcompress.ged import stream_analyze
        from jcompress.streaming import LayerLoader

        loader = LayerLoader(model)
        t0 = time.perf_counter()
        res = stream_analyze(loader, texts_a, texts_b, **kw, **streamed)
    secs = time.perf_counter() - t0
    report = res.to_json()
    if streamed is not None:
        report["stream"] = {
            "peak_loaded_bytes": loader.peak_bytes,
            "model_bytes": sum(loader.group_bytes.values()),
        }
    report.update(
        model=str(model),
        cond_a=str(file_a),
        cond_b=str(file_b),
        seconds=secs,
    )
    md = res.to_markdown()
    with atomic_dir(out, overwrite=args.overwrite, arg="--out") as tmp:
        figs = res.figures(tmp / "figures")
        report["figures"] = [str(p.relative_to(tmp)) for p in figs]
        write_json(tmp / "report.json", report)
        (tmp / "report.md").write_text(
            md + "\n\n" + "\n".join(f"![{p.stem}]({p.relative_to(tmp)})" for p in figs) + "\n"
        )
    log(md)
    if streamed is not None:
        log(f"\nweights held at once: {loader.peak_bytes / 2**20:.1f} MiB (streamed)")
    log(f"\nwrote {out}/report.json, report.md, figures/ ({len(figs)} plots) in {secs:.1f}s")
    return 0
