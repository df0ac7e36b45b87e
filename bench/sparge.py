"""SpargeAttn rows: the block-sparse XLA fallback (gathers only the kept K/V blocks) vs dense
XLA attention (``attention.Dense``) and vs the online-softmax ``attention.Chunked``, causal,
at a fixed block mask of target sparsity 0.25 / 0.5 / 0.75 (random tiles among the causally
visible ones, plus the forced sink and diagonal blocks), one process per side. Full size is
the issue's: one sequence of 8,192 tokens, 32 heads x 128 (quick / dry are small).

The mask is built once, outside the timed region (selection cost is O(T x nK x D), small next
to the attention itself). Heavy imports happen inside the side functions.

Dense attention materialises ``[H, T, T]`` float32 scores and probabilities (~17 GiB at the
full size). When that does not fit in the machine's available memory (``MemAvailable``), the
row's baseline is the chunked implementation instead, and the row's size says so; the dense
side is never started into an out-of-memory kill.

The sparsity-vs-speed curve (a JSON + a matplotlib PNG)::

    python -m bench.sparge --plot DIR [--quick | --dry-run] [--sparsities 0.1,0.5,0.9]
    python -m bench.sparge --plot DIR --from results.json   # the rows of `python -m bench --out`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # `python -m bench.sparge`: run the imported module (rows register
    import bench.sparge  # once, and the workers find the sides under their real module name)

    sys.exit(bench.sparge.main())

from bench.harness import BenchError, Context, log, median, register, time_calls  # noqa: E402

FULL, QUICK, DRY = (8192, 32, 128), (2048, 8, 64), (256, 2, 16)
CURVE_SPARSITIES = (0.1, 0.25, 0.5, 0.75, 0.9)


def dense_bytes(t: int, h: int) -> int:
    """What dense attention holds at its peak: float32 scores and probabilities ``[H, T, T]``."""
    return 2 * h * t * t * 4


def mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``None`` where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dense_fits(t: int, h: int) -> tuple[bool, str]:
    """Whether the dense side fits in 70% of the available memory, and a note for the row."""
    need, avail = dense_bytes(t, h), mem_available()
    if avail is None or need <= 0.7 * avail:
        return True, ""
    return False, (
        f"dense needs ~{need / 2**30:.1f} GiB of scores > 70% of {avail / 2**30:.1f} GiB "
        "available: baseline is chunked"
    )


def _inputs(t: int, h: int, d: int, sparsity: float, bq: int, bk: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, t, h, d), jnp.float32) for kk in ks)
    nq, nk = -(-t // bq), -(-t // bk)
    rng = np.random.default_rng(0)
    tiles = rng.random((1, h, nq, nk)) >= sparsity
    qi, kj = np.arange(nq)[:, None], np.arange(nk)[None, :]
    first_k = (qi * bq) // bk
    last_k = ((qi + 1) * bq - 1) // bk
    visible = kj <= last_k
    tiles = (tiles | (kj == 0) | ((kj >= first_k) & (kj <= last_k))) & visible
    keep = np.repeat(tiles, bq, axis=2)[:, :, :t]
    measured = 1.0 - tiles.sum() / (visible.sum() * h)
    return q, k, v, jnp.asarray(keep), float(measured)


def side_sparse(t: int, h: int, d: int, sparsity: float, repeats: int) -> dict[str, Any]:
    """Block-sparse XLA fallback (``kernels.sparse_attention.xla_block_sparse``)."""
    import jax
    import jax.numpy as jnp
    from jcompress.kernels import sparse_attention as K

    bs = K.BlockSizes(block_q=128, block_k=64)
    q, k, v, keep, measured = _inputs(t, h, d, sparsity, bs.block_q, bs.block_k)
    f = jax.jit(
        lambda q, k, v, keep: K.xla_block_sparse(
            q, k, v, keep, jnp.full((h,), jnp.inf), block_sizes=bs, scale=d**-0.5
        )[0]
    )
    first, times, _ = time_calls(lambda: f(q, k, v, keep), repeats, sync=jax.block_until_ready)
    return {"value": median(times), "first_s": first, "times_s": times, "sparsity": measured}


def side_impl(t: int, h: int, d: int, impl: str, repeats: int) -> dict[str, Any]:
    """A built-in implementation of the seam (``dense`` / ``chunked``), causal."""
    import jax
    import jax.numpy as jnp

    from jcompress.models import attention as A

    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, t, h, d), jnp.float32) for kk in ks)
    att = A.resolve(impl)
    mask = A.causal_mask(jnp.ones((1, t), bool))
    f = jax.jit(lambda q, k, v: att(q, k, v, mask, scale=d**-0.5))
    first, times, _ = time_calls(lambda: f(q, k, v), repeats, sync=jax.block_until_ready)
    return {"value": median(times), "first_s": first, "times_s": times}


def _row(ctx: Context, sparsity: float) -> dict[str, Any]:
    t, h, d = ctx.pick(full=FULL, quick=QUICK, dry=DRY)
    repeats = ctx.repeats(full=3, quick=2)
    ours = ctx.side(side_sparse, f"block-sparse XLA s={sparsity}", t=t, h=h, d=d,
                    sparsity=sparsity, repeats=repeats)  # fmt: skip
    fits, note = dense_fits(t, h)
    base = chunked = None
    if fits:
        base = ctx.side(side_impl, "dense XLA", t=t, h=h, d=d, impl="dense", repeats=repeats)
    if ctx.mode != "dry" or not fits:  # the dry run checks the harness only: two sides suffice
        chunked = ctx.side(side_impl, "chunked", t=t, h=h, d=d, impl="chunked", repeats=repeats)
    base = base or chunked
    chunked = chunked or base
    size = f"T={t}, H={h}, D={d}, 128x64 blocks, sparsity {ours['sparsity']:.2f}"
    return {
        "ours": ours,
        "baseline": base,
        "size": size + (f" ({note})" if note else ""),
        "info": {
            "baseline": "dense" if fits else "chunked",
            "chunked_s": chunked["value"],
            "speedup_vs_chunked": chunked["value"] / ours["value"],
            "sparsity": ours["sparsity"],
        },
    }


for _s in (0.25, 0.5, 0.75):

    def _fn(ctx: Context, _s: float = _s) -> dict[str, Any]:
        return _row(ctx, _s)

    register(
        f"sparge_xla_sparsity_{int(_s * 100):02d}",
        metric="s",
        higher_is_better=False,
        doc=f"SpargeAttn block-sparse XLA fallback at block sparsity ~{_s} vs dense XLA "
        "attention (chunked in info), causal, one sequence",
    )(_fn)


# --------------------------------------------------------------------------- Pallas on a GPU


def gpu_unavailable() -> str | None:
    """Why the compiled Pallas kernel cannot be timed here, or ``None`` when it can: jax has a
    GPU backend, the ``gpu`` extra (jax-triton) is installed, and the kernel compiles and runs
    on a tiny causal input (its output checked against the jnp reference)."""
    import importlib.util

    import jax

    backend = jax.default_backend()
    if backend != "gpu":
        return f"no GPU: jax's default backend is {backend}"
    if importlib.util.find_spec("jax_triton") is None:
        return "the gpu extra is not installed (pip install -e '.[gpu]': jax-triton)"
    import jax.numpy as jnp
    import numpy as np
    from jcompress.kernels import sparse_attention as K

    bs = K.BlockSizes(block_q=16, block_k=16)
    q, k, v, keep, _ = _inputs(64, 2, 16, 0.5, bs.block_q, bs.block_k)
    if not K.supports(q, k, v, block_sizes=bs):
        return "kernels.sparse_attention.supports() says no on this GPU"
    pv = jnp.full((2,), jnp.inf)
    try:
        out, _ = K.pallas_block_sparse(q, k, v, keep, pv, block_sizes=bs, scale=0.25)
        ref, _ = K.reference(q, k, v, keep, pv, block_k=bs.block_k, scale=0.25)
        err = float(np.max(np.abs(np.asarray(out) - np.asarray(ref))))
    except Exception as e:  # noqa: BLE001 - the reason is the row's message
        return f"the Pallas kernel failed on this GPU: {type(e).__name__}: {str(e).splitlines()[0]}"
    if not err < 1e-3:
        return f"the Pallas kernel disagrees with the reference on this GPU (max error {err:.3g})"
    return None


def side_pallas(t: int, h: int, d: int, sparsity: float, repeats: int) -> dict[str, Any]:
    """The compiled Pallas kernel (``kernels.sparse_attention.pallas_block_sparse``) on the GPU;
    never the XLA fallback (it refuses to run where :func:`supports` says no)."""
    import jax
    import jax.numpy as jnp
    from jcompress.kernels import sparse_attention as K

    bs = K.BlockSizes(block_q=128, block_k=64)
    q, k, v, keep, measured = _inputs(t, h, d, sparsity, bs.block_q, bs.block_k)
    if not K.supports(q, k, v, block_sizes=bs):
        raise BenchError(f"the Pallas kernel does not support T={t}, D={d} here")
    f = jax.jit(
        lambda q, k, v, keep: K.pallas_block_sparse(
            q, k, v, keep, jnp.full((h,), jnp.inf), block_sizes=bs, scale=d**-0.5
        )[0]
    )
    first, times, _ = time_calls(lambda: f(q, k, v, keep), repeats, sync=jax.block_until_ready)
    return {"value": median(times), "first_s": first, "times_s": times, "sparsity": measured,
            "device": str(jax.devices()[0])}  # fmt: skip


@register(
    "sparge_pallas_gpu",
    metric="s",
    higher_is_better=False,
    doc="SpargeAttn Pallas kernel (compiled, GPU) at block sparsity ~0.5 vs dense XLA attention "
    "on the same GPU, causal, one sequence; skipped (with the reason) without a GPU",
)
def sparge_pallas_gpu(ctx: Context) -> dict[str, Any]:
    t, h, d = ctx.pick(full=FULL, quick=QUICK, dry=DRY)
    size = f"T={t}, H={h}, D={d}, 128x64 blocks"
    reason = gpu_unavailable()
    if reason is not None:
        return {"skipped": reason, "size": size}
    repeats = ctx.repeats(full=5, quick=3)
    ours = ctx.side(side_pallas, "Pallas kernel (GPU)", t=t, h=h, d=d, sparsity=0.5,
                    repeats=repeats)  # fmt: skip
    base = ctx.side(side_impl, "dense XLA (GPU)", t=t, h=h, d=d, impl="dense", repeats=repeats)
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{size}, sparsity {ours['sparsity']:.2f}, {ours['device']}",
        "info": {"sparsity": ours["sparsity"], "device": ours["device"]},
    }


# --------------------------------------------------------------------------- tuning time


def _layer_data(n: int, seqlen: int, layer: int, block: int):
    """One llama-1m layer's captured q/k/v on WikiText-2 valid windows (not timed)."""
    import os
    from pathlib import Path

    import jcompress
    from jcompress.data import calibration_windows, load_tokenizer, load_tokens
    from jcompress.sparge import tune as T

    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    root = Path(os.environ.get("JCOMPRESS_SHARED_DATA", default))
    model = root / "models" / "llama-1m"
    cfg, params = jcompress.load_hf(model)
    ids = load_tokens(root / "wikitext-2" / "valid.txt", load_tokenizer(model))
    windows = calibration_windows(ids, n, seqlen, seed=0)
    for li, batches in T.layer_qkv(cfg, params, windows, batch_size=4):
        if li == layer:
            return cfg, T._LayerData(batches, block)
    raise AssertionError(layer)


