"""Run a per-layer analysis layer by layer from the checkpoint's shards, resumably.

:func:`stream_compress` writes a checkpoint; an analysis (GED's activation capture,
SpargeAttn's threshold tuning, ...) produces a result per layer instead. Both share the
loader, the :func:`jcompress.calibration.single_layer` hand-off and the work directory
(manifest with the run's identity, next-layer inputs, lock; :func:`._open_work`). Here
each layer's result (a few named arrays) goes into the work directory next to the manifest,
and the results come back to the caller once the deepest requested layer is done; layers
past it are never read.

For layer ``i`` the analysis function receives the :class:`~jcompress.calibration.StreamLayer`
that ``stream_layers`` over the whole model would have given it (same inputs, same batches,
same attention), so an in-memory analysis written as "for layer in stream_layers(...):
fn(layer)" gives the same numbers streamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jcompress.atomic import write_json
from jcompress.calibration.stream import StreamLayer, check_windows, single_layer, stream_layers
from jcompress.errors import UserError
from jcompress.models.attention import resolve
from jcompress.models.convert import unflatten
from jcompress.models.forward import DEFAULT_ATTENTION
from jcompress.streaming.loader import GLOBAL, LayerLoader
from jcompress.streaming.run import (
    MANIFEST,
    _dropped_on_broken_input,
    _identity,
    _load_hidden,
    _locked,
    _open_work,
    _process_zero_alone,
    _save_hidden,
)

__all__ = ["AnalysisResult", "stream_analysis", "stream_layers_from"]

LayerFn = Callable[[StreamLayer], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
    """What :func:`stream_analysis` returns.

    Attributes:
      results: ``{layer: {name: array}}`` for every requested layer, in layer order.
      peak_loaded_bytes: the loader's peak of tensors held at once (this process).
      max_layer_bytes, globals_bytes, model_bytes: sizes as stored.
      layers_read: decoder layers this process read (0 .. the deepest requested one, from
        where it resumed).
      resumed_from: the first layer this process ran (0: a fresh run).
      seconds: wall time of this process's part.
    """

    results: dict[int, dict[str, np.ndarray]]
    peak_loaded_bytes: int
    max_layer_bytes: int
    globals_bytes: int
    model_bytes: int
    layers_read: tuple[int, ...]
    resumed_from: int
    seconds: float


def _save_result(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_result(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"resume: {path} is missing (the work directory is damaged; remove it)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _arrays(out: Any, method: str, i: int) -> dict[str, np.ndarray]:
    if not isinstance(out, Mapping) or not all(isinstance(k, str) for k in out):
        raise TypeError(
            f"{method}: the layer function must return a mapping of names to arrays "
            f"(layer {i} gave {type(out).__name__})"
        )
    return {k: np.asarray(v) for k, v in out.items()}


@_process_zero_alone
def stream_analysis(
    model: str | os.PathLike | LayerLoader,
    analyze_layer: LayerFn,
    windows: Any,
    *,
    method: str,
    config: Any,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    attention: Any = DEFAULT_ATTENTION,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    dtype: Any = None,
    offload_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_layer: Callable[[int], None] | None = None,
) -> AnalysisResult | None:
    """Run ``analyze_layer`` on decoder layers read one at a time from a checkpoint.

    Layers ``0 .. max(layers)`` are read in order (each dropped before the next); the
    calibration ``windows`` are carried from layer to layer as the original model's outputs
    (:attr:`~jcompress.calibration.Feed.ORIGINAL`), in memory or in ``offload_dir``. On each
    requested layer ``analyze_layer(layer)`` gets the layer's
    :class:`~jcompress.calibration.StreamLayer` (``observe`` / ``reference`` /
    ``relative_error``; ``replace`` has no effect on the next layer) and returns its result as
    ``{name: array}``. In a multi-host run process 0 runs it and the others return ``None``.

    Args:
      model: checkpoint directory (safetensors, possibly sharded) or a :class:`LayerLoader`.
      analyze_layer: ``StreamLayer -> {name: array}``, a pure function of the layer.
      windows: ``[n, T]`` integer token ids.
      method: a name for the manifest and errors.
      config: the analysis's config dataclass (part of the run's identity: a resume with
        another config is an error).
      layers: the layers to analyse (default: all).
      batch_size, attention: as for :func:`jcompress.calibration.stream_layers`.
      work_dir: where the run's state goes (manifest, finished layers' results, the next
        layer's inputs), removed on success; ``None``: nothing is written and the run cannot
        be resumed.
      resume: continue the run recorded in ``work_dir`` (without it an existing ``work_dir``
        is an error).
      dtype: load dtype (as :func:`jcompress.load_hf`); ignored when ``model`` is a loader.
      offload_dir: keep the calibration activations in temporary files in this directory.
      progress: a progress bar over layers.
      on_layer: called with each finished layer's index (after its manifest is written).

    Returns:
      :class:`AnalysisResult` (``None`` on processes other than 0 of a multi-host run).

    Raises:
      UserError: a checkpoint the loader refuses, a layer out of range, bad windows, an
        existing ``work_dir`` without ``resume``, or one written by another method, config,
        calibration set, layer selection, dtype or model -- all before any layer is read.
    """
    t0 = time.perf_counter()
    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    cfg = loader.cfg
    n = cfg.num_layers
    want = tuple(range(n)) if layers is None else tuple(sorted({int(i) for i in layers}))
    if not want or want[0] < 0 or want[-1] >= n:
        raise UserError(f"layers: {list(layers or [])} must be non-empty and within [0, {n})")
    windows = check_windows(cfg, windows, offload_dir, arg="windows", rows="n")
    offload = None if offload_dir is None else str(offload_dir)
    impl = resolve(attention)
    work = None if work_dir is None else Path(work_dir)
    if work is None:
        if resume:
            raise UserError("resume: needs the work_dir of the interrupted run")
        manifest: dict[str, Any] = {"done": [], "results": {}, "hidden": None}
        lock: Any = contextlib.nullcontext()
    else:
        if work.resolve() == loader.model_dir.resolve():
            raise UserError(f"work_dir: {work} must differ from the model directory")
        ident = _identity(method, config, windows, loader.dtype, False, loader.model_dir)
        ident["analysis"] = {
            "layers": list(want),
            "batch_size": int(batch_size),
            "attention": repr(impl),
        }
        existed = work.exists()
        manifest = _open_work(work, ident, resume, {"results": {}, "hidden": None})
        lock = _locked(work)
    with _dropped_on_broken_input(work, work is not None and existed), lock:
        return _run(loader, analyze_layer, windows, method, want, batch_size, impl, work,
                    manifest, offload, progress, on_layer, t0)  # fmt: skip


def stream_layers_from(
    model: str | os.PathLike | LayerLoader,
    windows: Any,
    *,
    last: int | None = None,
    batch_size: int = 8,
    offload_dir: str | os.PathLike | None = None,
    attention: Any = DEFAULT_ATTENTION,
    dtype: Any = None,
) -> Iterator[StreamLayer]:
    """:func:`jcompress.calibration.stream_layers` over a checkpoint read one decoder layer
    at a time: the same :class:`~jcompress.calibration.StreamLayer` objects (inputs, batches,
    ``observe``, ``reference``) for layers ``0 .. last`` (default: all), each read from the
    shards when the loop asks for it and dropped when it moves on; the next layer is fed the
    original layer's outputs. Not resumable (:func:`stream_analysis` is).

    Args:
      model: checkpoint directory (safetensors) or a :class:`LayerLoader`.
      windows, batch_size, offload_dir, attention: as for ``stream_layers``.
      last: the last layer to yield (layers after it are never read).
      dtype: load dtype; ignored when ``model`` is a loader.
    """
    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    n = loader.cfg.num_layers
    last = n - 1 if last is None else last
    if not 0 <= last < n:
        raise UserError(f"last: layer {last} is out of range [0, {n})")
    windows = check_windows(loader.cfg, windows, offload_dir, arg="windows", rows="n")
    yield from _walk(loader, windows, 0, last, None, batch_size=batch_size,
                     offload=None if offload_dir is None else str(offload_dir),
                     attention=resolve(attention))  # fmt: skip


def _walk(loader, windows, start, last, hidden, *, batch_size, offload, attention,
          after=None) -> Iterator[StreamLayer]:  # fmt: skip
    """Yield the :class:`StreamLayer` of layers ``start .. last`` read one at a time, layer
    ``start`` fed ``hidden`` (``None``: embed the windows; ``start`` is then 0). Once the
    consumer asks for the next layer, the layer is finished through its stream (the next
    inputs), dropped, and ``after(i, next_inputs)`` called (``None`` after ``last``)."""
    cfg = loader.cfg
    shapes = loader.shapes()
    try:
        for i in range(start, last + 1):
            lflat = loader.layer(i)
            gflat = loader.globals(loader.embed_modules()) if i == 0 else {}
            tree = unflatten({**shapes, **gflat, **lflat})
            with single_layer(i, hidden) as handoff:  # read by the stream's first step
                hidden = None  # owned by the stream from here
                stream = stream_layers(cfg, tree, windows, batch_size=batch_size,
                                       offload_dir=offload, attention=attention)  # fmt: skip
                layer = next(stream)
            with contextlib.closing(stream):
                yield layer
                del layer
                if i < last:  # finish the layer: its outputs are the next inputs
                    for _ in stream:
                        raise RuntimeError("single_layer yielded a second layer")
            if i < last:
                hidden = handoff.outputs
            del tree, lflat, gflat
            loader.release([i, GLOBAL])
            if after is not None:
                after(i, hidden)
    finally:  # also when the consumer stops early: nothing stays held or on disk
        if hidden is not None:
            hidden.close()
        loader.release([GLOBAL, *range(start, last + 1)])


def _run(loader, fn, windows, method, want, batch_size, impl, work, manifest, offload,
         progress, on_layer, t0) -> AnalysisResult:  # fmt: skip
    cfg = loader.cfg
    last = want[-1]
    start = len(manifest["done"])
    if manifest["done"] != list(range(start)) or start > last + 1:
        raise UserError(f"resume: {work / MANIFEST} lists finished layers out of order "
                        f"(remove {work})")  # fmt: skip
    hidden = None
    if 0 < start <= last:
        if manifest.get("hidden") is None:
            raise UserError(f"resume: {work / MANIFEST} records no inputs for layer {start} "
                            f"(remove {work})")  # fmt: skip
        hidden = _load_hidden(work, manifest["hidden"], offload)
    results: dict[int, dict[str, np.ndarray]] = {}
    bar = tqdm(total=last + 1 - start, desc=f"stream {method}", disable=not progress,
               leave=False)  # fmt: skip

    def after(i: int, next_inputs: Any) -> None:
        if work is not None:
            prev = manifest.get("hidden")
            if i in want:
                fname = f"result-{i:05d}.npz"
                _save_result(work / fname, results[i])
                manifest["results"][str(i)] = fname
            manifest["hidden"] = (
                None if next_inputs is None
                else _save_hidden(work / f"inputs-{i + 1:05d}.bin", next_inputs)
            )  # fmt: skip
            manifest["done"].append(i)
            write_json(work / MANIFEST, manifest, arg="work_dir")  # commits layer i
            if prev is not None:
                (work / prev["file"]).unlink(missing_ok=True)
        bar.update()
        if on_layer is not None:
            on_layer(i)

    walk = _walk(loader, windows, start, last, hidden, batch_size=batch_size, offload=offload,
                 attention=impl, after=after)  # fmt: skip
    with contextlib.closing(walk), bar:
        for layer in walk:
            if layer.index in want:
                results[layer.index] = _arrays(fn(layer), method, layer.index)
    for i in want:
        if i not in results:  # finished by an earlier process
            results[i] = _load_result(work / manifest["results"][str(i)])
    if work is not None:
        shutil.rmtree(work)  # ours: created with a manifest and marker by _open_work
    return AnalysisResult(
        results={i: results[i] for i in want},
        peak_loaded_bytes=loader.peak_bytes,
        max_layer_bytes=max(loader.group_bytes.get(i, 0) for i in range(cfg.num_layers)),
        globals_bytes=loader.group_bytes.get(GLOBAL, 0),
        model_bytes=sum(loader.group_bytes.values()),
        layers_read=tuple(range(start, last + 1)),
        resumed_from=start,
        seconds=time.perf_counter() - t0,
    )
