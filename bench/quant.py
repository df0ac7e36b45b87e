"""The quantization / tokenwise rows.

* ``tokenwise_nvfp4_metrics``: NVFP4 fake quantization of one ``[in, out]`` weight plus the
  tokenwise metrics of ``X W~`` against ``Y`` (nmse, token L2 / relative L2 mean / max,
  p95 / p99 / p999) over ``N`` cached fp16 tokens, chunked by 4096: ``jcompress.quant``
  (``quantize`` + ``tokenwise_metrics_quantized``) vs the same formulas in torch (NVFP4 with an
  ``float8_e4m3fn`` block-scale cast, the seed's chunked fp32 metric loop). Peak RSS of our
  side is also measured at half the tokens (``ours_peak_rss_half_tokens_mib``), with the same
  4096-token chunk at both counts (the quick and full sizes hold at least two chunks): with
  the data's own bytes subtracted, memory does not grow with the token count. Both sides also
  time one chunk's GEMM ``X W~`` alone (``info.*_gemm_floor_s``, ``*_gemm_share``): the row
  is bound by that ``N x in x out`` GEMM (a full GEMM is unavoidable: the error is measured
  against the cached ``Y``, so ``X W`` is part of it whatever the algebra). Torch runs it in
  float32; jcompress too on a CPU (``info.ours_gemm``: ``fp32``), where the row's ratio cannot
  beat the two frameworks' fp32 GEMM ratio (``gemm_ratio_ours_over_torch``); on a GPU
  (``gemm="auto"``: :func:`jcompress.quant.split_gemm.split_pays`) as two bf16 dots with exact
  products and float32 accumulation (``split_bf16``: the float16 activations are exact sums of
  two bf16 pieces and the NVFP4 core ``codes x E4M3 scales`` is exactly bf16).
* ``tokenwise_grid_llama1m``: the whole ``eval_fake`` grid (3 ranks x 3 specs) on the cached
  activations of llama-1m, batched (``eval_grid`` once) vs configuration by configuration
  (``eval_grid`` once per configuration, the seed's loop).

Heavy imports happen inside the side functions, in the process being measured.
"""

from __future__ import annotations

from typing import Any

from bench.harness import Context, median, register, time_calls

CHUNK = 4096


