"""GED: contrast two conditions of activations with a generalized eigendecomposition,
"compress then separate" (PCA, shrinkage, ``S w = lambda R~ w``), with a permutation test,
held-out separation, per-layer tables and figures.

References:
  Cohen, "A tutorial on generalized eigendecomposition for denoising, contrast enhancement,
  and dimension reduction in multichannel electrophysiology", NeuroImage 247 (2022).
"""

from jcompress.ged.analyze import GEDAnalysis, analyze, stream_analyze
from jcompress.ged.capture import (
    HOOKS,
    POSITIONS,
    CaptureConfig,
    Hook,
    capture_activations,
    resolve_hook,
    stream_capture,
    tokenize_examples,
)
from jcompress.ged.config import LEDOIT_WOLF, GEDConfig
from jcompress.ged.data import (
    HER_FILE,
    HIM_FILE,
    PronounExample,
    load_condition_file,
    parse_marked,
)
from jcompress.ged.fit import (
    CVResult,
    GEDResult,
    LayerTable,
    cross_validate,
    fit,
    fit_layers,
    n_components_for_threshold,
    permutation_test,
)

__all__ = [
    "HOOKS",
    "POSITIONS",
    "CaptureConfig",
    "GEDAnalysis",
    "Hook",
    "analyze",
    "capture_activations",
    "parse_marked",
    "resolve_hook",
    "stream_analyze",
    "stream_capture",
    "tokenize_examples",
    "CVResult",
    "GEDConfig",
    "GEDResult",
    "HER_FILE",
    "HIM_FILE",
    "LEDOIT_WOLF",
    "LayerTable",
    "PronounExample",
    "cross_validate",
    "fit",
    "fit_layers",
    "load_condition_file",
    "n_components_for_threshold",
    "permutation_test",
]
