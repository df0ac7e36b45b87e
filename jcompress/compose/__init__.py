"""Chaining compression methods on one param pytree (issue #23, "Composition").

``jcompress.chain([...])`` composes registered methods (EigenAttention, Tucker / MPS, quant
apply, SpargeAttn tuning) into one pure ``params, cfg, calib -> (params, ChainReport)``; a
recipe file (JSON or YAML) lists the same steps for ``jcompress run RECIPE``. Before any step
runs, every step is checked on leaf types and shapes against what the steps before it leave
(:func:`preflight`), and every recipe field is validated into the method's frozen config.

Public API: :func:`chain`, :class:`Chain`, :class:`ChainReport`, :class:`Step`,
:func:`load_recipe`, :func:`parse_recipe`, :func:`preflight`, :func:`model_sizes`, and the
registry (:data:`REGISTRY`, :class:`Method`, :func:`register_method`, :class:`LeafInfo`).
"""

from jcompress.compose.chain import (
    Chain,
    ChainReport,
    Sizes,
    StepRecord,
    chain,
    model_sizes,
    preflight,
)
from jcompress.compose.recipe import Step, load_recipe, parse_recipe, step_to_json
from jcompress.compose.registry import (
    DENSE,
    NOT_CHAINABLE,
    REGISTRY,
    Kind,
    LeafInfo,
    Method,
    StepOutput,
    get_method,
    leaf_infos,
    register_method,
)

__all__ = [
    "DENSE",
    "NOT_CHAINABLE",
    "REGISTRY",
    "Chain",
    "ChainReport",
    "Kind",
    "LeafInfo",
    "Method",
    "Sizes",
    "Step",
    "StepOutput",
    "StepRecord",
    "chain",
    "get_method",
    "leaf_infos",
    "load_recipe",
    "model_sizes",
    "parse_recipe",
    "preflight",
    "register_method",
    "step_to_json",
]