def _data(d_in: int, d_out: int, n: int, seed: int = 0):
    """``w [in, out]`` float32 with a few outlier input channels; ``x [n, in]`` and
    ``y = x w`` stored as float16 (a save_xy cache's dtype)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    w[rng.integers(0, d_in, 8)] *= 20.0
    x = np.empty((n, d_in), np.float16)
    y = np.empty((n, d_out), np.float16)
    for i in range(0, n, CHUNK):  # chunked: the generator's own temporaries stay small
        xc = rng.standard_normal((min(CHUNK, n - i), d_in), np.float32)
        x[i : i + CHUNK] = xc
        y[i : i + CHUNK] = (x[i : i + CHUNK].astype(np.float32) @ w).astype(np.float16)
    return w, x, y


# --------------------------------------------------------------------------- sides


def metrics_jax(d_in: int, d_out: int, n: int, repeats: int, half: bool = False):
    """jcompress side: ``quantize(w, nvfp4)`` + ``tokenwise_metrics_quantized`` (one jitted
    step per chunk of 4096 tokens; ``gemm="auto"``: the exact bf16 split where
    :func:`jcompress.quant.split_gemm.split_pays`, else the float32 GEMM)."""
    import jax

    from bench.harness import peak_rss_mib
    from jcompress.quant import split_gemm as S
    from jcompress.quant.formats import dequantize, parse_spec, quantize
    from jcompress.quant.tokenwise import tokenwise_metrics_quantized

    w, x, y = _data(d_in, d_out, n // 2 if half else n)
    spec = parse_spec("nvfp4")

    def run():
        q = quantize(jax.numpy.asarray(w), spec)
        return tokenwise_metrics_quantized(x, y, q, spec, chunk_tokens=CHUNK)

    first, times, m = time_calls(run, repeats)
    q = quantize(jax.numpy.asarray(w), spec)
    factors = S.bf16_factors(q, spec) if S.use_split("auto", x.dtype) else None
    split = factors is not None
    xc = jax.numpy.asarray(x[:CHUNK])
    if split:  # the GEMM the metrics ran: the bf16 split
        dot = jax.jit(S.split_dot)
        args = (xc, *factors)
    else:
        dot = jax.jit(lambda a, b: jax.numpy.dot(a.astype(b.dtype), b, precision="highest"))
        args = (xc, dequantize(q, spec))
    gemm_first, gemm_times, _ = time_calls(lambda: dot(*args).block_until_ready(), 2)
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "metrics": m,
        "gemm": "split_bf16" if split else "fp32",
        "gemm_chunk_s": min(gemm_times),
        "n_chunks": -(-x.shape[0] // CHUNK),
        "data_mib": (x.nbytes + y.nbytes + w.nbytes) / 2**20,
        "peak_rss_inner_mib": peak_rss_mib(),
        "backend": jax.default_backend(),
    }


def _torch_nvfp4(w):
    """NVFP4 fake quantization of ``w [in, out]`` in torch: blocks of 16 along ``in``, E4M3 block
    scales ``amax_b / 6 / g`` (cast through ``float8_e4m3fn``), fp32 ``g = amax / 2688``, E2M1
    round-to-nearest-even on the scaled values."""
    import torch

    d_in, d_out = w.shape
    x = w.reshape(d_in // 16, 16, d_out)
    amax = x.abs().amax(dim=1, keepdim=True)
    g = amax.max() / (6.0 * 448.0)
    s = (amax / 6.0 / g).to(torch.float8_e4m3fn).to(torch.float32) if g > 0 else amax * 0
    div = s * g
    y = torch.where(div > 0, x / torch.where(div > 0, div, 1.0), 0.0)
    a = y.abs().clamp(max=6.0)
    q = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a),
                                                               torch.round(a / 2) * 2))  # fmt: skip
    return (torch.sign(y) * q * div).reshape(d_in, d_out)


def _torch_metrics(x, y, w_hat, chunk, eps=1e-8):
    """The seed's metric loop: fp32 chunks, sums and maxima over tokens, quantiles at the end."""
    import torch

    n = x.shape[0]
    sse = denom = l2s = rs = torch.zeros((), dtype=torch.float64)
    l2m = rm = torch.zeros(())
    rel_all = torch.empty(n)
    for i in range(0, n, chunk):
        xc, yc = x[i : i + chunk].float(), y[i : i + chunk].float()
        d = xc @ w_hat - yc
        d2 = d.pow(2).sum(1)
        y2 = yc.pow(2).sum(1)
        l2 = d2.sqrt()
        rel = l2 / (y2.sqrt() + eps)
        sse = sse + d2.sum().double()
        denom = denom + y2.sum().double()
        l2s, rs = l2s + l2.sum().double(), rs + rel.sum().double()
        l2m, rm = torch.maximum(l2m, l2.max()), torch.maximum(rm, rel.max())
        rel_all[i : i + chunk] = rel
    q = torch.quantile(rel_all, torch.tensor([0.95, 0.99, 0.999]))
    return {
        "nmse": float(sse / denom), "sse": float(sse), "denom": float(denom),
        "token_l2_mean": float(l2s / n), "token_l2_max": float(l2m),
        "token_rel_l2_mean": float(rs / n), "token_rel_l2_max": float(rm),
        "n_tokens": float(n), "token_rel_l2_p95": float(q[0]),
        "token_rel_l2_p99": float(q[1]), "token_rel_l2_p999": float(q[2]),
    }  # fmt: skip


