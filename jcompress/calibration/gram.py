"""Per-head Gram matrices of calibration features, streamed batch by batch in one jit step.

Windows are optionally averaged ``avg_dim`` at a time (position by position) before their Gram
matrices are taken: window ``j`` of the calibration set belongs to group ``j // avg_dim``, and
only the ``n // avg_dim`` complete groups count (the ``n % avg_dim`` remainder is dropped).
Groups may straddle batch boundaries: the running sum of the open group travels in the state.

State (a pytree, jit-friendly): ``GramState(gram [H, D, D], partial: tuple of [T, C])`` with
one partial sum per feature *source* (e.g. K and Q features that share one Gram matrix).
:func:`grouped_gram_update` is the pure step; :class:`GroupedGram` keeps the host-side window
count (which windows are padding, which are past the last complete group).

Precision: the products and the running sums are float32 or float64 (``dtype``). A float32 Gram
carries an absolute error of about ``eps32 * lambda_max``, so an eigenvalue ``lambda`` of the
spectrum's tail comes out with a relative error near ``eps32 * lambda_max / lambda`` (on
llama-1m's K features up to 6.5e-4 in the singular values); accumulating in float64
(:data:`GRAM_DTYPES`, ``GroupedGram(dtype="float64")``, run under ``jax.enable_x64``) brings
the tail to float64 accuracy of the (float32) features themselves. float64 matmuls cost ~2x
float32 on CPU and GPUs with full-rate float64, much more on TPUs (emulated): ``float32`` stays
available.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GRAM_DTYPES",
    "GramState",
    "GroupedGram",
    "grouped_gram_init",
    "grouped_gram_update",
    "head_gram",
]

GRAM_DTYPES = ("float32", "float64")
"""Accumulation dtypes of :class:`GroupedGram` (float64 runs under ``jax.enable_x64``)."""

_HI = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("heads", "dtype"))
def head_gram(x: jax.Array, heads: int, dtype: str = "float32") -> jax.Array:
    """Per-head Gram matrices ``X_h^T X_h``: ``x [..., heads * D] -> [heads, D, D]`` in
    ``dtype`` (``"float64"`` needs ``jax.enable_x64``; :class:`GroupedGram` sets it).

    One batched ``dot_general`` over features laid out ``[heads, D, N]`` (tokens last, the
    contracted axis contiguous): on XLA:CPU this runs ~2x faster than ``[N, heads, D]``
    contracted over ``N`` or a ``lax.map`` of per-head ``[D, N] @ [N, D]`` products.
    """
    _check_x64(dtype)
    d = x.shape[-1] // heads
    xh = x.astype(dtype).reshape(-1, heads, d).transpose(1, 2, 0)  # [heads, D, N]
    return jnp.einsum("hdn,hen->hde", xh, xh, precision=_HI)


class GramState(NamedTuple):
    """Running sum of per-head Gram matrices of group means, and the open group's window sum.

    Attributes:
      gram: ``[H, D, D]`` (float32 or float64), ``sum_g G(mean of group g)`` over complete
        groups so far, summed over sources.
      partial: one ``[T, C]`` sum per source (same dtype) of the windows of the open group
        (zeros when no group is open).
    """

    gram: jax.Array
    partial: tuple[jax.Array, ...]


def _check_x64(dtype: str) -> None:
    if dtype not in GRAM_DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(GRAM_DTYPES)}, got {dtype!r}")
    if dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueError("dtype='float64' needs jax.enable_x64 (GroupedGram sets it)")


def grouped_gram_init(
    heads: int, seqlen: int, channels: int, sources: int = 1, dtype: str = "float32"
) -> GramState:
    """Empty state: ``heads`` Gram matrices of width ``channels // heads``, ``sources`` partials
    (``dtype``; ``"float64"`` under ``jax.enable_x64``)."""
    _check_x64(dtype)
    d = channels // heads
    # host zeros, device_put: an eager jnp.zeros compiles a broadcast per shape and dtype
    return GramState(
        jax.device_put(np.zeros((heads, d, d), dtype)),
        tuple(jax.device_put(np.zeros((seqlen, channels), dtype)) for _ in range(sources)),
    )


@functools.partial(jax.jit, static_argnames=("avg_dim",))
def grouped_gram_update(
    state: GramState,
    xs: tuple[jax.Array, ...],  # one [B, T, C] per source
    offset: jax.Array | int,  # windows already in the open group, 0 <= offset < avg_dim
    valid: jax.Array | int,  # leading windows of the batch that enter groups
    *,
    avg_dim: int,
) -> GramState:
    """Add one batch of features to the grouped Gram state (one compiled step per batch).

    Window ``b < valid`` of the batch is the ``offset + b``-th window of the open group
    sequence: slot ``(offset + b) // avg_dim``. Each slot whose count reaches ``avg_dim``
    (the first slot counts the ``offset`` windows already summed in ``partial``) adds the
    Gram of its mean; the slot left open becomes the new ``partial``. Windows ``b >= valid``
    (padding, or windows past the last complete group) are ignored.

    Args:
      state: :class:`GramState`.
      xs: features per source, ``[B, T, C]`` each, any float dtype (accumulated in the
        state's dtype).
      offset, valid: as above (traced: one compilation for every batch).
      avg_dim: windows per group (static).

    Returns:
      The updated :class:`GramState`.
    """
    heads = state.gram.shape[0]
    dtype = state.gram.dtype
    bsz = xs[0].shape[0]
    b = jnp.arange(bsz)
    inb = b < valid
    if avg_dim == 1:  # every window is its own group: no partial sums

        def grams(xs, mask):
            if mask:  # zero the rows past `valid` (only the padded last batch gets here)
                xs = [jnp.where(inb[:, None, None], x, 0) for x in xs]
            return sum(head_gram(x, heads, dtype.name) for x in xs)

        # a masked operand costs XLA:CPU ~2.5x in the Gram product: full batches skip it
        full = functools.partial(grams, mask=False)
        part = functools.partial(grams, mask=True)
        return GramState(state.gram + jax.lax.cond(valid >= bsz, full, part, xs), state.partial)
    slots = (avg_dim - 1 + bsz - 1) // avg_dim + 1  # most groups one batch can touch
    s = jnp.arange(slots)
    member = ((offset + b)[None, :] // avg_dim == s[:, None]) & inb[None, :]  # [S, B]
    count = jnp.sum(member, axis=1) + jnp.where(s == 0, offset, 0)
    complete = count == avg_dim
    still_open = (count > 0) & ~complete
    m = member.astype(dtype)
    gram, partial = state.gram, []
    for x, p in zip(xs, state.partial, strict=True):
        sums = jnp.einsum("sb,btc->stc", m, x.astype(dtype), precision=_HI)
        sums = sums.at[0].add(p)  # [S, T, C]
        means = jnp.where(complete[:, None, None], sums / avg_dim, 0.0)
        gram = gram + head_gram(means, heads, dtype.name)
        partial.append(jnp.sum(jnp.where(still_open[:, None, None], sums, 0.0), axis=0))
    return GramState(gram, tuple(partial))


class GroupedGram:
    """Host bookkeeping around :func:`grouped_gram_update` for ``n`` calibration windows.

    Windows count in calibration order across calls; the first ``(n // avg_dim) * avg_dim``
    enter groups, the rest are dropped (``dropped``). Padding rows of a batch (``real``) are
    never seen. ``state`` is created on the first :meth:`add` from the feature shapes.
    ``dtype="float64"`` accumulates in float64 (each step runs under ``jax.enable_x64``; the
    features stay as they are and are widened inside the step).

    Example::

      acc = GroupedGram(n=calib.shape[0], avg_dim=4, heads=12)
      for ob in layer.observe(capture):
          acc.add((ob.captured["outputs"]["self_attn/k_proj"],), ob.real)
      gram = acc.gram  # [12, D, D]
    """

    def __init__(self, *, n: int, avg_dim: int, heads: int, dtype: str = "float32"):
        if avg_dim < 1 or avg_dim > n:
            raise ValueError(f"avg_dim: need 1 <= avg_dim <= n ({n}), got {avg_dim}")
        if dtype not in GRAM_DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(GRAM_DTYPES)}, got {dtype!r}")
        self.avg_dim, self.heads, self.dtype = avg_dim, heads, dtype
        self.groups = n // avg_dim
        self.limit = self.groups * avg_dim
        self.dropped = n - self.limit
        self.seen = 0
        self.state: GramState | None = None

    def add(self, xs: tuple[jax.Array, ...], real: int) -> None:
        """Add the first ``real`` windows of a batch (``xs``: one ``[B, T, C]`` per source)."""
        used = self.seen if self.seen < self.limit else self.limit
        valid = max(0, min(real, self.limit - self.seen))
        # host scalars (np.int32): device_put, no per-call compilation of a conversion
        offset, valid = np.int32(used % self.avg_dim), np.int32(valid)
        x64 = jax.enable_x64(True) if self.dtype == "float64" else contextlib.nullcontext()
        with x64:
            if self.state is None:
                _, t, c = xs[0].shape
                self.state = grouped_gram_init(self.heads, t, c, len(xs), self.dtype)
            self.state = grouped_gram_update(
                self.state, tuple(xs), offset, valid, avg_dim=self.avg_dim
            )
        self.seen += real

    @property
    def gram(self) -> jax.Array:
        """``[H, D, D]`` sum over complete groups of the Gram of each group's mean (in
        ``dtype``; a float64 array stays float64 outside the ``enable_x64`` scope)."""
        if self.state is None:
            raise ValueError("no features were added")
        return self.state.gram
