"""Scaling sweeps for ``python -m bench --plots DIR``: each method's two sides (the same side
functions its table rows measure) at several sizes of one parameter. One figure per method:

* ``forward``: jit forward vs transformers on llama-1m, time per call against sequence length;
* ``eigen``: EigenAttention per-head bases of an OPT-125m-shaped layer (GroupedGram + vmap'd
  eigh vs the reference's stack + per-head torch SVD) against calibration tokens;
* ``tucker``: Tucker HOOI of a ``hidden x hidden`` weight reshaped to ``64 x 64 x hidden^2/4096``
  (the Tucker-MPS reference's layout) against the hidden size, jcompress vs TensorLy;
* ``ged``: ``jcompress.ged.fit`` vs the tutorial's numpy/scipy pipeline against the number of
  samples per condition;
* ``quant``: NVFP4 fake quant + tokenwise metrics against the number of tokens, vs torch;
* ``sparge``: block-sparse XLA attention vs dense XLA against sequence length (sparsity 0.5)
  and against block sparsity.

Heavy imports happen inside the side functions, in the processes being measured.
"""

from __future__ import annotations

import json
from typing import Any

from bench import decomp as decomp_rows
from bench import eigen, foundation, ged, quant, sparge
from bench.harness import Context, sweep

# --------------------------------------------------------------------------- forward


@sweep(
    "forward_seq",
    method="forward",
    param="sequence length (tokens, batch 1)",
    full=(128, 256, 512, 1024, 2048),
    quick=(64, 256, 1024),
    dry=(8, 16),
    y="median_s",
    ours="jcompress.forward (jit)",
    baseline="transformers LlamaForCausalLM",
    doc="forward time per call on llama-1m (fp32, CPU)",
)
def forward_seq(ctx: Context, seq: int) -> dict[str, Any]:
    model_dir = foundation.llama_1m_dir()
    vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    kw = dict(
        model_dir=str(model_dir),
        vocab=vocab,
        batch=1,
        seq=seq,
        repeats=ctx.repeats(full=5, quick=3),
        warmup=ctx.pick(full=2, quick=2, dry=0),
    )
    ours = ctx.side(foundation.forward_jax, f"jcompress forward T={seq}", **kw)
    base = ctx.side(foundation.forward_torch, f"transformers forward T={seq}", **kw)
    return {"ours": ours, "baseline": base, "size": f"1x{seq}"}


# --------------------------------------------------------------------------- eigen


