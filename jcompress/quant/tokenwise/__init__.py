"""The tokenwise precision tool: layer-local output error of fake SVD/MPO-quantization.

``save_xy`` caches each measured linear's inputs and outputs on representative text;
``eval_grid`` (``eval_fake`` / ``eval_smooth``) measures ``X W~ + b`` against the cached
``Y`` for a grid of (rank, quantization spec) configurations, in the seed's JSON schema;
``write_rankings`` turns a result into Ranking-1 / Ranking-2 tables and a heatmap.
"""

from jcompress.quant.tokenwise.evaluate import (
    EvalConfig,
    GridMode,
    Smoothing,
    cfg_key,
    config_items,
    eval_grid,
    load_smoothed,
    open_smoothed,
    open_weights,
    parse_ranks,
)
from jcompress.quant.tokenwise.metrics import (
    METRIC_KEYS,
    tokenwise_metrics,
    tokenwise_metrics_quantized,
    tokenwise_metrics_split,
)
from jcompress.quant.tokenwise.rank import (
    load_result,
    ranking1,
    ranking2,
    validate_result,
    write_rankings,
)
from jcompress.quant.tokenwise.targets import Target, layer_targets, targets
from jcompress.quant.tokenwise.xy import (
    SaveXYConfig,
    XYCache,
    check_model_meta,
    default_texts,
    model_meta,
    representative_windows,
    save_xy,
    stream_save_xy,
)

__all__ = [
    "METRIC_KEYS",
    "EvalConfig",
    "GridMode",
    "SaveXYConfig",
    "Smoothing",
    "Target",
    "XYCache",
    "cfg_key",
    "check_model_meta",
    "config_items",
    "default_texts",
    "eval_grid",
    "layer_targets",
    "load_result",
    "load_smoothed",
    "model_meta",
    "open_smoothed",
    "open_weights",
    "parse_ranks",
    "ranking1",
    "ranking2",
    "representative_windows",
    "save_xy",
    "stream_save_xy",
    "targets",
    "tokenwise_metrics",
    "tokenwise_metrics_quantized",
    "tokenwise_metrics_split",
    "validate_result",
    "write_rankings",
]
