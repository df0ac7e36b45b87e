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

from jcompress import sharding
from jcompress.calibration.stream import batches
from jcompress.data.calib import eval_windows
from jcompress.errors import UserError
from jcompress.models.attention import fit_to_devices, resolve
from jcompress.models.config import ModelConfig
from jcompress.models.forward import DEFAULT_ATTENTION, forward
from jcompress.validate import check_memory, check_params, check_positions, check_token_ids

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


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def window_nll(
    cfg: ModelConfig,
    params: Any,
    ids: jax.Array,
    attention: Any = DEFAULT_ATTENTION,
    attention_state: Any = None,
) -> jax.Array:
    """Mean next-token NLL of each window: ``ids [B, L] -> [B]`` (float32).
    ``attention_state``: a pytree of arrays for the attention implementation (traced, as
    for :func:`jcompress.forward`)."""
    logits = forward(cfg, params, ids, attention=attention, attention_state=attention_state)
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(tok, axis=-1)


def check_seqlen(
    cfg: ModelConfig,
    seqlen: int,
    *,
    allow_long: bool = False,
    override: str | None = "allow_long=True",
    arg: str = "seqlen",
) -> None:
    """Check the window length against the model's trained positions (cheap; call before
    loading the weights).

    A learned position table has ``max_position_embeddings`` rows: longer windows are an
    error. RoPE models run beyond the trained length but degrade: a ``UserWarning`` naming the
    trained length, unless ``allow_long=True``. ALiBi has no trained limit. ``arg`` names the
    setting in the messages (a CLI flag), ``override`` the switch that silences the warning
    (``None``: the caller has none).

    Raises:
      UserError: ``seqlen`` is not an integer >= 2, or exceeds learned positions.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise UserError(f"{arg}: must be an integer >= 2, got {seqlen!r}")
    check_positions(cfg, seqlen, arg=arg, allow_long=allow_long, warn=True, override=override)


def _check_batch_memory(
    cfg: ModelConfig, params: Any, batch: int, seqlen: int, attention: Any
) -> None:
    """Refuse up front a batch whose forward pass cannot fit (weights as held + activations,
    attention scores and logits; see :func:`jcompress.validate.estimate_forward_bytes`)."""
    leaves = jax.tree.leaves(params)
    floats = [x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
    check_memory(
        cfg,
        batch,
        seqlen,
        floats[0] if floats else None,
        attention=attention,
        weight_bytes=sum(int(x.size) * np.dtype(x.dtype).itemsize for x in leaves),
        arg="batch_size x seqlen",
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
    allow_long: bool = False,
    attention: Any = DEFAULT_ATTENTION,
    mesh: Any = None,
    attention_state: Any = None,
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
      allow_long: run a RoPE model beyond its trained positions without a warning.
      attention: attention implementation (as for :func:`jcompress.forward`).
      mesh: a :class:`jax.sharding.Mesh` (:func:`jcompress.sharding.make_mesh`): params
        sharded over ``model``, windows over ``data`` (default: the one of an enclosing
        :func:`jcompress.sharding.use_mesh`, else one device).
      attention_state: its state, e.g. tuned :class:`jcompress.sparge.SpargeParams` for
        ``attention="block_sparse"`` (as for :func:`jcompress.forward`; traced, so new
        thresholds reuse the compiled function).

    Returns:
      :class:`PerplexityResult`.

    Raises:
      UserError: bad ``params`` / ``ids`` (not 1-D integers in ``[0, vocab_size)``),
        ``seqlen`` (see :func:`check_seqlen`), ``batch_size``, ``max_windows``, or a batch whose
        forward pass cannot fit in memory (checked before the first batch).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size: must be a positive integer, got {batch_size!r}")
    check_params(params)
    check_seqlen(cfg, seqlen, allow_long=allow_long)
    ids = np.asarray(check_token_ids(ids, cfg.vocab_size, arg="ids", ndim=1))
    windows = eval_windows(ids, seqlen, max_windows)
    mesh = sharding.current_mesh() if mesh is None else mesh
    attention = fit_to_devices(resolve(attention), params, mesh=mesh)
    _check_batch_memory(cfg, params, min(batch_size, windows.shape[0]), seqlen, attention)
    params = sharding.shard_params(params, cfg, mesh)
    nlls = []
    # fewer windows than the data axis: one batch padded to a multiple of it
    bl = batches(windows, batch_size, multiple=sharding.data_size(mesh))
    for b in tqdm(bl, desc=f"ppl L={seqlen}", disable=not progress, leave=False):
        ids_b = sharding.place_batch(b.ids, mesh)
        nll = window_nll(cfg, params, ids_b, attention, attention_state)
        nlls.append(sharding.to_host(nll)[: b.real])
    return result_of(np.concatenate(nlls), seqlen)


def result_of(nll: np.ndarray, seqlen: int) -> PerplexityResult:
    """The :class:`PerplexityResult` of per-window NLLs. A non-finite NLL (weights that are
    finite but overflow float32 in the forward pass) is an error naming the first such
    window, never a NaN perplexity."""
    nll = np.asarray(nll, np.float64)
    bad = np.flatnonzero(~np.isfinite(nll))
    if bad.size:
        raise UserError(
            f"perplexity: window {int(bad[0])} of {nll.shape[0]}: the forward pass gives "
            "non-finite logits (the weights overflow float32 somewhere)"
        )
    mean = float(nll.mean())
    return PerplexityResult(math.exp(mean), mean, int(nll.shape[0]), seqlen, nll)