def metrics_torch(d_in: int, d_out: int, n: int, repeats: int):
    """Baseline side: the same formulas in torch (CPU, fp32, all threads torch chooses)."""
    import torch

    from bench.harness import peak_rss_mib

    w, x, y = _data(d_in, d_out, n)
    tw, tx, ty = torch.from_numpy(w), torch.from_numpy(x), torch.from_numpy(y)

    def run():
        with torch.no_grad():
            return _torch_metrics(tx, ty, _torch_nvfp4(tw), CHUNK)

    first, times, m = time_calls(run, repeats)
    with torch.no_grad():
        w_hat, xc = _torch_nvfp4(tw), tx[:CHUNK]
        _, gemm_times, _ = time_calls(lambda: xc.float() @ w_hat, 2)
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "metrics": m,
        "gemm_chunk_s": min(gemm_times),
        "n_chunks": -(-x.shape[0] // CHUNK),
        "peak_rss_inner_mib": peak_rss_mib(),
        "torch_threads": torch.get_num_threads(),
    }


def _llama_cache(tmp: str, length: int):
    from jcompress.cli import bundled_model_dir
    from jcompress.data import load_tokenizer
    from jcompress.models import load_hf
    from jcompress.quant.tokenwise import SaveXYConfig, XYCache, representative_windows, save_xy

    d = bundled_model_dir()
    cfg, params = load_hf(d)
    c = SaveXYConfig(cn=8, eu=8, length=length, save_dtype="fp32", layout="per_layer")
    out = save_xy(cfg, params, representative_windows(load_tokenizer(d), c), tmp, "b",
                  config=c, progress=False, overwrite=True)  # fmt: skip
    return cfg, params, XYCache(out)


GRID = dict(ranks=[8, 16, 32], qspecs="nvfp4,fp4@128,fp4@in")
DRY_GRID = dict(ranks=[8], qspecs="nvfp4")  # dry run: the harness path only, in seconds


def grid_batched(tmp: str, length: int, repeats: int, grid: dict) -> dict[str, Any]:
    """jcompress side: ``eval_grid`` once for the 9 configurations."""
    from jcompress.quant.formats import parse_specs
    from jcompress.quant.tokenwise import EvalConfig, eval_grid

    cfg, params, cache = _llama_cache(tmp, length)
    config = EvalConfig(ranks=tuple(grid["ranks"]), qspecs=parse_specs(grid["qspecs"]))
    first, times, res = time_calls(
        lambda: eval_grid(cfg, params, cache, config, progress=False), repeats
    )
    agg = res["by_layer"]["0"]["self_attn"]["agg"]
    return {"value": median(times), "first_s": first, "times_s": times,
            "l0_attn_nmse": {k: v["nmse_mean_over_proj"] for k, v in agg.items()}}  # fmt: skip


def grid_one_by_one(tmp: str, length: int, repeats: int, grid: dict) -> dict[str, Any]:
    """Baseline side: ``eval_grid`` once per configuration (one rank, one spec each), the
    seed's loop over configurations."""
    from jcompress.quant.formats import parse_specs
    from jcompress.quant.tokenwise import EvalConfig, eval_grid

    cfg, params, cache = _llama_cache(tmp, length)
    specs = parse_specs(grid["qspecs"])

    def run():
        out = {}
        for r in grid["ranks"]:
            for q in specs:
                res = eval_grid(cfg, params, cache, EvalConfig(ranks=(r,), qspecs=(q,)),
                                progress=False)  # fmt: skip
                out.update(res["by_layer"]["0"]["self_attn"]["agg"])
        return out

    first, times, agg = time_calls(run, repeats)
    return {"value": median(times), "first_s": first, "times_s": times,
            "l0_attn_nmse": {k: v["nmse_mean_over_proj"] for k, v in agg.items()}}  # fmt: skip


# --------------------------------------------------------------------------- rows


