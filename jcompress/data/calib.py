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


def calibration_windows(
    ids: np.ndarray,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    *,
    nsamples_arg: str = "nsamples",
    seqlen_arg: str = "seqlen",
    text: str | None = None,
    limit: str = "starts",
) -> np.ndarray:
    """``nsamples`` random windows ``[nsamples, seqlen]`` of ``ids`` (seeded, reproducible).

    Starts are drawn with replacement from the ``N - seqlen`` positions
    ``0 .. N - seqlen - 1`` (the reference protocol). Asking for more windows than there are
    start positions guarantees repeated windows (and unbounded work for a fixed text), so
    ``nsamples > N - seqlen`` is an error: a text of ``N`` tokens supplies at most
    ``N - seqlen`` distinct windows (``limit="starts"``). ``limit="tokens"`` is stricter:
    the windows together may hold no more tokens than the text (``nsamples * seqlen <= N``),
    which keeps a command's work and memory within the size of the text it was given; the
    calibrating commands use it. The seed protocol of ``tokenwise save_xy`` oversamples its
    short shipped texts (50 windows of 128 from ~3.5K tokens), so it keeps ``"starts"``.

    Args:
      ids: ``[N]`` integer token ids of the calibration text (>= 0).
      nsamples: number of windows, ``1 <= nsamples <= N - seqlen`` (``nsamples * seqlen <=
        N`` with ``limit="tokens"``).
      seqlen: tokens per window (>= 2, < N - 1).
      seed: seed of Python's ``random`` generator, as in the reference protocols.
      nsamples_arg, seqlen_arg: the names the errors give the two counts; a command passes
        its flags (``"--nsamples"``, ``"--seqlen"``), so its user reads which flag to change.
      text: what the errors call the text, e.g. ``"--calib_data wiki.txt"``.
      limit: ``"starts"`` (``nsamples <= N - seqlen``) or ``"tokens"``
        (``nsamples * seqlen <= N``).

    Raises:
      UserError: bad ids (float, negative, not 1-D), seqlen or nsamples, as one line naming
        ``seqlen_arg`` / ``nsamples_arg``.
    """
    if limit not in ("starts", "tokens"):
        raise UserError(f"limit: must be 'starts' or 'tokens', got {limit!r}")
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise UserError(f"{nsamples_arg}: must be a positive integer, got {nsamples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"{seqlen_arg}: must be an integer >= 2, got {seqlen!r}")
    what = text or "the text"

    def too_short(n: int) -> UserError:
        return UserError(
            f"{seqlen_arg}: {seqlen}-token windows need a text longer than {seqlen + 1} tokens; "
            f"{what} has {n:,}"
        )

    if np.ndim(ids) == 1 and np.shape(ids)[0] == 0:  # an empty text is a short one
        raise too_short(0)
    ids = np.asarray(check_token_ids(ids, None, arg="ids", ndim=1))
    n = ids.shape[0]
    if n <= seqlen + 1:
        raise too_short(n)
    if limit == "tokens" and nsamples * seqlen > n:
        raise UserError(
            f"{nsamples_arg}: {nsamples} windows of {seqlen} tokens from {what} need "
            f"{nsamples * seqlen:,} tokens; it has {n:,} (allowed: at most {n // seqlen:,} "
            f"windows at {seqlen_arg} {seqlen})"
        )
    starts_available = n - seqlen
    if nsamples > starts_available:
        raise UserError(
            f"{nsamples_arg}: {nsamples} windows of {seqlen} tokens from {what} ({n:,} tokens); "
            f"allowed: at most {starts_available:,} (its distinct start positions at "
            f"{seqlen_arg} {seqlen})"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return np.stack([ids[s : s + seqlen] for s in starts])


def eval_windows(
    ids: np.ndarray,
    seqlen: int,
    max_windows: int | None = None,
    *,
    seqlen_arg: str = "seqlen",
    max_windows_arg: str = "max_windows",
    text: str | None = None,
) -> np.ndarray:
    """Consecutive non-overlapping windows ``[n, seqlen]``, ``n = N // seqlen`` capped at
    ``max_windows``. The tail shorter than ``seqlen`` is dropped.

    Args:
      ids: ``[N]`` integer token ids (>= 0), ``N >= seqlen``.
      seqlen: tokens per window (>= 2).
      max_windows: at most this many windows (the first ones), or ``None`` for all.
      seqlen_arg, max_windows_arg, text: what the errors call the two counts and the text
        (a command passes its flags, e.g. ``"--seqlen"`` and ``"--eval_data wiki.txt"``), as
        in :func:`calibration_windows`.

    Raises:
      UserError: bad ids, a bad count, or a text shorter than one window, as one line naming
        ``seqlen_arg`` / ``max_windows_arg``.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"{seqlen_arg}: must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and (
        isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1
    ):
        raise UserError(f"{max_windows_arg}: must be a positive integer, got {max_windows!r}")
    n = 0 if np.ndim(ids) == 1 and np.shape(ids)[0] == 0 else None  # empty: a short text
    if n is None:
        ids = np.asarray(check_token_ids(ids, None, arg="ids", ndim=1))
        n = ids.shape[0]
    if n < seqlen:
        raise UserError(
            f"{seqlen_arg}: {seqlen}-token windows need a text of at least {seqlen} tokens; "
            f"{text or 'the text'} has {n:,}"
        )
    n_win = n // seqlen if max_windows is None else min(n // seqlen, max_windows)
    return ids[: n_win * seqlen].reshape(n_win, seqlen)
