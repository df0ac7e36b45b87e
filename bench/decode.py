"""Decode rows: greedy ``generate`` with a long prompt, EigenAttention-compressed llama-1m (ours)
vs the dense model (baseline), with the KV cache's real bytes on both sides.

The compressed checkpoint is built once in its own subprocess (EigenAttention on a small
WikiText-2 calibration set, saved with ``factors=True``); each side then loads its model, runs
``generate`` with ``max_new_tokens = n`` and with ``max_new_tokens = 1`` (prefill + one token),
and reports decode tokens/s as ``(n - 1) / (t_n - t_1)`` over median times, plus the bytes of
the cache ``init_cache`` allocates for the prompt + continuation.
"""

from __future__ import annotations

import os
from typing import Any

from bench.foundation import llama_1m_dir, shared_data
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
    return {"kv_cache_ratio_report": report.kv_cache_ratio}


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


@register(
    "decode_llama_1m_eigen_2k",
    metric="decode tokens/s",
    higher_is_better=True,
    doc="greedy generate after a 2K-token prompt: EigenAttention llama-1m (ours) vs dense "
    "llama-1m (baseline); KV-cache bytes of both in info",
)
def decode_llama_1m_eigen_2k(ctx: Context) -> dict[str, Any]:
    model_dir = llama_1m_dir()
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
            "calib": f"wikitext-2/valid.txt {nsamples}x{seqlen} seed 2, avg_dim 1, budget 0.025",
        },
    }
