"""Shared helpers for the family tables."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from jcompress.errors import UserError
from jcompress.models.config import ModelConfig
from jcompress.models.convert import IDENTITY, LINEAR, Rule

Pred = Callable[[ModelConfig], bool]
ShapeFn = Callable[[ModelConfig], tuple[int, ...]]


def always(cfg: ModelConfig) -> bool:
    return True


def untied(cfg: ModelConfig) -> bool:
    return not cfg.tie_word_embeddings


def linear(hf: str, jx: str, shape: ShapeFn, *, when: Pred = always, bias: Pred | None = None):
    """Rules for an nn.Linear ``hf`` (``[out, in]`` weight) -> Flax ``jx/kernel`` (+ bias)."""
    rules = [Rule(f"{hf}.weight", (f"{jx}/kernel",), LINEAR, shape, when)]
    if bias is not None:
        rules.append(
            Rule(
                f"{hf}.bias",
                (f"{jx}/bias",),
                IDENTITY,
                lambda c: (shape(c)[0],),
                lambda c: when(c) and bias(c),
            )
        )
    return rules


def norm(
    hf: str, jx: str, size: Callable[[ModelConfig], int], *, when: Pred = always, bias: bool = False
):
    """Rules for a norm ``hf`` (weight [+ bias]) -> ``jx/scale`` [+ ``jx/bias``]."""
    rules = [Rule(f"{hf}.weight", (f"{jx}/scale",), IDENTITY, lambda c: (size(c),), when)]
    if bias:
        rules.append(Rule(f"{hf}.bias", (f"{jx}/bias",), IDENTITY, lambda c: (size(c),), when))
    return rules


def require(d: Mapping[str, Any], key: str, model_type: str) -> Any:
    if key not in d or d[key] is None:
        raise UserError(f"config.json ({model_type}): missing required field {key!r}")
    return d[key]


def rope_from_hf(d: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """Read RoPE settings from either the ``rope_parameters`` (transformers >= 5) or the older
    ``rope_theta`` + ``rope_scaling`` style. Returns ``(theta, scaling items or None)``."""
    params = d.get("rope_parameters")
    if (
        isinstance(params, Mapping)
        and "rope_theta" not in params
        and params
        and all(isinstance(v, Mapping) for v in params.values())
    ):
        raise UserError("config.json: per-layer-type rope_parameters are not supported")
    if isinstance(params, Mapping) and params:
        theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(d.get("rope_theta", 10000.0))
        scaling = dict(d.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, tuple(sorted((k, _freeze(v)) for k, v in scaling.items()))


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(v)
    return v


def special_ids(d: Mapping[str, Any]) -> dict[str, int | None]:
    def one(v):
        if isinstance(v, list):
            return int(v[0]) if v else None
        return None if v is None else int(v)

    return {k: one(d.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
