"""Data: text sources, tokenization, calibration and evaluation windows."""

from jcompress.data.calib import calibration_windows, eval_windows
from jcompress.data.text import load_tokenizer, load_tokens, read_text, tokenize

__all__ = [
    "calibration_windows",
    "eval_windows",
    "load_tokenizer",
    "load_tokens",
    "read_text",
    "tokenize",
]