def side_tune_layer(n: int, seqlen: int, grid: int, steps: int, vectorised: bool,
                    repeats: int) -> dict[str, Any]:  # fmt: skip
    """Tune one layer: every (grid point, head) pair of a bisection step in one jit call
    (``vectorised``), or one call per grid point (heads still batched): the shape of upstream's
    sequential loop over grid points."""
    import numpy as np

    from jcompress.sparge import tune as T

    cfg, data = _layer_data(n, seqlen, 1, 32)
    config = T.SpargeTuneConfig(nsamples=n, seqlen=seqlen, sim_grid=grid, cdf_steps=steps,
                                pv_steps=steps)  # fmt: skip

    def run():
        if vectorised:
            out, _ = T._tune_layer(data, cfg.num_heads, 1, config)
            return float(np.mean(out[T._KEY[config.objective]]))
        best = []
        for s in config.sim_values():
            one = _OneGrid(data, float(s))
            out, _ = T._tune_layer(one, cfg.num_heads, 1, config)
            best.append(np.asarray(out[T._KEY[config.objective]]))
        return float(np.mean(np.max(best, axis=0)))

    first, times, sparsity = time_calls(run, repeats)
    return {"value": median(times), "first_s": first, "times_s": times, "sparsity": sparsity}


class _OneGrid:
    """A _LayerData view that evaluates only one simthreshd1 value per call."""

    def __init__(self, data, sim: float):
        self.data, self.sim = data, sim

    def evaluate(self, sim, cdf, pv, block_q, block_k):
        import numpy as np

        r = self.data.evaluate(np.full_like(sim[:1], self.sim), cdf[:1], pv[:1], block_q,
                               block_k)  # fmt: skip
        return {k: np.repeat(v, sim.shape[0], axis=0) for k, v in r.items()}


