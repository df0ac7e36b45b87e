"""The Tucker / MPS rows, and the README's seed-settings table.

Row ``tucker_mps_opt125m_shape``: whole-model ``jcompress.tucker.compress(variant="tucker_mps")``
(every layer's K/Q/V: streamed output covariances, HOOI Kronecker bases, projections, o_proj
folds, layer output errors) on a random OPT-125m-shaped model, against the dense forward of the
same calibration windows through every layer (``jcompress.forward``, the cost floor any
calibrated method pays). ``python -m bench.tucker [--mps-step-only] [OUT.json]`` prints the
README table instead (seed settings on opt-1m and llama-1m, EigenAttention at a matched KV
budget beside them; ``--mps-step-only``: only the ``tucker_mps`` rows).

Heavy imports happen inside the side functions, in the process being measured.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import Context, median, register, rss_mib


def _opt_cfg(layers: int, vocab: int, hidden: int, heads: int, head_dim: int, ffn: int):
    import jcompress

    return jcompress.ModelConfig(
        family="opt", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=heads, head_dim=head_dim, intermediate_size=ffn,
        max_position_embeddings=2048, norm="layer", activation="relu", gated_mlp=False,
        position="learned", pos_offset=2, qkv_bias=True, o_bias=True, mlp_bias=True,
        norm_bias=True, tie_word_embeddings=True,
    )  # fmt: skip


def _setup(shape: dict[str, int], nsamples: int, seqlen: int):
    import jax
    import numpy as np

    import jcompress

    cfg = _opt_cfg(**shape)
    params = jcompress.init_params(cfg, jax.random.key(0), std=0.02)
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(nsamples, seqlen))
    return cfg, params, ids


def mps_side(shape: dict[str, int], nsamples: int, seqlen: int, repeats: int, basis: list[int]):
    import jax

    from jcompress.tucker import TuckerConfig, compress

    cfg, params, ids = _setup(shape, nsamples, seqlen)
    config = TuckerConfig(variant="tucker_mps", basis_ranks=tuple(basis), batch_size=4,
                          mps_eps=0.99)  # fmt: skip
    t0 = time.perf_counter()
    out, rep = compress(params, cfg, ids, config=config, progress=False)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out, rep = compress(params, cfg, ids, config=config, progress=False)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return {
        "value": median(times),
        "times": times,
        "first_s": first,
        "peak_rss_mib": rss_mib(),
        "kv": [rep.kv_cache_before, rep.kv_cache_after],
        "mean_layer_error": sum(e for _, e in rep.layer_errors) / len(rep.layer_errors),
    }


def forward_side(shape: dict[str, int], nsamples: int, seqlen: int, repeats: int, basis=None):
    import jax

    import jcompress

    cfg, params, ids = _setup(shape, nsamples, seqlen)
    fwd = jax.jit(lambda p, x: jcompress.forward(cfg, p, x))

    def run():
        for b in range(0, nsamples, 4):
            jax.block_until_ready(fwd(params, ids[b : b + 4]))

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {
        "value": median(times),
        "times": times,
        "first_s": first,
        "peak_rss_mib": rss_mib(),
    }


def _register(name: str, **kw):
    """:func:`register`, except in ``python -m bench.tucker``: that runs this file as __main__
    after ``bench/__init__`` has imported (and registered) ``bench.tucker``, never twice."""
    return (lambda fn: fn) if __name__ == "__main__" else register(name, **kw)


@_register(
    "tucker_mps_opt125m_shape",
    metric="s",
    higher_is_better=False,
    doc="whole-model tucker_mps (basis ranks [4, 4] of head_dim 64 = 8x8, i.e. r = 16; the MPS "
    "step at mps_eps 0.99) on a random OPT-125m-shaped model vs the dense forward of the same "
    "calibration windows",
)
def tucker_mps_opt125m_shape(ctx: Context) -> dict[str, Any]:
    layers = ctx.pick(full=12, quick=2, dry=1)
    opt125m = dict(hidden=768, heads=12, head_dim=64, ffn=3072)
    tiny = dict(hidden=32, heads=2, head_dim=16, ffn=48)
    shape = dict(
        layers=layers,
        vocab=ctx.pick(full=50272, quick=8192, dry=128),
        **ctx.pick(full=opt125m, quick=opt125m, dry=tiny),
    )
    basis = ctx.pick(full=[4, 4], quick=[4, 4], dry=[2, 2])
    kw = dict(
        shape=shape,
        nsamples=ctx.pick(full=16, quick=4, dry=2),
        seqlen=ctx.pick(full=256, quick=128, dry=8),
        repeats=ctx.repeats(full=3, quick=2),
        basis=basis,
    )
    ours = ctx.side(mps_side, "jcompress tucker_mps", **kw)
    base = ctx.side(forward_side, "dense forward", **kw)
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{layers} layers, {kw['nsamples']}x{kw['seqlen']} tokens",
        "info": {"kv": ours["kv"], "mean_layer_error": ours["mean_layer_error"]},
    }


# --------------------------------------------------------------------------- README table


def _clip(ranks, heads_q, heads_kv, hidden, head_dim):
    def fit(h):
        return (min(ranks[0], hidden), min(ranks[1], h), min(ranks[2], head_dim))

    return fit(heads_q), fit(heads_kv)


def seed_table(
    shared: Path,
    nsamples: int = 16,
    seqlen: int = 256,
    windows: int = 16,
    *,
    mps_step_only: bool = False,
) -> str:
    """The seed's three settings per variant on opt-1m and llama-1m, plus EigenAttention at a
    matched KV budget; markdown rows (measured now, on this machine). ``tucker_mps`` rows
    come without the MPS step (``mps_eps=1``: dense projected weights), then with it at the
    seed's three ``mps_eps`` on the first basis. ``mps_step_only``: only the ``tucker_mps``
    rows (no tt / tucker / EigenAttention)."""
    import warnings

    import numpy as np

    import jcompress
    from jcompress.data import calibration_windows, load_tokenizer, load_tokens
    from jcompress.eigen_attention import EigenAttentionConfig
    from jcompress.eigen_attention import compress as eigen_compress
    from jcompress.eval import perplexity
    from jcompress.tucker import TuckerConfig, compress

    rows = [
        "| model | method | setting | ratio | saved | weight err | layer out err | KV/token | "
        "ppl (change) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("opt-1m", "llama-1m"):
        d = shared / "models" / name
        cfg, params = jcompress.load_hf(d, progress=False)
        tok = load_tokenizer(d)
        calib = calibration_windows(
            load_tokens(shared / "wikitext-2" / "valid.txt", tok), nsamples, seqlen, seed=2
        )
        test = load_tokens(shared / "wikitext-2-raw" / "test.txt", tok)

        def ppl(p, cfg=cfg, test=test):
            return perplexity(cfg, p, test, seqlen=seqlen, max_windows=windows, progress=False).ppl

        base = ppl(params)
        kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
        rows.append(f"| {name} | dense | | 1.000 | 0% | 0 | 0 | {kv} | {base:.2f} |")

        def row(method, setting, rep, p, name=name, base=base):
            err = np.mean([e for _, e in rep.layer_errors]) if rep.layer_errors else float("nan")
            q = ppl(p)
            rows.append(
                f"| {name} | {method} | {setting} | {rep.compression_ratio:.3f} | "
                f"{100 * rep.space_saved:.1f}% | {rep.weight_error:.3f} | {err:.3f} | "
                f"{rep.kv_cache_after} | {q:.2f} ({100 * (q / base - 1):+.1f}%) |"
            )
            print(rows[-1], file=sys.stderr, flush=True)

        for eps, ranks in ((0.99, (6, 6, 8)), (0.95, (5, 5, 6)), (0.90, (4, 4, 5))):
            if mps_step_only:
                break
            out, rep = compress(
                params, cfg, calib, config=TuckerConfig(variant="tt", mps_eps=eps), progress=False
            )
            row("tt", f"mps_eps={eps}", rep, out)
            rq, rkv = _clip(ranks, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.head_dim)
            config = TuckerConfig(
                variant="tucker", hooi_ranks=rq, hooi_ranks_k=rkv, hooi_ranks_v=rkv
            )
            out, rep = compress(params, cfg, calib, config=config, progress=False)
            label = f"hooi_ranks={list(ranks)}" + (
                f" (q {list(rq)}, k/v {list(rkv)})" if (rq, rkv) != (ranks, ranks) else ""
            )
            row("tucker", label, rep, out)
        modes = {32: [(4, 4), (4, 2)], 16: [(4, 2), (2, 2)]}[cfg.head_dim]
        for eps in (0.99, 0.95, 0.90):  # the MPS step on the projected weights
            basis = modes[0]
            config = TuckerConfig(variant="tucker_mps", basis_ranks=basis, mps_eps=eps)
            out, rep = compress(params, cfg, calib, config=config, progress=False)
            r = int(np.prod(basis))
            label = f"basis_ranks={list(basis)} (r={r}/{cfg.head_dim}), mps_eps={eps}"
            row("tucker_mps", label, rep, out)
        for basis in modes:
            config = TuckerConfig(variant="tucker_mps", basis_ranks=basis, mps_eps=1.0)
            out, rep = compress(params, cfg, calib, config=config, progress=False)
            r = int(np.prod(basis))
            row("tucker_mps", f"basis_ranks={list(basis)} (r={r}/{cfg.head_dim})", rep, out)
            if mps_step_only:
                break
            # EigenAttention at the same KV budget: per-head rank bounded to r by min_rank, a
            # fine threshold walk, an error budget that never binds
            ecfg = EigenAttentionConfig(
                nsamples=nsamples, seqlen=seqlen, avg_dim=1, error_budget=0.999,
                threshold_step=0.002, start_threshold=1.0, min_threshold=0.0,
                min_rank=cfg.num_kv_heads * r - 1, min_rank_fraction=0.0,
            )  # fmt: skip
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eout, erep = eigen_compress(params, cfg, calib, config=ecfg, progress=False)
            ranks_used = sorted({(lr.rank_kq, lr.rank_v) for lr in erep.layers})
            q = ppl(eout)
            errs = np.mean([lr.error for lr in erep.layers])
            kq = "k" if cfg.family.value == "llama" else "k,q"
            rows.append(
                f"| {name} | EigenAttention | per-head ranks ({kq}, v) {ranks_used} | "
                f"{erep.params_after / erep.params_before:.3f} (model) | | | {errs:.3f} | "
                f"{erep.kv_cache_after} | {q:.2f} ({100 * (q / base - 1):+.1f}%) |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
    return "\n".join(rows)


def shape_table(layers: int = 12, nsamples: int = 4, seqlen: int = 128) -> str:
    """The seed's settings on a random OPT-125m-shaped model (hidden 768, 12 heads x 64, ffn 3072,
    ``layers`` layers, N(0, 0.02) weights from :func:`_setup`): ratio, space saved and weight
    error only (random weights: no perplexity). ``tt`` and ``tucker`` are data-free (no calib
    passed, so no layer output error); ``tucker_mps`` learns its bases from ``nsamples`` random
    token windows of ``seqlen`` (its layer output error is over those windows)."""
    import numpy as np

    from jcompress.tucker import TuckerConfig, compress

    shape = dict(layers=layers, vocab=50272, hidden=768, heads=12, head_dim=64, ffn=3072)
    cfg, params, ids = _setup(shape, nsamples, seqlen)
    rows = [
        "| method | setting | ratio | saved | weight err | layer out err | KV/token |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]

    def row(method, setting, rep):
        err = np.mean([e for _, e in rep.layer_errors]) if rep.layer_errors else None
        rows.append(
            f"| {method} | {setting} | {rep.compression_ratio:.3f} | "
            f"{100 * rep.space_saved:.1f}% | {rep.weight_error:.3f} | "
            f"{'' if err is None else f'{err:.3f}'} | {rep.kv_cache_after} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)

    for eps, ranks in ((0.99, (6, 6, 8)), (0.95, (5, 5, 6)), (0.90, (4, 4, 5))):
        _, rep = compress(params, cfg, config=TuckerConfig(variant="tt", mps_eps=eps),
                          progress=False)  # fmt: skip
        row("tt", f"mps_eps={eps}", rep)
        _, rep = compress(params, cfg, config=TuckerConfig(variant="tucker", hooi_ranks=ranks),
                          progress=False)  # fmt: skip
        row("tucker", f"hooi_ranks={list(ranks)}", rep)
    for basis in ((8, 4), (4, 4)):
        config = TuckerConfig(variant="tucker_mps", basis_ranks=basis, batch_size=4, mps_eps=1.0)
        _, rep = compress(params, cfg, ids, config=config, progress=False)
        row("tucker_mps", f"basis_ranks={list(basis)} (r={int(np.prod(basis))}/64)", rep)
    for eps in (0.99, 0.95, 0.90):  # the MPS step on the projected weights
        config = TuckerConfig(variant="tucker_mps", basis_ranks=(8, 4), batch_size=4, mps_eps=eps)
        _, rep = compress(params, cfg, ids, config=config, progress=False)
        row("tucker_mps", f"basis_ranks=[8, 4] (r=32/64), mps_eps={eps}", rep)
    return "\n".join(rows)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--opt125m-shape":
        # python -m bench.tucker --opt125m-shape [LAYERS] [OUT.json]
        layers = int(args[1]) if len(args) > 1 and args[1].isdigit() else 12
        table = shape_table(layers)
        print(table)
        rest = args[2:] if len(args) > 1 and args[1].isdigit() else args[1:]
        if rest:
            Path(rest[0]).write_text(json.dumps({"layers": layers, "table": table}))
        sys.exit(0)
    root = Path(
        os.environ.get(
            "JCOMPRESS_SHARED_DATA", Path(__file__).parents[1].parent / "shared" / "data"
        )
    )
    only = "--mps-step-only" in sys.argv
    sys.argv = [a for a in sys.argv if a != "--mps-step-only"]
    table = seed_table(root, mps_step_only=only)
    print(table)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({"table": table}))
