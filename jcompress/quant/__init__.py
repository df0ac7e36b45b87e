"""Quantization: exact block-scaled formats (FP4/NVFP4/MX/FP8/INT and the seed's minifloats),
fake quantization, quantized leaves.

Public API: :data:`FORMATS`, :class:`QuantSpec`, :func:`parse_spec`, :func:`parse_specs`,
:func:`fake_quant`, :func:`quantize`, :func:`dequantize` (see :mod:`jcompress.quant.formats`);
the typed leaf :class:`QuantizedArray` and :func:`quantize_leaf` (:mod:`jcompress.quant.leaves`).
"""

from jcompress.quant.formats import (
    FORMATS,
    Format,
    Quantized,
    QuantSpec,
    block_shape,
    dequantize,
    fake_quant,
    format_info,
    parse_spec,
    parse_specs,
    quantize,
    round_to_grid,
    scale_values,
    scales_shape,
)
from jcompress.quant.leaves import QuantizedArray, quantize_leaf

__all__ = [
    "FORMATS",
    "Format",
    "QuantSpec",
    "Quantized",
    "block_shape",
    "dequantize",
    "fake_quant",
    "format_info",
    "parse_spec",
    "parse_specs",
    "quantize",
    "round_to_grid",
    "scale_values",
    "scales_shape",
    "QuantizedArray",
    "quantize_leaf",
]
