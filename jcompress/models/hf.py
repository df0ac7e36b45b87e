"""Hugging Face checkpoint directories <-> (``ModelConfig``, param pytree).

``load_hf`` reads ``config.json`` and the weights (``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` when torch is installed) tensor by
tensor from a memory map; ``save_hf`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads, sharded above a size limit,
atomically (a temporary sibling directory renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jcompress import validate
from jcompress.atomic import atomic_dir
from jcompress.errors import UserError
from jcompress.leaf_io import StoreOnce, from_arrays, to_arrays, to_device
from jcompress.leaves import CompressedLeaf
from jcompress.models.config import ModelConfig
from jcompress.models.convert import check_shape, flatten, unflatten
from jcompress.models.families import spec_for
from jcompress.models.safetensors_io import SafetensorsFile, write_safetensors
from jcompress.outputs import check_output_dir

__all__ = [
    "DTYPE_NAMES",
    "Claim",
    "LoadRow",
    "RowTensors",
    "load_hf",
    "parse_dtype",
    "read_config",
    "save_hf",
]

DTYPE_NAMES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def parse_dtype(dtype: Any, *, arg: str = "dtype") -> jnp.dtype | None:
    """``None`` / a name in :data:`DTYPE_NAMES` / a floating dtype -> a jnp dtype or ``None``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise UserError(f"{arg}: unknown dtype {dtype!r}; allowed: float32, bfloat16, float16")
        return jnp.dtype(DTYPE_NAMES[dtype.lower()])
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise UserError(
            f"{arg}: {dtype!r} is not a dtype; allowed: float32, bfloat16, float16"
        ) from None
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise UserError(f"{arg}: {dt} is not supported; allowed: float32, bfloat16, float16")
    return dt


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    """Parse ``model_dir/config.json`` (either the ``dtype`` or ``torch_dtype`` style)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model_dir: {model_dir} is not a directory")
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"model_dir: {model_dir} has no config.json")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: must be a JSON object, got a JSON {type(d).__name__}")
    if not isinstance(d.get("model_type"), str):
        raise UserError(f"{path}: model_type must be a string naming the architecture")
    spec = spec_for(d["model_type"])
    try:
        return spec.config_from_hf(d)
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # backstop: the family parsers check field types; nothing else may leak a traceback
        raise UserError(f"{path}: malformed config ({type(e).__name__}: {e})") from None


class _Weights:
    """Name -> tensor over one or many safetensors files, or a torch state dict."""

    def __init__(self, model_dir: Path, stem: str = "model", *, allow_nonfinite: bool = False):
        self.model_dir = model_dir
        self.allow_nonfinite = allow_nonfinite
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        self.state: dict[str, Any] | None = None
        single = model_dir / f"{stem}.safetensors"
        index = model_dir / f"{stem}.safetensors.index.json"
        if single.is_file():
            self._add(single)
        elif index.is_file():
            weight_map = _read_index(index)
            for shard in sorted(set(weight_map.values())):
                if not (model_dir / shard).is_file():
                    raise UserError(
                        f"missing weights file: {model_dir / shard} (named in {index.name})"
                    )
                self._add(model_dir / shard)
            for name, shard in weight_map.items():
                if self.where.get(name) != shard:
                    raise UserError(f"{index}: tensor {name} is not in {shard}")
        elif stem == "model" and (
            (model_dir / "pytorch_model.bin").is_file()
            or (model_dir / "pytorch_model.bin.index.json").is_file()
        ):
            self.state = _load_torch_bin(model_dir)
        else:
            extra = " or pytorch_model.bin" if stem == "model" else ""
            raise UserError(
                f"model_dir: {model_dir} has no {stem}.safetensors, "
                f"{stem}.safetensors.index.json{extra}"
            )

    def _add(self, path: Path) -> None:
        # the index maps each name to one shard; a name in two shards is ambiguous
        f = SafetensorsFile(path)
        self.files[path.name] = f
        for k in f.keys():
            if k in self.where:
                raise UserError(f"{path}: tensor {k} is also in {self.where[k]}")
            self.where[k] = path.name

    def keys(self) -> list[str]:
        return list(self.state) if self.state is not None else list(self.where)

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name``: floating point, and finite unless ``allow_nonfinite`` (checked here,
        as each tensor is read, so every load path gets the same checks)."""
        x = self.state[name] if self.state is not None else self.files[self.where[name]].get(name)
        return _checked(self, name, x, self.allow_nonfinite)

    def origin(self, name: str) -> str:
        """The file tensor ``name`` is read from (for error messages)."""
        if self.state is not None:
            return str(self.model_dir / "pytorch_model.bin")
        return str(self.files[self.where[name]].path)

    def release(self, name: str) -> None:
        if self.state is None:
            self.files[self.where[name]].release(name)


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded-checkpoint index: tensor name -> shard file name."""
    try:
        d = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{index}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(d, dict):
        raise UserError(f'{index}: not a JSON object (expected {{"weight_map": {{...}}}})')
    weight_map = d.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{index}: weight_map must be a non-empty object (tensor -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise UserError(
                f"{index}: weight_map[{name!r}] is {shard!r}; allowed: a shard file name in "
                "the model directory"
            )
    return weight_map


def _load_torch_bin(model_dir: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{model_dir} holds pytorch_model.bin, which needs torch to read: pip install torch, "
            "or convert it once to safetensors (transformers from_pretrained + save_pretrained)"
        ) from None
    index = model_dir / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted(set(_read_index(index).values()))
    else:
        files = ["pytorch_model.bin"]
    out: dict[str, np.ndarray] = {}
    for fname in files:
        sd = _torch_load(torch, model_dir / fname)
        for k, t in sd.items():
            if t.dtype == torch.bfloat16:
                import ml_dtypes

                out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[k] = t.numpy()
    return out


def _torch_load(torch: Any, path: Path) -> Mapping[str, Any]:
    """``torch.load`` a state dict (memory-mapped when the file allows it); any failure becomes
    a one-line :class:`UserError` naming the file."""
    if not path.is_file():
        raise UserError(f"missing weights file: {path}")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # the legacy (pre zip) serialization cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"{path}: cannot read torch checkpoint ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(sd, Mapping):
        raise UserError(f"{path}: not a state dict (got {type(sd).__name__})")
    return sd


def _checked(weights: _Weights, name: str, x: np.ndarray, allow_nonfinite: bool) -> np.ndarray:
    """A weight tensor as read: floating point, and finite unless ``allow_nonfinite``.

    Arrays of typed leaves (``jcompress/...`` names of a factor checkpoint) may be integer
    (a leaf type validates its own fields); they get the finiteness check only.
    """
    where = f"{weights.origin(name)}: tensor {name}"
    dt = np.dtype(x.dtype)
    if not name.startswith(FACTORS_PREFIX) and not jnp.issubdtype(dt, jnp.floating):
        raise UserError(
            f"{where}: dtype {dt} where a floating-point weight is expected "
            "(allowed: F32, F16, BF16, F64, F8)"
        )
    if not allow_nonfinite:
        validate.check_finite(
            x,
            where,
            hint="broken weights (the Python API loads them anyway with "
            "allow_nonfinite=True, for debugging)",
        )
    return x


@dataclasses.dataclass(frozen=True)
class LoadRow:
    """One row of a family's conversion table, as :func:`load_hf`'s ``claim`` hook sees it.

    Attributes:
      rule: the :class:`~jcompress.models.convert.Rule` (``rule.transform.name``,
        ``rule.jax_shapes(cfg)``).
      name: the HF tensor name the row reads (``model.layers.0.mlp.down_proj.weight``).
      paths: the pytree paths it fills (one, or q/k/v of a fused tensor).
      shapes: the pytree shapes ``config.json`` implies for ``paths``.
    """

    rule: Any
    name: str
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


class RowTensors:
    """The checkpoint's tensors, by HF name (a missing base-model prefix aliased), for a claim
    hook: ``name in tensors``, ``tensors.read(name)``. A tensor read counts as used (the
    unexpected-tensor check skips it) and its mapped pages are released once the hook returns;
    ``read`` returns the stored array as it is (any dtype, unchecked: the hook validates)."""

    def __init__(self, weights: _Weights, names: set[str], alias: dict[str, str]):
        self._weights, self._names, self._alias = weights, names, alias
        self.used: set[str] = set()
        self._pending: list[str] = []

    def _src(self, name: str) -> str:
        return self._alias.get(name, name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._src(name) in self._names

    def read(self, name: str) -> np.ndarray:
        src = self._src(name)
        if src not in self._names:
            raise KeyError(name)
        w = self._weights
        x = w.state[src] if w.state is not None else w.files[w.where[src]].get(src)
        self.used.add(src)
        self._pending.append(src)
        return np.asarray(x)

    def _release(self) -> None:
        for src in self._pending:
            self._weights.release(src)
        self._pending.clear()


Claim = Callable[[LoadRow, RowTensors], Mapping[str, Any] | None]
"""``claim(row, tensors) -> {path: value} | None``: a :func:`load_hf` hook that loads a row
itself (every path of ``row.paths``, e.g. as a typed leaf from packed tensors) or returns
``None`` to leave it to the loader."""


def load_hf(
    model_dir: str | os.PathLike,
    *,
    dtype: Any = None,
    progress: bool = False,
    allow_nonfinite: bool = False,
    claim: Claim | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Load an HF causal-LM checkpoint directory as ``(cfg, params)``.

    Args:
      model_dir: directory with ``config.json`` and weights.
      dtype: ``None`` keeps each tensor's stored dtype; else "float32" / "bfloat16" /
        "float16" (or the jnp dtype) for floating tensors.
      progress: show a progress bar over tensors.
      allow_nonfinite: load tensors holding NaN / Inf (for debugging); by default each
        floating tensor is checked as it is read and the first bad one is an error.
      claim: a row hook (:data:`Claim`): offered each table row first, it may load the row
        itself (the compressed-tensors reader turns packed linears into ``QuantizedArray``
        leaves this way) from the tensors it reads; the rest of the loop (missing /
        unexpected tensors, shapes, casts) stays this function's.

    Returns:
      ``(cfg, params)``: params is a nested dict whose ``/``-joined paths mirror HF module
      names, e.g. ``params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]`` of shape
      ``[hidden, heads * head_dim]``.

    Raises:
      UserError: missing files, unknown ``model_type``, corrupt safetensors header, a missing
        or unexpected tensor, a shape that disagrees with ``config.json``, a bad ``dtype``,
        an integer / bool tensor, a tensor with NaN / Inf (unless ``allow_nonfinite``).
    """
    dt = parse_dtype(dtype)
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    spec = spec_for(cfg.family.value)
    factored = _factors_meta(cfg, model_dir)
    links = _factor_links(cfg, model_dir) if factored is not None else {}
    loaded: dict[str, jax.Array] = {}  # linked factors, read once and shared
    weights = _Weights(
        model_dir,
        FACTORS_STEM if factored is not None else "model",
        allow_nonfinite=allow_nonfinite,
    )
    names = set(weights.keys())
    rows = spec.table(cfg)
    alias = _prefix_alias(names, {n for _, n, _ in rows}, spec.base_prefix)

    def cast(value: np.ndarray) -> jax.Array:
        target = dt if (dt is not None and jnp.issubdtype(value.dtype, jnp.floating)) else None
        return to_device(value, dtype=target)

    flat: dict[str, Any] = {}
    used: set[str] = set()
    tensors = RowTensors(weights, names, alias)
    for rule, name, paths in tqdm(rows, desc="load_hf", disable=not progress, leave=False):
        if claim is not None:
            row = LoadRow(rule, name, tuple(paths), tuple(map(tuple, rule.jax_shapes(cfg))))
            got = claim(row, tensors)
            tensors._release()
            if got is not None:
                if set(got) != set(paths):
                    raise ValueError(f"claim: {name} returned {sorted(got)}, want {list(paths)}")
                flat.update(got)
                continue
        if factored is not None and any(
            f"{FACTORS_PREFIX}{p}" in names or p in factored for p in paths
        ):
            for path, want in zip(paths, rule.jax_shapes(cfg), strict=True):
                flat[path] = _load_factor_leaf(
                    weights, names, used, factored, path, want, cast, links, loaded
                )
            continue
        src = alias.get(name, name)
        if src not in names:
            raise UserError(
                f"{model_dir}: missing tensor {name} (config.json describes a "
                f"{cfg.family.value} model that has it)"
            )
        x = weights.get(src)
        check_shape(name, x.shape, rule.hf_shape(cfg))
        used.add(src)
        for path, value in zip(paths, rule.transform.to_jax(x), strict=True):
            flat[path] = cast(value)
        jax.block_until_ready([flat[p] for p in paths])
        weights.release(src)
    used |= tensors.used
    extra = sorted(n for n in names - used if not spec.is_ignored(alias.get(n, n), cfg))
    if extra:
        more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
        raise UserError(
            f"{model_dir}: unexpected tensors for a {cfg.family.value} model: "
            f"{', '.join(extra[:5])}{more}"
        )
    return cfg, unflatten(flat)


