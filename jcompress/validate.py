"""Host-side checks of caller input: one line naming the argument, before any number is made.

Every check raises :class:`jcompress.errors.UserError` with one line
``<arg>: <what is wrong>; <what is allowed>``. They are cheap: a few shape/dtype comparisons
and at most a couple of reductions (``min`` / ``max``) over a concrete array. Given a JAX
tracer (inside ``jit``), the value checks are skipped and only shape/dtype checks apply.

Public signatures (``forward`` / ``generate`` / ``perplexity`` call these)::

    check_token_ids(ids, vocab_size, *, arg="input_ids", ndim=2, mask=None)
            -> np.ndarray | jax.Array
        integer dtype (not float/bool), rank ``ndim``, non-empty, every id in
        [0, vocab_size) (vocab_size=None: only >= 0); with a concrete ``mask`` (same
        shape, 0/1) only ids where mask is 1 are range-checked (a masked pad slot may hold
        any id). A list/tuple becomes an np.ndarray when it converts cleanly; a numpy or
        JAX array (or tracer) is returned unchanged.
    check_attention_mask(mask, ids_shape, *, arg="attention_mask") -> same type as mask
        None passes through; else shape == ids_shape, bool or integer 0/1, every row with at
        least one 1.
    check_params(params, *, arg="params") -> None
        a non-empty dict (Mapping) of arrays / typed leaves, as load_hf / init_params return.
    check_tokenizer(cfg, tok) -> None
        len(tok) <= cfg.vocab_size.
    check_finite(x, name, *, hint="") -> None
        no NaN / Inf in a floating array (numpy or concrete JAX); shared by load_hf and
        checkpoint.restore.
    check_params_finite(params, *, arg="params") -> None
        check_finite on every array of a param tree (typed leaves' children too): what
        save_hf / checkpoint.save write must load again.
    check_positions(cfg, length, *, arg, allow_long=False, warn=False) -> None
        length within the model's trained positions (learned: always an error; RoPE: an
        error, or a warning with warn=True, unless allow_long).
    estimate_forward_bytes(cfg, batch, seqlen, dtype=None, *, attention="dense",
                           weight_bytes=None) -> int
    available_memory() -> int | None
    check_memory(cfg, batch, seqlen, dtype=None, *, attention="dense", weight_bytes=None,
                 available=None, arg="seqlen") -> None
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError

__all__ = [
    "NonFiniteInput",
    "available_memory",
    "check_attention_mask",
    "check_finite",
    "check_params_finite",
    "check_memory",
    "check_params",
    "check_positions",
    "check_token_ids",
    "check_tokenizer",
    "estimate_forward_bytes",
]


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_array(x: Any, arg: str) -> Any:
    """numpy / JAX arrays as they are; anything else through ``np.asarray`` (cleanly)."""
    if isinstance(x, (np.ndarray, jax.Array)) or _is_tracer(x):
        return x
    if x is None or isinstance(x, (str, bytes, Mapping)):
        raise UserError(f"{arg}: expected an integer array, got {type(x).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.VisibleDeprecationWarning)
            out = np.asarray(x)
    except (ValueError, TypeError, OverflowError, np.exceptions.VisibleDeprecationWarning):
        raise UserError(
            f"{arg}: cannot be converted to an array (ragged or mixed values); "
            "give an integer array of equal-length rows"
        ) from None
    if out.dtype == object:
        raise UserError(
            f"{arg}: cannot be converted to an integer array (ragged or non-numeric values)"
        )
    return out


@jax.jit
def _device_minmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # one program per shape/dtype (two eager reductions would compile two)
    return jnp.min(x), jnp.max(x)


@jax.jit
def _device_all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def _minmax(x: Any) -> tuple[Any, Any]:
    if isinstance(x, np.ndarray):
        with np.errstate(invalid="ignore"):
            return x.min(), x.max()
    return jax.device_get(_device_minmax(x))


def check_token_ids(
    ids: Any,
    vocab_size: int | None,
    *,
    arg: str = "input_ids",
    ndim: int = 2,
    mask: Any = None,
) -> Any:
    """Check token ids before they index an embedding table (which would clip silently).

    Args:
      ids: ``[B, T]`` (``ndim=2``) or ``[N]`` (``ndim=1``) integer ids: numpy, JAX (a tracer
        gets the shape/dtype checks only), or a list that converts cleanly.
      vocab_size: ids must be ``< vocab_size``; ``None`` checks only ``>= 0``.
      arg: the argument name used in the error.
      ndim: the expected rank.
      mask: optional 0/1 array of ``ids``' shape (checked with :func:`check_attention_mask`);
        ids where it is 0 are not range-checked.

    Returns:
      ``ids`` (a list/tuple converted to ``np.ndarray``).

    Raises:
      UserError: wrong type, dtype (float, bool), rank, empty, or an id out of range.
    """
    x = _as_array(ids, arg)
    if x.ndim != ndim:
        want = "[batch, length]" if ndim == 2 else "[length]" if ndim == 1 else f"{ndim}-D"
        raise UserError(f"{arg}: expected a {want} array, got shape {tuple(x.shape)}")
    if x.size == 0:
        raise UserError(f"{arg}: is empty (shape {tuple(x.shape)}); give at least one token")
    dt = np.dtype(x.dtype)
    if dt == np.bool_ or not np.issubdtype(dt, np.integer):
        raise UserError(f"{arg}: dtype {dt} is not an integer dtype; token ids must be integers")
    if mask is not None:
        mask = check_attention_mask(mask, x.shape)
    if _is_tracer(x) or (mask is not None and _is_tracer(mask)):
        return ids
    where, vals = "", x
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        if not keep.any():
            return x if not isinstance(ids, (np.ndarray, jax.Array)) else ids
        vals = np.asarray(x)[keep]
        where = " where attention_mask is 1"
    lo, hi = _minmax(vals)
    if int(lo) < 0 or (vocab_size is not None and int(hi) >= vocab_size):
        bad = int(lo) if int(lo) < 0 else int(hi)
        allowed = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise UserError(f"{arg}: token ids must lie in {allowed}{where}; found {bad}")
    return x if not isinstance(ids, (np.ndarray, jax.Array)) else ids


def check_attention_mask(
    mask: Any, ids_shape: Sequence[int], *, arg: str = "attention_mask"
) -> Any:
    """Check a 0/1 attention mask against the ids it goes with.

    Args:
      mask: ``None`` (passed through) or a ``[B, T]`` bool / integer 0/1 array.
      ids_shape: the shape of the token ids.
      arg: the argument name used in the error.

    Returns:
      ``mask`` (a list/tuple converted to ``np.ndarray``).

    Raises:
      UserError: wrong shape, a float dtype, values other than 0/1, a row with no 1.
    """
    if mask is None:
        return None
    m = _as_array(mask, arg)
    if tuple(m.shape) != tuple(ids_shape):
        raise UserError(
            f"{arg}: shape {tuple(m.shape)} does not match the token ids {tuple(ids_shape)}"
        )
    dt = np.dtype(m.dtype)
    if not (dt == np.bool_ or np.issubdtype(dt, np.integer)):
        raise UserError(f"{arg}: dtype {dt} is not allowed; use bool or integer 0/1")
    if _is_tracer(m) or m.size == 0:
        return mask
    if dt != np.bool_:
        lo, hi = _minmax(m)
        if int(lo) < 0 or int(hi) > 1:
            raise UserError(f"{arg}: values must be 0 or 1, found {int(lo) if lo < 0 else hi}")
    rows = np.asarray(m).reshape(-1, m.shape[-1]).any(axis=-1) if m.ndim else np.asarray(m)
    if not bool(np.all(rows)):
        raise UserError(f"{arg}: row {int(np.argmin(rows))} masks every token; keep at least one")
    return m if not isinstance(mask, (np.ndarray, jax.Array)) else mask


def check_params(params: Any, *, arg: str = "params") -> None:
    """``params`` must be the nested dict ``load_hf`` / ``init_params`` return (non-empty)."""
    if not isinstance(params, Mapping):
        raise UserError(
            f"{arg}: expected the nested dict of arrays from load_hf / init_params, got "
            f"{type(params).__name__}"
        )
    if not params:
        raise UserError(f"{arg}: is an empty dict; expected the model's nested dict of arrays")


def check_tokenizer(cfg: Any, tok: Any) -> None:
    """The tokenizer must not produce ids the model has no embedding for."""
    n = len(tok)
    if n > cfg.vocab_size:
        raise UserError(
            f"tokenizer: its vocabulary has {n} tokens, more than the model's vocab_size "
            f"{cfg.vocab_size}; use the tokenizer the model was trained with"
        )


class NonFiniteInput(UserError):
    """Broken input: NaN / Inf in weights or in the activations they produce. Rerunning the
    same input fails the same way, so a resumable run drops the work directory it made."""


def check_finite(x: Any, name: str, *, hint: str = "") -> None:
    """Raise if the floating array ``x`` holds NaN or Inf (one reduction, no copies).

    Integer and bool arrays, tracers and empty arrays pass. Used by ``load_hf`` and
    ``checkpoint.restore`` on every tensor as it is read. On device it reduces
    ``isfinite`` rather than taking min / max: XLA:CPU's float min / max reductions (jax
    0.10) skip NaN on arrays of 16K elements and more.
    """
    if _is_tracer(x) or not hasattr(x, "dtype") or getattr(x, "size", 0) == 0:
        return
    if not jnp.issubdtype(np.dtype(x.dtype), jnp.floating):
        return
    if isinstance(x, np.ndarray):
        lo, hi = _minmax(x)
        if math.isfinite(float(lo)) and math.isfinite(float(hi)):
            return
    elif bool(jax.device_get(_device_all_finite(x))):
        return
    arr = np.asarray(x)
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    tail = f"; {hint}" if hint else ""
    raise NonFiniteInput(f"{name}: {bad} of {arr.size} values are NaN or Inf{tail}")


def check_params_finite(params: Any, *, arg: str = "params") -> None:
    """:func:`check_finite` on every array of ``params``, and every typed leaf rebuilt as the
    loaders rebuild it (:func:`jcompress.leaf_io.from_arrays`: its own checks, e.g. MX scales
    whose ``0xFF`` NaN code is an integer): what a save writes must load again (``load_hf``
    and ``checkpoint.restore`` refuse NaN / Inf weights)."""
    from jcompress.leaf_io import from_arrays, to_arrays
    from jcompress.leaves import CompressedLeaf

    hint = "refusing to save broken weights"

    def visit(x: Any, name: str) -> None:
        if isinstance(x, Mapping):
            for k, v in x.items():
                visit(v, f"{name}/{k}" if name else str(k))
        elif isinstance(x, CompressedLeaf):
            flat, desc = to_arrays(x, f"{arg}: {name}")
            for k, a in flat.items():
                check_finite(a, f"{arg}: {name}/{k}", hint=hint)
            if not any(_is_tracer(a) for a in flat.values()):
                from_arrays(desc, flat, f"{arg}: {name}")  # the leaf's own checks
        else:
            check_finite(x, f"{arg}: {name}", hint=hint)

    visit(params, "")


def check_positions(
    cfg: Any,
    length: int,
    *,
    arg: str,
    allow_long: bool = False,
    warn: bool = False,
    override: str | None = "allow_long=True",
) -> None:
    """``length`` tokens must fit the positions the model was trained on.

    Learned position tables: an error (there is no row to read). RoPE: beyond
    ``max_position_embeddings`` is an error (a warning when ``warn``) unless ``allow_long``.
    ALiBi has no trained limit. ``override`` names the switch in the message (the CLI says
    ``--allow-long``; ``None``: a command without one, the message names none).
    """
    from jcompress.models.config import Position

    trained = cfg.max_position_embeddings
    if length <= trained:
        return
    if cfg.position is Position.LEARNED:
        raise UserError(f"{arg}: {length} tokens exceed the model's {trained} learned positions")
    if cfg.position is Position.ROPE and not allow_long:
        msg = (
            f"{arg}: {length} tokens exceed the {trained} positions the model was trained on (RoPE)"
        )
        if warn:  # it runs: say how to silence the warning, not how to run it
            hint = "" if override is None else f" ({override} silences this)"
            warnings.warn(f"{msg}; running anyway{hint}", stacklevel=3)
        else:
            hint = "" if override is None else f"; pass {override} to run it anyway"
            raise UserError(msg + hint)


def _dtype_bytes(dtype: Any) -> int:
    if dtype is None:
        return 4
    try:
        return np.dtype(jnp.dtype(dtype)).itemsize
    except TypeError:
        raise UserError(f"dtype: {dtype!r} is not a dtype") from None


def estimate_forward_bytes(
    cfg: Any,
    batch: int,
    seqlen: int,
    dtype: Any = None,
    *,
    attention: Any = "dense",
    weight_bytes: int | None = None,
) -> int:
    """Rough peak bytes of one forward pass over ``[batch, seqlen]`` tokens.

    weights (``weight_bytes`` or the dense param count x itemsize of ``dtype``) + activations
    of one layer (hidden, q/k/v, MLP) + the fp32 attention scores + the fp32 logits
    ``[B, T, V]``. Scores: ``attention="dense"`` materializes ``[B, Hq, T, S]``; a
    :class:`~jcompress.models.attention.Chunked` implementation holds the largest per-step
    scores of its paths (a tile, the paired tiles' half of the query blocks, a row block);
    any other implementation is counted as dense (an upper bound).
    """
    from jcompress.models.attention import Chunked, resolve

    impl = resolve(attention)
    item = _dtype_bytes(dtype)
    if weight_bytes is None:
        from jcompress.models.params import param_shapes

        weight_bytes = sum(math.prod(s) for s in param_shapes(cfg).values()) * item
    b, t = int(batch), int(seqlen)
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    mlp = (2 if cfg.gated_mlp else 1) * cfg.intermediate_size
    acts = b * t * (4 * cfg.hidden_size + qkv + mlp) * item
    if isinstance(impl, Chunked):
        # the largest of its paths' per-step scores: one [B, Hq, block_q, block_k] tile (the
        # loop), half the query blocks' tiles at once (the paired tiles), one (row, KV head)
        # pair's g x block_q x T (the row-block path)
        bq, bk = min(t, impl.block_q), min(t, impl.block_k)
        g = cfg.num_heads // cfg.num_kv_heads
        scores = 4 * max(
            b * cfg.num_heads * bq * bk, b * cfg.num_heads * -(-t // 2) * bk, g * bq * t
        )
    else:
        scores = b * cfg.num_heads * t * t * 4
    logits = b * t * cfg.vocab_size * 4
    return int(weight_bytes + acts + scores + logits)


def available_memory() -> int | None:
    """Bytes the next computation can use: the default device's free memory when JAX reports
    it (GPU/TPU), else the host's ``MemAvailable`` (or physical memory); ``None`` if unknown."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without stats
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"


def check_memory(
    cfg: Any,
    batch: int,
    seqlen: int,
    dtype: Any = None,
    *,
    attention: Any = "dense",
    weight_bytes: int | None = None,
    available: int | None = None,
    arg: str = "seqlen",
) -> None:
    """Refuse up front a forward pass that :func:`estimate_forward_bytes` says cannot fit in
    ``available`` bytes (default :func:`available_memory`)."""
    need = estimate_forward_bytes(
        cfg, batch, seqlen, dtype, attention=attention, weight_bytes=weight_bytes
    )
    have = available if available is not None else available_memory()
    if have is not None and need > have:
        raise UserError(
            f"{arg}: a forward pass over {batch} x {seqlen} tokens needs about {_gib(need)} "
            f"({getattr(attention, 'name', attention)} attention scores and logits in fp32), "
            f"more than the {_gib(have)} "
            "available; lower batch_size or seqlen"
        )
