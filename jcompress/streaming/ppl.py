"""Perplexity with one decoder layer in memory at a time (the shared/data protocol).

Every evaluation window is embedded once; then layer ``i`` is read from the checkpoint,
applied to every window's hidden states (held in memory or in an ``offload_dir`` file,
:class:`jcompress.calibration.Activations`), and dropped before layer ``i + 1`` is read; the
final norm and head give each window's mean next-token NLL. The numbers are those of
:func:`jcompress.perplexity` (same windows, same batches, the same layer function).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress.calibration.stream import Activations, batches
from jcompress.data.calib import eval_windows
from jcompress.errors import UserError
from jcompress.eval.perplexity import PerplexityResult, check_seqlen, result_of
from jcompress.models.attention import resolve
from jcompress.models.config import ModelConfig
from jcompress.models.convert import get_path, unflatten
from jcompress.models.families import spec_for
from jcompress.models.forward import DEFAULT_ATTENTION, apply_layer, embed, unembed
from jcompress.streaming.loader import LayerLoader
from jcompress.validate import check_token_ids

__all__ = ["stream_perplexity"]


@functools.partial(jax.jit, static_argnames=("cfg",))
def _head_nll(cfg: ModelConfig, gparams: Any, h: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token NLL per window from the last layer's outputs ``h [B, L, H]``."""
    logits = unembed(cfg, gparams, h).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(tok, axis=-1)


def stream_perplexity(
    model: str | os.PathLike | LayerLoader,
    ids: np.ndarray,
    *,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 8,
    offload_dir: str | os.PathLike | None = None,
    dtype: Any = None,
    progress: bool = True,
    allow_long: bool = False,
    attention: Any = DEFAULT_ATTENTION,
    attention_state: Any = None,
) -> PerplexityResult:
    """Perplexity of a token stream, reading the checkpoint one decoder layer at a time.

    Args:
      model: checkpoint directory (safetensors, possibly sharded or in the factor form), or
        a :class:`LayerLoader` (its account shows what was held).
      ids: ``[N]`` token ids of the whole evaluation text.
      seqlen, max_windows, batch_size, allow_long, attention, attention_state: as for
        :func:`jcompress.perplexity` (the state, e.g. tuned
        :class:`jcompress.sparge.SpargeParams` for ``attention="block_sparse"``, is indexed
        by layer, as in the in-memory forward pass).
      offload_dir: keep the windows' hidden states ``[n, seqlen, hidden]`` in a temporary
        file in this directory instead of memory.
      dtype: load dtype (as :func:`jcompress.load_hf`); ignored when ``model`` is a loader.
      progress: a progress bar over layers.

    Returns:
      :class:`jcompress.eval.PerplexityResult`.

    Raises:
      UserError: as :func:`jcompress.perplexity`, and a checkpoint the loader refuses
        (missing shard, corrupt header, missing tensor), before any layer is read.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if offload_dir is not None and not os.path.isdir(offload_dir):
        raise UserError(f"offload_dir: {offload_dir} is not a directory")
    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    cfg = loader.cfg
    check_seqlen(cfg, seqlen, allow_long=allow_long)
    ids = np.asarray(check_token_ids(ids, cfg.vocab_size, arg="ids", ndim=1))
    windows = eval_windows(ids, seqlen, max_windows)
    impl, state = resolve(attention), attention_state
    bl = batches(windows, batch_size)
    hidden = Activations(len(bl), None if offload_dir is None else str(offload_dir))
    root = spec_for(cfg.family.value).layout.layers
    try:
        g = unflatten(loader.globals(loader.embed_modules()))
        for b, batch in enumerate(bl):
            hidden.put(b, embed(cfg, g, jnp.asarray(batch.ids)))
        del g
        loader.release(-1)
        bar = tqdm(range(cfg.num_layers), desc="ppl (streamed)", disable=not progress, leave=False)
        for i in bar:
            lp = get_path(unflatten(loader.layer(i)), f"{root}/{i}")
            for b in range(len(bl)):  # in place: batch b is read before it is written
                out = apply_layer(cfg, lp, hidden.get(b), i, attention=impl, attention_state=state)
                hidden.put(b, out)
            del lp
            loader.release(i)
        g = unflatten(loader.globals(loader.head_modules()))
        nlls = [
            np.asarray(_head_nll(cfg, g, hidden.get(b), jnp.asarray(batch.ids)))[: batch.real]
            for b, batch in enumerate(bl)
        ]
        del g
        loader.release(-1)
    finally:
        hidden.close()
    return result_of(np.concatenate(nlls), seqlen)
