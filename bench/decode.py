"""Decode and attention-time rows for EigenAttention-compressed models (ours) vs the dense
models (baseline).

``decode_llama_1m_eigen_2k``: greedy ``generate`` with a long prompt, with the KV cache's real
bytes on both sides.

The compressed checkpoint is built once in its own subprocess (EigenAttention on a small
WikiText-2 calibration set, saved with ``factors=True``); each side then loads its model, runs
``generate`` with ``max_new_tokens = n`` and with ``max_new_tokens = 1`` (prefill + one token),
and reports decode tokens/s as ``(n - 1) / (t_n - t_1)`` over median times, plus the bytes of
the cache ``init_cache`` allocates for the prompt + continuation.

``layers_{opt,llama}_1m_eigen_2k``: the decoder layers (``apply_layer`` over every layer, no
embedding or head) on one 2048-token sequence. On opt-1m the compressed model computes the
scores in rank space (``q' k'^T`` on the shared K/Q basis); its side also times the same
compressed model with the K/Q tags removed (keys and queries widened back to the head width),
round robin in the same process, so ``info.rank_space_vs_widened`` is the rank-space gain
alone. llama-1m widens keys before
RoPE (required), so there the compressed layers only gain from rank-r values.
"""

from __future__ import annotations

import os
from typing import Any

from bench.foundation import llama_1m_dir, shared_data, shared_model_dir
from bench.harness import Context, median, register, time_calls

GOAL_DECODE = "compressed cache smaller in bytes; decode tokens/s >= dense (ratio >= 1)"


def build_eigen(model_dir: str, out_dir: str, nsamples: int, seqlen: int) -> dict[str, Any]:
    """EigenAttention on ``model_dir`` (calibration: wikitext-2 valid), factors saved."""
    import jcompress
    from jcompress.data import calibration_windows, load_tokenizer, load_tokens
    from jcompress.eigen_attention import EigenAttentionConfig, compress

    cfg, params = jcompress.load_hf(model_dir)
    tok = load_tokenizer(model_dir)
    ids = load_tokens(str(shared_data() / "wikitext-2" / "valid.txt"), tok)
    calib = calibration_windows(ids, nsamples=nsamples, seqlen=seqlen, seed=2)
    conf = EigenAttentionConfig(
        nsamples=nsamples, seqlen=seqlen, avg_dim=1, error_budget=0.025, batch_size=8
    )
    small, report = compress(params, cfg, calib, config=conf, progress=False)
    jcompress.save_hf(cfg, small, out_dir, factors=True)
    return {
        "kv_cache_ratio_report": report.kv_cache_ratio,
        "ranks": [[lr.rank_kq, lr.rank_v] for lr in report.layers],
    }


def decode_side(
    model_dir: str, prompt_len: int, new_tokens: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """``generate`` timing on one model (see the module docstring)."""
    import inspect

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jcompress
    from jcompress.models.forward import init_cache

    jnp.zeros(()).block_until_ready()
    cfg, params = jcompress.load_hf(model_dir)
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, prompt_len)).astype(np.int32))
    kw: dict[str, Any] = {"eos_token_id": None}
    if "allow_long" in inspect.signature(jcompress.generate).parameters:
        kw["allow_long"] = True  # llama-1m was trained on 512 positions; RoPE runs past them

    def run(n):
        return lambda: jcompress.generate(cfg, params, ids, max_new_tokens=n, **kw)

    sync = lambda x: x.block_until_ready()  # noqa: E731
    first_n, times_n, out = time_calls(run(new_tokens), repeats, sync=sync)
    _, times_1, _ = time_calls(run(1), repeats, sync=sync)
    decode_s = max(median(times_n) - median(times_1), 1e-9)
    cache = init_cache(cfg, params, 1, prompt_len + new_tokens)
    cache_bytes = int(sum(x.nbytes for x in jax.tree.leaves((cache.k, cache.v))))
    return {
        "value": (new_tokens - 1) / decode_s,
        "first_s": first_n,
        "median_s": median(times_n),
        "times_s": times_n,
        "prefill_plus_one_s": median(times_1),
        "kv_cache_bytes": cache_bytes,
        "tokens": np.asarray(out[0, prompt_len:]).tolist(),
    }


