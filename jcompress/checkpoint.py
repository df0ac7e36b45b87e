"""Save and restore (possibly compressed) param pytrees with orbax-checkpoint.

A checkpoint is a directory::

    path/
      jcompress.json   # format tag, the HF config dict, ModelConfig fields, typed-leaf index
      arrays/          # an orbax StandardCheckpointer checkpoint of every array

Typed leaves (:class:`jcompress.leaves.CompressedLeaf`) are stored in the one form of
:mod:`jcompress.leaf_io`: their arrays as a nested dict at the leaf's place in the tree (one
level per nested leaf), and in ``jcompress.json``, for each, its path plus the
:func:`jcompress.leaf_io.to_arrays` description (registered type name, static fields,
children), so ``restore(save(...))`` rebuilds the same types, static settings, dtypes and
bit-exact values. A leaf array equal to one an earlier leaf stored (EigenAttention's V basis
and the o_proj fold's copy of it) is not stored again: the leaf's index entry links it
(version 2; restore makes both leaves share one array). Version-1 files read as before.

Saving is atomic: :func:`save` writes into a temporary sibling directory and renames it into
place only when complete, so a failure leaves nothing half-written behind (and an overwritten
checkpoint intact).

Example::

    jcompress.checkpoint.save("out/ckpt", cfg, params)
    cfg, params = jcompress.checkpoint.restore("out/ckpt")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jcompress import validate
from jcompress.atomic import atomic_dir
from jcompress.errors import UserError
from jcompress.leaf_io import StoreOnce, decode_static, encode_static, from_arrays, to_arrays
from jcompress.leaves import CompressedLeaf
from jcompress.models.config import ModelConfig
from jcompress.models.convert import unflatten
from jcompress.models.families import check_params_match
from jcompress.outputs import check_output_dir

__all__ = ["save", "restore", "is_checkpoint", "SIDECAR", "FORMAT", "VERSION"]

SIDECAR = "jcompress.json"
ARRAYS = "arrays"
FORMAT = "jcompress-checkpoint"
VERSION = 2  # 2: arrays equal to an earlier leaf's are linked, not stored again
READS = (1, 2)


# --------------------------------------------------------------------------- tree <-> storage


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, CompressedLeaf)


def _flat_getter(stored: Any, where: str) -> Any:
    """Field path -> array inside a leaf's stored subtree (``KeyError`` when absent)."""

    def get(path: str) -> Any:
        node = stored
        for k in path.split("/"):
            if not isinstance(node, Mapping) or k not in node:
                raise KeyError(path)
            node = node[k]
        if isinstance(node, Mapping):
            raise UserError(f"{where}: checkpoint is corrupt ({path} is not an array)")
        return node

    return get


