"""Evaluation: perplexity."""

from jcompress.eval.perplexity import PerplexityResult, perplexity, window_nll

__all__ = ["PerplexityResult", "perplexity", "window_nll"]
