"""Shared helpers for the family tables."""

from __future__ import annotations

import math
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


_REQUIRED: Any = object()


def require(d: Mapping[str, Any], key: str, model_type: str) -> Any:
    if key not in d or d[key] is None:
        raise UserError(f"config.json ({model_type}): missing required field {key!r}")
    return d[key]


def _get(d: Mapping[str, Any], key: str, model_type: str, default: Any) -> Any:
    if default is _REQUIRED:
        return require(d, key, model_type)
    v = d.get(key)
    return default if v is None else v


def get_int(
    d: Mapping[str, Any], key: str, model_type: str, default: Any = _REQUIRED, *, minimum: int = 1
) -> int:
    """Field ``key`` as an int >= ``minimum``: a JSON integer, not a string, bool or float
    (``"128"`` and ``128.5`` are errors, as is ``true``). ``default`` when absent or null."""
    v = _get(d, key, model_type, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(
            f"config.json ({model_type}): {key} must be an integer, got {v!r} ({type(v).__name__})"
        )
    if v < minimum:
        raise UserError(f"config.json ({model_type}): {key} must be >= {minimum}, got {v}")
    return v


def get_float(d: Mapping[str, Any], key: str, model_type: str, default: Any = _REQUIRED) -> float:
    """Field ``key`` as a finite positive float (a JSON number, not a string or bool; NaN /
    Infinity, zero and negative values are errors). ``default`` when absent or null."""
    v = _get(d, key, model_type, default)
    return positive_float(v, f"config.json ({model_type}): {key}")


def positive_float(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UserError(f"{where} must be a number, got {v!r} ({type(v).__name__})")
    f = float(v)
    if not math.isfinite(f) or f <= 0:
        raise UserError(f"{where} must be a finite number > 0, got {v!r}")
    return f


def get_bool(d: Mapping[str, Any], key: str, model_type: str, default: bool) -> bool:
    """Field ``key`` as a JSON boolean (``"false"`` is an error, not ``True``)."""
    v = _get(d, key, model_type, default)
    if not isinstance(v, bool):
        raise UserError(f"config.json ({model_type}): {key} must be true or false, got {v!r}")
    return v


def get_str(d: Mapping[str, Any], key: str, model_type: str, default: str) -> str:
    v = _get(d, key, model_type, default)
    if not isinstance(v, str):
        raise UserError(f"config.json ({model_type}): {key} must be a string, got {v!r}")
    return v


def get_dict(d: Mapping[str, Any], key: str, model_type: str) -> dict[str, Any]:
    v = d.get(key) or {}
    if not isinstance(v, Mapping):
        raise UserError(f"config.json ({model_type}): {key} must be an object, got {v!r}")
    return dict(v)


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
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        raw = d.get("rope_scaling") or {}
        if not isinstance(raw, Mapping):
            raise UserError(f"config.json: rope_scaling must be an object, got {raw!r}")
        scaling = dict(raw)
    theta = positive_float(theta, "config.json: rope_theta")
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if scaling.get(k) is not None:
            positive_float(scaling[k], f"config.json: rope_scaling.{k}")
    if scaling.get("original_max_position_embeddings") is not None:
        get_int(scaling, "original_max_position_embeddings", "rope_scaling")
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
    def one(k, v):
        if isinstance(v, list):
            v = v[0] if v else None
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"config.json: {k} must be a token id (an integer), got {v!r}")
        return v

    return {k: one(k, d.get(k)) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
