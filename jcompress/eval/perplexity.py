"""Perplexity under the protocol of ``shared/data/README.md``.

The whole text is tokenized, cut into ``n = N // L`` non-overlapping windows (capped at
``max_windows``); each window's loss is the mean NLL of its ``L - 1`` next-token predictions;
``ppl = exp(mean of window losses)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.calibration.stream import batches
from jcompress.data.calib import eval_windows
from jcompress.errors import UserError
from jcompress.models.config import ModelConfig, Position
from jcompress.models.forward import forward

__all__ = ["PerplexityResult", "check_seqlen", "perplexity", "window_nll"]


class PerplexityResult(NamedTuple):
    """``ppl = exp(mean_nll)``; ``nlls`` holds each window's mean NLL ``[n_windows]``."""

    ppl: float
    mean_nll: float
    n_windows: int
    seqlen: int
    nlls: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "ppl": self.ppl,
            "mean_nll": self.mean_nll,
            "n_windows": self.n_windows,
            "seqlen": self.seqlen,
        }


@functools.partial(jax.jit, static_argnames=("cfg",))
def window_nll(cfg: ModelConfig, params: Any, ids: jax.Array) -> jax.Array:
    """Mean next-token NLL of each window: ``ids [B, L] -> [B]`` (float32)."""
    logits = forward(cfg, params, ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(tok, axis=-1)


def check_seqlen(cfg: ModelConfig, seqlen: int) -> None:
    """Reject windows longer than a learned position table (cheap; call before loading)."""
    if cfg.position is Position.LEARNED and seqlen > cfg.max_position_embeddings:
        raise UserError(
            f"seqlen: {seqlen} exceeds the model's {cfg.max_position_embeddings} learned positions"
        )


def perplexity(
    cfg: ModelConfig,
    params: Any,
    ids: np.ndarray,
    *,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a token stream.

    Args:
      cfg, params: the model (dense or compressed).
      ids: ``[N]`` token ids of the whole evaluation text.
      seqlen: window length ``L``.
      max_windows: cap on the number of windows ``K`` (``None``: all).
      batch_size: windows per forward call (the last batch is padded with repeats, so one
        compilation serves every batch).
      progress: show a progress bar.

    Returns:
      :class:`PerplexityResult`.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size: must be a positive integer, got {batch_size!r}")
    check_seqlen(cfg, seqlen)
    windows = eval_windows(np.asarray(ids), seqlen, max_windows)
    n = windows.shape[0]
    nlls = []
    for b in tqdm(
        batches(windows, batch_size), desc=f"ppl L={seqlen}", disable=not progress, leave=False
    ):
        nlls.append(np.asarray(window_nll(cfg, params, jnp.asarray(b.ids)))[: b.real])
    nll = np.concatenate(nlls).astype(np.float64)
    mean = float(nll.mean())
    return PerplexityResult(math.exp(mean), mean, n, seqlen, nll)
