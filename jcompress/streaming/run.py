"""Run a compression method layer by layer from the checkpoint's shards, resumably.

For each decoder layer ``i`` (:func:`stream_compress`):

1. the layer's tensors are read (:class:`~jcompress.streaming.loader.LayerLoader`); every other
   param is a ``jax.ShapeDtypeStruct`` placeholder (shapes and dtypes, no data), except the
   embedding table while layer 0's calibration inputs are made;
2. the method's own, unchanged ``compress(params, cfg, calib, config=...)`` runs on that tree
   inside :func:`jcompress.calibration.single_layer`: its
   :func:`~jcompress.calibration.stream_layers` starts from the saved inputs of layer ``i`` and
   yields layer ``i`` only, and hands back the next layer's inputs (the method's own
   :class:`~jcompress.calibration.Feed`);
3. the compressed layer is written to its own shard (dense-equivalent HF tensors through the
   family table backwards, or the factor form), the next layer's inputs to a raw file, and the
   manifest (``manifest.json``: what was run on what, finished layers, per-layer reports, the
   inputs file) atomically; then the layer is dropped.

A run killed anywhere resumes (``resume=True``) from the last finished layer with the same
result as an uninterrupted run; a work directory written for another method / config /
calibration set / model is one clear error. At the end the layer shards, a globals shard,
the index and ``config.json`` are placed into ``out_dir`` atomically: a checkpoint
:func:`jcompress.load_hf` reads (and stock ``transformers`` for the dense-equivalent form).

A method may only change the layer it is given. One that reads params outside the layer
(other layers, the head), changes them, or streams the calibration set twice per layer
cannot be streamed: that is one clear error naming the method, raised on the first layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jcompress.atomic import atomic_dir, on_writer, process_count, write_json
from jcompress.calibration.stream import Activations, batches, single_layer
from jcompress.errors import UserError
from jcompress.leaf_io import StoreOnce, encode_static
from jcompress.leaves import CompressedLeaf
from jcompress.models import hf
from jcompress.models.convert import flatten, get_path, unflatten
from jcompress.models.families import spec_for
from jcompress.models.forward import apply_layer, embed
from jcompress.models.safetensors_io import CODES, DTYPES, write_safetensors
from jcompress.outputs import check_output_dir, write_marker
from jcompress.sharding import data_size, use_mesh
from jcompress.streaming.loader import GLOBAL, LayerLoader, fingerprint, layer_of
from jcompress.validate import NonFiniteInput

__all__ = ["MANIFEST", "StreamReport", "StreamResult", "stream_compress"]

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the model fingerprint hashes samples of the shards' data (loader.fingerprint)
REPORT_FILE = "jcompress_stream_report.json"


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """What a streamed run did.

    Attributes:
      method: the method's name. layers: every layer's own report JSON, in order.
      method_report: the method's report for the whole model, rebuilt from the per-layer
        ones (``None`` when the method's report has no ``layers`` field to merge).
      peak_loaded_bytes: the loader's peak of tensors held at once (this process).
      max_layer_bytes, globals_bytes, model_bytes: sizes as stored.
      resumed_from: the first layer this process ran (0: a fresh run).
      seconds: wall time of this process's part.
    """

    method: str
    layers: tuple[dict[str, Any], ...]
    method_report: Any
    peak_loaded_bytes: int
    max_layer_bytes: int
    globals_bytes: int
    model_bytes: int
    resumed_from: int
    seconds: float
    unmatched_rules: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = {
            "method": self.method,
            "peak_loaded_bytes": self.peak_loaded_bytes,
            "max_layer_bytes": self.max_layer_bytes,
            "globals_bytes": self.globals_bytes,
            "model_bytes": self.model_bytes,
            "resumed_from": self.resumed_from,
            "seconds": self.seconds,
            "unmatched_rules": list(self.unmatched_rules),
            "layers": list(self.layers),
        }
        if self.method_report is not None:
            d["method_report"] = self.method_report.to_json()
        return d

    def to_markdown(self) -> str:
        mb = 1 / 2**20
        lines = [
            f"Streamed {self.method}: {len(self.layers)} layers"
            + (f" (resumed at layer {self.resumed_from})" if self.resumed_from else ""),
            "",
            "| model | largest layer | globals | loader peak |",
            "|---:|---:|---:|---:|",
            f"| {self.model_bytes * mb:.1f} MiB | {self.max_layer_bytes * mb:.1f} MiB | "
            f"{self.globals_bytes * mb:.1f} MiB | {self.peak_loaded_bytes * mb:.1f} MiB |",
        ]
        if self.method_report is not None:
            lines += ["", self.method_report.to_markdown()]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class StreamResult:
    """``out_dir``: the checkpoint written; ``report``: :class:`StreamReport`."""

    out_dir: Path
    report: StreamReport


def _config_json(config: Any) -> dict[str, Any]:
    """The config's fields as JSON (``offload_dir`` left out: it does not change results)."""
    if not dataclasses.is_dataclass(config):
        raise UserError(f"config: expected a method config dataclass, got {type(config).__name__}")
    d = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    d.pop("offload_dir", None)
    return json.loads(json.dumps(encode_static(d), default=repr))


def _identity(method, config, calib, dtype, factors, model_dir) -> dict[str, Any]:
    calib_id = None
    if calib is not None:
        c = np.ascontiguousarray(np.asarray(calib))
        calib_id = {
            "shape": list(c.shape),
            "dtype": str(c.dtype),
            "sha256": hashlib.sha256(c.tobytes()).hexdigest(),
        }
    return {
        "format": FORMAT,
        "method": method,
        "config": _config_json(config),
        "calib": calib_id,
        "dtype": None if dtype is None else str(np.dtype(dtype)),
        "factors": bool(factors),
        "model": fingerprint(model_dir),
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k != "model":
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}" if k == "model" else f"{prefix}{k} ({a!r} -> {b!r})")
    return out


# -- the inputs of the next layer, on disk -------------------------------------------------


def _save_hidden(path: Path, hidden: Activations) -> dict[str, Any]:
    tmp = path.with_name(path.name + ".tmp")
    shape = dtype = None
    with open(tmp, "wb") as f:
        for b in range(len(hidden)):
            arr = np.ascontiguousarray(np.asarray(hidden.get(b)))
            shape, dtype = arr.shape, arr.dtype
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {
        "file": path.name,
        "batches": len(hidden),
        "shape": list(shape),
        "dtype": CODES[np.dtype(dtype)],
    }


def _load_hidden(work: Path, meta: dict[str, Any], offload_dir: str | None) -> Activations:
    path = work / meta["file"]
    shape, dt = tuple(meta["shape"]), DTYPES[meta["dtype"]]
    per = int(np.prod(shape)) * dt.itemsize
    if not path.is_file() or path.stat().st_size != per * meta["batches"]:
        raise UserError(
            f"resume: {path} is missing or has the wrong size (the work directory is damaged; "
            "remove it to start over)"
        )
    acts = Activations(meta["batches"], offload_dir)
    with open(path, "rb") as f:
        for b in range(meta["batches"]):
            raw = os.pread(f.fileno(), per, b * per)
            acts.put(b, jax.numpy.asarray(np.frombuffer(raw, dt).reshape(shape)))
    return acts


# -- layer shards ----------------------------------------------------------------------------


def _entries(
    loader: LayerLoader,
    group: int,
    flat: dict[str, Any],
    factors: bool,
    meta: dict,
    links: dict | None = None,
):
    """``write_safetensors`` entries for one group's rows (the family table backwards); with
    ``factors``, a factor equal to one written before in the group is linked in ``links``
    (:class:`jcompress.leaf_io.StoreOnce`), not written."""
    cfg = loader.cfg
    out = []
    once = StoreOnce()
    for rule, name, paths in loader._groups.get(group, []):
        leaves = [flat[p] for p in paths]
        for path, leaf, want in zip(paths, leaves, rule.jax_shapes(cfg), strict=True):
            if tuple(leaf.shape) != tuple(want):
                raise UserError(
                    f"params: leaf {path} has shape {list(leaf.shape)}, config implies "
                    f"{list(want)} (for HF tensor {name})"
                )
        if factors and any(isinstance(v, CompressedLeaf) for v in leaves):
            out.extend(hf._factor_entries(paths, leaves, meta, once))
            continue
        dtype = np.result_type(*[np.dtype(v.dtype) for v in leaves])

        def produce(rule=rule, leaves=leaves, dtype=dtype):
            return rule.transform.to_hf(*[hf._dense(v).astype(dtype, copy=False) for v in leaves])

        out.append((name, tuple(rule.hf_shape(cfg)), dtype, produce))
    if links is not None:
        links.update(once.links)
    return out


def _write_shard(path: Path, entries) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_safetensors(tmp, entries)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _placeholders(loader: LayerLoader) -> dict[str, jax.ShapeDtypeStruct]:
    return loader.shapes()


RULE_FIELDS = ("layers", "rules")
"""Config fields holding selection rules that :func:`stream_compress` scopes to one layer."""


def _rule_regexes(value: Any) -> list[str] | None:
    """The regexes of a rules field: a tuple of strings, or of ``(regex, choice)`` pairs."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple) and all(isinstance(r, str) for r in value):
        return list(value)
    if isinstance(value, tuple) and all(
        isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in value
    ):
        return [r[0] for r in value]
    return None


def _scoped(
    config: Any, fields: tuple[str, ...], prefix: str, *, outside: bool = False
) -> tuple[Any, dict[str, str]]:
    """``config`` with every rule of ``fields`` restricted to paths under ``prefix`` (or,
    with ``outside``, to paths not under it) by a lookahead, so ``re.fullmatch`` semantics
    and first-match order are kept, and ``allow_unmatched=True``; and ``{scoped regex:
    original regex}``."""
    look = f"(?{'!' if outside else '='}{re.escape(prefix)}(?:/|$))"
    kw: dict[str, Any] = {}
    back: dict[str, str] = {}
    for name in fields:
        value = getattr(config, name)
        if isinstance(value, str):
            value = (value,)
        if all(isinstance(r, str) for r in value):
            new = tuple(f"{look}(?:{r})" for r in value)
            back.update(zip(new, value, strict=True))
        else:
            new = tuple((f"{look}(?:{r})", c) for r, c in value)
            back.update({n[0]: o[0] for n, o in zip(new, value, strict=True)})
        kw[name] = new
    if "allow_unmatched" in {f.name for f in dataclasses.fields(config)}:
        kw["allow_unmatched"] = True
    return dataclasses.replace(config, **kw), back


def _check_rules(config: Any, fields: tuple[str, ...], paths: list[str]) -> None:
    """A rule that fully matches no module or param path of the model (every prefix of every
    param path) is an error before any work, unless the config allows unmatched rules (a
    rule that matches a path its method never considers is reported at the end)."""
    if getattr(config, "allow_unmatched", False):
        return
    modules = {"/".join(p.split("/")[:k]) for p in paths for k in range(1, p.count("/") + 2)}
    for name in fields:
        for r in _rule_regexes(getattr(config, name)) or []:
            rx = re.compile(r)
            if not any(rx.fullmatch(m) for m in modules):
                raise UserError(
                    f"{name}: rule {r!r} matches no path of this model (e.g. "
                    f"{min(m for m in modules if m.count('/') == 2)})"
                )


def _rebuild(value: Any, like: Any) -> Any:
    """A JSON value back into the shape of ``like`` (a dataclass, tuple or scalar)."""
    if dataclasses.is_dataclass(like) and isinstance(value, dict):
        kw = {}
        for f in dataclasses.fields(like):
            if f.init and f.name in value:
                kw[f.name] = _rebuild(value[f.name], getattr(like, f.name))
        return type(like)(**kw)
    if isinstance(value, list):
        inner = like[0] if isinstance(like, tuple) and like else None
        return tuple(_rebuild(v, inner) for v in value)
    return value


def _merge_reports(objs: dict[int, Any], steps: list[dict[str, Any]]) -> Any:
    """The method's whole-model report from per-layer ones, for a dataclass report: every
    tuple field (``layers``, ``projections``, ...) holds the concatenation of the steps'
    entries (rebuilt from JSON for layers finished by an earlier process), every
    ``X_before`` / ``X_after`` integer pair (``params_*``, ``kv_cache_*``) gets
    ``before + sum of the steps' changes``, ``compress_seconds`` the steps' sum. ``None``
    when there is nothing to merge from (all layers finished by an earlier process) or the
    report is not a dataclass."""
    if not objs:
        return None
    last = objs[max(objs)]
    if not dataclasses.is_dataclass(last):
        return None
    kw: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(last) if f.init}
    for name in fields:
        value = getattr(last, name)
        if name == "unmatched_rules" or not isinstance(value, tuple):
            continue
        like = next((getattr(o, name) for o in objs.values() if getattr(o, name)), ())
        if all(isinstance(st.get(name), dict) for st in steps):  # pairs stored as a mapping
            kw[name] = tuple((k, v) for st in steps for k, v in st[name].items())
            continue
        if not all(isinstance(st.get(name), list) for st in steps):
            continue
        kw[name] = tuple(_rebuild(v, like[0] if like else None) for st in steps for v in st[name])
        if (
            like
            and dataclasses.is_dataclass(like[0])
            and any(not isinstance(v, dict) for st in steps for v in st[name])
        ):
            return None
    for name in fields:
        if name.endswith("_after") and (b := name[: -len("_after")] + "_before") in fields:
            if all(isinstance(st.get(name), int) and isinstance(st.get(b), int) for st in steps):
                kw[name] = getattr(last, b) + sum(st[name] - st[b] for st in steps)
    if "compress_seconds" in fields:
        kw["compress_seconds"] = sum(st.get("compress_seconds", 0.0) for st in steps)
    try:
        return dataclasses.replace(last, **kw)
    except (TypeError, ValueError):
        return None


def _process_zero_alone(fn: Callable[..., StreamResult]) -> Callable[..., StreamResult | None]:
    """``fn`` run by :func:`~jcompress.atomic.on_writer`: process 0 alone (with no mesh spanning
    the waiting processes in a multi-host run), the others wait and return ``None``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> StreamResult | None:
        def run() -> StreamResult:
            with contextlib.ExitStack() as stack:
                if process_count() > 1:
                    stack.enter_context(use_mesh(None))
                return fn(*args, **kwargs)

        return on_writer(run)

    return wrapper


@_process_zero_alone
def stream_compress(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    compress: Callable[..., tuple[Any, Any]],
    *,
    config: Any,
    calib: Any = None,
    method: str | None = None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    factors: bool = False,
    dtype: Any = None,
    overwrite: bool = False,
    offload_dir: str | os.PathLike | None = None,
    progress: bool = True,
    marker: bool = False,
    on_layer: Callable[[int], None] | None = None,
    rule_fields: tuple[str, ...] | None = None,
    globals_step: bool = False,
) -> StreamResult | None:
    """Compress a checkpoint layer by layer with peak memory ~ one layer (module docstring).

    In a multi-host run process 0 runs it (the work directory and the output are its own;
    streaming runs on one device), and the other processes wait for it and return ``None``
    (or raise its error).

    Args:
      model_dir: the input checkpoint (safetensors, possibly sharded).
      out_dir: where the compressed checkpoint goes (atomically, when every layer is done).
      compress: the method's ``compress(params, cfg, calib, *, config, progress)``.
      config: the method's config.
      calib: ``[nsamples, seqlen]`` calibration token ids (``None`` for data-free methods).
      method: a name for the manifest and report (default: ``compress``'s module).
      work_dir: the resumable state (layer shards, next inputs, manifest); default
        ``<out_dir>.stream`` next to ``out_dir``. Removed after success.
      resume: continue the run recorded in ``work_dir``. Without it an existing
        ``work_dir`` is an error (never silently reused or deleted).
      factors: keep typed leaves as factors (``save_hf(factors=True)``'s form) instead of
        writing the dense-equivalent checkpoint.
      dtype: load dtype (as :func:`jcompress.load_hf`).
      overwrite: replace an existing ``out_dir`` (as :func:`jcompress.save_hf`).
      offload_dir: keep the calibration inputs of the current layer in a temporary file in
        this directory (the method's own stores follow its config's ``offload_dir``).
      progress: a progress bar over layers.
      marker: write :data:`jcompress.outputs.MARKER` into ``out_dir`` (the CLI does).
      on_layer: called with each finished layer's index after its manifest is written.
      rule_fields: config fields holding regex selection rules (strings, or ``(regex,
        choice)`` pairs) over ``/``-joined paths; on layer ``i`` each rule is restricted to
        paths under ``model/layers/i`` and unmatched rules are allowed, so a method that
        selects over every layer's paths sees only this layer's. A rule matching no path of
        the model is an error up front; one no layer's step used is listed in the report's
        ``unmatched_rules`` (and warned about). Default: whichever of :data:`RULE_FIELDS`
        the config has.
      globals_step: before the layers, run the method once on the globals (embeddings,
        final norm, head; every layer a placeholder, rules scoped to paths outside the
        layers), for data-free methods that may compress the head (quantization). Off: the
        globals are written as they are.

    Returns:
      :class:`StreamResult` (``None`` on processes other than 0 of a multi-host run).

    Raises:
      UserError: a bad checkpoint (see :class:`LayerLoader`), an ``out_dir`` the output guard
        refuses, an existing ``work_dir`` without ``resume``, a ``work_dir`` written for
        another method, config, calibration set, dtype, output form or model, or a method
        that cannot run on one layer.
    """

    t0 = time.perf_counter()
    out_dir, model_dir = Path(out_dir), Path(model_dir)
    loader = LayerLoader(model_dir, dtype=dtype)
    check_output_dir(
        out_dir, inputs={"model_dir": model_dir}, overwrite=overwrite, arg="out_dir",
        require_marker=False,
    )  # fmt: skip
    if offload_dir is not None and not os.path.isdir(offload_dir):
        raise UserError(f"offload_dir: {offload_dir} is not a directory")
    offload = None if offload_dir is None else str(offload_dir)
    method = method or getattr(compress, "__module__", None) or repr(compress)
    work = Path(work_dir) if work_dir is not None else out_dir.with_name(out_dir.name + ".stream")
    if work.resolve() == model_dir.resolve() or work.resolve() == out_dir.resolve():
        raise UserError(f"work_dir: {work} must differ from the model and output directories")
    names = (
        {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    )
    if rule_fields is None:
        rule_fields = tuple(
            f for f in RULE_FIELDS if f in names and _rule_regexes(getattr(config, f)) is not None
        )
    for f in rule_fields:
        if f not in names or _rule_regexes(getattr(config, f)) is None:
            raise UserError(f"rule_fields: {f!r} is not a rules field of {type(config).__name__}")
    shapes = _placeholders(loader)
    _check_rules(config, rule_fields, list(shapes))
    ident = _identity(method, config, calib, loader.dtype, factors, model_dir)
    ident["globals_step"] = bool(globals_step)
    mpath = work / MANIFEST
    existed = work.exists()
    manifest = _open_work(work, ident, resume, {"layers": {}, "hidden": None})

    with _dropped_on_broken_input(work, existed), _locked(work):
        return _run(loader, compress, config, calib, method, work, mpath, manifest, shapes,
                    rule_fields, out_dir, factors, offload, progress, on_layer, globals_step,
                    overwrite=overwrite, marker=marker, t0=t0)  # fmt: skip


@contextlib.contextmanager
def _dropped_on_broken_input(work: Path | None, existed: bool):
    """A run that stops on broken input (:class:`~jcompress.validate.NonFiniteInput`: NaN /
    Inf weights or activations, which a resume would meet again) removes the work directory
    it created, so the rerun after a fix starts clean instead of being told to resume."""
    try:
        yield
    except NonFiniteInput:
        if work is not None and not existed:
            shutil.rmtree(work, ignore_errors=True)
        raise


def _open_work(work: Path, ident: dict[str, Any], resume: bool, fresh: dict[str, Any]
               ) -> dict[str, Any]:  # fmt: skip
    """The manifest of work directory ``work``: a new one (``{"identity": ident, "done": [],
    **fresh}``, written with the output marker) when ``work`` does not exist, else the
    recorded one when ``resume`` is set and its identity equals ``ident``; anything else is
    one :class:`UserError`. Shared by :func:`stream_compress` and
    :func:`jcompress.streaming.stream_analysis`."""
    mpath = work / MANIFEST
    if work.exists():
        if not mpath.is_file():
            raise UserError(
                f"work_dir: {work} exists and holds no {MANIFEST}; refusing to use it "
                "(remove it or choose another work_dir)"
            )
        if not resume:
            raise UserError(
                f"work_dir: {work} holds an unfinished streamed run; pass resume=True "
                "(--resume) to continue it, or remove the directory to start over"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(
                f"resume: {mpath} is not valid JSON (remove {work} to start over)"
            ) from None
        diff = _differences(manifest.get("identity", {}), ident)
        if diff:
            raise UserError(
                f"resume: {work} was written by a different run; differs in: "
                f"{', '.join(diff[:4])}{' ...' if len(diff) > 4 else ''} "
                "(resume with the same method, config, calibration data and model, or "
                "remove the directory to start over)"
            )
        return manifest
    work.mkdir(parents=True)
    write_marker(work)
    manifest = {"identity": ident, "done": [], **fresh}
    write_json(mpath, manifest, arg="work_dir")
    return manifest


@contextlib.contextmanager
def _locked(work: Path):
    """One run per work directory: ``work/.lock`` holds the owner's pid (a dead owner's lock
    is taken over)."""
    lock = work / ".lock"
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise UserError(
                    f"work_dir: {work} is in use by process {pid} (another run of the same output?)"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        break
    else:
        raise UserError(f"work_dir: cannot lock {work}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run(loader, compress, config, calib, method, work, mpath, manifest, shapes, rule_fields,
         out_dir, factors, offload, progress, on_layer, globals_step, *, overwrite, marker,
         t0) -> StreamResult:  # fmt: skip
    """The layer loop of :func:`stream_compress` (the work directory is locked)."""
    cfg = loader.cfg
    stem = hf.FACTORS_STEM if factors else "model"
    n_layers = cfg.num_layers
    start = len(manifest["done"])
    if manifest["done"] != list(range(start)):
        raise UserError(f"resume: {mpath} lists finished layers out of order (remove {work})")
    for i in range(start):
        if not (work / manifest["layers"][str(i)]["file"]).is_file():
            raise UserError(f"resume: {work} lacks the shard of finished layer {i} (remove it)")
    root = spec_for(cfg.family.value).layout.layers
    hidden = None
    if calib is not None and start > 0 and start < n_layers:
        if manifest.get("hidden") is None:
            raise UserError(f"resume: {mpath} records no inputs for layer {start} (remove {work})")
        hidden = _load_hidden(work, manifest["hidden"], offload)
    objs: dict[int, Any] = {}
    if globals_step and "globals" not in manifest:
        _globals_step(loader, compress, config, rule_fields, shapes, method, work, stem,
                      factors, manifest, objs)  # fmt: skip
        write_json(mpath, manifest, arg="work_dir")
    bar = tqdm(range(start, n_layers), desc=f"stream {method}", disable=not progress, leave=False)
    try:
        for i in bar:
            lflat = loader.layer(i)
            gflat = loader.globals(loader.embed_modules()) if (i == 0 and calib is not None) else {}
            flat_in = {**shapes, **gflat, **lflat}
            tree = unflatten(flat_in)
            with warnings.catch_warnings():
                if i > start:  # a rule / averaging warning repeats per layer: show it once
                    warnings.simplefilter("ignore")
                # scoped rules unmatched in one layer are expected; the end reports the rest
                warnings.filterwarnings("ignore", message=r"\w+: rule '\(\?=")
                step_config, back = _scoped(config, rule_fields, f"{root}/{i}")
                with single_layer(i, hidden) as handoff:
                    hidden = None  # owned by the stream from here, if it runs
                    try:
                        new_tree, rep = compress(
                            tree, cfg, calib, config=step_config, progress=False
                        )
                    except (TypeError, AttributeError) as e:
                        if "ShapeDtypeStruct" not in str(e):
                            raise
                        raise UserError(
                            f"{method}: reads params outside the layer being streamed "
                            f"({root}/{i}); it cannot run layer by layer"
                        ) from None
                    except RuntimeError as e:
                        if "single_layer" in str(e) or "more than once per layer" in str(e):
                            raise UserError(f"{method}: {e}") from None
                        raise
            if handoff.used and handoff.outputs is None:
                raise UserError(f"{method}: stopped streaming before finishing layer {i}")
            hidden = handoff.outputs if handoff.used else handoff.hidden
            if calib is not None and not handoff.used and hidden is None and i < n_layers - 1:
                # layer 0 without a stream (nothing selected there): embed as the stream would
                bs = getattr(config, "batch_size", 8)
                g = unflatten(gflat)
                bl = batches(np.asarray(calib), bs, multiple=data_size())  # as the stream
                hidden = Activations(len(bl), offload)
                for b, batch in enumerate(bl):
                    hidden.put(b, embed(cfg, g, jax.numpy.asarray(batch.ids)))
                del g
            new_flat = flatten(new_tree)
            for p, v in new_flat.items():
                if layer_of(cfg, p) != i and v is not flat_in.get(p, None):
                    raise UserError(
                        f"{method}: changes {p}, outside the layer being streamed "
                        f"({root}/{i}); it cannot run layer by layer"
                    )
            del gflat, tree, flat_in
            loader.release(GLOBAL)
            if calib is not None and not handoff.used and i < n_layers - 1:
                # a method that did not stream: the next layer gets the original's outputs
                lp = get_path(unflatten(lflat), f"{root}/{i}")
                for b in range(len(hidden)):
                    hidden.put(b, apply_layer(cfg, lp, hidden.get(b), i))
            layer_new = {p: v for p, v in new_flat.items() if layer_of(cfg, p) == i}
            missing = sorted(set(loader.paths(i)) - set(layer_new))
            if missing:
                raise UserError(f"{method}: dropped {missing[0]} from the layer")
            fmeta: dict[str, Any] = {}
            flinks: dict[str, str] = {}
            entries = _entries(loader, i, layer_new, factors, fmeta, flinks)
            fname = f"{stem}-layer-{i:05d}.safetensors"
            _write_shard(work / fname, entries)
            step = rep.to_json() if hasattr(rep, "to_json") else {}
            if isinstance(step.get("unmatched_rules"), list):  # back to the user's regexes
                step["unmatched_rules"] = [back.get(r, r) for r in step["unmatched_rules"]]
            objs[i] = rep
            prev = manifest.get("hidden")
            if calib is not None and i < n_layers - 1:
                manifest["hidden"] = _save_hidden(work / f"inputs-{i + 1:05d}.bin", hidden)
            else:
                manifest["hidden"] = None
            manifest["layers"][str(i)] = {
                "file": fname,
                "tensors": {e[0]: [CODES[np.dtype(e[2])], list(e[1])] for e in entries},
                "factors": fmeta,
                "links": flinks,
                "report": step,
            }
            manifest["done"].append(i)
            write_json(mpath, manifest, arg="work_dir")  # the commit point of layer i
            if prev is not None and prev["file"] != (manifest["hidden"] or {}).get("file"):
                (work / prev["file"]).unlink(missing_ok=True)
            del lflat, new_tree, new_flat, layer_new, entries
            loader.release(i)
            bar.set_postfix(layer=i)
            if on_layer is not None:
                on_layer(i)
    finally:
        if hidden is not None:
            hidden.close()
    report = _finish(loader, manifest, objs, method, out_dir, work, stem, factors,
                     overwrite=overwrite, marker=marker, start=start, t0=t0)  # fmt: skip
    return StreamResult(out_dir, report)


def _globals_step(loader, compress, config, rule_fields, shapes, method, work, stem, factors,
                  manifest, objs) -> None:  # fmt: skip
    """Run the method on the globals (every layer a placeholder); write their shard."""
    cfg = loader.cfg
    root = spec_for(cfg.family.value).layout.layers
    gflat = loader.globals()
    flat_in = {**shapes, **gflat}
    step_config, back = _scoped(config, rule_fields, root, outside=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\w+: rule '\(\?")
        try:
            new_tree, rep = compress(unflatten(flat_in), cfg, None, config=step_config,
                                     progress=False)  # fmt: skip
        except (TypeError, AttributeError) as e:
            if "ShapeDtypeStruct" not in str(e):
                raise
            raise UserError(
                f"{method}: reads decoder-layer params in the globals step; it cannot run "
                "with globals_step"
            ) from None
    new_flat = flatten(new_tree)
    for p, v in new_flat.items():
        if layer_of(cfg, p) != GLOBAL and v is not flat_in.get(p, None):
            raise UserError(f"{method}: changes {p} in the globals step")
    fmeta: dict[str, Any] = {}
    flinks: dict[str, str] = {}
    gnew = {p: v for p, v in new_flat.items() if layer_of(cfg, p) == GLOBAL}
    entries = _entries(loader, GLOBAL, gnew, factors, fmeta, flinks)
    fname = f"{stem}-globals.safetensors"
    _write_shard(work / fname, entries)
    step = rep.to_json() if hasattr(rep, "to_json") else {}
    if isinstance(step.get("unmatched_rules"), list):
        step["unmatched_rules"] = [back.get(r, r) for r in step["unmatched_rules"]]
    objs[GLOBAL] = rep
    manifest["globals"] = {
        "file": fname,
        "tensors": {e[0]: [CODES[np.dtype(e[2])], list(e[1])] for e in entries},
        "factors": fmeta,
        "links": flinks,
        "report": step,
    }
    del gflat, flat_in, new_tree, new_flat, gnew, entries
    loader.release(GLOBAL)


def _finish(loader, manifest, objs, method, out_dir, work, stem, factors, *, overwrite, marker,
            start, t0) -> StreamReport:  # fmt: skip
    """Globals shard, index, config.json (+ factor entry), tokenizer files: ``out_dir``."""
    cfg = loader.cfg
    grec = manifest.get("globals")
    fmeta: dict[str, Any] = {}
    flinks: dict[str, str] = {}  # factor tensors stored once, per shard (older manifests: none)
    if grec is None:
        gflat = loader.globals()
        gentries = _entries(loader, GLOBAL, gflat, factors, fmeta, flinks)
    else:  # written by the globals step
        gflat, gentries = {}, []
        fmeta.update(grec["factors"])
        flinks.update(grec.get("links", {}))
    weight_map: dict[str, str] = {}
    dtypes: list[tuple[str, tuple[int, ...], np.dtype, None]] = []
    total = 0
    for i in range(cfg.num_layers):
        rec = manifest["layers"][str(i)]
        fmeta.update(rec["factors"])
        flinks.update(rec.get("links", {}))
        for name, (code, shape) in rec["tensors"].items():
            weight_map[name] = rec["file"]
            dtypes.append((name, tuple(shape), DTYPES[code], None))
            total += int(np.prod(shape)) * DTYPES[code].itemsize
    gname = f"{stem}-globals.safetensors"
    for e in gentries:
        weight_map[e[0]] = gname
        dtypes.append((e[0], e[1], np.dtype(e[2]), None))
    if grec is not None:
        for name, (code, shape) in grec["tensors"].items():
            weight_map[name] = gname
            dtypes.append((name, tuple(shape), DTYPES[code], None))
            total += int(np.prod(shape)) * DTYPES[code].itemsize
    config = hf._config_dict(cfg, dtypes)
    config.pop(hf.FACTORS_KEY, None)
    if factors and flinks:
        config[hf.FACTORS_KEY] = {"format": 2, "leaves": fmeta, "links": flinks}
    elif factors:
        config[hf.FACTORS_KEY] = {"format": 1, "leaves": fmeta}
    steps = [manifest["layers"][str(i)]["report"] for i in range(cfg.num_layers)]
    if grec is not None:
        steps.insert(0, grec["report"])
    merged = _merge_reports(objs, steps)
    unmatched: tuple[str, ...] = ()
    if steps and all(isinstance(st.get("unmatched_rules"), list) for st in steps):
        common = set(steps[0]["unmatched_rules"])
        for st in steps[1:]:
            common &= set(st["unmatched_rules"])
        unmatched = tuple(r for r in steps[0]["unmatched_rules"] if r in common)
    if unmatched:
        warnings.warn(
            f"{method}: rules that selected nothing in any layer: {', '.join(unmatched)}",
            stacklevel=3,
        )
    if merged is not None and hasattr(merged, "unmatched_rules"):
        merged = dataclasses.replace(merged, unmatched_rules=unmatched)
    report = StreamReport(
        method=method,
        layers=tuple(steps),
        method_report=merged,
        peak_loaded_bytes=loader.peak_bytes,
        max_layer_bytes=max(loader.group_bytes.get(i, 0) for i in range(cfg.num_layers)),
        globals_bytes=loader.group_bytes.get(GLOBAL, 0),
        model_bytes=sum(loader.group_bytes.values()),
        resumed_from=start,
        seconds=time.perf_counter() - t0,
        unmatched_rules=unmatched,
    )
    with atomic_dir(out_dir, overwrite=overwrite, arg="out_dir", marker=marker) as tmp:
        if grec is None:
            total += write_safetensors(tmp / gname, gentries)
        else:
            try:
                os.link(work / gname, tmp / gname)
            except OSError:
                shutil.copy2(work / gname, tmp / gname)
        del gflat, gentries
        loader.release(GLOBAL)
        for i in range(cfg.num_layers):
            f = manifest["layers"][str(i)]["file"]
            try:
                os.link(work / f, tmp / f)
            except OSError:
                shutil.copy2(work / f, tmp / f)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        loader.copy_tokenizer(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    shutil.rmtree(work)  # ours: created with a manifest and marker by this function
    return report