@register(
    "tokenwise_nvfp4_metrics",
    metric="s",
    higher_is_better=False,
    doc="NVFP4 fake quant + tokenwise metrics (nmse, token L2, p95/p99/p999) of a 4096x4096 "
    "weight on 16K fp16 tokens: jcompress.quant vs the same formulas in torch",
)
def tokenwise_nvfp4_metrics(ctx: Context) -> dict[str, Any]:
    d, n = ctx.pick(full=(4096, 16384), quick=(1024, 8192), dry=(64, 96))
    repeats = ctx.repeats(full=3, quick=3)
    ours = ctx.side(metrics_jax, "jcompress fake_quant + metrics", d_in=d, d_out=d, n=n,
                    repeats=repeats)  # fmt: skip
    # memory at half the tokens, the same chunk (N/2 >= CHUNK at quick and full sizes)
    half = ctx.side(metrics_jax, "jcompress at N/2 tokens", d_in=d, d_out=d, n=n,
                    repeats=1, half=True)  # fmt: skip
    base = ctx.side(metrics_torch, "torch fake_quant + metrics", d_in=d, d_out=d, n=n,
                    repeats=repeats)  # fmt: skip
    a, b = ours["metrics"], base["metrics"]
    for k in ("nmse", "token_rel_l2_mean", "token_rel_l2_p99", "token_l2_max"):
        if not abs(a[k] - b[k]) <= 1e-3 * abs(b[k]) + 1e-12:
            raise AssertionError(f"{k} disagrees: jcompress {a[k]:.6g} vs torch {b[k]:.6g}")
    return {
        "ours": ours,
        "baseline": base,
        "size": f"W {d}x{d}, N={n} tokens, chunk {CHUNK}",
        "info": {
            "nmse": a["nmse"],
            "ours_peak_rss_mib": ours.get("peak_rss_mib"),
            "ours_peak_rss_half_tokens_mib": half.get("peak_rss_mib"),
            "ours_data_mib": ours["data_mib"],
            "half_data_mib": half["data_mib"],
            "chunk_tokens": CHUNK,
            # The GEMM floor: one chunk's X W~ alone (each side's own GEMM, timed after the
            # metric repeats) x the number of chunks, and its share of each side's time.
            "ours_gemm_floor_s": ours["gemm_chunk_s"] * ours["n_chunks"],
            "torch_gemm_floor_s": base["gemm_chunk_s"] * base["n_chunks"],
            "ours_gemm_share": ours["gemm_chunk_s"] * ours["n_chunks"] / ours["value"],
            "torch_gemm_share": base["gemm_chunk_s"] * base["n_chunks"] / base["value"],
            "gemm_ratio_ours_over_torch": ours["gemm_chunk_s"] / base["gemm_chunk_s"],
            "ours_gemm": ours["gemm"],
        },
    }


@register(
    "tokenwise_grid_llama1m",
    metric="s",
    higher_is_better=False,
    doc="eval_fake grid (ranks 8,16,32 x nvfp4, fp4@128, fp4@in) on llama-1m's cached "
    "activations: one batched eval_grid vs one eval_grid per configuration",
)
def tokenwise_grid_llama1m(ctx: Context) -> dict[str, Any]:
    length = ctx.pick(full=128, quick=64, dry=16)
    repeats = ctx.repeats(full=3, quick=2)
    grid = ctx.pick(full=GRID, quick=GRID, dry=DRY_GRID)
    ours = ctx.side(grid_batched, "batched grid", tmp=str(ctx.tmp / "a"), length=length,
                    repeats=repeats, grid=grid)  # fmt: skip
    base = ctx.side(grid_one_by_one, "config by config", tmp=str(ctx.tmp / "b"),
                    length=length, repeats=repeats, grid=grid)  # fmt: skip
    for k, v in base["l0_attn_nmse"].items():
        o = ours["l0_attn_nmse"][k]
        if not abs(o - v) <= 1e-4 * abs(v) + 1e-12:
            raise AssertionError(f"{k}: batched {o:.6g} vs one by one {v:.6g}")
    return {
        "ours": ours,
        "baseline": base,
        "size": f"llama-1m, 4 layers x 7 projections, 16 x {length} tokens, "
        f"{len(grid['ranks']) * len(grid['qspecs'].split(','))} configurations",
        "info": {"length": length},
    }
