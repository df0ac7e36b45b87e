"""Layer streaming: run ``ppl``, compression methods and per-layer analyses one decoder layer
at a time from a checkpoint's safetensors shards, with peak host memory ~ one layer plus the
calibration activations, resumably (:func:`stream_compress`, :func:`stream_perplexity`,
:func:`stream_analysis`, :class:`LayerLoader`)."""

from jcompress.streaming.analysis import AnalysisResult, stream_analysis, stream_layers_from
from jcompress.streaming.loader import GLOBAL, PICKED, LayerLoader, fingerprint, layer_of
from jcompress.streaming.ppl import stream_perplexity
from jcompress.streaming.run import MANIFEST, StreamReport, StreamResult, stream_compress

__all__ = [
    "AnalysisResult",
    "GLOBAL",
    "LayerLoader",
    "MANIFEST",
    "PICKED",
    "StreamReport",
    "StreamResult",
    "fingerprint",
    "layer_of",
    "stream_analysis",
    "stream_compress",
    "stream_layers_from",
    "stream_perplexity",
]
