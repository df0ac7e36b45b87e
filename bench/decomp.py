"""The decomposition rows: HOOI (``jcompress.decomp.hooi``) vs TensorLy ``tucker`` and TT-SVD
(``jcompress.decomp.tensor_train``) vs TensorLy ``tensor_train``, both TensorLy sides on its
numpy backend, on the same tensor (rebuilt from a seed in each side's process), compile time
excluded (reported as the first call).

Heavy imports (jax, tensorly, jcompress) happen inside the side functions, in the process being
measured; the row functions only pass sizes.
"""

from __future__ import annotations

import gc
import os
from typing import Any

from bench.harness import Context, median, register, rss_mib, time_calls

GOAL_HOOI = ">= 5x faster than TensorLy tucker (ratio <= 0.2) at equal or lower error"


def _blas_env() -> dict[str, str | None]:
    """Thread settings that decide how LAPACK (numpy's, and jaxlib's CPU eigh / SVD / QR) runs:
    on a busy shared machine an unset ``OPENBLAS_NUM_THREADS`` slows both sides a lot."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")
    return {n: os.environ.get(n) for n in names}


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _tucker_tensor(shape: list[int], ranks: list[int], seed: int):
    """float32 ``[shape]``: a tensor of multilinear rank ``2 * ranks`` (core entries decaying
    along every axis) plus 5% Gaussian noise; the same in every process."""
    import numpy as np

    rng = np.random.default_rng([seed, 7])
    inner = [min(2 * r, n) for r, n in zip(ranks, shape, strict=True)]
    x = rng.standard_normal(inner)
    for m, n in enumerate(inner):
        x = x * np.geomspace(1.0, 0.1, n).reshape([-1 if k == m else 1 for k in range(len(inner))])
    for m, (n, r) in enumerate(zip(shape, inner, strict=True)):
        q, _ = np.linalg.qr(rng.standard_normal((n, r)))
        x = np.moveaxis(np.tensordot(x, q, axes=([m], [1])), -1, m)
    x /= np.linalg.norm(x)
    x += 0.05 * rng.standard_normal(shape) / np.sqrt(x.size)
    return x.astype(np.float32)


def _tt_tensor(shape: list[int], seed: int):
    """float32 Gaussian ``[shape]`` (the SVD cost does not depend on the spectrum)."""
    import numpy as np

    return np.random.default_rng([seed, 8]).standard_normal(shape).astype(np.float32)


def _rel(x, y) -> float:
    import numpy as np

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


# --------------------------------------------------------------------------- HOOI


def hooi_jax(
    shape: list[int], ranks: list[int], repeats: int, tol: float, seed: int = 0
) -> dict[str, Any]:
    """jcompress side: ``hooi_core`` (jit, HOSVD init, ``lax.while_loop`` stop), float32."""
    import jax
    import jax.numpy as jnp

    from jcompress.decomp import hooi_core

    jnp.zeros(()).block_until_ready()
    x = jnp.asarray(_tucker_tensor(shape, ranks, seed))
    base, load0 = rss_mib(), _loadavg()
    first, times, (t, info) = time_calls(
        lambda: hooi_core(x, tuple(ranks), tol=tol),
        repeats,
        sync=jax.block_until_ready,
        between=gc.collect,
    )
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "rel_error": _rel(x, t.materialize()),
        "n_iter": int(info.n_iter),
        "loadavg_1m": {"start": load0, "end": _loadavg()},
        "cpu_count": os.cpu_count(),
        "threads_env": _blas_env(),
        "base_rss_mib": base,
        "backend": jax.default_backend(),
    }


def hooi_tensorly(
    shape: list[int], ranks: list[int], repeats: int, tol: float, seed: int = 0
) -> dict[str, Any]:
    """Baseline side: ``tensorly.decomposition.tucker`` (numpy backend, ``init="svd"``, same
    ``tol``, ``n_iter_max=100``), float32 input."""
    import tensorly as tl
    from tensorly.decomposition import tucker

    tl.set_backend("numpy")
    x = _tucker_tensor(shape, ranks, seed)
    base, load0 = rss_mib(), _loadavg()
    first, times, out = time_calls(
        lambda: tucker(x, rank=list(ranks), init="svd", tol=tol, return_errors=True),
        repeats,
        between=gc.collect,
    )
    (core, factors), errors = out
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "rel_error": _rel(x, tl.tucker_to_tensor((core, factors))),
        "n_iter": len(errors),
        "loadavg_1m": {"start": load0, "end": _loadavg()},
        "cpu_count": os.cpu_count(),
        "threads_env": _blas_env(),
        "base_rss_mib": base,
        "tensorly": tl.__version__,
    }


@register(
    "hooi_64x64x144",
    metric="s",
    higher_is_better=False,
    doc="Tucker by HOOI, ranks [6, 6, 8], on a 64x64x144 tensor (a 768x768 weight reshaped, as "
    "in the Tucker-MPS reference): jcompress.decomp.hooi (jit) vs TensorLy tucker (numpy)",
)
def hooi_64x64x144(ctx: Context) -> dict[str, Any]:
    shape = ctx.pick(full=[64, 64, 144], quick=[64, 64, 144], dry=[8, 8, 16])
    ranks = ctx.pick(full=[6, 6, 8], quick=[6, 6, 8], dry=[2, 2, 3])
    kw = dict(shape=shape, ranks=ranks, repeats=ctx.repeats(full=10, quick=5), tol=1e-4)
    ours = ctx.side(hooi_jax, "jcompress hooi", **kw)
    base = ctx.side(hooi_tensorly, "tensorly tucker", **kw)
    speedup = base["value"] / ours["value"]
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{'x'.join(map(str, shape))} -> {ranks}",
        "info": {
            "rel_error": {"ours": ours["rel_error"], "baseline": base["rel_error"]},
            "n_iter": {"ours": ours["n_iter"], "baseline": base["n_iter"]},
            "speedup": speedup,
            "goal": GOAL_HOOI,
            "goal_met": speedup >= 5 and ours["rel_error"] <= base["rel_error"] * (1 + 1e-3),
        },
    }


# --------------------------------------------------------------------------- TT-SVD


def tt_jax(shape: list[int], ranks: list[int], repeats: int, seed: int = 0) -> dict[str, Any]:
    """jcompress side: ``tensor_train(x, ranks=...)`` (jit, static ranks), float32."""
    import jax
    import jax.numpy as jnp

    from jcompress.decomp import tensor_train

    jnp.zeros(()).block_until_ready()
    x = jnp.asarray(_tt_tensor(shape, seed))
    base, load0 = rss_mib(), _loadavg()
    first, times, tt = time_calls(
        lambda: tensor_train(x, ranks=tuple(ranks)),
        repeats,
        sync=jax.block_until_ready,
        between=gc.collect,
    )
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "rel_error": _rel(x, tt.materialize()),
        "ranks": list(tt.ranks),
        "loadavg_1m": {"start": load0, "end": _loadavg()},
        "cpu_count": os.cpu_count(),
        "threads_env": _blas_env(),
        "base_rss_mib": base,
        "backend": jax.default_backend(),
    }


def tt_tensorly(shape: list[int], ranks: list[int], repeats: int, seed: int = 0) -> dict[str, Any]:
    """Baseline side: ``tensorly.decomposition.tensor_train`` (numpy backend), float32 input."""
    import tensorly as tl
    from tensorly.decomposition import tensor_train

    tl.set_backend("numpy")
    x = _tt_tensor(shape, seed)
    base, load0 = rss_mib(), _loadavg()
    first, times, tt = time_calls(
        lambda: tensor_train(x, [1, *ranks, 1]), repeats, between=gc.collect
    )
    return {
        "value": median(times),
        "first_s": first,
        "times_s": times,
        "rel_error": _rel(x, tl.tt_to_tensor(tt)),
        "ranks": [int(c.shape[0]) for c in tt] + [1],
        "loadavg_1m": {"start": load0, "end": _loadavg()},
        "cpu_count": os.cpu_count(),
        "threads_env": _blas_env(),
        "base_rss_mib": base,
        "tensorly": tl.__version__,
    }


@register(
    "tt_svd_12x8x8x12x8x8",
    metric="s",
    higher_is_better=False,
    doc="TT-SVD at bond ranks <= 16 of a 768x768 weight's worth of numbers as a 6-way tensor: "
    "jcompress.decomp.tensor_train (jit, fixed ranks) vs TensorLy tensor_train (numpy)",
)
def tt_svd_12x8x8x12x8x8(ctx: Context) -> dict[str, Any]:
    shape = ctx.pick(full=[12, 8, 8, 12, 8, 8], quick=[12, 8, 8, 12, 8, 8], dry=[3, 4, 3, 4])
    cap = ctx.pick(full=16, quick=16, dry=3)
    ranks, r_prev = [], 1  # the bond ranks both sides use: min(cap, the largest possible)
    for k in range(len(shape) - 1):
        rest = 1
        for n in shape[k + 1 :]:
            rest *= n
        r_prev = min(cap, r_prev * shape[k], rest)
        ranks.append(r_prev)
    kw = dict(shape=shape, ranks=ranks, repeats=ctx.repeats(full=10, quick=5))
    ours = ctx.side(tt_jax, "jcompress tensor_train", **kw)
    base = ctx.side(tt_tensorly, "tensorly tensor_train", **kw)
    if ours["ranks"] != base["ranks"]:
        raise AssertionError(f"ranks differ: ours {ours['ranks']}, tensorly {base['ranks']}")
    if not ours["rel_error"] <= base["rel_error"] * (1 + 1e-4) + 1e-6:
        raise AssertionError(
            f"TT-SVD error above TensorLy's: {ours['rel_error']:.6g} > {base['rel_error']:.6g}"
        )
    return {
        "ours": ours,
        "baseline": base,
        "size": f"{'x'.join(map(str, shape))}, ranks {ranks}",
        "info": {
            "rel_error": {"ours": ours["rel_error"], "baseline": base["rel_error"]},
            "ranks": ours["ranks"],
            "speedup": base["value"] / ours["value"],
        },
    }
