"""jcompress: compress Hugging Face transformer checkpoints with pure JAX transforms.

A param pytree goes in, a compressed param pytree and a report come out::

    cfg, params = jcompress.load_hf("path/to/model")
    logits = jcompress.forward(cfg, params, input_ids)
    jcompress.save_hf(cfg, params, "out_dir", tokenizer_dir="path/to/model")
"""

from jcompress import calibration, checkpoint, methods, validate
from jcompress.compose import chain
from jcompress.errors import UserError
from jcompress.eval import PerplexityResult, perplexity
from jcompress.leaves import HeadLowRank, LowRank, Residual, materialize, register_leaf
from jcompress.models import (
    Capture,
    ModelConfig,
    apply_layer,
    attention,
    embed,
    forward,
    generate,
    init_params,
    layer_params,
    load_hf,
    save_hf,
    unembed,
)

__version__ = "0.1.0"

__all__ = [
    "attention",
    "calibration",
    "chain",
    "checkpoint",
    "methods",
    "Residual",
    "register_leaf",
    "Capture",
    "HeadLowRank",
    "LowRank",
    "ModelConfig",
    "UserError",
    "apply_layer",
    "embed",
    "forward",
    "generate",
    "init_params",
    "layer_params",
    "load_hf",
    "materialize",
    "perplexity",
    "PerplexityResult",
    "save_hf",
    "unembed",
    "validate",
]
