"""Evaluation: perplexity."""

from jcompress.eval.perplexity import PerplexityResult, check_seqlen, perplexity, window_nll

__all__ = ["PerplexityResult", "check_seqlen", "perplexity", "window_nll"]