def _eigen_checkpoint(ctx: Context, model_dir: Any) -> tuple[Any, dict[str, Any], str]:
    """The EigenAttention checkpoint the compressed side loads (built in its own side):
    ``(its directory, build_eigen's result, the calibration it used in words)``."""
    eigen_dir = ctx.tmp / "eigen"
    nsamples, seqlen = ctx.pick(full=(32, 256), quick=(16, 128), dry=(4, 32))
    built = ctx.side(
        build_eigen,
        "EigenAttention checkpoint",
        model_dir=str(model_dir),
        out_dir=str(eigen_dir),
        nsamples=nsamples,
        seqlen=seqlen,
    )
    calib = f"wikitext-2/valid.txt {nsamples}x{seqlen} seed 2, avg_dim 1, budget 0.025"
    return eigen_dir, built, calib


@register(
    "decode_llama_1m_eigen_2k",
    metric="decode tokens/s",
    higher_is_better=True,
    doc="greedy generate after a 2K-token prompt: EigenAttention llama-1m (ours) vs dense "
    "llama-1m (baseline); KV-cache bytes of both in info",
)
def decode_llama_1m_eigen_2k(ctx: Context) -> dict[str, Any]:
    model_dir = llama_1m_dir()
    eigen_dir, built, calib = _eigen_checkpoint(ctx, model_dir)
    prompt, new = ctx.pick(full=(2048, 128), quick=(2048, 32), dry=(64, 4))
    kw = dict(prompt_len=prompt, new_tokens=new, repeats=ctx.repeats(full=5, quick=3))
    load_before = os.getloadavg()
    ours = ctx.side(decode_side, "compressed generate", model_dir=str(eigen_dir), **kw)
    base = ctx.side(decode_side, "dense generate", model_dir=str(model_dir), **kw)
    if not ours["kv_cache_bytes"] < base["kv_cache_bytes"]:
        raise AssertionError(
            f"compressed KV cache is not smaller: {ours['kv_cache_bytes']} vs "
            f"{base['kv_cache_bytes']} bytes"
        )
    return {
        "ours": ours,
        "baseline": base,
        "size": f"prompt {prompt}, +{new} tokens",
        "info": {
            "goal": GOAL_DECODE,
            "kv_cache_bytes": {"ours": ours["kv_cache_bytes"], "baseline": base["kv_cache_bytes"]},
            "kv_cache_bytes_ratio": ours["kv_cache_bytes"] / base["kv_cache_bytes"],
            "kv_cache_ratio_report": built["kv_cache_ratio_report"],
            "prefill_plus_one_s": {
                "ours": ours["prefill_plus_one_s"],
                "baseline": base["prefill_plus_one_s"],
            },
            "loadavg": {"before": list(load_before), "after": list(os.getloadavg())},
            "same_first_tokens": ours["tokens"][:8] == base["tokens"][:8],
            "calib": calib,
        },
    }


# --------------------------------------------------------------------------- attention time