FACTORS_KEY = "jcompress_factors"
FACTORS_STEM = "jcompress_model"
FACTORS_PREFIX = "jcompress/"


FACTORS_FORMATS = (1, 2)  # 2: some factor tensors are stored once and linked ("links")


def _factors_meta(cfg: ModelConfig, model_dir: Path) -> dict[str, Any] | None:
    """``{pytree path: leaf description}`` (:func:`jcompress.leaf_io.to_arrays`) of a
    factor-format checkpoint, else ``None``."""
    meta = cfg.hf_config.get(FACTORS_KEY)
    if meta is None:
        return None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("leaves"), Mapping):
        raise UserError(f"{model_dir}/config.json: malformed {FACTORS_KEY} entry")
    if meta.get("format", 1) not in FACTORS_FORMATS:
        raise UserError(
            f"{model_dir}/config.json: {FACTORS_KEY} format {meta.get('format')!r} is not "
            f"one this jcompress reads ({', '.join(map(str, FACTORS_FORMATS))}); upgrade jcompress"
        )
    return dict(meta["leaves"])


def _factor_links(cfg: ModelConfig, model_dir: Path) -> dict[str, str]:
    """``{tensor name: stored tensor name}`` of factor tensors a format-2 checkpoint stores
    once (equal bytes, dtype and shape: EigenAttention's K/Q basis, V's basis and o_proj's
    folded basis); empty for other checkpoints."""
    links = (cfg.hf_config.get(FACTORS_KEY) or {}).get("links", {})
    ok = isinstance(links, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) and v.startswith(FACTORS_PREFIX)
        for k, v in links.items()
    )
    if not ok or any(v in links for v in links.values()):
        raise UserError(f"{model_dir}/config.json: malformed {FACTORS_KEY} links")
    return dict(links)


