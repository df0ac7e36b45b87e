"""Calibration streaming shared by every compression method.

``stream`` runs calibration windows through a model layer by layer (batching, activations in
memory or offloaded, observers, replace-and-feed-next, output-error evaluation); ``gram``
accumulates per-head Gram matrices of (group-averaged) features in one jit step per batch.
See :mod:`jcompress.calibration.stream` for a worked example.
"""

from jcompress.calibration.gram import (
    GramState,
    GroupedGram,
    grouped_gram_init,
    grouped_gram_update,
    head_gram,
)
from jcompress.calibration.stream import (
    Activations,
    Batch,
    Feed,
    Observation,
    StreamLayer,
    batches,
    stream_layers,
)

__all__ = [
    "Activations",
    "Batch",
    "Feed",
    "GramState",
    "GroupedGram",
    "Observation",
    "StreamLayer",
    "batches",
    "grouped_gram_init",
    "grouped_gram_update",
    "head_gram",
    "stream_layers",
]
