"""Cached inputs / outputs ``(X, Y)`` of every measured linear: writing (``save_xy``) and reading.

Keys are ``{module_path}.X`` (``[N, in]``) and ``{module_path}.Y`` (``[N, out]``), the HF module
path of :mod:`~jcompress.quant.tokenwise.targets`, with ``N = (cn + eu) * length`` tokens.
Two layouts, both read back by :class:`XYCache`:

* ``single``: one ``{save_path}/{label}.safetensors`` (the seed's);
* ``per_layer``: a directory ``{save_path}/{label}/`` of ``{label}_{i}.safetensors``, one per
  decoder layer (the author's later version: memory flat in layers while writing and reading).

Every file's ``__metadata__`` holds ``seed``, ``cn``, ``eu``, ``length``, ``save_dtype``,
``layout``, ``key_format`` and the model's identity (``model_type``, ``num_layers``,
``hidden_size``, ``vocab_size``); :meth:`XYCache.check_model` compares them with the model
being evaluated and spot-checks ``Y = X W + b`` on the first tokens of every projection, so a
cache written for another model is one clear error before any work.

Representative inputs: ``cn`` windows of ``length`` tokens from the first text and ``eu`` from
the second (the seed's Chinese / other-language split), drawn by
:func:`jcompress.data.calib.calibration_windows` with ``seed``; both texts ship with the
package (:func:`default_texts`) and can be replaced by any ``.txt`` / ``.jsonl`` file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jcompress.calibration import stream_layers
from jcompress.errors import UserError, naming
from jcompress.models.config import ModelConfig
from jcompress.models.forward import Capture
from jcompress.models.safetensors_io import SafetensorsFile, write_safetensors
from jcompress.quant.tokenwise.targets import Target, layer_targets

__all__ = [
    "SAVE_DTYPES",
    "SaveXYConfig",
    "XYCache",
    "default_texts",
    "representative_windows",
    "save_xy",
    "stream_save_xy",
]

SAVE_DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}
LAYOUTS = ("single", "per_layer")
KEY_FORMAT = "{module_path}.X/.Y"
_LAYER_FILE = re.compile(r"^(?P<label>.+)_(?P<layer>\d+)\.safetensors$")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_texts() -> tuple[Path, Path]:
    """The bundled representative texts: (Chinese, other languages)."""
    root = resources.files("jcompress.quant") / "data"
    return Path(str(root / "cn.txt")), Path(str(root / "eu.txt"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SaveXYConfig:
    """Settings of ``save_xy``.

    Attributes:
      seed: seed of the window draw.
      cn: windows from the first (Chinese) text.
      eu: windows from the second (other-language) text.
      length: tokens per window.
      save_dtype: dtype of the stored X / Y: fp16, bf16 or fp32.
      layout: single (one file) or per_layer (a directory, one file per decoder layer).
      batch_size: windows per forward call.
      cn_text: the first text (.txt / .jsonl; default: the bundled one).
      eu_text: the second text (default: the bundled one).
    """

    seed: int = 0
    cn: int = 50
    eu: int = 80
    length: int = 128
    save_dtype: str = "fp16"
    layout: str = "single"
    batch_size: int = 8
    cn_text: str | None = None
    eu_text: str | None = None

    def __post_init__(self):
        for f in ("cn", "eu"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"--{f}: must be an integer >= 0, got {v!r}")
        if self.cn + self.eu == 0:
            raise UserError("--cn / --eu: at least one window is needed (both are 0)")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 2:
            raise UserError(f"--length: must be an integer >= 2, got {self.length!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UserError(f"--save_dtype: must be one of {', '.join(SAVE_DTYPES)}, "
                            f"got {self.save_dtype!r}")  # fmt: skip
        if self.layout not in LAYOUTS:
            raise UserError(f"--layout: must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or (self.batch_size < 1)
        ):
            raise UserError(f"--batch_size: must be a positive integer, got {self.batch_size!r}")

    def texts(self) -> tuple[Path, Path]:
        cn, eu = default_texts()
        return (Path(self.cn_text) if self.cn_text else cn,
                Path(self.eu_text) if self.eu_text else eu)  # fmt: skip


def representative_windows(tokenizer: Any, config: SaveXYConfig) -> np.ndarray:
    """``[cn + eu, length]`` token ids: ``cn`` windows of the first text, then ``eu``."""
    from jcompress.data.calib import calibration_windows
    from jcompress.data.text import load_tokens

    parts = []
    length = config.length
    for n, path, arg, count in zip((config.cn, config.eu), config.texts(),
                                   ("--cn_text", "--eu_text"), ("--cn", "--eu"),
                                   strict=True):  # fmt: skip
        if n == 0:
            continue
        if not Path(path).is_file():
            raise UserError(f"{arg}: {path} is not a file")
        with naming(arg):  # an unreadable / non-UTF-8 text names its flag
            ids = load_tokens(path, tokenizer)
        parts.append(calibration_windows(ids, n, length, seed=config.seed, nsamples_arg=count,
                                         seqlen_arg="--length", text=f"{arg} {path}"))  # fmt: skip
    return np.concatenate(parts).astype(np.int32)


def model_meta(cfg: ModelConfig) -> dict[str, str]:
    """The model fields a cache (and every result measured on it, ``meta.xy_meta``) records,
    as strings: ``model_type``, ``num_layers``, ``hidden_size``, ``vocab_size``."""
    return {
        "model_type": str((cfg.hf_config or {}).get("model_type", cfg.family.value)),
        "num_layers": str(cfg.num_layers),
        "hidden_size": str(cfg.hidden_size),
        "vocab_size": str(cfg.vocab_size),
    }


def check_model_meta(meta: Any, cfg: ModelConfig, *, arg: str, what: str) -> None:
    """One clear error when ``meta`` (a cache's metadata or a result's ``xy_meta``) records a
    :func:`model_meta` field that differs from ``cfg``'s; fields it lacks are not checked.

    Raises:
      UserError: ``"{arg}: {what} another model (num_layers=4, this model has ...)"``, e.g.
        ``what="the cache was written for"``.
    """
    if not isinstance(meta, Mapping):
        return
    for k, v in model_meta(cfg).items():
        have = meta.get(k)
        if have is not None and str(have) != v:
            raise UserError(f"{arg}: {what} another model ({k}={have}, this model has {k}={v})")


def _is_cache(path) -> bool:
    from jcompress.outputs import safetensors_metadata

    return safetensors_metadata(path, key_format=KEY_FORMAT)


CACHE_OWNER = (_is_cache, "a save_xy activation cache")
"""``check_output_file``'s ``owner`` for a one-file cache: ``--overwrite`` replaces only a
file whose metadata records this cache's key format."""