def _load_factor_leaf(weights, names, used, factored, path, want, cast, links=None, loaded=None):
    """Rebuild the leaf at ``path`` from ``jcompress/<path>[/<field path>]`` tensors
    (``links``: tensors stored once under another name; ``loaded``: a cache by stored name,
    so linked leaves share one array again)."""
    if path not in factored:
        key = f"{FACTORS_PREFIX}{path}"
        if key not in names:
            raise UserError(f"missing tensor {key} in the factor checkpoint")
        x = weights.get(key)
        check_shape(key, x.shape, want)
        used.add(key)
        return cast(x)

    links = links or {}
    targets = set(links.values())

    def get(field_path):
        key = f"{FACTORS_PREFIX}{path}/{field_path}"
        key = links.get(key, key)
        if key not in names:
            raise UserError(f"missing tensor {key} in the factor checkpoint")
        used.add(key)
        if loaded is not None and key in loaded:
            return loaded[key]
        x = to_device(weights.get(key))  # cast by from_arrays (cast_child)
        if loaded is not None and key in targets:
            loaded[key] = x
        return x

    def cast_child(value):  # a leaf's float8 children (quantized codes) keep their dtype
        return value if np.dtype(value.dtype).itemsize < 2 else cast(value)

    leaf = from_arrays(factored[path], get, f"factor checkpoint: {path}", cast=cast_child)
    if tuple(leaf.shape) != tuple(want):
        raise UserError(
            f"factor checkpoint: {path} stands for shape {list(leaf.shape)}, config implies "
            f"{list(want)}"
        )
    return leaf


