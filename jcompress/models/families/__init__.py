"""Registry of supported families: ``model_type`` -> ``FamilySpec``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jcompress.errors import UserError
from jcompress.models.config import ModelConfig
from jcompress.models.convert import FamilySpec
from jcompress.models.families import gpt2, llama, mpt, opt

SPECS: dict[str, FamilySpec] = {**llama.SPECS, **opt.SPECS, **gpt2.SPECS, **mpt.SPECS}
SUPPORTED = tuple(sorted(SPECS))

__all__ = ["SPECS", "SUPPORTED", "config_from_hf", "spec_for"]


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