@sweep(
    "eigen_tokens",
    method="eigen",
    param="calibration tokens (windows x seqlen)",
    full=(4096, 16384, 65536),
    quick=(1024, 4096, 16384),
    dry=(64, 128),
    ours="jcompress GroupedGram + vmap'd eigh",
    baseline="reference: stack + per-head torch SVD",
    doc="EigenAttention K/Q + V bases of one OPT-125m-shaped layer",
)
def eigen_tokens(ctx: Context, tokens: int) -> dict[str, Any]:
    seqlen = ctx.pick(full=2048, quick=512, dry=32)
    windows = max(tokens // seqlen, 1)
    kw = dict(
        **eigen.OPT_125M_LAYER,
        windows=windows,
        seqlen=seqlen,
        batch=8,
        repeats=ctx.repeats(full=3, quick=2),
    )
    ours = ctx.side(eigen.bases_jax, f"jcompress bases {tokens} tok", **kw,
                    out=str(ctx.tmp / "a.npz"))  # fmt: skip
    base = ctx.side(eigen.bases_torch, f"torch SVD loop {tokens} tok", **kw,
                    out=str(ctx.tmp / "b.npz"), literal_check=False)  # fmt: skip
    check = eigen._compare_bases(ctx.tmp / "a.npz", ctx.tmp / "b.npz")  # raises on disagreement
    return {"ours": ours, "baseline": base, "size": f"{windows}x{seqlen}", "info": {"check": check}}


# --------------------------------------------------------------------------- tucker (HOOI)


@sweep(
    "tucker_hooi_hidden",
    method="tucker",
    param="hidden size (weight hidden x hidden as 64 x 64 x hidden²/4096)",
    full=(256, 512, 768, 1024, 1536),
    quick=(256, 512, 1024),
    dry=(32, 64),
    ours="jcompress.decomp.hooi (jit)",
    baseline="TensorLy tucker (numpy)",
    doc="Tucker HOOI at ranks [6, 6, 8] (dry [2, 2, 3])",
)
def tucker_hooi_hidden(ctx: Context, hidden: int) -> dict[str, Any]:
    lead = ctx.pick(full=64, quick=64, dry=8)
    shape = [lead, lead, hidden * hidden // (lead * lead)]
    ranks = ctx.pick(full=[6, 6, 8], quick=[6, 6, 8], dry=[2, 2, 3])
    kw = dict(shape=shape, ranks=ranks, repeats=ctx.repeats(full=5, quick=3), tol=1e-4)
    ours = ctx.side(decomp_rows.hooi_jax, f"jcompress hooi {shape}", **kw)
    base = ctx.side(decomp_rows.hooi_tensorly, f"tensorly tucker {shape}", **kw)
    return {
        "ours": ours,
        "baseline": base,
        "size": "x".join(map(str, shape)),
        "info": {"rel_error": {"ours": ours["rel_error"], "baseline": base["rel_error"]}},
    }


# --------------------------------------------------------------------------- GED


@sweep(
    "ged_samples",
    method="ged",
    param="samples per condition N",
    full=(171, 500, 1000, 2000, 4000),
    quick=(100, 300, 1000),
    dry=(12, 40),
    ours="jcompress.ged.fit",
    baseline="numpy/scipy GED pipeline",
    doc="GED fit, D=3072 (quick 768, dry 32), PCA 99%, shrinkage 0.01",
)
def ged_samples(ctx: Context, n: int) -> dict[str, Any]:
    d = ctx.pick(full=3072, quick=768, dry=32)
    repeats = ctx.repeats(full=3, quick=2)
    ours = ctx.side(ged.fit_jax, f"jcompress.ged.fit N={n}", d=d, n=n, repeats=repeats)
    base = ctx.side(ged.fit_numpy, f"numpy/scipy GED N={n}", d=d, n=n, repeats=repeats)
    a, b = ours["top_eigenvalues"][0], base["top_eigenvalues"][0]
    if ours["n_components"] != base["n_components"] or not abs(a - b) <= 1e-2 * abs(b):
        raise AssertionError(
            f"GED disagrees at N={n}: K {ours['n_components']} vs {base['n_components']}, "
            f"top eigenvalue {a:.6g} vs {b:.6g}"
        )
    return {"ours": ours, "baseline": base, "size": f"D={d}, N=2x{n}"}


# --------------------------------------------------------------------------- quant / tokenwise


@sweep(
    "quant_tokens",
    method="quant",
    param="tokens N",
    full=(2048, 8192, 32768),
    quick=(1024, 4096, 16384),
    dry=(48, 96),  # the N/2 and N of tokenwise_nvfp4_metrics' dry sides: shared programs
    ours="jcompress quantize + tokenwise_metrics_quantized",
    baseline="torch (same formulas)",
    doc="NVFP4 fake quant + tokenwise metrics of a 1024x1024 weight (dry 64x64)",
)
def quant_tokens(ctx: Context, n: int) -> dict[str, Any]:
    d = ctx.pick(full=1024, quick=1024, dry=64)
    kw = dict(d_in=d, d_out=d, n=n, repeats=ctx.repeats(full=3, quick=2))
    ours = ctx.side(quant.metrics_jax, f"jcompress metrics N={n}", **kw)
    base = ctx.side(quant.metrics_torch, f"torch metrics N={n}", **kw)
    a, b = ours["metrics"]["nmse"], base["metrics"]["nmse"]
    if not abs(a - b) <= 1e-3 * abs(b) + 1e-12:
        raise AssertionError(f"nmse disagrees at N={n}: jcompress {a:.6g} vs torch {b:.6g}")
    return {"ours": ours, "baseline": base, "size": f"W {d}x{d}, N={n}"}


# --------------------------------------------------------------------------- sparge


def _sparge_point(ctx: Context, t: int, sparsity: float) -> dict[str, Any]:
    h, d = ctx.pick(full=(8, 128), quick=(4, 64), dry=(2, 16))
    repeats = ctx.repeats(full=3, quick=2)
    ours = ctx.side(sparge.side_sparse, f"block-sparse T={t} s={sparsity}", t=t, h=h, d=d,
                    sparsity=sparsity, repeats=repeats)  # fmt: skip
    base = ctx.side(sparge.side_impl, f"dense XLA T={t}", t=t, h=h, d=d, impl="dense",
                    repeats=repeats)  # fmt: skip
    return {
        "ours": ours,
        "baseline": base,
        "size": f"T={t}, H={h}, D={d}, sparsity {ours['sparsity']:.2f}",
        "info": {"sparsity": ours["sparsity"]},
    }


@sweep(
    "sparge_seq",
    method="sparge",
    param="sequence length T",
    full=(1024, 2048, 4096, 8192),
    quick=(512, 1024, 2048, 4096),
    dry=(128, 256),
    ours="block-sparse XLA (SpargeAttn fallback)",
    baseline="dense XLA attention",
    doc="causal attention at block sparsity ~0.5",
)
def sparge_seq(ctx: Context, t: int) -> dict[str, Any]:
    return _sparge_point(ctx, t, 0.5)


@sweep(
    "sparge_sparsity",
    method="sparge",
    param="target block sparsity",
    full=(0.25, 0.5, 0.75, 0.9),
    quick=(0.25, 0.5, 0.75, 0.9),
    dry=(0.25, 0.75),
    ours="block-sparse XLA (SpargeAttn fallback)",
    baseline="dense XLA attention",
    log_x=False,
    doc="causal attention at T=8192 (quick 4096, dry 256)",
)
def sparge_sparsity(ctx: Context, sparsity: float) -> dict[str, Any]:
    return _sparge_point(ctx, ctx.pick(full=8192, quick=4096, dry=256), sparsity)
