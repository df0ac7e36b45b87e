"""Calibration and evaluation windows over a token stream.

``calibration_windows`` follows the GPTQ / EigenAttention protocol: ``nsamples`` windows of
``seqlen`` tokens whose start is ``random.randint(0, N - seqlen - 1)`` under
``random.seed(seed)``. ``eval_windows`` cuts consecutive non-overlapping windows.
"""

from __future__ import annotations

import random

import numpy as np

from jcompress.errors import UserError

__all__ = ["calibration_windows", "eval_windows"]


def calibration_windows(ids: np.ndarray, nsamples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """``nsamples`` random windows ``[nsamples, seqlen]`` of ``ids`` (seeded, reproducible).

    Args:
      ids: ``[N]`` token ids of the calibration text.
      nsamples: number of windows (>= 1).
      seqlen: tokens per window (>= 2, < N).
      seed: seed of Python's ``random`` generator, as in the reference protocols.
    """
    ids = np.asarray(ids)
    if not isinstance(nsamples, int) or nsamples < 1:
        raise UserError(f"nsamples: must be a positive integer, got {nsamples!r}")
    if not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"seqlen: must be an integer >= 2, got {seqlen!r}")
    if ids.ndim != 1 or ids.shape[0] <= seqlen + 1:
        raise UserError(
            f"seqlen: {seqlen} needs a text longer than {seqlen + 1} tokens; got {ids.shape[0]}"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.shape[0] - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[s : s + seqlen] for s in starts])


def eval_windows(ids: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows ``[n, seqlen]``, ``n = N // seqlen`` capped at
    ``max_windows``. The tail shorter than ``seqlen`` is dropped."""
    ids = np.asarray(ids)
    if not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"seqlen: must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise UserError(f"max_windows: must be a positive integer, got {max_windows!r}")
    n = ids.shape[0] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"seqlen: {seqlen} is longer than the whole text ({ids.shape[0]} tokens)")
    return ids[: n * seqlen].reshape(n, seqlen)
