"""Layer streaming: EigenAttention and perplexity on a ~1.2 GB, 24-layer random Llama written
as 4 safetensors shards, run layer by layer (``jcompress.streaming``) against the same work
in memory (``load_hf`` -> ``compress`` -> ``perplexity``).

The metric is the peak RSS of each side's process. Each side first runs the same pipeline on a
2-layer model of the same widths (the same compiled code; one layer's and the globals'
buffers), so the peak a process reaches once everything is compiled and one layer was held is
known ("warm peak"). The streamed side's stated bound: the 24-layer run raises the peak over
the warm peak by at most two layers plus the globals, plus 16 MiB per (rank_kq, rank_v) pair
the warm run did not meet (XLA:CPU keeps the executables compiled for each new factor shape:
measured ~14 MiB per pair on the quick size, and 0 per layer once every shape is compiled);
in memory the peak rises by ~22 layers. The
loader's own account (exact) is checked too: one layer plus the globals at most. Both sides
must agree on the per-layer ranks and on the perplexity.
"""

from __future__ import annotations

from typing import Any

from bench.foundation import build_sharded_llama
from bench.harness import Context, peak_rss_mib, register, rss_mib

LLAMA_1GB = dict(hidden=1024, layers=24, heads=16, ffn=2560, vocab=8192)  # ~1.2 GB fp32
LLAMA_QUICK = dict(hidden=256, layers=8, heads=8, ffn=704, vocab=8192)  # ~42 MB
LLAMA_DRY = dict(hidden=64, layers=4, heads=4, ffn=176, vocab=1000)
BOUND_LAYERS = 2  # stated bound: streamed peak - warm peak <= 2 x (largest layer + globals)
PER_SHAPE_MIB = 16  # + this per (rank_kq, rank_v) pair the warm run did not compile


def _inputs(vocab: int, nsamples: int, seqlen: int, eval_windows: int):
    import numpy as np

    rng = np.random.default_rng(0)
    calib = rng.integers(0, vocab, (nsamples, seqlen)).astype(np.int32)
    ids = rng.integers(0, vocab, eval_windows * seqlen).astype(np.int32)
    return calib, ids


def _config(nsamples: int, seqlen: int):
    from jcompress.eigen_attention import EigenAttentionConfig

    return EigenAttentionConfig(
        nsamples=nsamples, seqlen=seqlen, avg_dim=1, error_budget=0.02, batch_size=4
    )


def _streamed(model_dir: str, out_dir: str, nsamples: int, seqlen: int, eval_windows: int):
    from jcompress.eigen_attention import compress
    from jcompress.models import read_config
    from jcompress.streaming import LayerLoader, stream_compress, stream_perplexity

    cfg = read_config(model_dir)
    calib, ids = _inputs(cfg.vocab_size, nsamples, seqlen, eval_windows)
    res = stream_compress(
        model_dir, out_dir, compress, config=_config(nsamples, seqlen), calib=calib,
        method="eigen", progress=False,
    )  # fmt: skip
    loader = LayerLoader(out_dir)
    r = stream_perplexity(loader, ids, seqlen=seqlen, batch_size=4, progress=False)
    return cfg, res.report, loader, r


def streamed_side(
    model_dir: str, warm_dir: str, out_dir: str, nsamples: int, seqlen: int, eval_windows: int
) -> dict[str, Any]:
    """``stream_compress`` (EigenAttention) then ``stream_perplexity`` on its output, after
    the same on the 2-layer ``warm_dir``."""
    import gc
    import time

    import jax.numpy as jnp

    jnp.zeros(()).block_until_ready()
    rss0 = rss_mib()
    warm_ranks, warm_s = [], None
    if warm_dir:  # "": no warm-up run (dry mode)
        t0 = time.perf_counter()
        _, warm_rep, _, _ = _streamed(warm_dir, out_dir + "-warm", nsamples, seqlen, eval_windows)
        warm_s = time.perf_counter() - t0
        warm_ranks = [(x.rank_kq, x.rank_v) for x in warm_rep.method_report.layers]
    gc.collect()
    warm = peak_rss_mib()
    t0 = time.perf_counter()
    cfg, rep, loader, r = _streamed(model_dir, out_dir, nsamples, seqlen, eval_windows)
    secs = time.perf_counter() - t0
    peak = peak_rss_mib()
    return {
        "value": peak,
        "rss_after_imports_mib": rss0,
        "warm_peak_mib": warm,
        "rss_growth_mib": peak - warm,
        "seconds": secs,
        "first_s": secs if warm_s is None else warm_s,  # the warm-up run compiles
        "compress_s": rep.seconds,
        "ppl": r.ppl,
        "ranks": [(x.rank_kq, x.rank_v) for x in rep.method_report.layers],
        "warm_ranks": warm_ranks,
        "loader_peak_compress_mib": rep.peak_loaded_bytes / 2**20,
        "loader_peak_ppl_mib": loader.peak_bytes / 2**20,
        "max_layer_mib": rep.max_layer_bytes / 2**20,
        "globals_mib": rep.globals_bytes / 2**20,
        "model_mib": rep.model_bytes / 2**20,
        "activations_mib": nsamples * seqlen * cfg.hidden_size * 4 / 2**20,
    }


def _in_memory(model_dir: str, nsamples: int, seqlen: int, eval_windows: int):
    import jcompress
    from jcompress.eigen_attention import compress

    cfg, params = jcompress.load_hf(model_dir)
    calib, ids = _inputs(cfg.vocab_size, nsamples, seqlen, eval_windows)
    new, rep = compress(params, cfg, calib, config=_config(nsamples, seqlen), progress=False)
    r = jcompress.perplexity(cfg, new, ids, seqlen=seqlen, batch_size=4, progress=False)
    return rep, r


