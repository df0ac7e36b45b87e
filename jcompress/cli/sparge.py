"""``jcompress sparge``: tune SpargeAttn thresholds and evaluate them.

``jcompress sparge tune --model DIR --data PATH --l1 0.06 --pv_l1 0.07 --out tuned.safetensors``
writes the per-layer, per-head thresholds (safetensors) plus ``<out>.json`` / ``<out>.md`` (the
tuning report). ``jcompress sparge eval --model DIR --tuned tuned.safetensors --data PATH``
prints perplexity dense vs tuned vs untuned defaults (simthreshd1 0.6, cdfthreshd 0.98), the
tile and row sparsity (see :mod:`jcompress.sparge.tune`) per layer and head, and with
``--out_dir`` writes ``eval.json``, ``eval.md`` and ``sparsity.png`` (heatmaps layers x heads,
tiles and rows). Every field of :class:`~jcompress.sparge.tune.SpargeTuneConfig` is a flag of
``tune`` (``--objective tiles|rows``: the sparsity the tuner maximises).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from jcompress.cli.common import (
    add_mesh_flag,
    add_stream_flags,
    calibration_from_text,
    check_data_file,
    config_flags,
    config_from_args,
    load_eval_tokens,
    mesh_from_args,
    positive,
    stream_from_args,
)
from jcompress.errors import UserError, naming

__all__ = ["add_parser", "load_tuned", "run_eval", "run_tune"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from jcompress.sparge.tune import SpargeTuneConfig

    s = subparsers.add_parser(
        "sparge",
        help="SpargeAttn: tune per-head block-sparse attention thresholds, evaluate them",
        description=__doc__.splitlines()[0],
    )
    sub = s.add_subparsers(dest="sparge_command", required=True, metavar="{tune,eval}")
    t = sub.add_parser("tune", help="tune thresholds on calibration text")
    t.add_argument("--model", required=True, help="HF model directory")
    t.add_argument("--data", required=True, help="calibration text (.txt or .jsonl)")
    t.add_argument("--out", required=True, help="thresholds file to write (.safetensors)")
    t.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    names = config_flags(t, SpargeTuneConfig,
                        {"layer_l1": {"metavar": "LAYER:L1"}})  # fmt: skip
    add_stream_flags(t)
    add_mesh_flag(t)
    t.set_defaults(func=run_tune, _names=names)

    e = sub.add_parser("eval", help="perplexity dense vs tuned vs untuned, sparsity heatmap")
    e.add_argument("--model", required=True, help="HF model directory")
    e.add_argument("--tuned", required=True, help="thresholds file from `sparge tune`")
    e.add_argument("--data", required=True, help="evaluation text (.txt or .jsonl)")
    e.add_argument("--seqlen", type=positive, default=512, help="window length (default: 512)")
    e.add_argument("--max_windows", "--max-windows", type=positive, default=None,
                   help="at most this many windows (default: all)")  # fmt: skip
    e.add_argument("--batch_size", "--batch-size", type=positive, default=4,
                   help="windows per forward call (default: 4)")  # fmt: skip
    e.add_argument("--out_dir", "--out-dir", default=None,
                   help="write eval.json, eval.md, sparsity.png here")  # fmt: skip
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out_dir")
    add_stream_flags(e)
    e.set_defaults(func=run_eval)
    return s


def run_tune(args: argparse.Namespace) -> int:
    from jcompress.atomic import write_json
    from jcompress.data import load_tokenizer
    from jcompress.models import load_hf, read_config
    from jcompress.outputs import check_output_file, safetensors_metadata
    from jcompress.sparge import save_params
    from jcompress.sparge.params import FORMAT as PARAMS_FORMAT
    from jcompress.sparge.tune import SpargeTuneConfig, check_layers, tune

    config = config_from_args(SpargeTuneConfig, args, args._names)
    if args.stream and args.mesh:
        raise UserError("--mesh: not with --stream (a streamed tuning runs on one device)")
    mesh_from_args(args)  # --mesh: the q/k/v probe stream runs sharded
    model, data, out = Path(args.model), check_data_file(args.data, "--data"), Path(args.out)
    cfg = read_config(model)
    streamed = stream_from_args(args, out)
    inputs = {"--model": model, "--data": data}
    if streamed is not None:
        inputs["--work_dir"] = streamed["work_dir"]
    if out.suffix.lower() in (".json", ".md"):
        raise UserError(f"--out: {out} would be overwritten by its own {out.suffix} report "
                        "(the reports go beside it as <out>.json / <out>.md); give the "
                        "thresholds another name, e.g. tuned.safetensors")  # fmt: skip
    thresholds = (functools.partial(safetensors_metadata, format=PARAMS_FORMAT),
                  "a SpargeAttn thresholds file")  # fmt: skip
    for p, arg, owner in ((out, "--out", thresholds), (out.with_suffix(".json"), "--out", None),
                          (out.with_suffix(".md"), "--out", None)):  # fmt: skip
        check_output_file(p, inputs=inputs, overwrite=args.overwrite, arg=arg, owner=owner)
    if config.seqlen > cfg.max_position_embeddings:
        raise UserError(f"--seqlen: {config.seqlen} exceeds the model's "
                        f"{cfg.max_position_embeddings} positions")  # fmt: skip
    with naming("--layer_l1"):
        check_layers(cfg, config)  # before any weight is read
    windows = calibration_from_text(data, load_tokenizer(model), config.nsamples, config.seqlen,
                                    config.seed, arg="--data")  # fmt: skip
    if streamed is None:
        cfg, params = load_hf(model)
        tuned, report = tune(cfg, params, windows, config)
    else:
        from jcompress.sparge.tune import stream_tune
        from jcompress.streaming import LayerLoader

        loader = LayerLoader(model)
        tuned, report = stream_tune(loader, windows, config, **streamed)
        print(f"weights held at once: {loader.peak_bytes / 2**20:.1f} MiB (streamed)")
    written: list[Path] = []
    try:  # the thresholds and their two reports, or none of them
        save_params(out, tuned, model=model.name, overwrite=args.overwrite,
                    extra={"block_q": config.block_q, "block_k": config.block_k,
                           "l1": config.l1, "pv_l1": config.pv_l1})  # fmt: skip
        written.append(out)
        write_json(out.with_suffix(".json"), report.to_json())
        written.append(out.with_suffix(".json"))
        _write_text(out.with_suffix(".md"), report.to_markdown())
    except BaseException:
        from jcompress.atomic import is_writer

        if is_writer():
            for p in written:
                p.unlink(missing_ok=True)
        raise
    print(report.to_markdown())
    print(f"wrote {out}")
    return 0


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically; in a multi-host run on process 0 only."""
    import os

    from jcompress.atomic import on_writer

    def write() -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)

    on_writer(write, path=path, arg="--out")