def _metadata(cfg: ModelConfig, config: SaveXYConfig) -> dict[str, str]:
    return {
        "seed": str(config.seed),
        "cn": str(config.cn),
        "eu": str(config.eu),
        "length": str(config.length),
        "save_dtype": config.save_dtype,
        "layout": config.layout,
        "key_format": KEY_FORMAT,
        **model_meta(cfg),
    }


def _capture(ts: list[Target]) -> tuple[Capture, dict[str, str]]:
    """One Capture for a layer's targets and, per target, the path whose input is ``X``."""
    in_paths = {t.name: t.parts[0] for t in ts}
    outs = sorted({p for t in ts for p in t.parts})
    cap = Capture(
        inputs="|".join(re.escape(p) for p in sorted(set(in_paths.values()))),
        outputs="|".join(re.escape(p) for p in outs),
    )
    return cap, in_paths


def _collect_layer(layer, ts: list[Target], np_dtype) -> dict[str, np.ndarray]:
    cap, in_paths = _capture(ts)
    xs: dict[str, list[np.ndarray]] = {t.name: [] for t in ts}
    ys: dict[str, list[np.ndarray]] = {t.name: [] for t in ts}
    for ob in layer.observe(cap):
        for t in ts:
            x = ob.captured["inputs"][in_paths[t.name]][: ob.real]
            y = jnp.concatenate([ob.captured["outputs"][p][: ob.real] for p in t.parts], -1)
            xs[t.name].append(np.asarray(x.reshape(-1, x.shape[-1]).astype(jnp.float32)))
            ys[t.name].append(np.asarray(y.reshape(-1, y.shape[-1]).astype(jnp.float32)))
    out = {}
    for t in ts:
        out[f"{t.name}.X"] = np.concatenate(xs[t.name]).astype(np_dtype)
        out[f"{t.name}.Y"] = np.concatenate(ys[t.name]).astype(np_dtype)
    return out