@register(
    "sparge_tune_llama1m_layer",
    metric="s",
    higher_is_better=False,
    doc="SpargeAttn tuning of one llama-1m layer (8 heads): all grid points x heads per jit "
    "call vs one call per simthreshd1 grid point (upstream's sequential loop shape)",
)
def sparge_tune_llama1m_layer(ctx: Context) -> dict[str, Any]:
    n, seqlen, grid, steps = ctx.pick(full=(8, 512, 16, 10), quick=(4, 512, 8, 8),
                                      dry=(1, 64, 2, 2))  # fmt: skip
    repeats = ctx.repeats(full=2, quick=1)
    kw = dict(n=n, seqlen=seqlen, grid=grid, steps=steps, repeats=repeats)
    ours = ctx.side(side_tune_layer, "vectorised tuner", vectorised=True, **kw)
    base = ctx.side(side_tune_layer, "one grid point per call", vectorised=False, **kw)
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{n} x {seqlen} tokens, {2 * grid} grid points, {steps}+{steps} bisection steps",
        "info": {"sparsity_ours": ours["sparsity"], "sparsity_baseline": base["sparsity"]},
    }


# --------------------------------------------------------------------------- sparsity vs speed


def curve(ctx: Context, sparsities=CURVE_SPARSITIES) -> dict[str, Any]:
    """Block-sparse XLA time at each target sparsity, dense (when it fits) and chunked once, all
    at one size and in one run (one subprocess per side, as the rows)."""
    t, h, d = ctx.pick(full=FULL, quick=QUICK, dry=DRY)
    repeats = ctx.repeats(full=3, quick=2)
    points = []
    for sp in sparsities:
        r = ctx.side(side_sparse, f"block-sparse XLA s={sp}", t=t, h=h, d=d, sparsity=sp,
                     repeats=repeats)  # fmt: skip
        points.append({"target": sp, "sparsity": r["sparsity"], "s": r["value"],
                       "times_s": r["times_s"]})  # fmt: skip
    fits, note = dense_fits(t, h)
    base = {}
    if fits:
        base["dense"] = ctx.side(side_impl, "dense XLA", t=t, h=h, d=d, impl="dense",
                                 repeats=repeats)["value"]  # fmt: skip
    base["chunked"] = ctx.side(side_impl, "chunked", t=t, h=h, d=d, impl="chunked",
                               repeats=repeats)["value"]  # fmt: skip
    return {"mode": ctx.mode, "T": t, "H": h, "D": d, "block_q": 128, "block_k": 64,
            "repeats": repeats, "points": points, "baselines_s": base, "note": note}  # fmt: skip


