"""The README's EigenAttention table: perplexity, KV cache and compression time per mode.

    python -m bench.eigen_table [--nsamples 32 --seqlen 256 --avg-dim 4 --eval-seqlen 512]
        [--budgets 0.01,0.025,0.05] [--modes default,reference,bisect]

Modes: ``default`` (the threshold walk, per-KV-head K bases), ``reference``
(``reference_mode=True``: the reference's stop rule, one K basis per Llama layer), ``bisect``
(``rank_search='bisect'``).

Calibrates on ``wikitext-2/valid.txt`` and evaluates on ``wikitext-2-raw/test.txt`` (all
windows) from ``../shared/data`` (or ``$JCOMPRESS_SHARED_DATA``), for both shared models.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import warnings
from pathlib import Path

import jcompress
from jcompress.data import calibration_windows, load_tokenizer, load_tokens
from jcompress.eigen_attention import EigenAttentionConfig, compress

DATA = Path(
    os.environ.get("JCOMPRESS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)

MODES = {
    "default": {},
    "reference": {"reference_mode": True},
    "bisect": {"rank_search": "bisect"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--avg-dim", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-max-windows", type=int, default=None)
    ap.add_argument("--budgets", default="0.01,0.025,0.05")
    ap.add_argument("--models", default="llama-1m,opt-1m")
    ap.add_argument("--modes", default="default")
    ap.add_argument(
        "--min-rank",
        type=int,
        default=None,
        help="override the family's total-rank floor (OPT: 64, the reference's)",
    )
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        model = DATA / "models" / name
        cfg, params = jcompress.load_hf(model)
        tok = load_tokenizer(model, cfg=cfg)
        calib = calibration_windows(
            load_tokens(DATA / "wikitext-2" / "valid.txt", tok), args.nsamples, args.seqlen, seed=2
        )
        ev = load_tokens(DATA / "wikitext-2-raw" / "test.txt", tok)
        kw = dict(seqlen=args.eval_seqlen, max_windows=args.eval_max_windows, batch_size=16)
        base = jcompress.perplexity(cfg, params, ev, **kw)
        for budget, mode in itertools.product(
            (float(b) for b in args.budgets.split(",")), args.modes.split(",")
        ):
            conf = EigenAttentionConfig(
                nsamples=args.nsamples,
                seqlen=args.seqlen,
                avg_dim=args.avg_dim,
                error_budget=budget,
                min_rank=args.min_rank,
                **MODES[mode],
            )
            t0 = time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new, rep = compress(params, cfg, calib, config=conf, progress=False)
            secs = time.process_time() - t0  # CPU s, all threads: robust to other load
            after = jcompress.perplexity(cfg, new, ev, **kw)
            label = name if args.min_rank is None else f"{name} (min_rank={args.min_rank})"
            rows.append(
                f"| {label} | {mode} | {budget} | {base.ppl:.3f} | {after.ppl:.3f} | "
                f"{100 * (after.ppl / base.ppl - 1):+.2f}% | {100 * rep.kv_cache_ratio:.1f}% | "
                f"{rep.evaluations} | {secs:.1f} |"
            )
            print(rows[-1], flush=True)
    print()
    print(
        f"calibration: {args.nsamples} x {args.seqlen} tokens of wikitext-2/valid.txt (seed 2), "
        f"avg_dim {args.avg_dim}; evaluation: wikitext-2-raw/test.txt, L={args.eval_seqlen}, "
        f"{'all' if args.eval_max_windows is None else args.eval_max_windows} windows"
    )
    print(
        "| model | mode | error budget | ppl before | ppl after | change | KV cache | "
        "evaluations | compress CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
