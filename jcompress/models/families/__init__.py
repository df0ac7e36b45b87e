"""Registry of supported families: ``model_type`` -> ``FamilySpec``."""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from typing import Any

from jcompress.errors import UserError
from jcompress.models.config import ModelConfig
from jcompress.models.convert import FamilySpec, flatten
from jcompress.models.families import gpt2, llama, mpt, opt

SPECS: dict[str, FamilySpec] = {**llama.SPECS, **opt.SPECS, **gpt2.SPECS, **mpt.SPECS}
SUPPORTED = tuple(sorted(SPECS))

__all__ = [
    "SPECS",
    "SUPPORTED",
    "check_params_match",
    "config_from_hf",
    "expected_leaves",
    "spec_for",
]


def spec_for(model_type: str) -> FamilySpec:
    """The family spec for an HF ``model_type``; a clear error lists the supported ones."""
    try:
        return SPECS[model_type]
    except KeyError:
        raise UserError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED)}"
        ) from None


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """Parse an HF ``config.json`` dict into a :class:`ModelConfig`."""
    return spec_for(str(d.get("model_type"))).config_from_hf(d)


def expected_leaves(cfg: ModelConfig) -> Mapping[str, tuple[int, ...]]:
    """``{path: shape}`` of every param leaf ``cfg`` implies (the family table's pytree side;
    a typed compressed leaf stands for the dense array of that shape; read-only, cached)."""
    return _expected_leaves(cfg)


@functools.lru_cache(maxsize=64)
def _expected_leaves(cfg: ModelConfig) -> Mapping[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for rule, _, paths in spec_for(cfg.family.value).table(cfg):
        for path, shape in zip(paths, rule.jax_shapes(cfg), strict=True):
            out[path] = tuple(int(n) for n in shape)
    return types.MappingProxyType(out)


def check_params_match(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    *,
    arg: str = "params",
    layer: bool = False,
    partial: bool = False,
) -> None:
    """Raise a one-line :class:`UserError` unless ``params`` has every leaf ``cfg`` implies,
    each an array (or typed leaf) of the implied shape, plain arrays in a floating dtype.

    Host-side and cheap (shapes and dtypes only; tracers pass on the same terms), so the
    model code can call it before tracing: params of another model, a transposed kernel or
    integer weights otherwise fail deep inside JAX. ``layer=True`` checks one decoder
    layer's subtree (:func:`~jcompress.models.forward.layer_params`) instead. Extra leaves
    are not an error here (``save_hf`` refuses them: they have no HF tensor). ``partial=True``
    (a checkpoint of some leaves) lets leaves be missing, but not all of them.
    """
    import jax.numpy as jnp

    from jcompress.leaves import CompressedLeaf

    if not isinstance(params, Mapping):
        return  # check_params names the type
    want = expected_leaves(cfg)
    if layer:
        pre = f"{spec_for(cfg.family.value).layout.layers}/0/"
        want = {p[len(pre) :]: v for p, v in want.items() if p.startswith(pre)}
    flat = flatten(params)
    if partial and want and not any(p in flat for p in want):
        raise UserError(
            f"{arg}: has none of the leaves a {cfg.family.value} model of this config has "
            f"(e.g. {next(iter(want))}): params and config from different models?"
        )
    for path, shape in want.items():
        leaf = flat.get(path)
        if leaf is None and partial:
            continue
        if leaf is None:
            raise UserError(
                f"{arg}: missing leaf {path}, which a {cfg.family.value} model of this config "
                "has (params and config from different models?)"
            )
        if not isinstance(leaf, CompressedLeaf) and not (
            hasattr(leaf, "shape") and hasattr(leaf, "dtype")
        ):
            raise UserError(f"{arg}: leaf {path} is a {type(leaf).__name__}, not an array")
        if tuple(leaf.shape) != shape:
            raise UserError(
                f"{arg}: leaf {path} has shape {list(leaf.shape)}, config implies {list(shape)}"
            )
        if not isinstance(leaf, CompressedLeaf) and not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise UserError(
                f"{arg}: leaf {path} has dtype {leaf.dtype}; weights must be floating point"
            )