def _heatmap(path: Path, panels: dict, title: str) -> None:
    """One heatmap (layers x heads) per ``{name: [layers, heads]}`` panel, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nl, nh = next(iter(panels.values())).shape
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(len(panels) * (1.5 + 0.5 * nh), 1.2 + 0.5 * nl))  # fmt: skip
    for ax, (name, sp) in zip(axes[0], panels.items(), strict=True):
        im = ax.imshow(sp, vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, label="sparsity")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_tuned(path, cfg, *, arg: str = "--tuned"):
    """A ``sparge tune`` thresholds file checked against the model's layers and heads:
    ``(SpargeParams [layers, heads], block_q, block_k)`` (block sizes from its metadata)."""
    from jcompress.sparge import load_params

    tuned, meta = load_params(path, layers=cfg.num_layers, heads=cfg.num_heads, arg=arg)
    return tuned, int(meta["extra"].get("block_q", 32)), int(meta["extra"].get("block_k", 32))


def run_eval(args: argparse.Namespace) -> int:
    import numpy as np

    from jcompress.atomic import atomic_dir
    from jcompress.data import eval_windows, load_tokenizer
    from jcompress.eval import check_seqlen, perplexity
    from jcompress.models import load_hf, read_config
    from jcompress.outputs import check_output_dir
    from jcompress.sparge import BlockSparse, SpargeParams
    from jcompress.sparge.tune import evaluate, stream_evaluate

    model, data = Path(args.model), check_data_file(args.data, "--data")
    cfg = read_config(model)
    tuned, bq, bk = load_tuned(args.tuned, cfg)
    out_dir = None if args.out_dir is None else Path(args.out_dir)
    # --stream: the held-out statistics resumable in --work_dir (default <out_dir>.stream)
    streamed = stream_from_args(args, out_dir if out_dir is not None else Path(args.tuned))
    if streamed is not None and out_dir is None and not args.work_dir:
        if args.resume:
            raise UserError("--resume: needs --work_dir (or --out_dir) of the interrupted run")
        streamed["work_dir"] = None
    if out_dir is not None:
        inputs = {"--model": model, "--data": data, "--tuned": Path(args.tuned)}
        if streamed is not None and streamed["work_dir"] is not None:
            inputs["--work_dir"] = streamed["work_dir"]
        check_output_dir(out_dir, inputs=inputs, overwrite=args.overwrite, arg="--out_dir")
    with naming("--seqlen"):
        check_seqlen(cfg, args.seqlen, arg="--seqlen", override=None)  # before any weights
    ids = load_eval_tokens(data, load_tokenizer(model), args.seqlen, arg="--data",
                           seqlen_arg="--seqlen")  # fmt: skip
    untuned = SpargeParams.create(cfg.num_layers, cfg.num_heads)
    sets = {"tuned": tuned, "untuned": untuned}
    kw = dict(seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
              allow_long=True)  # fmt: skip
    sparse = BlockSparse(block_q=bq, block_k=bk, implementation="xla")
    runs = (("dense", "dense", None), ("tuned", sparse, tuned), ("untuned", sparse, untuned))
    windows = eval_windows(ids, args.seqlen, args.max_windows)
    if streamed is None:
        cfg, params = load_hf(model)
        rows = {name: float(perplexity(cfg, params, ids, attention=att, attention_state=state,
                                       **kw).ppl)
                for name, att, state in runs}  # fmt: skip
        ev = {name: evaluate(cfg, params, windows, p, block_q=bq, block_k=bk,
                             batch_size=args.batch_size)
              for name, p in sets.items()}  # fmt: skip
    else:  # one layer's weights at a time; the resumable analysis first (checks --work_dir)
        from jcompress.streaming import LayerLoader, stream_perplexity

        loader = LayerLoader(model)
        ev = stream_evaluate(loader, windows, sets, block_q=bq, block_k=bk,
                             batch_size=args.batch_size, **streamed)  # fmt: skip
        rows = {name: float(stream_perplexity(loader, ids, attention=att, attention_state=state,
                                              offload_dir=streamed["offload_dir"], **kw).ppl)
                for name, att, state in runs}  # fmt: skip
        print(f"weights held at once: {loader.peak_bytes / 2**20:.1f} MiB (streamed)")
    result = {
        "perplexity": rows,
        "block_q": bq,
        "block_k": bk,
        "mean_tile_sparsity": {k: float(np.mean(v["tile_sparsity"])) for k, v in ev.items()},
        "mean_row_sparsity": {k: float(np.mean(v["row_sparsity"])) for k, v in ev.items()},
        "held_out": {k: {m: np.round(v[m], 5).tolist() for m in v} for k, v in ev.items()},
    }
    lines = ["| attention | perplexity | mean tile sparsity | mean row sparsity | max head L1 |",
             "|---|---:|---:|---:|---:|",
             f"| dense | {rows['dense']:.4f} | 0 | 0 | 0 |"]  # fmt: skip
    for k in ("tuned", "untuned"):
        lines.append(f"| {k} | {rows[k]:.4f} | {result['mean_tile_sparsity'][k]:.3f} | "
                     f"{result['mean_row_sparsity'][k]:.3f} | "
                     f"{float(np.max(ev[k]['l1'])):.4f} |")  # fmt: skip
    for what in ("tile", "row"):
        sp = ev["tuned"][f"{what}_sparsity"]
        lines += ["", f"Tuned {what} sparsity per layer (rows) and head (columns):", ""]
        lines.append("| layer | " + " | ".join(f"h{h}" for h in range(sp.shape[1])) + " |")
        lines.append("|---:|" + "---:|" * sp.shape[1])
        for li in range(sp.shape[0]):
            lines.append(f"| {li} | " + " | ".join(f"{x:.2f}" for x in sp[li]) + " |")
    md = "\n".join(lines) + "\n"
    print(md)
    if out_dir is not None:
        with atomic_dir(out_dir, overwrite=args.overwrite, arg="--out_dir") as tmp:
            (tmp / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            (tmp / "eval.md").write_text(md)
            _heatmap(tmp / "sparsity.png",
                     {f"{w} sparsity": ev["tuned"][f"{w}_sparsity"] for w in ("tile", "row")},
                     f"SpargeAttn tuned sparsity ({model.name})")  # fmt: skip
        print(f"wrote {out_dir}")
    return 0
