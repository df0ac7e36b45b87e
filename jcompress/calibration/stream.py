"""Calibration windows streamed through a model one decoder layer at a time.

:func:`batches` cuts ``[n, T]`` windows into fixed-shape batches (the last one padded with
repeats of its last window, so one compilation serves every batch; ``real`` says how many rows
are real). :func:`stream_layers` embeds every batch, then yields one :class:`StreamLayer` per
decoder layer holding that layer's inputs (in memory or in an ``offload_dir`` temp file,
:class:`Activations`). A method observes the layer's captured activations batch by batch
(:meth:`StreamLayer.observe`), may evaluate candidate params against the stored reference
outputs (:meth:`StreamLayer.relative_error`) and may replace the layer
(:meth:`StreamLayer.replace`). When the loop moves on, the next layer's inputs are the
original layer's outputs (``Feed.ORIGINAL``, what EigenAttention's reference does) or the
replaced layer's (``Feed.REPLACED``, sequential methods such as GPTQ-style ones).

Example (per-head Gram matrices of every layer's k_proj outputs, then a rank-8 layer kept
only if its output error stays under 2%)::

  stream = stream_layers(cfg, params, calib, batch_size=8, offload_dir=None)
  for layer in stream:
      acc = GroupedGram(n=calib.shape[0], avg_dim=1, heads=cfg.num_kv_heads)
      for ob in layer.observe(Capture(outputs="self_attn/k_proj")):
          acc.add((ob.captured["outputs"]["self_attn/k_proj"],), ob.real)
      candidate = my_low_rank(layer.params, acc.gram, rank=8)
      if float(layer.relative_error(candidate)) < 0.02:
          layer.replace(candidate)  # Feed.REPLACED: the next layer sees its outputs

A :class:`StreamLayer` is valid until the loop asks for the next one (its activation stores
are then reused or closed) and while the generator is alive: closing it (``close()``, the end
of the loop, or dropping the last reference to it) removes every store. Padding rows never
reach an observer's statistics unless it reads past ``real``, and never enter
:meth:`StreamLayer.relative_error`.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import sharding
from jcompress.errors import UserError
from jcompress.models.attention import fit_to_devices, resolve
from jcompress.models.config import ModelConfig
from jcompress.models.families import spec_for
from jcompress.models.forward import (
    DEFAULT_ATTENTION,
    Capture,
    apply_layer,
    check_length,
    embed,
    layer_params,
)

__all__ = [
    "Activations",
    "Batch",
    "Feed",
    "Handoff",
    "Observation",
    "StreamLayer",
    "batches",
    "single_layer",
    "stream_layers",
]

Params = Mapping[str, Any]


class Batch(NamedTuple):
    """One fixed-shape batch of windows.

    Attributes:
      ids: ``[B, T]`` token ids; rows ``real..B-1`` repeat the last real window (padding).
      real: number of real windows (the first rows).
      start: index of the first window in the full ``[n, T]`` set.
    """

    ids: np.ndarray
    real: int
    start: int


def batches(windows: np.ndarray, batch_size: int, *, multiple: int = 1) -> list[Batch]:
    """Cut ``windows [n, T]`` into batches of ``min(batch_size, n)`` rows, the last padded by
    repeats of its last window so that every batch has the same shape (one compilation).

    ``multiple``: fewer windows than ``batch_size`` still make a batch of a multiple of this
    many rows (padded alike, at most ``batch_size``): the ``data`` size of a mesh, so that a
    small calibration set still splits over it (the padding rows are past ``real``)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserError(f"batch_size: must be a positive integer, got {batch_size!r}")
    windows = np.asarray(windows)
    n = windows.shape[0]
    bs = min(batch_size, -(-n // multiple) * multiple)
    out = []
    for s in range(0, n, max(bs, 1)):
        ids = windows[s : s + bs]
        real = ids.shape[0]
        if real < bs:
            ids = np.concatenate([ids, np.repeat(ids[-1:], bs - real, axis=0)])
        out.append(Batch(ids, real, s))
    return out


class Activations:
    """Per-batch activations ``[B, T, H]``, held in memory or in an unlinked temporary file.

    With a file (``offload_dir``), only the batch being used is in memory: ``put`` writes it
    out, ``get`` reads it back (plain reads, no memory map, so nothing accumulates in the
    process). Every batch must have the same shape and dtype. In a multi-host run each
    process writes only its own block of a batch (:func:`jcompress.sharding.to_host_local`:
    its rows of the ``data`` axis) and ``get`` assembles the global array again.
    """

    def __init__(self, n: int, offload_dir: str | None = None):
        self.n = n
        self.items: list[Any] = [None] * n
        self.file = None if offload_dir is None else tempfile.TemporaryFile(dir=offload_dir)
        # (global shape, this process's block shape, dtype)
        self.meta: tuple[tuple[int, ...], tuple[int, ...], np.dtype] | None = None
        self._back: Any = None  # block -> global array, for a batch spanning processes

    def __len__(self) -> int:
        return self.n

    def put(self, b: int, x: jax.Array) -> None:
        if self.file is None:
            self.items[b] = x
            return
        block, self._back = sharding.to_host_local(x)
        arr = np.ascontiguousarray(block)
        self.meta = (tuple(np.shape(x)), arr.shape, arr.dtype)
        os.pwrite(self.file.fileno(), memoryview(arr.reshape(-1).view(np.uint8)), b * arr.nbytes)

    def get(self, b: int) -> jax.Array:
        if self.file is None:
            return self.items[b]
        _, shape, dt = self.meta
        nbytes = math.prod(shape) * dt.itemsize
        raw = os.pread(self.file.fileno(), nbytes, b * nbytes)
        block = np.frombuffer(raw, dt).reshape(shape)
        return sharding.place_batch(block) if self._back is None else self._back(block)

    def __iter__(self) -> Iterator[jax.Array]:
        return (self.get(b) for b in range(self.n))

    @property
    def batch_shape(self) -> tuple[int, ...] | None:
        """Shape of one batch (``None`` while empty)."""
        if self.file is not None:
            return None if self.meta is None else self.meta[0]
        return None if self.items[0] is None else tuple(self.items[0].shape)

    def close(self) -> None:
        """Drop the arrays / remove the file (idempotent)."""
        self.items = [None] * self.n
        if self.file is not None:
            self.file.close()


class Feed(enum.Enum):
    """Where the next layer's inputs come from once a layer is done."""

    ORIGINAL = "original"  # the original layer's outputs, even if the layer was replaced
    REPLACED = "replaced"  # the replaced layer's outputs (the original's if not replaced)


class Observation(NamedTuple):
    """One batch seen by :meth:`StreamLayer.observe`.

    Attributes:
      batch: batch index. real: real rows (the rest is padding; slice ``[:real]``).
      inputs, outputs: the layer's ``[B, T, H]`` inputs and (original) outputs.
      captured: ``{"inputs": {path: array}, "outputs": {path: array}}`` from the
        :class:`~jcompress.models.forward.Capture`, paths relative to the layer.
    """

    batch: int
    real: int
    inputs: jax.Array
    outputs: jax.Array
    captured: dict[str, dict[str, jax.Array]]


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def _error_step(cfg, lp, h, y, i, real, sums, attention):
    """``sums [2] += (||Y'-Y||^2, ||Y||^2)`` over the first ``real`` rows (float32)."""
    y2 = apply_layer(cfg, lp, h, i, attention=attention)
    keep = (jnp.arange(h.shape[0]) < real)[:, None, None]
    diff = jnp.where(keep, (y2 - y).astype(jnp.float32), 0.0)
    ref = jnp.where(keep, y.astype(jnp.float32), 0.0)
    return sums + jnp.stack([jnp.sum(diff * diff), jnp.sum(ref * ref)])


class StreamLayer:
    """One decoder layer of a :func:`stream_layers` pass.

    Attributes:
      index: layer index. path: its param path (``model/layers/3``).
      params: the layer's original params. batches: the :class:`Batch` list (ids, real).
      inputs: :class:`Activations` with the layer's inputs for every batch.
    """

    def __init__(self, stream: _Stream, index: int, path: str, params: Params, inputs):
        self._s = stream
        self.index, self.path, self.params, self.inputs = index, path, params, inputs
        self.batches = stream.batches
        self.replaced: Params | None = None
        self._reference: Activations | None = None
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.path}: the stream has moved on to the next layer")

    def observe(self, capture: Capture | None = None) -> Iterator[Observation]:
        """Run the original layer on every batch, capturing ``capture`` (regexes relative to
        the layer, e.g. ``Capture(outputs="self_attn/(k|v)_proj")``), and yield one
        :class:`Observation` per batch. The outputs are kept as the reference for
        :meth:`relative_error` (computed once; later calls re-run the capture only)."""
        self._check_open()
        s = self._s
        keep = self._reference is None
        ref = Activations(len(self.batches), s.offload_dir) if keep else self._reference
        for b, batch in enumerate(self.batches):
            h = self.inputs.get(b)
            y, cap = apply_layer(
                s.cfg, self.params, h, self.index, capture=capture or Capture(),
                attention=s.attention,
            )  # fmt: skip
            if keep:
                ref.put(b, y)
            yield Observation(b, batch.real, h, y, cap)
        if keep:
            self._reference = ref

    @property
    def reference(self) -> Activations:
        """The original layer's outputs for every batch (computed on first use)."""
        self._check_open()
        if self._reference is None:
            for _ in self.observe():
                pass
        return self._reference

    def relative_error(self, candidate: Params) -> jax.Array:
        """``||Y' - Y|| / ||Y||`` of ``candidate`` layer params against the original outputs,
        over the real rows of every batch: one jit step per batch, sums kept on device (call
        ``float()`` on the result once). A candidate with the original's shapes (e.g.
        ``materialize``d) reuses the original's compilation. 0 when ``||Y|| = 0``."""
        ref = self.reference
        s = self._s
        sums = jnp.zeros((2,), jnp.float32)
        for b, batch in enumerate(self.batches):
            sums = _error_step(
                s.cfg, candidate, self.inputs.get(b), ref.get(b), self.index, batch.real, sums,
                s.attention,
            )  # fmt: skip
        num, den = sums[0], sums[1]
        return jnp.where(den > 0, jnp.sqrt(num / jnp.where(den > 0, den, 1.0)), 0.0)

    def replace(self, params: Params) -> None:
        """Use ``params`` for this layer from now on: with ``Feed.REPLACED`` the next layer's
        inputs are their outputs. The caller still writes them into its own param tree."""
        self._check_open()
        self.replaced = params

    def _next_inputs(self) -> Activations:
        """Inputs of the next layer; reuses (overwrites) this layer's stores where it can."""
        self._check_open()
        s = self._s
        self._closed = True
        if s.feed is Feed.REPLACED and self.replaced is not None:
            lp = self.replaced
        elif self._reference is not None:
            self.inputs.close()
            return self._reference
        else:
            lp = self.params
        for b in range(len(self.batches)):  # in place: batch b is read before it is written
            y = apply_layer(s.cfg, lp, self.inputs.get(b), self.index, attention=s.attention)
            self.inputs.put(b, y)
        if self._reference is not None:
            self._reference.close()
        return self.inputs


class Handoff:
    """What :func:`single_layer` hands to the stream and gets back.

    Attributes:
      index: the one layer the stream yields.
      hidden: that layer's inputs (:class:`Activations` over the same batches), or ``None``
        with ``index == 0`` (the stream embeds the windows itself).
      used: whether a stream ran inside the block (it then owns ``hidden``).
      outputs: once the method's loop has finished the layer, the next layer's inputs (as
        the method's :class:`Feed` defines them); the caller closes them.
    """

    def __init__(self, index: int, hidden: Activations | None):
        self.index, self.hidden = index, hidden
        self.used = False
        self.outputs: Activations | None = None


_SINGLE: contextvars.ContextVar[Handoff | None] = contextvars.ContextVar(
    "jcompress_single_layer", default=None
)


@contextlib.contextmanager
def single_layer(index: int, hidden: Activations | None) -> Iterator[Handoff]:
    """Within the block, :func:`stream_layers` yields only layer ``index``, starting from
    ``hidden`` instead of embedding the windows, and leaves the next layer's inputs in
    ``handoff.outputs`` instead of going on. This is how a layer-streaming runner
    (:mod:`jcompress.streaming`) runs a method's unchanged ``compress`` on one layer at a
    time; a method that streams the calibration set twice inside the block is refused
    (``RuntimeError``), since the inputs of layer ``index`` exist only once.

    Example::

      with single_layer(5, inputs_of_layer_5) as handoff:
          params, report = compress(params_with_layer_5, cfg, calib, config=config)
      inputs_of_layer_6 = handoff.outputs
    """
    handoff = Handoff(index, hidden)
    token = _SINGLE.set(handoff)
    try:
        yield handoff
    finally:
        _SINGLE.reset(token)


class _Stream(NamedTuple):
    cfg: ModelConfig
    batches: list[Batch]
    offload_dir: str | None
    feed: Feed
    attention: Any


def check_windows(
    cfg, windows: Any, offload_dir: Any, *, arg: str = "calib", rows: str = "nsamples"
) -> np.ndarray:
    """``windows`` as integer token ids ``[n, seqlen]`` (at least one token) in the model's
    vocabulary and length, and ``offload_dir`` (if given) an existing directory; one
    :class:`UserError` naming ``arg`` otherwise (an id out of range would otherwise be clamped
    by the embedding gather into a silently wrong number)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer) or windows.size == 0:
        raise UserError(
            f"{arg}: expected integer token ids [{rows}, seqlen], got {windows.dtype}"
            f"{list(windows.shape)}"
        )
    check_length(cfg, windows.shape[1])
    if windows.min() < 0 or windows.max() >= cfg.vocab_size:
        raise UserError(f"{arg}: token ids must lie in [0, {cfg.vocab_size})")
    if offload_dir is not None and not os.path.isdir(offload_dir):
        raise UserError(f"offload_dir: {offload_dir} is not a directory")
    return windows


def stream_layers(
    cfg: ModelConfig,
    params: Params,
    windows: Any,
    *,
    batch_size: int = 8,
    offload_dir: str | None = None,
    feed: Feed = Feed.ORIGINAL,
    attention: Any = DEFAULT_ATTENTION,
) -> Iterator[StreamLayer]:
    """Stream calibration windows through the model, one :class:`StreamLayer` per layer.

    Args:
      cfg, params: the model (``params`` is not modified).
      windows: ``[n, T]`` integer token ids.
      batch_size: windows per ``apply_layer`` call (:func:`batches`).
      offload_dir: keep activations in temporary files in this directory instead of memory
        (removed as soon as they are not needed).
      feed: :class:`Feed`: which outputs the next layer is fed.
      attention: the attention implementation every layer runs with (as for
        :func:`jcompress.forward`).

    Yields:
      :class:`StreamLayer` for layers ``0 .. num_layers - 1`` in order; each is valid until
      the next one is requested.
    """
    windows = check_windows(cfg, windows, offload_dir)
    bl = batches(windows, batch_size, multiple=sharding.data_size())
    s = _Stream(cfg, bl, offload_dir, Feed(feed), fit_to_devices(resolve(attention), params))
    params = sharding.shard_params(params, cfg, sharding.current_mesh())  # under use_mesh
    handoff = _SINGLE.get()  # set by single_layer(): one layer from given inputs
    first, last = 0, cfg.num_layers
    if handoff is not None:
        if handoff.used:
            raise RuntimeError(
                "this method streams the calibration set more than once per layer; "
                "layer streaming cannot run it"
            )
        handoff.used = True
        first, last = handoff.index, handoff.index + 1
        if handoff.hidden is None and handoff.index != 0:
            raise RuntimeError(f"single_layer({handoff.index}): no inputs given for the layer")
    if handoff is not None and handoff.hidden is not None:
        hidden = handoff.hidden
        want = (bl[0].ids.shape[0], windows.shape[1])
        got = hidden.batch_shape
        if len(hidden) != len(bl) or (got is not None and tuple(got[:2]) != want):
            hidden.close()
            raise RuntimeError(
                f"single_layer({handoff.index}): inputs of {len(hidden)} batches {got} do not "
                f"fit {len(bl)} batches of {list(want)} windows"
            )
    else:
        hidden = Activations(len(bl), offload_dir)
    layer = None
    try:
        if handoff is None or handoff.hidden is None:
            for b, batch in enumerate(bl):
                hidden.put(b, embed(cfg, params, sharding.place_batch(batch.ids)))
        root = spec_for(cfg.family.value).layout.layers
        for i in range(first, last):
            layer = StreamLayer(s, i, f"{root}/{i}", layer_params(cfg, params, i), hidden)
            yield layer
            hidden = layer._next_inputs()
            layer = None
        if handoff is not None:  # the caller takes the next layer's inputs
            handoff.outputs, hidden = hidden, None
    finally:
        if hidden is not None:
            hidden.close()
        if layer is not None and layer._reference is not None:  # left mid-layer
            layer._reference.close()