def _split(params: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Params -> (a nested dict of arrays only, the typed-leaf index). A leaf's array equal to
    one of an earlier leaf (:class:`~jcompress.leaf_io.StoreOnce`) is not stored again: its
    index entry links it (``links: {field path: {"path": [...], "field": ...}}``)."""
    index: list[dict[str, Any]] = []
    once = StoreOnce()
    origin: dict[str, dict[str, Any]] = {}  # StoreOnce key -> {"path": [...], "field": ...}

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        where = "params/" + "/".join(path) if path else "params"
        if isinstance(node, Mapping):
            out = {}
            for k, v in node.items():
                if not isinstance(k, str) or not k:
                    raise UserError(f"{where}: keys must be non-empty strings, got {k!r}")
                out[k] = walk(v, (*path, k))
            return out
        if isinstance(node, CompressedLeaf):
            flat, desc = to_arrays(node, where)
            links = {}
            for f, a in flat.items():
                key = f"{'/'.join(path)}:{f}"
                origin[key] = {"path": list(path), "field": f}
                first = once.first(key, a)
                if first is not None:
                    links[f] = origin[first]
            entry = {"path": list(path), **desc}
            if links and len(links) < len(flat):  # a leaf keeps at least one array stored
                entry["links"] = links
                flat = {f: a for f, a in flat.items() if f not in links}
            index.append(entry)
            return unflatten(flat)  # a leaf's arrays as an orbax subtree
        if _is_array(node):
            return node
        raise UserError(
            f"{where}: cannot save a {type(node).__name__}; params hold nested dicts of arrays "
            "and typed leaves"
        )

    if not isinstance(params, Mapping):
        raise UserError(f"params: expected a nested dict, got {type(params).__name__}")
    tree = walk(params, ())
    if not jax.tree.leaves(tree):
        raise UserError("params: no arrays to save")
    return tree, index


def _join(tree: dict[str, Any], index: list[Mapping[str, Any]], path: Path) -> dict[str, Any]:
    stored_at: dict[tuple, Any] = {}  # each leaf's stored arrays, before leaves replace them
    for entry in index:
        keys = entry.get("path")
        node = tree
        for k in keys if isinstance(keys, list) else ():
            node = node.get(k) if isinstance(node, dict) else None
        stored_at[tuple(keys) if isinstance(keys, list) else ()] = node
    for entry in index:
        keys = entry.get("path")
        if not isinstance(keys, list) or not keys:
            raise UserError(f"{path}: {SIDECAR} is corrupt (bad typed-leaf path {keys!r})")
        where = "params/" + "/".join(map(str, keys))
        node = tree
        for k in keys[:-1]:
            if not isinstance(node, dict) or k not in node:
                raise UserError(f"{path}: checkpoint is corrupt ({where} not in the arrays)")
            node = node[k]
        if not isinstance(node, dict) or keys[-1] not in node:
            raise UserError(f"{path}: checkpoint is corrupt ({where} not in the arrays)")
        stored = node[keys[-1]]
        desc = {k: v for k, v in entry.items() if k not in ("path", "links")}
        get = _flat_getter(stored, where)
        links = entry.get("links") or {}
        if links:
            get = _linked_getter(get, links, stored_at, where)
        node[keys[-1]] = from_arrays(desc, get, where)
    return tree


def _linked_getter(get: Any, links: Mapping[str, Any], stored_at: Mapping[tuple, Any], where):
    """``get`` for a leaf some of whose arrays are stored in another leaf's place."""

    def linked(field: str) -> Any:
        if field not in links:
            return get(field)
        link = links[field]
        target = stored_at.get(tuple(link.get("path", ()))) if isinstance(link, Mapping) else None
        if not isinstance(target, Mapping) or not isinstance(link.get("field"), str):
            raise UserError(f"{where}: checkpoint is corrupt (bad link for {field})")
        return _flat_getter(target, where)(link["field"])

    return linked


# --------------------------------------------------------------------------- config


def _config_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {
        f.name: encode_static(getattr(cfg, f.name), f"cfg.{f.name}")
        for f in dataclasses.fields(cfg)
        if f.name != "hf_config"
    }


def _config_from_sidecar(meta: Mapping[str, Any], path: Path) -> ModelConfig:
    """Rebuild the config from the HF dict, then apply any field that was changed after parsing
    (so a config edited with ``dataclasses.replace`` round-trips too)."""
    from jcompress.models.families import config_from_hf

    hf = meta.get("hf_config")
    fields = {
        k: decode_static(v, f"model_config.{k}")
        for k, v in (meta.get("model_config") or {}).items()
    }
    if not isinstance(hf, dict):
        raise UserError(f"{path}: {SIDECAR} is corrupt (no hf_config)")
    names = {f.name for f in dataclasses.fields(ModelConfig)} - {"hf_config"}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise UserError(f"{path}: {SIDECAR} has unknown config fields: {', '.join(unknown)}")
    if hf:
        cfg = config_from_hf(hf)
        changed = {k: v for k, v in fields.items() if getattr(cfg, k) != v}
        return dataclasses.replace(cfg, **changed) if changed else cfg
    try:
        return ModelConfig(**fields, hf_config={})
    except TypeError as e:
        raise UserError(f"{path}: {SIDECAR} is corrupt ({e})") from None


# --------------------------------------------------------------------------- public API


def is_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`save`."""
    return (Path(path) / SIDECAR).is_file()


def save(
    path: str | os.PathLike,
    cfg: ModelConfig,
    params: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``(cfg, params)`` as a checkpoint directory.

    Args:
      path: destination directory (its parent is created if needed).
      cfg: the model config; its ``hf_config`` dict is stored and re-parsed on restore.
      params: nested dict of arrays and typed compressed leaves.
      overwrite: replace an existing checkpoint at ``path``. Only a directory written by
        :func:`save` (or an empty directory) is replaced; anything else is refused.

    Returns:
      ``path`` as a Path.

    Raises:
      UserError: ``path`` exists (without ``overwrite``, or it is not a checkpoint), or params
        hold something other than arrays and registered typed leaves.
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    if not isinstance(cfg, ModelConfig):
        raise UserError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
    if (path.exists() or path.is_symlink()) and overwrite and path.is_dir():
        if not (is_checkpoint(path) or not any(path.iterdir())):
            raise UserError(
                f"checkpoint: {path} exists and is not a jcompress checkpoint; "
                "refusing to replace it"
            )
    check_output_dir(path, overwrite=overwrite, arg="checkpoint", require_marker=False)
    tree, index = _split(params)
    # restore would hand back a pair forward cannot run (some leaves only is allowed)
    check_params_match(cfg, params, partial=True)
    validate.check_params_finite(params)  # restore refuses NaN / Inf weights
    meta = {
        "format": FORMAT,
        "version": VERSION if any("links" in e for e in index) else 1,
        "hf_config": dict(cfg.hf_config),
        "model_config": _config_fields(cfg),
        "leaves": index,
    }
    try:
        sidecar = json.dumps(meta, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"cfg.hf_config: cannot be written as JSON ({e})") from None

    with atomic_dir(path, overwrite=overwrite, arg="checkpoint") as tmp:
        with ocp.StandardCheckpointer(**_one_process()) as ckptr:
            ckptr.save((tmp / ARRAYS).absolute(), _one_process_tree(tree))
            ckptr.wait_until_finished()
        (tmp / SIDECAR).write_text(sidecar + "\n")
    return path


def _one_process_tree(tree: Any) -> Any:
    """``tree`` as orbax saves it from one process of a multi-host run: host copies (every
    process calls it: an array spanning processes is gathered). Unchanged in one process."""
    from jcompress.atomic import process_count
    from jcompress.sharding import to_host

    return tree if process_count() == 1 else jax.tree.map(to_host, tree)


def _one_process() -> dict[str, Any]:
    """Orbax options for a save by this process alone. In a multi-host run every process
    writes its own directory (:func:`~jcompress.atomic.atomic_dir`: process 0's becomes the
    checkpoint, the others' are private and deleted), so orbax must neither wait for the
    other processes nor leave the arrays to process 0."""
    import orbax.checkpoint as ocp

    from jcompress.atomic import process_count

    if process_count() == 1:
        return {}
    me = jax.process_index()
    _per_process_signals(me)
    return {
        "multiprocessing_options": ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"jcompress-{me}"
        )
    }


def _per_process_signals(me: int) -> None:
    """Give this process's orbax signal keys a per-process name.

    Orbax names the keys of its awaitable signals (``awaitable_signals_contract_<operation
    id>/step_directory_creation``) in the distributed key-value store by operation id alone,
    and ``barrier_sync_key_prefix`` does not reach them. When every process saves its own
    directory at the same time, the processes' keys collide: one process deletes or waits on
    the other's key, and a save hung for the coordination timeout, then failed with
    ``DEADLINE_EXCEEDED``. Orbax's own per-process directory mode
    (``CheckpointManagerOptions.enable_per_process_directory_creation``) appends
    ``_<process index>`` to the same class-level prefix; this does the same, once per process.
    """
    try:
        from orbax.checkpoint._src.futures import future
    except ImportError:  # another orbax layout: its keys are its own business
        return
    contract = getattr(future, "AwaitableSignalsContract", None)
    prefix = getattr(contract, "awaitable_signals_contract_prefix", None)
    suffix = f"_jcompress{me}"
    if isinstance(prefix, str) and not prefix.endswith(suffix):
        contract.awaitable_signals_contract_prefix = prefix + suffix


class _QuietLoop(asyncio.SelectorEventLoop):
    """An event loop that drops callbacks scheduled, and errors reported, after it closed.

    When one array of a corrupt checkpoint fails to read, orbax closes its event loop while
    tensorstore still completes the other reads in its own threads; their completion callbacks
    then hit the closed loop and print "Event loop is closed" tracebacks after our one-line
    error. Nothing waits on those results any more, so dropping them is correct.
    """

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise

    def call_exception_handler(self, context):
        # the failed reads' futures are collected after the loop closed ("Future exception was
        # never retrieved"): the failure is already reported as one line
        if self.is_closed():
            return None
        return super().call_exception_handler(context)


class _QuietPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _QuietLoop()


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax runs in loops that tolerate late tensorstore callbacks, and its absl warnings
    about unreadable metadata stay out of stderr (the failure becomes our one-line error)."""
    import logging  # here: only restore's quiet mode needs it

    policy = asyncio.get_event_loop_policy()
    absl = logging.getLogger("absl")
    level = absl.level
    asyncio.set_event_loop_policy(_QuietPolicy())
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)
        absl.setLevel(level)


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    msg = msg.split(" [tensorstore_spec=", 1)[0]
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _check_arrays(tree: Any, prefix: str = "params") -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _check_arrays(v, f"{prefix}/{k}")
    else:
        validate.check_finite(
            tree,
            prefix,
            hint="broken arrays (the Python API restores them anyway "
            "with allow_nonfinite=True, for debugging)",
        )


def restore(
    path: str | os.PathLike,
    *,
    device: jax.Device | None = None,
    allow_nonfinite: bool = False,
) -> tuple[ModelConfig, dict[str, Any]]:
    """Read a checkpoint written by :func:`save`.

    Args:
      path: the checkpoint directory.
      device: put (commit) the arrays on this device; default: JAX's default device,
        uncommitted, like :func:`jcompress.load_hf`.
      allow_nonfinite: accept arrays holding NaN / Inf (for debugging); by default every
        floating array is checked, as :func:`jcompress.load_hf` does.

    Returns:
      ``(cfg, params)`` with every array a ``jax.Array`` of its saved dtype and typed leaves
      rebuilt as their classes.

    Raises:
      UserError: ``path`` is missing, is not a checkpoint, or is corrupt (a truncated file
        included: one line, nothing else on stderr), or an array holds NaN / Inf.
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint: {path} does not exist")
    if not path.is_dir() or not is_checkpoint(path):
        raise UserError(f"checkpoint: {path} is not a jcompress checkpoint (no {SIDECAR})")
    try:
        meta = json.loads((path / SIDECAR).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path / SIDECAR}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint: {path} is not a jcompress checkpoint (bad {SIDECAR})")
    if meta.get("version") not in READS:
        raise UserError(
            f"checkpoint: {path} has format version {meta.get('version')!r}; this jcompress reads "
            f"versions {', '.join(map(str, READS))}"
        )
    index = meta.get("leaves")
    if not isinstance(index, list):
        raise UserError(f"{path}: {SIDECAR} is corrupt (no leaves list)")
    cfg = _config_from_sidecar(meta, path)

    arrays_dir = (path / ARRAYS).absolute()
    if not arrays_dir.is_dir():
        raise UserError(f"checkpoint: {path} is corrupt (no {ARRAYS}/ directory)")
    # Without a device, orbax restores numpy arrays (a numpy target; np.empty only reserves
    # address space) and jnp.asarray puts them on the default device uncommitted, exactly like
    # load_hf, so restored and freshly loaded params share jit compilations. (A ShapeDtypeStruct
    # target without sharding comes back as committed jax arrays in orbax 0.12.)
    if device is None:
        make = lambda m: np.empty(tuple(m.shape), m.dtype)  # noqa: E731
    else:
        sharding = jax.sharding.SingleDeviceSharding(device)
        make = lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)  # noqa: E731
    failure = None
    with _quiet_orbax():
        try:
            with ocp.StandardCheckpointer() as ckptr:
                target = jax.tree.map(make, _item_tree(ckptr.metadata(arrays_dir)))
                tree = ckptr.restore(arrays_dir, target)
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore errors share no base class
            failure = _first_line(e)
    if failure is not None:
        # raised outside the except block: no chained traceback keeps orbax state alive
        raise UserError(f"checkpoint: cannot read arrays in {path} ({failure})")
    if not allow_nonfinite:
        _check_arrays(_to_dicts(tree))
    if device is None:
        tree = jax.tree.map(jax.numpy.asarray, tree)
    return cfg, _join(_to_dicts(tree), index, path)


def _item_tree(metadata: Any) -> Any:
    """The tree of array metadata, across orbax versions (StepMetadata or a bare tree)."""
    item = getattr(metadata, "item_metadata", metadata)
    return getattr(item, "tree", item)


def _to_dicts(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _to_dicts(v) for k, v in tree.items()}
    return tree