def _prefix_alias(names: set[str], expected: set[str], prefix: str) -> dict[str, str]:
    """Hub checkpoints saved from the base model lack the ``base_model_prefix.``; map them."""
    if names & expected:
        return {}
    alias = {}
    for n in names:
        alias[f"{prefix}.{n}"] = n
        alias[n] = n
    return alias


def _dense(leaf: Any) -> np.ndarray:
    if isinstance(leaf, CompressedLeaf):
        leaf = leaf.materialize()
    return np.asarray(leaf)


def _leaf_dtype(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype)


def save_hf(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    factors: bool = False,
    progress: bool = False,
    marker: bool = False,
) -> Path:
    """Write ``params`` as an HF checkpoint directory.

    By default typed compressed leaves are materialized: the result is a dense-equivalent
    checkpoint that stock ``transformers`` loads. With ``factors=True`` the typed leaves are
    kept as their factors (``jcompress_model.safetensors``, tensors
    ``jcompress/<path>/<field path>`` for every param of a tensor that holds a typed leaf, in
    the :mod:`jcompress.leaf_io` form; HF names for the rest) and
    ``config.json`` gains a ``jcompress_factors`` entry; factor tensors equal to one already
    written (dtype, shape and bytes: EigenAttention's shared K/Q basis, V's basis and
    o_proj's folded copy of it) are stored once and listed in its ``links`` (format 2;
    format 1 when nothing repeats). :func:`load_hf` reads that back losslessly (linked
    factors become one array again), while transformers refuses it (no
    ``model.safetensors``) rather than loading random weights. Files are written into a
    temporary sibling directory that is renamed to ``out_dir`` only when complete.

    Args:
      cfg: the model config (its ``hf_config`` becomes ``config.json``).
      params: param pytree as returned by :func:`load_hf` (possibly compressed).
      out_dir: destination directory.
      tokenizer_dir: copy tokenizer and generation-config files from here.
      max_shard_bytes: shard the weights above this many bytes per file.
      overwrite: replace an existing ``out_dir`` (never ``tokenizer_dir`` or a directory
        containing it; see :mod:`jcompress.outputs`).
      factors: keep typed leaves factored (see above).
      marker: also write :data:`jcompress.outputs.MARKER` (the CLI does, so that a later
        ``--overwrite`` may replace the directory).

    Returns:
      ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    check_output_dir(
        out_dir,
        inputs={"tokenizer_dir": tokenizer_dir} if tokenizer_dir is not None else None,
        overwrite=overwrite,
        arg="out_dir",
        require_marker=False,
    )
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes: must be positive, got {max_shard_bytes}")
    spec = spec_for(cfg.family.value)
    flat = flatten(params)
    entries: list[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]] = []
    used: set[str] = set()
    factor_meta: dict[str, Any] = {}
    dedup = StoreOnce()
    for rule, name, paths in spec.table(cfg):
        missing = [p for p in paths if p not in flat]
        if missing:
            raise UserError(f"params: missing leaf {missing[0]} (needed for HF tensor {name})")
        leaves = [flat[p] for p in paths]
        for path, leaf, want in zip(paths, leaves, rule.jax_shapes(cfg), strict=True):
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
                raise UserError(f"params: leaf {path} is a {type(leaf).__name__}, not an array")
            if tuple(leaf.shape) != tuple(want):
                raise UserError(
                    f"params: leaf {path} has shape {list(leaf.shape)}, config implies "
                    f"{list(want)} (for HF tensor {name})"
                )
        used.update(paths)
        if factors and any(isinstance(v, CompressedLeaf) for v in leaves):
            entries.extend(_factor_entries(paths, leaves, factor_meta, dedup))
            continue
        dtype = np.result_type(*[_leaf_dtype(v) for v in leaves])

        def produce(rule=rule, leaves=leaves, dtype=dtype):
            return rule.transform.to_hf(*[_dense(v).astype(dtype, copy=False) for v in leaves])

        entries.append((name, tuple(rule.hf_shape(cfg)), dtype, produce))
    extra = sorted(set(flat) - used)
    if extra:
        raise UserError(
            f"params: leaves with no HF tensor for {cfg.family.value}: {', '.join(extra[:5])}"
        )
    validate.check_params_finite(params)

    stem = FACTORS_STEM if factors else "model"
    config = _config_dict(cfg, entries)
    config.pop(FACTORS_KEY, None)
    if factors and dedup.links:
        config[FACTORS_KEY] = {"format": 2, "leaves": factor_meta, "links": dedup.links}
    elif factors:
        config[FACTORS_KEY] = {"format": 1, "leaves": factor_meta}
    shards = _shard(entries, max_shard_bytes)
    with atomic_dir(out_dir, overwrite=overwrite, arg="out_dir", marker=marker) as tmp:
        bar = tqdm(total=len(entries), desc="save_hf", disable=not progress, leave=False)
        if len(shards) == 1:
            write_safetensors(tmp / f"{stem}.safetensors", _ticking(shards[0], bar))
        else:
            weight_map, total = {}, 0
            for k, shard in enumerate(shards, 1):
                fname = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
                total += write_safetensors(tmp / fname, _ticking(shard, bar))
                weight_map.update({e[0]: fname for e in shard})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
    return out_dir


def _factor_entries(paths, leaves, meta, dedup: StoreOnce | None = None):
    """Safetensors entries for the params of one HF tensor, typed leaves kept as factors (a
    factor equal to one already written is linked to it by ``dedup``, not written)."""
    out = []
    for path, leaf in zip(paths, leaves, strict=True):
        if isinstance(leaf, CompressedLeaf):
            flat, meta[path] = to_arrays(leaf, f"params/{path}")
            items = [
                (key, a)
                for key, a in ((f"{FACTORS_PREFIX}{path}/{f}", a) for f, a in flat.items())
                if dedup is None or dedup.first(key, a) is None
            ]
        else:
            items = [(f"{FACTORS_PREFIX}{path}", leaf)]
        for key, arr in items:
            out.append((key, tuple(arr.shape), np.dtype(arr.dtype), lambda a=arr: np.asarray(a)))
    return out


def _ticking(entries, bar):
    for name, shape, dtype, produce in entries:

        def tick(produce=produce):
            out = produce()
            bar.update(1)
            return out

        yield name, shape, dtype, tick


def _shard(entries, limit):
    shards, cur, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[1])) * np.dtype(e[2]).itemsize
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    return shards


def _config_dict(cfg: ModelConfig, entries) -> dict[str, Any]:
    d = dict(cfg.hf_config)
    floats = {np.dtype(e[2]) for e in entries if jnp.issubdtype(np.dtype(e[2]), jnp.floating)}
    names = {
        np.dtype(jnp.float32): "float32",
        np.dtype(jnp.bfloat16): "bfloat16",
        np.dtype(jnp.float16): "float16",
    }
    if len(floats) == 1 and next(iter(floats)) in names:
        name = names[next(iter(floats))]
        keys = [k for k in ("dtype", "torch_dtype") if k in d] or ["torch_dtype"]
        for k in keys:
            d[k] = name
    return d