def _write(path: Path, tensors: Mapping[str, np.ndarray], meta: dict[str, str]) -> None:
    entries = [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in tensors.items()]
    write_safetensors(path, entries, metadata=meta)


def output_path(save_path: str | os.PathLike, label: str, layout: str) -> Path:
    """Where ``save_xy`` writes: ``{save_path}/{label}.safetensors`` or ``{save_path}/{label}``."""
    if not isinstance(label, str) or not _LABEL.match(label):
        raise UserError(f"--label: must be letters, digits, '.', '_' or '-', got {label!r}")
    base = Path(save_path)
    return base / f"{label}.safetensors" if layout == "single" else base / label


def save_xy(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    windows: np.ndarray,
    save_path: str | os.PathLike,
    label: str,
    *,
    config: SaveXYConfig = SaveXYConfig(),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run the model on ``windows`` layer by layer (:func:`jcompress.calibration.stream_layers`)
    and save ``X`` / ``Y`` of every measured linear (see the module doc). Atomic: a file is
    written to a temporary sibling and renamed; a directory is built by
    :func:`jcompress.atomic.atomic_dir`.

    Returns:
      The written file (``single``) or directory (``per_layer``).
    """
    dest = _check_dest(save_path, label, config, overwrite)
    stream = stream_layers(cfg, params, windows, batch_size=config.batch_size)
    return _save(cfg, stream, dest, label, config, overwrite, progress)


def stream_save_xy(
    model: Any,
    windows: np.ndarray,
    save_path: str | os.PathLike,
    label: str,
    *,
    config: SaveXYConfig = SaveXYConfig(),
    overwrite: bool = False,
    progress: bool = True,
    dtype: Any = None,
    offload_dir: str | os.PathLike | None = None,
) -> Path:
    """:func:`save_xy` reading the checkpoint one decoder layer at a time
    (:func:`jcompress.streaming.stream_layers_from`: the weights held are one layer, plus the
    embedding table while the windows are embedded). The same files as :func:`save_xy`; with
    ``layout="per_layer"`` each layer's file is written before the next layer is read, so
    host memory is one layer plus its X / Y (``single`` holds every X / Y until the one file
    is written, as in memory). Not resumable.

    Args:
      model: checkpoint directory (safetensors) or a
        :class:`~jcompress.streaming.LayerLoader` (its account shows what was held).
      windows, save_path, label, config, overwrite, progress: as for :func:`save_xy`.
      dtype: load dtype (as :func:`jcompress.load_hf`); ignored when ``model`` is a loader.
      offload_dir: keep the windows' hidden states in a temporary file in this directory.
    """
    from jcompress.streaming import LayerLoader, stream_layers_from

    dest = _check_dest(save_path, label, config, overwrite)
    loader = model if isinstance(model, LayerLoader) else LayerLoader(model, dtype=dtype)
    stream = stream_layers_from(loader, windows, batch_size=config.batch_size,
                                offload_dir=offload_dir)  # fmt: skip
    return _save(loader.cfg, stream, dest, label, config, overwrite, progress)


def _check_dest(save_path, label: str, config: SaveXYConfig, overwrite: bool) -> Path:
    from jcompress.outputs import check_output_dir, check_output_file

    dest = output_path(save_path, label, config.layout)
    if config.layout == "single":
        check_output_file(dest, overwrite=overwrite, arg="--save_path/--label", owner=CACHE_OWNER)
    else:
        check_output_dir(dest, overwrite=overwrite, arg="--save_path/--label")
    return dest


def _save(cfg, stream, dest: Path, label: str, config: SaveXYConfig, overwrite: bool,
          progress: bool) -> Path:  # fmt: skip
    """Collect every layer of ``stream`` (StreamLayers) and write the cache at ``dest``."""
    from jcompress.atomic import atomic_dir, on_writer

    np_dtype = SAVE_DTYPES[config.save_dtype]
    meta = _metadata(cfg, config)
    bar = tqdm(total=cfg.num_layers, desc="save_xy", disable=not progress, unit="layer")
    if config.layout == "per_layer":
        with atomic_dir(dest, overwrite=overwrite, arg="--save_path/--label") as tmp:
            with contextlib.closing(stream):
                for layer in stream:
                    tensors = _collect_layer(layer, layer_targets(cfg, layer.index), np_dtype)
                    _write(tmp / f"{label}_{layer.index}.safetensors", tensors, meta)
                    del tensors
                    bar.update()
        bar.close()
        return dest
    tensors: dict[str, np.ndarray] = {}
    with contextlib.closing(stream):
        for layer in stream:
            tensors.update(_collect_layer(layer, layer_targets(cfg, layer.index), np_dtype))
            bar.update()
    bar.close()

    def write() -> None:  # in a multi-host run: on process 0 only
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        try:
            _write(tmp, tensors, meta)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    on_writer(write, path=dest, arg="--save_path/--label")
    return dest


class XYCache:
    """Read-only view of a ``save_xy`` cache (a ``.safetensors`` file or a per-layer directory).

    Raises:
      UserError: a missing path, a directory without ``{label}_{i}.safetensors`` files, mixed
        labels, missing layers, files with different metadata, or a corrupt file.
    """

    def __init__(self, path: str | os.PathLike, *, arg: str = "--xy_path"):
        self.path = Path(path)
        self.arg = arg
        if self.path.is_dir():
            found: dict[int, Path] = {}
            labels = set()
            for f in sorted(self.path.iterdir()):
                m = _LAYER_FILE.match(f.name)
                if m and f.is_file():
                    labels.add(m["label"])
                    found[int(m["layer"])] = f
            if not found:
                raise UserError(f"{arg}: {self.path} holds no {{label}}_{{i}}.safetensors files")
            if len(labels) > 1:
                raise UserError(f"{arg}: {self.path} mixes caches {sorted(labels)}")
            n = max(found) + 1
            gaps = [i for i in range(n) if i not in found]
            if gaps:
                raise UserError(f"{arg}: {self.path} lacks the files of layers {gaps}")
            self.files = [SafetensorsFile(found[i]) for i in range(n)]
            self.layout = "per_layer"
        elif self.path.is_file():
            self.files = [SafetensorsFile(self.path)]
            self.layout = "single"
        else:
            raise UserError(f"{arg}: {self.path} does not exist")
        metas = {tuple(sorted(f.metadata.items())) for f in self.files}
        if len(metas) != 1:
            raise UserError(f"{arg}: the files in {self.path} were written by different runs")
        self.meta: dict[str, str] = dict(self.files[0].metadata)
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        """The stored array (memory-mapped; ``[N, d]``)."""
        if key not in self._where:
            raise UserError(f"{self.arg}: {self.path} has no tensor {key}")
        a = self._where[key].get(key)
        return a.reshape(-1, a.shape[-1]) if a.ndim == 3 else a

    def release(self, key: str) -> None:
        self._where[key].release(key)

    def check_model(self, cfg: ModelConfig, ts: list[Target]) -> None:
        """Metadata and every ``{name}.X`` / ``.Y`` key present with matching shapes; one clear
        error otherwise (before any work)."""
        check_model_meta(self.meta, cfg, arg=self.arg, what="the cache was written for")
        missing = [f"{t.name}.{s}" for t in ts for s in "XY" if f"{t.name}.{s}" not in self]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"{self.arg}: {self.path} has no tensor {missing[0]}{more}")
        for t in ts:
            xs, ys = self.shape(f"{t.name}.X"), self.shape(f"{t.name}.Y")
            if xs[:-1] != ys[:-1] or len(xs) not in (2, 3):
                raise UserError(f"{self.arg}: {t.name}.X{list(xs)} and .Y{list(ys)} disagree")

    def spot_check(self, name: str, w: Any, b: Any, inv_scale: Any = None, n: int = 32) -> None:
        """``Y ~ (X / s) W + b`` on the first ``n`` tokens, within the rounding of the cache's
        storage dtype and of the weights (:func:`spot_tolerance`): a cache written for another
        model (or other weights) is an error."""
        x = np.asarray(self.get(f"{name}.X")[:n], np.float32)
        y = np.asarray(self.get(f"{name}.Y")[:n], np.float32)
        if x.shape[-1] != w.shape[0] or y.shape[-1] != w.shape[1]:
            raise UserError(
                f"{self.arg}: {name}: cached X{list(x.shape)} / Y{list(y.shape)} do not fit the "
                f"model's weight [{w.shape[0]}, {w.shape[1]}] (a cache of another model?)"
            )
        if x.shape[0] == 0:
            raise UserError(f"{self.arg}: {name}: the cache holds no tokens")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise UserError(f"{self.arg}: {name}: the cache holds NaN / Inf")
        if inv_scale is not None:
            x = x * np.asarray(inv_scale, np.float32)[None, :]
        yh = x.astype(np.float64) @ np.asarray(w, np.float64)
        if b is not None:
            yh = yh + np.asarray(b, np.float64)
        err = np.linalg.norm(yh - y) / max(np.linalg.norm(y), 1e-30)
        tol = spot_tolerance(self.meta.get("save_dtype", "fp32"), w)
        if err > tol:
            raise UserError(
                f"{self.arg}: {name}: cached Y differs from X W by {err:.1%} on the first "
                f"{x.shape[0]} tokens: the cache was written for another model or weights"
            )


_UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}


def spot_tolerance(save_dtype: str, w: Any) -> float:
    """The largest relative ``||X W + b - Y|| / ||Y||`` a cache of this model may show:
    8 x (the unit roundoff of the cache's dtype + that of the weights), at least 1e-3. The
    weights' precision is read from their values (a kernel whose every value is a bfloat16 /
    float16 is as coarse as one, e.g. ``--torch_dtype bf16``). On llama-1m the same model's
    caches measure about half a unit roundoff (fp16 cache, fp32 weights: 2.9e-4 against a
    tolerance of 3.9e-3; bf16 cache: 2.3e-3 against 3.1e-2), while its weights with 2%
    noise measure 1.9e-2."""
    w32 = np.asarray(w, np.float32)
    u_w = _UNIT_ROUNDOFF["fp32"]
    for name, dt in (("bf16", ml_dtypes.bfloat16), ("fp16", np.float16)):
        if np.array_equal(w32, w32.astype(dt).astype(np.float32)):
            u_w = _UNIT_ROUNDOFF[name]
            break
    return max(1e-3, 8 * (_UNIT_ROUNDOFF.get(save_dtype, _UNIT_ROUNDOFF["bf16"]) + u_w))


def iter_layers(cache: XYCache, ts: list[Target]) -> Iterator[tuple[int, list[Target]]]:
    """Targets grouped by layer, in order."""
    by: dict[int, list[Target]] = {}
    for t in ts:
        by.setdefault(t.layer, []).append(t)
    yield from sorted(by.items())
