"""Models: HF checkpoint conversion, the JAX forward pass, KV-cache generation."""

from jcompress.models.config import Family, ModelConfig
from jcompress.models.families import SUPPORTED, config_from_hf
from jcompress.models.forward import (
    Capture,
    KVCache,
    apply_layer,
    embed,
    forward,
    init_cache,
    layer_params,
    unembed,
)
from jcompress.models.generate import generate
from jcompress.models.hf import load_hf, read_config, save_hf
from jcompress.models.params import count_params, count_stored_params, init_params, param_shapes

__all__ = [
    "SUPPORTED",
    "Capture",
    "Family",
    "KVCache",
    "ModelConfig",
    "apply_layer",
    "config_from_hf",
    "count_params",
    "count_stored_params",
    "embed",
    "forward",
    "generate",
    "init_cache",
    "init_params",
    "layer_params",
    "load_hf",
    "param_shapes",
    "read_config",
    "save_hf",
    "unembed",
]
