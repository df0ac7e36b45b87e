"""One decoder layer at a time from a Hugging Face checkpoint's safetensors shards.

:class:`LayerLoader` opens a checkpoint directory (``model.safetensors``, a sharded
``model.safetensors.index.json``, or the factor form ``jcompress_model.*`` that
:func:`jcompress.save_hf` writes with ``factors=True``), checks everything that can be
checked from the headers up front (every shard named by the index present with a valid
header, every tensor the family's table expects present with the shape ``config.json``
implies, no tensor left unclaimed), and then reads the tensors of one decoder layer
(:meth:`LayerLoader.layer`), of the globals (embeddings, final norm, head:
:meth:`LayerLoader.globals`) or of given param paths only (:meth:`LayerLoader.read`) on
request. Tensors are copied out of the memory maps and the
mapped pages dropped at once (``SafetensorsFile.release``), so what the process holds is what
the caller keeps.

The loader keeps its own account of what it handed out and was not given back
(:attr:`LayerLoader.resident_bytes`, :attr:`LayerLoader.peak_bytes`): a streamed run calls
:meth:`LayerLoader.release` when it drops a layer, and the account says whether the run kept
to "one layer plus the globals".
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import UserError
from jcompress.models import hf
from jcompress.models.config import ModelConfig
from jcompress.models.convert import Rule, check_shape
from jcompress.models.families import spec_for

__all__ = ["GLOBAL", "PICKED", "LayerLoader", "fingerprint", "layer_of"]

GLOBAL = -1
"""The group index of the tensors outside the decoder layers (embeddings, final norm, head)."""

PICKED = -2
"""The group :meth:`LayerLoader.read` accounts the params it hands out under."""


def layer_of(cfg: ModelConfig, path: str) -> int:
    """The decoder layer a pytree path belongs to (``model/layers/3/...`` -> 3), or
    :data:`GLOBAL`."""
    root = spec_for(cfg.family.value).layout.layers + "/"
    if path.startswith(root):
        return int(path[len(root) :].split("/", 1)[0])
    return GLOBAL


def _nbytes(x: Any) -> int:
    return int(sum(int(a.size) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(x)))


SAMPLES, SAMPLE_BYTES = 16, 64 * 1024
""":func:`fingerprint` hashes this many evenly spaced chunks of this size from each shard's
data (1 MiB per shard): another fine-tune of the same architecture has the same header, not
the same bytes."""


def fingerprint(model_dir: str | os.PathLike) -> dict[str, Any]:
    """What identifies a checkpoint without reading all its weights: the SHA-256 of
    ``config.json``, and per weights file (safetensors shards and index) its size, the SHA-256
    of its header (names, dtypes, shapes, offsets) and of :data:`SAMPLES` chunks of its data
    spread evenly from the first byte to the last. A resumed run compares it with the one it
    started on."""
    d = Path(model_dir)
    out: dict[str, Any] = {"config": hashlib.sha256((d / "config.json").read_bytes()).hexdigest()}
    files = {}
    for p in sorted(d.iterdir()):
        if p.name.endswith(".safetensors"):
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
                head += f.read(min(n, 100 * 1024 * 1024))
                start = len(head)
                span = max(size - start - SAMPLE_BYTES, 0)
                data = hashlib.sha256()
                for i in range(SAMPLES):
                    data.update(
                        os.pread(f.fileno(), SAMPLE_BYTES, start + span * i // (SAMPLES - 1))
                    )
            files[p.name] = {
                "size": size,
                "header": hashlib.sha256(head).hexdigest(),
                "data_samples": data.hexdigest(),
            }
        elif p.name.endswith(".safetensors.index.json"):
            files[p.name] = {
                "size": p.stat().st_size,
                "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            }
    out["files"] = files
    return out


class LayerLoader:
    """Read a checkpoint one decoder layer (or the globals) at a time.

    Args:
      model_dir: HF checkpoint directory (safetensors; a torch ``.bin`` checkpoint cannot be
        read lazily and is refused).
      dtype: ``None`` keeps stored dtypes; else "float32" / "bfloat16" / "float16" for
        floating tensors (as :func:`jcompress.load_hf`).
      allow_nonfinite: as :func:`jcompress.load_hf`.

    Attributes:
      cfg: the model config. model_dir: the directory.
      resident_bytes: bytes handed out by :meth:`layer` / :meth:`globals` and not yet
        :meth:`release`-d. peak_bytes: the largest ``resident_bytes`` seen.
      group_bytes: ``{group: bytes}`` as stored on disk (after ``dtype``), for each layer
        index and :data:`GLOBAL`.

    Raises:
      UserError: everything :func:`jcompress.load_hf` refuses that can be seen from
        ``config.json``, the index and the headers (missing shard, corrupt header, a tensor
        the index puts in a shard that lacks it, a missing / unexpected / misshapen tensor),
        before any tensor is read.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        dtype: Any = None,
        allow_nonfinite: bool = False,
    ):
        self.model_dir = Path(model_dir)
        self.dtype = hf.parse_dtype(dtype)
        self.cfg = hf.read_config(self.model_dir)
        cfg = self.cfg
        self.spec = spec_for(cfg.family.value)
        self._factored = hf._factors_meta(cfg, self.model_dir)
        self._links = hf._factor_links(cfg, self.model_dir) if self._factored is not None else {}
        stem = hf.FACTORS_STEM if self._factored is not None else "model"
        if stem == "model" and not (
            (self.model_dir / "model.safetensors").is_file()
            or (self.model_dir / "model.safetensors.index.json").is_file()
        ):
            raise UserError(
                f"model_dir: {self.model_dir} has no model.safetensors or "
                "model.safetensors.index.json (layer streaming reads safetensors only; convert "
                "a pytorch_model.bin once with `jcompress convert`)"
            )
        self._w = hf._Weights(self.model_dir, stem, allow_nonfinite=allow_nonfinite)
        names = set(self._w.keys())
        rows = self.spec.table(cfg)
        self._alias = hf._prefix_alias(names, {n for _, n, _ in rows}, self.spec.base_prefix)
        self._groups: dict[int, list[tuple[Rule, str, tuple[str, ...]]]] = {}
        used: set[str] = set()
        self.group_bytes: dict[int, int] = {}
        for rule, name, paths in rows:
            g = layer_of(cfg, paths[0])
            self._groups.setdefault(g, []).append((rule, name, paths))
            used |= self._check_row(rule, name, paths, names, g)
        extra = sorted(
            n for n in names - used if not self.spec.is_ignored(self._alias.get(n, n), cfg)
        )
        if extra:
            more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
            raise UserError(
                f"{self.model_dir}: unexpected tensors for a {cfg.family.value} model: "
                f"{', '.join(extra[:5])}{more}"
            )
        self.resident_bytes = 0
        self.peak_bytes = 0
        self._held: dict[int, int] = {}

    # -- up-front checks (headers only) --------------------------------------------------

    def _stored(self, key: str) -> int:
        f = self._w.files[self._w.where[key]]
        dt = f.dtype(key)
        if self.dtype is not None and jnp.issubdtype(dt, jnp.floating) and dt.itemsize >= 2:
            dt = np.dtype(self.dtype)
        return int(np.prod(f.shape(key), dtype=np.int64)) * dt.itemsize

    def _check_row(self, rule, name, paths, names, g) -> set[str]:
        cfg = self.cfg
        used: set[str] = set()
        if self._factored is not None and any(
            f"{hf.FACTORS_PREFIX}{p}" in names or p in self._factored for p in paths
        ):
            for p in paths:
                keys = (
                    [k for k in names if k.startswith(f"{hf.FACTORS_PREFIX}{p}/")]
                    if p in self._factored
                    else [f"{hf.FACTORS_PREFIX}{p}"]
                )
                if not keys or any(k not in names for k in keys):
                    raise UserError(
                        f"missing tensor {hf.FACTORS_PREFIX}{p} in the factor checkpoint"
                    )
                used.update(keys)
                self.group_bytes[g] = self.group_bytes.get(g, 0) + sum(map(self._stored, keys))
            return used
        src = self._alias.get(name, name)
        if src not in names:
            raise UserError(
                f"{self.model_dir}: missing tensor {name} (config.json describes a "
                f"{cfg.family.value} model that has it)"
            )
        f = self._w.files[self._w.where[src]]
        check_shape(name, f.shape(src), rule.hf_shape(cfg))
        self.group_bytes[g] = self.group_bytes.get(g, 0) + self._stored(src)
        return {src}

    # -- reading ---------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.cfg.num_layers

    def paths(self, group: int) -> list[str]:
        """Pytree paths of a group (a layer index or :data:`GLOBAL`)."""
        return [p for _, _, paths in self._groups.get(group, []) for p in paths]

    def shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        """``{path: ShapeDtypeStruct}`` of every param as it would be loaded (no data read)."""
        out = {}
        for rows in self._groups.values():
            flat = self._read(rows, shapes_only=True)
            out.update(flat)
        return out

    def _cast(self, value: np.ndarray) -> jax.Array:
        dt = self.dtype
        target = dt if (dt is not None and jnp.issubdtype(value.dtype, jnp.floating)) else None
        return jnp.array(value, dtype=target)  # a copy: the map's pages are dropped next

    def _read(self, rows, *, shapes_only: bool = False) -> dict[str, Any]:
        cfg, w = self.cfg, self._w
        names = set(w.where)
        flat: dict[str, Any] = {}
        for rule, name, paths in rows:
            if self._factored is not None and any(
                f"{hf.FACTORS_PREFIX}{p}" in names or p in self._factored for p in paths
            ):
                for path, want in zip(paths, rule.jax_shapes(cfg), strict=True):
                    if shapes_only:  # a typed leaf stands for a dense array of this shape
                        flat[path] = jax.ShapeDtypeStruct(want, self.dtype or jnp.float32)
                        continue
                    flat[path] = hf._load_factor_leaf(
                        w, names, set(), self._factored, path, want, self._cast, self._links
                    )
                    for k in [k for k in names if k.startswith(f"{hf.FACTORS_PREFIX}{path}")]:
                        w.release(k)
                continue
            src = self._alias.get(name, name)
            if shapes_only:
                f = w.files[w.where[src]]
                dt = f.dtype(src)
                if self.dtype is not None and jnp.issubdtype(dt, jnp.floating):
                    dt = np.dtype(self.dtype)
                for path, shape in zip(paths, rule.jax_shapes(cfg), strict=True):
                    flat[path] = jax.ShapeDtypeStruct(shape, dt)
                continue
            x = w.get(src)
            for path, value in zip(paths, rule.transform.to_jax(x), strict=True):
                flat[path] = self._cast(value)
            jax.block_until_ready([flat[p] for p in paths])
            w.release(src)
        return flat

    def _take(self, group: int, keep=None) -> dict[str, Any]:
        if group in self._held:
            raise RuntimeError(f"group {group} is already held; release it first")
        rows = self._groups.get(group, [])
        return self._hold(group, self._read([r for r in rows if keep is None or keep(r[2])]))

    def _hold(self, group: int, flat: dict[str, Any]) -> dict[str, Any]:
        n = _nbytes(flat)
        self._held[group] = n
        self.resident_bytes += n
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        return flat

    def layer(self, i: int) -> dict[str, Any]:
        """``{path: array}`` of decoder layer ``i`` (full paths, ``model/layers/i/...``)."""
        if not 0 <= i < self.cfg.num_layers:
            raise UserError(f"layer: {i} is out of range [0, {self.cfg.num_layers})")
        return self._take(i)

    def globals(self, modules: Iterable[str | None] | None = None) -> dict[str, Any]:
        """``{path: array}`` of the tensors outside the decoder layers; with ``modules``
        (module paths such as ``model/embed_tokens``; ``None`` entries skipped) only those."""
        if modules is None:
            return self._take(GLOBAL)
        want = tuple(f"{m}/" for m in modules if m)
        return self._take(GLOBAL, lambda paths: paths[0].startswith(want))

    def read(self, paths: Iterable[str]) -> dict[str, Any]:
        """``{path: array}`` of the given param paths only, wherever they live (any layers,
        the globals): each stored tensor holding one of them is read once (the other params a
        fused tensor splits into are dropped), no other tensor is read. Accounted under
        :data:`PICKED` until :meth:`release`.

        Raises:
          UserError: a path that is not a param of this model.
        """
        want = set(paths)
        rows = [r for rs in self._groups.values() for r in rs if want & set(r[2])]
        unknown = sorted(want - {p for r in rows for p in r[2]})
        if unknown:
            raise UserError(f"paths: {unknown[0]} is not a param of {self.model_dir}")
        if PICKED in self._held:
            raise RuntimeError(f"group {PICKED} is already held; release it first")
        return self._hold(PICKED, {p: v for p, v in self._read(rows).items() if p in want})

    def embed_modules(self) -> tuple[str, ...]:
        """The global modules :func:`jcompress.models.forward.embed` reads."""
        lay = self.spec.layout
        return tuple(m for m in (lay.embed, lay.pos_embed, lay.project_in) if m)

    def head_modules(self) -> tuple[str, ...]:
        """The global modules :func:`jcompress.models.forward.unembed` reads."""
        lay = self.spec.layout
        head = lay.embed if self.cfg.tie_word_embeddings else lay.lm_head
        return tuple(m for m in (lay.final_norm, lay.project_out, head) if m)

    def release(self, groups: int | Iterable[int]) -> None:
        """Forget what :meth:`layer` / :meth:`globals` handed out for ``groups`` (the caller
        drops its references; the account goes down)."""
        for g in [groups] if isinstance(groups, int) else groups:
            self.resident_bytes -= self._held.pop(g, 0)

    def copy_tokenizer(self, dest: Path) -> None:
        """Copy the tokenizer / generation-config files next to the weights into ``dest``."""
        import shutil

        for fname in hf.TOKENIZER_FILES:
            src = self.model_dir / fname
            if src.is_file():
                shutil.copy2(src, dest / fname)

    def config_json(self) -> dict[str, Any]:
        return json.loads((self.model_dir / "config.json").read_text())