def layers_side(
    model_dir: str,
    seq: int,
    repeats: int,
    widened: bool = False,
    paired_dir: str = "",
    seed: int = 0,
) -> dict[str, Any]:
    """Median time of the decoder layers (``apply_layer`` over every layer, each layer its own
    jit executable) on the hidden states ``embed`` gives for ``[1, seq]`` random ids.

    ``widened``: also time the same model with its ``HeadLowRank.basis`` tags removed (scores
    at the head width), and check both give the same outputs; ``paired_dir``: also time that
    model (the dense one). Extra variants run round robin with the model in this process, so
    their ratios compare runs under the same load (``*_median_s``, ``vs_*``)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jcompress
    from jcompress.leaves import HeadLowRank, is_compressed

    jnp.zeros(()).block_until_ready()
    cfg, params = jcompress.load_hf(model_dir)
    leaves = jax.tree.leaves(params, is_leaf=is_compressed)
    tagged = sum(1 for x in leaves if getattr(x, "basis", None))
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, seq)).astype(np.int32))
    # learned position tables (opt-1m: 512 rows) are clipped past their end: a speed row
    hidden = jcompress.embed(cfg, params, ids).block_until_ready()

    def stack(p):
        layers = [jcompress.layer_params(cfg, p, i) for i in range(cfg.num_layers)]

        def run():
            h = hidden
            for i, lp in enumerate(layers):
                h = jcompress.apply_layer(cfg, lp, h, i)
            return h.block_until_ready()

        return run

    variants = {"ours": stack(params)}
    if widened:
        untagged = jax.tree.map(
            lambda x: dataclasses.replace(x, basis=None) if isinstance(x, HeadLowRank) else x,
            params,
            is_leaf=is_compressed,
        )
        variants["widened"] = stack(untagged)
    if paired_dir:
        cfg2, dense = jcompress.load_hf(paired_dir)
        if cfg2.num_layers != cfg.num_layers or cfg2.family != cfg.family:
            raise AssertionError(f"{paired_dir} is not the model {model_dir} was built from")
        variants["paired"] = stack(dense)
    first, outs = {}, {}
    for name, run in variants.items():
        first[name], _, outs[name] = time_calls(run, 0, warmup=1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):  # round robin: every variant under the same load
        for name, run in variants.items():
            times[name].append(time_calls(run, 1)[0])
    out = {
        "value": median(times["ours"]),
        "first_s": first["ours"],
        "median_s": median(times["ours"]),
        "times_s": times["ours"],
        "tagged_leaves": tagged,
    }
    if paired_dir:
        out.update(
            paired_median_s=median(times["paired"]),
            vs_paired=median(times["ours"]) / median(times["paired"]),
        )
    if widened:
        a, b = (np.asarray(outs[n], np.float64) for n in ("ours", "widened"))
        diff = float(np.abs(a - b).max() / max(np.abs(b).max(), 1.0))
        if not diff <= 1e-4:  # rank-space scores must give the widened model's outputs
            raise AssertionError(f"rank-space and widened outputs differ: {diff:.3g}")
        out.update(
            widened_times_s=times["widened"],
            widened_median_s=median(times["widened"]),
            rank_space_vs_widened=median(times["ours"]) / median(times["widened"]),
            max_rel_diff_vs_widened=diff,
        )
    return out


def _layers_row(ctx: Context, model: str) -> dict[str, Any]:
    model_dir = shared_model_dir(model)
    eigen_dir, built, calib = _eigen_checkpoint(ctx, model_dir)
    seq = ctx.pick(full=2048, quick=2048, dry=64)
    kw = dict(seq=seq, repeats=ctx.repeats(full=10, quick=5))
    rank_space = model.startswith("opt")
    load_before = os.getloadavg()
    ours = ctx.side(
        layers_side,
        "compressed layers",
        model_dir=str(eigen_dir),
        widened=rank_space,
        paired_dir=str(model_dir),
        **kw,
    )
    if rank_space and not ours["tagged_leaves"]:
        raise AssertionError(f"{model}: EigenAttention left no K/Q pair on a shared basis")
    base = ctx.side(layers_side, "dense layers", model_dir=str(model_dir), **kw)
    info = {
        k: ours[k]
        for k in (
            "vs_paired",
            "paired_median_s",
            "rank_space_vs_widened",
            "widened_median_s",
            "max_rel_diff_vs_widened",
        )
        if k in ours
    }
    info.update(
        rank_space_leaves=ours["tagged_leaves"],
        kv_cache_ratio_report=built["kv_cache_ratio_report"],
        ranks=built["ranks"],
        loadavg={"before": list(load_before), "after": list(os.getloadavg())},
        calib=calib,
    )
    return {"ours": ours, "baseline": base, "size": f"1x{seq}, all layers", "info": info}


@register(
    "layers_opt_1m_eigen_2k",
    metric="layers s",
    higher_is_better=False,
    doc="decoder layers at 1x2048: EigenAttention opt-1m, scores in rank space (ours) vs "
    "dense opt-1m (baseline); the widened compressed model and the dense one timed round robin "
    "in info",
)
def layers_opt_1m_eigen_2k(ctx: Context) -> dict[str, Any]:
    return _layers_row(ctx, "opt-1m")


@register(
    "layers_llama_1m_eigen_2k",
    metric="layers s",
    higher_is_better=False,
    doc="decoder layers at 1x2048: EigenAttention llama-1m (keys widened before RoPE, rank-r "
    "values; ours) vs dense llama-1m (baseline)",
)
def layers_llama_1m_eigen_2k(ctx: Context) -> dict[str, Any]:
    return _layers_row(ctx, "llama-1m")
