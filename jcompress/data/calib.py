"""Calibration and evaluation windows over a token stream.

``calibration_windows`` follows the GPTQ / EigenAttention protocol: ``nsamples`` windows of
``seqlen`` tokens whose start is ``random.randint(0, N - seqlen - 1)`` under
``random.seed(seed)``. ``eval_windows`` cuts consecutive non-overlapping windows.
"""

from __future__ import annotations

import random

import numpy as np

from jcompress.errors import UserError
from jcompress.validate import check_token_ids

__all__ = ["calibration_windows", "eval_windows"]


def calibration_windows(ids: np.ndarray, nsamples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """``nsamples`` random windows ``[nsamples, seqlen]`` of ``ids`` (seeded, reproducible).

    Starts are drawn with replacement from the ``N - seqlen`` positions
    ``0 .. N - seqlen - 1`` (the reference protocol). Asking for more windows than there are
    start positions guarantees repeated windows (and unbounded work for a fixed text), so
    ``nsamples > N - seqlen`` is an error: a text of ``N`` tokens supplies at most
    ``N - seqlen`` distinct windows.

    Args:
      ids: ``[N]`` integer token ids of the calibration text (>= 0).
      nsamples: number of windows, ``1 <= nsamples <= N - seqlen``.
      seqlen: tokens per window (>= 2, < N - 1).
      seed: seed of Python's ``random`` generator, as in the reference protocols.

    Raises:
      UserError: bad ids (float, negative, not 1-D), seqlen or nsamples.
    """
    ids = np.asarray(check_token_ids(ids, None, arg="ids", ndim=1))
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise UserError(f"nsamples: must be a positive integer, got {nsamples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"seqlen: must be an integer >= 2, got {seqlen!r}")
    if ids.shape[0] <= seqlen + 1:
        raise UserError(
            f"seqlen: {seqlen} needs a text longer than {seqlen + 1} tokens; got {ids.shape[0]}"
        )
    starts_available = ids.shape[0] - seqlen
    if nsamples > starts_available:
        raise UserError(
            f"nsamples: {nsamples} windows of {seqlen} tokens from a {ids.shape[0]}-token text; "
            f"allowed: at most {starts_available} (its distinct start positions)"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.shape[0] - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[s : s + seqlen] for s in starts])


def eval_windows(ids: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows ``[n, seqlen]``, ``n = N // seqlen`` capped at
    ``max_windows``. The tail shorter than ``seqlen`` is dropped. ``ids``: ``[N]`` integer
    token ids (>= 0)."""
    ids = np.asarray(check_token_ids(ids, None, arg="ids", ndim=1))
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"seqlen: must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise UserError(f"max_windows: must be a positive integer, got {max_windows!r}")
    n = ids.shape[0] // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(f"seqlen: {seqlen} is longer than the whole text ({ids.shape[0]} tokens)")
    return ids[: n * seqlen].reshape(n, seqlen)