def in_memory_side(
    model_dir: str, warm_dir: str, nsamples: int, seqlen: int, eval_windows: int
) -> dict[str, Any]:
    """``load_hf`` -> EigenAttention ``compress`` -> ``perplexity`` with the whole model held,
    after the same on the 2-layer ``warm_dir``."""
    import gc
    import time

    import jax.numpy as jnp

    jnp.zeros(()).block_until_ready()
    rss0 = rss_mib()
    warm_s = None
    if warm_dir:
        t0 = time.perf_counter()
        _in_memory(warm_dir, nsamples, seqlen, eval_windows)
        warm_s = time.perf_counter() - t0
    gc.collect()
    warm = peak_rss_mib()
    t0 = time.perf_counter()
    rep, r = _in_memory(model_dir, nsamples, seqlen, eval_windows)
    secs = time.perf_counter() - t0
    peak = peak_rss_mib()
    return {
        "value": peak,
        "rss_after_imports_mib": rss0,
        "warm_peak_mib": warm,
        "rss_growth_mib": peak - warm,
        "seconds": secs,
        "first_s": secs if warm_s is None else warm_s,  # the warm-up run compiles
        "ppl": r.ppl,
        "ranks": [(x.rank_kq, x.rank_v) for x in rep.layers],
    }


@register(
    "stream_llama_1gb",
    metric="peak RSS MiB",
    higher_is_better=False,
    doc="EigenAttention + ppl streamed layer by layer from a 4-shard 24-layer ~1.2 GB random "
    "Llama vs the same in memory",
)
def stream_llama_1gb(ctx: Context) -> dict[str, Any]:
    shape = ctx.pick(full=LLAMA_1GB, quick=LLAMA_QUICK, dry=LLAMA_DRY)
    nsamples, seqlen, windows = ctx.pick(full=(4, 128, 4), quick=(4, 128, 4), dry=(4, 16, 4))
    model_dir, warm_dir = ctx.tmp / "llama", ctx.tmp / "llama-2"
    built = ctx.side(
        build_sharded_llama, "build 4-shard checkpoint", out_dir=str(model_dir), shape=shape,
        shards=4,
    )  # fmt: skip
    if ctx.mode != "dry":  # the dry row checks the plumbing, not the bound: no warm-up
        ctx.side(
            build_sharded_llama, "build 2-layer warm-up checkpoint", out_dir=str(warm_dir),
            shape={**shape, "layers": 2}, shards=1,
        )  # fmt: skip
    kw = dict(
        model_dir=str(model_dir), warm_dir=str(warm_dir) if ctx.mode != "dry" else "",
        nsamples=nsamples, seqlen=seqlen,
        eval_windows=windows,
    )  # fmt: skip
    ours = ctx.side(streamed_side, "streamed", out_dir=str(ctx.tmp / "out"), **kw)
    base = ctx.side(in_memory_side, "in memory", **kw)
    if ours["ranks"] != base["ranks"]:
        raise AssertionError(f"ranks differ: streamed {ours['ranks']}, in memory {base['ranks']}")
    if abs(ours["ppl"] / base["ppl"] - 1) > 1e-3:
        raise AssertionError(f"perplexity differs: streamed {ours['ppl']}, in memory {base['ppl']}")
    layer_budget = ours["max_layer_mib"] + ours["globals_mib"]
    if ours["loader_peak_compress_mib"] > layer_budget + 1e-6:
        raise AssertionError(
            f"loader held {ours['loader_peak_compress_mib']:.1f} MiB > one layer + globals "
            f"({layer_budget:.1f} MiB)"
        )
    new_shapes = len({tuple(r) for r in ours["ranks"]} - {tuple(r) for r in ours["warm_ranks"]})
    bound = BOUND_LAYERS * layer_budget + PER_SHAPE_MIB * new_shapes
    met = ours["rss_growth_mib"] <= bound
    if ctx.mode != "dry" and not met:  # dry layers are smaller than allocator noise
        raise AssertionError(
            f"streamed peak RSS rose {ours['rss_growth_mib']:.0f} MiB over the 2-layer warm "
            f"run's: above the stated bound {bound:.0f} MiB ({BOUND_LAYERS} x (layer + globals) "
            f"+ {PER_SHAPE_MIB} MiB x {new_shapes} new rank shapes)"
        )
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{shape['layers']} layers, 4 shards, {built['bytes'] / 2**20:.0f} MiB",
        "info": {
            "shape": shape,
            "checkpoint_bytes": built["bytes"],
            "shards": built["shards"],
            "nsamples": nsamples,
            "seqlen": seqlen,
            "eval_windows": windows,
            "stated_bound_mib": bound,
            "bound": f"streamed peak RSS - warm peak <= {BOUND_LAYERS} x (largest layer + "
            f"globals) + {PER_SHAPE_MIB} MiB x rank shapes the warm run did not compile",
            "new_rank_shapes": new_shapes,
            "bound_met": met,
            "layer_budget_mib": layer_budget,
            "rss_growth_in_layers": {
                side: d["rss_growth_mib"] / max(ours["max_layer_mib"], 1e-9)
                for side, d in (("ours", ours), ("baseline", base))
            },
            "ppl": {"ours": ours["ppl"], "baseline": base["ppl"]},
        },
    }
