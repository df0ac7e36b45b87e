"""The quantization row: NVFP4 fake quantization of one weight, ``jcompress.quant.fake_quant``
(jit, float32) vs the same formula written in torch (float32, CPU), on the same matrix rebuilt
from a seed in each side's process, compile time excluded (reported as the first call). The
torch side's result is compared with ours in ``info`` (identical up to ties moved by torch's
division, which may differ from XLA's in the last ulp).

Heavy imports happen inside the side functions; the row function only passes sizes.
"""

from __future__ import annotations

import gc
from typing import Any

from bench.harness import Context, median, register, rss_mib, time_calls

GOAL = ">= 2x faster than the torch implementation of the same formula (ratio <= 0.5)"


def _weight(n_in: int, n_out: int, seed: int):
    import numpy as np

    return np.random.default_rng([seed, 20]).standard_normal((n_in, n_out)).astype(np.float32)


def nvfp4_jax(n_in: int, n_out: int, repeats: int, result: str, seed: int = 0) -> dict[str, Any]:
    """jcompress side: ``jcompress.quant.fake_quant(w, "nvfp4")`` (the jnp reference); its
    output is saved to ``result`` for the torch side's comparison."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcompress.quant import fake_quant, parse_spec

    spec = parse_spec("nvfp4")
    w = jnp.asarray(_weight(n_in, n_out, seed))
    base = rss_mib()
    first, times, out = time_calls(
        lambda: fake_quant(w, spec), repeats, sync=jax.block_until_ready, between=gc.collect
    )
    np.save(result, np.asarray(out))
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "base_rss_mib": base,
        "backend": jax.default_backend(),
    }


def _torch_nvfp4(w):
    """NVFP4 in torch: blocks of 16 along the input dimension (dim 0 of ``[in, out]``), E4M3
    block scales of ``amax_b / 6 / g``, ``g = amax / (6 * 448)``, E2M1 round-half-even."""
    import torch

    n_in, n_out = w.shape
    x = torch.nn.functional.pad(w, (0, 0, 0, (-n_in) % 16)).reshape(-1, 16, n_out)
    amax = x.abs().amax(dim=1, keepdim=True)
    g = w.abs().max() / (6 * 448)
    sb = torch.where(g > 0, amax / 6 / torch.where(g > 0, g, 1), 0)
    sb = sb.clamp(max=448).to(torch.float8_e4m3fn).to(torch.float32)
    s = sb * g
    y = torch.where(s > 0, x / torch.where(s > 0, s, 1), 0)
    a = y.abs().clamp(max=6.0)
    _, e = torch.frexp(a)
    e = torch.clamp(e - 1, min=0)
    q = torch.ldexp(torch.round(torch.ldexp(a, 1 - e)), e - 1).clamp(max=6.0)
    return (torch.copysign(q, y) * s).reshape(-1, n_out)[:n_in]


def nvfp4_torch(n_in: int, n_out: int, repeats: int, result: str, seed: int = 0) -> dict[str, Any]:
    """Baseline side: :func:`_torch_nvfp4` (float32, CPU, ``no_grad``)."""
    import numpy as np
    import torch

    w = torch.from_numpy(_weight(n_in, n_out, seed))
    base = rss_mib()
    with torch.no_grad():
        first, times, out = time_calls(lambda: _torch_nvfp4(w), repeats, between=gc.collect)
    ours = np.load(result)
    same = float(np.mean(out.numpy() == ours))
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "base_rss_mib": base,
        "equal_fraction": same,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


@register(
    "nvfp4_fake_quant_4096",
    metric="s",
    higher_is_better=False,
    doc="NVFP4 fake quantization (16-blocks, E4M3 scales, FP32 tensor scale) of a 4096x4096 "
    "float32 weight: jcompress.quant.fake_quant (jit) vs the same formula in torch (CPU)",
)
def nvfp4_fake_quant_4096(ctx: Context) -> dict[str, Any]:
    n = ctx.pick(full=4096, quick=2048, dry=64)
    kw = dict(
        n_in=n, n_out=n, repeats=ctx.repeats(full=10, quick=5), result=str(ctx.tmp / "ours.npy")
    )
    ours = ctx.side(nvfp4_jax, "jcompress fake_quant", **kw)
    base = ctx.side(nvfp4_torch, "torch nvfp4", **kw)
    speedup = base["value"] / ours["value"]
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{n}x{n}",
        "info": {
            "speedup": speedup,
            "equal_fraction": base["equal_fraction"],
            "goal": GOAL,
            "goal_met": speedup >= 2,
        },
    }
