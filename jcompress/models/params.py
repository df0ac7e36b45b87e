"""Param shapes from a config, and random initialisation (tests, benchmarks)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jcompress.leaf_io import StoreOnce, to_arrays
from jcompress.leaves import CompressedLeaf
from jcompress.models.config import ModelConfig
from jcompress.models.convert import flatten, unflatten
from jcompress.models.families import spec_for

__all__ = ["param_shapes", "init_params", "count_params", "count_stored_params"]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` for every leaf of the param pytree of ``cfg``."""
    out = {}
    for rule, _, paths in spec_for(cfg.family.value).table(cfg):
        out.update(zip(paths, rule.jax_shapes(cfg), strict=True))
    return out


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32, std: float = 0.02):
    """Random params: normal(std) for kernels and embeddings, ones for norm scales, zeros for
    biases. Returns the nested param dict."""
    flat = {}
    for n, (path, shape) in enumerate(sorted(param_shapes(cfg).items())):
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "scale":
            flat[path] = jnp.ones(shape, dtype)
        elif leaf == "bias":
            flat[path] = jnp.zeros(shape, dtype)
        else:
            flat[path] = (std * jax.random.normal(jax.random.fold_in(key, n), shape)).astype(dtype)
    return unflatten(flat)


def count_params(params: Any) -> int:
    """Number of scalars in a param pytree (typed leaves count their stored arrays)."""
    return int(sum(x.size for x in jax.tree.leaves(params)))


def count_stored_params(params: Any) -> int:
    """Number of scalars a factors checkpoint stores for ``params``.

    As :func:`count_params`, except that an array of a typed leaf equal (dtype, shape and
    bytes) to one of a typed leaf already counted counts once, as ``save_hf(...,
    factors=True)`` writes it once and links it: EigenAttention's K/Q basis shared by K and
    Q, V's basis and ``o_proj``'s folded copy of it, and the ``ut`` of each
    ``HeadLatentBias``. Dense arrays always count (the HF layout stores each of them).
    """
    once, total = StoreOnce(), 0
    for path, leaf in flatten(params).items():
        if not isinstance(leaf, CompressedLeaf):
            total += int(leaf.size)
            continue
        for field, arr in to_arrays(leaf, path)[0].items():
            if once.first(f"{path}/{field}", arr) is None:
                total += int(arr.size)
    return total