def curve_from_results(doc: dict[str, Any]) -> dict[str, Any]:
    """The curve from the ``sparge_xla_sparsity_*`` rows of a ``python -m bench --out`` file."""
    rows = [r for n, r in sorted(doc.get("results", {}).items())
            if n.startswith("sparge_xla_sparsity_") and "error" not in r]  # fmt: skip
    if not rows:
        raise BenchError("--from: no sparge_xla_sparsity_* rows without errors in that file")
    points, base = [], {}
    for r in rows:
        info = r.get("info", {})
        points.append({"target": int(r["name"].rsplit("_", 1)[-1]) / 100,
                       "sparsity": info.get("sparsity"), "s": r["ours"],
                       "times_s": r["details"]["ours"].get("times_s")})  # fmt: skip
        base.setdefault(info.get("baseline", "dense"), []).append(r["baseline"])
        base.setdefault("chunked", []).append(info.get("chunked_s"))
    base_s = {k: median([x for x in v if x is not None]) for k, v in base.items()}
    return {"mode": doc.get("meta", {}).get("mode", "?"), "size": rows[0].get("size", ""),
            "points": points, "note": "", "baselines_s": base_s}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    """Time vs measured block sparsity (left) and speedup over each baseline (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(result["points"], key=lambda p: p["sparsity"])
    x = [p["sparsity"] for p in pts]
    y = [p["s"] for p in pts]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(x, y, "o-", label="block-sparse XLA (gathered kept tiles)")
    for (name, v), style in zip(result["baselines_s"].items(), ("--", ":"), strict=False):
        a.axhline(v, ls=style, color="gray" if name == "dense" else "black",
                  label=f"{name} XLA attention")  # fmt: skip
        b.plot(x, [v / t for t in y], "o-", label=f"vs {name}")
    b.axhline(1.0, color="gray", lw=0.8)
    a.set(xlabel="block sparsity (fraction of causally visible tiles skipped)",
          ylabel="seconds per call (median)", ylim=(0, None))  # fmt: skip
    b.set(xlabel="block sparsity", ylabel="speedup (baseline s / sparse s)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    size = result.get("size") or f"T={result['T']}, H={result['H']}, D={result['D']}"
    fig.suptitle(f"SpargeAttn XLA fallback, causal, {size} ({result['mode']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m bench.sparge", description=__doc__.split("\n")[0])
    ap.add_argument("--plot", required=True, metavar="DIR",
                    help="write sparge_speed.json and sparge_speed.png here")  # fmt: skip
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--dry-run", action="store_true")
    mode.add_argument(
        "--from",
        dest="source",
        metavar="RESULTS_JSON",
        help="plot the sparge rows of a `python -m bench --out` file (no timing)",
    )
    ap.add_argument("--sparsities", default=",".join(map(str, CURVE_SPARSITIES)))
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--overwrite", action="store_true")
    a = ap.parse_args(argv)

    from jcompress.atomic import atomic_dir
    from jcompress.errors import UserError
    from jcompress.outputs import check_output_dir

    try:
        sps = tuple(float(x) for x in a.sparsities.split(","))
        if not sps or not all(0 <= x < 1 for x in sps):
            raise ValueError
    except ValueError:
        print(f"--sparsities: comma-separated numbers in [0, 1), got {a.sparsities!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        inputs = {"--from": Path(a.source)} if a.source else None
        out = check_output_dir(a.plot, inputs=inputs, overwrite=a.overwrite, arg="--plot")
        if a.source:
            result = curve_from_results(json.loads(Path(a.source).read_text()))
        else:
            m = "dry" if a.dry_run else "quick" if a.quick else "full"
            with tempfile.TemporaryDirectory(prefix="jcompress-bench-sparge-") as tmp:
                ctx = Context("sparge_curve", m, Path(tmp), a.repeats, a.timeout)
                result = curve(ctx, sps)
        with atomic_dir(out, overwrite=a.overwrite, arg="--plot") as tmp:
            (tmp / "sparge_speed.json").write_text(json.dumps(result, indent=2) + "\n")
            plot(result, tmp / "sparge_speed.png")
    except (UserError, BenchError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in sorted(result["points"], key=lambda p: p["sparsity"]):
        log(f"sparsity {p['sparsity']:.2f}: {p['s']:.4g} s")
    log(f"baselines: {result['baselines_s']}; wrote {out}")
    return 0
